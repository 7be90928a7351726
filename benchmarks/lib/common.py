"""Shared by the benchmark scripts."""

from __future__ import annotations

import json
import socket
from pathlib import Path  # noqa: F401


def write_json(path: str | Path, data) -> None:
    """Write the results beside the printed table (atomically: a partial file never shows)."""
    from ehi.artifacts import write_file_atomic

    out = write_file_atomic(path, json.dumps(data, indent=2))
    print(f"wrote {out}")


def select_variants(defaults: dict, extra: list[str], only: list[str] | None) -> dict:
    """The script's variants plus ``NAME=JSON`` ones from the command line, or only those named."""
    variants = dict(defaults)
    for v in extra:
        name, _, js = v.partition("=")
        variants[name] = json.loads(js)
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    return variants


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
