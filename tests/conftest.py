"""Shared fixtures: an isolated cache per session and the real default model (slow tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted embedded default model (converted once; reuses the user's cache)."""
    from l2v.checkpoints import default_model_dir as resolve

    return resolve()


@pytest.fixture(scope="session")
def default_encoder(default_model_dir):
    """The embedded default model as a bidirectional bf16 encoder, shared by slow tests (treat as read-only)."""
    from l2v import Encoder

    return Encoder.from_pretrained("smollm2-135m")
