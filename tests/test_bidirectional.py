"""The generic bidirectional mechanism, proved on tiny random configs of many architectures."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny import ARCHITECTURES, tiny_model
from torch import nn

from l2v.bidirectional import (
    UnsupportedArchitectureError,
    causal_attention,
    causal_layers,
    check_bidirectional,
    is_bidirectional,
    make_bidirectional,
    make_causal,
)

IMPLS = ["eager", "sdpa"]
CASES = [(a, i) for a in ARCHITECTURES for i in IMPLS]


def _base(model: nn.Module) -> nn.Module:
    return model.base_model


def _hidden(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return _base(model)(input_ids=ids, **kw).last_hidden_state


def _ids(n: int = 7, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 300, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,impl", CASES)
def test_last_token_reaches_first_only_when_bidirectional(arch, impl):
    model = tiny_model(arch, impl)
    ids = _ids()
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % 300 + 5
    causal_a, causal_b = _hidden(model, ids), _hidden(model, other)
    assert torch.allclose(causal_a[:, 0], causal_b[:, 0], atol=1e-6), "causal model: first token must not see last"
    make_bidirectional(model)
    bi_a, bi_b = _hidden(model, ids), _hidden(model, other)
    assert (bi_a[:, 0] - bi_b[:, 0]).abs().max() > 1e-4, "bidirectional: first token must see the last one"


@pytest.mark.parametrize("arch,impl", CASES)
def test_equals_reference_with_explicit_all_ones_mask(arch, impl):
    """Bidirectional hidden states == the causal model run with an explicit padding-only (all-attend) 4D mask."""
    model = tiny_model(arch, impl)
    ids = _ids(9, batch=2)
    dtype = next(model.parameters()).dtype
    # An explicit 4D additive mask of zeros: every query attends to every key. transformers uses 4D masks as-is.
    explicit = torch.zeros((2, 1, ids.shape[1], ids.shape[1]), dtype=dtype)
    positions = torch.arange(ids.shape[1]).expand(2, -1)
    reference = _hidden(model, ids, attention_mask=explicit, position_ids=positions)
    make_bidirectional(model)
    ours = _hidden(model, ids, attention_mask=torch.ones_like(ids), position_ids=positions)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_mask_still_respected(arch):
    """Padding keys stay masked: a padded sequence's real tokens equal the unpadded run."""
    model = make_bidirectional(tiny_model(arch, "sdpa"))
    ids = _ids(6)
    padded = torch.cat([ids, torch.zeros((1, 3), dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones((1, 6)), torch.zeros((1, 3))], dim=1).long()
    alone = _hidden(model, ids)
    with_pad = _hidden(model, padded, attention_mask=mask, position_ids=torch.arange(9).clamp_max(5)[None])
    assert torch.allclose(alone, with_pad[:, :6], atol=1e-5)


def test_make_causal_restores_and_context_manager():
    model = tiny_model("llama", "sdpa")
    make_bidirectional(model)
    assert is_bidirectional(model) and check_bidirectional(model)
    with causal_attention(model):
        assert not is_bidirectional(model) and not check_bidirectional(model)
    assert is_bidirectional(model) and check_bidirectional(model)
    make_causal(model)
    assert not is_bidirectional(model) and not check_bidirectional(model)
    assert getattr(model.config, "is_causal", True) is True


def test_make_causal_on_a_config_saved_bidirectional():
    """A model whose config was saved with is_causal=False (an l2v export) is really causal after make_causal
    and inside causal_attention; restoring the saved False used to leave it bidirectional."""
    model = tiny_model("llama", "sdpa")
    model.config.is_causal = False
    assert check_bidirectional(model)
    make_bidirectional(model)
    with causal_attention(model):
        assert not check_bidirectional(model)
    assert is_bidirectional(model) and check_bidirectional(model)
    make_causal(model)
    assert not check_bidirectional(model)


def test_idempotent_and_through_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("qwen2", "sdpa")
    peft_model = get_peft_model(model.base_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    make_bidirectional(peft_model)
    make_bidirectional(peft_model)
    assert is_bidirectional(peft_model) and check_bidirectional(peft_model)


# ------------------------------------------------------------------ unsupported architectures
class _ToyConfig(tf.PreTrainedConfig):
    model_type = "l2v_toy_causal"

    def __init__(self, vocab_size=64, hidden_size=16, **kw):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kw)


class _HardCausalAttention(nn.Module):
    """Exposes is_causal like transformers modules, but hard-codes a causal kernel (mask built elsewhere)."""

    def __init__(self, d):
        super().__init__()
        self.is_causal = True
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class _ToyModel(tf.PreTrainedModel):
    config_class = _ToyConfig

    def __init__(self, config, with_flag=True):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = _HardCausalAttention(config.hidden_size)
        if not with_flag:
            del self.attn.is_causal

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kw):
        h = self.attn(self.embed(input_ids))
        return tf.modeling_outputs.BaseModelOutput(last_hidden_state=h, hidden_states=(h,))


