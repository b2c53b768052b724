"""MNTP (masked next-token prediction), LLM2Vec step 2.

A fraction of the text tokens (never special tokens, never the first position) is replaced by a mask token; the
bidirectional model must recover each masked token at position ``i`` from the LM head applied to the hidden
state at ``i - 1`` (the head predicts the *next* token). The LM head is applied only at those positions, so its
49k-wide matmul costs ``masked tokens x vocab`` instead of ``all tokens x vocab``.

Distributed (``torchrun`` / ``accelerate launch``): ``--batch-size`` is the global batch. Every rank masks the
whole global batch with the same generator (the positions one process would pick), then keeps its own rows,
cropped to their own longest row (:func:`shard_masked_batch`). Its loss is the sum of cross-entropy over its
masked tokens divided by the global number of masked tokens, so the losses of all ranks add up to the global mean
and summing gradients over ranks gives the single-process gradient; the logged loss, accuracy and masked count
are the global ones (one all-reduce).
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
from .config import MNTPConfig
from .loop import Objective, TrainingError
from .lora import build_trainable, save_encoder_dir

NEW_MASK_TOKEN = "<|l2v_mask|>"


def resolve_mask_id(tokenizer: Any, mask_token: str) -> int:
    """'auto' -> the tokenizer's own mask token, else '_'; 'eos' -> the eos id; 'new' -> the added mask token; any
    other string is the vocabulary entry of that name when there is one (the official run_mntp.py keeps a mask
    token the tokenizer has, else sets ``tokenizer.mask_token = "_"`` and masks with
    ``convert_tokens_to_ids("_")``: on SentencePiece vocabularies such as Llama-2's or Mistral's that is the bare
    ``_`` entry, not the ``▁_`` that tokenising "_" gives), else it must tokenise to exactly one token."""
    if mask_token == "auto":  # official run_mntp.py keeps a tokenizer's own mask token, else sets "_"
        own = getattr(tokenizer, "mask_token_id", None)
        return int(own) if own is not None else resolve_mask_id(tokenizer, "_")
    if mask_token == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("--mask-token eos: this tokenizer has no eos token; use '_' or 'new'.")
        return int(tokenizer.eos_token_id)
    if mask_token == "new":
        return int(tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN))
    entry = tokenizer.convert_tokens_to_ids(mask_token)
    unk = tokenizer.unk_token_id
    if isinstance(entry, int) and entry >= 0 and (entry != unk or mask_token == tokenizer.unk_token):
        return int(entry)
    ids = tokenizer(mask_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"--mask-token {mask_token!r} is {len(ids)} tokens for this tokenizer; it must be exactly "
                         "one token (try '_', 'eos' or 'new').")
    return int(ids[0])


def mask_batch(batch: dict[str, torch.Tensor], fraction: float, mask_id: int, special_ids: set[int],
               generator: torch.Generator, mode: str = "all", vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Mask ``fraction`` of each row's maskable tokens (at least one). Adds ``mask_rows``, ``mask_cols`` (the
    masked positions) and ``labels`` (their original ids). ``mode="all"``: every masked position gets the mask
    token; ``mode="bert"``: 80% the mask token, 10% a random id below ``vocab_size``, 10% left as they are (all
    of them still predicted), as transformers' ``DataCollatorForLanguageModeling``."""
    ids = batch["input_ids"]
    attn = batch["attention_mask"].bool()
    prev_attended = torch.zeros_like(attn)
    prev_attended[:, 1:] = attn[:, :-1]  # position i-1 must be a real token to predict i
    maskable = batch["pool_mask"].bool() & prev_attended
    if special_ids:
        maskable &= ~torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype))
    rows, cols = [], []
    for r in range(ids.shape[0]):
        cand = maskable[r].nonzero().flatten()
        if cand.numel() == 0:
            continue
        k = max(1, int(round(fraction * cand.numel())))
        pick = cand[torch.randperm(cand.numel(), generator=generator)[:k]].sort().values
        rows.append(torch.full_like(pick, r))
        cols.append(pick)
    if not rows:
        raise TrainingError("MNTP batch has no maskable tokens (texts too short?).")
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    labels = ids[rows_t, cols_t].clone()
    masked = ids.clone()
    if mode == "all":
        masked[rows_t, cols_t] = mask_id
    elif mode == "bert":
        if not vocab_size:
            raise ValueError("mask_batch(mode='bert') needs vocab_size for the random replacements.")
        u = torch.rand(rows_t.numel(), generator=generator)
        rand_ids = torch.randint(vocab_size, (rows_t.numel(),), generator=generator, dtype=ids.dtype)
        masked[rows_t, cols_t] = torch.where(u < 0.8, torch.full_like(labels, mask_id),
                                             torch.where(u < 0.9, rand_ids, labels))
    else:
        raise ValueError(f"mask mode must be 'all' or 'bert', got {mode!r}.")
    return {**batch, "input_ids": masked, "mask_rows": rows_t, "mask_cols": cols_t, "labels": labels}


