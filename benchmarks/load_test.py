"""Load test of ``ehi serve`` on loopback: N search requests at a fixed concurrency.

Starts the server on 127.0.0.1 as a subprocess, sends SciFact claims (budget 10 %, k = 10)
from an asyncio client, and reports errors, p50 / p99 latency and throughput. Bounded: a
fixed number of requests and an overall time limit; only the loopback address is used.

    python benchmarks/load_test.py runs/scifact --data ../shared/datasets/scifact --out reports/load_test.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from common import write_json
from ehi.data import load_queries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(url: str, queries: list[str], n: int, concurrency: int, limit_s: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            body = {"query": queries[i % len(queries)], "k": 10, "budget": 0.1}
            t = time.perf_counter()
            try:
                r = await client.post(url + "/search", json=body)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}")
                    continue
            except httpx.HTTPError as e:
                errors.append(type(e).__name__)
                continue
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), limit_s)
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "requests": n,
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "wall_seconds": wall,
        "throughput_rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="trained model directory (e.g. from scripts/main.sh: runs/scifact)")
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--limit", type=float, default=600, help="overall time limit (s)")
    ap.add_argument("--out", default="reports/load_test.json")
    args = ap.parse_args()

    queries = list(load_queries(Path(args.data) / "queries.jsonl").values())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    server = subprocess.Popen(
        [sys.executable, "-m", "ehi.cli", "serve", args.model, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not come up")
            time.sleep(0.2)
        asyncio.run(run(url, queries, 64, 4, 60))  # warm-up
        res = asyncio.run(run(url, queries, args.requests, args.concurrency, args.limit))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"{res['requests']} requests at concurrency {res['concurrency']}: {res['errors']} errors, "
        f"p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, {res['throughput_rps']:.0f} requests/s "
        f"({res['wall_seconds']:.1f} s)"
    )
    write_json(args.out, res)


if __name__ == "__main__":
    main()
