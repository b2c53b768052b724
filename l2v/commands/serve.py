"""``l2v serve`` (OpenAI- and TEI-compatible embedding server) and ``l2v export`` (standalone merged model)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .inference import add_model_args, int_in, load_from_args


def prompt_arg(text: str) -> tuple[str, str]:
    """argparse type for ``--prompt NAME=TEXT`` (TEXT may be empty: the name then selects no instruction)."""
    name, sep, instruction = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=TEXT, got {text!r}")
    return name.strip(), instruction


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import ServeConfig, api_key_from_env, is_loopback, serve

    prompts: dict[str, str] = {}
    for name, text in args.prompt:
        if name in prompts:
            raise ValueError(f"--prompt {name}=... is given twice.")
        prompts[name] = text
    if args.instruction == "":
        raise ValueError("--instruction is empty; leave it out for no default instruction.")

    api_key = args.api_key or api_key_from_env()
    if not is_loopback(args.host):
        print(f"l2v serve: warning: binding to {args.host} exposes the server beyond this machine"
              + ("" if api_key else " WITHOUT an API key (set --api-key or L2V_API_KEY)") + ".", file=sys.stderr)
    config = ServeConfig(model_name=args.served_name or (args.model or "smollm2-135m"), api_key=api_key,
                         max_body_bytes=args.max_body_bytes, max_inputs=args.max_inputs,
                         max_input_tokens=args.max_input_tokens, max_batch_tokens=args.max_batch_tokens,
                         max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         normalize=not args.no_normalize, instruction=args.instruction, prompts=prompts)
    encoder = load_from_args(args)
    config = with_saved_prompts(config, encoder, cli_instruction=args.instruction)
    prompts = config.prompts
    print(f"l2v serve: {config.model_name} (dim {encoder.dim}, {encoder.device}) on http://{args.host}:{args.port}"
          f"/v1/embeddings and /embed (TEI){' (API key required)' if api_key else ''}"
          + (f"; prompts: {', '.join(prompts)}" if prompts else "")
          + ("; default instruction set" if config.instruction else ""), file=sys.stderr)
    serve(encoder, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def with_saved_prompts(config: Any, encoder: Any, cli_instruction: str | None) -> Any:
    """The encoder's saved prompts (``Encoder.prompts``, e.g. from an export) serve too; ``--prompt`` wins per
    name. Without ``--instruction`` its ``default_prompt_name`` is the default instruction, as in
    sentence-transformers, so a model saved with a query prompt needs no flags to be served as it encodes."""
    saved = dict(getattr(encoder, "prompts", None) or {})
    default_name = getattr(encoder, "default_prompt_name", None)
    if not saved:
        return config
    instruction = config.instruction
    if cli_instruction is None and default_name is not None:
        instruction = saved[default_name] or None
    return dataclasses.replace(config, prompts={**saved, **config.prompts}, instruction=instruction)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoints import L2V_CONFIG, is_default_model
    from ..export import check_target, export

    if args.model is None and not args.overwrite:
        # one positional argument is OUTDIR (MODEL is optional): `l2v export smollm2-135m` or `l2v export runs/x`
        # meant a model and forgot OUTDIR -- not "write the default model into ./smollm2-135m" / "not empty"
        out = Path(args.outdir)
        if is_default_model(args.outdir) or any((out / f).is_file() for f in ("config.json", L2V_CONFIG,
                                                                             "adapter_config.json")):
            raise ValueError(f"{args.outdir} names a model, but no output directory was given: "
                             "l2v export MODEL OUTDIR.")
    check_target(args.outdir, args.overwrite, flag="--overwrite")  # before loading the model
    args.fp32_layers = None  # export writes plain layers (no kernel), so there is no kernel/fp32 split to choose
    encoder = load_from_args(args)
    out = export(encoder, args.outdir, sentence_transformers=not args.no_sentence_transformers,
                 overwrite=args.overwrite)
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI-compatible (/v1/embeddings) and "
                                     "text-embeddings-inference (/embed) HTTP APIs",
                       description="Serve POST /v1/embeddings (OpenAI-compatible), GET /v1/models and GET /health; "
                                   "and text-embeddings-inference's POST /embed, POST /, POST /embed_all, "
                                   "POST /tokenize, POST /decode and GET /info. "
                                   "Concurrent requests are micro-batched. Binds to 127.0.0.1 unless --host says "
                                   "otherwise.")
    add_model_args(p, positional=True)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $L2V_API_KEY; none when unset)")
    p.add_argument("--served-name", default=None, help="model id reported to clients (default: MODEL)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="request body limit (413)")
    p.add_argument("--max-inputs", type=int, default=2048, help="inputs per request (413)")
    p.add_argument("--max-input-tokens", type=int, default=None,
                   help="tokens per input, at most --max-length (413; default: the model's max length)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--max-batch-size", type=int, default=128, help="texts per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the batcher collects concurrent requests before a forward pass")
    p.add_argument("--no-normalize", action="store_true", help="return raw (not unit-length) embeddings")
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="instruction for requests that choose none (LLM2Vec: the query instruction); a request's "
                        "'prompt_name' or 'instruction' field replaces it ('instruction': '' for none)")
    p.add_argument("--prompt", action="append", type=prompt_arg, default=[], metavar="NAME=TEXT",
                   help="a named instruction that requests choose with the body field 'prompt_name': NAME "
                        "(repeatable; an empty TEXT names no instruction, e.g. --prompt document=)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a merged, standalone safetensors model (+ sentence-transformers files)",
                       description="Load MODEL (with --adapter merged in) and write OUTDIR: safetensors weights, "
                                   "tokenizer, l2v_config.json and sentence-transformers files. OUTDIR reloads "
                                   "without peft.")
    add_model_args(p, positional=True)
    p.add_argument("outdir", help="output directory (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-sentence-transformers", action="store_true", help="skip modules.json and friends")
    # export keeps full precision unless --dtype says otherwise, and plain layers (one dtype in the checkpoint)
    p.set_defaults(func=cmd_export, dtype="float32", no_cpu_kernel=True)
