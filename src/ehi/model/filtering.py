"""Filtered search: the best k *of the allowed documents*, wherever the tree put them.

A filter (a tenant, a date range, a permission) restricts which documents may come back; a
beam that only scans its own leaves misses allowed documents elsewhere. So, as vector
databases do, the strategy follows the filter's size: an allowed set no larger than the
documents the budget scores on average is scored whole and exactly (``exact``: a gather of
its vectors, no routing); a larger one is filtered inside the visited leaves, and a query
that finds fewer than k there keeps adding leaves in beam order until it has k or has
scored as many allowed documents as the budget (``filtered``).
"""

from __future__ import annotations

import numpy as np

from ehi.index.leaf_index import SearchResult


def search_allowed(model, q_emb: np.ndarray, k: int, beam: int, allowed: np.ndarray):
    """(SearchResult, leaves visited per query) of a filtered search at ``beam`` leaves."""
    allowed = np.asarray(allowed, dtype=np.int64)
    if len(allowed) > 1 and not (allowed[1:] > allowed[:-1]).all():  # rows_of gives them sorted already
        allowed = np.unique(allowed)
    if len(allowed) == 0:
        raise ValueError("the filter allows no document")
    cap = model.budget_documents(beam)
    if len(allowed) <= cap:
        return exact_over(model.index, q_emb, allowed, k), [np.empty(0, dtype=np.int64)] * len(q_emb)
    return _widening(model, q_emb, k, beam, allowed, cap)


def exact_over(index, queries: np.ndarray, rows: np.ndarray, k: int) -> SearchResult:
    """The exact top ``k`` of the documents ``rows`` (sorted, unique) by cosine."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    S = q @ index.rows_vectors(rows).T  # (Q, n) cosine: vectors and queries are unit length
    kk = min(k, len(rows))
    top = np.argpartition(-S, kk - 1, axis=1)[:, :kk] if kk < len(rows) else np.tile(np.arange(len(rows)), (len(q), 1))
    ts = np.take_along_axis(S, top, 1)
    order = np.argsort(-ts, axis=1, kind="stable")
    D = np.full((len(q), k), -np.inf, dtype=np.float32)
    I = np.full((len(q), k), -1, dtype=np.int64)
    D[:, :kk] = np.take_along_axis(ts, order, 1)
    I[:, :kk] = rows[np.take_along_axis(top, order, 1)]
    return SearchResult(I, D, np.full(len(q), len(rows), dtype=np.int64), "exact")


def _widening(model, q_emb, k: int, beam: int, allowed: np.ndarray, cap: float):
    """Route once wide enough to hold about 2k allowed documents, keep per query the shortest
    prefix (at least ``beam`` leaves) whose allowed documents reach k or the budget, scan
    those with the filter; queries still short route wider again (rare)."""
    L = model.tree.num_leaves
    per_leaf = model.index.leaf_counts(allowed, pad=True)  # leaf -1 (no leaf) reads a 0
    width = min(L, max(beam, int(np.ceil(2 * k * L / len(allowed)))))
    res, leaves, short = _pass(model, q_emb, k, beam, allowed, cap, per_leaf, width)
    todo = np.flatnonzero(short)
    while len(todo) and width < L:
        width = min(L, 2 * width)
        r, lv, short = _pass(model, q_emb[todo], k, beam, allowed, cap, per_leaf, width)
        res.indices[todo], res.scores[todo], res.visited[todo] = r.indices, r.scores, r.visited
        for j, i in enumerate(todo):
            leaves[i] = lv[j]
        todo = todo[short]
    return res, leaves


def _pass(model, q_emb, k, beam, allowed, cap, per_leaf, width):
    lv = np.array(model.route(q_emb, width), dtype=np.int64, order="C")
    cum = np.cumsum(per_leaf[lv], axis=1)
    enough = cum >= min(k, cap)
    enough[:, : beam - 1] = False
    used = np.where(enough.any(1), enough.argmax(1) + 1, lv.shape[1])
    lv[np.arange(lv.shape[1]) >= used[:, None]] = -1  # Faiss skips leaf -1
    # one leaf per document: the prefix sums are the allowed documents scored
    counted = cum[np.arange(len(lv)), used - 1] if model.index.d2l == 1 else None
    r = model.index.search(q_emb, lv, k, allowed, counted)
    short = (r.indices[:, -1] < 0) & (r.visited < cap)
    return r, [row[:u] for row, u in zip(lv, used)], short
