"""Corpus-scale encoding: stream a large jsonl/txt file into sharded embeddings, resumable, split over workers.

Layout of OUTDIR::

    corpus.json              settings of the job and the input's size + SHA-256 (a resumed or extra worker must use
                             the same settings on the same contents)
    shard-000000.ids.jsonl   the ids of the shard's rows, one JSON value per line
    shard-000000.npy         (rows, dim) embeddings, float32 or float16, in the same order
    ...
    index.json               written once every shard exists: rows, dim, the shard list
    runs.jsonl               one line per run of each worker: rows encoded, rows/s, bad lines skipped

Row ``r`` (the r-th non-blank, valid input line) belongs to shard ``r // shard_size``; worker ``w`` of ``W``
encodes the shards ``k`` with ``k % W == w``. A shard is written to temporary files and renamed into place, ids
first and the ``.npy`` last, so a shard whose ``.npy`` exists is complete: after a crash or kill, running the same
command again skips finished shards, redoes the one in flight, and never duplicates a row. Each shard is encoded
in the same blocks on every run, so a resumed output is identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_file, check_output_dir, iter_lines

MANIFEST = "corpus.json"
INDEX = "index.json"
RUN_LOG = "runs.jsonl"
FORMAT = 1
INPUT_KEYS = ("input_bytes", "input_sha256")  # the input's contents (input: its path, compared with the settings)


class CorpusError(ValueError):
    """Bad corpus input or an OUTDIR written with other settings; the message names file and line."""


@dataclass
class CorpusJob:
    input: str
    outdir: str
    field: str = "text"                 # jsonl: the text field
    id_field: str | None = "id"         # jsonl: the id field (missing -> the line number)
    instruction: str | None = None
    shard_size: int = 10_000
    batch_size: int = 32
    normalize: bool = False
    out_dtype: str = "float32"          # or float16
    worker: int = 0
    num_workers: int = 1
    max_shards: int | None = None       # stop after encoding this many shards in this run (time-boxed jobs)
    skip_bad_lines: bool = False
    model_info: dict[str, Any] = dc_field(default_factory=dict)

    def check(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}.")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}.")
        if self.num_workers < 1 or not 0 <= self.worker < self.num_workers:
            raise ValueError(f"--worker {self.worker} must be in [0, --num-workers={self.num_workers})." if
                             self.num_workers >= 1 else f"--num-workers must be >= 1, got {self.num_workers}.")
        if self.out_dtype not in ("float32", "float16"):
            raise ValueError(f"--out-dtype must be float32 or float16, got {self.out_dtype!r}.")
        if not Path(self.input).is_file():
            raise FileNotFoundError(f"{self.input}: no such input file.")
        with open(self.input, "rb") as fh:  # stops at the first text: cheap on any corpus
            if not any(line.strip() for line in fh):  # was: an 'all shards done' index of 0 rows, exit 0
                raise ValueError(f"{self.input}: no texts (the file is empty or has only blank lines).")
        check_output_dir(self.outdir, "OUTDIR")

    def settings(self, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
        """What determines the output (a resume must match it); workers and limits may differ between runs.

        ``fingerprint``: the input's :func:`input_fingerprint` when already known (:func:`scan_input`), else the
        file is read for it."""
        keep = ("field", "id_field", "instruction", "shard_size", "batch_size", "normalize", "out_dtype",
                "skip_bad_lines", "model_info")
        return {"format": FORMAT, "input": str(Path(self.input).resolve()),
                **(fingerprint or input_fingerprint(self.input)),
                **{k: v for k, v in asdict(self).items() if k in keep}}


def input_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size and SHA-256 of the whole input, so a resume never mixes shards of an edited or replaced file with new ones.

    Hashing only the head and tail would miss an edit in the middle, and the mtime changes on a copy or restore,
    refusing a good resume. :func:`scan_input` gets it in the same read as the line count.
    """
    return scan_input(path)[0]


SCAN_CHUNK = 1 << 20


