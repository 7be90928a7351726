"""Shards: the leaf index split into S files, each holding whole leaves, for serving beyond one
process or one machine.

Leaves are assigned to shards balanced by the documents they hold (the largest leaf first, to
the lightest shard). Each shard file is a complete Faiss IVF of the same lists, quantizer and
codec, whose lists outside its shard are empty: a shard opens alone (memory-mapped) and scans
the lists it holds. ``shards.json`` holds the map and names the files; the model's manifest
checksums both like every other file. A search routes once, sends each shard only the leaves it
holds, and merges the shards' top candidates: the same documents and scores as one index.

Nothing here needs Ray: ``ShardedLists`` takes any shard objects with ``submit``. The local ones
(``LocalShard``) open a sharded model in one process; Ray actors (``ehi.index.ray_shards``) serve it from
many.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Protocol

import faiss
import numpy as np

from ehi.index.faiss_ivf import i64 as _i64
from ehi.index.leaf_index import READ_ONLY, LeafIndex, read_ivf

SHARD_MAP = "shards.json"
SHARD_TIMEOUT_S = 5.0  # a shard that has not answered by then is reported, not waited for


class ShardUnavailable(RuntimeError):
    """A shard did not answer (died, restarting or too slow): the search is refused rather
    than answered from the other shards alone."""

    def __init__(self, shard: int, count: int, why: str):
        self.shard = shard
        super().__init__(f"shard {shard} of {count} is unavailable ({why}); retry shortly")


def shard_file(shard: int, count: int) -> str:
    return "index.faiss" if count == 1 else f"shard-{shard}-of-{count}.faiss"


def assign_shards(sizes: np.ndarray, count: int) -> np.ndarray:
    """The shard of each leaf (L,): largest leaf first into the shard holding fewest documents
    so far (ties: the lower shard), so shards hold about N*d2l/S documents each."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if count < 1:
        raise ValueError("shards must be >= 1")
    if count > len(sizes):
        raise ValueError(f"{count} shards for {len(sizes)} leaves: at most one shard per leaf")
    out = np.zeros(len(sizes), dtype=np.int64)
    load = np.zeros(count, dtype=np.int64)
    held = np.zeros(count, dtype=np.int64)
    for leaf in np.argsort(-sizes, kind="stable"):
        s = int(np.lexsort((held, load))[0])  # fewest documents, then fewest leaves
        out[leaf] = s
        load[s] += sizes[leaf]
        held[s] += 1
    return out


def write_shards(index: LeafIndex, folder: Path, count: int) -> list[str]:
    """The index's lists as ``count`` shard files and the shard map; the file names written."""
    if index.ivf is None:
        raise ValueError(READ_ONLY)
    leaf_shard = assign_shards(index.leaf_sizes(), count)
    ivf, inv = index.ivf, index.ivf.invlists
    names = []
    for s in range(count):
        part = faiss.ArrayInvertedLists(index.num_leaves, inv.code_size)
        for leaf in np.flatnonzero((leaf_shard == s) & (index.leaf_sizes() > 0)):
            leaf = int(leaf)
            part.add_entries(leaf, inv.list_size(leaf), inv.get_ids(leaf), inv.get_codes(leaf))
        names.append(shard_file(s, count))
        _write_with_lists(ivf, part, folder / names[-1])
    sizes = index.leaf_sizes()
    shard_map = {
        "count": count,
        "files": names,
        "leaf_shard": leaf_shard.tolist(),
        "documents": [int(sizes[leaf_shard == s].sum()) for s in range(count)],
        "leaves": [int((leaf_shard == s).sum()) for s in range(count)],
    }
    (folder / SHARD_MAP).write_text(json.dumps(shard_map))
    return [*names, SHARD_MAP, *index.write_rows(folder)]


def _write_with_lists(ivf, lists, path: Path) -> None:
    """Write ``ivf`` (its quantizer and trained codec) with other inverted lists, without
    copying the rest: the lists are swapped in for the write and back after it."""
    own, orig = ivf.own_invlists, ivf.invlists
    ivf.own_invlists = False  # replace_invlists frees the old lists when the index owns them
    try:
        ivf.replace_invlists(lists, False)
        faiss.write_index(ivf, str(path))
    finally:
        ivf.replace_invlists(orig, own)


