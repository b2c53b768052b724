"""Linear layers with 16-bit weights and fp32 activations, run by l2v's CPU kernels (``gemm_bf16.c``).

Why: on CPU, torch's bf16 matmul rounds its *outputs* to bf16, so a bf16 model rounds every activation. For the
default model run bidirectionally that moves a few embeddings in a hundred below cosine 0.99 of fp32. l2v keeps
every activation in fp32 and rounds only the matmul *inputs*, in one of two 16-bit weight formats:

* ``int16`` (the default): fixed point with one fp32 scale per weight row and per activation row, products
  summed exactly in int32 by AVX512-VNNI's ``vpdpwssd``, which runs at the same rate as the bf16 dot product here.
  ~15 significant bits instead of bf16's 8: every measured text stays within 0.995 of fp32 with no layer in
  fp32 (benchmarks/RESULTS.md, "int16 fixed point"). The scales make every row's int16 norm at most ~46,340, so
  by Cauchy-Schwarz no sum can leave int32.
* ``bf16``: bf16 x bf16 products summed in fp32 (``vdpbf16ps``); its typical error is 5-30x below torch's bf16,
  but its tail needs the first 40% of the decoder layers in fp32 (:func:`fp32_leading_layers`; the same C
  file's fp32-weight path, faster here than torch's fp32 matmul), at ~1.3x the time.

torch 2.13 has neither on CPU, so l2v builds them (:mod:`l2v.kernels.build`). Weights stay at 2 bytes each.
Without a compiler or AVX512-BF16/VNNI, :func:`kernel_status` says why and callers keep torch's own bf16 path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .build import _state, load

BLOCK_N = 64  # output columns per packed panel (gemm_bf16.c: NR)


# ------------------------------------------------------------------------------------------- weight layout
def pack_weight(weight: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """``[N, K]`` (nn.Linear layout) -> ``[N/64, K/2, 64, 2]`` bf16 bits: each panel's k-pairs side by side (VNNI).

    Stored as int16 so ``module.to(dtype)`` (which casts floating buffers) cannot corrupt the bits. ``fp32``:
    full-precision weights instead, ``[N/64, K, 64]`` fp32 bits stored as int32 (for layers kept in fp32).
    """
    n, k = weight.shape
    if fp32:
        nb = -(-n // BLOCK_N)
        w = torch.zeros(nb * BLOCK_N, k, dtype=torch.float32)
        w[:n] = weight.detach().to("cpu", torch.float32)
        return w.view(nb, BLOCK_N, k).transpose(1, 2).contiguous().view(torch.int32)
    return _pack_pairs(weight.detach().to("cpu", torch.bfloat16))


def is_fp32_packed(packed: torch.Tensor) -> bool:
    return packed.dtype == torch.int32


FORMATS = ("bf16", "fp32", "int16")
I16_MAX = 32767.0


def i16_norm_target(k: int) -> float:
    """The L2 norm each int16 row is scaled to (``gemm_bf16.c``: i16_norm_target); see :func:`quantize_rows`."""
    return 46340.0 - 0.5 * math.sqrt(k) - 8.0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K]`` float -> (int16 ``[N, K]``, fp32 scale ``[N]``) with ``weight ~= q * scale[:, None]``.

    Each row's scale makes its int16 vector's L2 norm at most ~46,340 (and every entry at most 32,767), so by
    Cauchy-Schwarz no int32 sum of an int16 row of activations times an int16 row of weights can overflow: the
    kernel's sums are exact. The same rule quantizes activation rows inside the kernel.
    """
    w = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a weight with NaN or inf entries to int16")
    norm = w.norm(dim=1) / i16_norm_target(w.shape[1])
    scale = torch.maximum(norm, w.abs().amax(dim=1) / I16_MAX).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.double()[:, None]).clamp_(-I16_MAX, I16_MAX).to(torch.int16)
    return q, scale


