"""``l2v export`` / ``l2v.export.export``: merged standalone safetensors that reload without peft; and
``encode(dimensions=k)`` (Matryoshka-style truncation)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import save_tiny
from transformers import AutoModel

from l2v import Encoder
from l2v.cli import main
from l2v.export import export

TEXTS = ["The quick brown fox jumps.", "a", "Machine learning models turn text into vectors, many of them."]


@pytest.fixture(scope="module")
def with_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = save_tiny("llama", root / "base")
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModel.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    return base, str(root / "adapter")


def test_export_merges_and_reloads_without_peft(with_adapter, tmp_path):
    base, adapter = with_adapter
    enc = Encoder.from_pretrained(base, adapter=adapter, pooling="weighted_mean", dtype="float32", device="cpu")
    out = export(enc, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "l2v_config.json" in names and "tokenizer.json" in names
    assert not any(n.startswith("adapter_") or n.endswith((".bin", ".pt")) for n in names)
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling"} <= names
    cfg = json.loads((out / "l2v_config.json").read_text())
    assert cfg["pooling"] == "weighted_mean" and cfg["bidirectional"] is True
    expected = enc.encode(TEXTS)
    # The adapter mattered, so the merged weights are really different from the base.
    base_enc = Encoder.from_pretrained(base, pooling="weighted_mean", dtype="float32", device="cpu")
    assert np.abs(base_enc.encode(TEXTS) - expected).max() > 1e-3
    # Reload with peft made unimportable (any `import peft` raises ImportError).
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "peft", None)
        again = Encoder.from_pretrained(str(out), dtype="float32", device="cpu")
        assert again.pooling == "weighted_mean" and again.bidirectional
        np.testing.assert_allclose(again.encode(TEXTS), expected, atol=1e-5)


def test_export_refuses_non_empty_dir(with_adapter, tmp_path):
    base, _ = with_adapter
    enc = Encoder.from_pretrained(base, dtype="float32", device="cpu")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(enc, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    export(enc, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left behind


def test_export_into_the_current_directory_is_refused_intact(with_adapter, tmp_path, monkeypatch):
    """``l2v export MODEL . --overwrite``: the temporary sibling was created inside "." and deleted with the old
    contents, then the rename failed (EINVAL): everything in the directory was lost. Now refused, nothing touched."""
    base, _ = with_adapter
    enc = Encoder.from_pretrained(base, dtype="float32", device="cpu")
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    for cwd, target in ((here, "."), (here / "sub", "..")):
        monkeypatch.chdir(cwd)
        with pytest.raises(ValueError, match="current directory"):
            export(enc, target, overwrite=True)
        assert (here / "notes.txt").read_text() == "mine" and (here / "sub").is_dir()
        assert sorted(p.name for p in here.iterdir()) == ["notes.txt", "sub"]
    assert [p.name for p in tmp_path.iterdir()] == ["here"]  # no temporary dirs left behind
    export(enc, "out")  # a relative subdirectory is fine
    assert (here / "sub" / "out" / "model.safetensors").is_file()


def test_overwrite_survives_a_failing_delete_of_the_old_export(with_adapter, tmp_path, monkeypatch):
    """Deleting the old directory can fail part way (a file held open on NFS: EBUSY). The old export was deleted in
    place, so it was left half gone and the new one was discarded; now it is renamed aside first."""
    import shutil

    from l2v import io

    base, _ = with_adapter
    enc = Encoder.from_pretrained(base, dtype="float32", device="cpu")
    out = export(enc, tmp_path / "out")
    real_rmtree = shutil.rmtree

    def busy_rmtree(path, ignore_errors=False, **kw):  # deletes one file, then fails as NFS does
        victim = Path(path) / "model.safetensors"
        if victim.exists():
            victim.unlink()
            if not ignore_errors:
                raise OSError(16, "Device or resource busy", str(path))
            return
        real_rmtree(path, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(io.shutil, "rmtree", busy_rmtree)
    export(enc, out, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_allclose(Encoder.from_pretrained(str(out), dtype="float32", device="cpu").encode(TEXTS),
                               enc.encode(TEXTS), atol=1e-5)


def test_cli_export(with_adapter, tmp_path, capsys):
    base, adapter = with_adapter
    assert main(["export", base, str(tmp_path / "cli"), "--adapter", adapter, "--max-length", "40"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "cli"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cli" / "model.safetensors"), "pt") as fh:  # full precision by default
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}
    enc = Encoder.from_pretrained(str(tmp_path / "cli"), device="cpu", dtype="float32")
    assert enc.max_length == 40
    ref = Encoder.from_pretrained(base, adapter=adapter, dtype="float32", device="cpu")
    np.testing.assert_allclose(enc.encode(TEXTS), ref.encode(TEXTS), atol=1e-5)
    assert main(["export", base, str(tmp_path / "cli")]) == 2  # exists: one-line error, exit code 2
    assert "not empty" in capsys.readouterr().err
    # --fp32-layers has nothing to choose in an export (plain layers): accepted, not an error
    assert main(["export", base, str(tmp_path / "cli16"), "--dtype", "bfloat16", "--fp32-layers", "1"]) == 0


def test_cli_export_with_a_model_but_no_outdir_is_refused(with_adapter, tmp_path, capsys, monkeypatch):
    """One argument is OUTDIR: `l2v export smollm2-135m` wrote the default model into ./smollm2-135m, and
    `l2v export runs/x` said 'runs/x exists and is not empty'."""
    base, _ = with_adapter
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("l2v.commands.serve.load_from_args", lambda args: pytest.fail("model loaded"))
    for name in ("smollm2-135m", base):
        assert main(["export", name]) == 2
        assert "no output directory was given: l2v export MODEL OUTDIR" in capsys.readouterr().err
    assert not (tmp_path / "smollm2-135m").exists()


def test_encode_dimensions(with_adapter):
    base, _ = with_adapter
    enc = Encoder.from_pretrained(base, dtype="float32", device="cpu")
    full = enc.encode(TEXTS)
    for k in (1, 8, 31):
        raw = enc.encode(TEXTS, dimensions=k)
        np.testing.assert_allclose(raw, full[:, :k], atol=1e-6)
        unit = enc.encode(TEXTS, dimensions=k, normalize=True)
        assert unit.shape == (3, k)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(unit, full[:, :k] / np.linalg.norm(full[:, :k], axis=1, keepdims=True), atol=1e-5)
    assert enc.encode(TEXTS, dimensions=32).shape == (3, 32)
    one = enc.encode("a", dimensions=4, normalize=True, convert_to="torch")
    assert one.shape == (4,) and abs(float(one.norm()) - 1) < 1e-5
    for bad in (0, 33, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="dimensions"):
            enc.encode(TEXTS, dimensions=bad)
