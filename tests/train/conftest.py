"""Fixtures for the training tests (defined in _train_helpers so helpers and fixtures live together)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import corpus, tiny_dir  # noqa: E402, F401
