"""The Faiss side of the leaf index: making a trained IVF for a codec, reading one from disk,
and scanning its lists (``FaissLists``, one implementation of the lists protocol a
``LeafIndex`` searches through; shards are the other, ``ehi.index.shards``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

CODECS = ("flat", "sq8", "pq")
# search_preassigned's own threading: Faiss's default (0) splits work only in IndexIVF.search,
# so a pre-assigned batch would run on one thread; 3 splits it over queries
PARALLEL_OVER_QUERIES = 3


def f32(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def i64(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int64)


def normalised(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class Lists(Protocol):
    """Where the documents' codes are scanned: in this process, or in shards."""

    count: int  # shards (1: one index)

    def scan(self, q: np.ndarray, leaves: np.ndarray, fetch: int, allowed: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``fetch`` (scores, rows) per query among the lists ``leaves`` (-1 = none),
        best first, -inf / -1 past the candidates; ``allowed``: rows of the ``n`` documents a
        filtered scan may return."""

    def documents(self, sizes: np.ndarray) -> list[int]:
        """Documents (copies) each shard holds."""

    def close(self) -> None:
        """Stop whatever serves the lists."""


def codec_pq_m(codec: str, pq_m: int, d: int) -> int:
    """The codec checked, and its sub-quantizers (0 unless ``pq``)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
    if codec != "pq":
        return 0
    m = int(pq_m) or default_pq_m(d)
    if d % m:
        raise ValueError(f"pq_m {m} must divide the embedding size {d}")
    return m


def default_pq_m(d: int) -> int:
    """8 dimensions per sub-quantizer (so 384 -> 48 bytes per vector), or the nearest divisor."""
    for m in range(max(1, d // 8), 0, -1):
        if d % m == 0:
            return m
    return 1


def new_ivf(num_leaves: int, codec: str, pq_m: int, centroids: np.ndarray, train: np.ndarray, seed: int):
    """An empty, trained Faiss IVF whose coarse quantizer holds ``centroids`` (one per leaf)."""
    d, ip = centroids.shape[1], faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    if codec == "flat":
        ivf = faiss.IndexIVFFlat(quantizer, d, num_leaves, ip)
    elif codec == "sq8":
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, num_leaves, faiss.ScalarQuantizer.QT_8bit, ip, False)
    else:
        # one-byte codes; a corpus too small for 256 centroids per sub-quantizer gets fewer bits
        nbits = int(min(8, max(1, np.floor(np.log2(max(len(train), 2))))))
        ivf = faiss.IndexIVFPQ(quantizer, d, num_leaves, pq_m, nbits, ip)  # residual codes: coarse scores given
        ivf.pq.cp.seed = seed  # deterministic training
        ivf.pq.cp.min_points_per_centroid = 1  # no warning for small corpora
    if not ivf.is_trained:
        train = f32(train)
        if len(train) > 100_000:  # enough for any codec here; training cost stays bounded
            train = train[np.sort(np.random.default_rng(seed).choice(len(train), 100_000, replace=False))]
        try:
            ivf.train(train)
        except RuntimeError as e:
            raise ValueError(f"cannot train the {codec} codec: {str(e).splitlines()[-1][:200]}") from None
    return ivf


def codec_of(ivf) -> str:
    return "flat" if isinstance(ivf, faiss.IndexIVFFlat) else ("sq8" if isinstance(ivf, faiss.IndexIVFScalarQuantizer) else "pq")


def read_ivf(path: Path, mmap: bool):
    """A saved Faiss IVF (its own type); ValueError naming the file if it is not one."""
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        ivf = faiss.read_index(str(path), flags)  # already its own type; a downcast copy would not own it
    except RuntimeError as e:
        raise ValueError(f"{path.name}: unreadable Faiss index ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ivf, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ)):
        raise ValueError(f"{path.name}: expected an IVF index, got {type(ivf).__name__}")
    return ivf


def id_selector(rows: np.ndarray, n: int):
    """A Faiss selector of document rows: a bitmap of the ``n`` rows (n/8 bytes, one bit test
    per scanned id; cheaper to build and to test than ``IDSelectorBatch``'s hash set)."""
    mask = np.zeros(n, dtype=bool)
    mask[i64(rows)] = True
    bits = np.packbits(mask, bitorder="little")
    sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
    sel._bits = bits  # the selector reads this buffer: kept alive with it
    return sel


class FaissLists:
    """A Faiss IVF's lists, scanned in this process with ``search_preassigned``."""

    count = 1

    def __init__(self, ivf, centroids: np.ndarray, codec: str):
        self.ivf, self.centroids, self.codec = ivf, centroids, codec
        self._params: dict[int, object] = {}

    def scan(self, q, leaves, fetch, allowed=None, n=0):
        nq, beta = leaves.shape
        D = np.empty((nq, fetch), dtype=np.float32)
        I = np.empty((nq, fetch), dtype=np.int64)
        if nq:
            params = self._search_params(beta, None if allowed is None else id_selector(allowed, n))
            # residual codes add each leaf's coarse score <q, centroid>; flat ignores it
            coarse = self._coarse(q, leaves)
            self.ivf.search_preassigned_c(
                nq, faiss.swig_ptr(q), fetch, faiss.swig_ptr(leaves), faiss.swig_ptr(coarse),
                faiss.swig_ptr(D), faiss.swig_ptr(I), False, params,
            )
            if I[:, -1].min() < 0:  # rows are sorted: a short one ends in -1
                D[I < 0] = -np.inf
        return D, I

    def documents(self, sizes: np.ndarray) -> list[int]:
        return [int(sizes.sum())]

    def close(self) -> None:
        """Nothing runs apart from this process."""

    def _search_params(self, beta: int, sel=None):
        """Faiss search parameters for a beam width (kept: building one costs a SWIG call)."""
        if sel is not None:
            p = faiss.SearchParametersIVF()
            p.nprobe, p.sel = beta, sel  # Faiss's wrapper keeps sel (and its bitmap) alive with p
            return p
        if beta not in self._params:
            p = faiss.SearchParametersIVF()
            p.nprobe = beta
            self._params[beta] = p
        return self._params[beta]

    def _coarse(self, q: np.ndarray, leaves: np.ndarray) -> np.ndarray:
        if self.codec != "pq":
            return np.zeros(leaves.shape, dtype=np.float32)  # read by nothing: no residuals
        return f32(np.einsum("qd,qbd->qb", q, self.centroids[np.maximum(leaves, 0)]))
