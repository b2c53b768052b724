"""Every fast encode path gives the same vectors as the plain padded one, whatever the batching or packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import ARCHITECTURES, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModel

from l2v import Encoder, make_bidirectional
from l2v.kernels import attention as attention_kernel
from l2v.kernels import kernel_status
from l2v.kernels import rotary as rotary_kernel
from l2v.packing import (
    IMPL,
    _kernel_applies,
    attention_kernels,
    check_packing,
    length_groups,
    packed_attention,
    packed_inputs,
    unpack,
)

TEXTS = [
    "short one",
    "a much longer text that has many more tokens than the first one does, by a wide margin",
    "mid length text here",
    "cats",
    "",
    "the quick brown fox jumps over the lazy dog",
    "dogs",
    "paris is the capital of france",
    "a much longer text that has many more tokens than the first one does, by a wide margin",
]


def make(arch: str = "llama", pooling: str = "mean", side: str = "right", bidirectional: bool = True,
         packing: bool | None = None) -> Encoder:
    net = tiny_model(arch, "sdpa").base_model
    if bidirectional:
        make_bidirectional(net)
    enc = Encoder(net, tiny_tokenizer(side), pooling=pooling)
    enc.packing = packing
    return enc


def reference(enc: Encoder, texts=TEXTS) -> np.ndarray:
    """One text at a time, padded path: nothing to pack, nothing to pad."""
    old, enc.packing = enc.packing, False
    try:
        return np.stack([enc.encode([t], batch_size=1) [0] for t in texts])
    finally:
        enc.packing = old


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packing_probe_accepts_every_tiny_architecture(arch):
    """The probe proves packed == padded; it must pass where the mechanism works (all tiny archs use it)."""
    enc = make(arch)
    assert enc.uses_packing(), f"{arch}: packed forward does not match the padded one"


@pytest.mark.parametrize(("arch", "pooling"), [(a, "mean") for a in ARCHITECTURES]
                         + [("llama", p) for p in ("weighted_mean", "last_token", "bos")])
def test_packed_equals_one_at_a_time(arch, pooling):
    enc = make(arch, pooling, packing=True)
    ref = reference(enc)
    for bs, budget in ((128, 4096), (3, None), (64, 20)):
        got = enc.encode(TEXTS, batch_size=bs, max_tokens_per_batch=budget)
        np.testing.assert_allclose(got, ref, atol=2e-5, err_msg=f"{arch} {pooling} bs={bs} budget={budget}")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("budget", [None, 1, 64])
def test_padded_token_budget_equals_one_at_a_time(side, budget):
    enc = make(side=side, packing=False)
    ref = reference(enc)
    np.testing.assert_allclose(enc.encode(TEXTS, max_tokens_per_batch=budget), ref, atol=2e-5)


def test_causal_model_packs_causally():
    """Without make_bidirectional the packed path must stay causal within each text."""
    enc = make(bidirectional=False, packing=True)
    ref = reference(enc)
    np.testing.assert_allclose(enc.encode(TEXTS), ref, atol=2e-5)
    assert check_packing(enc.model, 320)


def _extras_model(arch: str) -> torch.nn.Module:
    """Tiny Gemma 2 (attention logit soft-capping) or gpt-oss (attention sinks), eager as they load by default."""
    import transformers as tf
    from tiny import _COMMON

    dims = dict(**_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=64)
    if arch == "gemma2":  # a small cap so that capping changes the scores of this random model
        cfg = tf.Gemma2Config(**dims, attn_logit_softcapping=0.5)
    else:
        cfg = tf.GptOssConfig(**dims, num_local_experts=4, num_experts_per_tok=2,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    net = AutoModel.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "sinks"):  # random sinks with weight (the default init leaves them near 0)
                m.sinks.normal_(0.0, 2.0)
    return net


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss", "llama"])
def test_packing_runs_the_models_own_eager_attention(arch, bidirectional):
    """Per-group attention is the model's configured one: soft-capping and sinks are honoured (SDPA would
    reject or ignore them and the probe would refuse packing), and causal texts get a causal mask."""
    net = _extras_model(arch) if arch != "llama" else tiny_model("llama", "eager").base_model
    if bidirectional:
        make_bidirectional(net)
    assert check_packing(net, 320), arch
    enc = Encoder(net, tiny_tokenizer("right"), pooling="mean")
    enc.packing = True
    with attention_kernels(False):  # the per-group path (the kernel would run for eager llama)
        got = enc.encode(TEXTS)
    np.testing.assert_allclose(got, reference(enc), atol=1e-5, err_msg=arch)
    assert net.config._attn_implementation == "eager"


def test_bf16_packed_close_to_fp32():
    enc = make(packing=True)
    ref = reference(enc)
    enc.model.to(torch.bfloat16)
    got = enc.encode(TEXTS)
    keep = [i for i, t in enumerate(TEXTS) if t]  # "" pools the zero pad embedding in this tiny model
    got, ref = got[keep], ref[keep]
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def test_packed_forward_is_differentiable_and_restores_config():
    enc = make(packing=True)
    enc.model.train()
    items = [enc.tokenize_one(t) for t in TEXTS[:4]]
    emb = enc.forward(enc.collate_packed(sorted(items, key=lambda t: -len(t.ids))))
    emb.sum().backward()
    grads = [p.grad for p in enc.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert enc.model.config._attn_implementation == "sdpa"


def test_probe_rejects_a_model_that_mixes_texts():
    """A model whose attention ignores the packing (plain sdpa over the whole row) must be refused."""
    net = tiny_model("llama").base_model
    make_bidirectional(net)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    real = ALL_ATTENTION_FUNCTIONS[IMPL] if IMPL in ALL_ATTENTION_FUNCTIONS else None
    packed_inputs([[1]])  # module import side effects only
    ALL_ATTENTION_FUNCTIONS.register(IMPL, lambda m, q, k, v, mask, **kw: sdpa_attention_forward(m, q, k, v, mask, **kw))
    try:
        from l2v import packing

        orig = packing._register
        packing._register = lambda: None
        try:
            assert not check_packing(net, 320)
        finally:
            packing._register = orig
    finally:
        if real is not None:
            ALL_ATTENTION_FUNCTIONS.register(IMPL, real)


def test_unpack_and_groups():
    assert length_groups([5, 5, 3, 3, 3, 1]) == [(0, 2, 5), (10, 3, 3), (19, 1, 1)]
    ids, pos, lengths = packed_inputs([[7, 8, 9], [4]])
    assert ids.tolist() == [[7, 8, 9, 4]] and pos.tolist() == [[0, 1, 2, 0]] and lengths == [3, 1]
    h = torch.arange(8.0).reshape(1, 4, 2)
    assert unpack(h, [3, 1]).tolist() == [[[0, 1], [2, 3], [4, 5]], [[6, 7], [0, 0], [0, 0]]]


def test_packed_attention_outside_context_raises():
    net = tiny_model("llama").base_model
    with packed_attention(net, [3]):
        pass
    net.config._attn_implementation = IMPL
    try:
        with pytest.raises(RuntimeError, match="only valid"):
            net(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        net.config._attn_implementation = "sdpa"


def test_streaming_chunks_match(monkeypatch):
    """Chunked tokenization (STREAM_CHUNK) gives the same vectors and order as one chunk."""
    import l2v.encoder as encoder_mod

    enc = make(packing=True)
    ref = enc.encode(TEXTS)
    monkeypatch.setattr(encoder_mod, "STREAM_CHUNK", 5)
    np.testing.assert_allclose(enc.encode(TEXTS), ref, atol=2e-5)


# ------------------------------------------------------------ l2v's attention and rotary kernels in the packed path
def _wide(arch: str) -> Encoder:
    """A tiny model with head_dim 16, the smallest the attention kernel takes (the usual tiny ones have 8)."""
    cfg = tiny_config(arch)
    if arch == "gpt2":
        cfg.n_embd = 64
    else:
        cfg.hidden_size = 64
        if arch == "opt":
            cfg.word_embed_proj_dim = 64
        if getattr(cfg, "head_dim", None):
            cfg.head_dim = 16
    torch.manual_seed(0)
    net = AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    make_bidirectional(net)
    enc = Encoder(net, tiny_tokenizer("right"), pooling="mean")
    enc.packing = True
    return enc


@pytest.mark.skipif(not kernel_status()[0], reason="CPU kernels unavailable")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_kernels_equal_one_at_a_time(arch, monkeypatch):
    """Packed encodes run l2v's attention kernel (and the rotary one where the model uses rotate-half rotary);
    the vectors still equal the padded one-text-at-a-time path."""
    enc = _wide(arch)
    calls = {"attention": 0, "rotary": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(attention_kernel, "varlen_attention", counted("attention", attention_kernel.varlen_attention))
    monkeypatch.setattr(rotary_kernel, "rotary", counted("rotary", rotary_kernel.rotary))
    got = enc.encode(TEXTS, batch_size=64)
    np.testing.assert_allclose(got, reference(enc), atol=2e-5, err_msg=arch)
    assert calls["attention"] >= 2, arch  # one call per layer per packed batch
    rotate_half = arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")
    assert (calls["rotary"] > 0) == rotate_half, (arch, calls)
    before = dict(calls)
    with attention_kernels(False):  # the A/B switch: torch's SDPA and transformers' rotary, same vectors
        off = enc.encode(TEXTS, batch_size=64)
    assert calls == before
    np.testing.assert_allclose(off, got, atol=2e-5, err_msg=arch)


@pytest.mark.skipif(not kernel_status()[0], reason="CPU kernels unavailable")
def test_attention_kernel_only_where_it_is_exact(monkeypatch):
    """Training (grad), dropout and arguments the kernel would ignore (soft-capping) keep torch's SDPA."""
    q, k, v = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    assert _kernel_applies(q, k, v, {"dropout": 0.0, "scaling": 0.25, "use_cache": False, "position_ids": None})
    assert not _kernel_applies(q.requires_grad_(), k, v, {})
    q = q.detach()
    assert not _kernel_applies(q, k, v, {"dropout": 0.1})
    assert not _kernel_applies(q, k, v, {"softcap": 50.0})
    assert _kernel_applies(q, k, v, {"softcap": None})
    assert not _kernel_applies(q.double(), k.double(), v.double(), {})


def test_causal_sliding_window_shorter_than_max_length_is_not_packed():
    """Packed rows carry no sliding-window mask: a causal Mistral text longer than its window differs packed, and
    the probe's short texts cannot show it, so automatic mode keeps the padded path (bidirectional: full window)."""
    enc = make("mistral", bidirectional=False)
    enc.model.config.sliding_window = 8  # above the packing probe's 5 tokens, below these texts
    for m in enc.model.modules():
        if getattr(m, "sliding_window", None) is not None:
            m.sliding_window = 8
    long_texts = [TEXTS[1], TEXTS[5], TEXTS[7]]
    assert not enc.uses_packing()
    padded = reference(enc, long_texts)
    assert np.abs(enc.encode(long_texts) - padded).max() <= 1e-5
    enc.packing = True  # forced: the window is lost (what automatic mode avoids)
    assert np.abs(enc.encode(long_texts) - padded).max() > 1e-3
    assert make("mistral").uses_packing()  # bidirectional: make_bidirectional widened the window
