"""Bounded loopback load test for ``l2v serve``.

Starts ``l2v serve MODEL`` as a subprocess on 127.0.0.1 (a free port), then for each concurrency level runs N
async clients for a fixed duration, each sending one request after another. Reports requests/s, texts/s,
p50/p99 latency, errors (must be 0) and the server's RSS before/after (growth must stay under a bound), then the
offline ``Encoder.encode`` throughput on the same texts for comparison. Exits 1 when errors > 0 or RSS grew too
much.

    .venv/bin/python benchmarks/serve_load.py --clients 1,16 --duration 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a model text vector encoder language retrieval query passage semantic search cat dog market "
         "stocks fell sharply guitar music river bank money science history book reads city capital").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) for _ in range(n)]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_level(url: str, clients: int, duration: float, texts: list[str], per_request: int) -> dict:
    latencies: list[float] = []
    errors = 0
    n_texts = 0
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker(wid: int) -> None:
            nonlocal errors, n_texts
            rng = random.Random(wid)
            while time.perf_counter() < deadline:
                batch = rng.sample(texts, per_request)
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/embeddings", json={"input": batch, "encoding_format": "base64"})
                    ok = r.status_code == 200 and len(r.json()["data"]) == per_request
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                if ok:
                    n_texts += per_request
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "seconds": round(elapsed, 2),
            "req_per_s": round(len(lat) / elapsed, 2), "texts_per_s": round(n_texts / elapsed, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None}


def offline_rate(model: str, texts: list[str], seconds: float, dtype: str, batch_size: int) -> float:
    from l2v import Encoder

    enc = Encoder.from_pretrained(model, dtype=dtype)
    enc.encode(texts[:32], batch_size=batch_size)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        enc.encode(texts, batch_size=batch_size, show_progress_bar=False)
        done += len(texts)
    return done / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level (bounded: at most 120)")
    ap.add_argument("--per-request", type=int, default=1, help="texts per request")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-rss-growth-mb", type=float, default=150.0)
    ap.add_argument("--no-offline", action="store_true", help="skip the offline encode comparison")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    duration = min(args.duration, 120.0)
    levels = [int(x) for x in args.clients.split(",")]
    if max(levels) > 256:
        raise SystemExit("--clients: at most 256 concurrent clients.")
    texts = make_texts(512)

    port = free_port()
    url = f"http://127.0.0.1:{port}"  # loopback only, by construction
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("L2V_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "l2v", "serve", args.model, "--host", "127.0.0.1", "--port",
                             str(port), "--dtype", args.dtype, "--batch-wait-ms", str(args.batch_wait_ms),
                             "--log-level", "warning"], cwd=ROOT, env=env)
    results = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.3)
        asyncio.run(run_level(url, max(levels), min(3.0, duration), texts, args.per_request))  # warm-up
        rss_before = rss_mb(proc.pid)
        for clients in levels:
            results.append(asyncio.run(run_level(url, clients, duration, texts, args.per_request)))
        rss_after = rss_mb(proc.pid)
        forward_passes = httpx.get(url + "/health").json()["forward_passes"]
    finally:
        proc.terminate()
        proc.wait(30)
    offline = None if args.no_offline else offline_rate(args.model, texts, min(duration, 15.0), args.dtype, 32)
    summary = {"model": args.model, "levels": results, "rss_before_mb": round(rss_before, 1),
               "rss_after_mb": round(rss_after, 1), "rss_growth_mb": round(rss_after - rss_before, 1),
               "forward_passes": forward_passes,
               "offline_texts_per_s": None if offline is None else round(offline, 2)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"model {args.model}, {duration:.0f} s per level, {args.per_request} text(s) per request")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>8} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for r in results:
            print(f"{r['clients']:>7} {r['requests']:>8} {r['req_per_s']:>8} {r['texts_per_s']:>8} "
                  f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['errors']:>6}")
        print(f"server RSS {summary['rss_before_mb']} MB -> {summary['rss_after_mb']} MB "
              f"(growth {summary['rss_growth_mb']} MB, bound {args.max_rss_growth_mb} MB)")
        if offline is not None:
            print(f"offline Encoder.encode (batch 32): {offline:.1f} texts/s")
    failed = any(r["errors"] for r in results) or summary["rss_growth_mb"] > args.max_rss_growth_mb
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
