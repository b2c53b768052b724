"""Linear layers with bf16 weights and fp32 activations, run by l2v's AVX512-BF16 kernel (``gemm_bf16.c``).

Why: on CPU, torch's bf16 matmul rounds its *outputs* to bf16, so a bf16 model rounds every activation. For the
default model run bidirectionally that moves a few embeddings in a hundred below cosine 0.99 of fp32. Rounding
only the matmul *inputs* (bf16 x bf16 products summed in fp32, fp32 out) makes the typical error 5-30x smaller,
and keeping the first 40% of the decoder layers entirely in fp32 (:func:`fp32_leading_layers`; the same C file's
fp32-weight path, faster here than torch's fp32 matmul) removes the tail (benchmarks/RESULTS.md, "fp32 leading
layers"). torch 2.13 has no bf16 CPU matmul with fp32 outputs, so l2v builds one (:mod:`l2v.kernels.build`).
It is as fast as torch's bf16 matmul here and keeps weights at 2 bytes each. Without a compiler or AVX512-BF16,
:func:`kernel_status` says why and callers keep torch's own bf16 path.
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
    nb, k2 = -(-n // BLOCK_N), -(-k // 2)
    if fp32:
        w = torch.zeros(nb * BLOCK_N, k, dtype=torch.float32)
        w[:n] = weight.detach().to("cpu", torch.float32)
        return w.view(nb, BLOCK_N, k).transpose(1, 2).contiguous().view(torch.int32)
    w = torch.zeros(nb * BLOCK_N, k2 * 2, dtype=torch.bfloat16)
    w[:n, :k] = weight.detach().to("cpu", torch.bfloat16)
    return w.view(nb, BLOCK_N, k2, 2).permute(0, 2, 1, 3).contiguous().view(torch.int16)


def is_fp32_packed(packed: torch.Tensor) -> bool:
    return packed.dtype == torch.int32


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
        raise RuntimeError(f"l2v's bf16 CPU kernel is unavailable: {_state['error']}")
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


def _run(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, gated: bool) -> torch.Tensor:
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
    fn = lib.l2v_linear_f32w if is_fp32_packed(packed) else lib.l2v_linear_f32
    return _launch(x, bias, out_features, lambda rows, b, out: fn(
        rows.data_ptr(), rows.stride(0), rows.shape[0], k, packed.data_ptr(), cols, b, out.data_ptr(), out_features,
        ROWS_PER_TASK, torch.get_num_threads(), int(gated)))


@torch.library.custom_op("l2v::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` with x rounded to bf16, fp32 sums, fp32 result (x: fp32 ``[..., K]``).

    With a weight packed by ``pack_weight(w, fp32=True)`` everything is fp32 (no rounding)."""
    return _run(x, packed, bias, out_features, gated=False)


