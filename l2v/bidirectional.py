"""Turn any Hugging Face decoder-only model into a bidirectional one, in place, without copying model code.

transformers 5.x routes every modern decoder's mask through ``masking_utils.create_causal_mask`` (and its
sliding-window / chunked siblings), which fall back to a padding-only bidirectional mask when
``config.is_causal`` is ``False``. Attention kernels (SDPA without a mask, flash attention) additionally read
``module.is_causal``. Flipping both is therefore enough for every architecture that uses the shared masking
utilities; :func:`check_bidirectional` proves it on the actual model and raises for the rest, so a model is
never silently left causal.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "UnsupportedArchitectureError",
    "make_bidirectional",
    "make_causal",
    "is_bidirectional",
    "check_bidirectional",
    "causal_attention",
    "architecture_name",
    "causal_layers",
]

_FLAG = "_l2v_causal_modules"
_UNSUPPORTED_ATTN = {"flex_attention"}
# Bidirectional sliding-window layers attend to every token: transformers' bidirectional sliding-window mask still
# cuts at |i - j| > config.sliding_window, so the config's window is widened past any sequence length (it must stay
# an int: hybrid models such as Gemma 2/3 always build the sliding mask, which raises without one). Attention modules
# get the same int, not None: Cohere 2 and Flint apply rotary only `if self.sliding_window is not None`, and flash
# attention applies a window only when the keys outnumber it.
FULL_WINDOW = 2**31 - 1


class UnsupportedArchitectureError(RuntimeError):
    """Raised when a model cannot be made bidirectional by the generic mechanism."""


def architecture_name(model: nn.Module) -> str:
    """The architecture a user would recognise (``LlamaForCausalLM``), looking through PEFT wrappers."""
    config = getattr(_unwrap(model), "config", None)
    archs = getattr(config, "architectures", None) or []
    if archs:
        return str(archs[0])
    model_type = getattr(config, "model_type", None)
    return f"{type(_unwrap(model)).__name__}" + (f" (model_type={model_type!r})" if model_type else "")


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model under PEFT wrappers (PeftModel -> LoraModel -> PreTrainedModel)."""
    seen = 0
    while seen < 4 and hasattr(model, "get_base_model") and callable(model.get_base_model):
        inner = model.get_base_model()
        if inner is model:
            break
        model, seen = inner, seen + 1
    return model


def _configs(model: nn.Module) -> list:
    """Every config object reachable from the model's submodules (text sub-configs included), deduplicated."""
    out, ids = [], set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and id(cfg) not in ids:
            ids.add(id(cfg))
            out.append(cfg)
    return out


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]


def _decoder_layers(model: nn.Module, same_class: bool = True) -> list[nn.Module]:
    """The model's transformer blocks (:func:`l2v.kernels.decoder_layers`), by default only when all are one class.

    Older architectures (BLOOM, MPT, CodeGen, XGLM) build their mask with transformers' ``create_causal_mask`` (so
    ``config.is_causal`` is honoured) but their attention modules expose no ``is_causal``; their blocks are what
    :func:`check_bidirectional` probes instead.
    """
    from .kernels.linear import decoder_layers

    return list(decoder_layers(model, same_class=same_class) or [])


