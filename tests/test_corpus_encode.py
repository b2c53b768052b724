"""encode-corpus: shards with ids, resume after a kill equals an uninterrupted run, workers share the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import save_tiny

from l2v.corpus_encode import CorpusError, CorpusJob, encode_corpus, load_corpus_embeddings
from l2v.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
N, SHARD = 120, 8
SHARDS = N // SHARD  # 15


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    model = save_tiny("llama", d / "tiny")
    corpus = d / "c.jsonl"
    words = "the quick brown fox jumps over lazy dog cats and dogs are pets".split()
    with open(corpus, "w", encoding="utf-8") as fh:
        for i in range(N):
            fh.write(json.dumps({"id": f"doc{i}", "text": " ".join(words[(i * 7 + j) % len(words)]
                                                                   for j in range(3 + i % 11))}) + "\n")
            if i % 50 == 0:
                fh.write("\n")  # blank lines are not rows
    enc = Encoder.from_pretrained(model, dtype="float32", device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add contention
    yield d, model, corpus, enc
    torch.set_num_threads(threads)


def _job(corpus, out, **kw):
    kw.setdefault("shard_size", SHARD)
    kw.setdefault("batch_size", 4)
    return CorpusJob(input=str(corpus), outdir=str(out), **kw)


def test_kill_and_resume_equals_uninterrupted(setup):
    d, model, corpus, enc = setup
    ref = d / "ref"
    summary = encode_corpus(enc, _job(corpus, ref), progress=False)
    assert summary["complete"] and summary["rows_total"] == N
    ref_ids, ref_vecs = load_corpus_embeddings(ref)
    assert ref_ids == [f"doc{i}" for i in range(N)] and ref_vecs.shape == (N, 32)

    # a real process, killed (SIGKILL) as soon as its first shard is on disk
    out = d / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "L2V_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "l2v", "encode-corpus", str(corpus), str(out), "-m", model, "--dtype", "float32",
           "--device", "cpu", "--shard-size", str(SHARD), "--batch-size", "1", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(out.glob("shard-*.npy")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (out / "index.json").exists()
    done_before = len(list(out.glob("shard-*.npy")))
    assert 1 <= done_before < SHARDS

    # resume with the same settings (but batch size 1 was part of the job: reuse it)
    summary = encode_corpus(enc, _job(corpus, out, batch_size=1), progress=False)
    assert summary["complete"] and summary["shards_encoded"] == SHARDS - done_before
    ids, vecs = load_corpus_embeddings(out)
    assert ids == ref_ids and len(set(ids)) == N
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5, rtol=1e-5)
    assert not list(out.glob(".shard-*"))  # the killed run's temporary files are gone


def test_deterministic_interruption_is_bitwise_identical_and_workers_share(setup):
    d, model, corpus, enc = setup
    ref_ids, ref_vecs = load_corpus_embeddings(d / "ref") if (d / "ref" / "index.json").exists() else (None, None)
    if ref_ids is None:
        encode_corpus(enc, _job(corpus, d / "ref"), progress=False)
        ref_ids, ref_vecs = load_corpus_embeddings(d / "ref")
    out = d / "stopped"
    s1 = encode_corpus(enc, _job(corpus, out, max_shards=3), progress=False)
    assert s1["stopped_early"] and s1["shards_encoded"] == 3 and not s1["complete"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
    # two workers finish the job, each taking its share (k % 2 == w); finished shards are not redone
    s_w0 = encode_corpus(enc, _job(corpus, out, worker=0, num_workers=2), progress=False)
    s_w1 = encode_corpus(enc, _job(corpus, out, worker=1, num_workers=2), progress=False)
    assert s_w0["shards_encoded"] + s_w1["shards_encoded"] == SHARDS - 3
    assert not s_w0["complete"] and s_w1["complete"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy") if p.name in mtimes} == mtimes
    ids, vecs = load_corpus_embeddings(out)
    assert ids == ref_ids
    assert np.array_equal(vecs, ref_vecs)
    # running again does nothing
    assert encode_corpus(enc, _job(corpus, out), progress=False)["shards_encoded"] == 0
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["shards_encoded"] for r in runs] == [3, s_w0["shards_encoded"], s_w1["shards_encoded"], 0]
    assert all(r["rows_encoded"] == 0 or r["rows_per_s"] > 0 for r in runs)


def test_settings_mismatch_and_bad_input(setup, tmp_path):
    d, model, corpus, enc = setup
    out = tmp_path / "o"
    encode_corpus(enc, _job(corpus, out, max_shards=1), progress=False)
    with pytest.raises(CorpusError, match="other settings.*shard_size: was 8, now 5"):
        encode_corpus(enc, _job(corpus, out, shard_size=5), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n{broken\n{"body": "x"}\n{"text": "fine", "id": 7}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: expected a string field 'text'"):
        encode_corpus(enc, _job(bad, tmp_path / "b1"), progress=False)
    s = encode_corpus(enc, _job(bad, tmp_path / "b2", skip_bad_lines=True), progress=False)
    assert s["skipped_lines"] == 3 and s["rows_total"] == 2
    ids, vecs = load_corpus_embeddings(tmp_path / "b2")
    assert ids == [1, 7] and vecs.shape == (2, 32)
    txt = tmp_path / "t.txt"
    txt.write_text("first line\n\nthird line\n")
    encode_corpus(enc, _job(txt, tmp_path / "t", out_dtype="float16", normalize=True), progress=False)
    ids, vecs = load_corpus_embeddings(tmp_path / "t")
    assert ids == [1, 3] and vecs.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(vecs.astype(np.float32), axis=1), 1, atol=2e-3)
    with pytest.raises(ValueError, match="--worker 2"):
        encode_corpus(enc, _job(txt, tmp_path / "w", worker=2, num_workers=2), progress=False)
    with pytest.raises(FileNotFoundError, match="no such input"):
        encode_corpus(enc, _job(tmp_path / "nope.txt", tmp_path / "n"), progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")  # was: 'all shards done', an index of 0 rows, exit 0
    with pytest.raises(ValueError, match=r"blank\.txt: no texts"):
        encode_corpus(enc, _job(blank, tmp_path / "e"), progress=False)
    assert not (tmp_path / "e").exists()


def test_resume_removes_this_workers_stale_temp_files(setup, tmp_path):
    """A kill leaves ``.shard-NNNNNN.npy.XXXXXXXX`` (atomic_file's temp name; one shard each, possibly GBs): the
    worker's next run deletes its own and keeps another worker's, which may be in flight."""
    d, model, corpus, enc = setup
    out = tmp_path / "o"
    out.mkdir()
    mine, theirs = out / ".shard-000002.npy.k1ll3d_x", out / ".shard-000001.ids.jsonl.abc123"
    mine.write_bytes(b"\x93NUMPY partial")
    theirs.write_bytes(b"in flight")
    encode_corpus(enc, _job(corpus, out, worker=0, num_workers=2, max_shards=1), progress=False)
    assert not mine.exists() and theirs.exists()


def test_ids_with_unicode_line_separators_load_back(setup, tmp_path):
    """Ids are stored unescaped (ensure_ascii=False); U+2028, U+2029 and U+0085 inside one must not split its line
    when the shards are loaded (a finished OUTDIR failed with "3 vectors, 6 ids")."""
    d, model, corpus, enc = setup
    src = tmp_path / "odd.jsonl"
    ids = ["a\u2028b", "c\x85d", "e\u2029"]
    src.write_text("".join(json.dumps({"id": i, "text": f"text {n}"}) + "\n" for n, i in enumerate(ids)),
                   encoding="utf-8")
    encode_corpus(enc, _job(src, tmp_path / "o"), progress=False)
    got, vecs = load_corpus_embeddings(tmp_path / "o")
    assert got == ids and vecs.shape == (3, 32)


def test_byte_order_mark_is_not_part_of_the_first_row(setup, tmp_path):
    """Windows editors save UTF-8 with a BOM: line 1 must still parse as JSON and embed like the plain text."""
    d, model, corpus, enc = setup
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "hello world"}\n{"id": "b", "text": "bye"}\n')
    encode_corpus(enc, _job(src, tmp_path / "o"), progress=False)
    ids, vecs = load_corpus_embeddings(tmp_path / "o")
    assert ids == ["a", "b"]
    np.testing.assert_allclose(vecs[0], enc.encode(["hello world"])[0], atol=1e-5)


def test_resume_refuses_an_edited_input_file(setup, tmp_path):
    """Shards of the old contents must not be mixed with rows of an edited or replaced file, even one of the same
    size and path (the manifest used to record only the path and the byte count); restoring it resumes."""
    d, model, corpus, enc = setup
    src = tmp_path / "c.jsonl"
    original = corpus.read_bytes()
    src.write_bytes(original)
    out = tmp_path / "o"
    encode_corpus(enc, _job(src, out, max_shards=2), progress=False)
    edited = original.replace(b'"doc60"', b'"doc6x"', 1)
    assert edited != original and len(edited) == len(original)
    src.write_bytes(edited)
    with pytest.raises(CorpusError, match=r"c\.jsonl: changed since .* was started \(same size, other contents: "
                                          r"sha256 was .*2 finished shard.*restore the original file.*new OUTDIR"):
        encode_corpus(enc, _job(src, out), progress=False)
    src.write_bytes(original + b'{"id": "extra", "text": "one more"}\n')
    with pytest.raises(CorpusError, match=rf"size was {len(original)} bytes, now {len(original) + 36}"):
        encode_corpus(enc, _job(src, out), progress=False)
    src.write_bytes(original)  # restored (a new mtime): the same contents resume
    assert encode_corpus(enc, _job(src, out), progress=False)["complete"]
    ids, _ = load_corpus_embeddings(out)
    assert ids == [f"doc{i}" for i in range(N)]


def test_resume_of_an_outdir_without_input_checksum_warns_and_records_it(setup, tmp_path):
    """An OUTDIR started by an older l2v (no input_sha256 in corpus.json) still resumes when the size matches,
    with a warning; the checksum is recorded then, so later resumes are checked."""
    d, model, corpus, enc = setup
    src = tmp_path / "c.jsonl"
    src.write_bytes(corpus.read_bytes())
    out = tmp_path / "o"
    encode_corpus(enc, _job(src, out, max_shards=1), progress=False)
    manifest = json.loads((out / "corpus.json").read_text())
    manifest.pop("input_sha256", None)
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    notes: list[str] = []
    s = encode_corpus(enc, _job(src, out, max_shards=1), progress=False, log=notes.append)
    assert s["shards_encoded"] == 1
    assert any("no checksum of the input" in n and "cannot check" in n for n in notes), notes
    assert "input_sha256" in json.loads((out / "corpus.json").read_text())
    notes.clear()
    encode_corpus(enc, _job(src, out, max_shards=1), progress=False, log=notes.append)
    assert not any("checksum" in n for n in notes)
    src.write_bytes(corpus.read_bytes().replace(b'"doc60"', b'"doc6x"', 1))
    with pytest.raises(CorpusError, match="changed since"):
        encode_corpus(enc, _job(src, out), progress=False)


def test_scan_input_counts_and_hashes_like_separate_reads(monkeypatch, tmp_path):
    """The one-read scan gives the SHA-256 of the bytes and iter_rows' non-blank lines, whatever the chunking cuts
    (inside a line, between \\r and \\n, inside a run of blank lines)."""
    import hashlib

    from l2v import corpus_encode
    from l2v.io import iter_lines

    src = tmp_path / "t.txt"
    data = (b"one\r\ntwo\rthree\n\n  \t\n\r\n\x0c\nfour  \n" + b"y" * 40 + b"\n \n\r\rlast")
    for body in (data, data + b"\n", data + b"\n  ", b"", b"\n\n", b"x", b" \r\n"):
        src.write_bytes(body)
        want = sum(1 for _, line in iter_lines(src) if line.strip())
        for chunk in (1, 2, 3, 7, 1 << 20):
            monkeypatch.setattr(corpus_encode, "SCAN_CHUNK", chunk)
            fp, lines = corpus_encode.scan_input(src)
            assert lines == want, (body, chunk)
            assert fp == {"input_bytes": len(body), "input_sha256": hashlib.sha256(body).hexdigest()}


def test_a_run_reads_its_input_twice(setup, tmp_path, monkeypatch):
    """A multi-GB corpus costs a disk read per pass: one for the checksum and line count, one for the rows (the
    hash and the count each read the whole file apart, three passes). A resume reads it as often."""
    import builtins
    import io

    d, model, corpus, enc = setup
    src = tmp_path / "c.jsonl"
    src.write_bytes(corpus.read_bytes() * 40)  # ~200 kB: buffered reads of a few kB are small next to it
    size = src.stat().st_size
    read = [0]

    class Counting(io.RawIOBase):
        def __init__(self, path):
            self.f = io.FileIO(path, "r")

        def readable(self):
            return True

        def readinto(self, b):
            n = self.f.readinto(b)
            read[0] += n or 0
            return n

        def close(self):
            self.f.close()
            super().close()

    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kw):
        if isinstance(file, (str, os.PathLike)) and Path(file) == src and "r" in mode:
            buf = io.BufferedReader(Counting(file))
            return buf if "b" in mode else io.TextIOWrapper(buf, **{k: kw[k] for k in ("encoding", "newline")
                                                                     if k in kw})
        return real_open(file, mode, *args, **kw)

    class Stub:  # the passes, not the model, are under test
        dim = 4

        def encode(self, texts, **kw):
            return np.zeros((len(texts), 4), np.float32)

    monkeypatch.setattr(builtins, "open", counting_open)
    for run in ("fresh", "resume"):
        read[0] = 0
        summary = encode_corpus(Stub(), _job(src, tmp_path / "o", shard_size=500, model_info={"model": "stub"}),
                                progress=False)
        assert summary["rows_total"] == N * 40 and summary["complete"]
        assert 2 * size <= read[0] < 2 * size + 64 * 1024, (run, read[0] / size)


def test_a_moved_input_with_the_same_contents_resumes(setup, tmp_path):
    """The manifest's checksum proves the contents, so a corpus moved (or mounted elsewhere on another node) after
    an interruption resumes; it was refused ("input: was ..., now ...") and the finished shards were stranded. A
    rename that changes how it is read (.jsonl -> .txt) is still refused."""
    d, model, corpus, enc = setup
    first, moved = tmp_path / "a" / "c.jsonl", tmp_path / "b" / "c.jsonl"
    first.parent.mkdir()
    first.write_bytes(corpus.read_bytes())
    out = tmp_path / "o"
    assert encode_corpus(enc, _job(first, out, max_shards=2), progress=False)["shards_encoded"] == 2
    moved.parent.mkdir()
    first.rename(moved)
    notes: list[str] = []
    s = encode_corpus(enc, _job(moved, out), progress=False, log=notes.append)
    assert s["complete"] and s["shards_encoded"] == SHARDS - 2
    assert any("same contents" in n for n in notes), notes
    ids, _ = load_corpus_embeddings(out)
    assert ids == [f"doc{i}" for i in range(N)]
    as_text = tmp_path / "b" / "c.txt"
    moved.rename(as_text)
    with pytest.raises(CorpusError, match="other settings.*input: was"):
        encode_corpus(enc, _job(as_text, out), progress=False)
