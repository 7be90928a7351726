"""Hard negatives: documents the query reaches in the current tree that are not its positives.

Mining keeps a pool of the most similar such documents per query; each epoch samples from
the pool, and the pool is refreshed every ``r`` epochs as the encoder and tree move.
"""

from __future__ import annotations

import numpy as np
import torch


def positives_matrix(positives: list[list[int]]) -> np.ndarray:
    """Ragged positive lists as a (Q, max) int array padded with -1."""
    width = max((len(p) for p in positives), default=0) or 1
    out = np.full((len(positives), width), -1, dtype=np.int64)
    for i, p in enumerate(positives):
        out[i, : len(p)] = p
    return out


@torch.no_grad()
def mine_pool(
    q_emb: np.ndarray,
    d_emb: np.ndarray,
    positives: np.ndarray,
    pool: int,
    query_leaves: np.ndarray | None = None,
    doc_leaves: np.ndarray | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """(Q, pool) document indices, most similar first, -1 where fewer candidates exist.

    With ``query_leaves`` (Q, beta) and ``doc_leaves`` (N, d2l) candidates are restricted to
    documents stored in the leaves the query reaches; without them, to the whole corpus
    (exact-search mining, as a dual encoder does). Positives are never returned.
    """
    Q = q_emb.shape[0]
    D = torch.from_numpy(np.ascontiguousarray(d_emb, dtype=np.float32))
    pool = min(pool, D.shape[0])
    out = np.full((Q, pool), -1, dtype=np.int64)
    pos = torch.from_numpy(positives)
    if query_leaves is not None:
        dl = torch.from_numpy(np.asarray(doc_leaves, dtype=np.int64).reshape(D.shape[0], -1))
        num_leaves = int(max(dl.max().item(), int(query_leaves.max())) + 1)
    for s in range(0, Q, chunk):
        q = torch.from_numpy(np.ascontiguousarray(q_emb[s : s + chunk], dtype=np.float32))
        scores = q @ D.T
        if query_leaves is not None:
            ql = torch.from_numpy(query_leaves[s : s + chunk])  # (c, beta)
            reached = torch.zeros(ql.shape[0], num_leaves, dtype=torch.bool)
            reached.scatter_(1, ql, True)
            reach = reached[:, dl].any(-1)  # (c, N)
            scores = scores.masked_fill(~reach, float("-inf"))
        p = pos[s : s + chunk]
        valid = p >= 0
        rows = torch.arange(p.shape[0])[:, None].expand_as(p)
        scores[rows[valid], p[valid]] = float("-inf")
        top = scores.topk(pool, dim=1)
        idx = top.indices.numpy().copy()
        idx[~torch.isfinite(top.values).numpy()] = -1
        out[s : s + chunk] = idx
    return out


def sample_negatives(pool_rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k negatives per row drawn uniformly from the row's valid pool entries, -1 if none."""
    n, width = pool_rows.shape
    out = np.full((n, k), -1, dtype=np.int64)
    if k == 0 or width == 0:
        return out
    counts = (pool_rows >= 0).sum(1)
    # valid entries come first (sorted by similarity), so uniform picks below the count suffice
    picks = (rng.random((n, k)) * np.maximum(counts, 1)[:, None]).astype(np.int64)
    chosen = np.take_along_axis(pool_rows, picks, axis=1)
    chosen[counts == 0] = -1
    return chosen


def routing_targets(query_paths: np.ndarray, neighbours: np.ndarray, doc_paths: np.ndarray, branching: int) -> list[np.ndarray]:
    """Per level, the share of each query's neighbours under each child of the query's own
    arg-max prefix: the distribution its routing should put on that level (zero rows where
    no neighbour shares the prefix).

    query_paths (Q, H) and doc_paths (N, H): arg-max child per level in the current tree;
    neighbours (Q, K): document rows, -1 padded."""
    Q, H = query_paths.shape
    valid = neighbours >= 0
    paths = doc_paths[np.where(valid, neighbours, 0)]  # (Q, K, H)
    agree = valid.copy()
    out = []
    for h in range(H):
        t = np.zeros((Q, branching), dtype=np.float32)
        rows = np.repeat(np.arange(Q), neighbours.shape[1])
        np.add.at(t, (rows[agree.ravel()], paths[:, :, h].ravel()[agree.ravel()]), 1.0)
        out.append(t / np.maximum(t.sum(1, keepdims=True), 1.0))
        agree &= paths[:, :, h] == query_paths[:, h : h + 1]
    return out
