"""Export an encoder as a standalone directory: merged safetensors weights + tokenizer + ``l2v_config.json``.

The result reloads with ``Encoder.from_pretrained(dir)`` without peft or the original base model, and (with
``sentence_transformers=True``, the default) also with ``SentenceTransformer(dir)``; see :mod:`l2v.st`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .encoder import Encoder
from .io import atomic_directory, check_output_dir, check_replaceable_dir


def check_target(outdir: str | os.PathLike, overwrite: bool, flag: str = "overwrite=True") -> Path:
    """``outdir`` as an export target (a directory, not the working one, new or empty unless ``overwrite``);
    ``l2v export`` calls it before loading the model, naming its ``--overwrite`` as ``flag``."""
    out = check_output_dir(outdir, "OUTDIR")
    check_replaceable_dir(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; choose a new directory or pass {flag}.")
    return out


def export(encoder: Encoder, outdir: str | os.PathLike, sentence_transformers: bool = True,
           overwrite: bool = False, **extra: Any) -> Path:
    """Write ``encoder`` to ``outdir`` atomically (built in a temporary sibling, then renamed into place)."""
    out = check_target(outdir, overwrite)
    with atomic_directory(out) as tmp:
        encoder.save_pretrained(tmp, **extra)
        leftovers = [p.name for p in tmp.iterdir() if p.name.startswith("adapter_")]
        if leftovers:
            raise RuntimeError(f"export left adapter files {leftovers}; the adapter was not merged.")
        if sentence_transformers:
            from .st import write_sentence_transformers_files

            write_sentence_transformers_files(encoder, tmp)
    return out