def _pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` 16-bit (bf16 or int16) -> ``[N/64, K/2, 64, 2]`` int16 bits, zero padded."""
    n, k = w.shape
    nb, k2 = -(-n // BLOCK_N), -(-k // 2)
    out = torch.zeros(nb * BLOCK_N, k2 * 2, dtype=w.dtype)
    out[:n, :k] = w
    return out.view(nb, BLOCK_N, k2, 2).permute(0, 2, 1, 3).contiguous().view(torch.int16)


def pack_i16(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantized rows (:func:`quantize_rows`) -> (packed int16 ``[N/64, K/2, 64, 2]``, scales padded to N/64*64)."""
    packed = _pack_pairs(q)
    padded = torch.zeros(packed.shape[0] * BLOCK_N, dtype=torch.float32)
    padded[: scale.numel()] = scale
    return packed, padded


def unpack_i16(packed: torch.Tensor, scale: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_i16`: (int16 ``[n, k]``, scale ``[n]``)."""
    nb, k2 = packed.shape[0], packed.shape[1]
    q = packed.permute(0, 2, 1, 3).reshape(nb * BLOCK_N, k2 * 2)
    return q[:n, :k].contiguous(), scale[:n].clone()


def unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight` (``[N, K]``, bf16 or fp32 as packed)."""
    nb = packed.shape[0]
    if is_fp32_packed(packed):
        return packed.view(torch.float32).transpose(1, 2).reshape(nb * BLOCK_N, packed.shape[1])[:n, :k].contiguous()
    k2 = packed.shape[1]
    w = packed.view(torch.bfloat16).permute(0, 2, 1, 3).reshape(nb * BLOCK_N, k2 * 2)
    return w[:n, :k].contiguous()


# ------------------------------------------------------------------------------------------------ the op
ROWS_PER_TASK = 96  # rows converted to bf16 per task; 48-768 measured in situ, 96 best (RESULTS.md)


def _lib() -> Any:
    lib = load()
    if lib is None:
        raise RuntimeError(f"l2v's CPU kernel is unavailable: {_state['error']}")
    return lib


def _fits(packed: torch.Tensor, k: int, cols: int) -> bool:
    """Whether ``packed`` (either format) holds a weight of ``k`` inputs with room for ``cols`` packed outputs."""
    layout_ok = (packed.dim() == 3 and packed.shape[1] == k) if is_fp32_packed(packed) else (
        packed.dtype == torch.int16 and packed.dim() == 4 and packed.shape[1] == (k + 1) // 2)
    return layout_ok and 0 < cols <= packed.shape[0] * BLOCK_N


def _launch(x: torch.Tensor, bias: torch.Tensor | None, out_features: int,
            call: Callable[[torch.Tensor, int | None, torch.Tensor], int]) -> torch.Tensor:
    """``call(rows, bias pointer, out)`` on ``x`` as unit-stride ``[m, K]`` rows into a fresh fp32 ``[m, N]``."""
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], out_features), dtype=torch.float32)
    if x2.shape[0] and call(x2, bias.data_ptr() if bias is not None else None, out):
        raise MemoryError("l2v's bf16 CPU kernel could not allocate its scratch buffer.")
    return out.view(*x.shape[:-1], out_features)


def _check_scale(scale: torch.Tensor | None, packed: torch.Tensor, what: str) -> None:
    if scale is not None and (scale.dtype != torch.float32 or packed.dtype != torch.int16 or not scale.is_contiguous()
                              or scale.numel() != packed.shape[0] * BLOCK_N):
        raise ValueError(f"{what}: int16 scales of {tuple(scale.shape)} ({scale.dtype}) do not fit a packed weight of "
                         f"{tuple(packed.shape)} ({packed.dtype}); they come from pack_i16.")


