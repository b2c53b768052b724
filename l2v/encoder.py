"""The Encoder: text (or ``(instruction, text)``) -> tokens -> bidirectional decoder -> pooled vector.

Instructions are tokenised separately from the text and concatenated as token ids, so the pooled positions are
exactly the text's tokens (no string separators). Texts are batched by length and returned in input order.
"""

from __future__ import annotations

import inspect
import json
import numbers
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .batching import DEFAULT_MAX_TOKENS, STREAM_CHUNK, chunk_ranges, plan_batches
from .bidirectional import causal_attention, is_bidirectional, is_limited_window, make_bidirectional
from .checkpoints import (
    L2V_CONFIG,
    L2VConfig,
    check_safe_weights,
    has_model_weights,
    is_default_model,
    llm2vec_defaults,
    load_base_model,
    quiet_peft,
    resolve_model_path,
)
from .kernels import (
    Bf16Linear,
    GatedMLP,
    convert_linears,
    decoder_layers,
    fp32_leading_layers,
    fuse_gated_mlps,
    kernel_status,
    uses_kernel,
)
from .kernels.malloc import tune_malloc
from .packing import check_packing, packed_attention, packed_inputs, unpack
from .pooling import check_pooling, pool

Text = str
Item = str | tuple[str, str] | list[str]
Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS: tuple[str, ...] = ("float32", "int8", "uint8", "binary", "ubinary")
SIMILARITY_FNS: tuple[str, ...] = ("cosine", "dot", "euclidean", "manhattan")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 or AMX), where bf16 is ~4x faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_supports_bf16(device: torch.device) -> bool:
    """True when ``device`` runs bf16 natively: compute capability 8.0+ (A100, H100, RTX 30xx/40xx) or ROCm.

    Not ``torch.cuda.is_bf16_supported()``: that also answers True on a T4 or V100, where bf16 is only emulated
    (no bf16 tensor cores, and SDPA's fused kernels refuse it), and it asks about the current device, not ``device``.
    """
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto": bf16 where the hardware runs it natively, else fp16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if cuda_supports_bf16(device) else torch.float16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "float": torch.float32}
    if str(dtype).lower() not in names:
        raise ValueError(f"dtype={dtype!r} is not supported; use 'auto', 'bfloat16', 'float16' or 'float32'.")
    return names[str(dtype).lower()]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def normalize_inputs(sentences: Any, instruction: str | None = None) -> tuple[list[str], list[str | None], bool]:
    """Validate ``encode`` input into parallel lists of texts and instructions.

    Returns ``(texts, instructions, single)`` where ``single`` means the caller passed one string.
    """
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string or None, got {type(instruction).__name__}.")
    if isinstance(sentences, str):
        return [sentences], [instruction], True
    if sentences is None:
        raise TypeError("sentences must be a string or a list of strings / (instruction, text) pairs, got None.")
    # Any iterable (a pandas Series, dict.values(), a generator), but not bytes or a mapping (its keys)
    if isinstance(sentences, (bytes, bytearray, Mapping)) or not isinstance(sentences, Iterable):
        raise TypeError(
            f"sentences must be a string or a list of strings / (instruction, text) pairs, "
            f"got {type(sentences).__name__}."
        )
    texts: list[str] = []
    instructions: list[str | None] = []
    for i, item in enumerate(sentences):
        if isinstance(item, np.str_):
            item = str(item)
        if isinstance(item, str):
            texts.append(item)
            instructions.append(instruction)
        elif isinstance(item, (list, tuple, np.ndarray)):
            if isinstance(item, np.ndarray):  # a row of a 2-D array of pairs (e.g. from pandas .to_numpy())
                item = item.tolist()
            if len(item) != 2:
                raise ValueError(
                    f"sentences[{i}]: expected an (instruction, text) pair of 2 strings, got {len(item)} items."
                )
            instr, text = item
            if not isinstance(instr, str) or not isinstance(text, str):
                raise TypeError(
                    f"sentences[{i}]: (instruction, text) must both be strings, got "
                    f"({type(instr).__name__}, {type(text).__name__})."
                )
            texts.append(text)
            instructions.append(instr if instr else instruction)
        else:
            raise TypeError(
                f"sentences[{i}]: expected a string or an (instruction, text) pair, got {type(item).__name__}."
            )
    return texts, instructions, False


def check_prompts(prompts: Mapping[str, str] | None, default_prompt_name: str | None
                  ) -> tuple[dict[str, str], str | None]:
    """Validated ``prompts`` (name -> instruction, "" for none) and ``default_prompt_name`` (one of them)."""
    if prompts is None:
        prompts = {}
    if not isinstance(prompts, Mapping):
        raise TypeError(f"prompts must be a dict of name -> instruction, got {type(prompts).__name__}.")
    for name, text in prompts.items():
        if not isinstance(name, str) or not name or not isinstance(text, str):
            raise TypeError(f"prompts: expected non-empty string names and string instructions, got "
                            f"{name!r}: {text!r:.60}.")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name={default_prompt_name!r} is not one of the prompts "
                         f"({', '.join(map(repr, prompts)) or 'none'}).")
    return dict(prompts), default_prompt_name


def check_similarity_fn_name(name: Any) -> str:
    """``name`` as one of :data:`SIMILARITY_FNS` (a ``sentence_transformers.SimilarityFunction`` member too)."""
    name = getattr(name, "value", name)
    if name not in SIMILARITY_FNS:
        raise ValueError(f"similarity_fn_name must be one of {', '.join(map(repr, SIMILARITY_FNS))}, got {name!r}.")
    return name


