"""The int16 fixed-point kernel path: per-row scales, exact int32 sums that cannot overflow, fused MLP, modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2v.kernels import (
    Bf16Linear,
    GatedMLP,
    bf16_gated,
    bf16_linear,
    convert_linears,
    fuse_gated_mlps,
    gated_mlp,
    kernel_status,
)
from l2v.kernels.linear import (
    i16_norm_target,
    pack_gated_i16,
    pack_i16,
    quantize_rows,
    unpack_gated_i16,
    unpack_i16,
)

AVAILABLE, REASON = kernel_status()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"CPU kernel unavailable: {REASON}")


def quantized(v: torch.Tensor) -> torch.Tensor:
    """The kernel's rule for a row (float64 here): int16 with L2 norm <= the target and |q| <= 32767."""
    v = v.double()
    s = torch.maximum(v.norm(dim=-1, keepdim=True) / i16_norm_target(v.shape[-1]),
                      v.abs().amax(dim=-1, keepdim=True) / 32767.0)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(v / s) * s


def exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double().t()
    return out + b.double() if b is not None else out


def test_quantize_rows_bounds_and_roundtrip():
    torch.manual_seed(0)
    w = torch.randn(70, 577)
    w[3, 5] = 500.0  # an outlier row: the |q| <= 32767 cap decides its scale
    w[4] = 0.0
    q, s = quantize_rows(w)
    assert q.dtype == torch.int16 and s.dtype == torch.float32 and s.shape == (70,)
    qd = q.double()
    assert qd.norm(dim=1).max() <= 46340 - 8  # Cauchy-Schwarz: any two such rows sum below 2^31
    assert qd[3].abs().max() == 32767 and torch.all(q[4] == 0)
    deq = qd * s.double()[:, None]
    rel = (deq - w.double()).abs().amax(dim=1) / w.double().abs().amax(dim=1).clamp_min(1e-30)
    assert rel.max() < 2e-4  # ~15 bits (bf16 keeps 8: up to 2^-9 = 2e-3 per entry)
    packed, scale = pack_i16(q, s)
    assert packed.shape == (2, 289, 64, 2) and scale.shape == (128,) and torch.all(scale[70:] == 0)
    q2, s2 = unpack_i16(packed, scale, 70, 577)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_rows(torch.tensor([[1.0, float("nan")]]))


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 10, 5), (13, 33, 70), (100, 577, 129), (37, 1536, 200)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_the_int16_reference_and_beats_bf16(m, k, n, with_bias):
    torch.manual_seed(m * 1000 + k + n)
    lin = torch.nn.Linear(k, n, bias=with_bias)
    x = torch.randn(m, k)
    got = Bf16Linear.from_module(lin, fmt="int16")(x)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    q, s = quantize_rows(lin.weight)
    ref = quantized(x) @ (q.double() * s.double()[:, None]).t() + (lin.bias.double() if with_bias else 0)
    scale = ref.abs().max().item()
    # the same quantization up to an activation scale computed in fp32 (a rare one-unit flip), then exact sums
    assert (got.double() - ref).abs().max().item() <= 2e-5 * scale
    true = exact(x, lin.weight, lin.bias if with_bias else None)
    bf16 = Bf16Linear.from_module(lin)(x)
    err16, errbf = (got.double() - true).abs().max().item(), (bf16.double() - true).abs().max().item()
    assert err16 < errbf / 4 or k == 1  # k = 1: one product, exact in both


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 577, 1536, 4097])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_aligned_rows_reach_the_bound_without_overflow(k, sign):
    """x and w equal and flat: every product has the same sign, the int32 sum sits right under 2^31."""
    w = torch.ones(3, k)
    w[1] *= -1
    x = sign * torch.ones(2, k)
    x[1] *= 7.5
    q, s = quantize_rows(w)
    if k > 1:
        assert float(q[0].double() @ q[0].double()) > 0.99 * 2**31  # the test exercises the bound
    got = Bf16Linear.from_module(torch.nn.Linear(k, 3, bias=False).requires_grad_(False), fmt="int16")
    got.load_state_dict({"weight": w})
    out = got(x).double()
    want = quantized(x) @ (q.double() * s.double()[:, None]).t()  # a wrapped int32 sum would flip the sign
    assert torch.allclose(out, want, rtol=1e-6, atol=0), (out, want)
    assert torch.allclose(out, exact(x, w, None), rtol=1e-3, atol=0)  # flat rows: one systematic rounding


