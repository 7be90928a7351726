"""The indexed documents' ids and titles, in index row order, and the corpus fingerprint."""

from __future__ import annotations

import hashlib

import numpy as np

from ehi.results import UnknownIds


class Documents:
    """Ids and titles per index row. Every change makes new lists (never edits them), so the
    id -> row map built for filtered searches is kept until the next change."""

    def __init__(self, ids: list[str] | None = None, titles: list[str] | None = None, fingerprint: str = ""):
        self.ids = list(ids or [])
        self.titles = list(titles) if titles else [""] * len(self.ids)
        self.fingerprint = fingerprint
        self._rows: tuple | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def row_map(self) -> dict[str, int]:
        if self._rows is None or self._rows[0] is not self.ids:
            self._rows = (self.ids, {d: i for i, d in enumerate(self.ids)})
        return self._rows[1]

    def rows_of(self, ids) -> np.ndarray:
        """Index rows of document ids; ``UnknownIds`` (a ValueError) for ids not indexed."""
        pos = self.row_map()
        missing = [n for n, i in enumerate(ids) if i not in pos]
        if missing:
            raise UnknownIds(len(missing), missing[0], ids[missing[0]])
        return np.array(sorted({pos[i] for i in ids}), dtype=np.int64)

    def check_new(self, ids) -> None:
        known = self.row_map()
        clash = [i for i in ids if i in known]
        if clash:
            raise ValueError(f"{len(clash)} document ids are already indexed (first: {clash[0]!r})")

    def added(self, ids: list[str], titles: list[str]) -> None:
        self.ids, self.titles = self.ids + list(ids), self.titles + list(titles)
        self.fingerprint = _chained(self.fingerprint, "add", ids)

    def kept(self, keep: np.ndarray, dropped) -> None:
        self.ids = [d for d, k in zip(self.ids, keep) if k]
        self.titles = [t for t, k in zip(self.titles, keep) if k]
        self.fingerprint = _chained(self.fingerprint, "remove", sorted(dropped))


def _chained(previous: str, op: str, ids) -> str:
    """The indexed corpus's fingerprint after an update: the old one chained with the change."""
    h = hashlib.sha256(f"{previous}\x00{op}".encode())
    for i in ids:
        h.update(b"\x00" + str(i).encode())
    return h.hexdigest()
