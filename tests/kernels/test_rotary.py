"""The one-pass rotary kernel: bit-identical to transformers, swapped in only where a probe proves it."""

from __future__ import annotations

import sys
import threading
import types

import pytest
import torch
from tiny import tiny_model
from transformers.models.llama import modeling_llama

from l2v.kernels import kernel_status
from l2v.kernels.rotary import NAME, applies, fused_rotary, rotary

AVAILABLE, REASON = kernel_status()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"CPU kernels unavailable: {REASON}")
ORIGINAL = modeling_llama.apply_rotary_pos_emb


@needs_kernel
@pytest.mark.parametrize("batch,cos_batch,heads,t,d", [(1, 1, 9, 30, 64), (2, 2, 4, 7, 80), (3, 1, 2, 5, 8)])
def test_bit_identical_to_transformers(batch, cos_batch, heads, t, d):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(batch, t, heads, d, generator=gen).transpose(1, 2)  # the strided view attention modules pass
    angle = torch.randn(cos_batch, t, d // 2, generator=gen) * 4
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    want, _ = ORIGINAL(x, x, cos, sin)
    got = rotary(x, cos, sin)
    assert got.is_contiguous() and torch.equal(got, want)


@needs_kernel
def test_not_applicable_inputs():
    x, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    assert applies(x, cos, cos)
    assert not applies(x.double(), cos.double(), cos.double())
    assert not applies(x.requires_grad_(), cos, cos)  # no backward in the kernel: autograd keeps torch's ops
    assert not applies(torch.randn(1, 2, 3, 8), torch.randn(1, 3, 4), torch.randn(1, 3, 4))  # partial rotary
    with pytest.raises(ValueError, match="cannot run"):
        rotary(torch.randn(1, 2, 3, 7), torch.randn(1, 3, 7), torch.randn(1, 3, 7))


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_model_forward_unchanged_and_function_restored(arch):
    model = tiny_model(arch)
    mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    before = getattr(mod, NAME)
    ids = torch.randint(3, 300, (2, 11))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        with fused_rotary(model) as patched:
            assert mod.__name__ in patched and getattr(mod, NAME) is not before
            with fused_rotary(model):  # nested: still patched after the inner block exits
                pass
            assert getattr(mod, NAME) is not before
            got = model(input_ids=ids).logits
    assert getattr(mod, NAME) is before
    assert torch.equal(got, want)


@needs_kernel
def test_gradients_fall_back_to_torch():
    model = tiny_model("llama").train()
    ids = torch.randint(3, 300, (2, 9))
    with fused_rotary(model):
        loss = model(input_ids=ids).logits.square().mean()
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_other_conventions_are_not_patched():
    """An interleaved (GPT-J style) rotary under the same name fails the probe and is left alone."""
    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        def rot(x):
            return torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    fake = types.ModuleType("l2v_test_fake_modeling")
    fake.apply_rotary_pos_emb = interleaved

    class Block(torch.nn.Module):
        pass

    Block.__module__ = fake.__name__
    sys.modules[fake.__name__] = fake
    try:
        with fused_rotary(Block()) as patched:
            assert patched == [] and fake.apply_rotary_pos_emb is interleaved
    finally:
        del sys.modules[fake.__name__]


@needs_kernel
def test_concurrent_blocks_restore_once():
    model = tiny_model("llama")
    mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    before = getattr(mod, NAME)
    inside, release = threading.Barrier(3), threading.Event()

    def worker():
        with fused_rotary(model):
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert getattr(mod, NAME) is not before
    release.set()
    for t in threads:
        t.join()
    assert getattr(mod, NAME) is before
