"""Training speed on the default model: seconds per optimizer step, peak RSS, and achieved model FLOP/s as a
fraction of this machine's bf16 matmul rate, measured in the same run.

    python benchmarks/train_speed.py                 # MNTP 8x128 and SimCSE 32x32 (two views), bf16 and fp32
    python benchmarks/train_speed.py --steps 3 --only simcse --dtypes bfloat16
    python benchmarks/train_speed.py --only simcse --dtypes bfloat16 --compile   # eager and torch.compile rows

Each configuration runs in its own subprocess so peak RSS is per configuration. Model FLOPs count what a step
must compute with a frozen base and LoRA: forward (2 x params x tokens + attention) and the input-gradient half
of the backward (the same again); frozen weights get no weight gradients. LoRA's own FLOPs (<1%) are ignored.
MNTP adds the LM head at the masked positions only (forward + input gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONFIGS = {
    # name: (objective, batch, tokens per text)
    "mntp": ("mntp", 8, 128),
    "simcse": ("simcse", 32, 32),
}


def matmul_rate(dtype_name: str, seconds: float = 3.0, n: int = 2048) -> float:
    """Sustained FLOP/s of an n x n matmul in ``dtype`` on this machine, with the threads torch uses."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _long_texts(tokenizer, n: int, tokens: int) -> list[str]:
    """n texts of at least ``tokens`` tokens each, made of real sentences from the built-in corpus."""
    from l2v.data.corpus import builtin_corpus

    sents = builtin_corpus()
    out, cur, i = [], [], 0
    while len(out) < n:
        cur.append(sents[i % len(sents)])
        i += 1
        text = " ".join(cur)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens + 4:
            out.append(text)
            cur = []
    return out


def run_one(name: str, dtype: str, steps: int, threads: int | None, compile: bool = False) -> dict:
    import torch

    from l2v.train.config import MNTPConfig, SimCSEConfig
    from l2v.train.loop import autocast_context, batch_generator

    if threads:
        torch.set_num_threads(threads)
    objective_name, batch, tokens = CONFIGS[name]
    common = dict(batch_size=batch, max_length=tokens, val_size=0, dtype=dtype, device="cpu", progress=False)
    if objective_name == "mntp":
        from l2v.train.mntp import MNTPObjective

        cfg, obj = MNTPConfig(**common), MNTPObjective(texts=["placeholder text for setup"] * batch)
    else:
        from l2v.train.simcse import SimCSEObjective

        cfg, obj = SimCSEConfig(**common), SimCSEObjective(texts=["placeholder text for setup"] * batch)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    obj.setup(cfg, device)
    setup_s = time.perf_counter() - t0
    if compile:
        obj.encoder.compile(training=True)  # what `--compile` does in the training loop
    texts = _long_texts(obj.encoder.tokenizer, batch, tokens)
    items = [obj.encoder.tokenize_one(t) for t in texts]
    assert all(len(t.ids) == tokens for t in items), "texts were not truncated to the target length"
    params = [p for _, p in obj.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = autocast_context(dtype, device)
    obj.model.train()

    def step(i: int) -> dict:
        b = obj.collate(items, batch_generator(0, i))
        with autocast:
            loss, extra = obj.loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.item(), **extra, "_batch": b}

    t0 = time.perf_counter()
    step(0)  # warm-up (allocations, autocast caches; with --compile: the compilation)
    first_step_s = time.perf_counter() - t0
    if compile and "_compiled_train" not in obj.encoder._compile_checked:
        raise RuntimeError("torch.compile fell back to eager; the compiled row would be meaningless")
    bf16_rate = matmul_rate("bfloat16", seconds=2.0)  # same process, same moment: the fair denominator
    times, masked = [], 0
    for i in range(steps):
        t = time.perf_counter()
        out = step(i + 1)
        times.append(time.perf_counter() - t)
        masked = int(out.get("masked", 0))
    base = obj.encoder._forward_target()
    c = base.config
    n_layers, d = c.num_hidden_layers, c.hidden_size
    n_params = sum(p.numel() for n, p in base.named_parameters() if "embed" not in n and "lora_" not in n)
    rows = batch * (2 if objective_name == "simcse" else 1)
    tok_total = rows * tokens
    fwd = 2 * n_params * tok_total + 4 * n_layers * rows * tokens * tokens * d  # weights + QK^T and AV
    if objective_name == "mntp":
        fwd += 2 * d * c.vocab_size * masked
    flops = 2 * fwd  # forward + input-gradient backward
    s = sorted(times)[len(times) // 2]
    return {"config": name, "dtype": dtype, "compiled": compile, "first_step_s": round(first_step_s, 1),
            "batch": batch, "tokens": tokens, "views": 2 if objective_name ==
            "simcse" else 1, "steps": steps, "s_per_step_median": round(s, 3), "s_per_step_min": round(min(times), 3),
            "tokens_per_s": round(tok_total / s, 1), "model_flops_per_step": flops,
            "achieved_tflops": round(flops / s / 1e12, 4), "setup_s": round(setup_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads(), "bf16_matmul_tflops_here": round(bf16_rate / 1e12, 4),
            "mfu_here": round(flops / s / bf16_rate, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    ap.add_argument("--only", choices=list(CONFIGS), default=None)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--compile", action="store_true",
                    help="also time each configuration with torch.compile (training=True); compile time excluded")
    ap.add_argument("--_one", nargs=2, metavar=("CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--_compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print("RESULT " + json.dumps(run_one(args._one[0], args._one[1], args.steps, args.threads,
                                             args._compiled)))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    peak = {dt: matmul_rate(dt) for dt in ("bfloat16", "float32")}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"matmul 2048^3: bf16 {peak['bfloat16'] / 1e12:.3f} TFLOP/s, fp32 {peak['float32'] / 1e12:.3f} TFLOP/s",
          flush=True)
    results = []
    names = [args.only] if args.only else list(CONFIGS)
    runs = [(name, dt, comp) for name in names for dt in args.dtypes.split(",")
            for comp in ((False, True) if args.compile else (False,))]
    for name, dt, comp in runs:
        cmd = [sys.executable, __file__, "--_one", name, dt, "--steps", str(args.steps)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if comp:
            cmd.append("--_compiled")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name} {dt}{' compiled' if comp else ''}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        r["mfu_of_bf16_matmul"] = round(r["achieved_tflops"] * 1e12 / peak["bfloat16"], 3)
        r["load_after"] = round(os.getloadavg()[0], 2)
        results.append(r)
        print("measured " + json.dumps(r), flush=True)
    print()
    eager = {(r["config"], r["dtype"]): r["s_per_step_median"] for r in results if not r["compiled"]}
    print("| config | dtype | compiled | batch x tokens | s/step (median) | vs eager | first step s | tokens/s | "
          "model TFLOP/s | bf16 matmul TFLOP/s (same process) | fraction of it | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        views = " x 2 views" if r["views"] == 2 else ""
        base = eager.get((r["config"], r["dtype"]))
        ratio = f"{base / r['s_per_step_median']:.2f}x" if base else "-"
        print(f"| {r['config']} | {r['dtype']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} x "
              f"{r['tokens']}{views} | {r['s_per_step_median']} | {ratio} | {r['first_step_s']} | "
              f"{r['tokens_per_s']} | {r['achieved_tflops']:.3f} | {r['bf16_matmul_tflops_here']:.3f} | "
              f"{r['mfu_here']:.0%} | {r['peak_rss_mb']:.0f} |")
    end_load = os.getloadavg()
    print(f"\nload average at end: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"peak_flops": peak, "load_start": load, "load_end": end_load, "results": results}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
