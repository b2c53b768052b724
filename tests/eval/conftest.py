"""Fast stand-ins for the evaluation tests: a deterministic character-trigram 'model' and a tiny l2v Encoder."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class TrigramModel:
    """Hashed character-trigram counts: texts sharing trigrams get similar vectors. Counts encode calls."""

    name = "trigram"
    dim = 64

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, list[str]]] = []

    def encode(self, texts, instruction=None, batch_size=32, show_progress_bar=None, **_):
        texts = list(texts)
        self.calls.append((instruction, texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            s = f"  {t.lower()} "
            for j in range(len(s) - 2):
                h = int(hashlib.md5(s[j:j + 3].encode()).hexdigest()[:8], 16)
                out[i, h % self.dim] += 1.0
        return out


@pytest.fixture
def trigram():
    return TrigramModel()


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    from tiny import save_tiny

    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny("llama", path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_encoder_dir):
    from l2v import Encoder

    return Encoder.from_pretrained(tiny_encoder_dir, dtype="float32", device="cpu")
