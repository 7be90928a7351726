"""The tree routed in numpy for search: its weights copied once, no torch per call."""

from __future__ import annotations

import numpy as np


class NumpyRouter:
    """``Tree.beam_search`` in numpy, for search: the same level computation (a one-hot
    selects rows of U; the embedding's part is shared by a row's prefixes), one batched
    product per level, the top ``beam`` nodes kept per level."""

    def __init__(self, tree):
        self.B, self.H, self.num_leaves = tree.B, tree.H, tree.num_leaves
        self.U = [lv.U.detach().cpu().numpy().astype(np.float32) for lv in tree.levels]
        self.W = [lv.W.detach().cpu().numpy().astype(np.float32) for lv in tree.levels]
        self.dim = tree.dim
        self.per_node = tree.per_node
        self.rank_by_leaf = tree.per_node and tree.config.leaf_rank == "leaf"

    def _features(self, e: np.ndarray, h: int) -> np.ndarray:
        """``F(e; U_h) = e + ReLU(e U_h)`` for a level that reads the embedding alone."""
        z = e @ self.U[h]
        np.maximum(z, 0, out=z)
        z += e
        return z

    def _root_index(self):
        """The root's classifier columns as a Faiss inner-product index (its top children)."""
        if getattr(self, "_root", None) is None:
            import faiss

            self._root = faiss.IndexFlatIP(self.dim)
            self._root.add(np.ascontiguousarray(self.W[0].T))
        return self._root

    def _faiss_level(self):
        """Level 0 as Faiss objects: x -> x U (a LinearTransform) and the root's columns."""
        if getattr(self, "_u", None) is None:
            import faiss

            d = self.U[0].shape[0]
            self._u = faiss.LinearTransform(d, d, False)
            faiss.copy_array_to_vector(np.ascontiguousarray(self.U[0].T).ravel(), self._u.A)
            self._u.is_trained = True
        return self._u, self._root_index()

    @staticmethod
    def _log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    @staticmethod
    def _top(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` columns per row, best first (ties: lower index first, as a stable sort)."""
        if k == 1:
            idx = x.argmax(1)[:, None]
        elif k < x.shape[1]:
            part = np.argpartition(-x, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(x, part, 1)
            order = np.lexsort((part, -vals), axis=1)
            idx = np.take_along_axis(part, order, 1)
        else:
            idx = np.argsort(-x, axis=1, kind="stable")
        return idx, np.take_along_axis(x, idx, 1)

    def leaves(self, e: np.ndarray, beam: int, upper: int = 0) -> np.ndarray:
        """The top ``beam`` leaves only (N, k): search's path, with the least work per call.
        ``upper``: nodes kept at the levels above the leaves (at least ``beam``)."""
        if self.H == 1 and beam >= 1:
            e = np.ascontiguousarray(e, dtype=np.float32)
            k = min(beam, self.num_leaves)
            if len(e) >= 16:
                # a batch runs on Faiss's BLAS and thread pool, the one the leaf scan then uses:
                # numpy's own BLAS threads would compete with it for the cores. log-softmax
                # shifts a row by a constant, so the leaves are the top inner products with W
                u, wq = self._faiss_level()
                z = u.apply(e)
                np.maximum(z, 0, out=z)
                z += e
                return wq.search(z, k)[1]
            x = self._features(e, 0) @ self.W[0]
            if k == 1:
                return x.argmax(1)[:, None]
            out = np.empty((len(x), k), dtype=np.int64)
            for i, row in enumerate(x):  # fewer than 16 rows: plain indexing beats the along-axis helpers
                part = np.argpartition(row, -k)[-k:] if k < len(row) else np.arange(k)
                out[i] = part[np.argsort(-row[part], kind="stable")]
            return out
        if self.rank_by_leaf and beam >= 1 and upper >= self.num_leaves // self.B:
            return self._every_leaf(np.ascontiguousarray(e, dtype=np.float32), beam)
        if self.rank_by_leaf and self.H == 2:
            return self._two_level_leaves(np.ascontiguousarray(e, dtype=np.float32), beam, upper)
        return self.beam_search(e, beam, upper=upper)[0]

    def _every_leaf(self, e: np.ndarray, beam: int) -> np.ndarray:
        """A per-node tree ranked by leaf with every node above kept (how the spread router's
        documents are placed): each leaf scores the last level's features against its own
        column, so the levels above narrow nothing and one flat Faiss search over all B^H
        columns gives the same leaves at 1.2-2x a flat tree's placement (walking the cells cost
        6-11x, and ~140x at (16, 3): benchmarks/depth_cost.py)."""
        if getattr(self, "_every", None) is None:
            import faiss

            self._every = faiss.IndexFlatIP(self.dim)
            self._every.add(self._leaf_columns())
        return self._every.search(self._features(e, self.H - 1), min(beam, self.num_leaves))[1]

    def _leaf_columns(self) -> np.ndarray:
        """(B^H, d) the last level's classifier columns, leaf ``node·B + child`` in row order."""
        return np.ascontiguousarray(np.transpose(self.W[-1], (0, 2, 1)).reshape(self.num_leaves, self.dim))

    def calibrate_upper(self, e: np.ndarray, widths, agreement: float) -> dict[int, int]:
        """For a per-node (B, 2) tree ranked by leaf: per leaf width, the fewest cells to expand
        (a power of two times the cells the width needs, at most B) whose top leaves share at
        least ``agreement`` of the top leaves with every cell expanded, on ``e`` (training
        queries). Widths above L/8 expand every cell (the scan dominates there)."""
        B, L = self.B, self.num_leaves
        e = np.ascontiguousarray(e, dtype=np.float32)
        cap = max(1, L // 8)
        small = [w for w in widths if w <= cap]
        ref = self.leaves(e, max(small), upper=B) if small else None
        rows = np.arange(len(e))[:, None]
        out, u = {}, 1
        for w in sorted(widths):
            if w > cap:
                out[w] = B
                continue
            mark = np.zeros((len(e), L), dtype=bool)
            mark[rows, ref[:, :w]] = True
            u = max(u, -(-w // B))
            while u < B and mark[rows, self.leaves(e, w, upper=u)].mean() < agreement:
                u = min(B, 2 * u)
            out[w] = u
        return out

    def _two_level_leaves(self, e: np.ndarray, beam: int, upper: int) -> np.ndarray:
        """A per-node (B, 2) tree ranked by leaf, on Faiss: the top ``upper`` cells by the root
        classifier, then the leaves' classifiers as an IVF whose lists are the cells, searched
        in exactly those cells (no weights gathered or copied; C++ scan and top-k)."""
        import faiss

        from ehi.index.leaf_index import PARALLEL_OVER_QUERIES

        B, L = self.B, self.num_leaves
        root = self._root_index()
        if getattr(self, "_cells", None) is None:
            # the root is the IVF's quantizer too, though search hands it the cells already chosen
            cells = faiss.IndexIVFFlat(root, self.dim, B, faiss.METRIC_INNER_PRODUCT)
            x = self._leaf_columns()
            ids = np.arange(L, dtype=np.int64)
            lists = ids // B
            cells.add_core(L, faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
            cells.parallel_mode = PARALLEL_OVER_QUERIES
            self._cells = cells
        cells = self._cells
        k_cells = min(max(upper, -(-beam // B), 1), B)  # enough cells to hold ``beam`` leaves
        top = root.search(self._features(e, 0), k_cells)[1]
        z1 = self._features(e, 1)
        params = faiss.SearchParametersIVF()
        params.nprobe = k_cells
        k = min(beam, L)
        D = np.empty((len(e), k), dtype=np.float32)
        I = np.empty((len(e), k), dtype=np.int64)
        coarse = np.zeros(top.shape, dtype=np.float32)
        cells.search_preassigned_c(len(e), faiss.swig_ptr(z1), k, faiss.swig_ptr(top), faiss.swig_ptr(coarse),
                                   faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
        return I

    def beam_search(self, e: np.ndarray, beam: int, chunk: int = 4096, upper: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(leaves (N, k), log-probs (N, k)), k = min(beam, B^H), best first; the levels above
        the leaves keep max(beam, ``upper``) nodes (a wider search above costs little and
        saves queries from a wrong turn high up); a leaf-ranked (B, 2) tree keeps ``upper``
        cells, or as many as ``beam`` leaves need (its beam per level)."""
        if beam < 1:
            raise ValueError("beam must be >= 1")
        e = np.ascontiguousarray(e, dtype=np.float32)
        if self.rank_by_leaf and self.H == 2:  # cells: ``upper``, or as many as ``beam`` leaves need
            upper = min(max(upper, -(-beam // self.B), 1), self.B)
        else:
            upper = max(beam, upper)
        width = min(upper, self.num_leaves)  # nodes a row carries through the levels
        per_row = width * (self.dim * self.B if self.per_node and self.H > 1 else self.dim + self.H * self.B)
        chunk = max(1, min(chunk, (1 << 22) // per_row))
        k = min(beam, self.num_leaves)
        leaves = np.empty((len(e), k), dtype=np.int64)
        scores = np.empty((len(e), k), dtype=np.float32)
        for s in range(0, len(e), chunk):
            leaves[s : s + chunk], scores[s : s + chunk] = self._beam(e[s : s + chunk], beam, upper)
        return leaves, scores

    def _beam(self, e: np.ndarray, beam: int, upper: int | None = None):
        n, B = len(e), self.B
        scores = np.zeros((n, 1), dtype=np.float32)
        paths = np.zeros((n, 1, 0), dtype=np.int64)
        for h in range(self.H):
            U, W = self.U[h], self.W[h]
            K = scores.shape[1]
            pre = (e @ U[0 if self.per_node else h * B :])[:, None, :]  # (n, 1, in)
            if h == 0:
                z = e[:, None, :] + np.maximum(pre, 0)
                logits = z @ W
            elif self.per_node:
                # each prefix's own classifier: gathered by node, one batched product
                z = e + np.maximum(pre[:, 0], 0)
                weights = B ** np.arange(h - 1, -1, -1)
                logits = np.einsum("nd,nkdb->nkb", z, W[(paths * weights).sum(-1)], optimize=True)
            else:
                rows = paths[:, :, ::-1] + np.arange(h) * B
                pre = pre + U[rows].sum(2)
                x_oh = np.zeros((n, K, h * B), dtype=np.float32)
                np.put_along_axis(x_oh, rows, 1.0, axis=2)
                z_oh = x_oh + np.maximum(pre[..., : h * B], 0)
                z_e = e[:, None, :] + np.maximum(pre[..., h * B :], 0)
                logits = z_oh @ W[: h * B] + z_e @ W[h * B :]
            if self.rank_by_leaf and h == self.H - 1 and h:
                cand = logits.reshape(n, K * B)  # the leaves under the kept nodes, by their own score
            else:
                cand = (scores[:, :, None] + self._log_softmax(logits)).reshape(n, K * B)
            keep = beam if h == self.H - 1 or upper is None else upper
            idx, scores = self._top(cand, min(keep, K * B))
            parent, child = idx // B, idx % B
            paths = np.concatenate([np.take_along_axis(paths, parent[:, :, None], 1), child[:, :, None]], axis=2)
        weights = B ** np.arange(self.H - 1, -1, -1)
        return (paths * weights).sum(-1), scores
