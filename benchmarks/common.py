"""Shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, data) -> None:
    """Write the results beside the printed table (atomically: a partial file never shows)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
