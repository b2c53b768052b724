"""glibc allocator thresholds: activation memory is reused across batches instead of faulting in fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from l2v.kernels import malloc

SCRIPT = """
import resource, torch
from l2v.kernels.malloc import malloc_status, tune_malloc
tuned = tune_malloc()
def batch():  # 20 MB activations alive at once, then freed: what one layer of a packed batch does. Four of them
    # free 80 MB at the heap top, above any trim threshold glibc adapts to by itself (at most 2 x 32 MiB)
    xs = [torch.empty(5 << 20).fill_(1.0) for _ in range(4)]
    del xs
for _ in range(3):
    batch()
f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    batch()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f, malloc_status()[1])
"""


def _run(env_value: str | None) -> tuple[bool, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "L2V_MALLOC_TUNE"}
    if env_value is not None:
        env["L2V_MALLOC_TUNE"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split(maxsplit=2)
    return out[0] == "True", int(out[1]), out[2].strip()


@pytest.mark.skipif(malloc._glibc() is None, reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_activations_instead_of_faulting():
    on, on_faults, on_reason = _run(None)
    assert on and on_reason == "ok"
    if on_faults >= 1000:  # once, on a machine busy with other jobs, one 20 MB block faulted anew: ask twice
        on_faults = min(on_faults, _run(None)[1])
    assert on_faults < 1000, on_faults  # the 80 MB of each batch come back from the heap, not fresh pages
    off, off_faults, off_reason = _run("0")
    assert not off and off_reason == "switched off by L2V_MALLOC_TUNE=0"
    # glibc's own behaviour depends on where small allocations land (about half the runs here fault 80k times,
    # the rest not at all); when it faults, the tuning is what prevents it
    if off_faults >= 5000:
        assert on_faults < off_faults / 20, (on_faults, off_faults)


def test_tune_is_once_per_process_and_reports_why(monkeypatch):
    monkeypatch.setattr(malloc, "_state", {"done": False, "active": False, "reason": "not tried"})
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.tune_malloc() is False and malloc.malloc_status() == (False, "not glibc (no mallopt)")
    monkeypatch.setattr(malloc, "_glibc", lambda: pytest.fail("tried twice"))
    assert malloc.tune_malloc() is False  # decided once



def test_describe_says_what_loading_does(monkeypatch):
    monkeypatch.setattr(malloc, "_state", {"done": False, "active": False, "reason": "not tried"})
    monkeypatch.setenv("L2V_MALLOC_TUNE", "0")
    assert malloc.describe() == "left alone (L2V_MALLOC_TUNE=0)"
    monkeypatch.delenv("L2V_MALLOC_TUNE")
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.describe() == "left alone (not glibc)"
    monkeypatch.setattr(malloc, "_state", {"done": True, "active": True, "reason": "ok"})
    assert malloc.describe() == "glibc thresholds set (mmap 32 MiB, trim 1 GiB)"
