"""l2v's bf16-weight / fp32-activation CPU kernel: exact bf16 products, fp32 sums, batch invariance, layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2v.kernels import Bf16Linear, bf16_linear, convert_linears, kernel_status, uses_kernel
from l2v.kernels.linear import pack_weight, unpack_weight

AVAILABLE, REASON = kernel_status()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"bf16 CPU kernel unavailable: {REASON}")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """What the kernel promises: inputs and weights rounded to bf16, everything else exact (float64 here)."""
    out = x.bfloat16().double() @ w.bfloat16().double().t()
    return out + b.double() if b is not None else out


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 8, 1), (7, 10, 5), (13, 33, 70), (6, 64, 64), (100, 577, 129), (37, 96, 200)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_bf16_rounded_reference(m, k, n, with_bias):
    torch.manual_seed(m * 1000 + k + n)
    lin = torch.nn.Linear(k, n, bias=with_bias)
    x = torch.randn(m, k)
    got = Bf16Linear.from_module(lin)(x)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    ref = reference(x, lin.weight, lin.bias)
    # fp32 accumulation of exact products: error ~ sqrt(k) ulp, far below one bf16 rounding of the output (2^-9)
    scale = ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 1e-5 * scale * max(1.0, k / 64)
    # and clearly better than torch's bf16 matmul, which rounds the output
    torch_bf16 = (x.bfloat16() @ lin.weight.bfloat16().t()).double() + (lin.bias.bfloat16().double() if with_bias else 0)
    assert (got.double() - ref).abs().max() < (torch_bf16 - ref).abs().max() or scale == 0


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "int16"])
def test_rows_do_not_depend_on_the_batch(fmt):
    """One sequential sum per output (int16: one scale per row): a row gives the same bits alone or among 200."""
    torch.manual_seed(0)
    layer = Bf16Linear.from_module(torch.nn.Linear(576, 192), fmt=fmt)
    x = torch.randn(200, 576)
    full = layer(x)
    for i in (0, 5, 6, 97, 199):
        assert torch.equal(layer(x[i:i + 1]), full[i:i + 1])
        assert torch.equal(layer(x[i:i + 7]), full[i:i + 7]) or i + 7 > 200


@needs_kernel
def test_shapes_strides_and_empty_input():
    torch.manual_seed(1)
    lin = torch.nn.Linear(40, 24)
    layer = Bf16Linear.from_module(lin)
    x = torch.randn(2, 3, 80)[..., ::2]  # non-contiguous last dim
    assert torch.allclose(layer(x), reference(x, lin.weight, lin.bias).float(), atol=1e-5)
    assert layer(torch.randn(0, 40)).shape == (0, 24)
    assert layer(torch.randn(4, 5, 40)).shape == (4, 5, 24)


@needs_kernel
def test_bad_input_is_a_clear_error():
    layer = Bf16Linear.from_module(torch.nn.Linear(40, 24))
    with pytest.raises(ValueError, match="does not fit"):
        bf16_linear(torch.randn(3, 41), layer.packed, None, 24)
    with pytest.raises(ValueError, match="does not fit"):
        bf16_linear(torch.randn(3, 40), layer.packed, torch.zeros(5), 24)
    x = torch.randn(2, 40, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x)
    with torch.no_grad():
        assert layer(x).shape == (2, 24)


def test_pack_roundtrip_and_state_dict_keeps_the_linear_layout():
    torch.manual_seed(2)
    w = torch.randn(70, 33)
    packed = pack_weight(w)
    assert packed.dtype == torch.int16 and packed.shape == (2, 17, 64, 2)
    assert torch.equal(unpack_weight(packed, 70, 33), w.bfloat16())
    lin = torch.nn.Linear(33, 70)
    layer = Bf16Linear.from_module(lin)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias"} and sd["weight"].dtype == torch.bfloat16
    assert torch.equal(sd["weight"], lin.weight.bfloat16())
    other = Bf16Linear.from_module(torch.nn.Linear(33, 70))
    other.load_state_dict(sd)
    assert torch.equal(other.packed, layer.packed) and torch.equal(other.bias, layer.bias)
    with pytest.raises(RuntimeError, match="weight"):
        other.load_state_dict({"bias": sd["bias"]})


def test_casting_the_model_keeps_the_packed_bits():
    """``model.to(float16)`` casts floating buffers; the packed bits are int16, so they survive."""
    layer = Bf16Linear.from_module(torch.nn.Linear(16, 8))
    before = layer.packed.clone()
    layer.to(torch.float16)
    assert torch.equal(layer.packed, before)


@needs_kernel
def test_gpt2_conv1d_and_model_conversion():
    from tiny import tiny_model

    torch.manual_seed(3)
    ref_model = tiny_model("gpt2").transformer
    model = tiny_model("gpt2").transformer
    # the fp32 model with bf16-rounded weights is what the converted one approximates (activations round only
    # at the matmul inputs)
    for mod in ref_model.modules():
        if type(mod).__name__ == "Conv1D":
            mod.weight.data = mod.weight.data.bfloat16().float()
    n = convert_linears(model)
    assert n == 8 and uses_kernel(model)  # 2 layers x (c_attn, c_proj, c_fc, mlp c_proj)
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = ref_model(input_ids=ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert cos.min() > 0.999
    conv = ref_model.h[0].attn.c_attn
    assert torch.equal(model.h[0].attn.c_attn.weight, conv.weight.bfloat16())  # Conv1D layout [in, out] kept


@needs_kernel
def test_compiles_as_one_graph():
    layer = Bf16Linear.from_module(torch.nn.Linear(32, 48))
    fn = torch.compile(lambda x: torch.nn.functional.silu(layer(x)) * 2, fullgraph=True, dynamic=True)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(fn(x), torch.nn.functional.silu(layer(x)) * 2, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("fmt", ["bf16", "int16"])
def test_threads_give_identical_results(fmt):
    torch.manual_seed(4)
    layer = Bf16Linear.from_module(torch.nn.Linear(96, 130), fmt=fmt)
    x = torch.randn(300, 96)
    full = layer(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(max(2, threads))
        many = layer(x)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one.numpy(), full.numpy())
    np.testing.assert_array_equal(many.numpy(), full.numpy())


# ------------------------------------------------------------------------------------ the fused gated MLP
def _converted_mlp(arch: str):
    from tiny import tiny_model

    model = tiny_model(arch).model
    convert_linears(model)
    return model


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_gated_mlp_fusion_matches_the_unfused_kernel(arch):
    from l2v.kernels import GatedMLP, fuse_gated_mlps

    model = _converted_mlp(arch)
    mlp = model.layers[0].mlp
    x = torch.randn(3, 7, mlp.gate_proj.in_features)
    with torch.no_grad():
        want = mlp(x)
        assert fuse_gated_mlps(model) == 2
        fused = model.layers[0].mlp
        assert isinstance(fused, GatedMLP)
        got = fused(x)
    # the same bf16-rounded matmul inputs; SiLU and the product in fp32 inside the kernel
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    sd = fused.state_dict()
    assert sorted(sd) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert torch.equal(sd["gate_proj.weight"], mlp.gate_proj.weight) and torch.equal(sd["up_proj.weight"],
                                                                                     mlp.up_proj.weight)
    again = _converted_mlp(arch)
    fuse_gated_mlps(again)
    again.layers[0].mlp.load_state_dict(sd)
    assert torch.equal(again.layers[0].mlp.gate_up, fused.gate_up)


@needs_kernel
@pytest.mark.parametrize("intermediate", [32, 70, 1536])
def test_gated_kernel_against_reference(intermediate):
    from l2v.kernels import bf16_gated
    from l2v.kernels.linear import pack_gated, unpack_gated

    torch.manual_seed(intermediate)
    k = 48
    gate, up = torch.randn(intermediate, k), torch.randn(intermediate, k)
    packed = pack_gated(gate, up)
    g2, u2 = unpack_gated(packed, intermediate, k)
    assert torch.equal(g2, gate.bfloat16()) and torch.equal(u2, up.bfloat16())
    x = torch.randn(11, k) * 3
    g, u = reference(x, gate, None), reference(x, up, None)
    want = g * torch.sigmoid(g) * u
    got = bf16_gated(x, packed, intermediate)
    assert got.shape == (11, intermediate)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@needs_kernel
def test_gated_fusion_skips_what_it_does_not_compute():
    """Not SiLU (Gemma's GELU), a fused gate_up (Phi3), or a look-alike with another forward: left alone."""
    from l2v.kernels import GatedMLP, fuse_gated_mlps

    for arch in ("gemma", "phi3"):
        model = _converted_mlp(arch)
        assert fuse_gated_mlps(model) == 0 and not any(isinstance(m, GatedMLP) for m in model.modules())

    class Swapped(torch.nn.Module):  # same attributes, gate and up roles exchanged
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
            self.down_proj, self.act_fn = torch.nn.Linear(32, 16, bias=False), torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    holder = torch.nn.Sequential(Swapped())
    convert_linears(holder)
    assert fuse_gated_mlps(holder) == 0 and isinstance(holder[0], Swapped)


@needs_kernel
def test_gated_op_compiles_as_one_graph():
    from l2v.kernels import bf16_gated
    from l2v.kernels.linear import pack_gated

    packed = pack_gated(torch.randn(40, 32), torch.randn(40, 32))
    fn = torch.compile(lambda x: bf16_gated(x * 2, packed, 40) + 1, fullgraph=True, dynamic=True)
    x = torch.randn(5, 32)
    assert torch.allclose(fn(x), bf16_gated(x * 2, packed, 40) + 1, atol=1e-6)


# ---------------------------------------------------------------- leading layers kept in fp32
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "opt"])
def test_decoder_layers_are_found_generically(arch):
    """Llama-style ``layers``, GPT-2's ``h``, OPT's ``decoder.layers``: the stack of blocks, in order."""
    from tiny import tiny_model

    from l2v.kernels import decoder_layers

    model = tiny_model(arch).base_model
    layers = decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    assert all(any("att" in name for name, _ in layer.named_children()) for layer in layers)  # attn, attention