@needs_kernel
def test_non_finite_rows_give_nan_rows_only():
    lin = torch.nn.Linear(64, 10)
    layer = Bf16Linear.from_module(lin, fmt="int16")
    x = torch.randn(4, 64)
    x[1, 5], x[2, 0] = float("nan"), float("inf")
    out = layer(x)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()
    assert torch.equal(out[[0, 3]], layer(x[[0, 3]]))
    assert torch.equal(layer(torch.zeros(2, 64)), lin.bias.detach().expand(2, 10))


@needs_kernel
def test_state_dict_conv1d_casting_and_repr():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    lin = torch.nn.Linear(33, 70)
    layer = Bf16Linear.from_module(lin, fmt="int16")
    assert layer.fmt == "int16" and not layer.fp32 and "weights=int16" in repr(layer)
    sd = layer.state_dict()
    assert sorted(sd) == ["bias", "weight"] and sd["weight"].dtype == torch.float32
    assert (sd["weight"] - lin.weight).abs().max() <= 1e-4 * lin.weight.abs().max()
    other = Bf16Linear.from_module(torch.nn.Linear(33, 70), fmt="int16")
    other.load_state_dict({"weight": lin.weight, "bias": lin.bias})
    assert torch.equal(other.packed, layer.packed) and torch.equal(other.scale, layer.scale)
    before = layer(torch.ones(2, 33))
    layer.to(torch.bfloat16)  # casting a model must not touch the int16 rows or their fp32 scales
    assert layer.packed.dtype == torch.int16 and torch.equal(layer.int16_rows()[1], quantize_rows(lin.weight)[1])
    layer.bias.data = lin.bias.detach().clone()  # the cast did round the (ordinary) bias
    assert torch.equal(layer(torch.ones(2, 33)), before)
    conv = Conv1D(70, 33)  # GPT-2 layout: weight [in, out]
    c16 = Bf16Linear.from_module(conv, fmt="int16")
    x = torch.randn(5, 33)
    assert torch.allclose(c16(x), conv(x), rtol=1e-3, atol=1e-3)
    assert c16.weight.shape == conv.weight.shape


@needs_kernel
def test_bad_scales_are_a_clear_error_and_the_op_compiles():
    q, s = quantize_rows(torch.randn(24, 32))
    packed, scale = pack_i16(q, s)
    with pytest.raises(ValueError, match="int16 scales"):
        bf16_linear(torch.randn(3, 32), packed, None, 24, scale[:10].contiguous())
    with pytest.raises(ValueError, match="unknown kernel weight format"):
        Bf16Linear.from_module(torch.nn.Linear(4, 4), fmt="int8")
    with pytest.raises(ValueError, match="fmt must be"):
        convert_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), fmt="fp32")
    fn = torch.compile(lambda x: bf16_linear(x * 2, packed, None, 24, scale) + 1, fullgraph=True, dynamic=True)
    x = torch.randn(5, 32)
    assert torch.allclose(fn(x), bf16_linear(x * 2, packed, None, 24, scale) + 1, atol=1e-5)


# ------------------------------------------------------------------------------------ the fused gated MLP
@needs_kernel
@pytest.mark.parametrize("m,k,i,n,with_bias", [(1, 48, 64, 48, False), (200, 64, 100, 48, True),
                                               (13, 33, 37, 70, True), (97, 16, 31, 130, False)])
