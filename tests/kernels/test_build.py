"""Building the C kernels: a clear reason instead of an exception when they cannot be built, nothing half-built."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

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


LOAD = "import torch; from l2v.kernels import kernel_status; print(kernel_status())"


def _load_in_child(cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "L2V_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("L2V_CPU_KERNEL", None)
    return subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not kernel_status()[0], reason="needs the kernel to build here")
def test_truncated_cached_library_is_rebuilt(tmp_path):
    """A cached .so cut short (a crash before it reached the disk, a partial copy) is built again: dlopen of a
    truncated library killed the process with SIGBUS, or failed on every later start."""
    assert _load_in_child(tmp_path).stdout.strip() == "(True, 'ok')"
    (lib,) = (tmp_path / "kernels").glob("*.so")
    whole = lib.read_bytes()
    for cut in (whole[: len(whole) * 4 // 5], b"not an ELF file"):
        lib.write_bytes(cut)
        assert not kbuild._complete_elf(lib)
        proc = _load_in_child(tmp_path)
        assert proc.returncode == 0 and proc.stdout.strip() == "(True, 'ok')", (len(cut), proc.returncode, proc.stderr)
        assert lib.read_bytes() == whole
    assert kbuild._complete_elf(lib) and [p.name for p in (tmp_path / "kernels").iterdir()] == [lib.name]


@pytest.mark.skipif(not kernel_status()[0], reason="needs the kernel to build here")
def test_built_library_is_readable_by_others_sharing_the_cache(monkeypatch, tmp_path):
    """The .so gets the mode a compiler gives its output (0755 under umask 022), not mkstemp's private 0600 (0711
    after linking): another user of a shared L2V_CACHE could not dlopen it and lost the kernel."""
    from l2v.io import _UMASK

    monkeypatch.setenv("L2V_CACHE", str(tmp_path))
    lib = kbuild._build(kbuild._compiler())
    assert stat.S_IMODE(lib.stat().st_mode) == 0o777 & ~_UMASK


def test_cc_with_flags_is_split_and_a_missing_cc_is_reported(monkeypatch, tmp_path):
    """``CC="gcc -O2"`` (a command with flags, as make and setuptools accept) was looked up as one program name and
    silently replaced by ``cc``; a ``CC`` that is not installed was silently replaced too."""
    monkeypatch.setattr(kbuild.shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("gcc", "cc") else None)
    monkeypatch.setenv("CC", "gcc -O2 -march='x86-64-v4'")
    assert kbuild._compiler() == ["gcc", "-O2", "-march=x86-64-v4"]
    monkeypatch.setenv("CC", "clang-42")
    assert kbuild._compiler() == "CC='clang-42': 'clang-42' is not on PATH"
    monkeypatch.setenv("CC", "gcc 'unterminated")
    assert "not a valid command" in kbuild._compiler()
    monkeypatch.delenv("CC")
    assert kbuild._compiler() == ["cc"]


@pytest.mark.skipif(not kernel_status()[0], reason="needs the kernel to build here")
def test_cc_with_flags_builds(monkeypatch, tmp_path):
    """The split command really compiles (the flags reach the compiler and key the cache)."""
    monkeypatch.setenv("L2V_CACHE", str(tmp_path))
    cc = kbuild._compiler()
    plain = kbuild._build(cc)
    flagged = kbuild._build([*cc, "-DL2V_TEST_FLAG=1"])
    assert plain != flagged and kbuild._complete_elf(flagged)
