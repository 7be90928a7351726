"""Load test of ``ehi serve`` on loopback: N search requests at each concurrency, per encoder
backend.

Starts the server on 127.0.0.1 as a subprocess per setup, sends SciFact claims (budget 10 %,
k = 10) from an asyncio client, and reports errors, p50 / p99 latency and throughput at each
concurrency, with the backend's Recall@100 at 10 % on the test claims beside it. The first
setup is the previous server (torch encoder, every micro-batch waiting 2 ms for company): the
baseline the others are compared with in the same run. The server runs as ``ehi serve`` does
(``ehi.server.serve``), with the batcher's settings per setup. Bounded: a fixed number of requests
and an overall time limit; only the loopback address is used.

``--mixed``: fairness. 31 light clients (one claim, k = 10) alone, then beside one client that
sends the largest request the server takes (64 queries of 2,000 characters, k = 1000) back to
back; the light clients' p50 / p99 in both, with fair batching and with one chunk per request
(the server before it), each in the same run.

    python benchmarks/load_test.py runs/scifact --data ../shared/datasets/scifact --out reports/load_test.json
    python benchmarks/load_test.py runs/scifact --mixed --out benchmarks/results/load_test_mixed.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from lib.common import free_port, write_json

from ehi.data import load_queries


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


HEAVY_K = 1000


def heavy_body(queries: list[str]) -> dict:
    """The largest request the server takes: 64 queries of 2,000 characters (claims run
    together), k = 1000."""
    text = " ".join(queries)
    return {"query": [text[i * 97 : i * 97 + 2000] for i in range(64)], "k": HEAVY_K, "budget": 0.1}


async def mixed(url: str, queries: list[str], light_clients: int, per_client: int, heavy: bool, limit_s: float) -> dict:
    """``light_clients`` clients each sending ``per_client`` one-claim requests (k = 10, budget
    10 %), beside one client sending maximal requests back to back while they run (``heavy``):
    the light requests' latencies, and how many heavy requests were answered."""
    latencies: list[float] = []
    errors: list[str] = []
    heavy_done: list[float] = []
    stop = asyncio.Event()

    async def light(client: httpx.AsyncClient, c: int) -> None:
        for i in range(per_client):
            body = {"query": queries[(c * per_client + i) % len(queries)], "k": 10, "budget": 0.1}
            t = time.perf_counter()
            try:
                r = await client.post(url + "/search", json=body)
            except httpx.HTTPError as e:
                errors.append(type(e).__name__)
                continue
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}")
                continue
            latencies.append(time.perf_counter() - t)

    async def heavy_client(client: httpx.AsyncClient) -> None:
        body = heavy_body(queries)
        while not stop.is_set():
            t = time.perf_counter()
            r = await client.post(url + "/search", json=body)
            if r.status_code != 200:
                errors.append(f"heavy HTTP {r.status_code}")
                return
            heavy_done.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=light_clients + 1, max_keepalive_connections=light_clients + 1)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        h = asyncio.ensure_future(heavy_client(client)) if heavy else None
        if h is not None:
            await asyncio.sleep(0.2)  # the heavy request is in the server first
        await asyncio.wait_for(asyncio.gather(*(light(client, c) for c in range(light_clients))), limit_s)
        stop.set()
        if h is not None:
            await asyncio.wait_for(h, 300)
    lat = np.array(latencies) * 1000
    return {
        "light_clients": light_clients,
        "light_requests": light_clients * per_client,
        "heavy_client": heavy,
        "ok": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "wall_seconds": time.perf_counter() - t0,
        "light_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "light_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "heavy_requests_answered": len(heavy_done),
        "heavy_mean_s": float(np.mean(heavy_done)) if heavy_done else None,
    }


def mixed_main(args, queries) -> None:
    """--mixed: the light clients' p99 alone and beside one heavy client, per batching."""
    out = {"light_clients": args.light_clients, "per_client": args.per_client, "heavy_request": "64 x 2000 characters, k = 1000", "setups": {}}
    for name, chunks in (("fair batching (chunks)", True), ("one chunk per request", False)):
        rows = serve_and_load(args, queries, "auto", 2.0, True, chunks=chunks, levels=lambda url: [
            asyncio.run(mixed(url, queries, args.light_clients, args.per_client, heavy, args.limit)) for heavy in (False, True)
        ])
        alone, beside = rows
        ratio = beside["light_p99_ms"] / alone["light_p99_ms"] if alone["light_p99_ms"] and beside["light_p99_ms"] else None
        out["setups"][name] = {"alone": alone, "beside_heavy": beside, "light_p99_ratio": ratio}
        for r in rows:
            print(f"{name:<32} heavy client {'yes' if r['heavy_client'] else 'no ':<3} | light p50 {r['light_p50_ms']:7.1f} ms, "
                  f"p99 {r['light_p99_ms']:7.1f} ms, {r['errors']} errors; heavy answered {r['heavy_requests_answered']}", flush=True)
        print(f"{name:<32} light p99 beside the heavy client / alone: {ratio:.2f}x", flush=True)
    write_json(args.out, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="trained model directory (e.g. from scripts/main.sh: runs/scifact)")
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--limit", type=float, default=600, help="overall time limit per level (s)")
    ap.add_argument("--out", default="reports/load_test.json")
    ap.add_argument("--mixed", action="store_true",
                    help="instead: light clients alone and beside one client sending maximal requests, with and without fair batching")
    ap.add_argument("--light-clients", type=int, default=31)
    ap.add_argument("--per-client", type=int, default=20, help="--mixed: requests per light client")
    args = ap.parse_args()

    queries = list(load_queries(Path(args.data) / "queries.jsonl").values())
    if args.mixed:
        return mixed_main(args, queries)
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
    from ehi.evaluation.evaluate import evaluate_model
    from ehi.model.ehi_model import EHIModel

    model = EHIModel.load(model_dir, backend=backend)
    ds = load_beir(data)
    model.build_index(model.encoder.embed_all(model.encoder.features(ds.corpus.documents(), "encoding corpus")), ds.corpus.ids, ds.corpus.titles)
    rows = evaluate_model(model, ds, "test", (0.1,), baselines=False)
    return next(r.metrics["R@100"] for r in rows if r.method == "EHI")


SERVE = """
import sys
from ehi.server import serve
model, port, backend, wait, adaptive, chunks = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1", sys.argv[6] == "1"
# chunks only when off: the same script then also drives an older server (PYTHONPATH=OLD/src)
serve(model, "127.0.0.1", port, "warning", backend=backend, max_wait_ms=wait, adaptive=adaptive, **({} if chunks else {"chunks": False}))
"""


def serve_and_load(args, queries, backend: str, wait: float, adaptive: bool, chunks: bool = True, levels=None) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, args.model, str(port), backend, str(wait), "1" if adaptive else "0", "1" if chunks else "0"],
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
        if levels is not None:
            return levels(url)
        return [asyncio.run(run(url, queries, args.requests, c, args.limit)) for c in args.concurrency]
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