def _probed_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules where they expose ``is_causal``, else the decoder blocks (mixing across positions only
    through attention, so a block whose first-token output ignores the last token is causal just the same)."""
    return _attention_modules(model) or _decoder_layers(model)


def is_limited_window(value: object) -> bool:
    """Whether a ``sliding_window`` setting actually limits attention (an int below :data:`FULL_WINDOW`)."""
    return isinstance(value, int) and not isinstance(value, bool) and value < FULL_WINDOW


def _check_supported(model: nn.Module) -> None:
    base = _unwrap(model)
    config = getattr(base, "config", None)
    name = architecture_name(model)
    if config is None:
        raise UnsupportedArchitectureError(f"{name}: not a Hugging Face transformers model (no .config).")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{name}: encoder-decoder models are not supported; l2v needs a decoder-only model "
            "(Llama, Mistral, Qwen, Gemma, Phi, GPT-2, ...)."
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl in _UNSUPPORTED_ATTN:
        raise UnsupportedArchitectureError(
            f"{name}: attention implementation {impl!r} is not supported for bidirectional attention; "
            "load the model with attn_implementation='sdpa' or 'eager'."
        )
    if not _probed_modules(base):
        raise UnsupportedArchitectureError(
            f"{name}: no attention module exposes `is_causal` and no decoder layers were found, so this "
            "architecture does not use the shared transformers attention path and cannot be made bidirectional "
            "generically."
        )


def make_bidirectional(model: nn.Module, check: bool = True) -> nn.Module:
    """Enable bidirectional attention on ``model`` in place and return it.

    Works on a ``PreTrainedModel`` or a PEFT-wrapped one. With ``check=True`` a two-token probe proves the first
    token now sees the last one; an architecture whose mask is built elsewhere raises
    :class:`UnsupportedArchitectureError` naming it (and the model is restored to causal).
    """
    base = _unwrap(model)
    if is_bidirectional(base):
        return model
    _check_supported(base)
    changed = [m for m in _attention_modules(base) if m.is_causal]
    configs = _configs(base)
    previous = [(cfg, getattr(cfg, "is_causal", None)) for cfg in configs]
    if check and not _attention_modules(base):
        _check_mask_follows_config(base, previous)
    windows = [(obj, obj.sliding_window) for obj in [*configs, *_attention_modules(base)]
               if is_limited_window(getattr(obj, "sliding_window", None))]
    for m in changed:
        m.is_causal = False
    for cfg in configs:
        cfg.is_causal = False
    for obj, _ in windows:  # full attention: a window no text reaches
        obj.sliding_window = FULL_WINDOW
    setattr(base, _FLAG, (changed, previous, windows))
    try:
        sees = not check or check_bidirectional(base)
    except Exception as exc:  # e.g. MPT: `create_causal_mask(...).to(bool)` fails on the skipped (None) mask
        make_causal(base)
        raise UnsupportedArchitectureError(
            f"{architecture_name(base)}: its forward fails with bidirectional attention ({type(exc).__name__}: "
            f"{str(exc).strip()[:200]}). This architecture is not supported by l2v's generic mechanism."
        ) from exc
    if not sees:
        make_causal(base)
        hint = "" if _attention_modules(base) else (
            " No attention module exposes `is_causal` and its decoder layers stayed causal: a recurrent / "
            "state-space model or a hard-coded causal mask.")
        raise UnsupportedArchitectureError(
            f"{architecture_name(base)}: attention stayed causal after enabling bidirectional attention "
            "(its mask is not built by transformers' shared masking utilities). This architecture is not "
            f"supported by l2v's generic mechanism.{hint}"
        )
    if check and _attention_modules(base) and (stayed := causal_layers(base)):
        warnings.warn(f"{architecture_name(base)}: decoder layers {stayed} stay causal (recurrent, state-space, "
                      "convolution or linear-attention token mixing); only its attention layers are bidirectional.",
                      stacklevel=2)
    return model


def _check_mask_follows_config(base: nn.Module, previous: list) -> None:
    """Without ``is_causal`` on its attention modules, a model is supported only if ``config.is_causal`` is what
    makes it causal: it must be causal with the flag set. CPM-Ant builds its own (already bidirectional) mask and
    ignores ``attention_mask``, so a padded text silently differed from the same text alone."""
    for cfg, _ in previous:
        cfg.is_causal = True
    try:
        causal = not check_bidirectional(base)
    finally:
        for cfg, value in previous:
            if value is None:
                cfg.__dict__.pop("is_causal", None)
            else:
                cfg.is_causal = value
    if not causal:
        raise UnsupportedArchitectureError(
            f"{architecture_name(base)}: its attention is not causal to begin with and no attention module exposes "
            "`is_causal`, so its mask is built by its own code (not transformers' masking utilities) and l2v "
            "cannot control attention or padding. This architecture is not supported by l2v's generic mechanism."
        )


def make_causal(model: nn.Module) -> nn.Module:
    """Undo :func:`make_bidirectional`, restoring the flags it changed.

    A config that was already ``is_causal=False`` before (an ``l2v export`` directory loaded back) is set to
    ``True``: restoring ``False`` would leave the model bidirectional.
    """
    base = _unwrap(model)
    state = getattr(base, _FLAG, None)
    if state is None:
        return model
    changed, previous, windows = state
    for m in changed:
        m.is_causal = True
    for obj, window in windows:
        obj.sliding_window = window
    for cfg, value in previous:
        if value is None:
            if "is_causal" in cfg.__dict__:
                del cfg.__dict__["is_causal"]
        else:
            cfg.is_causal = True
    delattr(base, _FLAG)
    return model


def is_bidirectional(model: nn.Module) -> bool:
    """Whether :func:`make_bidirectional` is in effect on this model."""
    return getattr(_unwrap(model), _FLAG, None) is not None


@contextmanager
def causal_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run a bidirectional model causally (for ablations); restored on exit."""
    was_bi = is_bidirectional(model)
    if was_bi:
        make_causal(model)
    try:
        yield model
    finally:
        if was_bi:
            make_bidirectional(model, check=False)


