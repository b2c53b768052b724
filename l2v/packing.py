"""Padding-free ("varlen") forward: several texts packed into one row, each attending only to itself.

A packed batch is one row of ``T`` tokens (the texts back to back) with per-text position ids. Every linear
layer then multiplies exactly ``T`` real rows (no padding FLOPs, one large matmul), and attention runs per text:
in fp32 on CPU, l2v's attention kernel (:mod:`l2v.kernels.attention`) takes the whole row with the texts' lengths
(and l2v's one-pass rotary replaces transformers' where a probe shows them identical); otherwise texts of equal
length are contiguous (the encoder packs them sorted by length), so each run of ``n`` texts of length ``L`` is a
free ``(n, heads, L, head_dim)`` view handed, without padding, to the attention function the model was configured
with before packing (its own ``eager_attention_forward`` for ``"eager"``, so extras SDPA ignores such as Gemma 2's
logit soft-capping or gpt-oss's attention sinks are honoured; transformers' SDPA for ``"sdpa"``).

The mechanism is generic: it registers one attention function in transformers' ``AttentionInterface`` and
switches ``config._attn_implementation`` to it only for the duration of a packed forward. Models that do not
route attention through that interface (or ignore ``position_ids``) would silently mix texts, so
:func:`check_packing` proves the packed forward equals the padded one on the actual model before it is used.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

import torch
from torch import nn

from .kernels import attention as attention_kernel
from .kernels import uses_kernel
from .kernels.rotary import fused_rotary

IMPL = "l2v_varlen"
_GROUPS: ContextVar[list[tuple[int, int, int]] | None] = ContextVar("l2v_varlen_groups", default=None)
# id(config) -> its _attn_implementation before packed_attention switched it (what each group's attention runs)
_PREVIOUS: ContextVar[dict[int, str | None] | None] = ContextVar("l2v_varlen_previous", default=None)
_SWITCH_LOCK = threading.RLock()


def length_groups(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of equal consecutive lengths as ``(start_token, n_texts, length)``."""
    groups: list[list[int]] = []
    start = 0
    for n in lengths:
        n = int(n)
        if groups and groups[-1][2] == n:
            groups[-1][1] += 1
        else:
            groups.append([start, 1, n])
        start += n
    return [(s, c, n) for s, c, n in groups]


def varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for a packed row: ``query`` (1, heads, T, hd) -> (1, T, heads, hd), texts kept apart."""
    groups = _GROUPS.get()
    if groups is None:
        raise RuntimeError(f"attn_implementation={IMPL!r} is only valid inside l2v.packing.packed_attention().")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}.")
    causal = bool(kwargs.pop("is_causal", None) or getattr(module, "is_causal", False))  # per text, as padded
    if _kernel_applies(query, key, value, kwargs):
        lengths = [length for _, n, length in groups for _ in range(n)]
        out = attention_kernel.varlen_attention(query, key, value, lengths, kwargs.get("scaling"), causal)
        return out.unsqueeze(0), None
    attend, eager = _group_attention(module)
    outs = []
    for start, n, length in groups:
        span = slice(start, start + n * length)
        q, k, v = (t[0, :, span].unflatten(1, (n, length)).transpose(0, 1) for t in (query, key, value))
        if eager:  # additive mask (it ignores is_causal); None is full attention
            mask = _causal_mask(length, q.dtype, q.device) if causal else None
            out, _ = attend(module, q, k, v, mask, **kwargs)
        else:
            out, _ = attend(module, q, k, v, None, is_causal=causal, **kwargs)  # (n, L, heads, hd)
        outs.append(out.reshape(n * length, *out.shape[2:]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.unsqueeze(0), None


def _group_attention(module: nn.Module) -> tuple[Callable, bool]:
    """The attention function ``module`` ran before packing, and whether it is an eager one (mask, no is_causal).

    Per-group attention must be the model's own: its ``eager_attention_forward`` honours arguments transformers'
    SDPA ignores or rejects (``softcap``, gpt-oss's sinks), which is what the padded path computes. ``"sdpa"``
    (and anything unknown) keeps transformers' SDPA; other registered implementations are looked up by name.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = _PREVIOUS.get() or {}
    impl = previous.get(id(getattr(module, "config", None)))
    if impl == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if callable(fn):
            return fn, True
    elif impl not in (None, "sdpa", IMPL) and impl in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[impl], False
    return sdpa_attention_forward, False


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, L, L) additive causal mask as transformers' eager functions add it (broadcast over texts, heads)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


_KERNELS: ContextVar[bool] = ContextVar("l2v_varlen_kernels", default=True)


@contextmanager
def attention_kernels(enabled: bool) -> Iterator[None]:
    """Switch l2v's attention and rotary kernels on or off for packed forwards in this block (default: on).

    Off runs transformers' own rotary and torch's SDPA per length group, as before the kernels existed: for
    A/B measurements (``benchmarks/encode_speed.py``) and for ruling the kernels out when debugging.
    """
    token = _KERNELS.set(bool(enabled))
    try:
        yield
    finally:
        _KERNELS.reset(token)