def scan_input(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The input's :func:`input_fingerprint` and its number of non-blank lines, in one streamed read of the file.

    The count is that of :func:`iter_rows`' non-blank lines (split at \\n, \\r\\n and \\r; blank: only ASCII
    whitespace), an upper bound on rows used for the progress bar and the resume message only. About 0.2 s per
    100 MB, hashing included (hardware SHA-256). With the parsing pass that is two reads of the input per run (was
    three: hash and count read it apart), which on a corpus larger than the page cache is the disk's time each.
    """
    digest = hashlib.sha256()
    size = lines = 0
    tail = b""  # the unfinished last line of the chunks so far, as b"x" (non-blank) or b"" (blank or none)
    with open(path, "rb") as fh:
        while chunk := fh.read(SCAN_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            parts = (tail + chunk).splitlines()  # a \r\n cut between chunks adds an empty line, not counted
            tail = b""
            if chunk[-1:] not in (b"\n", b"\r"):
                last = parts.pop()
                tail = b"x" if last and not last.isspace() else b""
            lines += len(parts) - parts.count(b"") - sum(map(bytes.isspace, parts))
    return {"input_bytes": size, "input_sha256": digest.hexdigest()}, lines + len(tail)


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def is_jsonl_path(path: Path) -> bool:
    """Whether ``path`` is read as jsonl objects (else as one text per line)."""
    return path.suffix in (".jsonl", ".ndjson")


def iter_rows(path: str | os.PathLike, field: str = "text", id_field: str | None = "id",
              skip_bad_lines: bool = False, skipped: list[str] | None = None) -> Iterator[tuple[Any, str]]:
    """Yield ``(id, text)`` for each non-blank line: jsonl objects (``field``, ``id_field``) or plain text lines.

    A row's id is its ``id_field`` value when given (string or integer), else its 1-based line number.
    """
    path = Path(path)
    is_jsonl = is_jsonl_path(path)
    for lineno, text in iter_lines(path, CorpusError):
        if not text.strip():
            continue
        if not is_jsonl:
            yield lineno, text
            continue
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}.")
            value = rec.get(field)
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{lineno}: expected a string field {field!r}"
                                  + (f", got {type(value).__name__}." if field in rec else
                                     f"; keys present: {sorted(rec)[:8]} (choose one with --field)."))
            rid = rec.get(id_field, lineno) if id_field else lineno
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise CorpusError(f"{path}:{lineno}: id field {id_field!r} must be a string or integer, "
                                  f"got {type(rid).__name__}.")
        except json.JSONDecodeError as exc:
            err = CorpusError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}).")
            if not skip_bad_lines:
                raise err from exc
            if skipped is not None:
                skipped.append(str(err))
            continue
        except CorpusError as err:
            if not skip_bad_lines:
                raise
            if skipped is not None:
                skipped.append(str(err))
            continue
        yield rid, value


def _atomic_write_bytes(path: Path, write) -> None:
    with atomic_file(path, "wb", fsync=True) as fh:
        write(fh)


def shard_done(outdir: Path, k: int) -> bool:
    return (outdir / f"{shard_name(k)}.npy").is_file() and (outdir / f"{shard_name(k)}.ids.jsonl").is_file()


def write_shard(outdir: Path, k: int, ids: list[Any], vecs: np.ndarray) -> None:
    name = shard_name(k)
    _atomic_write_bytes(outdir / f"{name}.ids.jsonl",
                        lambda fh: fh.write("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids).encode()))
    _atomic_write_bytes(outdir / f"{name}.npy", lambda fh: np.save(fh, vecs))  # last: marks the shard complete


def _stderr_log(msg: str) -> None:
    print(f"l2v encode-corpus: {msg}", file=sys.stderr, flush=True)


def prepare_outdir(job: CorpusJob, log: Callable[[str], None] = _stderr_log,
                   fingerprint: dict[str, Any] | None = None) -> Path:
    """Create OUTDIR with its manifest, or check that an existing one was written with the same settings from the
    same input contents.

    A manifest from before input checksums (no ``input_sha256``) is accepted when the size matches, with a
    warning: its shards cannot be checked against the file, and refusing would strand every unfinished OUTDIR.
    The checksum is added then, so later resumes are checked. ``fingerprint``: the input's, when already read.
    """
    out = Path(job.outdir)
    out.mkdir(parents=True, exist_ok=True)
    settings = job.settings(fingerprint)
    manifest = out / MANIFEST
    if not manifest.is_file():
        _atomic_write_bytes(manifest, lambda fh: fh.write((json.dumps(settings, indent=2) + "\n").encode()))
        return out
    try:
        old = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{manifest}: not valid JSON ({exc.msg}); delete OUTDIR to start over.") from exc
    legacy = "input_sha256" not in old
    # With a checksum the path only names the contents: a moved corpus, or another mount of it on another node,
    # resumes when it is read the same way (its suffix picks jsonl or text) and the checksum matches below.
    moved = (not legacy and isinstance(old.get("input"), str) and old["input"] != settings["input"]
             and is_jsonl_path(Path(old["input"])) == is_jsonl_path(Path(settings["input"])))
    diff = [k for k in sorted(set(old) | set(settings))
            if k not in INPUT_KEYS and old.get(k) != settings.get(k) and not (k == "input" and moved)]
    if diff:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {settings.get(k)!r}" for k in diff[:4])
        raise CorpusError(f"{out}: holds an encoding made with other settings ({detail}). Resume with the "
                          "same settings, or use a new OUTDIR.")
    changed = [k for k in INPUT_KEYS if k in old and old[k] != settings[k]]
    if changed:
        what = (f"size was {old['input_bytes']} bytes, now {settings['input_bytes']}" if "input_bytes" in changed
                else f"same size, other contents: sha256 was {old['input_sha256'][:12]}..., "
                     f"now {settings['input_sha256'][:12]}...")
        done = len(list(out.glob("shard-*.npy")))
        raise CorpusError(f"{job.input}: changed since {out} was started ({what}). Its {done} finished shard(s) "
                          "hold rows of the old contents, and resuming would mix them with the new ones: "
                          "restore the original file to resume, or encode this one into a new OUTDIR (or delete "
                          f"{out}).")
    if moved:
        log(f"{job.input}: the same contents (SHA-256) as {old['input']}, which {out} was started from: resuming.")
    if legacy:
        log(f"warning: {manifest} (written by an older l2v) has no checksum of the input, so l2v cannot check "
            f"that {job.input} is unchanged since its shards were encoded (the size matches). Recording the "
            "checksum now; if the file was edited in between, use a new OUTDIR.")
        upgraded = {**old, **{k: settings[k] for k in INPUT_KEYS}}
        _atomic_write_bytes(manifest, lambda fh: fh.write((json.dumps(upgraded, indent=2) + "\n").encode()))
    return out


def _write_index(out: Path, rows: int, n_shards: int, shard_size: int) -> bool:
    """Write index.json when every shard exists (any worker may be the last to finish). True when written."""
    if not all(shard_done(out, k) for k in range(n_shards)):
        return False
    dim = 0
    if n_shards:
        dim = int(np.load(out / f"{shard_name(0)}.npy", mmap_mode="r").shape[1])
    shards = [{"npy": f"{shard_name(k)}.npy", "ids": f"{shard_name(k)}.ids.jsonl",
               "rows": min(shard_size, rows - k * shard_size)} for k in range(n_shards)]
    index = {"rows": rows, "dim": dim, "shards": shards}
    _atomic_write_bytes(out / INDEX, lambda fh: fh.write((json.dumps(index, indent=1) + "\n").encode()))
    return True


def describe_encoder(encoder, adapter: str | None = None) -> dict[str, Any]:
    """What identifies the encoder in ``corpus.json`` (a resume with another model is refused)."""
    return {"model": encoder.name, "base_model": encoder.base_model, "adapter": adapter,
            "pooling": encoder.pooling, "max_length": encoder.max_length, "bidirectional": encoder.bidirectional,
            "dtype": str(encoder.dtype).removeprefix("torch.")}


def encode_corpus(encoder, job: CorpusJob, progress: bool = True, log=None) -> dict[str, Any]:
    """Encode this worker's pending shards of ``job.input`` into ``job.outdir``; returns a summary dict."""
    from tqdm.auto import tqdm

    if not job.model_info:
        job.model_info = describe_encoder(encoder)

    log = log or _stderr_log
    job.check()
    fingerprint, approx_rows = scan_input(job.input)  # the one read before parsing: checksum and line count
    out = prepare_outdir(job, log, fingerprint)
    W, w, S = job.num_workers, job.worker, job.shard_size
    approx_shards = math.ceil(approx_rows / S)
    mine = [k for k in range(approx_shards) if k % W == w]
    # Temporary files a killed run of this worker left (atomic_file names them ".shard-NNNNNN.npy.XXXXXXXX");
    # another worker's are in flight and stay.
    for stale in out.glob(".shard-*"):
        try:
            if int(stale.name.removeprefix(".shard-").split(".")[0]) % W == w:
                stale.unlink(missing_ok=True)
        except ValueError:
            pass
    already = [k for k in mine if shard_done(out, k)]
    pending_rows = sum(min(S, approx_rows - k * S) for k in mine if k not in already)
    if already:
        log(f"resuming: {len(already)} of this worker's {len(mine)} shards already done, skipped.")
    dtype = np.float16 if job.out_dtype == "float16" else np.float32
    block = job.batch_size * 16
    skipped: list[str] = []
    encoded_shards = encoded_rows = 0
    stopped = False
    t0 = time.perf_counter()

    def flush(k: int, ids: list[Any], texts: list[str], bar) -> None:
        parts = []
        for s in range(0, len(texts), block):
            chunk = texts[s:s + block]
            parts.append(np.asarray(encoder.encode(chunk, instruction=job.instruction, batch_size=job.batch_size,
                                                   normalize=job.normalize, show_progress_bar=False), dtype=dtype))
            bar.update(len(chunk))
        write_shard(out, k, ids, np.concatenate(parts) if parts else np.zeros((0, encoder.dim), dtype))

    rows = 0
    ids: list[Any] = []
    texts: list[str] = []
    current, current_done = -1, False
    with tqdm(total=pending_rows, desc=f"encode-corpus[{w}/{W}]", unit="row",
              disable=not progress, dynamic_ncols=True) as bar:
        for rid, text in iter_rows(job.input, job.field, job.id_field, job.skip_bad_lines, skipped):
            k = rows // S
            rows += 1
            if k % W != w:
                continue
            if k != current:  # entering one of this worker's shards
                current, current_done = k, shard_done(out, k)
                if not current_done and job.max_shards is not None and encoded_shards >= job.max_shards:
                    stopped = True
                    break
            if current_done:
                continue
            ids.append(rid)
            texts.append(text)
            if len(texts) == S:
                flush(k, ids, texts, bar)
                encoded_shards += 1
                encoded_rows += len(texts)
                ids, texts = [], []
        if texts and not stopped:  # the last, short shard
            flush(current, ids, texts, bar)
            encoded_shards += 1
            encoded_rows += len(texts)
    elapsed = time.perf_counter() - t0
    n_shards = math.ceil(rows / S)
    complete = False if stopped else _write_index(out, rows, n_shards, S)
    summary = {"rows_total": rows if not stopped else None, "shards_encoded": encoded_shards,
               "rows_encoded": encoded_rows, "skipped_lines": len(skipped), "seconds": round(elapsed, 3),
               "rows_per_s": round(encoded_rows / elapsed, 2) if elapsed > 0 else None,
               "complete": complete, "stopped_early": stopped, "outdir": str(out)}
    with open(out / RUN_LOG, "a", encoding="utf-8") as fh:  # one line per run of each worker (O_APPEND)
        fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "worker": w,
                             "num_workers": W, **summary}) + "\n")
    if skipped:
        log(f"skipped {len(skipped)} bad line(s) (--skip-bad-lines); first: {skipped[0]}")
    log(f"worker {w}/{W}: encoded {encoded_rows} rows in {encoded_shards} shards "
        f"({summary['rows_per_s']} rows/s)" + ("; all shards done, wrote index.json" if complete else
                                               "; stopped at --max-shards" if stopped else ""))
    return summary


