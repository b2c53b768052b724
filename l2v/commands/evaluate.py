"""``l2v eval`` (offline suite / local task data -> table + JSON), ``l2v report`` (JSON -> Markdown + PNG plots)
and ``l2v probe`` (word-level linear probe on CoNLL files)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..io import check_output_dir
from .inference import MODEL_HELP, add_model_args, int_in, kernel_kwargs

EVAL_MODEL_HELP = MODEL_HELP + "; or 'minilm' / a sentence-transformers folder (baseline)"


def _load(spec: str | None, args: argparse.Namespace, causal: bool | None = None):
    from ..eval.models import load_model

    causal = args.causal if causal is None else causal
    return load_model(spec, adapter=args.adapter, pooling=args.pooling,
                      bidirectional=False if causal else None, max_length=args.max_length, dtype=args.dtype,
                      device=args.device, **kernel_kwargs(args))


def _tasks(args: argparse.Namespace) -> list:
    """Suite names / types / 'all' and local task paths, in order."""
    from ..eval.formats import load_task
    from ..eval.suite import select_tasks

    items: list = []
    for spec in args.tasks or []:
        for part in [p for p in spec.split(",") if p.strip()]:
            part = part.strip()
            if Path(part).expanduser().exists():
                items.append(load_task(part, type=args.task_type, instruction=args.instruction))
            else:
                items.extend(select_tasks([part]))
    return items or select_tasks(None)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate one model (and ``--compare`` models) on the offline suite or local task data."""
    from ..eval.report import print_table, slug
    from ..eval.suite import list_tasks, run_tasks

    if args.list:
        for t in list_tasks():
            status = "ok" if t["available"] else f"missing: {t['missing']}"
            size = ", ".join(f"{k}={v}" for k, v in (t.get("size") or {}).items())
            print(f"{t['name']:<24} {t['type']:<19} {size:<34} {status}")
        return 0
    tasks = _tasks(args)
    specs = [args.model, *(args.compare or [])]
    if args.ablation and args.compare:
        raise ValueError("--ablation evaluates one model twice (causal, bidirectional); drop --compare.")
    runs = []
    out_dir = check_output_dir(args.output, "--output")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = _command_line()
    if args.label and len(specs) > 1:
        raise ValueError("--label names a single run; drop it when using --compare.")
    jobs: list[tuple[str | None, str | None, bool | None]] = [(s, args.label, None) for s in specs]
    if args.ablation:
        jobs = [(args.model, "causal", True), (args.model, "bidirectional", False)]
    for spec, label, causal in jobs:
        model = _load(spec, args, causal=causal)
        name = label or str(getattr(model, "name", None) or spec or "smollm2-135m")
        print(f"l2v eval: {name}: {len(tasks)} tasks...", file=sys.stderr)
        # tasks named explicitly must run: a missing data source is an error naming what to install
        run = run_tasks(model, tasks, cache=not args.no_cache, batch_size=args.batch_size, label=name,
                        progress=not args.quiet, skip_missing=not args.tasks)
        run["command"] = command
        path = out_dir / f"{slug(name)}.json"
        path.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        print(f"l2v eval: wrote {path}", file=sys.stderr)
        runs.append(run)
        del model
    if args.json:
        print(json.dumps(runs if len(runs) > 1 else runs[0], indent=2))
    else:
        print_table(runs)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Result JSON files -> report.md + scores.png (+ ablation.png)."""
    from ..eval.report import load_results, write_report

    check_output_dir(args.output, "--output")
    runs = [r for f in args.results for r in load_results(f)]
    ablation = None
    if args.ablation:
        ablation = []
        for item in args.ablation:
            label, sep, path = item.partition("=")
            if not sep:
                label, path = None, item
            for r in load_results(path):
                if label:
                    r["label"] = label
                ablation.append(r)
    md = write_report(runs, args.output, ablation=ablation,
                      command=_command_line())
    print(md)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Word-level linear probe on frozen token states."""
    from ..eval.probe import word_probe
    from .inference import load_from_args

    enc = load_from_args(args)
    scores = word_probe(enc, args.train, args.test, label_column=args.label_column)
    print(json.dumps({"model": enc.name, "bidirectional": enc.bidirectional, **scores}, indent=2))
    return 0


def _command_line() -> str | None:
    """The command as typed, when run as the ``l2v`` program (not when called from Python)."""
    if Path(sys.argv[0]).name in ("l2v", "__main__.py"):
        return "l2v " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a model on the offline suite or local MTEB/BEIR-style task data",
        description="Run the offline suite of real tasks (WordNet, SimLex-999, pang_lee, 20-newsgroups, "
                    "SpamAssassin) or local task data, print a table and write one JSON result per model.",
        epilog="examples:\n  l2v eval smollm2-135m\n  l2v eval smollm2-135m --compare minilm\n"
               "  l2v eval ./my-encoder --tasks retrieval,simlex999 --tasks ~/data/scifact\n"
               "  l2v eval --list", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, positional=True)
    for action in p._actions:
        if action.dest == "model":
            action.help = EVAL_MODEL_HELP + " (default: smollm2-135m)"
    p.add_argument("--compare", nargs="+", default=None, metavar="OTHER",
                   help="more models to evaluate on the same tasks (e.g. minilm)")
    p.add_argument("--tasks", "-t", action="append", default=None,
                   help="comma-separated suite tasks, task types (retrieval, sts, ...), 'all', or paths to local "
                        "task data (BEIR folder, pairs/labelled .jsonl/.tsv); repeatable (default: all)")
    p.add_argument("--task-type", default=None, help="type of local task data when it is ambiguous "
                   "(e.g. clustering for text/label files)")
    p.add_argument("--instruction", default=None, help="instruction for local task data (queries / inputs)")
    p.add_argument("--ablation", action="store_true",
                   help="evaluate MODEL twice: causal and bidirectional attention")
    p.add_argument("--label", default=None, help="name of this run in tables and plots (e.g. +MNTP); "
                   "single model only")
    p.add_argument("--output", "-o", default="eval-results", help="folder for JSON results (default eval-results)")
    p.add_argument("--batch-size", type=int_in(1), default=128)
    p.add_argument("--no-cache", action="store_true", help="embed every request afresh (no per-run text cache)")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the offline suite tasks and exit")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "report", help="turn `l2v eval` JSON results into a Markdown report with PNG plots",
        description="Write report.md with a score table, scores.png (per-task bars, one per result) and, with "
                    "--ablation, ablation.png (scores across ordered stages).",
        epilog="example:\n  l2v report eval-results/*.json --ablation causal=c.json bidirectional=b.json "
               "+MNTP=m.json +SimCSE=s.json", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", help="result JSON files written by `l2v eval`")
    p.add_argument("--ablation", nargs="+", default=None, metavar="[LABEL=]FILE",
                   help="ordered result files for the ablation plot, e.g. causal=a.json +SimCSE=d.json")
    p.add_argument("--output", "-o", default="eval-report", help="output folder (default eval-report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "probe", help="word-level linear probe on frozen token states (CoNLL files)",
        description="Train a logistic-regression probe on first-sub-token states of the words in a CoNLL-style "
                    "train file; report accuracy and macro-F1 on the test file.")
    p.add_argument("train", help="CoNLL-style training file (word ... label per line; blank line between "
                                 "sentences)")
    p.add_argument("test", help="CoNLL-style test file")
    p.add_argument("--label-column", type=int, default=-1, help="column holding the label (default: last)")
    add_model_args(p)
    p.set_defaults(func=cmd_probe)
