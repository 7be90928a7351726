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

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ehi.artifacts import ArtifactError

# A search of ``beam`` leaves scores exactly at least this many candidates (when it prunes)
MIN_CANDIDATES = 24
# Candidates pay while they are at most this share of the leaves: beyond an eighth, one product
# over every leaf costs less than the cheap score plus a gather (SciFact's 256 leaves, one query
# and batches alike; benchmarks/search_speed.py)
GATHER_SHARE = 8


class LeafSketch:
    """Per-leaf mean (L, d) and scaled principal directions (L, r, d) of the documents.

    ``basis`` > 0 and ``per_beam`` > 0 make a search cheap without changing what it scores: the
    leaves' directions are projected once on a ``basis``-dimensional basis shared by every leaf,
    that cheap score picks ``max(24, per_beam·beam)`` candidate leaves, and only those are scored
    exactly (when they are at most an eighth of the leaves; a wider search scores every leaf).
    At 256 leaves x rank 8 x 384 the exact product (3 MB) outgrows a core's L2 cache and costs a
    single query ~25x a centroid lookup; the projected one fits. The defaults
    (``IndexConfig.spread_basis``, ``spread_candidates``) kept the exact router's Recall@100 on
    three corpora's decision queries (``benchmarks/spread_routing.py --basis``).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> leaves = np.arange(200) % 4
    >>> sk = LeafSketch.fit(x, leaves, num_leaves=4, rank=2)
    >>> sk.scores(x[:3], lam=2.0).shape
    (3, 4)
    >>> sk.top(x[:3], beam=2, lam=2.0).shape
    (3, 2)
    """

    def __init__(self, means: np.ndarray, spread: np.ndarray, counts: np.ndarray, basis: int = 0, per_beam: float = 0.0):
        self.means = np.ascontiguousarray(means, dtype=np.float32)  # (L, d); empty leaves 0
        self.spread = np.ascontiguousarray(spread, dtype=np.float32)  # (L, r, d)
        self.counts = np.asarray(counts, dtype=np.int64)  # (L,) documents each leaf holds
        L, r, d = self.spread.shape
        # an empty leaf is never worth a visit: -inf added to its score
        self._empty = np.where(self.counts == 0, -np.inf, 0.0).astype(np.float32)
        rows = self.spread.reshape(L * r, d)
        self._flat = np.ascontiguousarray(rows.T)  # (d, L*r): one product for every leaf
        self.basis = basis if 0 < basis < d else 0
        self.per_beam = float(per_beam)
        self._proj = self._coords = None
        if self.basis:
            # the directions' top principal axes: what they lose is the least energy of S_c
            g = rows.T.astype(np.float64) @ rows
            w, v = np.linalg.eigh(g)
            p = v[:, np.argsort(-w, kind="stable")[: self.basis]]
            self._proj = np.ascontiguousarray(p, dtype=np.float32)  # (d, k)
            self._coords = np.ascontiguousarray((rows @ p).T, dtype=np.float32)  # (k, L*r)
        self._memo: tuple | None = None  # (queries, lam, what ``top`` needs of them): see ``sweeping``
        self._sweeps = 0

    @property
    def num_leaves(self) -> int:
        return self.means.shape[0]

    @property
    def rank(self) -> int:
        return self.spread.shape[1]

    @contextmanager
    def sweeping(self):
        """Inside, a batch of 512 or more queries asked about again (the same array, unchanged:
        the caller's promise) at another width reuses its leaf order: evaluation and calibration
        sweep one batch over many widths. Outside, every call routes afresh, so a reused
        buffer never gets another batch's leaves and a timed search always pays for routing."""
        self._sweeps += 1
        try:
            yield self
        finally:
            self._sweeps -= 1
            if not self._sweeps:
                self._memo = None

    @classmethod
    def fit(cls, vectors: np.ndarray, doc_leaves: np.ndarray, num_leaves: int, rank: int = 8, basis: int = 0,
            per_beam: float = 0.0) -> "LeafSketch":
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
        return cls(means, spread, counts, basis, per_beam)

    def with_search(self, basis: int, per_beam: float) -> "LeafSketch":
        """The same sketch searched with another basis / candidate rule."""
        if (basis if 0 < basis < self.means.shape[1] else 0, float(per_beam)) == (self.basis, self.per_beam):
            return self
        return LeafSketch(self.means, self.spread, self.counts, basis, per_beam)

    def scores(self, q: np.ndarray, lam: float, approximate: bool = False, chunk: int = 1024) -> np.ndarray:
        """(Q, L): ``q·μ_c + lam·‖S_c q‖`` for every leaf (empty leaves -inf); ``approximate``:
        the spread through the shared basis (when the sketch has one)."""
        q = np.asarray(q, dtype=np.float32)
        out = np.empty((len(q), self.num_leaves), dtype=np.float32)
        for s in range(0, len(q), chunk):
            qq = q[s : s + chunk]
            out[s : s + chunk] = qq @ self.means.T + self._empty
            if lam and self.rank:
                out[s : s + chunk] += lam * self._norms(qq, approximate)
        return out

    def _norms(self, q: np.ndarray, approximate: bool) -> np.ndarray:
        """(Q, L): ``‖S_c q‖``, exact or through the shared basis."""
        if approximate and self._proj is not None:
            y = (q @ self._proj) @ self._coords
        else:
            y = q @ self._flat
        y = y.reshape(len(q), self.num_leaves, self.rank)
        return np.sqrt(np.einsum("qlr,qlr->ql", y, y))

    def candidate_count(self, beam: int) -> int:
        """Leaves scored exactly for a search of ``beam`` leaves: every leaf when the sketch does
        not prune, or when its candidates would be more than ``1 / GATHER_SHARE`` of the leaves
        (then one product over every leaf costs less than the cheap score and a gather)."""
        L = self.num_leaves
        M = max(MIN_CANDIDATES, beam, math.ceil(self.per_beam * beam))
        return M if self.per_beam and M * GATHER_SHARE <= L else L

    def top(self, q: np.ndarray, beam: int, lam: float, candidates: int | None = None) -> np.ndarray:
        """(Q, min(beam, L)) leaves by exact score, best first, among ``candidates`` leaves
        ranked first by the cheap score (the shared basis's when the sketch has one, else the
        mean alone); ``None``: the sketch's own rule (``candidate_count``), 0: every leaf."""
        L = self.num_leaves
        beam = min(beam, L)
        if candidates is None:
            M = self.candidate_count(beam)
        else:
            M = min(L, max(candidates, beam)) if candidates else L
        q = np.asarray(q, dtype=np.float32)
        keep = self._sweeps > 0 and len(q) >= 512
        if M == L and not keep:
            return _top(self.scores(q, lam), beam)
        if M < L and not keep and M * GATHER_SHARE <= L:
            return self._gathered(q, beam, lam, M)
        # inside ``sweeping``: the leaves' order (by exact score, or by the cheap one with the
        # exact scores beside it) is computed once per batch and λ
        memo = self._memo if keep else None
        if memo is None or memo[0] is not q or memo[1] != lam or memo[2] != (M < L):
            if M == L:
                memo = (q, lam, False, _top(self.scores(q, lam), L), None)
            else:
                cheap, exact = self._cheap_and_exact(q, lam)
                memo = (q, lam, True, _top(cheap, L if keep else M), exact)
            if keep:
                self._memo = memo
        if M == L:
            return memo[3][:, :beam]
        cand = memo[3][:, :M]
        best = _top(np.take_along_axis(memo[4], cand, 1), beam)
        return np.take_along_axis(cand, best, 1)

    def _cheap(self, q: np.ndarray, base: np.ndarray, lam: float) -> np.ndarray:
        """The score that picks the candidates, given the mean term ``base`` of ``q``: the spread
        through the shared basis, or the mean alone without one."""
        return base + lam * self._norms(q, approximate=True) if self._proj is not None and lam else base

    def _cheap_and_exact(self, q: np.ndarray, lam: float, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(Q, L) cheap and exact scores, sharing one mean product per chunk."""
        cheap = np.empty((len(q), self.num_leaves), dtype=np.float32)
        exact = np.empty_like(cheap)
        for s in range(0, len(q), chunk):
            qq = q[s : s + chunk]
            base = qq @ self.means.T + self._empty
            cheap[s : s + chunk] = self._cheap(qq, base, lam)
            exact[s : s + chunk] = base + lam * self._norms(qq, approximate=False) if lam and self.rank else base
        return cheap, exact

    def _gathered(self, q: np.ndarray, beam: int, lam: float, M: int, chunk: int = 4096) -> np.ndarray:
        """``top`` with only the candidates' directions read: per query for one, per leaf for a
        batch (each leaf's (r, d) directions multiply every query it is a candidate of)."""
        if len(q) == 1:
            return self._one(q[0], beam, lam, M)[None]
        out = np.empty((len(q), beam), dtype=np.int64)
        L = self.num_leaves
        for s in range(0, len(q), chunk):
            qq = q[s : s + chunk]
            n = len(qq)
            base = qq @ self.means.T + self._empty
            cand = np.argpartition(-self._cheap(qq, base, lam), M - 1, axis=1)[:, :M]  # (n, M)
            rows, leaves = np.repeat(np.arange(n), M), cand.ravel()
            order = np.argsort(leaves, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(leaves, minlength=L))])
            norms = np.empty(n * M, dtype=np.float32)
            for c in np.flatnonzero(bounds[1:] - bounds[:-1]):
                at = order[bounds[c] : bounds[c + 1]]
                y = qq[rows[at]] @ self.spread[c].T  # (queries with c among their candidates, r)
                norms[at] = np.sqrt(np.einsum("nr,nr->n", y, y))
            sc = base[rows, leaves].reshape(n, M) + lam * norms.reshape(n, M)
            out[s : s + chunk] = np.take_along_axis(cand, _top(sc, beam), 1)
        return out

    def _one(self, q: np.ndarray, beam: int, lam: float, M: int) -> np.ndarray:
        """``_gathered`` for one query (d,), in vector operations: a lone query is the common
        case of a server, where numpy's per-call cost is most of the time."""
        L, r = self.num_leaves, self.rank
        base = self.means @ q + self._empty
        if self._proj is not None and lam:
            y = (q @ self._proj) @ self._coords
            first = base + lam * np.sqrt((y * y).reshape(L, r).sum(1))
        else:
            first = base
        cand = np.argpartition(-first, M - 1)[:M]
        y = self.spread[cand].reshape(M * r, -1) @ q
        sc = base[cand] + lam * np.sqrt((y * y).reshape(M, r).sum(1))
        if beam < M:
            part = np.argpartition(-sc, beam - 1)[:beam]
            return cand[part[np.argsort(-sc[part], kind="stable")]]
        return cand[np.argsort(-sc, kind="stable")]

    def save(self, path: Path) -> None:
        from safetensors.numpy import save_file

        save_file({"means": self.means, "spread": self.spread, "counts": self.counts}, str(path))

    @classmethod
    def read(cls, path: Path, index, rank: int, basis: int = 0, per_beam: float = 0.0) -> "LeafSketch":
        """The saved sketch, checked against the index it summarises (the shared basis is
        derived from the saved directions, never saved)."""
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
            sk = cls(t["means"], t["spread"], t["counts"], basis, per_beam)
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
