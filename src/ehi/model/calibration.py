"""Budget -> beam: the mean fraction of the corpus a search visits at each beam width,
measured once per index and router, so that a budget maps to a beam at search time (the rule
itself is ``ehi.budget``)."""

from __future__ import annotations

import bisect
from functools import cached_property
from pathlib import Path

import numpy as np

from ehi.artifacts import ArtifactError
from ehi.budget import calibrated_width, resolve_width


class Calibration:
    """Rows ``[beam, mean fraction visited]`` (with a third entry, the nodes kept above the
    leaves, for per-node leaf-ranked two-level trees), beams increasing. Never edited: a new
    measurement is a new ``Calibration``."""

    def __init__(self, rows: list | None = None):
        self.rows = rows or []

    @cached_property
    def _uppers(self) -> list[tuple[int, int]]:
        return [(int(c[0]), int(c[2])) for c in self.rows if len(c) > 2]

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array([x[0] for x in self.rows], dtype=float), np.array([x[1] for x in self.rows], dtype=float)

    def upper_beam(self, beam: int, default: int) -> int:
        """The calibrated nodes above the leaves for the smallest calibrated width >= ``beam``."""
        if not self._uppers:
            return default
        i = bisect.bisect_left(self._uppers, (beam,))
        return self._uppers[min(i, len(self._uppers) - 1)][1]

    def width(self, budget: float) -> int:
        return calibrated_width(self.rows, budget)

    def resolve(self, num_leaves: int, beam: int | None, budget: float | None) -> int:
        return resolve_width(num_leaves, self.rows, beam, budget)

    def fraction(self, beam: int, num_leaves: int) -> float:
        """Mean fraction visited at ``beam`` (interpolated between calibrated widths)."""
        if len(self._arrays[0]):
            return float(np.interp(beam, *self._arrays))
        return min(1.0, beam / num_leaves)

    @classmethod
    def checked(cls, rows, num_leaves: int, where: Path) -> "Calibration":
        """A saved calibration as search trusts it: ArtifactError naming ``where`` otherwise."""

        def bad(why: str):
            return ArtifactError(f"{where}: beam_calibration {why}")

        if not isinstance(rows, list):
            raise bad("must be a list of [beam, fraction] rows")
        prev_beam = 0
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) not in (2, 3) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in row):
                raise bad(f"row {i} is not [beam, fraction] or [beam, fraction, upper beam]")
            beam, frac = row[0], row[1]
            if beam != int(beam) or not prev_beam < beam <= num_leaves:
                raise bad(f"row {i}: beam {beam} is not an increasing whole number within the {num_leaves} leaves")
            if not (np.isfinite(frac) and 0 <= frac <= 1 + 1e-9):
                raise bad(f"row {i}: fraction {frac} is not in [0, 1]")
            if len(row) == 3 and (row[2] != int(row[2]) or row[2] < 1):
                raise bad(f"row {i}: upper beam {row[2]} is not a positive whole number")
            prev_beam = beam
        return cls(rows)


def width_grid(num_leaves: int) -> list[int]:
    """The widths measured: every one up to 64, then geometric up to every leaf."""
    L = num_leaves
    grid = sorted(set(list(range(1, min(L, 64) + 1)) + np.unique(np.geomspace(64, L, 32).astype(int)).tolist()))
    return [b for b in grid if b <= L]


def fraction_visited(index, leaves: np.ndarray) -> float:
    return float(index.visited_counts(leaves).mean() / index.num_docs)


def measure(router, index, query_emb: np.ndarray) -> Calibration:
    """The router's calibration over ``index`` with these queries (routed under the
    calibration in force while measuring)."""
    grid = width_grid(router.tree.num_leaves)
    tc = router.config.tree
    snap = router.snapshot()
    if router.config.index.router == "tree" and tc.height == 2 and snap.rank_by_leaf and tc.upper_beam == 0 and tc.upper_agreement > 0:
        # a beam per level: the cells expanded for each width, from the same queries
        rows = np.random.default_rng(0).permutation(len(query_emb))[:2000]  # bounds its (Q, L) masks
        uppers = snap.calibrate_upper(query_emb[np.sort(rows)], grid, tc.upper_agreement)
        return Calibration([[b, fraction_visited(index, snap.leaves(query_emb, b, uppers[b])), uppers[b]] for b in grid])
    return Calibration([[b, fraction_visited(index, router.route(query_emb, b, index))] for b in grid])
