"""The ``l2v`` command. Each sub-command lives in ``l2v/commands/<name>.py`` exposing ``register(subparsers)``;
this file only assembles them, so adding a command never touches another's code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules under l2v.commands, in the order their commands appear in --help.
COMMANDS = [
    "inference",  # encode, similarity, info, convert
    "evaluate",  # eval, report, probe
    "train",  # train mntp, train simcse (l2v/commands/train.py)
    "serve",  # serve, export
    "corpus",  # encode-corpus (l2v/commands/corpus.py)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2v",
        description="Turn decoder-only LLMs into text encoders (LLM2Vec): encode, train, evaluate, serve.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"l2v {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"l2v.commands.{name}").register(sub)
    return parser


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, OSError, FloatingPointError) as exc:
        # Known bad-input errors carry a message naming the problem; no traceback for users. FloatingPointError:
        # the model produced NaN/inf embeddings (Encoder.checked names the dtype and the usual cure).
        if os.environ.get("L2V_DEBUG"):
            raise
        print(f"l2v {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError" or os.environ.get("L2V_DEBUG"):
            raise
        # safetensors' own error type (not an OSError) for a truncated or corrupt weights file: bad input too
        print(f"l2v {args.command}: error: a .safetensors weights file is corrupt or truncated ({exc}); "
              "download or save the model again.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
