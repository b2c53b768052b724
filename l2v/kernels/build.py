"""Building and loading l2v's C kernels (``gemm_bf16.c``, ``attention.c``, ``rotary.c``) as one shared library.

Why a build step at all: torch 2.13 has no bf16 CPU matmul with fp32 outputs and no attention suited to hundreds
of short packed texts, so l2v compiles a few small C files once, with the system C compiler, into the l2v cache
directory (keyed by a hash of sources, flags and compiler). Without a compiler or AVX512-BF16,
:func:`kernel_status` says why and callers keep torch's own paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

_SOURCES = [Path(__file__).with_name(name) for name in ("gemm_bf16.c", "attention.c", "rotary.c")]
_HEADERS = [Path(__file__).with_name("simd_exp.h")]  # included by the sources: part of the build key
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp", "-fPIC", "-shared",
          "-ffp-contract=off"]  # products rounded before sums, exactly as torch's separate ops (rotary.c)
_lock = threading.Lock()
_state: dict[str, Any] = {"lib": None, "error": None, "tried": False}


def switched_off(variable: str) -> bool:
    """Whether the environment turns an l2v runtime feature off (``L2V_CPU_KERNEL=0``, ``L2V_MALLOC_TUNE=off``...)."""
    return os.environ.get(variable, "1").lower() in ("0", "false", "no", "off")


def cpu_has_avx512_bf16() -> bool:
    """The kernels' instruction set (vdpbf16ps, and vpdpwssd from AVX512-VNNI, which every AVX512-BF16 CPU has;
    the attention needs only AVX-512F); AMX CPUs have it too."""
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags and "avx512_vnni" in flags
    except OSError:
        return False


def _compiler() -> list[str] | str:
    """The compiler command (``$CC`` split like a shell would, so ``CC="gcc -march=native"`` works), or why none.

    An explicit ``$CC`` that is not on PATH is reported, not silently replaced by another compiler.
    """
    env = os.environ.get("CC", "").strip()
    if env:
        try:
            cmd = shlex.split(env)
        except ValueError as exc:
            return f"CC={env!r} is not a valid command ({exc})"
        return cmd if shutil.which(cmd[0]) else f"CC={env!r}: {cmd[0]!r} is not on PATH"
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return "no C compiler found (install gcc, or set CC)"


def _complete_elf(path: Path) -> bool:
    """Whether ``path`` is a whole 64-bit ELF file: every segment and the section table lie inside it.

    Why: a truncated library (a crash or a full disk before the data reached the disk, a partial copy of the cache)
    can pass ``dlopen``'s header checks and then kill the process with SIGBUS when its missing pages are touched.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            size = os.fstat(fh.fileno()).st_size
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # ELF64, little-endian
                return False
            phoff, shoff = struct.unpack_from("<QQ", head, 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
            if phnum == 0 or phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
                return False
            fh.seek(phoff)
            table = fh.read(phnum * phentsize)
    except OSError:
        return False
    for i in range(phnum):
        offset, filesz = (struct.unpack_from("<Q", table, i * phentsize + at)[0] for at in (8, 32))
        if offset + filesz > size:
            return False
    return True


def _build(cc: list[str], force: bool = False) -> Path:
    """Compile the C sources into the cache once per sources/flags/compiler (atomic rename: safe in parallel).

    A cached library that is not a whole ELF file (or, ``force``, one that failed to load) is built again.
    """
    from ..checkpoints import cache_dir
    from ..io import make_publishable

    blob = b"".join(src.read_bytes() for src in (*_SOURCES, *_HEADERS)) + " ".join([*cc, *_FLAGS]).encode()
    target = cache_dir() / "kernels" / f"l2v_kernels-{hashlib.sha256(blob).hexdigest()[:16]}.so"
    if not force and target.is_file() and _complete_elf(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"l2v: building its CPU kernels once ({' '.join(cc)}, a few seconds) -> {target}", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *_FLAGS, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc[0]} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        with open(tmp, "rb") as fh:  # on disk before it is published: never a truncated library under the name
            os.fsync(fh.fileno())
        if not _complete_elf(Path(tmp)):
            raise RuntimeError(f"{cc[0]} wrote an incomplete library")
        make_publishable(tmp, executable=True)  # mkstemp's 0600 (0711 linked): others sharing the cache could not load it
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The loaded library, or None (then :func:`kernel_status` says why); built on first use."""
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        _state["tried"] = True
        if switched_off("L2V_CPU_KERNEL"):
            _state["error"] = "switched off by L2V_CPU_KERNEL=0"
        elif not cpu_has_avx512_bf16():
            _state["error"] = "this CPU has no AVX512-BF16 and AVX512-VNNI"
        elif isinstance(cc := _compiler(), str):
            _state["error"] = cc
        else:
            try:
                # torch is imported first, so the kernel's libgomp.so.1 resolves to torch's own OpenMP runtime.
                try:
                    lib = ctypes.CDLL(str(_build(cc)))
                except OSError:  # a cached library that does not load (corrupt, foreign): build it afresh once
                    lib = ctypes.CDLL(str(_build(cc, force=True)))
                p, i64 = ctypes.c_void_p, ctypes.c_int64
                for fn in (lib.l2v_linear_f32, lib.l2v_linear_f32w):
                    fn.restype = ctypes.c_int
                    fn.argtypes = [p, i64, i64, i64, p, i64, p, p, i64, i64, ctypes.c_int, ctypes.c_int]
                lib.l2v_mlp.restype = ctypes.c_int
                lib.l2v_linear_i16.restype = ctypes.c_int
                lib.l2v_linear_i16.argtypes = [p, i64, i64, i64, p, p, i64, p, p, i64, i64, ctypes.c_int, ctypes.c_int]
                lib.l2v_mlp.argtypes = [p, i64, i64, i64, p, i64, p, i64, p, p, i64, i64, ctypes.c_int, ctypes.c_int,
                                        p, p]
                att = lib.l2v_varlen_attention
                att.restype = ctypes.c_int
                att.argtypes = [p, i64, i64, p, i64, i64, p, i64, i64, p, i64, i64, i64, p, p, i64, ctypes.c_float,
                                ctypes.c_int, ctypes.c_int]
                rot = lib.l2v_rotary
                rot.restype = None
                rot.argtypes = [p, i64, i64, i64, i64, i64, i64, i64, p, p, i64, p, ctypes.c_int]
                _state["lib"] = lib
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:  # Attribute: no symbol
                _state["error"] = f"building the kernel failed: {exc}"
        return _state["lib"]


def kernel_status() -> tuple[bool, str]:
    """``(available, reason)``; builds the kernel on first call when the CPU and a compiler allow it."""
    lib = load()
    return lib is not None, ("ok" if lib is not None else str(_state["error"]))
