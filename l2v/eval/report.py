"""Result files -> a terminal table, a Markdown report, and matplotlib PNG plots.

A result file is the JSON dict returned by :func:`l2v.eval.run_suite` (written by ``l2v eval``). Plots:
``scores.png`` (per-task main score, one bar per model/configuration) and, given an ordered list of runs,
``ablation.png`` (each task's score across e.g. causal -> bidirectional -> +MNTP -> +SimCSE, plus the average).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

ABLATION_ORDER = ("causal", "bidirectional", "+MNTP", "+SimCSE")


def load_results(path: str | Path) -> list[dict]:
    """Runs in a result file (one dict, or a list of dicts), each checked for the fields reports need."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such result file.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}).") from exc
    except UnicodeDecodeError as exc:  # e.g. a .npy or .png passed by a glob
        raise ValueError(f"{path}: not a JSON result file (not UTF-8 text).") from exc
    runs = data if isinstance(data, list) else [data]
    for i, run in enumerate(runs):
        where = f"{path}" + (f"[{i}]" if isinstance(data, list) else "")
        if not isinstance(run, dict) or not isinstance(run.get("tasks"), dict):
            raise ValueError(f"{where}: not an l2v eval result (expected an object with a 'tasks' mapping, as "
                             "written by `l2v eval`).")
        for name, task in run["tasks"].items():
            if not isinstance(task, dict) or "main_score" not in task:
                raise ValueError(f"{where}: task {name!r} has no 'main_score'.")
        run.setdefault("model", Path(path).stem)
    return runs


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "model"


def run_label(run: dict) -> str:
    return str(run.get("label") or run.get("model") or "model")


def task_names(runs: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(t for r in runs for t in r["tasks"]))


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def score_table(runs: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (task, type, metric, one score column per run, x100), with an average row."""
    header = ["task", "type", "metric", *[run_label(r) for r in runs]]
    rows = []
    for name in task_names(runs):
        first = next(r["tasks"][name] for r in runs if name in r["tasks"])
        rows.append([name, first.get("type", ""), first.get("main_metric", ""),
                     *[_fmt(r["tasks"].get(name, {}).get("main_score")) for r in runs]])
    common = [n for n in task_names(runs) if all(n in r["tasks"] and r["tasks"][n]["main_score"] is not None
                                                 for r in runs)]
    if common:
        avgs = [sum(r["tasks"][n]["main_score"] for n in common) / len(common) for r in runs]
        rows.append([f"average ({len(common)} tasks)", "", "", *[_fmt(a) for a in avgs]])
    return header, rows


def print_table(runs: Sequence[dict], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = score_table(runs)
    table = Table(title=title or "l2v eval (main score x100)")
    for i, h in enumerate(header):
        table.add_column(h, justify="right" if i >= 3 else "left")
    for row in rows:
        table.add_row(*row)
    timing = ["time (s)", "", "", *[f"{r.get('seconds', 0):.1f}" for r in runs]]
    table.add_row(*timing, style="dim")
    console = Console()
    if not console.is_terminal:  # piped / logged: don't squeeze task names into 80 columns
        console = Console(width=max(console.width, 60 + 16 * len(runs)))
    console.print(table)


def markdown_table(runs: Sequence[dict]) -> str:
    header, rows = score_table(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(runs)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("| time (s) | | | " + " | ".join(f"{r.get('seconds', 0):.1f}" for r in runs) + " |")
    return "\n".join(lines)


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_scores(runs: Sequence[dict], path: str | Path) -> Path:
    """Grouped bars: per task, one bar per run (main score x100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = task_names(runs)
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    x = np.arange(len(names))
    for i, run in enumerate(runs):
        vals = [100 * (run["tasks"].get(n, {}).get("main_score") or 0.0) for n in names]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=run_label(run))
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=7)
    metrics = [next(r["tasks"][n].get("main_metric", "") for r in runs if n in r["tasks"]) for n in names]
    ax.set_xticks(x, [f"{n}\n({m})" for n, m in zip(names, metrics, strict=True)], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("main score (x100)")
    ax.set_title("l2v offline suite")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def plot_ablation(runs: Sequence[dict], path: str | Path) -> Path:
    """One line per task (and a thick average line) across the ordered stages (e.g. causal -> +SimCSE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in task_names(runs) if all(n in r["tasks"] for r in runs)]
    stages = [run_label(r) for r in runs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(stages) + 2), 4.2))
    for n in names:
        ax.plot(stages, [100 * (r["tasks"][n]["main_score"] or 0.0) for r in runs], marker="o", alpha=0.6,
                label=n)
    if names:
        avg = [100 * sum(r["tasks"][n]["main_score"] or 0.0 for n in names) / len(names) for r in runs]
        ax.plot(stages, avg, marker="s", color="black", linewidth=3, label="average")
    ax.set_ylabel("main score (x100)")
    ax.set_title("ablation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save_figure(fig, path)


def write_report(runs: Sequence[dict], output: str | Path, ablation: Sequence[dict] | None = None,
                 command: str | None = None) -> Path:
    """Write ``report.md`` + ``scores.png`` (+ ``ablation.png``) into ``output``; returns the Markdown path."""
    if not runs and not ablation:
        raise ValueError("no result files given: pass JSON files written by `l2v eval`.")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    shown = list(runs) or list(ablation or [])
    lines = ["# l2v evaluation report", ""]
    dates = sorted({str(r.get("date", ""))[:10] for r in shown if r.get("date")})
    if dates:
        lines.append(f"Runs dated {', '.join(dates)}." + (f" Report command: `{command}`." if command else ""))
        lines.append("")
    lines += ["## Main scores (x100)", "", markdown_table(shown), "", "![scores](scores.png)", ""]
    plot_scores(shown, out / "scores.png")
    if ablation:
        plot_ablation(ablation, out / "ablation.png")
        lines += ["## Ablation", "", markdown_table(ablation), "", "![ablation](ablation.png)", ""]
    lines += ["## Runs", ""]
    for r in [*shown, *[a for a in (ablation or []) if a not in shown]]:
        cfg = ", ".join(f"{k}={v}" for k, v in (r.get("config") or {}).items())
        lines.append(f"- **{run_label(r)}**: {len(r['tasks'])} tasks in {r.get('seconds', 0):.1f} s "
                     f"({r.get('texts_encoded', '?')} texts embedded); {cfg}")
        for name, reason in (r.get("skipped") or {}).items():
            lines.append(f"  - skipped {name}: {str(reason).splitlines()[0]}")
    lines += ["", "## All metrics", ""]
    for name in task_names(shown):
        lines.append(f"### {name}")
        lines.append("")
        for r in shown:
            t = r["tasks"].get(name)
            if t:
                metrics = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in t["metrics"].items())
                lines.append(f"- {run_label(r)}: {metrics} (size {t.get('size')}, {t.get('seconds', 0):.1f} s)")
        lines.append("")
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md
