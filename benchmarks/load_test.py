"""Load test of ``ehi serve`` on loopback: N search requests at each concurrency, per encoder
backend.

Starts the server on 127.0.0.1 as a subprocess per setup, sends SciFact claims (budget 10 %,
k = 10) from an asyncio client, and reports errors, p50 / p99 latency and throughput at each
concurrency, with the backend's Recall@100 at 10 % on the test claims beside it. The first
setup is the previous server (torch encoder, every micro-batch waiting 2 ms for company): the
baseline the others are compared with in the same run. The server runs as ``ehi serve`` does
(``ehi.server.serve``), with the batcher's settings per setup. Bounded: a fixed number of requests
and an overall time limit; only the loopback address is used.

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
    ap.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--limit", type=float, default=600, help="overall time limit per level (s)")
    ap.add_argument("--out", default="reports/load_test.json")
    args = ap.parse_args()

    queries = list(load_queries(Path(args.data) / "queries.jsonl").values())
    out = {"requests": args.requests, "setups": {}}
    for name in args.setups:
        backend, wait, adaptive = SETUPS[name]
        r100 = backend_recall(args.model, args.data, backend)
        levels = serve_and_load(args, queries, backend, wait, adaptive)
        out["setups"][name] = {"backend": backend, "max_wait_ms": wait, "adaptive": adaptive, "R@100_at_10pct_test": r100, "levels": levels}
        for res in levels:
            print(f"{name:<28} R@100 {r100:5.1f} | concurrency {res['concurrency']:>3}: {res['errors']} errors, p50 {res['p50_ms']:7.1f} ms, "
                  f"p99 {res['p99_ms']:7.1f} ms, {res['throughput_rps']:6.0f} requests/s", flush=True)
    base = {r["concurrency"]: r for r in out["setups"].get(next(iter(SETUPS)), {}).get("levels", [])}
    for name, setup in out["setups"].items():
        for r in setup["levels"]:
            b = base.get(r["concurrency"])
            if b:
                r["throughput_x_baseline"] = r["throughput_rps"] / b["throughput_rps"]
                r["p50_x_baseline"] = r["p50_ms"] / b["p50_ms"]
    write_json(args.out, out)


# name -> (encoder backend, micro-batch wait in ms, adaptive); the first is the baseline: the
# server before this change (torch encoder, every batch waiting 2 ms)
SETUPS = {
    "torch, 2 ms wait (previous)": ("torch", 2.0, False),
    "torch, adaptive 2 ms": ("torch", 2.0, True),
    "onnx, adaptive 2 ms": ("onnx", 2.0, True),
    "onnx, no wait": ("onnx", 0.0, True),
    "onnx-int8, adaptive 2 ms": ("onnx-int8", 2.0, True),
}


def backend_recall(model_dir: str, data: str, backend: str) -> float:
    """Recall@100 at a 10 % budget on the test claims, queries and documents on this backend."""
    from ehi.data import load_beir
    from ehi.evaluation import evaluate_model
    from ehi.model import EHIModel

    model = EHIModel.load(model_dir, backend=backend)
    ds = load_beir(data)
    model.build_index(model.encoder.embed_all(model.encoder.features(ds.corpus.documents(), "encoding corpus")), ds.corpus.ids, ds.corpus.titles)
    rows = evaluate_model(model, ds, "test", (0.1,), baselines=False)
    return next(r.metrics["R@100"] for r in rows if r.method == "EHI")


SERVE = """
import sys
from ehi.server import serve
model, port, backend, wait, adaptive = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
serve(model, "127.0.0.1", port, "warning", backend=backend, max_wait_ms=wait, adaptive=adaptive)
"""


def serve_and_load(args, queries, backend: str, wait: float, adaptive: bool) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, args.model, str(port), backend, str(wait), "1" if adaptive else "0"],
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
        return [asyncio.run(run(url, queries, args.requests, c, args.limit)) for c in args.concurrency]
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
