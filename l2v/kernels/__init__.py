"""Native CPU kernels l2v builds itself (see :mod:`l2v.kernels.linear`)."""

from .build import kernel_status
from .linear import (
    FORMATS,
    Bf16Linear,
    GatedMLP,
    bf16_gated,
    bf16_linear,
    convert_linears,
    decoder_layers,
    fp32_leading_layers,
    fuse_gated_mlps,
    gated_mlp,
    uses_kernel,
)

__all__ = ["FORMATS", "Bf16Linear", "GatedMLP", "bf16_gated", "bf16_linear", "convert_linears", "decoder_layers",
           "fp32_leading_layers", "fuse_gated_mlps", "gated_mlp", "kernel_status", "uses_kernel"]
