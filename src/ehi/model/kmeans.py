"""Spherical k-means (Faiss), the start of every tree and of the k-means baselines."""

from __future__ import annotations

import numpy as np


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
