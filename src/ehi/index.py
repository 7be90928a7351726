"""Leaf index: each document stored in its top-d2l leaves, leaves stored as contiguous blocks.

Search visits the leaves the beam reaches, scores the union of their documents by cosine
(one dense product per leaf block) and reports how many documents it visited.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SearchResult:
    indices: np.ndarray  # (Q, k) document row indices, best first, -1 past the candidates
    scores: np.ndarray  # (Q, k) cosine scores, -inf past the candidates
    visited: np.ndarray  # (Q,) distinct documents scored


class LeafIndex:
    def __init__(self, doc_leaves: np.ndarray, embeddings: np.ndarray, num_leaves: int):
        doc_leaves = np.asarray(doc_leaves, dtype=np.int64)
        if doc_leaves.ndim == 1:
            doc_leaves = doc_leaves[:, None]
        n, d2l = doc_leaves.shape
        if embeddings.shape[0] != n:
            raise ValueError("one embedding per document is required")
        if doc_leaves.min(initial=0) < 0 or doc_leaves.max(initial=0) >= num_leaves:
            raise ValueError("leaf id out of range")
        self.num_leaves = num_leaves
        self.doc_leaves = doc_leaves
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        flat = doc_leaves.ravel()
        docs = np.repeat(np.arange(n), d2l)
        order = np.argsort(flat, kind="stable")
        self.members = docs[order]  # leaf-contiguous document rows
        self.offsets = np.zeros(num_leaves + 1, dtype=np.int64)
        np.cumsum(np.bincount(flat, minlength=num_leaves), out=self.offsets[1:])
        # embeddings in leaf order, so that scanning a leaf is one contiguous matrix product
        self.leaf_embeddings = self.embeddings[self.members]

    @property
    def num_docs(self) -> int:
        return self.embeddings.shape[0]

    @property
    def d2l(self) -> int:
        return self.doc_leaves.shape[1]

    def leaf_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def visited_counts(self, leaves: np.ndarray) -> np.ndarray:
        """Distinct documents in each row's leaves (Q, beta)."""
        leaves = np.asarray(leaves)
        if self.d2l == 1:
            # a document lives in one leaf; beam leaves are distinct, so sizes add up
            return self.leaf_sizes()[leaves].sum(1)
        return np.array([len(self._candidates(row)) for row in leaves], dtype=np.int64)

    def _candidates(self, leaves) -> np.ndarray:
        parts = [self.members[self.offsets[l] : self.offsets[l + 1]] for l in leaves]
        cand = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return np.unique(cand) if self.d2l > 1 else cand

    def search(self, queries: np.ndarray, leaves: np.ndarray, k: int) -> SearchResult:
        """Rank by cosine the documents of each query's ``leaves`` (Q, beta); top k."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        nq = queries.shape[0]
        idx = np.full((nq, k), -1, dtype=np.int64)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        visited = np.zeros(nq, dtype=np.int64)
        sizes = self.leaf_sizes()
        for qi in range(nq):
            row = np.asarray(leaves[qi])
            row = row[sizes[row] > 0]
            if self.d2l == 1:
                blocks = [(self.offsets[l], self.offsets[l + 1]) for l in row]
                cand = np.concatenate([self.members[a:b] for a, b in blocks]) if len(blocks) else np.empty(0, np.int64)
                s = (
                    np.concatenate([self.leaf_embeddings[a:b] @ queries[qi] for a, b in blocks])
                    if len(blocks)
                    else np.empty(0, np.float32)
                )
            else:
                cand = self._candidates(row)
                s = self.embeddings[cand] @ queries[qi]
            visited[qi] = len(cand)
            kk = min(k, len(cand))
            if kk == 0:
                continue
            top = np.argpartition(-s, kk - 1)[:kk] if kk < len(cand) else np.arange(len(cand))
            top = top[np.argsort(-s[top], kind="stable")]
            idx[qi, :kk] = cand[top]
            scores[qi, :kk] = s[top]
        return SearchResult(idx, scores, visited)

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
