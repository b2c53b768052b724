"""Let ``mteb`` (2.x) evaluate an l2v Encoder on any task a user has access to.

    >>> import mteb
    >>> from l2v.eval.mteb_adapter import MTEBEncoder
    >>> model = MTEBEncoder(Encoder.from_pretrained())
    >>> mteb.evaluate(model, mteb.get_tasks(tasks=["STSBenchmark"]), cache=None)

:class:`MTEBEncoder` implements mteb's ``EncoderProtocol`` (``encode(inputs: DataLoader, *, task_metadata,
hf_split, hf_subset, prompt_type)``, ``similarity``, ``similarity_pairwise``, ``mteb_model_meta``) by subclassing
``mteb.models.AbsEncoder``. Instructions follow LLM2Vec: the task's instruction (from ``instructions``, else the
task's own prompt or mteb's default prompt for its type, else one built from its description) goes on queries and on symmetric tasks;
documents (``prompt_type == "document"``) are embedded without one. The instruction is passed to
``Encoder.encode`` separately, so it is attended to but not pooled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError("the mteb adapter needs the 'mteb' package (pip install 'l2v[eval]').") from exc


_SCORING = {"cosine": ScoringFunction.COSINE, "dot": ScoringFunction.DOT_PRODUCT,
            "euclidean": ScoringFunction.EUCLIDEAN, "manhattan": ScoringFunction.MANHATTAN}


def _rows(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    return t[None] if t.dim() == 1 else t


class MTEBEncoder(AbsEncoder):
    """Wrap an l2v :class:`~l2v.Encoder` (or anything with its ``encode(texts, instruction=...)``) for mteb.

    ``instructions``: ``{task name or task type: instruction}`` overriding the defaults.
    """

    def __init__(self, encoder: Any, instructions: dict[str, str] | None = None, batch_size: int = 32,
                 name: str | None = None, use_instructions: bool = True) -> None:
        self.model = encoder
        self.instructions = dict(instructions or {})
        self.batch_size = batch_size
        self.use_instructions = use_instructions
        raw = str(name or getattr(encoder, "name", None) or "l2v-encoder")
        # mteb expects "org/name" model names (it builds result folders from them); a local path -> its basename
        if raw.count("/") != 1 or raw.startswith((".", "/", "~")):
            raw = "l2v/" + (Path(raw.rstrip("/")).name or "l2v-encoder")
        self.model_name = raw
        # the encoder's own similarity (sentence-transformers' names), so mteb scores what the encoder is used with
        self.similarity_fn_name = str(getattr(encoder, "similarity_fn_name", None) or "cosine")
        if self.similarity_fn_name not in _SCORING:
            raise ValueError(f"MTEBEncoder: the encoder's similarity_fn_name {self.similarity_fn_name!r} is not one "
                             f"of {', '.join(_SCORING)}")
        self.mteb_model_meta = ModelMeta.create_empty(overwrites={
            "name": self.model_name,
            "revision": "local",
            "embed_dim": int(getattr(encoder, "dim", 0)) or None,
            "max_tokens": getattr(encoder, "max_length", None),
            "similarity_fn_name": _SCORING[self.similarity_fn_name],
            "use_instructions": use_instructions,
            "framework": ["PyTorch"],
            "open_weights": True,
        })

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        """mteb's own cosine / dot; euclidean and manhattan (which mteb's base class does not compute) as
        sentence-transformers scores them: the negative distance."""
        if self.similarity_fn_name in ("cosine", "dot"):
            return super().similarity(embeddings1, embeddings2)
        return -torch.cdist(_rows(embeddings1), _rows(embeddings2), p=2 if self.similarity_fn_name == "euclidean" else 1)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        if self.similarity_fn_name in ("cosine", "dot"):
            return super().similarity_pairwise(embeddings1, embeddings2)
        diff = _rows(embeddings1) - _rows(embeddings2)
        return -(diff.norm(dim=-1) if self.similarity_fn_name == "euclidean" else diff.abs().sum(-1))

    def instruction_for(self, task_metadata: Any, prompt_type: PromptType | None) -> str | None:
        """The instruction for this task and side (None for documents / when disabled)."""
        if not self.use_instructions or prompt_type == PromptType.document:
            return None
        name, ttype = getattr(task_metadata, "name", None), getattr(task_metadata, "type", None)
        for key in (name, ttype):
            if key and key in self.instructions:
                return self.instructions[key]
        try:
            found = self.get_instruction(task_metadata, prompt_type)
        except (KeyError, ValueError, AttributeError):
            found = None
        if found:
            return str(found).strip() + " "
        description = (getattr(task_metadata, "description", "") or "").strip().rstrip(".")
        return f"{description}: " if description else None

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            column = batch.get("text") if isinstance(batch, dict) else None
            if column is None:
                raise ValueError(f"mteb task {getattr(task_metadata, 'name', '?')!r} gave a batch without a "
                                 f"'text' column (keys: {sorted(batch) if isinstance(batch, dict) else batch!r}); "
                                 "l2v encodes text only.")
            texts.extend(str(t) for t in column)
        instruction = self.instruction_for(task_metadata, prompt_type)
        out = self.model.encode(texts, instruction=instruction,
                                batch_size=int(kwargs.get("batch_size") or self.batch_size),
                                show_progress_bar=bool(kwargs.get("show_progress_bar", False)))
        return np.asarray(out, dtype=np.float32)
