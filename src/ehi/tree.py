"""The learned tree indexer: H levels of B-way classifiers, vectorised over batches.

Level h sees ``[o(i^{h-1}); ...; o(i^1); e]`` (one-hots of the choices above, most recent
first, then the embedding) through ``F(x; U) = x + ReLU(U^T x)`` and ``softmax(W^T .)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TreeConfig


class Level(nn.Module):
    def __init__(self, in_dim: int, branching: int, u_scale: float = 1e-3):
        super().__init__()
        # U starts small, not zero: ReLU'(0) = 0 would leave it untrained forever.
        self.U = nn.Parameter(torch.randn(in_dim, in_dim) * (u_scale / in_dim**0.5))
        self.W = nn.Parameter(torch.randn(in_dim, branching) / in_dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the B children."""
        z = x + F.relu(x @ self.U)
        return F.log_softmax(z @ self.W, dim=-1)


class NodeLevel(nn.Module):
    """Level h >= 1 of a per-node tree: one B-way classifier for each of the B^h nodes above,
    all reading ``F(e; U_h)``; a prefix selects its node's weights, so each cell of the level
    above is split along its own directions."""

    def __init__(self, dim: int, nodes: int, branching: int, u_scale: float = 1e-3):
        super().__init__()
        self.U = nn.Parameter(torch.randn(dim, dim) * (u_scale / dim**0.5))
        self.W = nn.Parameter(torch.randn(nodes, dim, branching) / dim**0.5)

    def logp(self, e: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the children of ``node`` (...,) for rows ``e`` (n, d):
        node (n,) -> (n, B); node (n, K) -> (n, K, B)."""
        z = e + F.relu(e @ self.U)
        if node.dim() == 1:
            return F.log_softmax(torch.einsum("nd,ndb->nb", z, self.W[node]), dim=-1)
        return F.log_softmax(torch.einsum("nd,nkdb->nkb", z, self.W[node]), dim=-1)


@dataclass
class Routing:
    """Arg-max routing of a batch, as training follows it."""

    path_embedding: torch.Tensor  # (N, B*H): each level's distribution times its prefix probability
    path: torch.Tensor  # (N, H) arg-max child chosen at each level
    level_probs: list[torch.Tensor]  # H tensors (N, B), unscaled

    @property
    def leaf(self) -> torch.Tensor:
        B = self.level_probs[0].shape[1]
        return path_to_leaf(self.path, B)


def path_to_leaf(path: torch.Tensor, branching: int) -> torch.Tensor:
    H = path.shape[-1]
    weights = branching ** torch.arange(H - 1, -1, -1, device=path.device)
    return (path * weights).sum(-1)


def leaf_to_path(leaf: torch.Tensor, branching: int, height: int) -> torch.Tensor:
    digits = []
    for _ in range(height):
        digits.append(leaf % branching)
        leaf = leaf // branching
    return torch.stack(digits[::-1], dim=-1)


class Tree(nn.Module):
    def __init__(self, dim: int, config: TreeConfig):
        super().__init__()
        config.validate()
        if not config.branching:
            raise ValueError("branching 0 (auto) must be resolved for a corpus first: TreeConfig.resolve_branching(N)")
        self.config = config
        self.dim = dim
        self.B, self.H = config.branching, config.height
        self.per_node = config.conditioning == "per-node"
        # level 0 has one node and no path above it: the same module in both conditionings
        self.levels = nn.ModuleList(
            NodeLevel(dim, self.B**h, self.B) if self.per_node and h else Level(dim + (0 if self.per_node else h * self.B), self.B)
            for h in range(self.H)
        )

    @classmethod
    def from_state(cls, dim: int, config: TreeConfig, state: dict, device: str = "cpu") -> "Tree":
        """A saved tree in evaluation mode; ValueError if the tensors do not match the config."""
        tree = cls(dim, config).to(device)
        try:
            tree.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"does not match the config ({e})") from None
        return tree.eval()

    @property
    def num_leaves(self) -> int:
        return self.B**self.H

    def _level_input(self, e: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """``[o(i^{h-1}); ...; o(i^1); e]`` for prefixes ``path`` (..., h)."""
        if path.shape[-1] == 0:
            return e
        oh = F.one_hot(path.flip(-1), self.B).to(e.dtype).flatten(-2)
        return torch.cat([oh, e], dim=-1)

    def route(self, e: torch.Tensor) -> Routing:
        """Follow the arg-max path; the prefix probability keeps its gradient."""
        n = e.shape[0]
        prefix = torch.ones(n, 1, device=e.device, dtype=e.dtype)
        path = torch.empty(n, 0, dtype=torch.long, device=e.device)
        parts, probs = [], []
        node = torch.zeros(n, dtype=torch.long, device=e.device)
        for h, level in enumerate(self.levels):
            if self.per_node and h:
                p = level.logp(e, node).exp()
            else:
                p = level(self._level_input(e, path)).exp()
            parts.append(prefix * p)
            probs.append(p)
            i = p.argmax(-1, keepdim=True)
            prefix = prefix * p.gather(1, i)
            path = torch.cat([path, i], dim=1)
            node = node * self.B + i[:, 0]
        return Routing(torch.cat(parts, dim=1), path, probs)

    def forced_logp(self, e: torch.Tensor, path: torch.Tensor) -> list[torch.Tensor]:
        """Each level's log-probabilities (n, B) under the prefix of ``path`` (n, H), not the
        arg-max: what a level must score to route rows down a given path (teacher forcing)."""
        out, node = [], torch.zeros(e.shape[0], dtype=torch.long, device=e.device)
        for h, level in enumerate(self.levels):
            out.append(level.logp(e, node) if self.per_node and h else level(self._level_input(e, path[:, :h])))
            node = node * self.B + path[:, h]
        return out

    @torch.no_grad()
    def beam_search(self, e: torch.Tensor, beam: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``beam`` leaves per row by path log-probability, keeping ``beam`` nodes per level.

        Returns (leaves (N, k), log-probs (N, k)) with k = min(beam, B^H), best first.
        """
        if beam < 1:
            raise ValueError("beam must be >= 1")
        # bound the (rows x beam x input) intermediates (per-node: the gathered weights)
        per_row = min(beam, self.num_leaves) * (self.dim * self.B if self.per_node and self.H > 1 else self.dim + self.H * self.B)
        chunk = max(1, min(chunk, (1 << 22) // per_row))
        outs = [self._beam(e[s : s + chunk], beam) for s in range(0, e.shape[0], chunk)]
        if not outs:
            k = min(beam, self.num_leaves)
            return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _level_logp(self, h: int, e: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        """Level h's log-probabilities for every prefix in ``paths`` (n, K, h) -> (n, K, B).

        Same as ``level(_level_input(...))``, without materialising the one-hot inputs or
        multiplying them by U: a one-hot selects a row of U, and e's part is shared by the K
        prefixes of a row."""
        level, B = self.levels[h], self.B
        n, K = paths.shape[:2]
        if self.per_node and h:
            return level.logp(e, path_to_leaf(paths, B))
        pre = (e @ level.U[h * B :])[:, None, :]  # (n, 1, in)
        if h == 0:
            z = e[:, None, :] + F.relu(pre)
            return F.log_softmax(z @ level.W, dim=-1)
        rows = paths.flip(-1) + torch.arange(h, device=e.device) * B  # one-hot row of each block
        pre = pre + level.U[rows].sum(2)  # (n, K, in)
        x_oh = F.one_hot(paths.flip(-1), B).to(e.dtype).flatten(-2)  # (n, K, h*B)
        z_oh = x_oh + F.relu(pre[..., : h * B])
        z_e = e[:, None, :] + F.relu(pre[..., h * B :])
        logits = z_oh @ level.W[: h * B] + z_e @ level.W[h * B :]
        return F.log_softmax(logits, dim=-1)

    def _beam(self, e: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, d = e.shape
        scores = torch.zeros(n, 1, device=e.device, dtype=e.dtype)
        paths = torch.empty(n, 1, 0, dtype=torch.long, device=e.device)
        for h in range(self.H):
            K = scores.shape[1]
            logp = self._level_logp(h, e, paths)
            cand = (scores[:, :, None] + logp).reshape(n, K * self.B)
            top = cand.topk(min(beam, K * self.B), dim=1)
            parent = torch.div(top.indices, self.B, rounding_mode="floor")
            child = top.indices % self.B
            paths = torch.cat([paths.gather(1, parent[:, :, None].expand(-1, -1, paths.shape[2])), child[:, :, None]], dim=2)
            scores = top.values
        return path_to_leaf(paths, self.B), scores

    def router(self) -> "NumpyRouter":
        """A copy of the weights that routes in numpy: inference without torch's per-call cost."""
        return NumpyRouter(self)

    @torch.no_grad()
    def leaf_log_probs(self, e: torch.Tensor) -> torch.Tensor:
        """Exact log-probability of every leaf (N, B^H) by enumeration; for tests and small trees."""
        paths = leaf_to_path(torch.arange(self.num_leaves, device=e.device), self.B, self.H)
        total = torch.zeros(e.shape[0], self.num_leaves, device=e.device, dtype=e.dtype)
        for h, level in enumerate(self.levels):
            prefix = paths[:, :h]
            if self.per_node and h:
                node = path_to_leaf(prefix, self.B)[None].expand(e.shape[0], -1)
                logp = level.logp(e, node)
                total = total + logp.gather(2, paths[None, :, h : h + 1].expand(e.shape[0], -1, 1)).squeeze(2)
                continue
            x = self._level_input(e[:, None, :].expand(-1, self.num_leaves, -1), prefix.expand(e.shape[0], -1, -1))
            logp = level(x.reshape(-1, x.shape[-1])).reshape(e.shape[0], self.num_leaves, self.B)
            total = total + logp.gather(2, paths[None, :, h : h + 1].expand(e.shape[0], -1, 1)).squeeze(2)
        return total

    # ---- initialisation ----------------------------------------------------------------
    def reset_to_kmeans(self, doc_emb: np.ndarray, seed: int = 0) -> None:
        """The weights only: k-means over these documents (``init_kmeans``), U back at a small
        random start (not zero: ReLU'(0) = 0 would freeze it), so the tree places each
        document at its nearest centroid."""
        self.init_kmeans(doc_emb, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for level in self.levels:
                n = level.U.shape[0]
                level.U.copy_(torch.randn(level.U.shape, generator=g) * (1e-3 / n**0.5))

    @torch.no_grad()
    def init_kmeans(self, doc_emb: np.ndarray, seed: int = 0, verbose: bool = False) -> None:
        """Step 0 is a soft IVF: level 0 holds spherical k-means centroids; deeper levels hold
        residual k-means centroids (residuals from the chosen clusters' means), the prefix
        one-hots carrying the ``-<r_k, m_prefix>`` offsets so that each level's argmax is the
        nearest residual centroid."""
        import faiss

        x = np.ascontiguousarray(doc_emb, dtype=np.float32)
        n, d = x.shape
        T = self.config.temperature
        if n < self.B:
            raise ValueError(f"k-means needs at least B={self.B} documents, got {n}")
        if self.per_node and self.config.node_init == "bottom-up":
            return self._init_bottom_up(x, seed, verbose)
        if self.per_node:
            return self._init_hierarchical(x, seed, verbose)
        codebooks: list[np.ndarray] = []
        assign: list[np.ndarray] = []
        resid = x.copy()
        for h, level in enumerate(self.levels):
            # no warning for small corpora (a few documents per leaf is what they get)
            km = faiss.Kmeans(
                d, self.B, niter=self.config.kmeans_iters, seed=seed + h, spherical=(h == 0), verbose=verbose,
                min_points_per_centroid=1,
            )
            km.train(resid)
            C = km.centroids.astype(np.float32)
            _, a = km.index.search(resid, 1)
            a = a[:, 0]
            W = torch.zeros(d + h * self.B, self.B)
            W[h * self.B :, :] = torch.from_numpy(C.T) / T
            if h > 0:
                half_sq = 0.5 * (C**2).sum(1)
                # block j (0 = most recent choice) holds the prefix level (h-1-j)'s codebook
                for j in range(h):
                    prev = codebooks[h - 1 - j]
                    off = -(prev @ C.T)  # (B_prev, B)
                    if j == 0:
                        off = off - half_sq[None, :]
                    W[j * self.B : (j + 1) * self.B, :] = torch.from_numpy(off) / T
            level.W.copy_(W.to(level.W.device))
            # residuals are taken from the clusters' means, not from the unit-norm spherical
            # centroids: otherwise every residual keeps a -c component and the next level
            # merely re-learns the level above (seen as most leaves left empty)
            counts = np.bincount(a, minlength=self.B)
            means = np.zeros_like(C)
            np.add.at(means, a, resid)
            means = np.where(counts[:, None] > 0, means / np.maximum(counts, 1)[:, None], C)
            codebooks.append(means.astype(np.float32))
            assign.append(a)
            resid = resid - means[a]

    def _init_bottom_up(self, x: np.ndarray, seed: int, verbose: bool) -> None:
        """Per-node tree at step 0 whose leaves are flat spherical k-means over all documents
        (B^H centroids), grouped level by level into balanced cells of B by k-means over the
        centroids: ranked by their own score with every cell expanded, its leaves route like
        the flat tree's."""
        B, H, T, d = self.B, self.H, self.config.temperature, x.shape[1]
        if x.shape[0] < self.num_leaves:
            return self._init_hierarchical(x, seed, verbose)  # too few documents for B^H means
        cents = spherical_kmeans(x, self.num_leaves, self.config.kmeans_iters, seed, verbose)
        # groups[h][j] = the B node indices (at level h + 1) under node j of level h
        groups, level_cents = [], [cents]
        for h in range(H - 1, 0, -1):
            c = level_cents[0]
            g = balanced_groups(c, B**h, B, seed + h)
            members = np.stack([np.flatnonzero(g == j) for j in range(B**h)])
            parent = np.stack([c[m].mean(0) for m in members])
            parent /= np.maximum(np.linalg.norm(parent, axis=1, keepdims=True), 1e-12)
            groups.insert(0, members)
            level_cents.insert(0, parent)
        # number the nodes top-down: node j of level h + 1 is (parent index) * B + (slot)
        order = [np.arange(B)]  # level-0 children in their original order
        for h in range(1, H):
            order.append(np.concatenate([groups[h - 1][j] for j in order[h - 1]]))
        for h, level in enumerate(self.levels):
            kids = level_cents[h][order[h]].reshape(B**h, B, d)  # children of each node, in slot order
            W = np.transpose(kids, (0, 2, 1)) / T
            level.W.copy_(torch.from_numpy(np.ascontiguousarray(W if h else W[0], dtype=np.float32)).to(level.W.device))

    def _init_hierarchical(self, x: np.ndarray, seed: int, verbose: bool) -> None:
        """Per-node tree at step 0 = hierarchical spherical k-means: every node's classifier
        holds the k-means centroids of the documents routed into it (divided by the
        temperature), so each level's arg-max is the nearest centroid among that cell's."""
        B, T, n, d = self.B, self.config.temperature, x.shape[0], x.shape[1]
        rng = np.random.default_rng(seed)
        node = np.zeros(n, dtype=np.int64)
        for h, level in enumerate(self.levels):
            nodes = B**h
            W = np.zeros((nodes, d, B), dtype=np.float32)
            child = np.zeros(n, dtype=np.int64)
            order = np.argsort(node, kind="stable")
            bounds = np.searchsorted(node[order], np.arange(nodes + 1))
            for j in range(nodes):
                rows = order[bounds[j] : bounds[j + 1]]
                X = x[rows]
                if len(X) >= B:
                    C = spherical_kmeans(X, B, self.config.kmeans_iters, seed + h * 7919 + j, verbose)
                else:  # fewer documents than children: each gets one; the rest point nowhere useful
                    C = rng.standard_normal((B, d)).astype(np.float32)
                    C[: len(X)] = X
                    C /= np.linalg.norm(C, axis=1, keepdims=True)
                W[j] = C.T / T
                if len(X):
                    child[rows] = (X @ C.T).argmax(1)
            w = torch.from_numpy(W if h else W[0])
            level.W.copy_(w.to(level.W.device))
            node = node * B + child

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        for level in self.levels:
            in_dim = level.W.shape[-2]
            level.W.copy_(torch.randn(level.W.shape, generator=g) / in_dim**0.5)


class NumpyRouter:
    """``Tree.beam_search`` in numpy, for search: the same level computation (a one-hot
    selects rows of U; the embedding's part is shared by a row's prefixes), one batched
    product per level, the top ``beam`` nodes kept per level."""

    def __init__(self, tree: Tree):
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
        if self.rank_by_leaf and self.H == 2:
            return self._two_level_leaves(np.ascontiguousarray(e, dtype=np.float32), beam, upper)
        return self.beam_search(e, beam, upper=upper)[0]

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

        from .index import PARALLEL_OVER_QUERIES

        B, L = self.B, self.num_leaves
        root = self._root_index()
        if getattr(self, "_cells", None) is None:
            # the root is the IVF's quantizer too, though search hands it the cells already chosen
            cells = faiss.IndexIVFFlat(root, self.dim, B, faiss.METRIC_INNER_PRODUCT)
            x = np.ascontiguousarray(np.transpose(self.W[1], (0, 2, 1)).reshape(L, self.dim))  # leaf j*B+k
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


def spherical_kmeans(x: np.ndarray, k: int, iters: int, seed: int, verbose: bool = False) -> np.ndarray:
    """Unit-length k-means centroids (every initialisation and benchmark uses this one)."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=verbose, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    c = km.centroids
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def balanced_groups(points: np.ndarray, groups: int, size: int, seed: int) -> np.ndarray:
    """A cell for each point, exactly ``size`` per cell: spherical k-means, then the most
    similar (point, cell) pairs first while the cell has room."""
    sim = points @ spherical_kmeans(points, groups, 25, seed).T
    cell = np.full(len(points), -1, dtype=np.int64)
    room = np.full(groups, size, dtype=np.int64)
    for f in np.argsort(-sim, axis=None, kind="stable"):
        i, g = divmod(int(f), groups)
        if cell[i] < 0 and room[g] > 0:
            cell[i], room[g] = g, room[g] - 1
    return cell


def load_balance_penalty(level_probs: list[torch.Tensor]) -> torch.Tensor:
    """B * sum_j mean_batch(p_j)^2 - 1 per level, summed: 0 when the batch spreads evenly."""
    total = level_probs[0].new_zeros(())
    for p in level_probs:
        m = p.mean(0)
        total = total + p.shape[1] * (m * m).sum() - 1.0
    return total
