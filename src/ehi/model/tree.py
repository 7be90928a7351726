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

from ehi.config import TreeConfig
from ehi.model.kmeans import balanced_groups, spherical_kmeans
from ehi.model.numpy_router import NumpyRouter


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
        # index_select, not W[node]: its gradient sums the rows of a node in a fixed order, where
        # advanced indexing's accumulates them in parallel on the CPU (a resumed run then drifts
        # from an uninterrupted one by 1e-8)
        w = torch.index_select(self.W, 0, node.reshape(-1)).view(*node.shape, *self.W.shape[1:])
        if node.dim() == 1:
            return F.log_softmax(torch.einsum("nd,ndb->nb", z, w), dim=-1)
        return F.log_softmax(torch.einsum("nd,nkdb->nkb", z, w), dim=-1)


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
            raise ValueError("branching 0 (auto) must be resolved for a corpus first: TreeConfig.resolved(N)")
        if not config.height:  # a given branching alone is one level of it (TreeConfig.resolve_height)
            config.height = 1
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
