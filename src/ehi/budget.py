"""The budget rule: how a fraction of the corpus to visit becomes a search width.

One rule everywhere: for a budget f, the width (EHI's beam, IVF's nprobe) is the largest one
whose mean fraction visited is <= f. Search measures that mean once, on training queries
(the model's calibration), and never goes below width 1 so that it always returns hits;
evaluation measures it on the evaluated queries themselves and reports a budget that even
width 1 exceeds as unreachable, so that no method is credited with a search it cannot make.
Without a width or a budget, search visits ``DEFAULT_BUDGET`` of the corpus.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

DEFAULT_BUDGET = 0.1
BUDGET_RULE = "largest beam/nprobe whose mean fraction visited over the evaluated queries is <= the budget"
_EPS = 1e-12


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    return float(budget)


def check_width(width, max_width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"beam must be a positive integer, got {width!r}")
    if width > max_width:
        raise ValueError(f"beam {width} exceeds the tree's {max_width} leaves")
    return width


class WidthSearch:
    """The rule over a width -> mean fraction visited function (non-decreasing), evaluated
    lazily: a binary search, each width measured at most once."""

    def __init__(self, visited_fraction: Callable[[int], float], max_width: int):
        self.fn, self.max_width = visited_fraction, max_width
        self.fractions: dict[int, float] = {}

    def fraction(self, w: int) -> float:
        if w not in self.fractions:
            self.fractions[w] = self.fn(w)
        return self.fractions[w]

    def largest_within(self, budget: float) -> int | None:
        """The width for ``budget``; None when even width 1 exceeds it."""
        if self.fraction(1) > budget + _EPS:
            return None
        lo, hi = 1, self.max_width
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fraction(mid) <= budget + _EPS:
                lo = mid
            else:
                hi = mid - 1
        return lo


def calibrated_width(calibration: Sequence[Sequence[float]], budget: float) -> int:
    """The rule over a saved calibration ([width, mean fraction] pairs, or [width, mean
    fraction, nodes kept above the leaves] for calibrated deep trees); at least 1."""
    budget = check_budget(budget)
    if not calibration:
        raise ValueError("this model has no beam calibration; pass beam= instead of budget=")
    ok = [int(c[0]) for c in calibration if c[1] <= budget + _EPS]
    return max(ok) if ok else 1


def describe_width(calibration, budget: float, width: int) -> str:
    """Why a search of ``budget`` used ``width``, in words that stay true where the floor of
    one leaf applies (a budget smaller than any leaf's calibrated mean)."""
    frac = {int(c[0]): float(c[1]) for c in calibration}.get(width)
    pct = f"{100 * budget:g} %"
    if frac is None:
        return f"budget {pct}: beam {width} (no calibration for it)"
    if frac > budget + _EPS:
        return f"budget {pct} is below one leaf: beam {width}, {100 * frac:.1f} % on training queries"
    return f"budget {pct}: beam {width}, whose calibrated mean on training queries is within it"


def resolve_width(max_width: int, calibration, beam: int | None = None, budget: float | None = None) -> int:
    """The width a search uses, from ``beam`` or ``budget`` (not both) or the default budget.
    ValueError saying why for a width or budget that cannot be searched."""
    if beam is not None and budget is not None:
        raise ValueError("give budget or beam, not both")
    if beam is not None:
        return check_width(beam, max_width)
    if budget is not None:
        return min(calibrated_width(calibration, budget), max_width)
    return min(calibrated_width(calibration, DEFAULT_BUDGET), max_width) if calibration else 1
