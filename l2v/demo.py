"""``make demo``: the embedded default model as a bidirectional encoder, searching real news sentences.

Corpus: the Lee background corpus (299 Australian news articles, 2001) shipped in the gensim wheel's test data,
split into sentences. Everything runs offline on the CPU.
"""

from __future__ import annotations

import re
import sys
import time

QUERIES = [
    "bushfires threaten homes near Sydney",
    "cricket match result",
    "peace talks in the Middle East",
    "the Taliban in Afghanistan",
    "interest rates and the economy",
]


def news_sentences(limit: int = 600) -> list[str]:
    """Sentences (8-60 words) from the Lee background corpus, in corpus order."""
    from .data.offline import gensim_file

    text = gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    out: list[str] = []
    for doc in text.splitlines():
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", doc.strip()):
            words = sent.split()
            if 8 <= len(words) <= 60:
                out.append(sent)
                if len(out) >= limit:
                    return out
    return out


def main() -> int:
    from . import Encoder

    print("l2v demo: SmolLM2-135M-Instruct as a bidirectional encoder (mean pooling), offline, on CPU\n")
    t0 = time.perf_counter()
    enc = Encoder.from_pretrained()
    print(f"loaded {enc.name} ({enc.dtype}, dim {enc.dim}, bidirectional={enc.bidirectional}) "
          f"in {time.perf_counter() - t0:.1f} s")

    docs = news_sentences()
    t0 = time.perf_counter()
    doc_vecs = enc.encode(docs, normalize=True, show_progress_bar=True)
    dt = time.perf_counter() - t0
    print(f"encoded {len(docs)} news sentences in {dt:.1f} s ({len(docs) / dt:.0f} sentences/s)\n")

    t0 = time.perf_counter()
    q_vecs = enc.encode(QUERIES, instruction="Given a query, retrieve a news sentence about it: ", normalize=True)
    scores = q_vecs @ doc_vecs.T
    print(f"{len(QUERIES)} queries encoded and searched in {(time.perf_counter() - t0) * 1000:.0f} ms\n")
    for q, row in zip(QUERIES, scores, strict=True):
        print(f"query: {q}")
        for j in row.argsort()[::-1][:3]:
            snippet = docs[j] if len(docs[j]) <= 110 else docs[j][:107] + "..."
            print(f"  {row[j]:.3f}  {snippet}")
        print()
    print("Untrained bidirectional attention is only step 1 of LLM2Vec; `l2v train mntp` and `l2v train simcse` "
          "follow (see README).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
