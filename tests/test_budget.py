import math

import pytest

from ehi.budget import DEFAULT_BUDGET, WidthSearch, calibrated_width, resolve_width

CAL = [[1, 0.012], [2, 0.025], [4, 0.05], [8, 0.11], [16, 0.22]]


def test_budget_maps_to_the_largest_width_within_it():
    assert calibrated_width(CAL, 0.05) == 4
    assert calibrated_width(CAL, 0.2) == 8
    assert calibrated_width(CAL, 0.001) == 1  # search always visits something
    assert resolve_width(16, CAL) == calibrated_width(CAL, DEFAULT_BUDGET) == 4
    assert resolve_width(16, [], None, None) == 1  # no calibration: the narrowest search


@pytest.mark.parametrize(
    "beam,budget,match",
    [(3, 0.1, "not both"), (17, None, "exceeds the tree's 16 leaves"), (0, None, "positive integer"),
     (None, 0.0, r"\(0, 1\]"), (None, math.nan, r"\(0, 1\]"), (None, 1.5, r"\(0, 1\]"), (2.5, None, "positive integer")],
)
def test_widths_that_cannot_be_searched_are_refused(beam, budget, match):
    with pytest.raises(ValueError, match=match):
        resolve_width(16, CAL, beam, budget)


def test_evaluation_rule_reports_unreachable_budgets_and_measures_each_width_once():
    calls = []

    def fraction(w):
        calls.append(w)
        return 0.012 * w

    ws = WidthSearch(fraction, 64)
    assert ws.largest_within(0.01) is None  # even width 1 visits more: unreachable
    assert ws.largest_within(0.1) == 8
    assert ws.largest_within(0.1) == 8
    assert len(calls) == len(set(calls))


def test_a_calibrated_beam_per_level_is_saved_and_searched_with(tiny_beir, tmp_path):
    """Opt-in (upper_agreement): each calibrated width carries the cells expanded for it; a
    budget search after save -> load visits the leaves that width and those cells give."""
    import numpy as np
    from conftest import tiny_config

    from ehi.data import load_beir
    from ehi.model.ehi_model import EHIModel
    from ehi.training.trainer import train

    cfg = tiny_config(branching=4, epochs=1)
    cfg.tree.height, cfg.tree.upper_agreement = 2, 0.95
    cfg.index.router = "tree"  # the cells per width are the tree router's
    model = train(load_beir(tiny_beir), cfg, tmp_path / "m", progress=False)
    cal = model.beam_calibration
    assert all(len(c) == 3 and -(-c[0] // 4) <= c[2] <= 4 for c in cal)
    loaded = EHIModel.load(tmp_path / "m")
    assert loaded.beam_calibration == cal
    w = loaded.resolve_beam(budget=0.3)
    u = next(c[2] for c in cal if c[0] == w)
    q = loaded.encoder.encode(["telescope galaxy astronomy", "oven flour cooking"])
    assert np.array_equal(loaded.route(q, w), loaded.router.snapshot().leaves(q, w, u))
    assert calibrated_width(cal, 0.3) == w  # three-entry calibrations follow the same rule
