"""How close does ``Encoder.encode`` run to this machine's matmul limit? (issue 6)

One run measures, on the default model and real English text (gensim's Lee news corpus):
  * the machine's bf16 and fp32 matmul rate (large GEMM and the model's own MLP shape, best of N);
  * l2v ``encode`` in bf16 and fp32, and a naive Hugging Face baseline written below (AutoModel, tokenizer padding
    to the batch maximum, batches in input order, mean pooling in a Python loop), interleaved so the ratio is
    measured under the same load; optionally dynamic int8;
  * sentences/s, tokens/s, model FLOP/s (2 x non-embedding params per token + attention 4 x layers x len x d
    per token) as a fraction of the measured bf16 matmul rate, min per-text cosine against l2v fp32, peak RSS.

    .venv/bin/python benchmarks/encode_speed.py            # default run (~5 min on a quiet 2-core machine)
    .venv/bin/python benchmarks/encode_speed.py --quick    # 128 sentences, 8 documents, 1 repetition
    .venv/bin/python benchmarks/encode_speed.py --stream 100000 --stream-layers 1   # peak memory, 100k texts
    .venv/bin/python benchmarks/encode_speed.py --compile  # also time Encoder.compile()
    python benchmarks/encode_speed.py --device cuda        # on a GPU: bf16 SDPA (+ flash-attention-2 if installed)

On a GPU the CPU-only rows (l2v's kernel variants) are left out, the sets default to 8,192 sentences and 256
documents (512 would take milliseconds), timings synchronise the device, and memory is the CUDA allocator's peak.

Timings on a shared machine are noisy: every row is the best of ``--reps`` interleaved repetitions and the
load average is printed with the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2v import Encoder  # noqa: E402
from l2v.data.offline import gensim_file  # noqa: E402
from l2v.kernels.malloc import describe as describe_malloc  # noqa: E402
from l2v.packing import attention_kernels  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


DEVICE = torch.device("cpu")  # set from --device in main()


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0, reps: int = 3) -> float:
    """Best GFLOP/s of ``(m,k) @ (k,n)^T`` as F.linear (the op the model uses) on ``DEVICE``."""
    a, w = torch.randn(m, k, device=DEVICE).to(dtype), torch.randn(n, k, device=DEVICE).to(dtype)
    for _ in range(2 if DEVICE.type == "cuda" else 1):  # GPU: the first call also picks the kernel
        torch.nn.functional.linear(a, w)
    sync()
    t = time.perf_counter()
    torch.nn.functional.linear(a, w)
    sync()
    iters = max(1, int(seconds / reps / max(time.perf_counter() - t, 1e-6)))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            torch.nn.functional.linear(a, w)
        sync()
        best = min(best, (time.perf_counter() - t) / iters)
    return 2 * m * k * n / best / 1e9


# ----------------------------------------------------------------------------------------------- data
def sentences(tok, n: int, lo: int = 20, hi: int = 40) -> list[str]:
    docs = gensim_file("lee_background.cor").read_text(encoding="utf-8").splitlines()
    out = []
    for d in docs:
        for s in re.split(r"(?<=[.!?])\s+", d.strip()):
            if lo <= len(tok(s, add_special_tokens=False)["input_ids"]) <= hi:
                out.append(s)
    if len(out) < n:
        out = (out * (n // max(len(out), 1) + 1))
    return out[:n]


def documents(tok, n: int, length: int = 400) -> list[str]:
    """~``length``-token documents: consecutive Lee news stories joined, cut at ``length`` tokens."""
    docs = [d.strip() for d in gensim_file("lee_background.cor").read_text(encoding="utf-8").splitlines() if d.strip()]
    out, i = [], 0
    while len(out) < n:
        text = ""
        while len(tok(text, add_special_tokens=False)["input_ids"]) < length:
            text = (text + " " + docs[i % len(docs)]).strip()
            i += 1
        ids = tok(text, add_special_tokens=False)["input_ids"][: length - 2]
        out.append(tok.decode(ids))
    return out


# -------------------------------------------------------------------------------------------- naive
def naive_encode(model, tok, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """What most people write: pad each batch (input order) to its longest text, mean-pool example by example."""
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], padding=True, return_tensors="pt").to(model.device)
            hidden = model(**enc).last_hidden_state
            for row in range(hidden.shape[0]):
                keep = enc["attention_mask"][row].bool()
                out.append(hidden[row][keep].float().mean(0))
    return torch.stack(out).cpu().numpy()


# ------------------------------------------------------------------------------------------- flops
def model_flops(encoder: Encoder, lengths: list[int]) -> float:
    net = encoder._forward_target()
    cfg = net.config.get_text_config() if hasattr(net.config, "get_text_config") else net.config
    # the state dict, not parameters(): l2v's CPU kernel keeps linear weights packed in buffers, and its
    # state_dict writes them back out as the original weights
    weights = net.state_dict()
    emb = sum(v.numel() for name, v in weights.items() if "embed" in name or "wte" in name or "wpe" in name)
    non_emb = sum(v.numel() for v in weights.values()) - emb
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    attn = sum(4 * cfg.num_hidden_layers * n * n * d_attn for n in lengths)
    return 2 * non_emb * sum(lengths) + attn


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def timed(fn, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        gc.collect()
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def stream_memory(args) -> None:
    """Peak RSS while encoding ``--stream`` short texts (model cut to ``--stream-layers`` layers to keep it quick)."""
    enc = Encoder.from_pretrained(dtype="bfloat16")
    net = enc._forward_target()
    if args.stream_layers:
        net.layers = net.layers[: args.stream_layers]
    base = sentences(enc.tokenizer, 1000)
    texts = [base[i % len(base)] for i in range(args.stream)]
    gc.collect()
    before = rss_mb()
    t = time.perf_counter()
    out = enc.encode(texts, show_progress_bar=False)
    dt = time.perf_counter() - t
    print(f"stream: {len(texts)} texts, {args.stream_layers or 'all'} layers, {dt:.1f}s; RSS before {before:.0f} MB, "
          f"peak {peak_rss_mb():.0f} MB (output array {out.nbytes / 2**20:.0f} MB)")


def _torch_attention(fn, *args, **kwargs):
    with attention_kernels(False):
        return fn(*args, **kwargs)


def _fp32_math(variant: str) -> bool:
    """Whether a row's matmuls run in fp32 ("l2v fp32", "naive fp32", int8 with fp32 activations)."""
    return variant.endswith(" fp32") or "int8" in variant


