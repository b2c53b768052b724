"""l2v's packed-row CPU attention: exact per-text softmax attention, GQA, causal, no leaks, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from l2v.kernels import kernel_status
from l2v.kernels.attention import supports, varlen_attention

AVAILABLE, REASON = kernel_status()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"CPU kernels unavailable: {REASON}")


def reference(q, k, v, lengths, scale, causal) -> torch.Tensor:
    """Each text on its own, in float64, with kv heads repeated as transformers' ``repeat_kv`` does."""
    outs, start = [], 0
    groups = q.shape[1] // k.shape[1]
    for n in lengths:
        qq, kk, vv = (t[:, :, start:start + n].double() for t in (q, k, v))
        kk, vv = kk.repeat_interleave(groups, 1), vv.repeat_interleave(groups, 1)
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, scale=scale)
        outs.append(out[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def packed(heads: int, kv_heads: int, d: int, lengths: list[int], seed: int = 0):
    """q as transformers hands it over: a (1, H, T, D) view of a token-major (1, T, H, D) projection."""
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = (torch.randn(1, t, heads, d, generator=gen) * 2).transpose(1, 2)
    k = torch.randn(1, kv_heads, t, d, generator=gen) * 2
    v = torch.randn(1, t, kv_heads, d, generator=gen).transpose(1, 2)
    return q, k, v


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d,lengths", [
    (9, 3, 64, [30, 30, 5, 1, 17, 64, 65, 130]),  # the default model's shapes; 1-token and >64-token texts
    (4, 4, 80, [12, 33]),                           # no GQA, head_dim not a multiple of 64
    (8, 2, 128, [50, 3, 3]),
    (2, 1, 16, [1]),
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_float64_reference(heads, kv_heads, d, lengths, causal, scale):
    q, k, v = packed(heads, kv_heads, d, lengths, seed=len(lengths) + d)
    got = varlen_attention(q, k, v, lengths, scale, causal)
    assert got.shape == (sum(lengths), heads, d) and got.dtype == torch.float32
    ref = reference(q, k, v, lengths, scale, causal)
    assert (got.double() - ref).abs().max().item() < 2e-5 * ref.abs().max().item()


@needs_kernel
def test_texts_do_not_see_each_other_and_threads_agree():
    lengths = [7, 20, 20, 3]
    q, k, v = packed(6, 2, 32, lengths)
    base = varlen_attention(q, k, v, lengths)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:27] += 5.0  # change only the second text's keys and values
    v2[:, :, 7:27] -= 3.0
    moved = varlen_attention(q, k2, v2, lengths)
    untouched = np.r_[0:7, 27:50]
    np.testing.assert_array_equal(moved[untouched].numpy(), base[untouched].numpy())
    assert not torch.allclose(moved[7:27], base[7:27])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = varlen_attention(q, k, v, lengths)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one.numpy(), base.numpy())


@needs_kernel
def test_rejects_what_it_cannot_run():
    q, k, v = packed(4, 2, 32, [5, 5])
    with pytest.raises(ValueError, match="lengths sum to 9"):
        varlen_attention(q, k, v, [5, 4])
    with pytest.raises(ValueError, match="cannot run"):
        varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), [5, 5])
    odd = packed(4, 2, 24, [5, 5])  # head_dim 24: not a whole number of 16-float vectors
    assert not supports(*odd) and not supports(q, k[:, :, :9], v) and not supports(q, k[:, :1].expand(1, 3, 10, 32), v)
    assert supports(q, k, v)
