"""What a search returns: ``Hit`` and ``Hits``, shared by the API, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class UnknownIds(ValueError):
    """Document ids that are not indexed: how many, and the first one's position and id (the
    server says the position only: it never echoes a request's input)."""

    def __init__(self, count: int, position: int, first: str):
        shown = first if len(first) <= 60 else first[:57] + "..."
        super().__init__(f"{count} ids are not indexed (first: {shown!r})")
        self.count, self.position, self.first = count, position, first


@dataclass
class Hit:
    """One document found: its id, its score (cosine with the query) and its title."""

    doc_id: str
    score: float
    title: str = ""


@dataclass
class Hits:
    """One query's result: what the API returns, the CLI prints and the server sends.

    Examples
    --------
    >>> hits = model.search("what causes inflation?", k=3)[0]      # doctest: +SKIP
    >>> [(h.doc_id, round(h.score, 2)) for h in hits.hits], hits.fraction_visited  # doctest: +SKIP
    ([('d17', 0.71), ('d3', 0.66), ('d40', 0.61)], 0.021)
    """

    hits: list[Hit]
    visited: int  # documents scored
    fraction_visited: float
    leaves: list[int]
    query: str | None = None
    # how the documents were found: "beam" (the leaves the beam visits), "filtered" (the
    # allowed documents in those leaves, widened until k are found), "exact" (every allowed
    # document scored: a filter no larger than the budget's document count)
    strategy: str = "beam"

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "hits": [{"id": h.doc_id, "title": h.title, "score": h.score} for h in self.hits],
            "leaves": self.leaves,
            "visited": self.visited,
            "fraction_visited": self.fraction_visited,
            "strategy": self.strategy,
        }


def to_hits(res, leaves: np.ndarray, ids: list[str], titles: list[str], num_docs: int, queries=None, k: int | None = None, offset: int = 0) -> list[Hits]:
    """Rows ``offset ..`` of an index's ``SearchResult`` as ``Hits``, one per query (top ``k``)."""
    n = len(queries) if queries is not None else len(res.indices) - offset
    out = []
    for i in range(offset, offset + n):
        hits = [Hit(ids[j], float(s), titles[j]) for j, s in zip(res.indices[i, :k], res.scores[i, :k]) if j >= 0]
        q = None if queries is None else queries[i - offset]
        out.append(Hits(hits, int(res.visited[i]), float(res.visited[i] / num_docs), np.asarray(leaves[i]).tolist(), q, res.strategy))
    return out