def test_fp32_leading_layers_count_default_and_errors():
    from tiny import tiny_model

    from l2v.kernels import fp32_leading_layers
    from l2v.kernels.linear import FP32_LAYER_FRACTION

    model = tiny_model("llama").base_model
    assert FP32_LAYER_FRACTION == 0.4
    assert fp32_leading_layers(model) == [model.layers[0]]  # ceil(0.4 * 2) = 1
    assert fp32_leading_layers(model, 0) == [] and fp32_leading_layers(model, 2) == list(model.layers)
    with pytest.raises(ValueError, match="only 2 decoder layers"):
        fp32_leading_layers(model, 3)
    no_layers = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert fp32_leading_layers(no_layers) == []  # the default quietly keeps nothing
    with pytest.raises(ValueError, match="cannot find the decoder layers of Sequential"):
        fp32_leading_layers(no_layers, 1)


@needs_kernel
def test_convert_linears_puts_kept_layers_on_the_fp32_path():
    from tiny import tiny_model

    from l2v.kernels import GatedMLP, fp32_leading_layers, fuse_gated_mlps

    model = tiny_model("llama").base_model
    kept = fp32_leading_layers(model, 1)
    assert convert_linears(model, keep=kept) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    first = [m for m in model.layers[0].modules() if isinstance(m, Bf16Linear)]
    assert len(first) == 7 and all(m.fp32 and m.weight.dtype == torch.float32 for m in first)
    assert not any(m.fp32 for m in model.layers[1].modules() if isinstance(m, Bf16Linear))
    assert fuse_gated_mlps(model) == 2  # both precisions fuse
    assert isinstance(model.layers[0].mlp, GatedMLP) and model.layers[0].mlp.fp32
    assert not model.layers[1].mlp.fp32
    assert uses_kernel(model.layers[0]) and not uses_kernel(model.layers[0], bf16=True)
    assert uses_kernel(model.layers[1], bf16=True)


