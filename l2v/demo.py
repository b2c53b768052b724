"""``make demo``: the LLM2Vec recipe end to end on the embedded default model, offline, on the CPU.

1. SmolLM2-135M-Instruct as a bidirectional encoder, scored on the offline evaluation suite (before);
2. a short MNTP run (LoRA, masked next-token prediction) on real Wikipedia sentences shipped in the gensim wheel;
3. a short unsupervised SimCSE run on top of the merged MNTP adapter;
4. the saved encoder directory, reloaded with ``Encoder.from_pretrained(dir)`` and scored again (after),
   then used for a small semantic search over the Lee news sentences.

Sizes are chosen to finish in a few minutes on 2 CPU cores; ``--mntp-steps`` / ``--simcse-steps`` change them.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

# Queries carry an instruction (tokenised with the query, not pooled), as in LLM2Vec retrieval; without it the
# short queries match poorly with both the untrained and the briefly trained encoder.
SEARCH_INSTRUCTION = "Given a query, retrieve a news sentence about it: "
QUERIES = [
    "bushfires threaten homes near Sydney",
    "cricket match result",
    "peace talks in the Middle East",
]


def news_sentences(limit: int = 400) -> list[str]:
    """Sentences (8-60 words) from the Lee background corpus, in corpus order."""
    from .data.offline import gensim_file

    text = gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    out: list[str] = []
    for doc in text.splitlines():
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", doc.strip()):
            if 8 <= len(sent.split()) <= 60:
                out.append(sent)
                if len(out) >= limit:
                    return out
    return out


def _suite(enc, label: str) -> dict | None:
    try:
        from .eval import run_suite
    except ImportError:
        return None
    t0 = time.perf_counter()
    res = run_suite(enc, label=label, progress=True)
    print(f"  {label}: suite average {res['average']:.4f} ({time.perf_counter() - t0:.0f} s)")
    return res


def _table(before: dict, after: dict) -> str:
    lines = [f"{'task':<24}{'metric':<14}{'before':>8}{'after':>8}{'change':>9}"]
    for name, b in before["tasks"].items():
        a = after["tasks"].get(name)
        if a is None:
            continue
        lines.append(f"{name:<24}{b['main_metric'][:13]:<14}{b['main_score']:>8.4f}{a['main_score']:>8.4f}"
                     f"{a['main_score'] - b['main_score']:>+9.4f}")
    lines.append(f"{'average':<38}{before['average']:>8.4f}{after['average']:>8.4f}"
                 f"{after['average'] - before['average']:>+9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import cache_dir
    from .train.recipe import Recipe

    d = Recipe()
    ap = argparse.ArgumentParser(prog="python -m l2v.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mntp-steps", type=int, default=d.mntp_steps)
    ap.add_argument("--simcse-steps", type=int, default=d.simcse_steps)
    ap.add_argument("--output-dir", default=str(cache_dir() / "demo"))
    ap.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation suite")
    args = ap.parse_args(argv)

    from . import Encoder
    from .train.recipe import run_recipe

    t_start = time.perf_counter()
    print("l2v demo: the LLM2Vec recipe on SmolLM2-135M-Instruct, offline, on CPU\n")
    before = None
    if not args.no_eval:
        print("[1/4] evaluating the untrained bidirectional model on the offline suite (before)")
        before = _suite(Encoder.from_pretrained(), "bidirectional, untrained")
        if before is None:
            print("  (l2v.eval is not available; skipping the evaluation)")
    recipe = Recipe(output_dir=args.output_dir, mntp_steps=args.mntp_steps, simcse_steps=args.simcse_steps)
    print(f"\n[2/4] MNTP: {recipe.mntp_steps} steps, batch {recipe.mntp_batch_size} x {recipe.mntp_max_length} "
          f"tokens, 20% of tokens masked with '_', LoRA r=16")
    print(f"[3/4] SimCSE: {recipe.simcse_steps} steps, batch {recipe.simcse_batch_size} x "
          f"{recipe.simcse_max_length} tokens, two dropout views, InfoNCE x 20")
    out = run_recipe(recipe)
    m = out["mntp"]
    print(f"  MNTP held-out masked-token accuracy {m['before']['val_acc']:.3f} -> {m['after']['val_acc']:.3f}, "
          f"loss {m['before']['val_loss']:.3f} -> {m['after']['val_loss']:.3f} ({m['s_per_step']:.1f} s/step)")
    s = out["simcse"]
    print(f"  SimCSE held-out InfoNCE loss {s['before']['val_loss']:.3f} -> {s['after']['val_loss']:.3f} "
          f"({s['s_per_step']:.1f} s/step)")
    print(f"  saved encoder: {out['simcse_dir']}")

    print("\n[4/4] reloading the saved encoder with Encoder.from_pretrained(dir)")
    enc = Encoder.from_pretrained(out["simcse_dir"])
    if before is not None:
        after = _suite(enc, "bi + MNTP + SimCSE")
        print("\n" + _table(before, after))
    docs = news_sentences()
    doc_vecs = enc.encode(docs, normalize=True, show_progress_bar=False)
    q_vecs = enc.encode(QUERIES, instruction=SEARCH_INSTRUCTION, normalize=True)
    print(f"\nsemantic search over {len(docs)} news sentences with the trained encoder:")
    for q, row in zip(QUERIES, q_vecs @ doc_vecs.T, strict=True):
        j = int(row.argmax())
        snippet = docs[j] if len(docs[j]) <= 100 else docs[j][:97] + "..."
        print(f"  {q!r}\n    {row[j]:.3f}  {snippet}")
    print(f"\ndone in {(time.perf_counter() - t_start) / 60:.1f} min. Use the encoder: "
          f"l2v encode --model {out['simcse_dir']} \"a sentence\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
