"""A leaf scorer no training question shapes: each leaf's mean and the spread of its documents.

After Optimist (Bruch, Krishnan, Nardini, NeurIPS 2025). A query's best documents in leaf ``c``
are where its inner products with the leaf's documents are high, and the best of them lie far
above their mean when the leaf is spread along the query. So a leaf scores

    q·μ_c + λ ‖S_c q‖

with ``μ_c`` its documents' mean and ``S_c`` (r, d) the top r principal directions of its
centred documents scaled by their standard deviations: ``‖S_c q‖`` is (a rank-r sketch of) the
standard deviation of the leaf's inner products along ``q``. Built from the documents alone, it
routes questions about documents no training query touched as well as any other (no train /
new gap by construction); the learned tree routes best where training questions went.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ehi.artifacts import ArtifactError


class LeafSketch:
    """Per-leaf mean (L, d) and scaled principal directions (L, r, d) of the documents.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> leaves = np.arange(200) % 4
    >>> sk = LeafSketch.fit(x, leaves, num_leaves=4, rank=2)
    >>> sk.scores(x[:3], lam=2.0).shape
    (3, 4)
    """

    def __init__(self, means: np.ndarray, spread: np.ndarray, counts: np.ndarray):
        self.means = np.ascontiguousarray(means, dtype=np.float32)  # (L, d); empty leaves 0
        self.spread = np.ascontiguousarray(spread, dtype=np.float32)  # (L, r, d)
        self.counts = np.asarray(counts, dtype=np.int64)  # (L,) documents each leaf holds
        L, r, d = self.spread.shape
        # an empty leaf is never worth a visit: -inf added to its score
        self._empty = np.where(self.counts == 0, -np.inf, 0.0).astype(np.float32)
        self._flat = np.ascontiguousarray(self.spread.reshape(L * r, d).T)  # (d, L*r): one product
        self._memo: tuple | None = None  # (queries, lam, their full leaf order): see ``top``

    @property
    def num_leaves(self) -> int:
        return self.means.shape[0]

    @property
    def rank(self) -> int:
        return self.spread.shape[1]

    @classmethod
    def fit(cls, vectors: np.ndarray, doc_leaves: np.ndarray, num_leaves: int, rank: int = 8) -> "LeafSketch":
        """From the documents (N, d) and their leaves (N,) or (N, d2l): a document held by
        several leaves counts in each."""
        leaves = np.asarray(doc_leaves).reshape(len(vectors), -1)
        rows = np.repeat(np.arange(len(vectors)), leaves.shape[1])
        flat = leaves.ravel()
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=num_leaves)
        starts = np.concatenate([[0], np.cumsum(counts)])
        d = vectors.shape[1]
        means = np.zeros((num_leaves, d), dtype=np.float32)
        spread = np.zeros((num_leaves, rank, d), dtype=np.float32)
        for c in np.flatnonzero(counts):
            x = np.asarray(vectors[np.sort(rows[order[starts[c] : starts[c + 1]]])], dtype=np.float64)
            means[c] = mu = x.mean(0)
            if len(x) > 1 and rank:
                # the centred documents' right singular vectors, scaled to standard deviations
                _, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
                r = min(rank, len(sv))
                spread[c, :r] = (sv[:r, None] / np.sqrt(len(x))) * vt[:r]
        return cls(means, spread, counts)

    def scores(self, q: np.ndarray, lam: float, chunk: int = 1024) -> np.ndarray:
        """(Q, L): ``q·μ_c + lam·‖S_c q‖`` for every leaf (empty leaves -inf)."""
        q = np.asarray(q, dtype=np.float32)
        L, r = self.num_leaves, self.rank
        out = np.empty((len(q), L), dtype=np.float32)
        for s in range(0, len(q), chunk):
            qq = q[s : s + chunk]
            out[s : s + chunk] = qq @ self.means.T + self._empty
            if lam and r:
                out[s : s + chunk] += lam * np.linalg.norm((qq @ self._flat).reshape(len(qq), L, r), axis=2)
        return out

    def top(self, q: np.ndarray, beam: int, lam: float, candidates: int = 0, chunk: int = 64) -> np.ndarray:
        """(Q, min(beam, L)) leaves by score, best first. ``candidates`` > 0: the spread is
        computed only for that many leaves of highest mean (at least ``beam``)."""
        L = self.num_leaves
        beam = min(beam, L)
        M = min(L, max(candidates, beam)) if candidates else L
        if M == L and len(q) >= 512:
            # evaluation and calibration ask about the same queries at many widths: their full
            # leaf order is computed once, kept while the same array is asked about with this λ
            if self._memo is None or self._memo[0] is not q or self._memo[1] != lam:
                self._memo = (q, lam, _top(self.scores(q, lam), L))
            return self._memo[2][:, :beam]
        q = np.asarray(q, dtype=np.float32)
        if M == L:
            return _top(self.scores(q, lam), beam)
        out = np.empty((len(q), beam), dtype=np.int64)
        r, d = self.rank, q.shape[1]
        for s in range(0, len(q), chunk):
            qq = q[s : s + chunk]
            base = qq @ self.means.T + self._empty
            cand = np.argpartition(-base, M - 1, axis=1)[:, :M]  # (c, M)
            proj = np.matmul(self.spread[cand].reshape(len(qq), M * r, d), qq[:, :, None])  # (c, M*r, 1)
            sc = np.take_along_axis(base, cand, 1) + lam * np.linalg.norm(proj.reshape(len(qq), M, r), axis=2)
            best = _top(sc, beam)
            out[s : s + chunk] = np.take_along_axis(cand, best, 1)
        return out

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"means": self.means, "spread": self.spread, "counts": self.counts}, str(path))

    @classmethod
    def read(cls, path: Path, index, rank: int) -> "LeafSketch":
        """The saved sketch, checked against the index it summarises."""
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
            sk = cls(t["means"], t["spread"], t["counts"])
        except Exception as e:  # safetensors' own error types, a missing tensor, a bad shape
            raise ArtifactError(f"{path}: unreadable leaf sketch ({e})") from None
        L, d = index.num_leaves, index.dim
        if sk.means.shape != (L, d) or sk.spread.shape != (L, rank, d):
            raise ArtifactError(f"{path}: expected ({L}, {d}) means and ({L}, {rank}, {d}) spreads, got {sk.means.shape} and {sk.spread.shape}")
        if not np.array_equal(sk.counts, index.leaf_sizes()):
            raise ArtifactError(f"{path}: summarises other leaves than the index holds (saved from another index)")
        return sk



def _top(s: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the ``k`` highest scores, best first (ties: lower column)."""
    if k < s.shape[1]:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
        return np.take_along_axis(part, order, 1)
    return np.argsort(-s, axis=1, kind="stable")
