"""Length-bucketed batching under a token budget, streamed over large inputs.

``encode`` tokenizes ``STREAM_CHUNK`` texts at a time, sorts that chunk by length (longest first) and cuts it into
batches holding at most ``batch_size`` texts and at most ``max_tokens`` tokens. A batch's token cost is what the
model actually computes: the sum of the lengths when texts are packed into one row (CPU default), or
``n_texts * longest`` when they are padded. Only one chunk's token ids exist at a time, so memory stays flat
however many texts are encoded (the (n, dim) float32 output is the only thing that grows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

# Texts tokenized (and length-sorted) at a time. Sorting within 16k texts already leaves almost no padding,
# and the token ids of one chunk of short texts take a few MB.
STREAM_CHUNK = 16384

# Default token budget per batch: large enough that each linear layer multiplies thousands of rows (near the
# CPU's peak matmul rate), small enough that activations stay in cache-friendly sizes.
DEFAULT_MAX_TOKENS = 4096


def batch_cost(lengths: Sequence[int], packed: bool) -> int:
    """Tokens the model computes for a batch: real tokens when packed, padded tokens otherwise."""
    if not lengths:
        return 0
    return sum(lengths) if packed else max(lengths) * len(lengths)


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                 packed: bool = False) -> list[list[int]]:
    """Split indices ``0..len(lengths)-1`` into batches, longest texts first.

    Each batch holds at most ``batch_size`` texts and costs at most ``max_tokens`` (see :func:`batch_cost`); a text
    longer than the budget gets a batch of its own. Every index appears exactly once; equal lengths are adjacent.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens_per_batch must be a positive integer or None, got {max_tokens!r}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    total = longest = 0
    for i in order:
        n = int(lengths[i])
        if cur:
            cost = total + n if packed else max(longest, n) * (len(cur) + 1)
            if len(cur) >= batch_size or (max_tokens is not None and cost > max_tokens):
                batches.append(cur)
                cur, total, longest = [], 0, 0
        cur.append(i)
        total += n
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def chunk_ranges(n: int, chunk: int = STREAM_CHUNK) -> Iterator[range]:
    """``range`` objects covering ``0..n-1`` in consecutive pieces of at most ``chunk``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    for s in range(0, n, chunk):
        yield range(s, min(n, s + chunk))
