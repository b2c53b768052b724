"""glibc allocator thresholds for CPU encoding: reuse activation memory instead of faulting in fresh pages.

Why: every packed batch allocates a few dozen activation tensors of 3-25 MB. With glibc's default (dynamic)
thresholds, memory freed at the top of the heap beyond twice the largest recent block goes back to the kernel,
so the next layer's tensors land on fresh pages: ~200,000 page faults per 512-sentence encode on the default
model, taken inside the matmul kernels' parallel regions (both threads wait on them). Fixed thresholds keep up to
:data:`TRIM_THRESHOLD` of freed memory in the heap and serve blocks up to :data:`MMAP_THRESHOLD` from it:
0 faults, the gated matmul from 276 to 380 GFLOP/s in situ (benchmarks/RESULTS.md, "page faults").

The cost: after an encode the process keeps its peak working set (≈ +0.5 GB on the default model) instead of
returning it to the system. This is a process-wide setting; ``L2V_MALLOC_TUNE=0`` leaves the allocator alone.
Only glibc has ``mallopt``; elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from .build import switched_off

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # blocks above this (weights, huge batches) still get their own mapping, freed on free()
TRIM_THRESHOLD = 1 << 30  # free memory the heap may keep at its top before returning it

_lock = threading.Lock()
_state: dict[str, object] = {"done": False, "active": False, "reason": "not tried"}


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl and macOS do not)
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Set the thresholds once per process (idempotent, thread-safe); returns whether they are in effect."""
    with _lock:
        if not _state["done"]:
            _state["done"] = True
            if switched_off("L2V_MALLOC_TUNE"):
                _state["reason"] = "switched off by L2V_MALLOC_TUNE=0"
            elif (libc := _glibc()) is None:
                _state["reason"] = "not glibc (no mallopt)"
            elif libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
                _state["active"], _state["reason"] = True, "ok"
            else:
                _state["reason"] = "mallopt refused the thresholds"
        return bool(_state["active"])


def malloc_status() -> tuple[bool, str]:
    """``(tuned, reason)`` without changing anything."""
    return bool(_state["active"]), str(_state["reason"])


def describe() -> str:
    """What loading an encoder on CPU does (or did) to the allocator, for ``l2v info``."""
    settings = f"mmap {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 30} GiB"
    if _state["active"]:
        return f"glibc thresholds set ({settings})"
    if _state["done"]:
        return f"left alone ({_state['reason']})"
    if switched_off("L2V_MALLOC_TUNE"):
        return "left alone (L2V_MALLOC_TUNE=0)"
    if _glibc() is None:
        return "left alone (not glibc)"
    return f"glibc thresholds set when an encoder loads on CPU ({settings}; L2V_MALLOC_TUNE=0: off)"
