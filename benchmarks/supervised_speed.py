"""Supervised contrastive step time and peak memory, with and without GradCache, at equal effective batch.

    python benchmarks/supervised_speed.py                          # default model, batch 32, chunks: off, 8
    python benchmarks/supervised_speed.py --batch-size 64 --chunks 0,16,4 --steps 2

One optimizer step = embed B queries (with instruction) + B positives + B hard negatives (WordNet usage
sentence -> gloss, other-sense gloss), InfoNCE on the 3B embeddings, backward, AdamW on the LoRA weights (r=16,
all linear layers, LoRA dropout off so every configuration computes the same function; base frozen), autocast
bf16 where native. The same batches are used for every configuration.
Each configuration runs in its own subprocess. Memory on CPU: peak RSS sampled every millisecond during the
measured steps, and that peak minus the RSS just before them ("step peak" = activations + gradients + optimizer
state growth); on CUDA: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = _rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from l2v.data.pairs import WORDNET_INSTRUCTIONS, default_pair_dir, load_pairs
    from l2v.train.loop import autocast_context
    from l2v.train.lora import build_trainable
    from l2v.train.supervised import PairStep, StepSettings, SupervisedConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = SupervisedConfig(model=args.model, max_length=args.max_length, gradient_checkpointing=args.grad_ckpt,
                           lora_dropout=0.0,  # same forward in every configuration: losses comparable
                           dtype=args.dtype, batch_size=args.batch_size)
    enc, _, _ = build_trainable(cfg, device=device)
    enc.model.train()
    folder = default_pair_dir()
    data = load_pairs(folder / "wordnet_usage.jsonl",
                      instructions={"wordnet_usage": WORDNET_INSTRUCTIONS["wordnet_usage"]})
    batches = [data.examples[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps + 1)]
    params = [p for p in enc.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    step = PairStep(enc, StepSettings(chunk_size=args.chunk or None))
    autocast = autocast_context(args.dtype, device)

    def one(batch) -> float:
        with autocast:
            loss = step.step(batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    one(batches[0])  # warm-up (allocates optimizer state)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss()
    times, losses = [], []
    with PeakRSS() as peak:
        for b in batches[1:]:
            t0 = time.perf_counter()
            losses.append(one(b))
            times.append(time.perf_counter() - t0)
    tokens = sum(len(enc.tokenize_one(t, i).ids) for b in batches[1:] for e in b
                 for t, i in ((e.query, e.query_instruction), (e.positive, None), (e.negative, None)))
    out = {"batch": args.batch_size, "chunk": args.chunk or None, "s_per_step": sum(times) / len(times),
           "s_per_step_all": [round(t, 2) for t in times], "loss": losses, "tokens_per_step": tokens // args.steps,
           "rss_before_gb": base / 2**30, "peak_rss_gb": peak.peak / 2**30,
           "step_peak_gb": (peak.peak - base) / 2**30, "device": str(device), "dtype": str(enc.dtype),
           "autocast": args.dtype, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--batch-size", type=int, default=32, help="effective (contrastive) batch of pairs")
    ap.add_argument("--chunks", default="0,8", help="GradCache chunk sizes to compare; 0 = plain step")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per configuration (after 1 warm-up)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # internal: one configuration
    args = ap.parse_args()
    if args.chunk is not None:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        cmd = [sys.executable, __file__, "--chunk", str(chunk), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--max-length", str(args.max_length), "--dtype", args.dtype]
        for flag, val in (("--model", args.model), ("--device", args.device), ("--threads", args.threads)):
            if val is not None:
                cmd += [flag, str(val)]
        if args.grad_ckpt:
            cmd.append("--grad-ckpt")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"configuration chunk={chunk} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(f"done chunk={chunk}: {rows[-1]['s_per_step']:.2f} s/step", file=sys.stderr, flush=True)
    print(f"\nsupervised step, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"device {rows[0]['device']}, autocast {rows[0]['autocast']}, threads {rows[0]['threads']}, "
          f"~{rows[0]['tokens_per_step']} tokens/step")
    head = "| effective batch | GradCache chunk | s/step | vs plain | peak RSS (GB) | step peak over baseline (GB) |"
    cuda = "cuda_peak_gb" in rows[0]
    if cuda:
        head += " CUDA peak (GB) |"
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    plain = next((r["s_per_step"] for r in rows if r["chunk"] is None), None)
    for r in rows:
        rel = f"{r['s_per_step'] / plain:.2f}x" if plain else "-"
        line = (f"| {r['batch']} | {r['chunk'] or 'off'} | {r['s_per_step']:.2f} ({', '.join(map(str, r['s_per_step_all']))}) "
                f"| {rel} | {r['peak_rss_gb']:.2f} | {r['step_peak_gb']:.2f} |")
        if cuda:
            line += f" {r['cuda_peak_gb']:.2f} |"
        print(line)
    losses = {r["chunk"]: r["loss"] for r in rows}
    print(f"losses per configuration (equal up to bf16 rounding): {losses}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