def quantize_embeddings(embeddings: np.ndarray, precision: Precision) -> np.ndarray:
    """float32 (n, dim) embeddings as ``sentence_transformers.quantization.quantize_embeddings`` quantizes them
    without ``ranges`` or ``calibration_embeddings`` (what ``SentenceTransformer.encode(precision=...)`` does).

    "int8"/"uint8": each dimension's [min, max] over *these* embeddings is cut into 255 steps (so a vector's codes
    depend on the other texts of the call; at least 2 embeddings, and ST suggests 100+); "binary"/"ubinary": one
    bit per dimension (> 0), packed 8 to a byte, big-endian; "binary" stores each byte minus 128 as int8.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    if precision == "float32":
        return emb
    if precision in ("binary", "ubinary"):
        packed = np.packbits(emb > 0, axis=-1)
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if precision not in ("int8", "uint8"):
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}.")
    dtype = np.int8 if precision == "int8" else np.uint8
    if emb.ndim == 2 and emb.shape[0] == 0:
        return np.zeros(emb.shape, dtype=dtype)
    if emb.ndim == 1 or emb.shape[0] == 1:
        raise ValueError(f"precision={precision!r} takes each dimension's range from the embeddings of the same "
                         "call (as sentence-transformers does), so it needs at least 2 texts; encode a "
                         "representative batch together, or quantize with explicit ranges "
                         "(sentence_transformers.quantization.quantize_embeddings(..., ranges=...)).")
    starts, ends = emb.min(axis=0), emb.max(axis=0)
    steps = (ends - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    codes = np.clip(np.floor((emb - starts) / steps), 0, 255)
    return (codes - 128).astype(np.int8) if precision == "int8" else codes.astype(np.uint8)


def _pick(name_a: str, a: Any, name_b: str, b: Any) -> Any:
    """Whichever of two synonyms (l2v's name, sentence-transformers') was given; both, differing: a ValueError."""
    if a is not None and b is not None and a != b:
        raise ValueError(f"{name_a}={a!r:.60} and {name_b}={b!r:.60} are the same setting (l2v's and "
                         "sentence-transformers' name) with different values; pass one of them.")
    return a if a is not None else b


def _output_kind(convert_to: str | None, to_numpy: bool | None, to_tensor: bool | None) -> str:
    """"numpy", "torch" or "list" from l2v's ``convert_to`` and ST's ``convert_to_numpy``/``convert_to_tensor``
    (ST's rule: ``convert_to_tensor`` wins; both False: a list of tensors). Contradicting ``convert_to``: error."""
    if convert_to not in (None, "numpy", "torch"):
        raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}.")
    if to_numpy is None and to_tensor is None:
        return convert_to or "numpy"
    st_kind = "torch" if to_tensor else "numpy" if to_numpy in (None, True) else "list"
    if convert_to is not None and convert_to != st_kind:
        given = ", ".join(f"{k}={v!r}" for k, v in (("convert_to_numpy", to_numpy), ("convert_to_tensor", to_tensor))
                          if v is not None)
        raise ValueError(f"convert_to={convert_to!r} contradicts {given} (which gives "
                         f"{'a list of tensors' if st_kind == 'list' else st_kind}); pass one of them.")
    return st_kind


def _canonical_device(dev: torch.device) -> torch.device:
    """"cuda" as the current CUDA device, "cpu:0" / "mps:0" as "cpu" / "mps", so equal devices compare equal."""
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if dev.type in ("cpu", "mps"):
        return torch.device(dev.type)
    return dev


@dataclass
class Tokenized:
    """One text ready for batching: ids plus the span [start, end) of the text's own tokens."""

    ids: list[int]
    start: int
    end: int
    truncated: bool = False


