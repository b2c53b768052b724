"""Crash-safe file output and line-numbered text input, shared by every module that reads or writes files.

Writers build the result beside the target and publish it with one ``os.replace``, so a killed or disk-full
run never leaves a half-written file where a good one stood. Readers report ``file:line`` for bad input.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def make_publishable(path: str | os.PathLike, executable: bool = False) -> None:
    """Give a temporary file (``executable``: a directory or a shared library) the mode a plain ``open``/``mkdir``
    would (mkstemp/mkdtemp make them private, 0600/0700: an exported model, an output file or a cached kernel
    would be unreadable to anyone else on a shared machine)."""
    os.chmod(path, (0o777 if executable else 0o666) & ~_UMASK)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", fsync: bool = False) -> Iterator[IO]:
    """Yield a file open on a temporary sibling of ``path`` (``mode`` "w" is UTF-8 text, "wb" bytes); on success
    it is renamed over ``path``, on error removed. ``fsync=True`` makes the bytes durable before the rename."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        make_publishable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and a rename."""
    with atomic_file(path) as fh:
        fh.write(text)


def check_replaceable_dir(target: str | os.PathLike) -> Path:
    """``target`` made lexically absolute, refusing the working directory or a parent of it.

    :func:`atomic_directory` builds beside the target: for "." (or "..") the sibling would be made *inside* it and
    deleted with it, and replacing the working directory as a whole would leave this process in a deleted one.
    """
    target = Path(os.path.abspath(target))
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"{target}: is the current directory or contains it; it is replaced as a whole (built "
                         "beside it, then renamed over it), so write to a new subdirectory instead.")
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target``, on error it is removed.

    ``fsync=True`` flushes every file to disk before the rename publishes them (checkpoints).
    """
    target = check_replaceable_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        make_publishable(tmp, executable=True)
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
        # The old directory is renamed aside, not deleted in place: deleting can fail part way (files held open on
        # NFS, permissions), which used to leave the old directory half deleted and discard the new one.
        old = None
        if target.is_symlink() or target.exists():
            if target.is_symlink() or not target.is_dir():
                raise NotADirectoryError(f"{target}: is a file or a symbolic link, not a directory to replace.")
            old = tmp.with_name(tmp.name + ".old")
            os.rename(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a directory to write into: an error naming ``option`` if a file (or the parent is one).

    Checked before any model loads; ``mkdir`` would otherwise fail later with a bare "[Errno 17] File exists".
    """
    p = Path(path)
    for part in (p, *p.parents):
        if part.exists() and not part.is_dir():
            raise NotADirectoryError(f"{option} {path}: {part} is a file, not a directory.")
    return p


def iter_lines(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` (1-based, line ending removed), streaming.

    A line that is not UTF-8 raises ``error("path:N: not UTF-8 text ...")`` instead of a codec traceback. A leading
    byte-order mark (files saved by Windows editors) is dropped: it would otherwise break line 1's JSON or become
    part of the first text.
    """
    with open(path, encoding="utf-8-sig", newline="") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as exc:
                raise error(f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason}).") from exc
            if not line:
                return
            lineno += 1
            yield lineno, line.rstrip("\r\n")


def split_lines(text: str) -> list[str]:
    """``text``'s lines as :func:`iter_lines` reads them: split at \\n, \\r\\n and \\r only (``str.splitlines`` also
    splits at U+2028, form feeds ..., which may sit inside a text or a JSON string), leading BOM dropped."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").split("\n")
