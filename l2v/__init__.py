"""l2v: turn any decoder-only language model into a strong text encoder (the LLM2Vec recipe).

    >>> from l2v import Encoder
    >>> enc = Encoder.from_pretrained()          # embedded default: SmolLM2-135M-Instruct, bidirectional
    >>> vecs = enc.encode(["a sentence", ("Retrieve passages about", "a query")], normalize=True)
"""

from .bidirectional import (
    UnsupportedArchitectureError,
    causal_attention,
    check_bidirectional,
    is_bidirectional,
    make_bidirectional,
    make_causal,
)
from .checkpoints import DEFAULT_MODEL, L2VConfig, ModelNotFoundError
from .encoder import Encoder
from .pooling import POOLING_MODES
from .train import MNTPConfig, SimCSEConfig, train_mntp, train_simcse

__version__ = "0.1.0"


def load_encoder(model: str | None = None, **kwargs) -> Encoder:
    """Shorthand for :meth:`Encoder.from_pretrained`."""
    return Encoder.from_pretrained(model, **kwargs)


__all__ = [
    "DEFAULT_MODEL",
    "Encoder",
    "L2VConfig",
    "MNTPConfig",
    "ModelNotFoundError",
    "POOLING_MODES",
    "SimCSEConfig",
    "UnsupportedArchitectureError",
    "causal_attention",
    "check_bidirectional",
    "is_bidirectional",
    "load_encoder",
    "make_bidirectional",
    "make_causal",
    "train_mntp",
    "train_simcse",
]