def _probe_ids(model: nn.Module, length: int) -> torch.Tensor:
    config = _unwrap(model).config
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text_cfg, "vocab_size", 0) or 0)
    if vocab < 8:
        raise UnsupportedArchitectureError(f"{architecture_name(model)}: config has no usable vocab_size.")
    gen = torch.Generator().manual_seed(0)
    # Stay clear of the first ids, where special tokens usually live.
    low = min(10, vocab // 2)
    return torch.randint(low, vocab, (1, length), generator=gen)


@torch.inference_mode()
def check_bidirectional(model: nn.Module, length: int = 6) -> bool:
    """Return True iff the first token sees the last one in every attention layer (and in the output).

    Two probes differ only in their last token. Each attention layer's input is reset so the probes differ only at
    the last position there too: a layer left causal (e.g. Llama 4's chunked layers, whose mask ignores
    ``is_causal``) gives the same first-token output for both, even when a bidirectional layer elsewhere already
    changed the model's output. A causal model cannot pass either check.
    """
    base = _unwrap(model)
    sees, output = _probe(base, _probed_modules(base), length)
    return all(sees.values()) and output


def causal_layers(model: nn.Module, length: int = 6) -> list[int]:
    """Indices of the decoder layers whose first token still ignores the last one (on a bidirectional model).

    Hybrid models (Qwen3-Next, Jamba, Nemotron-H, LFM2, ...) mix tokens in some layers with recurrent, state-space,
    convolution or linear-attention blocks, which stay causal: only their attention layers become bidirectional.
    """
    base = _unwrap(model)
    layers = _decoder_layers(base, same_class=False)
    sees, _ = _probe(base, layers, length)
    return [i for i, layer in enumerate(layers) if not sees.get(id(layer), True)]


@torch.inference_mode()
def _probe(base: nn.Module, modules: list[nn.Module], length: int) -> tuple[dict[int, bool], bool]:
    """Per module (by id): does its first-token output change with the last token; and does the model's output."""
    ids = _probe_ids(base, length)
    device = next(base.parameters()).device
    ids = ids.to(device)
    changed = ids.clone()
    changed[0, -1] = ids[0, -1] - 1 if ids[0, -1] > ids[0, 0] else ids[0, -1] + 1
    sees: dict[int, bool] = {}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[:2] != (2, length):
            return None
        hidden = hidden.clone()
        hidden[1, :-1] = hidden[0, :-1]
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[:2] == (2, length):
            first = out[:, 0].float()
            sees[id(module)] = not torch.allclose(first[0], first[1], atol=1e-6, rtol=0)

    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    was_training = base.training
    base.eval()
    try:
        both = torch.cat([ids, changed], dim=0)
        out = base(input_ids=both, attention_mask=torch.ones_like(both), output_hidden_states=True)
    finally:
        base.train(was_training)
        for h in handles:
            h.remove()
    first = out.hidden_states[-1][:, 0].float()
    return sees, not torch.allclose(first[0], first[1], atol=1e-6, rtol=0)
