"""sentence-transformers integration: ``SentenceTransformer(dir)`` on a directory written by ``l2v export``.

Design (works offline, no ``trust_remote_code``): sentence-transformers 6.x imports any module class outside the
``sentence_transformers.*`` namespace only with ``trust_remote_code=True`` (it would execute third-party code), so
l2v writes a pipeline of *stock* modules that reproduces ``Encoder.encode`` exactly:

* ``modules.json``: ``Transformer`` (the saved decoder, ``AutoModel``) -> ``Pooling`` (the l2v pooling mode).
* ``config.json`` gets ``"is_causal": false`` (transformers >= 5.2 then builds a padding-only bidirectional mask
  in ``create_causal_mask``; AutoConfig ignores unknown overrides, so it cannot live in ST's ``config_kwargs``)
  and ``"attn_implementation": "eager"`` (also in ``sentence_bert_config.json``). Why eager: with SDPA,
  transformers skips the mask for unpadded batches and SDPA falls back to the attention modules' hard-coded
  ``is_causal=True``, so one batch would be bidirectional and the next causal. Eager attention always applies
  the (bidirectional) mask, so even a plain ``AutoModel.from_pretrained(dir)`` is consistently bidirectional
  (l2v itself reloads with SDPA and flips every flag). Right padding and ``model_max_length = max_length``
  (``processor_kwargs``) match l2v's truncation.
* ``1_Pooling/config.json``: ``include_prompt=false`` so a sentence-transformers *prompt* plays the role of an
  l2v instruction and is excluded from pooling.

Exact equivalence needs the tokenizer to add no special tokens that l2v would exclude from pooling (true for
SmolLM2, Qwen, GPT-2-style tokenizers; Llama/Mistral tokenizers prepend a BOS that l2v does not pool but a stock
``Pooling`` would). :func:`st_compatibility` says whether a given encoder is exact; ``export`` warns when not.
Prompts match instructions exactly when the prompt's tokens do not merge with the text's first token (e.g. a
prompt ending in punctuation without a trailing space: ``"Retrieve relevant passages:"``), for mean and last-token
pooling only: ``weightedmean`` weights a text's tokens by position counted from the start of the prompt (l2v counts
from the text's first token, as the official LLM2Vec does) and ``cls`` takes the first token after the prompt
(l2v's ``bos``: the first token of the sequence), so prompted vectors differ there.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from .bidirectional import FULL_WINDOW, is_limited_window
from .encoder import Encoder

_ST_POOLING = {"mean": "mean", "weighted_mean": "weightedmean", "last_token": "lasttoken", "eos": "lasttoken",
               "bos": "cls"}


def st_compatibility(encoder: Encoder) -> tuple[bool, str]:
    """``(exact, reason)``: whether stock sentence-transformers modules reproduce ``encoder.encode`` exactly."""
    prefix, suffix = encoder._prefix, encoder._suffix
    tok = encoder.tokenizer
    if encoder.pooling in ("mean", "weighted_mean") and (prefix or suffix):
        return False, (f"the tokenizer adds special tokens {prefix + suffix} that l2v excludes from "
                       f"{encoder.pooling} pooling but sentence-transformers' Pooling includes")
    if encoder.pooling in ("last_token", "eos") and tok.eos_token_id is not None:  # no EOS: l2v appends none
        ids = tok("a", add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            return False, ("l2v appends an EOS token for last-token pooling but this tokenizer does not add one, "
                           "so sentence-transformers would pool a different token")
    return True, "exact"


def write_sentence_transformers_files(encoder: Encoder, directory: str | os.PathLike,
                                      prompts: dict[str, str] | None = None) -> Path:
    """Write modules.json, sentence_bert_config.json, config_sentence_transformers.json and 1_Pooling/ into a
    directory that already holds the encoder's weights and tokenizer (``Encoder.save_pretrained``).

    ``prompts``: ST's named prompts; ``None``: the encoder's own (``encoder.prompts``, with its
    ``default_prompt_name``), so ``SentenceTransformer(dir).encode(prompt_name=...)`` picks the same instruction.
    """
    out = Path(directory)
    exact, reason = st_compatibility(encoder)
    if not exact:
        warnings.warn(f"sentence-transformers files written, but SentenceTransformer({out.name}) will differ from "
                      f"Encoder.encode: {reason}. Load it with l2v.Encoder.from_pretrained for exact vectors.",
                      stacklevel=2)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
    ]
    _write_json(out / "modules.json", modules)
    bert_cfg: dict = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
        "processor_kwargs": {"model_max_length": encoder.max_length, "padding_side": "right",
                             "truncation_side": "right"},
    }
    tok = encoder.tokenizer
    if tok.pad_token is None and (tok.eos_token or tok.unk_token):
        # Llama-3, Mistral: no pad token, and sentence-transformers pads every batch of 2+ texts ("Asking to pad
        # but the tokenizer does not have a padding token"); l2v pads with EOS too. Padding is masked, so the
        # token does not change a vector; the saved tokenizer stays as it was for l2v.
        bert_cfg["processor_kwargs"]["pad_token"] = tok.eos_token or tok.unk_token
    if encoder.bidirectional:
        bert_cfg["model_kwargs"] = {"attn_implementation": "eager"}
        # AutoConfig ignores unknown keyword overrides, so the flag must live in config.json itself; with eager
        # attention there too, a plain AutoModel.from_pretrained(dir) is consistently bidirectional as well.
        config_path = out / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["is_causal"] = False
        config["attn_implementation"] = "eager"
        _widen_sliding_windows(config)
        _write_json(config_path, config)
    _write_json(out / "sentence_bert_config.json", bert_cfg)
    _write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "prompts": dict(prompts if prompts is not None else encoder.prompts or {"query": "", "document": ""}),
        "default_prompt_name": encoder.default_prompt_name if prompts is None else None,
        "similarity_fn_name": encoder.similarity_fn_name,  # SentenceTransformer.similarity computes the same
    })
    _write_json(out / "1_Pooling" / "config.json", {
        "embedding_dimension": encoder.dim,
        "pooling_mode": _ST_POOLING[encoder.pooling],
        "include_prompt": False,
    })
    return out


def _widen_sliding_windows(config: dict) -> None:
    """Full attention in sliding-window layers, as l2v runs them (:func:`l2v.bidirectional.make_bidirectional`):
    transformers' bidirectional sliding mask still cuts at ``|i - j| > sliding_window``, so a plain load of the
    exported config would embed texts longer than the window differently (Mistral v0.1, Phi-3, Gemma 2/3)."""
    for cfg in (config, *(v for v in config.values() if isinstance(v, dict))):  # and nested text_config
        if is_limited_window(cfg.get("sliding_window")):
            cfg["sliding_window"] = FULL_WINDOW


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


__all__ = ["st_compatibility", "write_sentence_transformers_files"]