def test_architecture_that_stays_causal_raises_naming_it():
    cfg = _ToyConfig(architectures=["ToyHardCausalModel"])
    model = _ToyModel(cfg).eval()
    with pytest.raises(UnsupportedArchitectureError, match="ToyHardCausalModel.*stayed causal"):
        make_bidirectional(model)
    assert not is_bidirectional(model) and model.attn.is_causal is True  # restored, not half-changed


def _force_causal(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: this attention layer gets a causal 4D mask, as a layer whose mask ignores is_causal would."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    n, length = hidden.shape[:2]
    mask = torch.full((length, length), float("-inf")).triu(1).to(hidden.dtype)
    return args, {**kwargs, "attention_mask": mask.expand(n, 1, length, length), "is_causal": False}


@pytest.mark.parametrize("arch,impl", CASES)
def test_check_catches_a_single_layer_left_causal(arch, impl):
    """One causal layer among bidirectional ones still changes the first token's output, so the whole-model probe
    passed; every attention layer is now probed on its own."""
    model = make_bidirectional(tiny_model(arch, impl))
    layers = [m for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    handle = layers[-1].register_forward_pre_hook(_force_causal, with_kwargs=True)
    try:
        assert not check_bidirectional(model)
    finally:
        handle.remove()
    assert check_bidirectional(model)


def test_llama4_chunked_layers_stay_causal_so_rejected():
    """Llama 4's chunked-attention layers build their mask without reading is_causal: 3 of 4 layers stayed causal
    while the model was reported bidirectional."""
    cfg = tf.Llama4TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              max_position_embeddings=256, attention_chunk_size=4, num_local_experts=1)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with pytest.raises(UnsupportedArchitectureError, match="Llama4ForCausalLM.*stayed causal"):
        make_bidirectional(model)
    assert not is_bidirectional(model) and not check_bidirectional(model)


def test_architecture_without_attention_flag_raises():
    model = _ToyModel(_ToyConfig(architectures=["ToyNoFlagModel"]), with_flag=False)
    with pytest.raises(UnsupportedArchitectureError, match="ToyNoFlagModel"):
        make_bidirectional(model)


def test_encoder_decoder_rejected():
    cfg = tf.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      architectures=["T5ForConditionalGeneration"])
    with pytest.raises(UnsupportedArchitectureError, match="T5ForConditionalGeneration.*encoder-decoder"):
        make_bidirectional(tf.T5Model(cfg))


def test_flex_attention_rejected():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedArchitectureError, match="flex_attention"):
        make_bidirectional(model)


