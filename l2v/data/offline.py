"""Locate real text data that ships inside installed packages (no network), with clear messages when absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class DataSourceMissing(FileNotFoundError):
    """An offline data source is not installed; the message says which package provides it."""


def gensim_test_data() -> Path:
    """The ``gensim/test/test_data`` folder of the installed gensim wheel (located without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceMissing(
            "this offline data source needs the 'gensim' wheel, whose test data holds real English text "
            "(a Wikipedia excerpt, pang_lee polarity sentences, 20-newsgroups, SimLex-999). Install it with:\n"
            "    pip install gensim"
        )
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "test" / "test_data"
        if folder.is_dir():
            return folder
    raise DataSourceMissing("gensim is installed without its test/test_data folder; reinstall the gensim wheel.")


def gensim_file(name: str) -> Path:
    path = gensim_test_data() / name
    if not path.exists():
        raise DataSourceMissing(f"{path}: missing from the installed gensim wheel; reinstall gensim.")
    return path
