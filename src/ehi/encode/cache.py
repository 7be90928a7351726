"""The on-disk feature cache: what the frozen transformer computed, keyed by the model's
fingerprint and by each text, kept under a size limit (``EHI_CACHE_DIR``, ``EHI_CACHE_MAX_GB``)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def text_keys(texts: list[str]) -> np.ndarray:
    """(N, 2) uint64: 128 bits of each text's sha256, the per-text key of the feature cache."""
    out = np.empty((len(texts), 2), dtype=np.uint64)
    for i, t in enumerate(texts):
        out[i] = np.frombuffer(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest()[:16], dtype=np.uint64)
    return out


def texts_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("EHI_CACHE_DIR", Path.home() / ".cache" / "ehi" / "features"))


DEFAULT_CACHE_GB = 10.0


def cache_limit() -> int:
    """Bytes the feature cache may hold (``EHI_CACHE_MAX_GB``, default 10)."""
    raw = os.environ.get("EHI_CACHE_MAX_GB", str(DEFAULT_CACHE_GB))
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"EHI_CACHE_MAX_GB must be a number of GiB, got {raw!r}") from None
    return int(max(gb, 0.0) * 2**30)


def cache_files() -> list[Path]:
    d = cache_dir()
    return sorted(d.glob("*.npz")) if d.is_dir() else []


def _onnx_files() -> list[Path]:
    """Exported ONNX graphs kept beside the features (re-exported on demand)."""
    d = cache_dir() / "onnx"
    return sorted(d.glob("*.onnx")) + sorted(d.glob(".*.tmp")) if d.is_dir() else []


def cache_usage() -> tuple[int, int]:
    """(files, bytes) in the feature cache, exported ONNX graphs included."""
    files = cache_files() + _onnx_files()
    return len(files), sum(f.stat().st_size for f in files if f.exists())


def clear_cache() -> tuple[int, int]:
    """Delete every cached feature file (and stale temporaries); (files, bytes) freed."""
    n, size = 0, 0
    d = cache_dir()
    for f in cache_files() + (sorted(d.glob(".*.tmp")) if d.is_dir() else []) + _onnx_files():
        try:
            st = f.stat().st_size
            f.unlink()
        except FileNotFoundError:
            continue
        n, size = n + 1, size + st
    return n, size


def evict_cache(keep: Path | None = None, limit: int | None = None) -> int:
    """Least recently used files first (use touches a file), until the cache fits its limit;
    ``keep`` (the file just written) is never evicted. Returns the files deleted."""
    limit = cache_limit() if limit is None else limit
    entries = []
    for f in cache_files():
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(s for _, s, _ in entries)
    deleted = 0
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and f == keep:
            continue
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        total -= size
        deleted += 1
    return deleted


@dataclass
class Features:
    """What the frozen part of the encoder computed for a list of texts.

    adapter: ``dense`` (N, d) sentence embeddings. top-k: ``states`` (T, d) fp16 token states
    of the last frozen layer with ``offsets`` (N+1). full: ``texts``.
    """

    dense: torch.Tensor | None = None
    states: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    texts: list[str] | None = None

    def __len__(self) -> int:
        if self.dense is not None:
            return self.dense.shape[0]
        if self.offsets is not None:
            return self.offsets.shape[0] - 1
        return len(self.texts or [])

    def rows(self) -> list:
        """One item per text (an embedding, a token-state matrix or the text)."""
        if self.dense is not None:
            return list(self.dense.numpy())
        if self.states is not None:
            o = self.offsets.tolist()
            return [self.states[o[i] : o[i + 1]].numpy() for i in range(len(o) - 1)]
        return list(self.texts)

    @classmethod
    def from_rows(cls, rows: list, like: "Features") -> "Features":
        if like.dense is not None:
            return cls(dense=torch.from_numpy(np.stack(rows).astype(np.float32)))
        if like.states is not None:
            lengths = np.array([r.shape[0] for r in rows])
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            return cls(states=torch.from_numpy(np.concatenate(rows)), offsets=torch.from_numpy(offsets))
        return cls(texts=list(rows))
