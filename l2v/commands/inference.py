"""``l2v encode``, ``l2v similarity``, ``l2v info`` and ``l2v convert``: use a model without training it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODEL_HELP = "model: 'smollm2-135m' (embedded default), a local directory, an l2v encoder directory, or a hub id"


def int_in(low: int, high: int | None = None):
    """argparse type: an integer in [low, high], rejected while parsing, before any model loads. ``--max-length 0``
    was read as 'unset' (the default 512), and ``--port 99999`` failed in a socket traceback after loading."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}"
                                             f", got {value}")
        return value

    return parse


def add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """Options shared by every command that loads an encoder."""
    if positional:
        p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + " (default: smollm2-135m)")
    else:
        p.add_argument("--model", "-m", default=None, help=MODEL_HELP + " (default: smollm2-135m)")
    p.add_argument("--adapter", default=None, help="PEFT adapter directory to apply on top of the model")
    p.add_argument("--pooling", default=None, choices=["mean", "weighted_mean", "last_token", "eos", "bos"],
                   help="pooling over the text's tokens (default: from l2v_config.json, else mean)")
    p.add_argument("--causal", action="store_true", help="keep causal attention (ablation); default bidirectional")
    p.add_argument("--max-length", type=int_in(4), default=None, help="max tokens per text (default 512)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bf16 where the CPU/GPU runs it natively, else fp16 on CUDA and fp32 elsewhere")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    p.add_argument("--cpu-kernel", choices=["int16", "bf16", "off"], default=None,
                   help="bf16 on CPU: l2v's kernel with int16 fixed-point weights (the default where it builds: "
                        "bf16's speed, ~fp32 precision), with bf16 weights, or off (torch's bf16, every "
                        "activation rounded to bf16); README Precision")
    p.add_argument("--no-cpu-kernel", action="store_true", help="the same as --cpu-kernel off")
    p.add_argument("--fp32-layers", type=int_in(0), default=None, metavar="N",
                   help="with the CPU kernel: keep the first N decoder layers in fp32 (default: 0 with int16 "
                        "weights; 40%% of them with --cpu-kernel bf16, so every text stays at cosine >= 0.99 "
                        "with fp32)")


def kernel_kwargs(args: argparse.Namespace) -> dict:
    """``--cpu-kernel`` / ``--no-cpu-kernel`` / ``--fp32-layers`` as ``Encoder.from_pretrained``'s ``cpu_kernel``
    / ``fp32_layers``."""
    choice = getattr(args, "cpu_kernel", None)
    off = getattr(args, "no_cpu_kernel", False) or choice == "off"
    return {"cpu_kernel": False if off else choice, "fp32_layers": getattr(args, "fp32_layers", None)}


def load_from_args(args: argparse.Namespace):
    from ..encoder import Encoder

    enc = Encoder.from_pretrained(
        args.model, adapter=args.adapter, pooling=args.pooling, bidirectional=False if args.causal else None,
        max_length=args.max_length, dtype=args.dtype, device=args.device,
        **kernel_kwargs(args),
    )
    return enc.compile() if getattr(args, "compile", False) else enc


COMPILE_HELP = ("torch.compile the model first (a one-time compile of 0.5-2 min on CPU); pays only with "
                "--no-cpu-kernel (up to ~11%% faster), not with the default CPU kernel")