def _pct(x: float | None) -> str:
    return f"{100 * x:5.1f}%" if x else "    - "


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or a GPU such as cuda / cuda:1")
    ap.add_argument("--sentences", type=int, default=None, help="short sentences, 20-40 tokens (512; GPU: 8192)")
    ap.add_argument("--docs", type=int, default=None, help="~400-token documents (16; GPU: 256)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions; best is reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-tokens", type=int, default=None, help="encode(max_tokens_per_batch=...) (default: l2v's)")
    ap.add_argument("--batch-size", type=int, default=None, help="encode(batch_size=...) (default: l2v's)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 timings (the fp32 reference still runs)")
    ap.add_argument("--int8", action="store_true", help="also time dynamic int8 quantization (fp32 activations)")
    ap.add_argument("--compile", action="store_true",
                    help="also time Encoder.compile() (bf16; compile time reported separately)")
    ap.add_argument("--quick", action="store_true", help="128 sentences, 8 documents, 1 repetition, no fp32 timing")
    ap.add_argument("--stream", type=int, default=0, help="only measure peak RSS encoding this many short texts")
    ap.add_argument("--stream-layers", type=int, default=0, help="with --stream: keep only this many layers")
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    gpu = DEVICE.type != "cpu"
    if gpu and args.int8:
        ap.error("--int8 is torch's dynamic quantization, which runs on CPU only")
    args.sentences = args.sentences if args.sentences is not None else (8192 if gpu else 512)
    args.docs = args.docs if args.docs is not None else (256 if gpu else 16)
    if args.quick:
        args.sentences, args.docs, args.reps, args.no_fp32 = 128, 8, 1, True
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stream:
        stream_memory(args)
        return

    load0 = os.getloadavg()
    if gpu:
        torch.cuda.reset_peak_memory_stats(DEVICE)
    peaks = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        peaks[name] = max(matmul_rate(2048, 2048, 2048, dt), matmul_rate(4096, 576, 1536, dt))
    dev = {"device": DEVICE}
    enc16 = Encoder.from_pretrained(dtype="bfloat16", **dev)  # l2v's default: the int16 CPU kernel where it builds
    # torch's bf16 (activations in bf16): a separate row only where the default is the kernel; else the same model
    enc16t = Encoder.from_pretrained(dtype="bfloat16", cpu_kernel=False, **dev) if enc16.cpu_kernel else enc16
    enc32 = Encoder.from_pretrained(dtype="float32", **dev)
    # the kernel with bf16 weights: with its first 40% of layers in fp32 (its precise setting), and without
    enc16b = Encoder.from_pretrained(dtype="bfloat16", cpu_kernel="bf16") if enc16.cpu_kernel else None
    enc16f = Encoder.from_pretrained(dtype="bfloat16", cpu_kernel="bf16", fp32_layers=0) if enc16.cpu_kernel else None
    enc16fa = None  # GPU: flash-attention-2 (varlen, no padding) where the package is installed
    if gpu and importlib.util.find_spec("flash_attn") is not None:
        enc16fa = Encoder.from_pretrained(dtype="bfloat16", attn_implementation="flash_attention_2", **dev)
    l2v16 = f"l2v {enc16.kernel_format} kernel" if enc16.cpu_kernel else "l2v bf16"
    tok = enc16.tokenizer
    kw = {"show_progress_bar": False}
    if args.max_tokens is not None:
        kw["max_tokens_per_batch"] = args.max_tokens
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    sets = {"short": sentences(tok, args.sentences), "docs": documents(tok, args.docs)}
    naive_tok = type(tok).from_pretrained(tok.name_or_path) if tok.name_or_path else tok
    naive_tok.padding_side = "right"
    if naive_tok.pad_token is None:
        naive_tok.pad_token = naive_tok.eos_token
    for enc in (enc16, enc16b, enc16f, enc16t, enc32, enc16fa):
        if enc is not None:
            enc.encode(sets["short"][:8], **kw)  # warm-up (+ packing probe)
    compiled, compile_s = {}, {}
    if args.compile:  # compile (and see every batch shape once) before anything is timed
        # the default path, plus torch's bf16 when the default is the kernel (as for the eager rows)
        variants = {l2v16 + " compiled": enc16.cpu_kernel}
        if enc16.cpu_kernel:
            variants["l2v bf16 torch compiled"] = False
        for name, kernel in variants.items():
            compiled[name] = Encoder.from_pretrained(dtype="bfloat16", cpu_kernel=kernel, **dev).compile()
            t0 = time.perf_counter()
            for texts in sets.values():
                compiled[name].encode(texts, **kw)
            compile_s[name] = time.perf_counter() - t0

    rows = []
    for set_name, texts in sets.items():
        if not texts:
            continue
        lengths = [len(enc16.tokenize_one(t).ids) for t in texts]
        flops = model_flops(enc16, lengths)
        best, adj, outs = {}, {}, {}  # adj: achieved / matmul rate measured right before (same load), best rep
        probe = matmul_rate(4096, 576, 1536, torch.float32, 0.3, 1)
        best["l2v fp32"], ref = timed(lambda t=texts: enc32.encode(t, **kw), 1)  # the reference for cosines
        adj["l2v fp32"], outs["l2v fp32"] = flops / best["l2v fp32"] / 1e9 / probe, ref
        runs = {l2v16: lambda t=texts: enc16.encode(t, **kw),
                "naive bf16": lambda t=texts: naive_encode(enc16t.model, naive_tok, t)}
        if enc16f is not None:  # the default is l2v's kernel
            # the same default without l2v's attention and rotary kernels (torch SDPA)
            runs["default, torch attn"] = lambda t=texts: _torch_attention(enc16.encode, t, **kw)
            runs["bf16 kernel+fp32 layers"] = lambda t=texts: enc16b.encode(t, **kw)
            runs["bf16 kernel"] = lambda t=texts: enc16f.encode(t, **kw)
            runs["l2v bf16 torch"] = lambda t=texts: enc16t.encode(t, **kw)
        if enc16fa is not None:
            runs["l2v bf16 flash-attn-2"] = lambda t=texts: enc16fa.encode(t, **kw)
        for name, enc in compiled.items():
            runs[name] = lambda t=texts, e=enc: e.encode(t, **kw)
        if not args.no_fp32:  # fp32 is timed once (it is ~3x slower); bf16 is the target
            probe = matmul_rate(4096, 576, 1536, torch.float32, 0.3, 1)
            best["naive fp32"], outs["naive fp32"] = timed(lambda t=texts: naive_encode(enc32.model, naive_tok, t), 1)
            adj["naive fp32"] = flops / best["naive fp32"] / 1e9 / probe
        else:
            del best["l2v fp32"]
        best.update({k: float("inf") for k in runs})
        adj.update({k: 0.0 for k in runs})
        for _ in range(args.reps):  # interleaved: each repetition runs every variant once
            for k, fn in runs.items():
                probe = matmul_rate(4096, 576, 1536, torch.float32 if _fp32_math(k) else torch.bfloat16, 0.3, 1)
                dt, outs[k] = timed(fn, 1)
                best[k] = min(best[k], dt)
                adj[k] = max(adj[k], flops / dt / 1e9 / probe)
        if args.int8:
            q = Encoder(torch.ao.quantization.quantize_dynamic(enc32.model, {torch.nn.Linear}, dtype=torch.qint8),
                        enc32.tokenizer, pooling=enc32.pooling, max_length=enc32.max_length)
            q.encode(texts[:4], **kw)
            best["l2v int8 (dynamic)"], outs["l2v int8 (dynamic)"] = timed(lambda t=texts, q=q: q.encode(t, **kw), 1)
        for k, dt in best.items():
            peak = peaks["fp32" if _fp32_math(k) else "bf16"]
            rows.append({"set": set_name, "variant": k, "texts": len(texts), "tokens": sum(lengths),
                         "seconds": dt, "sent_per_s": len(texts) / dt, "tok_per_s": sum(lengths) / dt,
                         "gflops": flops / dt / 1e9, "frac_bf16_peak": flops / dt / 1e9 / peaks["bf16"],
                         "frac_own_peak": flops / dt / 1e9 / peak, "frac_adjacent_peak": adj.get(k),
                         "min_cos_vs_fp32": float(cosines(outs[k], ref).min()),
                         "n_cos_below_099": int((cosines(outs[k], ref) < 0.99).sum())})
        naive16 = best["naive bf16"]
        for r in rows:
            if r["set"] == set_name:
                r["speedup_vs_naive_bf16"] = naive16 / r["seconds"]
    load1 = os.getloadavg()

    where = torch.cuda.get_device_name(DEVICE) if gpu else f"threads={args.threads}"
    print(f"\nencode_speed  {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC  {where}  "
          f"torch {torch.__version__}  load avg before/after {load0[0]:.2f}/{load1[0]:.2f}")
    print(f"matmul peak (best of 2048^3 and 4096x576x1536): bf16 {peaks['bf16']:.0f} GFLOP/s, "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s")
    print(f"allocator: {describe_malloc()}")  # process-wide; every row ran under it (L2V_MALLOC_TUNE=0: off)
    hdr = (f"{'set':6} {'variant':23} {'texts':>5} {'tok':>6} {'sent/s':>7} {'tok/s':>7} {'GFLOP/s':>8} "
           f"{'%bf16pk':>7} {'%ownpk':>6} {'%adjpk':>6} {'vs naive':>8} {'min cos':>8} {'<0.99':>5}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['set']:6} {r['variant']:23} {r['texts']:5d} {r['tokens']:6d} {r['sent_per_s']:7.1f} "
              f"{r['tok_per_s']:7.0f} {r['gflops']:8.1f} {100 * r['frac_bf16_peak']:6.1f}% "
              f"{100 * r['frac_own_peak']:5.1f}% {_pct(r['frac_adjacent_peak'])} {r['speedup_vs_naive_bf16']:7.2f}x {r['min_cos_vs_fp32']:8.4f} {r['n_cos_below_099']:5d}")
    n_models = (2 + (enc16t is not enc16) + (enc16b is not None) + (enc16f is not None) + (enc16fa is not None)
                + len(compiled))
    print(f"peak RSS {peak_rss_mb():.0f} MB (all {n_models} models loaded)"
          + (f"; peak CUDA memory {torch.cuda.max_memory_allocated(DEVICE) / 2**30:.2f} GiB" if gpu else ""))
    for name, sec in compile_s.items():
        print(f"{name}: compile + first pass over both sets {sec:.0f} s (not in the rows above)")
    if enc16.cpu_kernel:
        print(f"{l2v16} (the CPU default): int16 fixed-point weights and matmul inputs, exact int32 sums, fp32 "
              f"activations (l2v.kernels), {enc16.fp32_layers} decoder layers in fp32; bf16 kernel: bf16 weights "
              f"and matmul inputs, fp32 sums and activations (cpu_kernel='bf16', fp32_layers=0); bf16 kernel+fp32 "
              f"layers: the same with its first {enc16b.fp32_layers} decoder layers in fp32 (cpu_kernel='bf16'); "
              "bf16 torch: every activation rounded to bf16 (cpu_kernel=False); default, torch attn: the default "
              "with transformers' rotary and torch's SDPA instead of l2v's attention and rotary kernels.")
    print("%bf16pk: model FLOP/s / bf16 peak measured at start; %ownpk: / the peak of the variant's own dtype;\n"
          "%adjpk: / the same dtype's 4096x576x1536 matmul rate measured just before that run (robust to load).")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "rows": rows, "load": [load0, load1],
                                               "allocator": describe_malloc(), "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
