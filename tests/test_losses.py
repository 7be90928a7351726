import math

import pytest
import torch

from ehi.training.losses import ehi_losses, triplet_hinge


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_triplet_hinge_hand_computed():
    a = torch.stack([unit(1, 0)])
    p = torch.stack([unit(1, 1)])  # cos = 0.7071
    n = torch.stack([unit(0, 1), unit(1, 0)])  # cos 0 and 1
    mask = torch.tensor([[True, True]])
    # max(0, 0.3 - 0.7071 + 0) = 0 ; max(0, 0.3 - 0.7071 + 1) = 0.5929
    expected = (0 + (0.3 - math.sqrt(0.5) + 1.0)) / 2
    assert float(triplet_hinge(a, p, n, mask, 0.3)) == pytest.approx(expected, abs=1e-5)
    # masking the second negative leaves only the satisfied triplet
    assert float(triplet_hinge(a, p, n, torch.tensor([[True, False]]), 0.3)) == pytest.approx(0.0)
    # no valid pair: zero, not NaN
    assert float(triplet_hinge(a, p, n, torch.tensor([[False, False]]), 0.3)) == 0.0


def test_triplet_hinge_is_scale_invariant():
    a, p, n = torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert float(triplet_hinge(a, p, n, mask, 0.3)) == pytest.approx(float(triplet_hinge(2 * a, 3 * p, 0.5 * n, mask, 0.3)), abs=1e-6)


def test_ehi_losses_terms():
    e_q = torch.stack([unit(1, 0, 0)])
    e_p = torch.stack([unit(1, 0, 0)])
    e_n = torch.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0.99, 0.01, 0)])  # own positive, far doc, near-duplicate
    t_q = torch.stack([unit(1, 0)])
    t_p = torch.stack([unit(1, 0)])
    t_n = torch.stack([unit(1, 0), unit(1, 0), unit(1, 0)])  # every negative shares the leaf
    neg_mask = torch.tensor([[False, True, True]])  # the own positive is not a negative
    same_doc = torch.tensor([[True, False, False]])
    out = ehi_losses(e_q, e_p, e_n, t_q, t_p, t_n, neg_mask, same_doc, margin=0.3, tau=0.9)
    # siamese: far doc max(0, .3 - 1 + 0) = 0; near duplicate cos ~ .99995 -> .29995
    cos_dup = float(unit(0.99, 0.01, 0)[0])
    assert float(out["siamese"]) == pytest.approx((0 + 0.3 - 1 + cos_dup) / 2, abs=1e-5)
    # indexing: both negatives share q's path -> 0.3 each
    assert float(out["indexing"]) == pytest.approx(0.3, abs=1e-6)
    # intra-leaf: only the far document (cos < tau) counts; anchor p, positive q, negative n
    assert float(out["intra_leaf"]) == pytest.approx(0.3, abs=1e-6)
    t_n2 = torch.stack([unit(1, 0), unit(0, 1), unit(1, 0)])  # the far doc moved to another leaf
    out2 = ehi_losses(e_q, e_p, e_n, t_q, t_p, t_n2, neg_mask, same_doc, margin=0.3, tau=0.9)
    assert float(out2["intra_leaf"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out2["indexing"]) == pytest.approx(0.15, abs=1e-6)
