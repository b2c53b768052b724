"""Supervised contrastive training (LLM2Vec step 4): query (with instruction), positive, hard negative.

Loss: InfoNCE on cosine similarity x ``scale`` (20, i.e. temperature 0.05). Query i's candidates are every
positive and every hard negative of the *global* batch (in-batch negatives, gathered across ranks when
distributed); its own positive is the target.

Distributed: every rank builds the same global batch, embeds its own slice, gathers all embeddings (its own rows
keep their autograd graph) and computes the same global loss; summing parameter gradients over ranks then gives
exactly the single-process full-batch gradient (see :mod:`l2v.train.distributed`).

Memory: with ``chunk_size`` set, embeddings are computed with GradCache (:mod:`l2v.train.gradcache`): the
contrastive batch can be far larger than what fits through the model at once, with the same gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.pairs import PairExample
from . import distributed as D
from .gradcache import gradcache_backward, plain_backward


def info_nce(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None,
             neg_mask: torch.Tensor | None = None, scale: float = 20.0) -> torch.Tensor:
    """Mean cross-entropy of ``scale * cos(q_i, [pos; neg])`` with target ``pos_i``.

    ``neg``: (B, d) hard negatives (row j is example j's); ``neg_mask``: (B,) bool, False where an example has none.
    """
    if q.shape[0] != pos.shape[0]:
        raise ValueError(f"{q.shape[0]} queries but {pos.shape[0]} positives.")
    qn = F.normalize(q.float(), dim=-1)
    docs = pos.float()
    if neg is not None and neg.shape[0]:
        docs = torch.cat([docs, neg.float()])
    logits = scale * qn @ F.normalize(docs, dim=-1).T
    if neg is not None and neg.shape[0] and neg_mask is not None and not bool(neg_mask.all()):
        col_ok = torch.cat([torch.ones(pos.shape[0], dtype=torch.bool, device=logits.device),
                            neg_mask.to(logits.device)])
        logits = logits.masked_fill(~col_ok, float("-inf"))
    labels = torch.arange(q.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


@dataclass
class SupervisedConfig:
    scale: float = 20.0               # cosine similarity scale (1 / temperature)
    chunk_size: int | None = None     # GradCache chunk (texts per forward); None = plain full-batch step
    gather: bool = True               # gather embeddings across ranks (every rank sees all in-batch negatives)


class SupervisedObjective:
    """Computes the loss of one *global* batch of :class:`PairExample` and accumulates this rank's gradients.

    ``encoder``: an :class:`l2v.encoder.Encoder` (its ``model`` may be a PEFT model). ``step`` does not touch the
    optimizer; call :func:`l2v.train.distributed.all_reduce_gradients` (sum) after it when distributed, unless the
    caller's loop already synchronises (then use ``grad_sync="mean"`` semantics, see ``loss_multiplier``).
    """

    def __init__(self, encoder, config: SupervisedConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config or SupervisedConfig()

    # Every rank holds d(global loss)/d(own rows): summing over ranks is the full gradient. A loop whose
    # synchronisation averages (DDP) must multiply the loss by the world size; this says by how much.
    @property
    def loss_multiplier(self) -> int:
        return D.current().world_size if self.config.gather else 1

    def tokenize(self, examples: Sequence[PairExample]):
        enc = self.encoder
        qs = [enc.tokenize_one(e.query, e.query_instruction) for e in examples]
        ps = [enc.tokenize_one(e.positive, e.doc_instruction) for e in examples]
        ns = [enc.tokenize_one(e.negative, e.doc_instruction) for e in examples if e.negative is not None]
        return qs, ps, ns

    def _embed(self, items):
        return self.encoder.forward(self.encoder.collate(items))

    def step(self, global_batch: Sequence[PairExample], loss_scale: float = 1.0) -> float:
        """Forward + backward for this rank's share of ``global_batch``; returns the global loss (same on all ranks).

        Gradients are *accumulated* into ``.grad`` (scaled by ``loss_scale``); zeroing and syncing is the caller's.
        """
        info = D.current() if self.config.gather else D.DistInfo()
        local = D.shard_rows(global_batch, info)
        has_neg_global = torch.tensor([e.negative is not None for e in global_batch])
        any_neg = bool(has_neg_global.any())
        local_has_neg = [e.negative is not None for e in local]
        qs, ps, ns = self.tokenize(local)
        dev, dim = self.encoder.device, self.encoder.dim
        scale = self.config.scale

        def loss_fn(q, p, n):
            if any_neg:  # place this rank's negatives in their rows (zeros where an example has none)
                full = n
                if len(ns) != len(local):
                    idx = torch.tensor([i for i, h in enumerate(local_has_neg) if h], dtype=torch.long,
                                       device=n.device)
                    full = torch.zeros((len(local), n.shape[1]), dtype=n.dtype, device=n.device).index_copy(0, idx, n)
                neg = D.gather_with_grad(full) if self.config.gather else full
            else:
                neg = None
            if self.config.gather:
                q, p = D.gather_with_grad(q), D.gather_with_grad(p)
            loss = info_nce(q, p, neg, has_neg_global if any_neg else None, scale=scale)
            return loss * loss_scale

        groups = [qs, ps, ns]
        if self.config.chunk_size:
            loss = gradcache_backward(self._embed, groups, loss_fn, self.config.chunk_size, dev, dim)
        else:
            loss = plain_backward(self._embed, groups, loss_fn, dev, dim)
        return float(loss) / loss_scale


def evaluate_pairs(encoder, examples: Sequence[PairExample], batch_size: int = 32, scale: float = 20.0) -> dict:
    """Held-out metrics without gradients: InfoNCE loss and top-1 accuracy of the positive among the batch."""
    if not examples:
        return {}
    q = torch.as_tensor(encoder.encode([(e.query_instruction or "", e.query) for e in examples],
                                       batch_size=batch_size))
    p = torch.as_tensor(encoder.encode([(e.doc_instruction or "", e.positive) for e in examples],
                                       batch_size=batch_size))
    sims = F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T
    labels = torch.arange(len(examples))
    return {"loss": float(F.cross_entropy(scale * sims, labels)),
            "top1": float((sims.argmax(1) == labels).float().mean())}