# ---------------------------------------------------------------- the fp32-weight path
def reference32(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double().t()
    return out + b.double() if b is not None else out


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 8, 1), (7, 10, 5), (13, 33, 70), (100, 577, 129), (37, 96, 200)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_weights_are_exact_fp32(m, k, n, with_bias):
    """fp32-packed weights: no rounding anywhere, so the result is float64's up to fp32 summation error."""
    torch.manual_seed(m * 1000 + k + n + 7)
    lin = torch.nn.Linear(k, n, bias=with_bias)
    x = torch.randn(m, k)
    layer = Bf16Linear.from_module(lin, fp32=True)
    got = layer(x)
    ref = reference32(x, lin.weight, lin.bias)
    scale = ref.abs().max().item()
    assert got.shape == (m, n) and (got.double() - ref).abs().max().item() <= 2e-6 * scale * max(1.0, k / 64)
    bf16 = Bf16Linear.from_module(lin)(x)  # the bf16 path rounds and is clearly further away
    assert (bf16.double() - ref).abs().max() > 10 * (got.double() - ref).abs().max()
    x3 = torch.randn(2, 3, 2 * k)[..., ::2]  # batched, non-contiguous
    assert torch.allclose(layer(x3), reference32(x3, lin.weight, lin.bias).float(), rtol=1e-5, atol=1e-5)