def read_texts(args_texts: list[str], path: str | None, field: str = "text") -> list[str]:
    """Texts from arguments, a file (.txt one per line, .jsonl with ``field``) or stdin ('-')."""
    from ..io import iter_lines, split_lines

    if args_texts:
        if path is not None:  # one of them would be silently ignored
            raise ValueError(f"give texts as arguments or --input {path}, not both.")
        return list(args_texts)
    if path is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no input: give texts as arguments, --input FILE, or pipe lines on stdin.")
        path = "-"
    # Lines end at \n / \r only (as in encode-corpus): str.splitlines() would also split inside a text at U+2028,
    # form feeds etc., shifting rows and breaking valid jsonl whose strings hold them unescaped.
    if path == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"<stdin>: not UTF-8 text ({exc.reason}).") from exc
        lines, name = split_lines(text), "<stdin>"
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: " + ("is a directory; give a file." if Path(path).is_dir()
                                                   else "no such file."))
        lines, name = [line for _, line in iter_lines(path)], path
    if name.endswith(".jsonl"):
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name}:{n}: invalid JSON ({exc.msg}).") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise ValueError(f"{name}:{n}: expected an object with a string field {field!r}.")
            out.append(rec[field])
    else:
        out = [line for line in lines if line.strip()]
    if not out:
        raise ValueError(f"{name}: no texts (the input is empty or has only blank lines).")
    return out


def cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    texts = read_texts(args.texts, args.input, args.field)
    out = Path(args.output)
    if out.suffix not in (".npy", ".jsonl"):
        raise ValueError(f"--output {args.output}: use a .npy or .jsonl file name.")
    if out.is_dir():  # found now, not after encoding everything
        raise IsADirectoryError(f"--output {args.output}: is a directory; give a .npy or .jsonl file name.")
    enc = load_from_args(args)
    vecs = enc.encode(texts, instruction=args.instruction, batch_size=args.batch_size, normalize=args.normalize,
                      show_progress_bar=not args.quiet)
    from ..io import atomic_file

    # the temporary file is removed if writing or the final rename fails (disk full, Ctrl-C)
    with atomic_file(out, "wb" if out.suffix == ".npy" else "w") as fh:
        if out.suffix == ".npy":
            np.save(fh, vecs)
        else:
            for t, v in zip(texts, vecs, strict=True):
                fh.write(json.dumps({"text": t, "embedding": [round(float(x), 7) for x in v]}) + "\n")
    if not args.quiet:
        print(f"wrote {len(texts)} embeddings of dim {vecs.shape[1] if vecs.ndim == 2 else 0} to {out}",
              file=sys.stderr)
    return 0


