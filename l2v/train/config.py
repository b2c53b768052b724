"""Training configs: dataclasses loadable from JSON/YAML, with command-line overrides generated from the fields.

``TrainConfig`` holds what every objective shares (data, optimisation, LoRA, checkpoints); ``MNTPConfig`` and
``SimCSEConfig`` add their own fields. A new objective subclasses ``TrainConfig`` and gets a config file
format and CLI options for free (see :func:`add_config_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C", bound="TrainConfig")


@dataclass
class TrainConfig:
    # model
    model: str | None = None
    """Start from: 'smollm2-135m' (default), a model directory, an l2v encoder directory (its adapters are
    merged first, e.g. an MNTP output for SimCSE) or a hub id."""
    adapter: str | None = None
    """An extra PEFT adapter to merge before training (saved on the base transformer)."""
    bidirectional: bool = True
    pooling: str = "mean"
    max_length: int = 128
    # data
    data: str = "builtin"
    """Corpus: a .txt file (one text per line), a .jsonl file, 'builtin', or 'hub:wikitext-103' /
    'hub:wiki1m_for_simcse' (network on first use)."""
    text_field: str = "text"
    max_texts: int | None = None
    val_size: int = 64
    """Texts held out (from the end of the shuffled corpus) for validation."""
    # optimisation
    seed: int = 42
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 10
    schedule: str = "linear"
    """'linear' (warmup then linear decay to 0) or 'constant' (warmup then flat)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "auto"
    """Autocast: 'auto' (bf16 where the CPU/GPU runs it natively), 'bfloat16', 'float16' or 'float32'."""
    device: str | None = None
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile the model's training forward and backward: a one-time compile (3-10 min for the default
    model on 2 CPU cores), then 1.15-1.4x faster SimCSE steps there (no gain for MNTP); worth it for runs of
    several hundred steps."""
    threads: int | None = None
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    """Comma-separated module names, or 'all-linear' (every attention and MLP projection)."""
    # output
    output_dir: str = "runs/train"
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    log_every: int = 1
    eval_every: int = 0
    merge: bool = False
    """Also write the adapter merged into full weights (safetensors), loadable without peft."""
    resume: bool = False
    overwrite: bool = False
    """Train into an --output-dir that holds an earlier run, replacing it (its checkpoints are removed first).
    Without it l2v refuses, so a finished encoder is never replaced by accident."""
    progress: bool = True

    # ------------------------------------------------------------------ io
    @classmethod
    def from_file(cls: type[C], path: str | Path) -> C:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{path}: no such config file (JSON or YAML).")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
        if p.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: invalid YAML ({' '.join(str(exc).split())}).") from exc
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: invalid JSON ({exc}); YAML files must end in .yaml/.yml.") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}.")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        data.pop("objective", None)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                             f"known: {', '.join(sorted(names))}.")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            data[name] = _typed(value, hints[name], f"{source}: {name}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path, objective: str | None = None) -> None:
        from ..io import atomic_write_text

        data = {"objective": objective, **self.to_dict()} if objective else self.to_dict()
        atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")

    def replace(self: C, **changes: Any) -> C:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be an integer >= {0 if allow_zero else 1}, got {v!r}.")

        for name in ("steps", "batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length", "log_every"):
            positive(name)
        for name in ("warmup_steps", "save_every", "val_size", "eval_every", "keep_checkpoints"):
            positive(name, allow_zero=True)
        if self.max_texts is not None:  # 0 used to mean "no limit" (every text)
            positive("max_texts")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}.")
        from ..pooling import check_pooling

        check_pooling(self.pooling)  # before the model loads, not at the first forward pass
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"schedule must be 'linear' or 'constant', got {self.schedule!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}.")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: resume continues the run in output_dir, "
                             "overwrite replaces it; pass one.")
        if self.compile and self.gradient_checkpointing:
            raise ValueError("compile and gradient_checkpointing cannot be combined: transformers' checkpointing "
                             "breaks the compiled graph, so the layers would run eagerly; use compile for speed or "
                             "gradient_checkpointing for memory.")


@dataclass
class MNTPConfig(TrainConfig):
    output_dir: str = "runs/mntp"
    lr: float = 5e-5
    batch_size: int = 8
    max_length: int = 128
    mask_fraction: float = 0.2
    """Share of each text's tokens that are masked and predicted (exactly this share per text, at least one;
    official LLM2Vec draws each token with this probability: mlm_probability 0.2, 0.8 for Mistral)."""
    mask_token: str = "auto"
    """'auto' (default: the tokenizer's own mask token if it has one, e.g. Gemma's <mask>, else '_', as official
    LLM2Vec does), '_' or any vocabulary entry or one-token string, 'eos', or 'new' (adds a <|l2v_mask|> token)."""
    mask_mode: str = "all"
    """'all': every masked token becomes the mask token (official LLM2Vec's all_mask collator, its Mistral
    recipe); 'bert': 80% mask token, 10% random token, 10% unchanged (its default collator, the Llama-2/3 and
    Sheared-LLaMA recipes)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.mask_fraction < 1:
            raise ValueError(f"mask_fraction must be in (0, 1), got {self.mask_fraction!r}.")
        if self.mask_mode not in ("all", "bert"):
            raise ValueError(f"mask_mode must be 'all' or 'bert', got {self.mask_mode!r}.")


@dataclass
class SimCSEConfig(TrainConfig):
    output_dir: str = "runs/simcse"
    lr: float = 3e-5
    batch_size: int = 32
    max_length: int = 128
    attention_dropout: float = 0.3
    scale: float = 20.0
    """Cosine similarities are multiplied by this before the softmax (temperature 1/scale)."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}.")
        if self.batch_size < 2:
            raise ValueError("SimCSE needs batch_size >= 2 (in-batch negatives).")


# ---------------------------------------------------------------------------- CLI
def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``bool`` stays bool."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a field's type: a file's ``"false"`` must not pass as a (truthy) bool, and YAML
    reads ``3e-5`` (no dot) as a string, so numeric strings are accepted for float fields."""
    tp = _base_type(hint)
    if value is None and type(None) in typing.get_args(hint):
        return None
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp not in (bool, int, float, str) or (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
    raise ValueError(f"{where} must be {kind}, got {value!r}.")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field in the class source (used as --help text)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for a, b in zip(body, body[1:], strict=False):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(getattr(b, "value", None), ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def add_config_args(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """One ``--field-name`` option per config field (default: from ``--config`` or the dataclass)."""
    parser.add_argument("--config", default=None, help="JSON or YAML file with config fields; options override it")
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        # argparse %-formats help strings: a literal % in a field's doc ("80% ...") must be escaped
        help_text = (docs.get(f.name, "") + f" (default: {default})").strip().replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, type=_parse_bool, nargs="?", const=True, default=None,
                                metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float) else str, default=None,
                                help=help_text)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config file (if any), then every option given on the command line."""
    cfg = cls.from_file(args.config) if getattr(args, "config", None) else cls()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if getattr(args, f.name, None) is not None}
    return cfg.replace(**overrides)