def shard_masked_batch(batch: dict[str, torch.Tensor], info: D.DistInfo) -> dict[str, torch.Tensor]:
    """This rank's contiguous rows of a masked global batch, cropped to the columns they use (padding to the global
    batch's longest row is dropped on either side), with the masked positions renumbered. Adds ``global_masked``:
    the number of masked tokens in the whole global batch."""
    n = batch["input_ids"].shape[0]
    lo, hi = D.shard_span(n, info)
    used = batch["attention_mask"][lo:hi].bool().any(0).nonzero().flatten()
    c0, c1 = int(used[0]), int(used[-1]) + 1
    rows = batch["mask_rows"]
    mine = (rows >= lo) & (rows < hi)
    out = {k: v[lo:hi, c0:c1] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == n else v
           for k, v in batch.items() if k not in ("mask_rows", "mask_cols", "labels")}
    out.update(mask_rows=rows[mine] - lo, mask_cols=batch["mask_cols"][mine] - c0, labels=batch["labels"][mine],
               global_masked=torch.tensor(rows.numel()))
    return out


class MNTPObjective(Objective):
    name = "mntp"
    distributed = True
    forward_backward = None  # under a launcher: _forward_backward_sharded (the loop then skips loss())

    def __init__(self, texts: Sequence[str] | None = None) -> None:
        self.texts = list(texts) if texts is not None else None

    def setup(self, cfg: MNTPConfig, device: torch.device) -> None:
        self.cfg = cfg
        device = self.join_launcher(cfg, device)
        if self.info.distributed:
            self.forward_backward = self._forward_backward_sharded
        new = [NEW_MASK_TOKEN] if cfg.mask_token == "new" else None
        self.encoder, self.head, self.start = build_trainable(cfg, lm_head=True, device=device, new_tokens=new)
        self.model = self.encoder
        tok = self.encoder.tokenizer
        self.mask_id = resolve_mask_id(tok, cfg.mask_token)
        self.special_ids = set(int(i) for i in tok.all_special_ids)
        texts = self.texts if self.texts is not None else load_corpus(cfg.data, cfg.text_field, cfg.max_texts)
        items = [self.encoder.tokenize_one(t) for t in texts]
        items = [t for t in items if t.end - t.start >= 2]  # need something maskable beyond the first token
        if not items:
            raise TrainingError(f"{cfg.data}: every text is shorter than 2 tokens; MNTP needs real sentences.")
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        items = [items[i] for i in perm]
        n_val = min(cfg.val_size, len(items) // 5)
        self.val_examples = items[:n_val]
        self.examples = items[n_val:]

    def collate(self, examples: Sequence[Tokenized], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The masked global batch; under a launcher, this rank's rows of it (masked as one process masks them)."""
        batch = self._masked(examples, generator)
        return shard_masked_batch(batch, self.info) if self.info.distributed else batch

    def _masked(self, examples: Sequence[Tokenized], generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = self.encoder.collate(examples)
        return mask_batch(batch, self.cfg.mask_fraction, self.mask_id, self.special_ids, generator,
                          mode=self.cfg.mask_mode, vocab_size=len(self.encoder.tokenizer))

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder.token_states(batch)
        dev = hidden.device
        h = hidden[batch["mask_rows"].to(dev), batch["mask_cols"].to(dev) - 1]  # the state *before* each mask
        return self.head(h).float()

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(batch)
        labels = batch["labels"].to(logits.device)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean().item()
        return loss, {"acc": acc, "masked": float(labels.numel())}

    def _forward_backward_sharded(self, batch: dict[str, Any],
                                  loss_scale: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Backward of (CE summed over this rank's masked tokens) / (masked tokens of the global batch): this rank's
        share of the global mean loss. Returns the global loss and metrics (the same on every rank)."""
        count = int(batch["global_masked"])
        with D.rank_rng(self.encoder.device):
            logits = self.logits(batch)
            labels = batch["labels"].to(logits.device)
            ce = F.cross_entropy(logits, labels, reduction="sum")
            (ce * (loss_scale / count)).backward()
        correct = (logits.argmax(-1) == labels).sum()
        total = D.all_reduce_sum(torch.stack([ce.detach().double(), correct.double()]))
        return (total[0] / count).float(), {"acc": float(total[1]) / count, "masked": float(count)}

    def evaluate(self) -> dict[str, float]:
        total_loss, correct, count = 0.0, 0, 0
        bs = self.cfg.batch_size
        for b, s in enumerate(range(0, len(self.val_examples), bs)):
            # every rank evaluates the whole held-out set (as supervised does); only rank 0 logs it
            batch = self._masked(self.val_examples[s:s + bs], torch.Generator().manual_seed(10_007 + b))
            logits = self.logits(batch)
            labels = batch["labels"].to(logits.device)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
            count += labels.numel()
        return {"val_loss": total_loss / max(count, 1), "val_acc": correct / max(count, 1)}

    def save(self, out_dir: Path) -> None:
        save_encoder_dir(out_dir, self.encoder, self.start, self.cfg,
                         extra={"objective": "mntp", "mask_token": self.cfg.mask_token,
                                "mask_fraction": self.cfg.mask_fraction, "mask_mode": self.cfg.mask_mode})


def train_mntp(cfg: MNTPConfig, texts: Sequence[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run MNTP; returns the summary (held-out ``before``/``after`` MNTP loss and accuracy included)."""
    from .loop import train

    return train(cfg, MNTPObjective(texts), **kwargs)
