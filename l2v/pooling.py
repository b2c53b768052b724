"""Pool token states into one vector per text, vectorised over the batch.

Every function takes ``hidden`` (batch, seq, dim), ``pool_mask`` (batch, seq; True on the text's own tokens,
i.e. instruction and padding excluded) and ``attention_mask`` (batch, seq; True on every real token). Padding
may be on either side: positions are found from the masks, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

POOLING_MODES = ("mean", "weighted_mean", "last_token", "eos", "bos")


def _summable(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` in a dtype whose sums over a text cannot overflow: fp16 (max 65504) is summed in fp32.

    In fp16 the weights of a weighted mean alone overflow from 362 pooled tokens (362 * 363 / 2 > 65504), and a
    plain mean of 512 states near 128 does too: the vector came out NaN/inf. bf16 and fp32 have fp32's range.
    """
    return hidden.float() if hidden.dtype == torch.float16 else hidden


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the text's token states."""
    hidden = _summable(hidden)
    m = pool_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def weighted_mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position-weighted mean (SGPT): the k-th pooled token has weight k, favouring tokens that saw more text."""
    hidden = _summable(hidden)
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
