"""Drop-in shim for the official ``llm2vec`` package: switch by changing one import.

    # from llm2vec import LLM2Vec
    from l2v.compat import LLM2Vec

    model = LLM2Vec.from_pretrained(
        "McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp",
        peft_model_name_or_path="McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp-supervised",
        torch_dtype=torch.bfloat16, device_map="cuda",
    )
    q = model.encode([["Given a web search query, retrieve relevant passages:", "how much protein"]])
    d = model.encode(["a document"])

The official layout is a base directory (``config.json`` + tokenizer, with either full weights or an MNTP LoRA
adapter whose ``adapter_config.json`` names the original base) plus an optional PEFT adapter directory carrying
``llm2vec_config.json`` (``pooling_mode``, ``max_length``, ``doc_max_length``, ``skip_instruction``). Loading
goes through :meth:`l2v.Encoder.from_pretrained`, which merges the adapters and enables bidirectional attention
with l2v's generic mechanism (any decoder, not only the four the official package patches).

Differences: the instruction is tokenised on its own and excluded from pooling by token position (the official
code re-tokenises ``"instruction text"`` and keeps the last ``len(tokenize(text))`` positions; the shim places the
joining space so that l2v sees the same tokens, which matters for byte-level BPEs), so vectors agree closely
but not bit for bit; ``skip_instruction=False`` is not supported; model-specific chat templates that the
official ``prepare_for_tokenization`` adds for a few hub ids are not added.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoints import _LLM2VEC_POOLING, LLM2VEC_CONFIG
from .encoder import Encoder

_TO_OFFICIAL = {"mean": "mean", "weighted_mean": "weighted_mean", "eos": "eos_token", "last_token": "last_token",
                "bos": "bos_token"}


class LLM2Vec:
    """The official ``LLM2Vec`` call shapes on top of an :class:`~l2v.Encoder`."""

    def __init__(self, encoder: Encoder, doc_max_length: int = 400, skip_instruction: bool = True,
                 pooling_mode: str | None = None) -> None:
        """``pooling_mode``: the official name when the encoder's own differs in meaning: "last_token" pools the
        text's last token as upstream does, where l2v's ``last_token`` appends an EOS token first (upstream's
        "eos_token")."""
        if not skip_instruction:
            raise ValueError("skip_instruction=False (pooling over the instruction tokens) is not supported by "
                             "l2v; instructions are always excluded from pooling.")
        self.encoder = encoder
        self.doc_max_length = doc_max_length
        self.skip_instruction = skip_instruction
        if pooling_mode == "last_token" and encoder.pooling in ("last_token", "eos"):
            # Upstream appends nothing for last_token: pool what the tokenizer itself ends the text with.
            encoder.pooling = "mean"  # the setter recomputes the special tokens: the tokenizer's own
            suffix = encoder._suffix
            encoder.pooling = "last_token"
            encoder._suffix = suffix
        self._appends_eos = encoder.pooling in ("last_token", "eos") and encoder._suffix[-1:] == [
            encoder.tokenizer.eos_token_id] and pooling_mode != "last_token"

    # Attributes official users reach for.
    @property
    def model(self) -> torch.nn.Module:
        return self.encoder.model

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def pooling_mode(self) -> str:
        if self.encoder.pooling in ("last_token", "eos"):  # l2v's both append EOS, upstream's last_token does not
            return "eos_token" if self._appends_eos else "last_token"
        return _TO_OFFICIAL[self.encoder.pooling]

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def config(self):
        return self.encoder._forward_target().config

    @classmethod
    def from_pretrained(
        cls,
        base_model_name_or_path: str | os.PathLike,
        peft_model_name_or_path: str | os.PathLike | None = None,
        merge_peft: bool = True,
        enable_bidirectional: bool = True,
        pooling_mode: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
        torch_dtype: Any = None,
        dtype: Any = None,
        device_map: Any = None,
        device: Any = None,
        attn_implementation: str | None = "sdpa",
        **kwargs: Any,
    ) -> LLM2Vec:
        """Same signature as the official ``LLM2Vec.from_pretrained``; adapters are always merged (faster)."""
        ignored = {k: v for k, v in kwargs.items() if k not in ("trust_remote_code", "low_cpu_mem_usage")}
        if ignored:
            raise TypeError(f"LLM2Vec.from_pretrained: unsupported keyword arguments {sorted(ignored)}.")
        if pooling_mode is not None and pooling_mode not in _LLM2VEC_POOLING:
            raise ValueError(f"pooling_mode={pooling_mode!r} is not supported; choose one of "
                             f"{', '.join(_LLM2VEC_POOLING)}.")
        base_model_name_or_path = _local(base_model_name_or_path)
        if peft_model_name_or_path is not None:
            peft_model_name_or_path = _local(peft_model_name_or_path)
        official = _read_llm2vec_config(peft_model_name_or_path or base_model_name_or_path)
        if isinstance(device_map, str) and device is None and device_map != "auto":
            device = device_map
        encoder = Encoder.from_pretrained(
            str(base_model_name_or_path),
            adapter=None if peft_model_name_or_path is None else str(peft_model_name_or_path),
            pooling=_LLM2VEC_POOLING[pooling_mode] if pooling_mode else None,
            bidirectional=enable_bidirectional,
            max_length=max_length,
            dtype=dtype if dtype is not None else (torch_dtype if torch_dtype is not None else "auto"),
            device=device,
            attn_implementation=attn_implementation,
        )
        return cls(encoder,
                   doc_max_length=doc_max_length or official.get("doc_max_length", 400),
                   skip_instruction=skip_instruction if skip_instruction is not None
                   else official.get("skip_instruction", True),
                   pooling_mode=pooling_mode or official.get("pooling_mode"))

    # ------------------------------------------------------------------------------------------ encode
    def _as_joined(self, instruction: str, text: str) -> tuple[str, str]:
        """The ``(instruction, text)`` strings whose tokens, one list after the other, are upstream's: it tokenises
        ``f"{instruction} {text}"`` and pools the last ``len(tokenize(text))`` tokens. Byte-level BPEs (Llama-3,
        Qwen, SmolLM2) put that space into the text's first token ("Ġhow", not "how") or keep it as a token of its
        own before the text; SentencePiece tokenizers need no change (their dummy prefix plays the space). Where
        upstream's count is off (" word" is fewer tokens than "word", so it also pools an instruction token), the
        model still sees upstream's tokens and l2v pools the text's."""
        seen: dict[str, list[int]] = {}  # each of the (up to 6) strings is tokenised once

        def ids(t: str) -> list[int]:
            if t not in seen:
                seen[t] = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            return seen[t]

        joined, n = ids(f"{instruction} {text}"), len(ids(text))
        same_input = [(ins, txt) for ins, txt in ((instruction, text), (instruction, " " + text),
                                                   (instruction + " ", text)) if ids(ins) + ids(txt) == joined]
        for ins, txt in same_input:
            if ids(txt) == joined[len(joined) - n:]:
                return ins, txt
        return same_input[0] if same_input else (instruction, text)

    def _cut_doc(self, text: str) -> str:
        """The official doc_max_length rule: drop trailing words until the text fits in doc_max_length tokens.

        As upstream, a length is counted after truncation to ``max_length``: each step keeps
        ``doc_max_length / min(tokens, max_length)`` of the words, so a text longer than ``max_length`` is cut in
        smaller steps (to a different word count) than its full length would give.
        """
        def n_tokens(t: str) -> int:
            return min(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]), self.max_length)

        length = n_tokens(text)
        while length > self.doc_max_length:
            words = text.split()
            keep = int(len(words) * self.doc_max_length / length)
            if keep >= len(words):
                keep = len(words) - 1
            text = " ".join(words[:max(keep, 0)])
            length = n_tokens(text)
        return text

    def encode(
        self,
        sentences: str | Sequence[str] | Sequence[Sequence[str]],
        batch_size: int = 32,
        show_progress_bar: bool = True,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        device: str | None = None,
    ) -> torch.Tensor | np.ndarray:
        """Embed ``[[instruction, text], ...]`` or plain strings; a float32 CPU tensor (numpy if asked), (n, dim)."""
        if isinstance(sentences, str):
            sentences = [sentences]
        items: list[Any] = []
        for i, s in enumerate(sentences):
            if isinstance(s, str):
                items.append(self._cut_doc(s))
            elif isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, str) for x in s):
                instruction = s[0].strip()
                text = self._cut_doc(s[1])
                items.append(self._as_joined(instruction, text) if instruction and text else
                             (instruction, text) if instruction else text)
            else:
                raise TypeError(f"sentences[{i}]: expected a string or an [instruction, text] pair of strings, "
                                f"got {s!r:.80}.")
        if device is not None and torch.device(device) != self.encoder.device:
            self.encoder.model.to(device)
        out = self.encoder.encode(items, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                  convert_to="torch")
        if out.ndim == 1:
            out = out.unsqueeze(0)
        if convert_to_numpy and not convert_to_tensor:
            return out.numpy()
        return out

    def save(self, output_path: str | os.PathLike, merge_before_save: bool = True, save_config: bool = True) -> None:
        """Save merged weights + tokenizer (+ ``llm2vec_config.json`` and l2v's own config)."""
        self.encoder.save_pretrained(output_path)
        if save_config:
            cfg = {"pooling_mode": self.pooling_mode, "max_length": self.max_length,
                   "doc_max_length": self.doc_max_length, "skip_instruction": self.skip_instruction}
            (Path(output_path) / LLM2VEC_CONFIG).write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor | np.ndarray:
        return self.encode(*args, **kwargs)


def _local(name: str | os.PathLike) -> str:
    """A local directory for ``name``: itself, or the hub snapshot (from the HF cache, or downloaded when online),
    so the official layout's files (adapter_config.json, llm2vec_config.json) can be read."""
    if Path(name).expanduser().exists() or str(name).count("/") != 1:
        return str(name)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(name))
    except Exception:  # noqa: BLE001 - offline and not cached: let from_pretrained report it
        return str(name)


def _read_llm2vec_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / LLM2VEC_CONFIG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}).") from exc


__all__ = ["LLM2Vec"]
