"""``l2v train {mntp,simcse,...}``: one sub-command per training objective, all on the shared loop.

Every config field becomes an option (``--lr``, ``--steps``, ``--lora-r`` ...); ``--config file.yaml`` supplies
defaults that options override. Adding an objective = one entry in :data:`OBJECTIVES`:
``name: (config class path, objective class path, help)``; classes are imported only when the command runs
(the config class when ``--help`` is built).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "mntp": ("l2v.train.config:MNTPConfig", "l2v.train.mntp:MNTPObjective",
             "masked next-token prediction with LoRA (LLM2Vec step 2)"),
    "simcse": ("l2v.train.config:SimCSEConfig", "l2v.train.simcse:SimCSEObjective",
               "unsupervised SimCSE: dropout views, in-batch InfoNCE (LLM2Vec step 3)"),
    "supervised": ("l2v.train.supervised:SupervisedConfig", "l2v.train.supervised:SupervisedObjective",
                   "supervised contrastive: query/positive/hard-negative pairs, in-batch + hard negatives, "
                   "GradCache, torchrun (LLM2Vec step 4)"),
}

EPILOG = """examples:
  l2v train mntp --steps 200 --output-dir runs/mntp                  # built-in offline corpus, default model
  l2v train simcse --model runs/mntp --steps 200 --output-dir runs/simcse
  l2v train mntp --data corpus.txt --config mntp.yaml --save-every 50
  l2v train mntp --steps 200 --output-dir runs/mntp --resume          # continue after a crash (same options)
  l2v train supervised --model runs/simcse --data pairs/ --gradcache-chunk 16  # E5-style pairs dir
  torchrun --nproc_per_node 8 -m l2v train supervised --batch-size 512 ...   # same command, 8 GPUs
  torchrun --nproc_per_node 8 -m l2v train mntp --batch-size 256 ...         # mntp and simcse too (global batch)
  l2v encode --model runs/simcse "a sentence"                         # use the trained encoder
"""


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def add_objective(sub: argparse._SubParsersAction, name: str, config_path: str, objective_path: str,
                  help_text: str) -> argparse.ArgumentParser:
    from ..train.config import add_config_args

    config_cls = _load(config_path)
    p = sub.add_parser(name, help=help_text, description=f"l2v train {name}: {help_text}.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, config_cls)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.set_defaults(func=lambda args: run(args, config_cls, objective_path, name))
    return p


def run(args: argparse.Namespace, config_cls: Any, objective_path: str, name: str) -> int:
    from ..train.config import config_from_args

    cfg = config_from_args(config_cls, args)
    if args.print_config:
        print(json.dumps({"objective": name, **cfg.to_dict()}, indent=2))
        return 0
    from ..train.distributed import env_info
    from ..train.loop import train

    summary = train(cfg, _load(objective_path)())
    if env_info().is_main:  # under torchrun, one summary rather than one per rank
        print(json.dumps(summary, indent=2, default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an encoder: mntp, simcse, ...",
                              description="Train LoRA adapters on a bidirectional decoder (LLM2Vec recipe). "
                                          "Outputs an encoder directory that `l2v encode --model DIR` loads.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="objective", metavar="OBJECTIVE")
    for name, (config_path, objective_path, help_text) in OBJECTIVES.items():
        add_objective(sub, name, config_path, objective_path, help_text)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])
