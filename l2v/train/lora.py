"""Build the trainable model (base transformer + merged earlier adapters + fresh LoRA) and save the result as an
l2v encoder directory.

Adapters are attached to the *base transformer* (``AutoModel``, no LM head), as the official LLM2Vec does, so the
saved adapter applies to ``AutoModel`` and ``Encoder.from_pretrained(dir)`` loads it. MNTP keeps the LM head of
the causal-LM model aside (frozen, tied) and calls it only at the positions it needs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bidirectional import make_bidirectional
from ..checkpoints import (
    L2V_CONFIG,
    L2VConfig,
    is_default_model,
    load_base_model,
    quiet_peft,
    resolve_model_path,
)
from ..encoder import Encoder
from ..io import atomic_directory
from .dropout import use_fast_dropout

ADAPTER_DIR = "adapter"
_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


@dataclass
class StartPoint:
    """Where training starts: full weights plus adapters to merge first (in order)."""

    weights_path: str
    base_model: str
    adapters: list[str] = field(default_factory=list)
    tokenizer_path: str | None = None
    # The starting encoder's inference max length: training crops texts shorter (e.g. 128 for SimCSE), but the
    # saved encoder must keep embedding full-length texts.
    max_length: int = 512
    # The starting encoder's named prompts and similarity function: the trained encoder keeps them, as
    # sentence-transformers keeps a model's across fit + save (a plain base model has none / cosine).
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"


def _adapter_list(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def resolve_start(model: str | None, adapter: str | None = None) -> StartPoint:
    """Resolve ``--model``/``--adapter`` into weights + adapters, following l2v encoder directories."""
    path = resolve_model_path(model)
    p = Path(path)
    if (p / L2V_CONFIG).is_file():
        lcfg = L2VConfig.load(p)
        if (p / "config.json").is_file():
            start = StartPoint(weights_path=str(p), base_model=str(p.resolve()))
        else:
            if not lcfg.base_model:
                raise ValueError(f"{path}: l2v_config.json has no base_model and the directory has no weights.")
            start = StartPoint(weights_path=resolve_model_path(lcfg.base_model), base_model=lcfg.base_model)
        start.adapters = [str((p / a).resolve()) for a in _adapter_list(lcfg.adapter)]
        start.tokenizer_path = str(p) if _has_tokenizer(p) else start.weights_path
        start.max_length = lcfg.max_length
        start.prompts = dict(lcfg.prompts or {})
        start.default_prompt_name = lcfg.default_prompt_name
        start.similarity_fn_name = lcfg.similarity_fn_name or "cosine"
    elif (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        base = _adapter_config(p).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter_config.json names no base model; pass --model BASE --adapter {path}.")
        start = StartPoint(weights_path=resolve_model_path(base), base_model=base, adapters=[str(p.resolve())])
    else:
        name = "smollm2-135m" if is_default_model(model) else (str(p.resolve()) if p.exists() else str(model))
        start = StartPoint(weights_path=path, base_model=name)
    if adapter:
        a = Path(adapter)
        if not (a / "adapter_config.json").is_file():
            if (a / L2V_CONFIG).is_file():
                raise ValueError(f"--adapter {adapter}: is an l2v encoder directory; pass it as --model instead.")
            raise FileNotFoundError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json).")
        start.adapters.append(str(a.resolve()))
    start.tokenizer_path = start.tokenizer_path or start.weights_path
    return start


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _adapter_config(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory}/adapter_config.json: unreadable ({exc}).") from exc


def check_adapter_fits(base: nn.Module, adapter_dir: str | Path) -> None:
    """Raise a clear error when an adapter was trained on a different base model (module names or shapes)."""
    from safetensors import safe_open

    adir = Path(adapter_dir)
    weights = adir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{adir}: no adapter_model.safetensors (only safetensors adapters are loaded).")
    modules = dict(base.named_modules())
    problems: list[str] = []
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            mod_name = key.split(".lora_")[0].removeprefix("base_model.model.")
            target = modules.get(mod_name)
            if target is None:
                problems.append(f"{mod_name} does not exist in the base model")
            else:
                shape = fh.get_slice(key).get_shape()
                w = getattr(target, "weight", None)
                if w is not None and w.dim() == 2:
                    out_f, in_f = w.shape if isinstance(target, nn.Linear) else (w.shape[1], w.shape[0])
                    ok = shape[1] == in_f if ".lora_A." in key else shape[0] == out_f
                    if not ok:
                        problems.append(f"{key}: shape {tuple(shape)} does not fit {mod_name} "
                                        f"(in {in_f}, out {out_f})")
            if len(problems) >= 3:
                break
    if problems:
        base_name = _adapter_config(adir).get("base_model_name_or_path", "?")
        raise ValueError(f"{adir}: adapter was trained for a different base model (its base: {base_name}): "
                         + "; ".join(problems) + ".")


def merge_adapter(base: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply a PEFT adapter to ``base`` and merge it into the weights."""
    from peft import PeftModel

    check_adapter_fits(base, adapter_dir)
    with quiet_peft():
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _lora_targets(spec: str) -> str | list[str]:
    spec = spec.strip()
    return "all-linear" if spec.lower() == "all-linear" else [s.strip() for s in spec.split(",") if s.strip()]