def test_fp32_pack_roundtrip_state_dict_and_casting():
    torch.manual_seed(4)
    w = torch.randn(70, 33)
    packed = pack_weight(w, fp32=True)
    assert packed.dtype == torch.int32 and packed.shape == (2, 33, 64)
    assert torch.equal(unpack_weight(packed, 70, 33), w)
    lin = torch.nn.Linear(33, 70)
    layer = Bf16Linear.from_module(lin, fp32=True)
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.float32 and torch.equal(sd["weight"], lin.weight)
    other = Bf16Linear.from_module(torch.nn.Linear(33, 70), fp32=True)
    other.load_state_dict(sd)
    assert torch.equal(other.packed, layer.packed) and other.fp32
    before = layer.packed.clone()
    layer.to(torch.bfloat16)  # int32 bits are not a floating buffer: untouched
    assert torch.equal(layer.packed, before)
    assert "weights=fp32" in repr(layer) and "weights=bf16" in repr(Bf16Linear.from_module(lin))


@needs_kernel
def test_fp32_layout_mismatch_is_a_clear_error():
    layer = Bf16Linear.from_module(torch.nn.Linear(40, 24), fp32=True)
    with pytest.raises(ValueError, match="does not fit"):
        bf16_linear(torch.randn(3, 41), layer.packed, None, 24)
    with pytest.raises(ValueError, match="does not fit"):
        bf16_linear(torch.randn(3, 40), layer.packed.view(-1), None, 24)


@needs_kernel
@pytest.mark.parametrize("intermediate", [32, 70, 1536])
def test_fp32_gated_kernel_against_reference(intermediate):
    from l2v.kernels import bf16_gated
    from l2v.kernels.linear import pack_gated, unpack_gated

    torch.manual_seed(intermediate + 1)
    k = 48
    gate, up = torch.randn(intermediate, k), torch.randn(intermediate, k)
    packed = pack_gated(gate, up, fp32=True)
    g2, u2 = unpack_gated(packed, intermediate, k)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    x = torch.randn(11, k) * 3
    g, u = reference32(x, gate, None), reference32(x, up, None)
    want = g * torch.sigmoid(g) * u
    got = bf16_gated(x, packed, intermediate)
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


# ---------------------------------------------------------------- the whole gated MLP in one call
def _two_calls(x, gate_up, down, bias, intermediate, n):
    from l2v.kernels import bf16_gated

    return bf16_linear(bf16_gated(x, gate_up, intermediate), down, bias, n)


@needs_kernel
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("m,k,i,n,with_bias", [(1, 48, 64, 48, False), (200, 64, 100, 48, True),
                                               (13, 33, 37, 70, True), (97, 16, 31, 130, False)])