def _run(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, gated: bool,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    lib = _lib()
    k = x.shape[-1]
    if x.device.type != "cpu" or packed.device.type != "cpu":
        raise RuntimeError("l2v's bf16 kernel runs on CPU only; load the encoder on the GPU without it "
                           "(Encoder.from_pretrained(..., device='cuda') never uses it).")
    cols = out_features * 2 if gated else out_features  # packed rows: gate and up interleaved when gated
    if (x.dtype != torch.float32 or not _fits(packed, k, cols)
            or (bias is not None and (gated or bias.numel() != out_features))):
        raise ValueError(f"bf16_linear: a packed weight of {tuple(packed.shape)} ({packed.dtype}) does not fit a "
                         f"{x.dtype} input of {tuple(x.shape)} and {out_features} outputs.")
    _check_scale(scale, packed, "bf16_linear")
    if scale is not None:
        return _launch(x, bias, out_features, lambda rows, b, out: lib.l2v_linear_i16(
            rows.data_ptr(), rows.stride(0), rows.shape[0], k, packed.data_ptr(), scale.data_ptr(), cols, b,
            out.data_ptr(), out_features, ROWS_PER_TASK, torch.get_num_threads(), int(gated)))
    fn = lib.l2v_linear_f32w if is_fp32_packed(packed) else lib.l2v_linear_f32
    return _launch(x, bias, out_features, lambda rows, b, out: fn(
        rows.data_ptr(), rows.stride(0), rows.shape[0], k, packed.data_ptr(), cols, b, out.data_ptr(), out_features,
        ROWS_PER_TASK, torch.get_num_threads(), int(gated)))


@torch.library.custom_op("l2v::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with x rounded to bf16, fp32 sums, fp32 result (x: fp32 ``[..., K]``).

    With a weight packed by ``pack_weight(w, fp32=True)`` everything is fp32 (no rounding); with int16 rows and
    their ``scale`` (:func:`pack_i16`), x is quantized per row to int16 the same way and the sums are exact."""
    return _run(x, packed, bias, out_features, gated=False, scale=scale)


@bf16_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
      scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("l2v::bf16_gated", mutates_args=())
def bf16_gated(x: torch.Tensor, packed: torch.Tensor, out_features: int,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` in one pass (weights from :func:`pack_gated`); the gated MLP's input half."""
    return _run(x, packed, None, out_features, gated=True, scale=scale)


@bf16_gated.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, out_features: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


MLP_ROWS_PER_BLOCK = 96  # rows per block of the fused MLP: its bf16 intermediate (96 x 1536 x 2 B) stays in L2


def _mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, intermediate: int,
         out_features: int, gate_up_scale: torch.Tensor | None = None,
         down_scale: torch.Tensor | None = None) -> torch.Tensor:
    lib = _lib()
    k = x.shape[-1]
    fp32 = is_fp32_packed(gate_up)
    _check_scale(gate_up_scale, gate_up, "gated_mlp")
    _check_scale(down_scale, down, "gated_mlp")
    mode = 1 if fp32 else (2 if gate_up_scale is not None else 0)
    if (x.dtype != torch.float32 or x.device.type != "cpu" or is_fp32_packed(down) != fp32
            or (gate_up_scale is None) != (down_scale is None)
            or not _fits(gate_up, k, 2 * intermediate) or not _fits(down, intermediate, out_features)
            or (bias is not None and bias.numel() != out_features)):
        raise ValueError(f"gated_mlp: packed weights {tuple(gate_up.shape)} / {tuple(down.shape)} do not fit a "
                         f"{x.dtype} input of {tuple(x.shape)} on {x.device}, {intermediate} intermediate and "
                         f"{out_features} outputs.")
    return _launch(x, bias, out_features, lambda rows, b, out: lib.l2v_mlp(
        rows.data_ptr(), rows.stride(0), rows.shape[0], k, gate_up.data_ptr(), intermediate, down.data_ptr(),
        out_features, b, out.data_ptr(), out_features, MLP_ROWS_PER_BLOCK, torch.get_num_threads(), mode,
        gate_up_scale.data_ptr() if gate_up_scale is not None else None,
        down_scale.data_ptr() if down_scale is not None else None))


@torch.library.custom_op("l2v::gated_mlp", mutates_args=())
def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
              intermediate: int, out_features: int, gate_up_scale: torch.Tensor | None = None,
              down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``down(silu(x @ gate.T) * (x @ up.T))`` in one kernel call, block of rows by block of rows.

    Why: the ``[rows, intermediate]`` activation never exists as a tensor (4096 rows of the default model: 25 MB
    of fresh pages per layer, whose page faults cost the gated matmul a quarter of its speed); each block's
    intermediate stays in a small scratch buffer. Bit-identical to :func:`bf16_gated` then :func:`bf16_linear`
    (int16 weights: both scales given).
    """
    return _mlp(x, gate_up, down, bias, intermediate, out_features, gate_up_scale, down_scale)


@gated_mlp.register_fake
def _(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, intermediate: int,
      out_features: int, gate_up_scale: torch.Tensor | None = None,
      down_scale: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def pack_gated(gate: torch.Tensor, up: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Interleave 32-row slices of gate and up so each 64-row panel holds matching gate and up outputs."""
    dt = torch.float32 if fp32 else torch.bfloat16
    return pack_weight(_interleave(gate.detach().to("cpu", dt), up.detach().to("cpu", dt)), fp32=fp32)


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[gate; up]`` rows (or scales) -> 32-row slices alternating, rows padded to whole slices with zeros."""
    i = gate.shape[0]
    half = BLOCK_N // 2
    nb = -(-i // half)
    both = torch.zeros(2, nb * half, *gate.shape[1:], dtype=gate.dtype)
    both[0, :i], both[1, :i] = gate, up
    return both.view(2, nb, half, *gate.shape[1:]).transpose(0, 1).reshape(nb * BLOCK_N, *gate.shape[1:])


def pack_gated_i16(gate: tuple[torch.Tensor, torch.Tensor],
                   up: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_gated` for int16 rows: ``gate`` / ``up`` are ``(q, scale)`` from :func:`quantize_rows`."""
    return pack_i16(_interleave(gate[0], up[0]), _interleave(gate[1], up[1]))


def unpack_gated_i16(packed: torch.Tensor, scale: torch.Tensor, i: int, k: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Inverse of :func:`pack_gated_i16`: ``((gate_q, gate_scale), (up_q, up_scale))``."""
    nb, half = packed.shape[0], BLOCK_N // 2
    q, sc = unpack_i16(packed, scale, nb * BLOCK_N, k)
    q, sc = q.view(nb, 2, half, k), sc.view(nb, 2, half)
    return tuple((q[:, j].reshape(nb * half, k)[:i].contiguous(), sc[:, j].reshape(nb * half)[:i].contiguous())
                 for j in (0, 1))


def unpack_gated(packed: torch.Tensor, i: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb, half = packed.shape[0], BLOCK_N // 2
    w = unpack_weight(packed, nb * BLOCK_N, k).view(nb, 2, half, k)
    return w[:, 0].reshape(nb * half, k)[:i].contiguous(), w[:, 1].reshape(nb * half, k)[:i].contiguous()


def _inference_only(x: torch.Tensor, what: str) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{what} is inference-only (no gradients); load the encoder with cpu_kernel=False to "
                           "differentiate through it.")


def _swap_modules(model: nn.Module, match: Callable[[nn.Module], bool],
                  make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every child ``c`` with ``match(c)`` by ``make(c)`` (skipped when it returns None); returns how many."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if match(child)]
    swapped = 0
    for parent, name, child in found:
        new = make(child)
        if new is not None:
            setattr(parent, name, new)
            swapped += 1
    return swapped


def _bits(scale: torch.Tensor | None) -> torch.Tensor | None:
    return None if scale is None else scale.view(torch.int32)


def _floats(scale: torch.Tensor | None) -> torch.Tensor | None:
    return None if scale is None else scale.view(torch.float32)


def _format(packed: torch.Tensor, scale: torch.Tensor | None) -> str:
    """A packed weight's format: fp32 bits (int32), int16 rows (with scales), or bf16 bits."""
    return "fp32" if is_fp32_packed(packed) else ("int16" if scale is not None else "bf16")


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.double() * scale.double()[:, None]).float()


class Bf16Linear(nn.Module):
    """Drop-in inference replacement for ``nn.Linear`` (or transformers' ``Conv1D``) on fp32 activations.

    The weight lives only in packed form: bf16, fp32 (``fmt="fp32"``, for the layers kept in fp32), or int16
    fixed point with one scale per output row (``fmt="int16"``: as fast as bf16 on AVX512-VNNI, ~15 significant
    bits instead of 8). ``state_dict`` still writes (and reads) a plain ``weight`` in the original module's
    layout, so ``save_pretrained`` produces a normal checkpoint. No gradients: it is for inference (training
    keeps ordinary layers).
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, packed: torch.Tensor,
                 conv1d: bool = False, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.conv1d = in_features, out_features, conv1d
        self.register_buffer("packed", packed, persistent=False)
        # int16 rows' fp32 scales, stored as int32 bits so casting the model (``.to(bf16)``) cannot round them
        self.register_buffer("scale", _bits(scale), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().cpu(), requires_grad=False)

    @staticmethod
    def _pack(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if fmt not in FORMATS:
            raise ValueError(f"unknown kernel weight format {fmt!r}; expected one of {', '.join(FORMATS)}")
        if fmt == "int16":
            return pack_i16(*quantize_rows(w))
        return pack_weight(w, fp32=fmt == "fp32"), None

    @classmethod
    def from_module(cls, module: nn.Module, fp32: bool = False, fmt: str | None = None) -> Bf16Linear:
        """``fmt``: "bf16" (default), "fp32" (same as ``fp32=True``) or "int16"."""
        if isinstance(module, nn.Linear):
            w, conv1d = module.weight, False
        else:  # transformers Conv1D: weight [in, out], y = x @ W + b
            w, conv1d = module.weight.t(), True
        n, k = w.shape
        packed, scale = cls._pack(w, fmt or ("fp32" if fp32 else "bf16"))
        return cls(k, n, module.bias, packed, conv1d=conv1d, scale=scale)

    @property
    def fmt(self) -> str:
        """The weight format: "bf16", "fp32" or "int16"."""
        return _format(self.packed, self.scale)

    @property
    def fp32(self) -> bool:
        """Whether the weight is kept in fp32 (exact fp32 math) rather than 16 bits."""
        return is_fp32_packed(self.packed)

    def int16_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int16 weight rows and their scales (``fmt == "int16"`` only), in ``[out, in]`` layout."""
        return unpack_i16(self.packed, _floats(self.scale), self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as held (bf16, fp32, or int16 dequantized to fp32) in the original layout (a copy)."""
        if self.fmt == "int16":
            w = _dequantize(*self.int16_rows())
        else:
            w = unpack_weight(self.packed, self.out_features, self.in_features)
        return w.t().contiguous() if self.conv1d else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _inference_only(x, "Bf16Linear")
        # the op upcasts a cast bias
        return bf16_linear(x.float(), self.packed, self.bias, self.out_features, _floats(self.scale))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            self.packed, scale = self._pack(w.t() if self.conv1d else w, self.fmt)
            self.scale = _bits(scale)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights={self.fmt}")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def convert_linears(model: nn.Module, keep: Iterable[nn.Module] = (), fmt: str = "bf16") -> int:
    """Swap every ``nn.Linear``/``Conv1D`` in ``model`` for :class:`Bf16Linear` (weights in ``fmt``, "bf16" or
    "int16"), in place; returns how many.

    Linear layers inside the modules in ``keep`` (e.g. the first decoder layers, see :func:`fp32_leading_layers`)
    keep fp32 weights and exact fp32 math on the kernel's fp32 path. The rest of the model should be fp32
    (activations stay fp32 between the kernels).
    """
    if fmt not in ("bf16", "int16"):
        raise ValueError(f"convert_linears: fmt must be 'bf16' or 'int16', got {fmt!r}")
    kept = {id(m) for k in keep for m in k.modules()}
    return _swap_modules(model, lambda m: isinstance(m, nn.Linear) or _is_conv1d(m),
                         lambda m: Bf16Linear.from_module(m, fmt="fp32" if id(m) in kept else fmt))


def decoder_layers(model: nn.Module, same_class: bool = False) -> nn.ModuleList | None:
    """The model's stack of decoder blocks (``layers``, GPT-2's ``h``, OPT's ``decoder.layers``...), or None.

    Found generically: the ``nn.ModuleList`` whose length is the config's layer count (``same_class``: the first
    such list whose blocks are all of one class; hybrid models mix block classes).
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not n:
        return None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and (
                not same_class or len({type(block) for block in module}) == 1):
            return module
    return None


FP32_LAYER_FRACTION = 0.4  # the default share of leading decoder layers kept in fp32 (benchmarks/RESULTS.md)


def fp32_leading_layers(model: nn.Module, count: int | None = None) -> list[nn.Module]:
    """The first ``count`` decoder layers (default: 40%, rounded up), to pass as ``convert_linears(keep=...)``.

    Why: a bidirectional model amplifies rounding errors made before it forms its massive activations (layer ~12
    of 30 on the default model); keeping those layers in fp32 removes the worst texts' error against fp32.
    """
    layers = decoder_layers(model)
    if layers is None:
        if count:
            raise ValueError(f"fp32_layers={count}: cannot find the decoder layers of {type(model).__name__} "
                             "(no ModuleList of config.num_hidden_layers blocks).")
        return []
    n = math.ceil(FP32_LAYER_FRACTION * len(layers)) if count is None else count
    if n > len(layers):
        raise ValueError(f"fp32_layers={n}, but the model has only {len(layers)} decoder layers.")
    return list(layers[:n])


def uses_kernel(model: nn.Module, bf16: bool = False) -> bool:
    """Whether ``model`` runs linear layers on the kernel (``bf16=True``: with 16-bit weights, bf16 or int16)."""
    return any(isinstance(m, (Bf16Linear, GatedMLP)) and not (bf16 and m.fp32) for m in model.modules())


class GatedMLP(nn.Module):
    """A SiLU-gated MLP (``down(silu(gate(x)) * up(x))``: Llama, Mistral, Qwen, ...) on the kernel.

    gate and up run as one kernel call whose epilogue applies SiLU and the product, so the two intermediate
    activations are never written out. ``state_dict`` keeps the original ``gate_proj``/``up_proj``/``down_proj``
    keys. Weight formats as :class:`Bf16Linear` (``gate_up_scale`` holds the int16 rows' scales).
    """

    def __init__(self, gate_up: torch.Tensor, in_features: int, intermediate: int, down: Bf16Linear,
                 gate_up_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.intermediate = in_features, intermediate
        self.register_buffer("gate_up", gate_up, persistent=False)
        self.register_buffer("gate_up_scale", _bits(gate_up_scale), persistent=False)  # as Bf16Linear.scale
        self.down_proj = down

    @property
    def fmt(self) -> str:
        return _format(self.gate_up, self.gate_up_scale)

    @property
    def fp32(self) -> bool:
        return is_fp32_packed(self.gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _inference_only(x, "GatedMLP")
        down = self.down_proj
        if not down.conv1d and down.fmt == self.fmt:  # the whole MLP in one call (the usual case)
            return gated_mlp(x.float(), self.gate_up, down.packed, down.bias, self.intermediate, down.out_features,
                             _floats(self.gate_up_scale), _floats(down.scale))
        return down(bf16_gated(x.float(), self.gate_up, self.intermediate, _floats(self.gate_up_scale)))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fmt == "int16":
            gate, up = (_dequantize(*qs) for qs in unpack_gated_i16(self.gate_up, _floats(self.gate_up_scale),
                                                                    self.intermediate, self.in_features))
        else:
            gate, up = unpack_gated(self.gate_up, self.intermediate, self.in_features)
        destination[prefix + "gate_proj.weight"], destination[prefix + "up_proj.weight"] = gate, up

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        keys = (prefix + "gate_proj.weight", prefix + "up_proj.weight")
        if all(k in state_dict for k in keys):
            gate, up = state_dict[keys[0]], state_dict[keys[1]]
            if self.fmt == "int16":
                self.gate_up, scale = pack_gated_i16(quantize_rows(gate), quantize_rows(up))
                self.gate_up_scale = _bits(scale)
            else:
                self.gate_up = pack_gated(gate, up, fp32=self.fp32)
        elif strict:
            missing_keys.extend(k for k in keys if k not in state_dict)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k not in keys}, prefix,
                                      local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, intermediate={self.intermediate}, act=silu, weights={self.fmt}"


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def fuse_gated_mlps(model: nn.Module, probe_rows: int = 5) -> int:
    """Replace SiLU-gated MLPs (after :func:`convert_linears`) with :class:`GatedMLP`; returns how many.

    Matched by structure (``gate_proj``/``up_proj``/``down_proj`` without biases and a SiLU ``act_fn``), then
    proven: each fused module must reproduce the original on a random probe, else the original stays.
    """
    def is_candidate(mod: nn.Module) -> bool:
        gate, up, down = (getattr(mod, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
        return (all(isinstance(m, Bf16Linear) and m.bias is None and not m.conv1d for m in (gate, up, down))
                and _is_silu(getattr(mod, "act_fn", None)) and gate.out_features == up.out_features
                and gate.fmt == up.fmt
                and gate.in_features == up.in_features == down.out_features)

    def fused(mod: nn.Module) -> GatedMLP | None:
        gate, up = mod.gate_proj, mod.up_proj
        if gate.fmt == "int16":  # the rows as already quantized (requantizing dequantized rows would round twice)
            packed, scale = pack_gated_i16(gate.int16_rows(), up.int16_rows())
        else:
            packed, scale = pack_gated(gate.weight, up.weight, fp32=gate.fp32), None
        new = GatedMLP(packed, gate.in_features, gate.out_features, mod.down_proj, scale)
        probe = torch.randn(probe_rows, gate.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = mod(probe), new(probe)
        return new if torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())) else None

    return _swap_modules(model, is_candidate, fused)
