"""FastDropout: the same distribution and semantics as nn.Dropout, swapped into LoRA on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import simcse_cfg  # noqa: E402

from l2v.train.dropout import FastDropout, keep_mask, use_fast_dropout  # noqa: E402
from l2v.train.simcse import SimCSEObjective  # noqa: E402


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_matches_p(p):
    torch.manual_seed(0)
    keep = keep_mask((1_000_003,), p)  # odd size: the last int64 word is only partly used
    assert keep.dtype == torch.bool and keep.shape == (1_000_003,)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.003  # ~6 standard deviations


def test_lanes_are_independent():
    torch.manual_seed(1)
    p = 0.3
    drop = ~keep_mask((400_000, 4), p)  # the 4 lanes of one random word sit side by side
    both = (drop[:, :-1] & drop[:, 1:]).float().mean().item()
    assert abs(both - p * p) < 0.004
    rows = (~keep_mask((2000, 64), p)).float()
    corr = torch.corrcoef(rows.T)  # columns (lane positions) uncorrelated
    off_diag = corr[~torch.eye(64, dtype=torch.bool)]
    assert off_diag.abs().max().item() < 0.12


def test_training_scales_kept_values_and_zeros_the_rest():
    torch.manual_seed(2)
    drop = FastDropout(0.25).train()
    x = torch.rand(512, 256) + 1.0
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.01  # expectation preserved


def test_gradient_is_the_scaled_mask():
    drop = FastDropout(0.5).train()
    x = torch.ones(64, 64, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * 2.0)


def test_eval_mode_and_p_zero_are_identity_and_bad_p_is_refused():
    x = torch.randn(8, 8)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_masks_follow_the_global_seed_and_differ_between_calls():
    drop = FastDropout(0.3).train()
    x = torch.ones(32, 32)
    torch.manual_seed(5)
    a, b = drop(x), drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a)  # exact resume restores torch's RNG state
    assert not torch.equal(a, b)


def test_bf16_input_keeps_dtype():
    y = FastDropout(0.1).train()(torch.ones(16, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_use_fast_dropout_swaps_only_active_dropouts():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2), nn.Dropout(0.0)))
    net.eval()
    assert use_fast_dropout(net) == 2
    assert isinstance(net[1], FastDropout) and net[1].p == 0.1 and not net[1].training
    assert isinstance(net[2][0], FastDropout) and type(net[2][1]) is nn.Dropout


def test_lora_training_on_cpu_uses_fast_dropout(tiny_dir, corpus, tmp_path):
    obj = SimCSEObjective()
    obj.setup(simcse_cfg(tiny_dir, corpus, tmp_path / "run", dtype="bfloat16"), torch.device("cpu"))
    lora_drops = [m for n, m in obj.model.named_modules() if "lora_dropout" in n and n.endswith("default")]
    assert lora_drops and all(isinstance(m, FastDropout) and m.p == 0.05 for m in lora_drops)
    # under bf16 autocast peft must not copy LoRA inputs to fp32 and back
    flags = [m.cast_input_dtype_enabled for m in obj.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert flags and not any(flags)


def test_compiles_without_graph_breaks_and_keeps_masks_distinct():
    """Under torch.compile the mask stays one opaque op: two dropouts of the same input are not merged."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = FastDropout(0.5), FastDropout(0.5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)

    torch.manual_seed(3)
    net = torch.compile(Two().train(), fullgraph=True)  # fullgraph: a graph break would raise
    x = torch.ones(128, 128, requires_grad=True)
    a, b = net(x)
    assert not torch.equal(a, b)
    for y in (a, b):
        assert set(y.unique().tolist()) <= {0.0, 2.0}
        assert abs((y != 0).float().mean().item() - 0.5) < 0.03
    a.sum().backward()
    assert torch.equal(x.grad, a.detach())  # d(x * scale)/dx = scale, and x is all ones
