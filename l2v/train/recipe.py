"""The unsupervised LLM2Vec recipe end to end: bidirectional -> MNTP -> SimCSE -> a saved encoder directory.

Used by ``make demo`` and the quality experiment (``benchmarks/train_quality.py``); sized by :class:`Recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MNTPConfig, SimCSEConfig


@dataclass
class Recipe:
    model: str | None = None
    data: str = "builtin"
    output_dir: str = "runs/recipe"
    seed: int = 42
    mntp_steps: int = 40
    mntp_batch_size: int = 8
    mntp_max_length: int = 64
    mntp_lr: float = 2e-4
    simcse_steps: int = 40
    simcse_batch_size: int = 16
    simcse_max_length: int = 32
    simcse_lr: float = 1e-4
    warmup_steps: int = 4
    max_texts: int | None = 4000
    val_size: int = 32
    dtype: str = "auto"
    device: str | None = None
    threads: int | None = None
    progress: bool = True

    def mntp_config(self) -> MNTPConfig:
        return MNTPConfig(model=self.model, data=self.data, output_dir=str(Path(self.output_dir) / "mntp"),
                          seed=self.seed, steps=self.mntp_steps, batch_size=self.mntp_batch_size,
                          max_length=self.mntp_max_length, lr=self.mntp_lr, warmup_steps=self.warmup_steps,
                          max_texts=self.max_texts, val_size=self.val_size, dtype=self.dtype, device=self.device,
                          threads=self.threads, progress=self.progress)

    def simcse_config(self, start: str) -> SimCSEConfig:
        return SimCSEConfig(model=start, data=self.data, output_dir=str(Path(self.output_dir) / "simcse"),
                            seed=self.seed, steps=self.simcse_steps, batch_size=self.simcse_batch_size,
                            max_length=self.simcse_max_length, lr=self.simcse_lr, warmup_steps=self.warmup_steps,
                            max_texts=self.max_texts, val_size=self.val_size, dtype=self.dtype,
                            device=self.device, threads=self.threads, progress=self.progress)


def run_recipe(recipe: Recipe, skip_mntp: bool = False) -> dict[str, Any]:
    """Train MNTP then SimCSE (from the merged MNTP adapter); returns both summaries and the output paths.

    Existing finished stages in ``output_dir`` are retrained from scratch (their checkpoints are removed).
    """
    import shutil

    from .loop import train
    from .mntp import MNTPObjective
    from .simcse import SimCSEObjective

    out: dict[str, Any] = {}
    start = recipe.model
    if not skip_mntp:
        mcfg = recipe.mntp_config()
        shutil.rmtree(mcfg.output_dir, ignore_errors=True)
        out["mntp"] = train(mcfg, MNTPObjective())
        out["mntp_dir"] = mcfg.output_dir
        start = mcfg.output_dir
    scfg = recipe.simcse_config(start if start is not None else "smollm2-135m")
    shutil.rmtree(scfg.output_dir, ignore_errors=True)
    out["simcse"] = train(scfg, SimCSEObjective())
    out["simcse_dir"] = scfg.output_dir
    return out
