"""Attention over a packed row of short texts, in fp32 on CPU, by l2v's C kernel (``attention.c``).

Why: the packed ("varlen") forward hands attention hundreds of 20-40-token texts per batch; torch's CPU SDPA,
called once per run of equal-length texts, spent ~9% of an encode there at ~23 GFLOP/s. The kernel does one
(text, kv head) per task with fused scores, exact fp32 softmax and P @ V (benchmarks/RESULTS.md, "Attention").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .build import load


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`varlen_attention` can run these ``(1, heads, T, head_dim)`` tensors."""
    d = query.shape[-1]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 and t.shape[0] == 1
                for t in (query, key, value))
            and key.shape[-1] == d and value.shape[-1] == d and d % 16 == 0
            and key.shape[1] == value.shape[1] and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
            and key.shape[2] == query.shape[2] == value.shape[2]
            and load() is not None)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: Sequence[int],
                     scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` per text of a packed row -> ``(T, heads, head_dim)``.

    ``query`` is ``(1, H, T, D)``, ``key``/``value`` ``(1, KV, T, D)`` with ``H % KV == 0`` (grouped-query
    attention: query head ``h`` reads kv head ``h // (H / KV)``, as transformers' ``repeat_kv``); any strides
    with a contiguous last dim. ``lengths`` are the texts' token counts, back to back, summing to ``T``.
    """
    lib = load()
    if lib is None or not supports(query, key, value):
        raise ValueError(f"l2v's attention kernel cannot run query {tuple(query.shape)} {query.dtype} on "
                         f"{query.device} (needs CPU fp32, head_dim % 16 == 0, AVX-512 and the built kernel).")
    n_tokens = query.shape[2]
    lens = torch.as_tensor([int(n) for n in lengths], dtype=torch.int64)
    if int(lens.sum()) != n_tokens or bool((lens < 0).any()):
        raise ValueError(f"lengths sum to {int(lens.sum())}, but the packed row has {n_tokens} tokens.")
    starts = torch.zeros_like(lens)
    starts[1:] = lens.cumsum(0)[:-1]
    q, k, v = (t[0] if t[0].stride(-1) == 1 else t[0].contiguous() for t in (query, key, value))
    heads, kv_heads, d = q.shape[0], k.shape[0], q.shape[-1]
    out = torch.empty((n_tokens, heads, d), dtype=torch.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rc = lib.l2v_varlen_attention(q.data_ptr(), q.stride(1), q.stride(0), k.data_ptr(), k.stride(1), k.stride(0),
                                  v.data_ptr(), v.stride(1), v.stride(0), out.data_ptr(), heads, kv_heads, d,
                                  starts.data_ptr(), lens.data_ptr(), len(lens), scale, int(causal),
                                  torch.get_num_threads())
    if rc == 1:
        raise MemoryError("l2v's attention kernel could not allocate its scratch buffers.")
    if rc:
        raise ValueError(f"l2v's attention kernel rejected query {tuple(query.shape)}, key {tuple(key.shape)}.")
    return out
