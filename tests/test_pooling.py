"""Pooling functions against hand-computed values, with left and right padding."""

from __future__ import annotations

import pytest
import torch

from l2v.pooling import pool

# Two sequences, dim 1 so the expected values are easy to read. Row 0 right-padded, row 1 left-padded.
H = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [9.0]],
                  [[9.0], [9.0], [5.0], [6.0], [7.0]]])
ATTN = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
# Row 0: position 0 is BOS/instruction (not pooled); row 1: all real tokens pooled.
POOL = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("mean", [3.0, 6.0]),  # (2+3+4)/3, (5+6+7)/3
        ("weighted_mean", [(2 + 2 * 3 + 3 * 4) / 6, (5 + 2 * 6 + 3 * 7) / 6]),
        ("last_token", [4.0, 7.0]),
        ("eos", [4.0, 7.0]),
        ("bos", [1.0, 5.0]),
    ],
)
def test_pooling_values(mode, expected):
    out = pool(mode, H, POOL, ATTN)
    assert out.shape == (2, 1)
    torch.testing.assert_close(out[:, 0], torch.tensor(expected))


def test_mean_with_empty_pool_mask_is_finite():
    out = pool("mean", H, torch.zeros_like(POOL), ATTN)
    assert torch.isfinite(out).all()


def test_unknown_mode():
    with pytest.raises(ValueError, match="pooling='max'"):
        pool("max", H, POOL, ATTN)


@pytest.mark.parametrize("mode", ["mean", "weighted_mean"])
def test_fp16_states_pool_without_overflow(mode):
    """fp16 models (dtype='auto' on a T4/V100, or --dtype float16): the sums of a long text overflowed fp16's 65504,
    so a 400-token text came out NaN (weighted_mean) or inf (mean of states near 200)."""
    n = 400
    hidden = torch.full((1, n, 4), 200.0, dtype=torch.float16)
    hidden[0, :, 1] = -3.0
    mask = torch.ones(1, n, dtype=torch.bool)
    out = pool(mode, hidden, mask, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), pool(mode, hidden.float(), mask, mask))