def read_shard_map(folder: Path, num_leaves: int, listed) -> dict:
    """``shards.json``, checked against the model: one line naming the file otherwise."""
    path = folder / SHARD_MAP
    try:
        m = json.loads(path.read_text())
        count, files, leaf_shard = int(m["count"]), list(m["files"]), np.asarray(m["leaf_shard"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable shard map ({e})") from None
    if count < 1 or files != [shard_file(s, count) for s in range(count)]:
        raise ValueError(f"{path}: expected {count} shard files named shard-I-of-{count}.faiss")
    if leaf_shard.shape != (num_leaves,) or leaf_shard.min() < 0 or leaf_shard.max() >= count:
        raise ValueError(f"{path}: expected a shard in 0..{count - 1} for each of {num_leaves} leaves")
    missing = [f for f in files if f not in listed]
    if missing:
        raise ValueError(f"{path}: names {missing[0]}, which the manifest does not list")
    m["leaf_shard"] = leaf_shard
    return m


def merged_ivf(folder: Path, shard_map: dict):
    """One in-memory IVF holding every shard's lists (a sharded model opened to be changed)."""
    files = shard_map["files"]
    ivf = read_ivf(folder / files[0], mmap=False)
    for name in files[1:]:
        other = read_ivf(folder / name, mmap=False)
        if other.nlist != ivf.nlist or other.code_size != ivf.code_size or type(other) is not type(ivf):
            raise ValueError(f"{name}: does not match {files[0]} (lists, codec or code size)")
        inv = other.invlists
        for leaf in range(other.nlist):
            n = inv.list_size(leaf)
            if n:
                ivf.invlists.add_entries(leaf, n, inv.get_ids(leaf), inv.get_codes(leaf))
        ivf.ntotal += other.ntotal
    return ivf


def check_shard_lists(ivf, name: str, leaf_shard: np.ndarray, shard: int, sizes: np.ndarray) -> None:
    """A shard file holds exactly its leaves' documents (ValueError naming the file otherwise)."""
    got = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    want = np.where(leaf_shard == shard, sizes, 0)
    if ivf.nlist != len(sizes) or not np.array_equal(got, want):
        raise ValueError(f"{name}: its lists do not hold the documents doc_leaves.npy assigns to shard {shard}")


# ---- searching across shards -----------------------------------------------------------------
class Shard(Protocol):
    number: int

    def submit(self, q: np.ndarray, leaves: np.ndarray, fetch: int, allowed: np.ndarray | None, n: int) -> Callable[[float], tuple]:
        """Start a scan; the returned function waits up to its argument (seconds) for (D, I)."""

    def close(self) -> None:
        """Stop whatever serves the shard."""


class LocalShard:
    """A shard opened in this process (memory-mapped): scans at once."""

    def __init__(self, index: LeafIndex, number: int):
        self.index, self.number = index, number

    def submit(self, q, leaves, fetch, allowed, n):
        out = self.index.scan(q, leaves, fetch, allowed, n)
        return lambda timeout: out

    def close(self) -> None:
        """Nothing runs apart from this process."""


def open_shard(path: Path, mmap: bool = True, ivf=None) -> LeafIndex:
    """One shard file (or its ``ivf``, read already) as a scan-only ``LeafIndex``: no rows of
    its own, the router keeps them."""
    ivf = read_ivf(path, mmap) if ivf is None else ivf
    return LeafIndex.from_ivf(ivf, np.zeros((0, 1), dtype=np.int64), None, read_only=mmap)


def sharded_index(base: LeafIndex, leaf_shard: np.ndarray, shards: list, timeout: float = SHARD_TIMEOUT_S) -> LeafIndex:
    """``base`` (the rows, their leaves and float vectors) searching through ``shards``:
    read-only, the same documents and scores as one index."""
    base.serve_from(ShardedLists(leaf_shard, shards, timeout))
    return base


class ShardedLists:
    """The lists as shards see them (the ``Lists`` protocol of ``ehi.index.faiss_ivf``): a scan
    asks each shard for its leaves' best ``fetch`` candidates and keeps the best ``fetch`` of
    them all, which are the ones a single index would have found."""

    def __init__(self, leaf_shard: np.ndarray, shards: list, timeout: float = SHARD_TIMEOUT_S):
        self.leaf_shard = _i64(leaf_shard)
        self.shards = list(shards)
        self.timeout = timeout

    @property
    def count(self) -> int:
        return len(self.shards)

    def documents(self, sizes: np.ndarray) -> list[int]:
        return [int(sizes[self.leaf_shard == s].sum()) for s in range(self.count)]

    def scan(self, q, leaves, fetch, allowed=None, n=None):
        nq = len(q)
        leaves = _i64(leaves).reshape(nq, -1)
        owner = np.where(leaves >= 0, self.leaf_shard[np.maximum(leaves, 0)], -1)
        pending = []
        for s, shard in enumerate(self.shards):
            mine = owner == s
            rows = np.flatnonzero(mine.any(1))
            if len(rows):  # a shard hears only of the queries and leaves it holds
                part = np.ascontiguousarray(np.where(mine[rows], leaves[rows], -1))
                pending.append((s, rows, shard.submit(np.ascontiguousarray(q[rows]), part, fetch, allowed, n)))
        deadline = time.monotonic() + self.timeout
        D = np.full((nq, fetch * max(1, len(pending))), -np.inf, dtype=np.float32)
        I = np.full(D.shape, -1, dtype=np.int64)
        for j, (s, rows, result) in enumerate(pending):
            d, i = result(max(0.0, deadline - time.monotonic()))
            D[rows, j * fetch : (j + 1) * fetch], I[rows, j * fetch : (j + 1) * fetch] = d, i
        order = np.argsort(-D, axis=1, kind="stable")[:, :fetch]
        return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)

    def close(self) -> None:
        """Stop the shards' processes (Ray actors); the index cannot search afterwards."""
        for shard in self.shards:
            shard.close()
        self.shards = []