def test_whole_mlp_is_bit_identical_to_gated_then_down(fp32, m, k, i, n, with_bias):
    """Rows spanning several 96-row blocks, odd K and intermediate (bf16 pad column), partial panels, bias."""
    from l2v.kernels import gated_mlp
    from l2v.kernels.linear import pack_gated

    torch.manual_seed(m + k + i)
    gate_up = pack_gated(torch.randn(i, k) / k**0.5, torch.randn(i, k) / k**0.5, fp32=fp32)
    down = pack_weight(torch.randn(n, i) / i**0.5, fp32=fp32)
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(m, k) * 2
    want = _two_calls(x, gate_up, down, bias, i, n)
    got = gated_mlp(x, gate_up, down, bias, i, n)
    assert got.shape == (m, n)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    # 3-D and strided inputs, no rows, thread count: the same rows give the same bits
    x3 = torch.randn(2, 5, 2 * k)[..., ::2]
    np.testing.assert_array_equal(gated_mlp(x3, gate_up, down, bias, i, n).numpy(),
                                  _two_calls(x3.contiguous(), gate_up, down, bias, i, n).numpy())
    assert gated_mlp(torch.randn(0, k), gate_up, down, bias, i, n).shape == (0, n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gated_mlp(x, gate_up, down, bias, i, n)
        torch.set_num_threads(8)  # more threads than panels: gate/up split into panel x row-group units
        many = gated_mlp(x, gate_up, down, bias, i, n)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one.numpy(), got.numpy())
    np.testing.assert_array_equal(many.numpy(), got.numpy())


@needs_kernel
def test_gated_mlp_module_runs_the_whole_mlp_in_one_call(monkeypatch):
    from l2v.kernels import fuse_gated_mlps
    from l2v.kernels import linear as lin

    for model, fp32 in ((_converted_mlp("llama"), False), (_fp32_first_layer(), True)):
        x = torch.randn(2, 9, model.layers[0].mlp.gate_proj.in_features)
        with torch.no_grad():
            want = model.layers[0].mlp(x)
            fuse_gated_mlps(model)
            calls = []
            monkeypatch.setattr(lin, "_mlp", lambda *a, _f=lin._mlp, _c=calls: _c.append(1) or _f(*a))
            got = model.layers[0].mlp(x)
            monkeypatch.undo()
        assert len(calls) == 1 and model.layers[0].mlp.fp32 == fp32
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _fp32_first_layer():
    from tiny import tiny_model

    from l2v.kernels import fp32_leading_layers

    model = tiny_model("llama").model
    convert_linears(model, keep=fp32_leading_layers(model, 1))
    return model


@needs_kernel
def test_gated_mlp_with_mixed_precisions_keeps_two_calls(monkeypatch):
    """A down projection of the other precision (not made by l2v itself, but loadable) still works, unfused."""
    from l2v.kernels import GatedMLP
    from l2v.kernels import linear as lin

    gate, up, down = torch.randn(40, 16), torch.randn(40, 16), torch.nn.Linear(40, 16, bias=False)
    mlp = GatedMLP(lin.pack_gated(gate, up), 16, 40, Bf16Linear.from_module(down, fp32=True))
    calls = []
    monkeypatch.setattr(lin, "_mlp", lambda *a: calls.append(1))
    x = torch.randn(3, 16)
    with torch.no_grad():
        got = mlp(x)
    assert not calls
    g, u = reference(x, gate, None), reference(x, up, None)
    want = (g * torch.sigmoid(g) * u) @ down.weight.double().t()
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@needs_kernel
def test_gated_mlp_bad_input_is_a_clear_error_and_it_compiles():
    from l2v.kernels import gated_mlp
    from l2v.kernels.linear import pack_gated

    gate_up, down = pack_gated(torch.randn(40, 32), torch.randn(40, 32)), pack_weight(torch.randn(24, 40))
    with pytest.raises(ValueError, match="gated_mlp: packed weights"):
        gated_mlp(torch.randn(3, 30), gate_up, down, None, 40, 24)
    with pytest.raises(ValueError, match="gated_mlp: packed weights"):
        gated_mlp(torch.randn(3, 32), gate_up, pack_weight(torch.randn(24, 40), fp32=True), None, 40, 24)
    with pytest.raises(ValueError, match="gated_mlp: packed weights"):
        gated_mlp(torch.randn(3, 32), gate_up, down, torch.randn(5), 40, 24)
    fn = torch.compile(lambda x: gated_mlp(x * 2, gate_up, down, None, 40, 24) + 1, fullgraph=True, dynamic=True)
    x = torch.randn(5, 32)
    assert torch.allclose(fn(x), gated_mlp(x * 2, gate_up, down, None, 40, 24) + 1, atol=1e-5)
