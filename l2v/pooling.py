"""Pool token states into one vector per text, vectorised over the batch.

Every function takes ``hidden`` (batch, seq, dim), ``pool_mask`` (batch, seq; True on the text's own tokens,
i.e. instruction and padding excluded) and ``attention_mask`` (batch, seq; True on every real token). Padding
may be on either side: positions are found from the masks, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

POOLING_MODES = ("mean", "weighted_mean", "last_token", "eos", "bos")


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the text's token states."""
    m = pool_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def weighted_mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT): the k-th pooled token has weight k, favouring tokens that saw more text."""
    w = pool_mask.long().cumsum(1) * pool_mask.long()
    w = w.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1)


def last_token_pool(hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the last real token (the EOS token l2v appends), wherever the padding is."""
    seq = attention_mask.shape[1]
    positions = torch.arange(seq, device=hidden.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).amax(1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def bos_pool(hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the first real token (BOS where the tokenizer adds one)."""
    seq = attention_mask.shape[1]
    positions = torch.arange(seq, device=hidden.device).expand_as(attention_mask)
    first = torch.where(attention_mask.bool(), positions, seq).amin(1).clamp_max(seq - 1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


_POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": mean_pool,
    "weighted_mean": weighted_mean_pool,
    "last_token": last_token_pool,
    "eos": last_token_pool,
    "bos": bos_pool,
}


def check_pooling(mode: str) -> str:
    if not isinstance(mode, str) or mode not in _POOLERS:
        raise ValueError(f"pooling={mode!r} is not supported; choose one of {', '.join(POOLING_MODES)}.")
    return mode


def pool(mode: str, hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return _POOLERS[check_pooling(mode)](hidden, pool_mask, attention_mask)
