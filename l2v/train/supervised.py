"""Supervised contrastive training (LLM2Vec step 4): query (with instruction), positive, hard negative.

Loss: InfoNCE on cosine similarity x ``scale`` (``l2v train supervised``: 50, i.e. temperature 0.02, as the
official ``run_supervised.py``, whose train configs leave its ``loss_scale`` default of 50; SimCSE uses 20). Query
i's candidates are every positive and every hard negative of the *global* batch (in-batch negatives, gathered
across ranks when distributed); its own positive is the target. One direction only (queries against documents),
as the official ``HardNegativeNLLLoss``. The building blocks below (:func:`info_nce`, :class:`StepSettings`,
:func:`evaluate_pairs`) keep 20 as their own default; the training objective passes its config's ``scale``.

Distributed: every rank builds the same global batch, embeds its own slice, gathers all embeddings (its own rows
keep their autograd graph) and computes the same global loss; summing parameter gradients over ranks then gives
exactly the single-process full-batch gradient (see :mod:`l2v.train.distributed`).

Memory: with ``chunk_size`` set, embeddings are computed with GradCache (:mod:`l2v.train.gradcache`): the
contrastive batch can be far larger than what fits through the model at once, with the same gradients.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.pairs import PairBatchSampler, PairData, PairExample, default_pair_dir, load_pairs
from . import distributed as D
from .config import TrainConfig
from .gradcache import gradcache_backward, plain_backward
from .loop import Objective


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
class StepSettings:
    scale: float = 20.0               # cosine similarity scale (1 / temperature)
    chunk_size: int | None = None     # GradCache chunk (texts per forward); None = plain full-batch step
    gather: bool = True               # gather embeddings across ranks (every rank sees all in-batch negatives)


class PairStep:
    """Computes the loss of one *global* batch of :class:`PairExample` and accumulates this rank's gradients.

    ``encoder``: an :class:`l2v.encoder.Encoder` (its ``model`` may be a PEFT model). ``step`` does not touch the
    optimizer; call :func:`l2v.train.distributed.all_reduce_gradients` (sum) after it when distributed. (A loop
    whose synchronisation averages, like DDP, must multiply the loss by ``loss_multiplier``.)
    """

    def __init__(self, encoder, config: StepSettings | None = None) -> None:
        self.encoder = encoder
        self.config = config or StepSettings()

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
    """Held-out metrics without gradients, over the whole held-out set as one retrieval pool: InfoNCE loss
    (positives and hard negatives as candidates) and top-1 accuracy of the positive."""
    if len(examples) < 2:
        return {}
    q = torch.as_tensor(encoder.encode([(e.query_instruction or "", e.query) for e in examples],
                                       batch_size=batch_size))
    p = torch.as_tensor(encoder.encode([(e.doc_instruction or "", e.positive) for e in examples],
                                       batch_size=batch_size))
    negs = [(e.doc_instruction or "", e.negative) for e in examples if e.negative is not None]
    n = torch.as_tensor(encoder.encode(negs, batch_size=batch_size)) if negs else None
    has = torch.tensor([e.negative is not None for e in examples])
    full = None
    if n is not None:
        full = torch.zeros((len(examples), n.shape[1]))
        full[has] = n
    loss = info_nce(q, p, full, has if n is not None else None, scale=scale)
    docs = F.normalize(p if full is None else torch.cat([p, full]), dim=-1)
    sims = F.normalize(q, dim=-1) @ docs.T
    if full is not None:
        sims[:, len(examples):][:, ~has] = -2.0
    labels = torch.arange(len(examples))
    return {"val_loss": float(loss), "val_top1": float((sims.argmax(1) == labels).float().mean())}


# ------------------------------------------------------------------------------------ training objective
@dataclass
class SupervisedConfig(TrainConfig):
    data: str = "builtin"
    """Pair data: .jsonl files / directories (comma-separated) with query, positive, optional negative (E5 /
    echo format; one <dataset>.jsonl per dataset), or 'builtin' (offline WordNet pairs with hard negatives)."""
    instructions: str | None = None
    """Instruction map JSON {dataset: instruction or {instruction, symmetric}}; default: instructions.json in the
    data directory when present (the builtin data has one)."""
    mix_datasets: bool = False
    """Draw batches from all datasets mixed (default: each batch from one dataset, as in LLM2Vec/E5)."""
    skip_bad_lines: bool = False
    """Skip malformed pair lines (counted in the log) instead of stopping with file:line."""
    gradcache_chunk: int = 0
    """GradCache: embed the batch in chunks of this many texts and back-propagate chunk by chunk (same
    gradients, activation memory of one chunk); 0 = off."""
    scale: float = 50.0
    """Cosine similarities are multiplied by this before the softmax (temperature 1/scale); 50 as the official
    LLM2Vec supervised recipe (its run_supervised.py loss_scale default; 20 is its SimCSE value)."""
    output_dir: str = "runs/supervised"
    lr: float = 2e-4
    batch_size: int = 32
    """Global batch (pairs per optimizer step over all ranks); must be a multiple of the number of ranks."""
    max_length: int = 128
    steps: int = 100

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.gradcache_chunk, int) or self.gradcache_chunk < 0:
            raise ValueError(f"gradcache_chunk must be an integer >= 0, got {self.gradcache_chunk!r}.")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}.")
        if self.batch_size < 2:
            raise ValueError("supervised training needs batch_size >= 2 (in-batch negatives).")


def _data_paths(cfg: SupervisedConfig) -> tuple[list[str], str | None]:
    if cfg.data in ("builtin", "wordnet"):
        folder = default_pair_dir()
        return [str(folder)], cfg.instructions or str(folder / "instructions.json")
    paths = [p.strip() for p in cfg.data.split(",") if p.strip()]
    instr = cfg.instructions
    if instr is None and len(paths) == 1 and Path(paths[0]).is_dir() and (Path(paths[0]) / "instructions.json").is_file():
        instr = str(Path(paths[0]) / "instructions.json")
    return paths, instr


class SupervisedObjective(Objective):
    """``l2v train supervised``: the shared loop with this objective's batches (one dataset each), its own
    forward/backward (plain or GradCache, gathered across ranks) and gradient synchronisation."""

    name = "supervised"
    distributed = True

    def __init__(self, data: PairData | None = None) -> None:
        self.data = data

    def setup(self, cfg: SupervisedConfig, device: torch.device) -> None:
        from .lora import build_trainable

        self.cfg = cfg
        dev = self.join_launcher(cfg, device)
        if self.data is None:
            paths, instr = _data_paths(cfg)
            self.data = load_pairs(paths, skip_bad_lines=cfg.skip_bad_lines, instructions=instr)
        data = self.data
        if cfg.max_texts:
            data.examples = data.examples[:cfg.max_texts]
        if data.skipped and self.is_main:
            print(f"l2v: skipped {len(data.skipped)} bad line(s) (--skip-bad-lines); first: {data.skipped[0]}",
                  file=sys.stderr)
        perm = torch.randperm(len(data.examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = min(cfg.val_size, len(perm) // 5)
        val = set(perm[:n_val]) if n_val >= 2 else set()
        self.val_examples = [data.examples[i] for i in sorted(val)]
        train_data = PairData(examples=[e for i, e in enumerate(data.examples) if i not in val],
                              skipped=data.skipped, files=data.files)
        self.examples = train_data.examples
        self.sampler = PairBatchSampler(train_data, cfg.batch_size, seed=cfg.seed, mix=cfg.mix_datasets)
        self.encoder, _, self.start = build_trainable(cfg, lm_head=False, device=dev)
        self.model = self.encoder
        self.pair_step = PairStep(self.encoder, StepSettings(scale=cfg.scale, chunk_size=cfg.gradcache_chunk or None))
        self.instructions = {e.dataset: e.query_instruction for e in data.examples if e.query_instruction}

    # --- hooks the shared loop calls when an objective provides them
    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (indices into ``examples``); identical on every rank."""
        return self.sampler.batches(epoch)

    def collate(self, examples: Sequence[PairExample], generator: torch.Generator) -> list[PairExample]:
        return list(examples)  # tokenised inside the step (only this rank's slice)

    def forward_backward(self, batch: list[PairExample], loss_scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        with D.rank_rng(self.encoder.device):  # each rank its own dropout masks (no-op in one process)
            loss = self.pair_step.step(batch, loss_scale=loss_scale)
        return torch.tensor(loss), {}

    def loss(self, batch: list[PairExample]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError("SupervisedObjective does its own backward: the loop calls forward_backward().")

    def evaluate(self) -> dict[str, float]:
        return evaluate_pairs(self.encoder, self.val_examples, batch_size=self.cfg.batch_size, scale=self.cfg.scale)

    def save(self, out_dir: Path) -> None:
        from .lora import save_encoder_dir

        save_encoder_dir(out_dir, self.encoder, self.start, self.cfg,
                         extra={"objective": "supervised", "scale": self.cfg.scale,
                                "query_instructions": self.instructions,
                                "skipped_bad_lines": len(self.data.skipped) if self.data else 0})


def train_supervised(cfg: SupervisedConfig, data: PairData | None = None, **kwargs: Any) -> dict[str, Any]:
    from .loop import train

    return train(cfg, SupervisedObjective(data), **kwargs)
