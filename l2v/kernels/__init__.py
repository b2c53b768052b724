"""Native CPU kernels l2v builds itself (see :mod:`l2v.kernels.linear`)."""

from .linear import Bf16Linear, bf16_linear, convert_linears, kernel_status, uses_kernel

__all__ = ["Bf16Linear", "bf16_linear", "convert_linears", "kernel_status", "uses_kernel"]