class Encoder(nn.Module):
    """An LLM turned text encoder: ``Encoder.from_pretrained(...).encode(texts)``.

    ``pooling``: "mean" (default), "weighted_mean", "last_token" / "eos" (an EOS token is appended) or "bos".
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        max_length: int = 512,
        name: str | None = None,
        base_model: str | None = None,
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
        similarity_fn_name: str = "cosine",
    ) -> None:
        super().__init__()
        self.model = model
        head = getattr(self._forward_target(), "get_output_embeddings", None)
        if callable(head) and head() is not None:  # its output would be logits, not token states
            raise TypeError(f"Encoder needs the base transformer, got {type(self._forward_target()).__name__} with "
                            "a language-model head; pass model.base_model (or load with AutoModel).")
        self.tokenizer = tokenizer
        self.pooling = pooling  # also sets the special tokens (_prefix, _suffix)
        self.max_length = _check_max_length(max_length)
        self.name = name
        self.base_model = base_model
        # As sentence-transformers: name -> instruction, chosen by encode(prompt_name=...) or default_prompt_name.
        self.prompts, self.default_prompt_name = check_prompts(prompts, default_prompt_name)
        self.similarity_fn_name = similarity_fn_name
        self.padding_side = getattr(tokenizer, "padding_side", "right") or "right"
        self._pad_id = self._pick_pad_id()
        self._takes_position_ids = "position_ids" in inspect.signature(self._forward_target().forward).parameters
        # Pack texts into one padding-free row (see l2v.packing): None = automatic (on CPU, when the probe passes).
        self.packing: bool | None = None
        self._packing_probe: bool | None = None
        # Set by compile(); kept out of the module tree and the state dict.
        object.__setattr__(self, "_compiled", None)
        object.__setattr__(self, "_compiled_train", None)
        self._compile_checked: set[str] = set()  # which of the two ran once without failing

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        pooling: str | None = None,
        bidirectional: bool | None = None,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = None,
        attn_implementation: str | None = "sdpa",
        allow_pickle: bool = False,
        merge_adapter: bool = True,
        cpu_kernel: bool | str | None = None,
        fp32_layers: int | None = None,
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
    ) -> Encoder:
        """Load a model as an encoder.

        ``model``: ``None``/"smollm2-135m" (embedded default), a local directory (plain transformers model, or an
        l2v encoder directory whose ``l2v_config.json`` supplies every other argument), or a hub id.
        ``adapter``: a PEFT adapter directory applied on top (merged into the weights by default).
        Arguments left as ``None`` come from ``l2v_config.json`` when present, else the defaults
        (mean pooling, bidirectional, max_length 512).
        ``cpu_kernel``: for bf16 on CPU, run the linear layers through l2v's CPU kernels (:mod:`l2v.kernels`):
        16-bit weights, fp32 activations between the matmuls. ``None``: when the CPU and a C compiler allow it,
        else torch's plain bf16 (every activation rounded to bf16); ``True``: required (error if unavailable);
        ``False``: never; ``"int16"`` (what ``None``/``True`` choose) or ``"bf16"``: the weight format. int16
        fixed point (one scale per weight row and per activation row, exact int32 sums; AVX512-VNNI) runs as
        fast as bf16 and keeps ~15 significant bits instead of 8: every measured text of the default and trained
        encoders stays at cosine >= 0.995 against fp32, where bf16 weights leave ~1 text in 100 below 0.99.
        ``fp32_layers``: under the kernel, how many leading decoder layers keep fp32 weights and math (default
        0 for int16; 40% of the layers for ``"bf16"``, which removes its tail at ~1.3x the time). Rounding made
        before a bidirectional model forms its massive activations (layer ~12 of 30 on the default model) is
        amplified and decides the worst texts. README "Precision".
        ``prompts`` / ``default_prompt_name``: named instructions for ``encode(prompt_name=...)``, as in
        sentence-transformers; merged over those saved in ``l2v_config.json`` (a name given here wins).
        On CPU, loading also fixes glibc's allocator thresholds for the process so each batch reuses the previous
        batch's activation memory instead of page-faulting fresh memory (:mod:`l2v.kernels.malloc`;
        ``L2V_MALLOC_TUNE=0`` opts out).
        """
        from transformers import AutoTokenizer

        path = resolve_model_path(model)
        cfg = L2VConfig.load(path) if (Path(path) / L2V_CONFIG).is_file() else None
        weights_path, adapters = path, []
        if cfg is not None:
            has_weights = (Path(path) / "config.json").is_file()
            if not has_weights:
                weights_path = resolve_model_path(cfg.base_model)
            # one adapter, or a list applied in order (e.g. SimCSE on top of a merged MNTP adapter)
            for name in [cfg.adapter] if isinstance(cfg.adapter, str) else (cfg.adapter or []):
                adapter_dir = Path(path) / name
                adapters.append(str(adapter_dir if adapter_dir.exists() else name))
        elif (Path(path) / "adapter_config.json").is_file() and not has_model_weights(path):
            # A PEFT adapter dir; in the official LLM2Vec MNTP layout it also holds config.json + tokenizer,
            # and the weights come from adapter_config.json's base_model_name_or_path.
            adapters.append(path)
            weights_path = resolve_model_path(_adapter_base(path))
            # Official supervised adapters name the MNTP adapter dir as their base: follow the chain.
            while ((Path(weights_path) / "adapter_config.json").is_file() and not has_model_weights(weights_path)
                   and len(adapters) < 8):
                adapters.insert(0, weights_path)
                weights_path = resolve_model_path(_adapter_base(weights_path))
        if adapter is not None:
            adapters.append(str(adapter))
        official = {} if cfg is not None else llm2vec_defaults(*adapters[::-1], path)  # llm2vec_config.json

        # Checked before any weights load (minutes for a large model); 0 or "" are errors, not "use the default".
        pooling = check_pooling(pooling if pooling is not None else (
            cfg.pooling if cfg else official.get("pooling", "mean")))
        bidirectional = bidirectional if bidirectional is not None else (cfg.bidirectional if cfg else True)
        max_length = _check_max_length(max_length if max_length is not None else (
            cfg.max_length if cfg else official.get("max_length", 512)))
        prompts, default_prompt_name = check_prompts(
            {**((cfg.prompts or {}) if cfg else {}), **(prompts or {})},
            default_prompt_name if default_prompt_name is not None else (cfg.default_prompt_name if cfg else None))
        similarity_fn_name = check_similarity_fn_name((cfg.similarity_fn_name if cfg else None) or "cosine")
        dev = _resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        use_kernel = _want_cpu_kernel(cpu_kernel, torch_dtype, dev)
        kernel_fmt = cpu_kernel if isinstance(cpu_kernel, str) else "int16"
        if fp32_layers is not None and (isinstance(fp32_layers, bool) or not isinstance(fp32_layers, int)
                                        or fp32_layers < 0):
            raise ValueError(f"fp32_layers must be a non-negative integer or None, got {fp32_layers!r}.")
        if fp32_layers and cpu_kernel is False:
            raise ValueError("fp32_layers applies to l2v's CPU kernel; it cannot be combined with "
                             "cpu_kernel=False (use dtype='float32' for a full fp32 model).")
        if fp32_layers and not use_kernel and torch_dtype != torch.float32:
            warnings.warn(f"fp32_layers={fp32_layers} is ignored: it applies to l2v's CPU kernel, which is "
                          f"not used for {torch_dtype} on {dev}.", stacklevel=2)

        for weights_dir in (weights_path, *adapters):
            check_safe_weights(weights_dir, allow_pickle=allow_pickle)
        # The kernel keeps everything but the linear weights in fp32. A checkpoint stored in 16 bits loads in that
        # dtype and is upcast after packing (lossless, and peak memory stays at 2 bytes per weight).
        load_dtype = (_stored_16bit_dtype(weights_path) or torch.float32) if use_kernel else torch_dtype
        kwargs: dict[str, Any] = {"dtype": load_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if allow_pickle:
            kwargs["use_safetensors"] = None
            kwargs["weights_only"] = True  # the opt-in still never unpickles arbitrary objects
        tok_path = path if _has_tokenizer(path) else weights_path
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        net = load_base_model(weights_path, **kwargs)
        for adapter_path in adapters:
            net = _apply_adapter(net, adapter_path, merge=merge_adapter)
        if use_kernel and hasattr(net, "merge_and_unload"):  # an unmerged adapter keeps ordinary Linear layers
            if cpu_kernel:
                raise ValueError(f"cpu_kernel={cpu_kernel!r} needs the adapter merged (merge_adapter=True).")
            use_kernel = False
            net.to(dtype=torch_dtype)
        if use_kernel:
            if fp32_layers is None and kernel_fmt == "int16":
                fp32_layers = 0
            convert_linears(net, keep=fp32_leading_layers(net, fp32_layers), fmt=kernel_fmt)
            fuse_gated_mlps(net)
            net.float()  # norms, embeddings, biases (the packed weights are int16/int32 bits and stay)
        net.to(dev).eval()
        if dev.type == "cpu":
            tune_malloc()  # reuse activation memory across batches (l2v.kernels.malloc; L2V_MALLOC_TUNE=0: off)
        if bidirectional:
            make_bidirectional(net)
        elif getattr(net.config, "is_causal", None) is False:  # an exported bidirectional config, run causally
            net.config.is_causal = True
        base_name = cfg.base_model if cfg and cfg.base_model else (
            "smollm2-135m" if is_default_model(None if model is None else str(model)) else str(model))
        return cls(net, tokenizer, pooling=pooling, max_length=max_length,
                   name=str(model) if model is not None else "smollm2-135m", base_model=base_name,
                   prompts=prompts, default_prompt_name=default_prompt_name, similarity_fn_name=similarity_fn_name)

    def save_pretrained(self, directory: str | os.PathLike, **extra: Any) -> Path:
        """Save weights (safetensors), tokenizer and ``l2v_config.json``; reload with ``from_pretrained(dir)``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        net = self.model
        if hasattr(net, "merge_and_unload"):
            net = net.merge_and_unload()
        with causal_attention(net):  # the config as loaded (make_bidirectional widens sliding windows)
            net.save_pretrained(out, safe_serialization=True)
        _strip_is_causal(out / "config.json")
        self.tokenizer.save_pretrained(out)
        L2VConfig(base_model=self.base_model, pooling=self.pooling, bidirectional=self.bidirectional,
                  max_length=self.max_length, prompts=dict(self.prompts),
                  default_prompt_name=self.default_prompt_name, similarity_fn_name=self.similarity_fn_name,
                  extra=extra).save(out)
        return out

    # --------------------------------------------------------------- properties
    @property
    def pooling(self) -> str:
        return self._pooling

    @pooling.setter
    def pooling(self, mode: str) -> None:
        """Validated, and the special tokens follow: last-token pooling appends an EOS token, the others do not."""
        self._pooling = check_pooling(mode)
        self._prefix, self._suffix = self._special_tokens()

    @property
    def bidirectional(self) -> bool:
        return is_bidirectional(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (bf16 under the CPU kernel, whose activations are fp32: see :attr:`cpu_kernel`)."""
        return torch.bfloat16 if uses_kernel(self.model, bf16=True) else next(self.model.parameters()).dtype

    @property
    def cpu_kernel(self) -> bool:
        """Whether the linear layers run through l2v's 16-bit-weight, fp32-activation CPU kernel."""
        return uses_kernel(self.model)

    @property
    def kernel_format(self) -> str | None:
        """The CPU kernel's 16-bit weight format ("int16" or "bf16"), or None without the kernel."""
        return next((m.fmt for m in self.model.modules()
                     if isinstance(m, (Bf16Linear, GatedMLP)) and m.fmt != "fp32"), None)

    @property
    def fp32_layers(self) -> int:
        """How many leading decoder layers run in fp32 under the CPU kernel (0 without the kernel)."""
        layers = decoder_layers(self._forward_target()) if self.cpu_kernel else None
        count = 0
        for layer in layers or ():
            if uses_kernel(layer, bf16=True):
                break
            count += 1
        return count

    @property
    def dim(self) -> int:
        cfg = self._forward_target().config
        dim = embedding_dim(cfg)
        if dim is None:
            raise AttributeError(f"{type(cfg).__name__} has no hidden_size (or n_embd): cannot tell the embedding "
                                 "width.")
        return dim

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def get_embedding_dimension(self) -> int:
        """sentence-transformers 6's name for :attr:`dim`."""
        return self.dim

    @property
    def max_seq_length(self) -> int:
        """sentence-transformers' name for :attr:`max_length` (settable, same checks)."""
        return self.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.max_length = _check_max_length(value)

    # ------------------------------------------------------------- tokenization
    def _forward_target(self) -> nn.Module:
        net = self.model
        return net.get_base_model() if hasattr(net, "get_base_model") else net

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer adds around any text (e.g. BOS), found by diffing with/without specials."""
        tok = self.tokenizer
        plain = tok("a", add_special_tokens=False)["input_ids"]
        full = tok("a", add_special_tokens=True)["input_ids"]
        prefix, suffix = [], []
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                prefix, suffix = full[:i], full[i + len(plain):]
                break
        eos = tok.eos_token_id
        if self.pooling in ("last_token", "eos") and eos is not None and (not suffix or suffix[-1] != eos):
            suffix = suffix + [eos]
        return list(prefix), list(suffix)

    def _pick_pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def _empty_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id):
            if candidate is not None and candidate != tok.pad_token_id:
                return int(candidate)
        return self._pad_id

    def tokenize_one(self, text: str, instruction: str | None = None, max_text_tokens: int | None = None,
                     truncation_side: Literal["right", "left"] = "right") -> Tokenized:
        """Token ids of ``[specials] instruction text [specials]`` and where the text's tokens are.

        A text beyond ``max_length`` (or ``max_text_tokens``, a tighter cap such as a server's) loses its end, or
        its beginning with ``truncation_side="left"``; the instruction and special tokens are always kept.
        """
        tok = self.tokenizer
        instr_ids = tok(instruction, add_special_tokens=False)["input_ids"] if instruction else []
        text_ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
        return self._assemble(text_ids, instr_ids, instruction, max_text_tokens, truncation_side)

    def tokenize_many(self, texts: Sequence[str], instructions: Sequence[str | None],
                      max_text_tokens: int | None = None,
                      truncation_side: Literal["right", "left"] = "right") -> list[Tokenized]:
        """:meth:`tokenize_one` of each ``(text, instruction)`` (same options), with one tokenizer call for all the
        texts and one per distinct instruction. Why: per-text calls cost ~120 us each (8k texts/s with an
        instruction), which would bound a GPU encode; the batched call of a fast tokenizer runs in Rust (2-4x
        faster here)."""
        tok = self.tokenizer
        filled = [i for i, t in enumerate(texts) if t]
        text_ids: list[list[int]] = [[] for _ in texts]
        if filled:
            for i, ids in zip(filled, tok([texts[i] for i in filled], add_special_tokens=False)["input_ids"],
                              strict=True):
                text_ids[i] = ids
        instr_ids = {s: (tok(s, add_special_tokens=False)["input_ids"] if s else []) for s in set(instructions)}
        return [self._assemble(ids, instr_ids[s], s, max_text_tokens, truncation_side)
                for ids, s in zip(text_ids, instructions, strict=True)]

    def _assemble(self, text_ids: list[int], instr_ids: list[int], instruction: str | None,
                  max_text_tokens: int | None = None, truncation_side: str = "right") -> Tokenized:
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}.")
        budget = self.max_length - len(self._prefix) - len(self._suffix) - len(instr_ids)
        if budget < 1:
            raise ValueError(
                f"instruction is {len(instr_ids)} tokens, leaving no room for text within max_length="
                f"{self.max_length}: {(instruction or '')[:60]!r}"
            )
        if max_text_tokens is not None:
            if max_text_tokens < 1:
                raise ValueError(f"max_text_tokens must be a positive integer, got {max_text_tokens!r}.")
            budget = min(budget, max_text_tokens)
        truncated = len(text_ids) > budget
        if truncated:
            text_ids = text_ids[-budget:] if truncation_side == "left" else text_ids[:budget]
        start = len(self._prefix) + len(instr_ids)
        ids = self._prefix + instr_ids + text_ids + self._suffix
        end = start + len(text_ids)
        if not text_ids:
            # Empty text: pool over the special tokens so the vector is defined; with none, one EOS-like token
            # (not the pad token, whose embedding is often zeroed by padding_idx).
            if not self._prefix and not self._suffix:
                ids = instr_ids + [self._empty_id()]
                start, end = len(instr_ids), len(instr_ids) + 1
            else:
                start, end = -1, -1
        return Tokenized(ids=ids, start=start, end=end, truncated=truncated)

    def collate(self, items: Sequence[Tokenized]) -> dict[str, torch.Tensor]:
        """Pad to the batch maximum on ``self.padding_side``; build attention, pooling masks and positions."""
        return self._collate_padded(items, self.padding_side)

    def collate_packed(self, items: Sequence[Tokenized]) -> dict[str, torch.Tensor]:
        """One padding-free row: ``input_ids``/``position_ids`` (1, T) plus ``lengths`` (n,).

        ``attention_mask``/``pool_mask`` are (n, longest) right-padded, the layout :meth:`token_states` returns
        for a packed batch, so pooling is the same code as for padded batches. Pack equal lengths adjacently
        (e.g. sorted) so attention runs as few, large calls.
        """
        batch = self._collate_padded(items, "right", with_ids=False)
        ids, pos, lengths = packed_inputs([t.ids for t in items])
        batch.update(input_ids=ids, position_ids=pos, lengths=torch.tensor(lengths, dtype=torch.long))
        return batch

    def _collate_padded(self, items: Sequence[Tokenized], side: str, with_ids: bool = True) -> dict[str, torch.Tensor]:
        longest = max(len(t.ids) for t in items)
        n = len(items)
        ids = torch.full((n, longest), self._pad_id, dtype=torch.long) if with_ids else None
        attn = torch.zeros((n, longest), dtype=torch.bool)
        pool_mask = torch.zeros((n, longest), dtype=torch.bool)
        n_prefix, n_suffix = len(self._prefix), len(self._suffix)
        for row, t in enumerate(items):
            offset = longest - len(t.ids) if side == "left" else 0
            if ids is not None:
                ids[row, offset:offset + len(t.ids)] = torch.tensor(t.ids, dtype=torch.long)
            attn[row, offset:offset + len(t.ids)] = True
            if t.start >= 0:
                pool_mask[row, offset + t.start:offset + t.end] = True
            else:  # empty text: its special tokens
                pool_mask[row, offset:offset + n_prefix] = True
                if n_suffix:
                    pool_mask[row, offset + len(t.ids) - n_suffix:offset + len(t.ids)] = True
        positions = (attn.long().cumsum(1) - 1).clamp_min(0)
        return {"input_ids": ids, "attention_mask": attn.long(), "pool_mask": pool_mask,
                "position_ids": positions}

    # ------------------------------------------------------------------ forward
    def token_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states (batch, seq, dim) for a collated batch (a packed one comes back right padded)."""
        dev = self.device
        if "lengths" in batch:
            lengths = batch["lengths"].tolist()
            with packed_attention(self.model, lengths):
                out = self.model(input_ids=batch["input_ids"].to(dev), position_ids=batch["position_ids"].to(dev))
            return unpack(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], lengths)
        kwargs = {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev)}
        if self._takes_position_ids:
            kwargs["position_ids"] = batch["position_ids"].to(dev)
        out = self._run_compiled(kwargs, torch.is_grad_enabled())
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def compile(self, training: bool = False, **compile_kwargs: Any) -> Encoder:
        """Opt in to ``torch.compile`` for ``encode``, or with ``training=True`` for training; returns ``self``.

        Fuses the elementwise work between the matmuls (norms, rotary, activations, residual adds). Measured on the
        default model, 2 CPU cores, bf16 (``benchmarks/RESULTS.md``): with torch's bf16 (``cpu_kernel=False``)
        inference up to ~11% faster than the packed path after a one-time compile of 30-110 s; with the default
        bf16 CPU kernel no gain (0.95x; the kernel is opaque to inductor); a SimCSE training step 1.15-1.4x
        faster after 3-10 minutes of compiling. Inference then uses the padded layout (the packed path's
        per-length attention would split the graph). ``training=True`` compiles the forwards that run with
        gradients (forward and backward); ``training=False`` leaves them eager. Shapes are dynamic, so new batch
        shapes do not recompile. If compilation fails (e.g. no C++ compiler for the CPU backend), the encoder warns
        once and runs eagerly.
        """
        compiled = torch.compile(self.model, **{"dynamic": True, **compile_kwargs})
        if training:
            object.__setattr__(self, "_compiled_train", compiled)
        else:
            object.__setattr__(self, "_compiled", compiled)
            self.packing = False
        self._compile_checked.discard("_compiled_train" if training else "_compiled")
        return self

    def _run_compiled(self, kwargs: dict[str, torch.Tensor], grad: bool) -> Any:
        """The model's forward through the compiled module for this grad mode, if any; eager on failure."""
        attr = "_compiled_train" if grad else "_compiled"
        compiled = getattr(self, attr)
        if compiled is None:
            return self.model(**kwargs)
        if attr in self._compile_checked:
            return compiled(**kwargs)
        try:
            out = compiled(**kwargs)
        except Exception as exc:  # noqa: BLE001 - any backend failure: fall back, never lose the job
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          f"{'training' if grad else 'encoding'} without compilation.",
                          stacklevel=_caller_stacklevel(inspect.getfile(nn.Module)))  # via encode or encoder(batch)
            object.__setattr__(self, attr, None)
            if not grad:
                self.packing = None
            return self.model(**kwargs)
        self._compile_checked.add(attr)
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embeddings (batch, dim) for a collated batch; differentiable (used by training)."""
        hidden = self.token_states(batch)
        dev = hidden.device
        return pool(self.pooling, hidden, batch["pool_mask"].to(dev), batch["attention_mask"].to(dev))

    def uses_packing(self) -> bool:
        """Whether ``encode`` packs texts into padding-free rows: ``self.packing`` when set, else automatic.

        Automatic: on CPU only (measured faster there; GPUs keep the padded path), and only when the packed
        forward is proven equal to the padded one on this model (:func:`l2v.packing.check_packing`, run once).
        """
        if self.packing is not None:
            return bool(self.packing)
        if self.device.type != "cpu" or not self._takes_position_ids:
            return False
        if self._window_below_max_length():
            return False
        if self._packing_probe is None:
            cfg = self._forward_target().config
            text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            self._packing_probe = check_packing(self.model, int(getattr(text_cfg, "vocab_size", 2) or 2),
                                                self._pad_id)
        return self._packing_probe

    def _window_below_max_length(self) -> bool:
        """A causal sliding-window model (Mistral, Gemma 2 left causal) whose window is shorter than ``max_length``:
        packed rows carry no window mask, so a text longer than the window would differ from the padded path,
        and the packing probe's short texts cannot show it. (make_bidirectional widens windows past any length.)"""
        objs = [m.config for m in self.model.modules() if hasattr(m, "config")] + list(self.model.modules())
        return any(is_limited_window(getattr(o, "sliding_window", None)) and o.sliding_window < self.max_length
                   for o in objs)

    # ------------------------------------------------------------------- encode
    def encode(
        self,
        sentences: str | Sequence[Item],
        instruction: str | None = None,
        batch_size: int = 128,
        normalize: bool | None = None,
        show_progress_bar: bool | None = None,
        convert_to: Literal["numpy", "torch"] | None = None,
        normalize_embeddings: bool | None = None,
        dimensions: int | None = None,
        max_tokens_per_batch: int | None = DEFAULT_MAX_TOKENS,
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        convert_to_numpy: bool | None = None,
        convert_to_tensor: bool | None = None,
        precision: Precision = "float32",
        output_value: str | None = "sentence_embedding",
        device: str | torch.device | None = None,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Embed texts; returns (n, dim) in input order (a 1-D vector for a single string).

        ``sentences``: strings, or ``(instruction, text)`` pairs; ``instruction`` applies to plain strings. A bare
        tuple is a sequence of texts, like a list: wrap a single pair in a list.
        Empty strings are valid (pooled over the special tokens). Texts longer than ``max_length`` tokens are
        truncated with one warning. Embeddings are float32 whatever the model dtype.

        ``dimensions``: keep only the first k dimensions (Matryoshka-style), re-normalised when ``normalize``.

        Batching never changes the result (up to float rounding): texts are tokenized ``STREAM_CHUNK`` at a time
        (memory stays flat for any number of texts), sorted by length and cut into batches of at most
        ``batch_size`` texts and ``max_tokens_per_batch`` tokens (``None``: no token limit). On CPU the texts of
        a batch are packed into one padding-free row (``self.packing``), so the budget counts real tokens.

        sentence-transformers' keywords mean what they mean there (``SentenceTransformer.encode``):
        ``prompt`` = ``instruction`` (tokenised separately and never pooled, as ST with ``include_prompt=False``);
        ``prompt_name`` picks an instruction from ``self.prompts``, and without any of the three,
        ``self.default_prompt_name`` applies (``instruction=""`` opts out); ``truncate_dim`` = ``dimensions``;
        ``normalize_embeddings`` = ``normalize``; ``convert_to_tensor=True`` gives one tensor (it wins over
        ``convert_to_numpy``), ``convert_to_numpy=False`` alone a list of 1-D tensors; ``precision`` quantizes as
        ``sentence_transformers.quantization.quantize_embeddings`` (see :func:`quantize_embeddings`); ``device``
        must be the encoder's own device; ``output_value`` only ``"sentence_embedding"``.
        Deliberate differences from ST: two synonyms given with different values (``prompt`` and ``prompt_name``
        included, where ST warns and uses ``prompt``) are a ValueError naming both, not a silent choice; tensors
        come back on the CPU (ST leaves them on the model's device; l2v collects on the CPU so device memory stays
        flat for any corpus); ``device`` never moves the model; empty input is (0, dim), not ``[]``.
        """
        normalize = bool(_pick("normalize", normalize, "normalize_embeddings", normalize_embeddings))
        dimensions = _pick("dimensions", dimensions, "truncate_dim", truncate_dim)
        kind = _output_kind(convert_to, convert_to_numpy, convert_to_tensor)
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if max_tokens_per_batch is not None and (not _is_int(max_tokens_per_batch) or max_tokens_per_batch < 1):
            raise ValueError(f"max_tokens_per_batch must be a positive integer or None, got {max_tokens_per_batch!r}.")
        if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= self.dim):
            name = "dimensions" if truncate_dim is None else "truncate_dim"
            raise ValueError(f"{name} must be an integer in [1, {self.dim}] or None, got {dimensions!r}.")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}.")
        if output_value != "sentence_embedding":
            raise ValueError(f"output_value={output_value!r} is not supported: encode returns sentence embeddings "
                             "only ('sentence_embedding'); for per-token states use Encoder.token_states on a "
                             "collated batch.")
        self._check_device(device)
        instruction = self._resolve_instruction(instruction, prompt, prompt_name)
        texts, instructions, single = normalize_inputs(sentences, instruction)
        # numpy integers are fine (e.g. sizes computed with numpy); downstream checks want plain ints
        cut = dimensions is not None and int(dimensions) < self.dim
        out = self._encode_texts(texts, instructions, int(batch_size), normalize and not cut, show_progress_bar,
                                 None if max_tokens_per_batch is None else int(max_tokens_per_batch))
        if cut:
            out = out[:, :int(dimensions)].contiguous()
            if normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
        result: np.ndarray | torch.Tensor = out
        if precision != "float32":
            result = quantize_embeddings(out.numpy(), precision)
        if kind == "numpy":
            result = result.numpy() if isinstance(result, torch.Tensor) else result
        else:
            result = torch.from_numpy(result) if isinstance(result, np.ndarray) else result
        if kind == "list":
            result = list(result)
        return result[0] if single else result

    def encode_query(self, sentences: str | Sequence[Item], **kwargs: Any) -> np.ndarray | torch.Tensor | list:
        """``encode`` with the prompt named "query" when no instruction, prompt or prompt_name is given and
        ``self.prompts`` has one (sentence-transformers v5's ``encode_query``; else as ``encode``)."""
        return self.encode(sentences, **self._task_prompt(kwargs, ("query",)))

    def encode_document(self, sentences: str | Sequence[Item], **kwargs: Any) -> np.ndarray | torch.Tensor | list:
        """``encode`` with the first of the prompts named "document", "passage", "corpus" when no instruction,
        prompt or prompt_name is given (sentence-transformers v5's ``encode_document``; else as ``encode``)."""
        return self.encode(sentences, **self._task_prompt(kwargs, ("document", "passage", "corpus")))

    def _task_prompt(self, kwargs: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        if all(kwargs.get(k) is None for k in ("instruction", "prompt", "prompt_name")):
            name = next((n for n in names if n in self.prompts), None)
            if name is not None:
                kwargs = {**kwargs, "prompt_name": name}
        return kwargs

    def _resolve_instruction(self, instruction: str | None, prompt: str | None, prompt_name: str | None
                             ) -> str | None:
        """The call's instruction from ``instruction`` / ``prompt`` / ``prompt_name``, else the default prompt."""
        for name, value in (("instruction", instruction), ("prompt", prompt), ("prompt_name", prompt_name)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {type(value).__name__}.")
        text = _pick("instruction", instruction, "prompt", prompt)
        if prompt_name is not None:
            named = self._named_prompt(prompt_name, "prompt_name")
            if text is not None and text != named:
                given = "instruction" if instruction is not None else "prompt"
                raise ValueError(f"{given}={text[:60]!r} and prompt_name={prompt_name!r} (= {named[:60]!r}) disagree; "
                                 "pass one of them.")
            return named
        if text is None and self.default_prompt_name is not None:
            return self._named_prompt(self.default_prompt_name, "default_prompt_name")
        return text

    def _named_prompt(self, name: str, what: str) -> str:
        if name not in self.prompts:
            known = ", ".join(map(repr, self.prompts)) or "none (set Encoder.prompts, or from_pretrained(prompts=...))"
            raise ValueError(f"{what}={name!r} is not one of this encoder's prompts: {known}.")
        return self.prompts[name]

    def _check_device(self, device: Any) -> None:
        """Refuse a ``device`` other than the encoder's: sentence-transformers moves the model there, but l2v picks
        the dtype and CPU kernel for the device at load time (the kernel's packed weights cannot move)."""
        if device is None:
            return
        if isinstance(device, (list, tuple)):
            raise ValueError(f"device={list(device)!r} asks for sentence-transformers' multi-process encoding, which "
                             "l2v does not do; run one encoder per device (or l2v encode-corpus --shard).")
        try:
            want = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a torch device.") from exc
        if _canonical_device(want) != _canonical_device(self.device):
            raise ValueError(f"device={str(device)!r}, but this encoder is on {self.device}; encode does not move the "
                             f"model (sentence-transformers does). Load it there: Encoder.from_pretrained(..., "
                             f"device={str(device)!r}).")

    def _encode_texts(self, texts: list[str], instructions: list[str | None], batch_size: int, normalize: bool,
                      show_progress_bar: bool | None, max_tokens_per_batch: int | None) -> torch.Tensor:
        """(n, dim) float32 CPU embeddings of already validated texts, in input order."""
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        if not texts:
            return out
        if show_progress_bar is None:
            show_progress_bar = len(texts) > 4 * batch_size
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        packed = self.uses_packing()
        collate = self.collate_packed if packed else self.collate
        n_trunc = 0
        try:
            with torch.inference_mode(), tqdm(total=len(texts), desc="encode", unit="text",
                                              disable=not show_progress_bar) as bar:
                for chunk in chunk_ranges(len(texts), STREAM_CHUNK):
                    items = self.tokenize_many([texts[i] for i in chunk], [instructions[i] for i in chunk])
                    n_trunc += sum(t.truncated for t in items)
                    for idx in plan_batches([len(t.ids) for t in items], batch_size, max_tokens_per_batch, packed):
                        emb = self.checked(self.forward(collate([items[i] for i in idx])).float())
                        if normalize:
                            emb = torch.nn.functional.normalize(emb, dim=-1)
                        out[[chunk.start + i for i in idx]] = emb.cpu()
                        bar.update(len(idx))
                    del items
        finally:
            self.model.train(was_training)
        if n_trunc:
            warnings.warn(f"{n_trunc} of {len(texts)} texts were longer than max_length={self.max_length} "
                          "tokens and were truncated.", stacklevel=_caller_stacklevel())
        return out

    def checked(self, emb: torch.Tensor) -> torch.Tensor:
        """``emb``, or a clear error if the forward produced NaN/inf (fp16 overflow on some models, bad weights):
        returning them would silently poison every similarity computed from them."""
        if not bool(torch.isfinite(emb).all()):
            hint = (" fp16 overflows on some models; load with dtype='float32' (or 'bfloat16' where supported)."
                    if self.dtype == torch.float16 else " Check the model's weights.")
            raise FloatingPointError(f"the model produced non-finite (NaN/inf) embeddings in {self.dtype}.{hint}")
        return emb

    @property
    def similarity_fn_name(self) -> str:
        """What :meth:`similarity` computes: "cosine" (default), "dot", "euclidean" or "manhattan" (the negative
        distances), as sentence-transformers' ``similarity_fn_name``."""
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, name: str) -> None:
        self._similarity_fn_name = check_similarity_fn_name(name)

    def similarity(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Similarity matrix between two sets of embeddings (``b`` defaults to ``a``), by ``similarity_fn_name``
        (cosine unless set).

        Each side is one vector or an (n, dim) matrix: numpy, lists (of vectors or 1-D tensors, as
        ``encode(convert_to_numpy=False)`` returns), or torch tensors of any dtype and device (e.g. ``forward``'s
        output, which requires grad). Unlike sentence-transformers (a torch tensor), the result is numpy.
        """
        ta = _as_matrix(a, "a")
        tb = ta if b is None else _as_matrix(b, "b")
        if ta.shape[1] != tb.shape[1]:
            raise ValueError(f"similarity: a has dimension {ta.shape[1]} but b has {tb.shape[1]}; both must be "
                             "embeddings of the same size.")
        fn = self.similarity_fn_name
        if fn == "cosine":
            ta, tb = torch.nn.functional.normalize(ta, dim=-1), torch.nn.functional.normalize(tb, dim=-1)
        if fn in ("cosine", "dot"):
            return (ta @ tb.T).numpy()
        return (-torch.cdist(ta, tb, p=2.0 if fn == "euclidean" else 1.0)).numpy()


def _caller_stacklevel(*skip: str) -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that names the first frame outside this file
    (and the files ``skip``): the user's line, whichever entry point (``encode``, ``encode_query``, ...) led there
    (Python 3.12's ``skip_file_prefixes``, for 3.11)."""
    files = (__file__, *skip)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename in files:
        frame, level = frame.f_back, level + 1
    return level


def embedding_dim(config: Any) -> int | None:
    """Width of a model's output token states (so of its embeddings), from its config; None if it has none.

    OPT projects its output to ``word_embed_proj_dim`` when that differs (opt-350m: hidden 1024, output 512).
    """
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("word_embed_proj_dim", "hidden_size", "n_embd"):
        if value := getattr(text_cfg, name, None):
            return int(value)
    return None


def _as_matrix(x: Any, name: str) -> torch.Tensor:
    """A float32 CPU (n, dim) tensor from a vector or matrix (numpy, list, or any torch tensor)."""
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) for v in x):
        x = torch.stack([v.detach().to("cpu") for v in x])
    t = x.detach().to("cpu", torch.float32) if isinstance(x, torch.Tensor) else torch.as_tensor(
        np.asarray(x, dtype=np.float32))
    t = torch.atleast_2d(t)
    if t.ndim != 2:
        raise ValueError(f"similarity: {name} must be one vector or an (n, dim) matrix, got shape {tuple(t.shape)}.")
    return t


def _check_max_length(max_length: Any) -> int:
    if not _is_int(max_length) or max_length < 4:
        raise ValueError(f"max_length must be an integer >= 4, got {max_length!r}.")
    return int(max_length)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (``None``: CUDA, else MPS, else CPU), refusing one this machine lacks."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'."
                         ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but CUDA is not available here; use device='cpu' (or None).")
    return dev


def _is_int(value: Any) -> bool:
    """Any integer type (Python or numpy), but not bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _want_cpu_kernel(requested: bool | str | None, dtype: torch.dtype, device: torch.device) -> bool:
    """Resolve ``cpu_kernel``: only bf16 on CPU; ``True`` (or a weight format) insists (clear error), ``None`` uses
    it when it builds."""
    if isinstance(requested, str) and requested not in ("int16", "bf16"):
        raise ValueError(f"cpu_kernel must be None, True, False, 'int16' or 'bf16', got {requested!r}.")
    if requested is False:
        return False
    if device.type != "cpu" or dtype != torch.bfloat16:
        if requested:
            raise ValueError(f"cpu_kernel={requested!r} needs dtype bfloat16 on CPU, got {dtype} on {device}.")
        return False
    ok, reason = kernel_status()
    if requested and not ok:
        raise RuntimeError(f"cpu_kernel={requested!r}, but l2v's CPU kernel is unavailable: {reason}.")
    if not ok and not _FALLBACK_WARNED:
        _FALLBACK_WARNED.append(reason)
        warnings.warn(f"l2v's CPU kernel is unavailable ({reason}); bf16 runs on torch's plain bf16, where "
                      "about 1 text in 100 ends below cosine 0.99 against fp32 (README, 'Precision'). Load with "
                      "dtype='float32' for exact vectors, or cpu_kernel=False to silence this.", stacklevel=3)
    return ok


_FALLBACK_WARNED: list[str] = []  # warn once per process


def _stored_16bit_dtype(weights_path: str) -> torch.dtype | None:
    """bf16/fp16 when the checkpoint's config says its weights are stored in that dtype, else None."""
    try:
        from transformers import AutoConfig

        stored = getattr(AutoConfig.from_pretrained(weights_path), "dtype", None)
    except (OSError, ValueError):
        return None
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.bfloat16, torch.float16) else None


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                          "tokenizer.model", "vocab.json"))


def _adapter_base(adapter_dir: str) -> str:
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir}: adapter_config.json does not name base_model_name_or_path; "
                         "pass the base model explicitly: from_pretrained(base, adapter=...).")
    return base


def _apply_adapter(net: nn.Module, adapter_path: str, merge: bool) -> nn.Module:
    from peft import PeftModel

    p = Path(adapter_path)
    if not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_path}: not a PEFT adapter directory (no adapter_config.json).")
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(net, str(p))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"{adapter_path}: adapter does not fit this base model ({exc}).".replace("\n", " ")[:600]) \
            from exc
    return peft_model.merge_and_unload() if merge else peft_model


def _strip_is_causal(config_json: Path) -> None:
    """Drop ``is_causal`` from a saved config: l2v re-enables bidirectionality from l2v_config.json, and a stale
    flag would make plain transformers build inconsistent masks."""
    if not config_json.is_file():
        return
    data = json.loads(config_json.read_text(encoding="utf-8"))
    changed = False
    for d in [data, *[v for v in data.values() if isinstance(v, dict)]]:
        if "is_causal" in d:
            del d["is_causal"]
            changed = True
    if changed:
        config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