@bf16_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("l2v::bf16_gated", mutates_args=())
def bf16_gated(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` in one pass (weights from :func:`pack_gated`); the gated MLP's input half."""
    return _run(x, packed, None, out_features, gated=True)


@bf16_gated.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


MLP_ROWS_PER_BLOCK = 96  # rows per block of the fused MLP: its bf16 intermediate (96 x 1536 x 2 B) stays in L2


def _mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, intermediate: int,
         out_features: int) -> torch.Tensor:
    lib = _lib()
    k = x.shape[-1]
    fp32 = is_fp32_packed(gate_up)
    if (x.dtype != torch.float32 or x.device.type != "cpu" or is_fp32_packed(down) != fp32
            or not _fits(gate_up, k, 2 * intermediate) or not _fits(down, intermediate, out_features)
            or (bias is not None and bias.numel() != out_features)):
        raise ValueError(f"gated_mlp: packed weights {tuple(gate_up.shape)} / {tuple(down.shape)} do not fit a "
                         f"{x.dtype} input of {tuple(x.shape)} on {x.device}, {intermediate} intermediate and "
                         f"{out_features} outputs.")
    return _launch(x, bias, out_features, lambda rows, b, out: lib.l2v_mlp(
        rows.data_ptr(), rows.stride(0), rows.shape[0], k, gate_up.data_ptr(), intermediate, down.data_ptr(),
        out_features, b, out.data_ptr(), out_features, MLP_ROWS_PER_BLOCK, torch.get_num_threads(), int(fp32)))


@torch.library.custom_op("l2v::gated_mlp", mutates_args=())
def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
              intermediate: int, out_features: int) -> torch.Tensor:
    """``down(silu(x @ gate.T) * (x @ up.T))`` in one kernel call, block of rows by block of rows.

    Why: the ``[rows, intermediate]`` activation never exists as a tensor (4096 rows of the default model: 25 MB
    of fresh pages per layer, whose page faults cost the gated matmul a quarter of its speed); each block's
    intermediate stays in a small scratch buffer. Bit-identical to :func:`bf16_gated` then :func:`bf16_linear`.
    """
    return _mlp(x, gate_up, down, bias, intermediate, out_features)


@gated_mlp.register_fake
def _(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None, intermediate: int,
      out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def pack_gated(gate: torch.Tensor, up: torch.Tensor, fp32: bool = False) -> torch.Tensor:
    """Interleave 32-row slices of gate and up so each 64-row panel holds matching gate and up outputs."""
    i, k = gate.shape
    half = BLOCK_N // 2
    nb = -(-i // half)
    dt = torch.float32 if fp32 else torch.bfloat16
    both = torch.zeros(2, nb * half, k, dtype=dt)  # [gate; up], rows padded to whole slices
    both[0, :i], both[1, :i] = gate.detach().to("cpu", dt), up.detach().to("cpu", dt)
    return pack_weight(both.view(2, nb, half, k).transpose(0, 1).reshape(nb * BLOCK_N, k), fp32=fp32)


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


class Bf16Linear(nn.Module):
    """Drop-in inference replacement for ``nn.Linear`` (or transformers' ``Conv1D``) on fp32 activations.

    The weight lives only in packed bf16 form (or fp32, ``from_module(m, fp32=True)``, for the layers kept in
    fp32); ``state_dict`` still writes (and reads) a plain ``weight`` in the original module's layout, so
    ``save_pretrained`` produces a normal checkpoint. No gradients: it is for inference (training keeps ordinary
    layers).
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, packed: torch.Tensor,
                 conv1d: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.conv1d = in_features, out_features, conv1d
        self.register_buffer("packed", packed, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().cpu(), requires_grad=False)

    @classmethod
    def from_module(cls, module: nn.Module, fp32: bool = False) -> Bf16Linear:
        if isinstance(module, nn.Linear):
            w, conv1d = module.weight, False
        else:  # transformers Conv1D: weight [in, out], y = x @ W + b
            w, conv1d = module.weight.t(), True
        n, k = w.shape
        return cls(k, n, module.bias, pack_weight(w, fp32=fp32), conv1d=conv1d)

    @property
    def fp32(self) -> bool:
        """Whether the weight is kept in fp32 (exact fp32 math) rather than bf16."""
        return is_fp32_packed(self.packed)

    @property
    def weight(self) -> torch.Tensor:
        """The bf16 (or fp32) weight in the original layout (a copy, for inspection and saving)."""
        w = unpack_weight(self.packed, self.out_features, self.in_features)
        return w.t().contiguous() if self.conv1d else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _inference_only(x, "Bf16Linear")
        return bf16_linear(x.float(), self.packed, self.bias, self.out_features)  # the op upcasts a cast bias

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            self.packed = pack_weight(w.t() if self.conv1d else w, fp32=self.fp32)
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights={'fp32' if self.fp32 else 'bf16'}")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def convert_linears(model: nn.Module, keep: Iterable[nn.Module] = ()) -> int:
    """Swap every ``nn.Linear``/``Conv1D`` in ``model`` for :class:`Bf16Linear`, in place; returns how many.

    Linear layers inside the modules in ``keep`` (e.g. the first decoder layers, see :func:`fp32_leading_layers`)
    keep fp32 weights and exact fp32 math on the kernel's fp32 path. The rest of the model should be fp32
    (activations stay fp32 between the kernels).
    """
    kept = {id(m) for k in keep for m in k.modules()}
    return _swap_modules(model, lambda m: isinstance(m, nn.Linear) or _is_conv1d(m),
                         lambda m: Bf16Linear.from_module(m, fp32=id(m) in kept))


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
    """Whether ``model`` runs linear layers on the kernel (``bf16=True``: with bf16 weights)."""
    return any(isinstance(m, (Bf16Linear, GatedMLP)) and not (bf16 and m.fp32) for m in model.modules())


class GatedMLP(nn.Module):
    """A SiLU-gated MLP (``down(silu(gate(x)) * up(x))``: Llama, Mistral, Qwen, ...) on the kernel.

    gate and up run as one kernel call whose epilogue applies SiLU and the product, so the two intermediate
    activations are never written out. ``state_dict`` keeps the original ``gate_proj``/``up_proj``/``down_proj``
    keys.
    """

    def __init__(self, gate_up: torch.Tensor, in_features: int, intermediate: int, down: Bf16Linear) -> None:
        super().__init__()
        self.in_features, self.intermediate = in_features, intermediate
        self.register_buffer("gate_up", gate_up, persistent=False)
        self.down_proj = down

    @property
    def fp32(self) -> bool:
        return is_fp32_packed(self.gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _inference_only(x, "GatedMLP")
        down = self.down_proj
        if not down.conv1d and down.fp32 == self.fp32:  # the whole MLP in one call (the usual case)
            return gated_mlp(x.float(), self.gate_up, down.packed, down.bias, self.intermediate, down.out_features)
        return down(bf16_gated(x.float(), self.gate_up, self.intermediate))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        gate, up = unpack_gated(self.gate_up, self.intermediate, self.in_features)
        destination[prefix + "gate_proj.weight"], destination[prefix + "up_proj.weight"] = gate, up

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        keys = (prefix + "gate_proj.weight", prefix + "up_proj.weight")
        if all(k in state_dict for k in keys):
            self.gate_up = pack_gated(state_dict[keys[0]], state_dict[keys[1]], fp32=self.fp32)
        elif strict:
            missing_keys.extend(k for k in keys if k not in state_dict)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k not in keys}, prefix,
                                      local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, intermediate={self.intermediate}, act=silu, "
                f"weights={'fp32' if self.fp32 else 'bf16'}")


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
                and gate.fp32 == up.fp32
                and gate.in_features == up.in_features == down.out_features)

    def fused(mod: nn.Module) -> GatedMLP | None:
        gate, up = mod.gate_proj, mod.up_proj
        new = GatedMLP(pack_gated(gate.weight, up.weight, fp32=gate.fp32), gate.in_features, gate.out_features,
                       mod.down_proj)
        probe = torch.randn(probe_rows, gate.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = mod(probe), new(probe)
        return new if torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())) else None

    return _swap_modules(model, is_candidate, fused)
