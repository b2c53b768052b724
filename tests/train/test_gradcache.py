"""GradCache gives the gradients of the plain full-batch computation (fp32, tiny model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _pairs_helpers import grads, one_thread, tiny_encoder, toy_pairs  # noqa: E402

from l2v.train.supervised import PairStep, StepSettings


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield from one_thread()

def _run(chunk, negatives="all", dropout=0.0, arch="llama"):
    enc = tiny_encoder(arch, dropout=dropout)
    enc.model.zero_grad()
    torch.manual_seed(123)
    loss = PairStep(enc, StepSettings(chunk_size=chunk)).step(toy_pairs(10, negatives=negatives))
    return loss, grads(enc.model)


@pytest.mark.parametrize("negatives", ["all", "some", "none"])
def test_gradcache_matches_full_batch(negatives):
    loss_full, g_full = _run(None, negatives)
    loss_gc, g_gc = _run(3, negatives)
    assert abs(loss_full - loss_gc) < 1e-5
    assert g_full.keys() == g_gc.keys() and len(g_full) > 10
    for name, g in g_full.items():
        torch.testing.assert_close(g_gc[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_gradcache_replays_dropout():
    """With dropout on and one chunk per group, GradCache draws the same masks as the plain step, and its
    re-forward replays them: gradients still match. Without the RNG replay they would not."""
    loss_full, g_full = _run(None, dropout=0.3)
    loss_gc, g_gc = _run(100, dropout=0.3)
    loss_nodrop, _ = _run(None)
    assert abs(loss_full - loss_nodrop) > 1e-4  # dropout really is active
    assert abs(loss_full - loss_gc) < 1e-5
    for name, g in g_full.items():
        torch.testing.assert_close(g_gc[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_gradcache_bad_chunk():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="chunk size"):
        PairStep(enc, StepSettings(chunk_size=-1)).step(toy_pairs(4))