def load_corpus_embeddings(outdir: str | os.PathLike) -> tuple[list[Any], np.ndarray]:
    """All ids and embeddings of a finished OUTDIR, in input order (checks that no row is missing or repeated)."""
    out = Path(outdir)
    if not (out / INDEX).is_file():
        raise CorpusError(f"{out}: no {INDEX}; the encoding is unfinished (run encode-corpus again to resume).")
    index = json.loads((out / INDEX).read_text(encoding="utf-8"))
    ids: list[Any] = []
    vecs = []
    for s in index["shards"]:
        # One JSON value per "\n"-ended line: str.splitlines() would also split inside an id at U+2028/U+2029/U+0085,
        # which json.dumps(ensure_ascii=False) leaves unescaped.
        text = (out / s["ids"]).read_text(encoding="utf-8")
        shard_ids = [json.loads(line) for line in text.split("\n")[:-1 if text.endswith("\n") else None]]
        v = np.load(out / s["npy"])
        if len(shard_ids) != len(v) or len(v) != s["rows"]:
            raise CorpusError(f"{out / s['npy']}: {len(v)} vectors, {len(shard_ids)} ids, index says {s['rows']}.")
        ids.extend(shard_ids)
        vecs.append(v)
    if len(ids) != index["rows"]:
        raise CorpusError(f"{out}: {len(ids)} rows in shards, index says {index['rows']}.")
    return ids, (np.concatenate(vecs) if vecs else np.zeros((0, index["dim"]), np.float32))