def build_trainable(
    cfg: Any,
    *,
    lm_head: bool = False,
    config_overrides: dict[str, Any] | None = None,
    device: torch.device | None = None,
    new_tokens: list[str] | None = None,
) -> tuple[Encoder, nn.Module | None, StartPoint]:
    """Base transformer (earlier adapters merged) -> bidirectional -> fresh LoRA, wrapped in an Encoder.

    Returns ``(encoder, lm_head_or_None, start)``. Base weights are frozen fp32 (autocast does the bf16 math).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = resolve_start(cfg.model, cfg.adapter)
    config = AutoConfig.from_pretrained(start.weights_path)
    for key, value in (config_overrides or {}).items():
        if key == "attention_dropout":
            for k in _DROPOUT_KEYS:
                if hasattr(config, k):
                    setattr(config, k, value)
        else:
            setattr(config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(start.tokenizer_path)
    kwargs: dict[str, Any] = {"config": config, "dtype": torch.float32, "attn_implementation": "sdpa"}
    head = None
    if lm_head:
        full = AutoModelForCausalLM.from_pretrained(start.weights_path, **kwargs)
        if new_tokens:
            n_real = len(tokenizer)
            tokenizer.add_special_tokens({"additional_special_tokens": list(new_tokens)})
            rows = full.get_input_embeddings().weight.shape[0]
            if len(tokenizer) > rows:  # a padded vocabulary (e.g. Qwen's) already has rows for the new ids
                full.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                emb = full.get_input_embeddings().weight
                new_ids = tokenizer.convert_tokens_to_ids(list(new_tokens))
                emb[new_ids] = emb[:min(rows, n_real)].mean(0, keepdim=True)
        base = full.base_model
        head = full.get_output_embeddings()
        if head is None:
            raise ValueError(f"{start.weights_path}: model has no LM head; MNTP needs a causal LM.")
    else:
        base = load_base_model(start.weights_path, **kwargs)
    for adapter_dir in start.adapters:
        base = merge_adapter(base, adapter_dir)
    base.requires_grad_(False)
    if head is not None:
        head.requires_grad_(False)
    bf16_frozen = frozen_dtype(cfg, device) == torch.bfloat16
    if bf16_frozen:
        # Frozen weights stored in bf16 (earlier adapters were merged in fp32 above): autocast then runs the
        # matmuls without re-casting every weight on every call, which dominated CPU steps. LoRA stays fp32.
        (full if lm_head else base).to(torch.bfloat16)
    if cfg.bidirectional:
        make_bidirectional(base)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns FutureWarning on every run); 4.x has only the old one
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=_lora_targets(cfg.lora_targets), bias="none")
    try:
        with quiet_peft():
            net = get_peft_model(base, lora)
    except ValueError as exc:
        raise ValueError(f"--lora-targets {cfg.lora_targets}: {exc}") from exc
    dev = device or torch.device("cpu")
    net.to(dev)
    if dev.type == "cpu":
        use_fast_dropout(net)  # peft's LoRA dropout via bernoulli_ was a quarter of a CPU SimCSE step
    if bf16_frozen:
        # Training runs under bf16 autocast: peft would otherwise copy every LoRA input to fp32 (the adapter
        # weights' dtype) only for autocast to copy it back to bf16 for the matmul.
        for module in net.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    if head is not None:
        head.to(dev)
    enc = Encoder(net, tokenizer, pooling=cfg.pooling, max_length=cfg.max_length, base_model=start.base_model)
    return enc, head, start


def frozen_dtype(cfg: Any, device: torch.device | None) -> torch.dtype:
    """bf16 when training autocasts to bf16 (``dtype`` 'auto' on bf16 hardware, or 'bfloat16'), else fp32."""
    from ..encoder import resolve_dtype

    resolved = resolve_dtype(cfg.dtype, device or torch.device("cpu"))
    return torch.bfloat16 if resolved == torch.bfloat16 else torch.float32


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_encoder_dir(out: str | Path, encoder: Encoder, start: StartPoint, cfg: Any,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write an l2v encoder directory: earlier adapters copied in, the new adapter, ``l2v_config.json``.

    The adapter holds the LoRA weights only: the embeddings are frozen, and a token added for training (MNTP's
    ``--mask-token new``) is never seen at inference, so the adapter must fit the unresized base model.

    With ``cfg.merge`` the directory instead holds full merged weights (safetensors) + tokenizer, and the
    adapters stay beside them for reference (not applied again on load).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = encoder.model
    adapters: list[str] = []
    for i, src in enumerate(start.adapters):
        name = f"merged_{i}"  # applied (merged) before the new adapter, in this order
        _replace_dir(Path(src), out / name)
        adapters.append(name)
    with atomic_directory(out / ADAPTER_DIR) as tmp:
        net.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    adapters.append(ADAPTER_DIR)
    info = {"trained_with": "l2v", **(extra or {})}
    L2VConfig(base_model=start.base_model, adapter=adapters[0] if len(adapters) == 1 else adapters,
              pooling=encoder.pooling, bidirectional=bool(cfg.bidirectional),
              max_length=max(start.max_length, encoder.max_length), prompts=dict(start.prompts),
              default_prompt_name=start.default_prompt_name, similarity_fn_name=start.similarity_fn_name,
              extra=info).save(out)
    if cfg.merge:
        # Merge from the saved adapters into fp32 base weights (the training copy may be bf16).
        merged = Encoder.from_pretrained(str(out), dtype="float32", device="cpu")
        merged.save_pretrained(out, **info, adapters_merged=adapters)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    with atomic_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def warn_if_base_differs(adapter_dir: str | Path, weights_path: str) -> None:
    base = _adapter_config(Path(adapter_dir)).get("base_model_name_or_path")
    if base and Path(base).name != Path(weights_path).name:
        warnings.warn(f"{adapter_dir}: adapter was saved for base {base!r}, applying it to {weights_path!r}.",
                      stacklevel=2)