def _windowed(arch: str, impl: str, window: int) -> nn.Module:
    """A tiny model whose layers (all: Mistral; every other one, hybrid: Qwen2, Gemma 2) use a sliding window."""
    common = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    if arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=window)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=0,
                             layer_types=["sliding_attention", "full_attention"])
    elif arch == "cohere2":  # rotary only on sliding layers (`if self.sliding_window is not None`)
        cfg = tf.Cohere2Config(**common, sliding_window=window, layer_types=["sliding_attention", "full_attention"])
    else:
        cfg = tf.Gemma2Config(**common, head_dim=8, sliding_window=window,
                              layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


@pytest.mark.parametrize("arch,impl", [(a, i) for a in ("mistral", "qwen2") for i in IMPLS]
                         + [("gemma2", "eager"), ("cohere2", "sdpa")])
def test_sliding_window_layers_become_full_attention(arch, impl):
    """Bidirectional sliding-window layers attend to every token (README; LLM2Vec). transformers' bidirectional
    sliding mask kept the window (|i - j| <= window), so a padded text longer than the window differed from the
    same text packed (full attention per text) and the first token never saw tokens beyond the window.
    Cohere 2 applies rotary only where its attention module's window is not None: setting it to None dropped
    the positions of every sliding layer."""
    model = _windowed(arch, impl, window=3)
    ids = _ids(12, batch=2)
    positions = torch.arange(12).expand(2, -1)
    explicit = torch.zeros((2, 1, 12, 12))  # every query attends to every key
    reference = _hidden(model, ids, attention_mask=explicit, position_ids=positions)
    make_bidirectional(model)
    ours = _hidden(model, ids, attention_mask=torch.ones_like(ids), position_ids=positions)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    padded = torch.cat([ids, torch.zeros((2, 2), dtype=torch.long)], dim=1)  # and padding stays masked
    mask = torch.cat([torch.ones((2, 12)), torch.zeros((2, 2))], dim=1).long()
    with_pad = _hidden(model, padded, attention_mask=mask, position_ids=torch.arange(14).clamp_max(11).expand(2, -1))
    assert torch.allclose(with_pad[:, :12], reference, atol=1e-5)
    make_causal(model)  # the windows come back with causality
    windows = {getattr(m, "sliding_window", None) for m in model.modules() if hasattr(m, "sliding_window")}
    assert model.config.sliding_window == 3 and windows <= {None, 3}
    assert torch.allclose(_hidden(model, ids), _hidden(_windowed(arch, impl, window=3), ids), atol=1e-6)


# ------------------------------------------------------------------ attention modules without is_causal
def _legacy(arch: str) -> nn.Module:
    """Older architectures whose mask comes from ``create_causal_mask`` but whose attention has no ``is_causal``."""
    common = dict(vocab_size=320, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "bloom":
        cfg = tf.BloomConfig(**common, hidden_size=32, n_head=4)
    elif arch == "codegen":
        cfg = tf.CodeGenConfig(**common, hidden_size=32, num_attention_heads=4, rotary_dim=4, n_inner=64,
                               max_position_embeddings=64)
    elif arch == "xglm":
        cfg = tf.XGLMConfig(**common, hidden_size=32, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64)
    else:
        cfg = tf.MptConfig(**common, hidden_size=32, num_attention_heads=4, expansion_ratio=2, max_seq_len=64)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", ["bloom", "codegen", "xglm"])
def test_architectures_without_is_causal_probed_by_decoder_layer(arch):
    """BLOOM, CodeGen and XGLM were rejected ("no attention module exposes is_causal") although their masks follow
    ``config.is_causal``; their decoder layers are probed instead."""
    model = _legacy(arch)
    ids = _ids(7)
    other = ids.clone()
    other[0, -1] = ids[0, -1] + 1
    causal = _hidden(model, ids)
    make_bidirectional(model)
    assert is_bidirectional(model) and check_bidirectional(model)
    assert (_hidden(model, ids)[:, 0] - _hidden(model, other)[:, 0]).abs().max() > 1e-4
    padded = torch.cat([ids, torch.zeros((1, 3), dtype=torch.long)], dim=1)  # padding stays masked
    mask = torch.cat([torch.ones((1, 7)), torch.zeros((1, 3))], dim=1).long()
    assert torch.allclose(_hidden(model, ids), _hidden(model, padded, attention_mask=mask)[:, :7], atol=1e-5)
    make_causal(model)
    assert not check_bidirectional(model) and torch.allclose(_hidden(model, ids), causal, atol=1e-6)


def test_forward_failing_when_bidirectional_raises_and_restores():
    """MPT's `create_causal_mask(...).to(bool)` fails on the skipped bidirectional mask: the AttributeError escaped
    make_bidirectional and left the model flagged bidirectional with its configs flipped."""
    model = _legacy("mpt")
    with pytest.raises(UnsupportedArchitectureError, match="MptForCausalLM.*forward fails"):
        make_bidirectional(model)
    assert not is_bidirectional(model) and getattr(model.config, "is_causal", True) is True
    _hidden(model, _ids(5))  # still runs causally


class _FullAttentionLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        return x + torch.nn.functional.scaled_dot_product_attention(*self.qkv(x).chunk(3, dim=-1))


class _OwnMaskModel(tf.PreTrainedModel):
    """Builds its own (bidirectional) mask and ignores attention_mask and config.is_causal, as CPM-Ant does."""

    config_class = _ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([_FullAttentionLayer(config.hidden_size)])

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kw):
        h = self.layers[0](self.embed(input_ids))
        return tf.modeling_outputs.BaseModelOutput(last_hidden_state=h, hidden_states=(h,))


def test_model_with_its_own_mask_rejected():
    """Without is_causal on attention modules, config.is_causal must be what makes the model causal: CPM-Ant
    (already bidirectional, padding ignored) passed the layer probe and its padded texts were silently wrong."""
    model = _OwnMaskModel(_ToyConfig(architectures=["ToyOwnMaskModel"], num_hidden_layers=1)).eval()
    with pytest.raises(UnsupportedArchitectureError, match="ToyOwnMaskModel.*not causal to begin with"):
        make_bidirectional(model)
    assert not is_bidirectional(model)


def test_hybrid_model_warns_which_layers_stay_causal():
    """Qwen3-Next's linear-attention layers stay causal; make_bidirectional passed silently as if every layer were
    bidirectional."""
    cfg = tf.Qwen3NextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=2,
                             num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                             linear_value_head_dim=8)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(cfg, attn_implementation="sdpa").eval()
    with pytest.warns(UserWarning, match=r"Qwen3NextModel.*layers \[0, 1, 2\] stay causal"):
        make_bidirectional(model)
    assert is_bidirectional(model) and causal_layers(model) == [0, 1, 2]