def test_whole_mlp_is_bit_identical_to_gated_then_down(m, k, i, n, with_bias):
    torch.manual_seed(m + k + i)
    gate, up = torch.randn(i, k) / k**0.5, torch.randn(i, k) / k**0.5
    gate_up, gu_scale = pack_gated_i16(quantize_rows(gate), quantize_rows(up))
    (gq, gs), (uq, us) = unpack_gated_i16(gate_up, gu_scale, i, k)
    assert torch.equal((gq, gs)[0], quantize_rows(gate)[0]) and torch.equal(us, quantize_rows(up)[1])
    down, d_scale = pack_i16(*quantize_rows(torch.randn(n, i) / i**0.5))
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(m, k) * 2
    want = bf16_linear(bf16_gated(x, gate_up, i, gu_scale), down, bias, n, d_scale)
    got = gated_mlp(x, gate_up, down, bias, i, n, gu_scale, d_scale)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    # against exact math: silu(x g) * (x u) then down, all within int16 precision
    g, u = exact(x, gate, None), exact(x, up, None)
    dq, ds = unpack_i16(down, d_scale, n, i)
    true = (g * torch.sigmoid(g) * u) @ (dq.double() * ds.double()[:, None]).t() + (bias.double() if with_bias else 0)
    assert (got.double() - true).abs().max() <= 2e-4 * true.abs().max()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # more threads than panels: gate/up split into panel x row-group units
        many = gated_mlp(x, gate_up, down, bias, i, n, gu_scale, d_scale)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(many.numpy(), got.numpy())
    with pytest.raises(ValueError, match="gated_mlp: packed weights"):
        gated_mlp(x, gate_up, down, bias, i, n, gu_scale, None)  # one scale missing: not a format


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "phi3"])
def test_converted_models_are_far_closer_to_fp32_than_bf16(arch):
    from tiny import tiny_model

    torch.manual_seed(0)
    base = tiny_model(arch).base_model.eval()
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        want = base(input_ids=ids).last_hidden_state.double()
        results = {}
        for fmt in ("int16", "bf16"):
            model = tiny_model(arch).base_model.eval()
            model.load_state_dict(base.state_dict())
            convert_linears(model, fmt=fmt)
            fuse_gated_mlps(model)
            results[fmt] = model(input_ids=ids).last_hidden_state.double()
            assert all(m.fmt == fmt for m in model.modules() if isinstance(m, (Bf16Linear, GatedMLP)))
    err16 = (results["int16"] - want).abs().max() / want.abs().max()
    errbf = (results["bf16"] - want).abs().max() / want.abs().max()
    assert err16 < 1e-3 and err16 < errbf / 4, (err16, errbf)


@needs_kernel
def test_fused_int16_mlp_state_dict_and_reload():
    from tiny import tiny_model

    model = tiny_model("llama").model
    convert_linears(model, fmt="int16")
    mlp = model.layers[0].mlp
    unfused_gate = mlp.gate_proj.int16_rows()
    assert fuse_gated_mlps(model) == 2
    fused = model.layers[0].mlp
    assert isinstance(fused, GatedMLP) and fused.fmt == "int16" and "weights=int16" in repr(fused)
    # fusing re-arranges the already quantized rows (no second rounding)
    (gq, gs), _ = unpack_gated_i16(fused.gate_up, fused.gate_up_scale.view(torch.float32), fused.intermediate,
                                   fused.in_features)
    assert torch.equal(gq, unfused_gate[0]) and torch.equal(gs, unfused_gate[1])
    sd = fused.state_dict()
    assert sorted(sd) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    again = tiny_model("llama").model
    convert_linears(again, fmt="int16")
    fuse_gated_mlps(again)
    original = tiny_model("llama").model.layers[0].mlp.state_dict()
    again.layers[0].mlp.load_state_dict(original)
    assert torch.equal(again.layers[0].mlp.gate_up, fused.gate_up)
    assert torch.equal(again.layers[0].mlp.gate_up_scale, fused.gate_up_scale)
    before = fused(torch.ones(2, fused.in_features))
    model.to(torch.bfloat16)  # the scales are int32 bits: a cast leaves them alone
    assert torch.equal(fused(torch.ones(2, fused.in_features)), before)