def cmd_similarity(args: argparse.Namespace) -> int:
    texts = read_texts(args.texts, args.input)
    if len(texts) < 2:
        raise ValueError("similarity needs at least 2 texts.")
    enc = load_from_args(args)
    vecs = enc.encode(texts, instruction=args.instruction, normalize=True)
    sim = enc.similarity(vecs)
    if args.json:
        print(json.dumps({"texts": texts, "similarity": sim.round(6).tolist()}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cosine similarity ({enc.name})")
    table.add_column("#", justify="right")
    table.add_column("text", overflow="fold", max_width=40)
    for j in range(len(texts)):
        table.add_column(str(j), justify="right")
    for i, t in enumerate(texts):
        table.add_row(str(i), t, *[f"{sim[i, j]:.3f}" for j in range(len(texts))])
    Console().print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Inspect a model: architecture, size, and whether bidirectional attention works (proved on the model)."""
    import torch
    from transformers import AutoConfig

    from ..bidirectional import UnsupportedArchitectureError, architecture_name, make_bidirectional
    from ..checkpoints import L2V_CONFIG, L2VConfig, load_base_model, resolve_model_path
    from ..encoder import embedding_dim

    path = resolve_model_path(args.model)
    l2v_cfg = L2VConfig.load(path) if (Path(path) / L2V_CONFIG).is_file() else None
    weights = path if (Path(path) / "config.json").is_file() or l2v_cfg is None else resolve_model_path(
        l2v_cfg.base_model)
    config = AutoConfig.from_pretrained(weights)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    info = {
        "model": args.model or "smollm2-135m",
        "path": str(path),
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_type": config.model_type,
        "layers": getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", None),
        "hidden_size": getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd", None),
        "embedding_dim": embedding_dim(config),
        "attention_heads": getattr(text_cfg, "num_attention_heads", None) or getattr(text_cfg, "n_head", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
        "max_position_embeddings": getattr(text_cfg, "max_position_embeddings", None),
    }
    if l2v_cfg is not None:
        info["l2v_config"] = {"base_model": l2v_cfg.base_model, "pooling": l2v_cfg.pooling,
                              "bidirectional": l2v_cfg.bidirectional, "max_length": l2v_cfg.max_length}
    if not args.no_check:
        model = load_base_model(weights, dtype=torch.float32, attn_implementation="sdpa")
        info["parameters"] = sum(p.numel() for p in model.parameters())
        try:
            make_bidirectional(model, check=True)
            info["bidirectional_supported"] = True
        except UnsupportedArchitectureError as exc:
            info["bidirectional_supported"] = False
            info["bidirectional_error"] = str(exc)
        info["architecture"] = architecture_name(model) if not config.architectures else info["architecture"]
    from ..kernels import convert_linears, decoder_layers, fp32_leading_layers, fuse_gated_mlps, kernel_status

    ok, reason = kernel_status()
    info["cpu_kernel"] = "available" if ok else f"unavailable ({reason}); bf16 on CPU uses torch's bf16"
    if ok and not args.no_check:  # what bf16 on CPU would run through the kernel for this model (the default)
        n_linear = convert_linears(model, fmt="int16")
        info["cpu_kernel"] += (f": {n_linear} linear layers in int16 fixed point, {fuse_gated_mlps(model)} fused "
                               "SiLU-gated MLPs")
        layers = decoder_layers(model)
        if layers is not None:
            info["cpu_kernel"] += (f"; with --cpu-kernel bf16 the first {len(fp32_leading_layers(model))} of "
                                   f"{len(layers)} decoder layers stay fp32")
    from ..kernels.malloc import describe

    info["cpu_allocator"] = describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert the embedded GGUF default model (or any GGUF file) to a safetensors directory."""
    from ..checkpoints import convert_gguf, default_model_dir

    if args.gguf is None:
        print(default_model_dir())
        return 0
    if not Path(args.gguf).is_file():
        raise FileNotFoundError(f"{args.gguf}: no such GGUF file.")
    if args.output is None:
        raise ValueError("--output DIR is required when converting a GGUF file.")
    print(convert_gguf(args.gguf, args.output))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="embed texts to a .npy or .jsonl file",
                       description="Embed texts given as arguments, from --input FILE (.txt one per line, "
                                   ".jsonl with a text field) or stdin.")
    p.add_argument("texts", nargs="*", help="texts to embed (else --input or stdin)")
    p.add_argument("--input", "-i", default=None, help="input file (.txt, .jsonl) or - for stdin")
    p.add_argument("--field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--output", "-o", default="embeddings.npy", help="output .npy or .jsonl (default embeddings.npy)")
    p.add_argument("--instruction", default=None, help="instruction prepended to every text (not pooled)")
    p.add_argument("--batch-size", type=int_in(1), default=32)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("similarity", help="print the cosine similarity matrix of texts",
                       description="Embed the texts and print their pairwise cosine similarities.")
    p.add_argument("texts", nargs="*", help="two or more texts (else --input or stdin)")
    p.add_argument("--input", "-i", default=None, help="input file, one text per line")
    p.add_argument("--instruction", default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("info", help="architecture, size and bidirectional support of a model",
                       description="Describe a model and prove (on the model itself) whether bidirectional "
                                   "attention can be enabled.")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP + " (default: smollm2-135m)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip loading weights for the bidirectional check")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert the embedded GGUF model (or a GGUF file) to safetensors",
                       description="Without arguments: convert the embedded default model into the cache and "
                                   "print its directory. With a GGUF file: convert it to --output.")
    p.add_argument("gguf", nargs="?", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--output", "-o", default=None)
    p.set_defaults(func=cmd_convert)
