"""Training: one loop (``loop.train``) shared by MNTP, SimCSE and supervised contrastive objectives."""

from .config import MNTPConfig, SimCSEConfig, TrainConfig
from .loop import Objective, TrainingError, read_metrics, train

__all__ = ["MNTPConfig", "Objective", "SimCSEConfig", "TrainConfig", "TrainingError", "read_metrics", "train",
           "train_mntp", "train_simcse"]


def train_mntp(cfg: MNTPConfig, texts=None, **kwargs):
    """MNTP with LoRA; see :mod:`l2v.train.mntp`."""
    from .mntp import train_mntp as _run

    return _run(cfg, texts, **kwargs)


def train_simcse(cfg: SimCSEConfig, texts=None, **kwargs):
    """Unsupervised SimCSE; see :mod:`l2v.train.simcse`."""
    from .simcse import train_simcse as _run

    return _run(cfg, texts, **kwargs)