_KERNEL_SAFE_KWARGS = {"dropout", "scaling", "position_ids", "sliding_window", "cache_position", "output_attentions",
                       "use_cache"}


def _kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> bool:
    """l2v's fp32 CPU attention kernel: inference only (it has no backward), and nothing it would not honour.

    ``sliding_window`` is accepted because the SDPA path below ignores it just the same (packed rows carry no
    mask); any other extra argument (soft-capping, attention sinks, dropout during training) keeps SDPA.
    """
    if not _KERNELS.get() or any(t.requires_grad for t in (query, key, value)) or torch.compiler.is_compiling():
        return False
    if float(kwargs.get("dropout") or 0.0) != 0.0 or any(
            kwargs.get(name) is not None for name in kwargs if name not in _KERNEL_SAFE_KWARGS):
        return False
    return attention_kernel.supports(query, key, value)


def _register() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if IMPL not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(IMPL, varlen_attention)


def _configs(model: nn.Module) -> list:
    out, seen = [], set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


@contextmanager
def packed_attention(model: nn.Module, lengths: Sequence[int]) -> Iterator[None]:
    """Within this block, ``model`` treats its single input row as texts of ``lengths`` packed back to back."""
    _register()
    token = _GROUPS.set(length_groups(lengths))
    rotary = fused_rotary(model) if _KERNELS.get() else nullcontext()
    with _SWITCH_LOCK, rotary:  # the switch is model-wide: concurrent packed forwards wait
        configs = _configs(model)
        previous = [cfg._attn_implementation for cfg in configs]
        remembered = _PREVIOUS.set({id(cfg): impl for cfg, impl in zip(configs, previous, strict=True)})
        try:
            for cfg in configs:
                cfg._attn_implementation = IMPL
            yield
        finally:
            for cfg, impl in zip(configs, previous, strict=True):
                cfg._attn_implementation = impl
            _PREVIOUS.reset(remembered)
            _GROUPS.reset(token)


def packed_inputs(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``input_ids`` (1, T), ``position_ids`` (1, T) restarting at 0 for each text, and the lengths."""
    lengths = [len(s) for s in sequences]
    ids = torch.tensor([i for s in sequences for i in s], dtype=torch.long).unsqueeze(0)
    longest = max(lengths)
    ar = torch.arange(longest)
    pos = torch.cat([ar[:n] for n in lengths]).unsqueeze(0)
    return ids, pos, lengths


def unpack(hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """(1, T, d) packed states -> (n, longest, d), right padded with zeros (differentiable)."""
    n, longest = len(lengths), max(lengths)
    lens = torch.as_tensor(list(lengths), device=hidden.device)
    mask = torch.arange(longest, device=hidden.device).unsqueeze(0) < lens.unsqueeze(1)
    out = hidden.new_zeros((n, longest, hidden.shape[-1]))
    out[mask] = hidden[0]
    return out


def check_packing(model: nn.Module, vocab_size: int, pad_id: int = 0) -> bool:
    """True when the packed forward of ``model`` matches its padded forward on a small probe.

    Three texts (lengths 5, 3, 3: two length groups) are run padded (right padding, attention mask) and packed;
    texts leaking into each other, ignored position ids or an attention path that bypasses the interface all
    show up as a large difference.
    """
    try:
        seqs = [[(7 * i + 3 * j + 5) % max(vocab_size - 1, 2) + 1 for j in range(n)] for i, n in
                enumerate((5, 3, 3))]
        dev = next(model.parameters()).device
        ids, pos, lengths = packed_inputs(seqs)
        with torch.inference_mode():
            with packed_attention(model, lengths):
                out = model(input_ids=ids.to(dev), position_ids=pos.to(dev))
            packed = unpack(_last_hidden(out), lengths).float()
            padded_ids = torch.full((3, 5), pad_id, dtype=torch.long)
            attn = torch.zeros((3, 5), dtype=torch.long)
            for r, s in enumerate(seqs):
                padded_ids[r, :len(s)] = torch.tensor(s)
                attn[r, :len(s)] = 1
            ppos = (attn.cumsum(1) - 1).clamp_min(0)
            ref = _last_hidden(model(input_ids=padded_ids.to(dev), attention_mask=attn.to(dev),
                                     position_ids=ppos.to(dev))).float()
        mask = attn.bool().to(dev)
        diff = (packed[mask] - ref[mask]).abs().max()
        scale = ref[mask].abs().max().clamp_min(1e-6)
        # bf16 rounding anywhere (a bf16 model, or l2v's kernel with bf16 weights) needs the looser bound
        exact = next(model.parameters()).dtype == torch.float32 and not uses_kernel(model, bf16=True)
        tol = 1e-3 if exact else 5e-2
        return bool(torch.isfinite(diff)) and float(diff / scale) < tol
    except Exception:  # noqa: BLE001 - any failure means: do not use the packed path for this model
        return False


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
