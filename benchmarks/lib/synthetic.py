"""The 1M-vector synthetic corpus (clustered, generated chunk by chunk from a seed, never
stored), its queries, memory probes, and EHI trained on a sample and built streaming: what
the scale scripts share."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import numpy as np

from ehi.config import EHIConfig
from ehi.data import Corpus, Dataset
from ehi.index.leaf_index import LeafIndex, leaf_centroids
from ehi.training.trainer import Trainer

DIM = 384
CHUNK = 10_000


def proc_status(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    return float("nan")


def release_memory() -> None:
    """Hand memory freed by training back to the OS before the index is built."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so that a phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


class Corpus1M:
    """Clustered unit vectors: doc = normalise(centre + noise), generated per chunk from a seed."""

    def __init__(self, n: int, clusters: int = 4096, noise: float = 1.0, seed: int = 0):
        self.n, self.seed, self.noise = n, seed, noise
        rng = np.random.default_rng([seed, 10**6])
        c = rng.standard_normal((clusters, DIM)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)

    def chunk(self, i: int) -> np.ndarray:
        start, end = i * CHUNK, min(self.n, (i + 1) * CHUNK)
        rng = np.random.default_rng([self.seed, i])
        cid = rng.integers(len(self.centres), size=end - start)
        x = self.centres[cid] + self.noise * rng.standard_normal((end - start, DIM), dtype=np.float32) / DIM**0.5
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self):
        for i in range((self.n + CHUNK - 1) // CHUNK):
            yield i * CHUNK, self.chunk(i)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), DIM), dtype=np.float32)
        for i in np.unique(idx // CHUNK):
            sel = np.where(idx // CHUNK == i)[0]
            out[sel] = self.chunk(int(i))[idx[sel] - i * CHUNK]
        return out


def near(x: np.ndarray, rng, spread: float) -> np.ndarray:
    q = x + spread * rng.standard_normal(x.shape, dtype=np.float32) / DIM**0.5
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def recall_at_100(found: np.ndarray, positives: np.ndarray) -> float:
    return 100.0 * float(np.mean([p in row for p, row in zip(positives, found)]))


def build_streaming(model, corpus, L, codec, sample_x, args, upto: int | None = None) -> LeafIndex:
    """Route the corpus chunk by chunk (summing each leaf's documents for its centroid), then
    add it chunk by chunk: the corpus is never held whole beside the index."""
    n = corpus.n if upto is None else upto
    parts, sums = [], np.zeros((L, DIM))
    for s, x in corpus.chunks():
        if s >= n:
            break
        x = model.encoder.embed_vectors(x[: n - s])
        lv = model.place(x, 1)
        parts.append(lv)
        sums += leaf_centroids(lv, x, L, normalise=False)
    leaves = np.concatenate(parts)
    index = LeafIndex.empty(L, DIM, 1, sums, model.encoder.embed_vectors(sample_x[:50_000]), codec, args.pq_m, args.rerank)
    for s, x in corpus.chunks():
        if s >= n:
            break
        index.add(model.encoder.embed_vectors(x[: n - s]), leaves[s : s + len(x[: n - s])])
    return index


def train_on_sample(sample_x: np.ndarray, row_of: dict, train_pos: np.ndarray, train_q: np.ndarray, args):
    """EHI in bring-your-own-embeddings mode: adapter + tree on the training pairs, the sample
    as the corpus (no index built)."""
    cfg = EHIConfig()
    cfg.tree.branching, cfg.tree.height = args.branching, args.height
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = 256
    cfg.train.seed = args.seed
    n = len(sample_x)
    ds = Dataset(
        root=Path("."),
        corpus=Corpus([str(i) for i in range(n)], [""] * n, [""] * n),
        queries={str(i): "" for i in range(len(train_pos))},
        qrels={"train": {str(i): {str(row_of[int(d)]): 1} for i, d in enumerate(train_pos)}},
    )
    return Trainer(cfg, ds, doc_embeddings=sample_x, query_embeddings=train_q).fit(progress=False, build_index=False)
