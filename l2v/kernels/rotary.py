"""Rotary position embedding in one pass (``rotary.c``), swapped into a model's forward while l2v encodes.

Why: transformers applies rotary embeddings as five full-size tensor ops per query and key; in an fp32 CPU encode
that was ~6% of the time. The kernel computes the same products and sums in the same order (bit-identical
results) in one read and one write. It replaces a modeling module's ``apply_rotary_pos_emb`` only inside
:func:`fused_rotary`, and only after a probe has shown the two give identical outputs for that module (other
conventions, e.g. interleaved or partial rotary, fail the probe and keep their own function).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import nn

from .build import load

NAME = "apply_rotary_pos_emb"
_lock = threading.RLock()
_verified: dict[tuple[str, int], bool] = {}
_active: dict[str, list] = {}  # module name -> [original function, nesting count]


def applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """``x`` (B, H, T, D) fp32 on CPU without grad, ``cos``/``sin`` contiguous (1 or B, T, D)."""
    if x.dim() != 4 or cos.dim() != 3 or x.requires_grad or torch.compiler.is_compiling():
        return False
    b, _, t, d = x.shape
    return (x.device.type == "cpu" and x.dtype == cos.dtype == sin.dtype == torch.float32 and d % 2 == 0
            and x.stride(-1) == 1 and cos.shape == sin.shape and cos.shape[1:] == (t, d) and cos.shape[0] in (1, b)
            and cos.is_contiguous() and sin.is_contiguous() and cos.device.type == sin.device.type == "cpu"
            and load() is not None)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos[:, None] + rotate_half(x) * sin[:, None]`` for ``x`` (B, H, T, D) -> a contiguous tensor."""
    if not applies(x, cos, sin):
        raise ValueError(f"l2v's rotary kernel cannot run x {tuple(x.shape)} {x.dtype} with cos {tuple(cos.shape)} "
                         f"{cos.dtype} (needs CPU fp32, even head_dim, cos/sin of shape (1 or B, T, D)).")
    b, h, t, d = x.shape
    out = torch.empty((b, h, t, d), dtype=torch.float32)
    load().l2v_rotary(x.data_ptr(), b, h, t, d, x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(),
                      sin.data_ptr(), 0 if cos.shape[0] == 1 else t * d, out.data_ptr(), torch.get_num_threads())
    return out


def _fused(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (args or any(name != "unsqueeze_dim" for name in kwargs) or kwargs.get("unsqueeze_dim", 1) != 1
                or not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor))
                or not applies(q, cos, sin) or not applies(k, cos, sin)):
            return original(q, k, cos, sin, *args, **kwargs)
        return rotary(q, cos, sin), rotary(k, cos, sin)

    apply_rotary_pos_emb.l2v_original = original
    return apply_rotary_pos_emb


def _verify(module: ModuleType, original: Callable) -> bool:
    """The kernel matches ``original`` bit for bit on a random probe (GQA shapes, a batch of 2)."""
    key = (module.__name__, id(original))
    if key not in _verified:
        try:
            gen = torch.Generator().manual_seed(0)
            q, k = torch.randn(2, 4, 7, 32, generator=gen), torch.randn(2, 2, 7, 32, generator=gen)
            angle = torch.randn(2, 7, 16, generator=gen) * 3
            cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
            with torch.inference_mode():
                want = original(q, k, cos, sin)
                got = _fused(original)(q, k, cos, sin)
            _verified[key] = all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        except Exception:  # noqa: BLE001 - any other signature or convention: keep the module's own function
            _verified[key] = False
    return _verified[key]


def _modules(model: nn.Module) -> list[ModuleType]:
    names = {type(m).__module__ for m in model.modules()}
    mods = [sys.modules.get(n) for n in sorted(names)]
    return [m for m in mods if m is not None and callable(getattr(m, NAME, None))]


@contextmanager
def fused_rotary(model: nn.Module) -> Iterator[list[str]]:
    """Within this block, ``model``'s modeling modules use the rotary kernel; yields the names of those patched.

    Nothing changes where the kernel is unavailable. Safe to nest and to use from several threads: a module is
    restored when the last block using it exits.
    """
    patched: list[str] = []
    with _lock:
        if load() is not None:
            for mod in _modules(model):
                current = getattr(mod, NAME)
                original = getattr(current, "l2v_original", current)
                if mod.__name__ in _active or _verify(mod, original):
                    if mod.__name__ not in _active:
                        _active[mod.__name__] = [original, 0]
                        setattr(mod, NAME, _fused(original))
                    _active[mod.__name__][1] += 1
                    patched.append(mod.__name__)
    try:
        yield patched
    finally:
        with _lock:
            for name in patched:
                entry = _active[name]
                entry[1] -= 1
                if entry[1] == 0:
                    setattr(sys.modules[name], NAME, entry[0])
                    del _active[name]
