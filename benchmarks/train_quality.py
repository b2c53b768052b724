"""Quality experiment: causal mean pooling vs bidirectional untrained vs bi+MNTP vs bi+MNTP+SimCSE on the
default model, over several seeds, on the offline evaluation suite (``l2v.eval.run_suite``).

    python benchmarks/train_quality.py --seeds 0,1,2 --out /tmp/l2v-quality
    python benchmarks/train_quality.py --mntp-steps 60 --simcse-steps 60 --simcse-lr 3e-5   # other sizes

Untrained rows are deterministic (one run). Trained rows: mean +- std over seeds (seed = training seed: LoRA
init, data order, masks, dropout). Results go to ``<out>/quality.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def evaluate(label: str, loader, tasks) -> dict:
    from l2v.eval import run_suite

    t0 = time.perf_counter()
    enc = loader()
    res = run_suite(enc, tasks=tasks, label=label)
    scores = {name: r["main_score"] for name, r in res["tasks"].items()}
    print(f"  {label}: average {res['average']:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
          flush=True)
    return {"average": res["average"], "tasks": scores}


def main() -> None:
    from l2v.train.recipe import Recipe

    defaults = Recipe()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--tasks", default=None, help="comma-separated suite task names (default: the whole suite)")
    for f in ("mntp_steps", "mntp_batch_size", "mntp_max_length", "mntp_lr", "simcse_steps", "simcse_batch_size",
              "simcse_max_length", "simcse_lr", "max_texts"):
        v = getattr(defaults, f)
        ap.add_argument("--" + f.replace("_", "-"), type=type(v) if v is not None else int, default=v)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from l2v import Encoder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",") if args.tasks else None
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()
    t_all = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    print("evaluating untrained baselines", file=sys.stderr)
    rows["causal, mean pooling"] = [evaluate("causal", lambda: Encoder.from_pretrained(bidirectional=False),
                                             tasks)]
    rows["bidirectional, untrained"] = [evaluate("bi", lambda: Encoder.from_pretrained(), tasks)]
    from l2v.train.recipe import run_recipe

    recipe_fields = {f: getattr(args, f) for f in ("mntp_steps", "mntp_batch_size", "mntp_max_length", "mntp_lr",
                                                   "simcse_steps", "simcse_batch_size", "simcse_max_length",
                                                   "simcse_lr", "max_texts")}
    train_s = []
    for seed in seeds:
        print(f"seed {seed}: MNTP then SimCSE", file=sys.stderr)
        t0 = time.perf_counter()
        res = run_recipe(Recipe(output_dir=str(out / f"seed{seed}"), seed=seed, threads=args.threads,
                                progress=False, **recipe_fields))
        train_s.append(time.perf_counter() - t0)
        rows.setdefault("bi + MNTP", []).append(
            {**evaluate(f"mntp-s{seed}", lambda d=res["mntp_dir"]: Encoder.from_pretrained(d), tasks),
             "mntp_val": res["mntp"].get("after"), "mntp_val_before": res["mntp"].get("before")})
        rows.setdefault("bi + MNTP + SimCSE", []).append(
            evaluate(f"simcse-s{seed}", lambda d=res["simcse_dir"]: Encoder.from_pretrained(d), tasks))
        (out / "quality.json").write_text(json.dumps({"rows": rows}, indent=2), encoding="utf-8")
    summary = {"rows": rows, "recipe": recipe_fields, "seeds": seeds, "train_s_per_seed": train_s,
               "total_s": time.perf_counter() - t_all, "load_start": load, "load_end": os.getloadavg()}
    (out / "quality.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(table(rows))
    print(f"\ntotal {summary['total_s'] / 60:.1f} min; training {statistics.mean(train_s) / 60:.1f} min per seed; "
          f"load average start {load[0]:.1f}, end {summary['load_end'][0]:.1f}")


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: dict[str, list[dict]]) -> str:
    task_names = list(next(iter(rows.values()))[0]["tasks"])
    head = "| model | average | " + " | ".join(task_names) + " |"
    lines = [head, "|" + "---|" * (len(task_names) + 2)]
    for name, runs in rows.items():
        cells = [_cell([r["average"] for r in runs])]
        cells += [_cell([r["tasks"][t] for r in runs]) for t in task_names]
        lines.append(f"| {name} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
