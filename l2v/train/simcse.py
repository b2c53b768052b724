"""Unsupervised SimCSE, LLM2Vec step 3: each sentence is encoded twice with dropout as the only noise (attention
dropout 0.3, LoRA dropout 0.05); the two views of a sentence are positives, every other sentence in the batch a
negative (InfoNCE on cosine similarity x 20). Both views run as one forward pass over the doubled batch: dropout
masks are drawn independently per row, and the larger matmuls run faster than two half-size passes.

As the official ``run_simcse.py`` (train_configs/simcse: simcse_dropout 0.3 as the attention dropout, loss_scale
20, one direction, the MNTP adapter merged before a fresh LoRA r=16/alpha=32/dropout 0.05, lr 3e-5, 128 tokens),
except where noted: mean pooling here is over the text's tokens; upstream's SimCSE texts carry no instruction
separator, so its ``embed_mask`` is empty and its mean runs over the whole left-padded row (BOS and padding
positions included). Upstream's batch is 128 per GPU for 1000 steps without warmup; l2v's defaults (32, 100
steps, 10 warmup) are a short run.

Distributed (``torchrun`` / ``accelerate launch``): ``--batch-size`` is the global batch. Each rank encodes both
views of its own slice of it, all-gathers the views (its own rows keep their graph) and computes InfoNCE over the
*global* batch, so every sentence's negatives are all other sentences of the global batch, as with one process;
gradients are summed over ranks (:mod:`l2v.train.distributed`). Each rank reseeds its dropout for the step from
the shared RNG and its rank (:func:`~l2v.train.distributed.rank_rng`): otherwise all ranks would draw the same
masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.corpus import load_corpus
from ..encoder import Tokenized
from . import distributed as D
from .config import SimCSEConfig
from .loop import Objective, TrainingError
from .lora import build_trainable, save_encoder_dir


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of row i of ``a`` against all rows of ``b`` (target: row i). Returns (loss, accuracy)."""
    sims = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T * scale
    target = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(sims, target), (sims.argmax(-1) == target).float().mean()


class SimCSEObjective(Objective):
    name = "simcse"
    distributed = True
    forward_backward = None  # under a launcher: _forward_backward_sharded (the loop then skips loss())

    def __init__(self, texts: Sequence[str] | None = None) -> None:
        self.texts = list(texts) if texts is not None else None

    def setup(self, cfg: SimCSEConfig, device: torch.device) -> None:
        self.cfg = cfg
        device = self.join_launcher(cfg, device)
        if self.info.distributed:
            self.forward_backward = self._forward_backward_sharded
        self.encoder, _, self.start = build_trainable(
            cfg, lm_head=False, device=device, config_overrides={"attention_dropout": cfg.attention_dropout})
        self.model = self.encoder
        texts = self.texts if self.texts is not None else load_corpus(cfg.data, cfg.text_field, cfg.max_texts)
        items = [self.encoder.tokenize_one(t) for t in texts if t.strip()]
        if not items:
            raise TrainingError(f"{cfg.data}: no non-empty texts.")
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        items = [items[i] for i in perm]
        n_val = min(cfg.val_size, len(items) // 5)
        if n_val < 2:
            n_val = 0
        self.val_examples = items[:n_val]
        self.examples = items[n_val:]

    def collate(self, examples: Sequence[Tokenized], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Both views of the global batch; under a launcher, of this rank's slice of it only."""
        return self._views(D.shard_rows(examples, self.info))

    def _views(self, examples: Sequence[Tokenized]) -> dict[str, torch.Tensor]:
        return self.encoder.collate(list(examples) + list(examples))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        emb = self.encoder(batch)
        a, b = emb.chunk(2)
        loss, acc = info_nce(a, b, self.cfg.scale)
        return loss, {"acc": acc.item()}

    def _forward_backward_sharded(self, batch: dict[str, torch.Tensor],
                                  loss_scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's views -> gathered global views -> the global InfoNCE (same value on every rank); backward
        leaves this rank's share of the global gradient (summed over ranks by :meth:`sync_gradients`)."""
        with D.rank_rng(self.encoder.device):
            a, b = self.encoder(batch).chunk(2)
            loss, acc = info_nce(D.gather_with_grad(a), D.gather_with_grad(b), self.cfg.scale)
            (loss * loss_scale).backward()
        return loss.detach(), {"acc": acc.item()}

    def evaluate(self) -> dict[str, float]:
        """Held-out InfoNCE with dropout on (as in training), under a fixed RNG that leaves training's untouched."""
        bs = self.cfg.batch_size
        total, n = 0.0, 0
        with D.seeded_rng(self.encoder.device, 10_007):
            self.model.train()
            for s in range(0, len(self.val_examples), bs):
                chunk = self.val_examples[s:s + bs]
                if len(chunk) < 2:
                    continue
                loss, _ = self.loss(self._views(chunk))  # every rank evaluates the whole held-out set
                total += loss.item() * len(chunk)
                n += len(chunk)
        return {"val_loss": total / n} if n else {}

    def save(self, out_dir: Path) -> None:
        save_encoder_dir(out_dir, self.encoder, self.start, self.cfg,
                         extra={"objective": "simcse", "attention_dropout": self.cfg.attention_dropout,
                                "scale": self.cfg.scale})


def train_simcse(cfg: SimCSEConfig, texts: Sequence[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    from .loop import train

    return train(cfg, SimCSEObjective(texts), **kwargs)
