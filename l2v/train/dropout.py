"""Fast dropout for CPU training.

``torch.nn.Dropout`` draws its mask with ``bernoulli_``, which on CPU generates one random number per element
through a scalar path: on a SimCSE step (LoRA dropout on 7 projections x 30 layers) it took a quarter of the
step. Here the mask comes from 64-bit random words split into four 16-bit lanes (one vectorised comparison),
so p is honoured to 1/65536. On CPU the words come from numpy's SFC64 generator (3x faster than torch's
Mersenne Twister here), seeded by one draw from torch's generator per call, so ``torch.manual_seed`` and the
checkpointed torch RNG state still make runs reproducible and resumable. Same semantics as ``nn.Dropout``
otherwise (inverted scaling, identity in eval mode, an independent mask per call). Only swapped in on CPU:
CUDA's own dropout is already fast.

The mask is drawn inside a custom operator (``l2v::dropout_keep``) so ``torch.compile`` keeps it as one opaque
call instead of breaking the graph at numpy or falling back to inductor's per-element generator (on the default
model's SimCSE step that generator made the compiled step slower than the eager one; benchmarks/RESULTS.md). The operator carries a per-module salt so that compilation never merges two dropouts
applied to the same input (q, k and v LoRA branches each get their own mask, as in eager mode).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

_LANES = 4  # int16 lanes per int64 random word
_SPAN = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask, True with probability ``1 - p`` (p quantised to 1/65536), independent per element."""
    n = math.prod(shape)
    words = (n + _LANES - 1) // _LANES
    if torch.device(device).type == "cpu":
        seed = int(torch.randint(0, (1 << 63) - 1, (), generator=generator))
        raw = torch.from_numpy(np.random.SFC64(seed).random_raw(words).view(np.int16))
    else:
        raw = torch.randint(-(1 << 63), (1 << 63) - 1, (words,), dtype=torch.int64, device=device,
                            generator=generator).view(torch.int16)
    lanes = raw[:n].view(shape)
    # int16 lanes are uniform on [-32768, 32767]: P(lane < t) = (t + 32768) / 65536 = p
    return lanes >= round(p * _SPAN) - _SPAN // 2


@torch.library.custom_op("l2v::dropout_keep", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def dropout_keep(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    """Boolean keep mask shaped like ``x`` (x's values are not read). ``salt`` only keeps calls distinct."""
    return keep_mask(x.shape, p, x.device)


@dropout_keep.register_fake
def _dropout_keep_fake(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.bool)  # contiguous, like keep_mask


_salts = itertools.count()


class FastDropout(nn.Module):
    """Drop-in ``nn.Dropout`` whose mask is cheap to draw on CPU."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.salt = next(_salts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # The mask stays boolean (no float copy of it); torch.compile fuses the scale and the select into one pass.
        # Eagerly, call the generator directly (the operator's dispatch costs ~0.2 ms a call, 210 calls a step).
        if torch.compiler.is_compiling():
            keep = dropout_keep(x, self.p, self.salt)
        else:
            keep = keep_mask(x.shape, self.p, x.device)
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` inside ``model`` (e.g. peft's ``lora_dropout``) for :class:`FastDropout`.

    Returns how many were replaced. Attention dropout inside SDPA kernels is not a module and is untouched.
    """
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout and child.p > 0]
    for parent, name, child in swaps:
        fast = FastDropout(child.p)
        fast.train(child.training)
        setattr(parent, name, fast)
    return len(swaps)
