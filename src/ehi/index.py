"""Leaf index: each document stored in its top-d2l leaves, leaves stored as contiguous blocks.

Search visits the leaves the beam reaches, scores the union of their documents by cosine
(one dense product per leaf block) and reports how many documents it visited.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SearchResult:
    indices: np.ndarray  # (Q, k) document row indices, best first, -1 past the candidates
    scores: np.ndarray  # (Q, k) cosine scores, -inf past the candidates
    visited: np.ndarray  # (Q,) distinct documents scored


class LeafIndex:
    """Documents grouped by leaf. Only the leaf-ordered copy of the embeddings is kept, so an
    index costs the raw vectors (times d2l) and no more."""

    def __init__(self, doc_leaves: np.ndarray, embeddings: np.ndarray | None, num_leaves: int, dim: int | None = None):
        doc_leaves = np.asarray(doc_leaves, dtype=np.int64)
        if doc_leaves.ndim == 1:
            doc_leaves = doc_leaves[:, None]
        n, d2l = doc_leaves.shape
        if embeddings is not None and embeddings.shape[0] != n:
            raise ValueError("one embedding per document is required")
        if doc_leaves.min(initial=0) < 0 or doc_leaves.max(initial=0) >= num_leaves:
            raise ValueError("leaf id out of range")
        self.num_leaves = num_leaves
        self.doc_leaves = doc_leaves
        self.num_docs = n
        flat = doc_leaves.ravel()
        order = np.argsort(flat, kind="stable")
        self.members = order // d2l  # leaf-contiguous document rows
        self.offsets = np.zeros(num_leaves + 1, dtype=np.int64)
        np.cumsum(np.bincount(flat, minlength=num_leaves), out=self.offsets[1:])
        # where each (document, copy) sits in leaf order
        self._slot = np.empty(len(flat), dtype=np.int64)
        self._slot[order] = np.arange(len(flat))
        if embeddings is not None:
            # embeddings in leaf order, so that scanning a leaf is one contiguous matrix product
            self.leaf_embeddings = np.ascontiguousarray(np.asarray(embeddings)[self.members], dtype=np.float32)
        else:
            self.leaf_embeddings = np.zeros((len(flat), dim), dtype=np.float32)

    @classmethod
    def from_chunks(cls, doc_leaves: np.ndarray, num_leaves: int, dim: int, chunks) -> "LeafIndex":
        """Build from ``(start_row, embeddings)`` chunks without ever holding the corpus twice."""
        index = cls(doc_leaves, None, num_leaves, dim)
        for start, x in chunks:
            index.write_rows(start, x)
        return index

    def write_rows(self, start: int, x: np.ndarray) -> None:
        d2l = self.d2l
        slots = self._slot[start * d2l : (start + len(x)) * d2l].reshape(len(x), d2l)
        for j in range(d2l):
            self.leaf_embeddings[slots[:, j]] = x

    @property
    def d2l(self) -> int:
        return self.doc_leaves.shape[1]

    @property
    def dim(self) -> int:
        return self.leaf_embeddings.shape[1]

    @property
    def embeddings(self) -> np.ndarray:
        """Document-order embeddings (a copy, made on demand)."""
        first = np.empty(self.num_docs, dtype=np.int64)
        first[self.members[::-1]] = np.arange(len(self.members))[::-1]
        return self.leaf_embeddings[first]

    def leaf_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def visited_counts(self, leaves: np.ndarray) -> np.ndarray:
        """Distinct documents in each row's leaves (Q, beta)."""
        leaves = np.asarray(leaves)
        if self.d2l == 1:
            # a document lives in one leaf; beam leaves are distinct, so sizes add up
            return self.leaf_sizes()[leaves].sum(1)
        return (self._gather(None, leaves)[1] >= 0).sum(1)

    def search(self, queries: np.ndarray, leaves: np.ndarray, k: int, batch: int = 4096) -> SearchResult:
        """Rank by cosine the documents of each query's ``leaves`` (Q, beta); top k.

        Queries are grouped by leaf: every leaf a batch visits is scanned once, with one
        matrix product against all the batch's queries that visit it; each leaf hands on only
        its own top k, so the per-query buffers stay small."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        leaves = np.asarray(leaves, dtype=np.int64).reshape(len(queries), -1)
        nq = len(queries)
        idx = np.full((nq, k), -1, dtype=np.int64)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        visited = np.zeros(nq, dtype=np.int64)
        for s in range(0, nq, batch):
            e = min(nq, s + batch)
            sc, pos, written, keep = self._gather(queries[s:e], leaves[s:e], cap=k)
            visited[s:e] = self.visited_counts(leaves[s:e])
            kk = min(k, sc.shape[1])
            if kk == 0:
                continue
            vals, top = torch.topk(torch.from_numpy(sc), kk, dim=1, sorted=True)
            top_sc, top = vals.numpy(), top.numpy()
            ok = np.isfinite(top_sc)
            if pos is not None:
                top_pos = np.take_along_axis(pos, top, axis=1)
            else:
                top_pos = self._positions(leaves[s:e], keep, np.where(ok, top, 0), written)
            idx[s:e, :kk] = np.where(ok, self.members[np.clip(top_pos, 0, len(self.members) - 1)], -1)
            scores[s:e, :kk] = np.where(ok, top_sc, -np.inf)
        return SearchResult(idx, scores, visited)

    def _gather(self, q: np.ndarray | None, leaves: np.ndarray, cap: int | None = None):
        """Per-query candidate buffers over the rows' leaves: scores (Q, W) (-inf padded; None
        without ``q``), leaf-order positions (Q, W) and how many slots each leaf got (Q, beta).
        With ``cap``, each leaf contributes only its ``cap`` best-scoring documents.

        Positions are written only where they cannot be derived from the column (leaves cut
        to their top ``cap``; every slot without ``q`` or with d2l > 1), see ``_positions``;
        repeats of a document stored in several of the leaves are masked."""
        nq, beta = leaves.shape
        lsz = self.leaf_sizes()[leaves]
        keep = lsz if cap is None else np.minimum(lsz, cap)
        starts = np.cumsum(keep, axis=1) - keep
        width = int(keep.sum(1).max(initial=0))
        sc = None if q is None else np.full((nq, width), -np.inf, dtype=np.float32)
        full_pos = q is None or self.d2l > 1
        pos = np.full((nq, width), -1, dtype=np.int64) if full_pos else None
        if not full_pos and (keep < lsz).any():
            pos = np.empty((nq, width), dtype=np.int64)  # read only at capped leaves' slots
        flat = leaves.ravel()
        order = np.argsort(flat, kind="stable")
        uniq, first = np.unique(flat[order], return_index=True)
        bounds = np.append(first, len(flat))
        E = self.leaf_embeddings
        for u, a, b in zip(uniq, bounds[:-1], bounds[1:]):
            lo, hi = int(self.offsets[u]), int(self.offsets[u + 1])
            n = hi - lo
            if n == 0:
                continue
            occ = order[a:b]
            qs = occ // beta
            kk = n if cap is None else min(n, cap)
            # flat indices of this leaf's slots in each visiting query's buffer row
            flat_cols = ((qs * width + starts[qs, occ % beta])[:, None] + np.arange(kk)).ravel()
            if q is None:
                pos.ravel()[flat_cols] = np.tile(np.arange(lo, hi), len(qs))
                continue
            S = np.dot(q[qs], E[lo:hi].T)  # one GEMM per leaf for all the queries visiting it
            if kk < n:
                part = np.argpartition(S, n - kk, axis=1)[:, n - kk :]
                sc.ravel()[flat_cols] = np.take_along_axis(S, part, axis=1).ravel()
                pos.ravel()[flat_cols] = (lo + part).ravel()
            else:
                sc.ravel()[flat_cols] = S.ravel()
                if full_pos:
                    pos.ravel()[flat_cols] = np.tile(np.arange(lo, hi), len(qs))
        if self.d2l > 1:
            # a document stored in several visited leaves is scored once: mask its repeats
            docs = np.where(pos >= 0, self.members[np.maximum(pos, 0)], -1)
            srt = np.argsort(docs, axis=1, kind="stable")
            sd = np.take_along_axis(docs, srt, axis=1)
            dup_sorted = np.zeros_like(sd, dtype=bool)
            dup_sorted[:, 1:] = (sd[:, 1:] == sd[:, :-1]) & (sd[:, 1:] >= 0)
            dup = np.zeros_like(dup_sorted)
            np.put_along_axis(dup, srt, dup_sorted, axis=1)
            if sc is not None:
                sc[dup] = -np.inf
            pos[dup] = -1
        return sc, (pos if full_pos else None), pos, keep

    def _positions(self, leaves: np.ndarray, keep: np.ndarray, cols: np.ndarray, written: np.ndarray | None) -> np.ndarray:
        """Leaf-order positions of buffer columns ``cols`` (Q, k): the leaf's offset plus the
        column's place in its slot, or the written position where the leaf was capped."""
        starts = np.cumsum(keep, axis=1) - keep
        slot = (cols[:, :, None] >= starts[:, None, :]).sum(-1) - 1
        leaf = np.take_along_axis(leaves, slot, axis=1)
        out = self.offsets[leaf] + cols - np.take_along_axis(starts, slot, axis=1)
        if written is not None:
            capped = np.take_along_axis(keep < self.leaf_sizes()[leaves], slot, axis=1)
            out = np.where(capped, np.take_along_axis(written, cols, axis=1), out)
        return out

    def leaf_stats(self, query_leaves: np.ndarray | None = None) -> dict:
        """Balance of the documents over the leaves.

        The expected documents scanned in one leaf is sum_i p_i c_i, with c_i the size of
        leaf i and p_i the share of queries whose top leaf it is (``query_leaves``, else the
        documents' own top leaves stand in for the queries); a balanced tree gives N*d2l / L.
        """
        sizes = self.leaf_sizes()
        top = self.doc_leaves[:, 0] if query_leaves is None else np.asarray(query_leaves).reshape(len(query_leaves), -1)[:, 0]
        p = np.bincount(top, minlength=self.num_leaves) / max(len(top), 1)
        return {
            "leaves": int(self.num_leaves),
            "documents": int(self.num_docs),
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
            "empty": int((sizes == 0).sum()),
            "expected_per_leaf": float((p * sizes).sum()),
            "ideal_per_leaf": self.num_docs * self.d2l / self.num_leaves,
        }
