"""Probe a running ``ehi serve`` as a careless user and an attacker would, on loopback only:
bad requests, foreign Host headers, stalled connections, and SIGTERM with requests in flight.
Prints one line per check (held / broken) and writes JSON; exit code 1 if any broke.

Starts the server itself (``python -m ehi.cli serve MODEL``) on 127.0.0.1 and a free port.
Bounded: a fixed number of requests and sockets, a timeout on each. What each check promises
is listed in docs/tests-and-limits.md; the fairness under a heavy client is measured by
``load_test.py --mixed``.

    python benchmarks/probe_server.py runs/scifact --out benchmarks/results/probe_server.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from lib.common import free_port, write_json

BAD = {  # body -> what the server must answer: 4xx, {"detail": one sentence} naming the field, no echo
    "budget true": b'{"query": "a", "budget": true}',
    "beam true": b'{"query": "a", "beam": true}',
    "k true": b'{"query": "a", "k": true}',
    "k as a string": b'{"query": "a", "k": "5"}',
    "budget as a string": b'{"query": "a", "budget": "0.5"}',
    "k 1e9": b'{"query": "a", "k": 1000000000}',
    "NaN budget": b'{"query": "a", "budget": NaN}',
    "lone surrogate": b'{"query": "\\ud800"}',
    "invalid UTF-8": b'{"query": "gu\xff\xfetar"}',
    "JSON nested 100k deep": b'{"query": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a 50,000-character unknown id": json.dumps({"query": "a", "ids": ["z" * 50_000]}).encode(),
    "65 queries": json.dumps({"query": ["a"] * 65}).encode(),
    "2,001-character query": json.dumps({"query": "x" * 2001}).encode(),
    "cut short": b'{"query": ',
}


def start(model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "ehi.cli", "serve", model, "--port", str(port), "--log-level", "warning"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def check_bad_requests(url: str) -> dict:
    broken = {}
    for name, body in BAD.items():
        r = httpx.post(url + "/search", content=body, headers={"content-type": "application/json"}, timeout=30)
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = None
        ok = 400 <= r.status_code < 500 and isinstance(detail, str) and "\n" not in detail and len(detail) < 300 and "zzzzzzzzzz" not in detail
        if not ok:
            broken[name] = f"{r.status_code} {r.text[:120]}"
    return {"held": not broken, "requests": len(BAD), "broken": broken}


def check_hosts(url: str) -> dict:
    foreign = httpx.get(url + "/health", headers={"host": "evil.example"}, timeout=10).status_code
    docs = [httpx.get(url + p, timeout=10).status_code for p in ("/docs", "/openapi.json")]
    return {"held": foreign == 400 and docs == [404, 404], "foreign_host": foreign, "docs": docs}


def check_stalled(url: str, port: int, n: int) -> dict:
    """``n`` connections that send half a request and stall; a real request still answers."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        socks.append(s)
    try:
        t = time.perf_counter()
        r = httpx.post(url + "/search", json={"query": "protein folding", "k": 5}, timeout=30)
        ms = 1000 * (time.perf_counter() - t)
    finally:
        for s in socks:
            s.close()
    return {"held": r.status_code == 200, "stalled": n, "status": r.status_code, "latency_ms": ms}


def check_sigterm(proc: subprocess.Popen, url: str, n: int) -> dict:
    """``n`` requests in flight (64 queries each), then SIGTERM: every one is answered, and the
    server exits by the signal (uvicorn re-raises it once drained; what systemd counts as a
    clean stop) or with 0."""

    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"query": [f"claim {i} about protein folding and immune response" for i in range(64)], "k": 100}
            jobs = [asyncio.ensure_future(client.post(url + "/search", json=body)) for _ in range(n)]
            await asyncio.sleep(0.3)  # sent and being worked on
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*jobs, return_exceptions=True)

    out = asyncio.run(go())
    codes = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in out]
    code = proc.wait(timeout=120)
    return {"held": all(c == 200 for c in codes) and code in (0, -signal.SIGTERM), "in_flight": n, "answers": codes, "exit_code": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a trained model folder (e.g. runs/scifact)")
    ap.add_argument("--stalled", type=int, default=300)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--out", default="reports/probe_server.json")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(args.model, port)
    try:
        checks = {
            "bad requests: 4xx, one sentence, no echo": check_bad_requests(url),
            "foreign Host refused, docs off": check_hosts(url),
            f"{args.stalled} stalled connections": check_stalled(url, port, args.stalled),
            "SIGTERM drains in-flight requests": check_sigterm(proc, url, args.in_flight),
        }
    finally:
        if proc.poll() is None:
            proc.kill()
    for name, c in checks.items():
        print(f"{'held  ' if c['held'] else 'BROKEN'}  {name}  {json.dumps({k: v for k, v in c.items() if k != 'held'})[:200]}")
    write_json(args.out, checks)
    sys.exit(0 if all(c["held"] for c in checks.values()) else 1)


if __name__ == "__main__":
    main()
