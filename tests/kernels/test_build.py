"""Building the C kernels: a clear reason instead of an exception when they cannot be built, nothing half-built."""

from __future__ import annotations

import pytest
import torch

import l2v.kernels.build as kbuild
from l2v.kernels import bf16_linear, kernel_status
from l2v.kernels.attention import supports
from l2v.kernels.linear import pack_weight


def test_unavailable_kernel_reports_why(monkeypatch, tmp_path):
    """A failing compiler or the off switch: kernel_status says why instead of raising."""
    saved = dict(kbuild._state)
    try:
        for env, expect in (({"L2V_CPU_KERNEL": "0"}, "L2V_CPU_KERNEL"), ({"CC": "false"}, "failed")):
            kbuild._state.update(lib=None, error=None, tried=False)
            monkeypatch.setenv("L2V_CACHE", str(tmp_path))
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            monkeypatch.setattr(kbuild, "cpu_has_avx512_bf16", lambda: True)
            ok, reason = kernel_status()
            assert not ok and expect in reason, reason
            with pytest.raises(RuntimeError, match="unavailable"):
                bf16_linear(torch.randn(2, 4), pack_weight(torch.randn(3, 4)), None, 3)
            qkv = torch.randn(1, 2, 5, 16)
            assert not supports(qkv, qkv, qkv)  # the attention kernel steps aside: torch's SDPA runs instead
            monkeypatch.delenv("L2V_CPU_KERNEL", raising=False)
        assert not any(p.suffix == ".so" for p in tmp_path.rglob("*"))  # nothing half-built left behind
    finally:
        kbuild._state.clear()
        kbuild._state.update(saved)
