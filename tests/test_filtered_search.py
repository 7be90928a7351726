"""A filtered search returns the best allowed documents, wherever the tree put them."""

import numpy as np
import pytest
import torch

from ehi.config import EHIConfig
from ehi.model.ehi_model import EHIModel
from ehi.model.tree import Tree


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(params=[1, 2], ids=["d2l=1", "d2l=2"])
def model(request):
    """An untrained tree of 32 leaves over 2,000 random documents (no encoder needed)."""
    torch.manual_seed(0)
    cfg = EHIConfig()
    cfg.tree.branching, cfg.index.d2l = 32, request.param
    rng = np.random.default_rng(0)
    emb = _unit(rng.normal(size=(2000, 24)))
    m = EHIModel(cfg, None, Tree(24, cfg.tree).eval())
    m.build_index(emb, [f"d{i}" for i in range(len(emb))])
    m.calibrate(_unit(rng.normal(size=(300, 24))))
    return m, emb


def _exact(emb, q, rows, k):
    s = q @ emb[rows].T
    return rows[np.argsort(-s, axis=1, kind="stable")[:, :k]]


def test_small_allowed_set_equals_exact_search_over_it_even_outside_the_visited_leaves(model):
    m, emb = model
    rng = np.random.default_rng(1)
    q = _unit(rng.normal(size=(20, 24)))
    beam = m.beam_for_budget(0.1)
    allowed = np.sort(rng.choice(len(emb), 60, replace=False))  # below the ~200 documents the budget scores
    visited_leaves = m.route(q, beam)
    outside = ~np.isin(m.index.doc_leaves[allowed], visited_leaves[0]).any(1)
    assert outside.any()  # the case that failed: allowed documents in leaves the beam never visits
    res, leaves = m.search_embeddings(q, 10, beam, allowed)
    assert res.strategy == "exact"
    np.testing.assert_array_equal(res.indices, _exact(emb, q, allowed, 10))
    np.testing.assert_allclose(res.scores, np.sort(q @ emb[allowed].T, axis=1)[:, ::-1][:, :10], atol=1e-5)
    assert (res.visited == len(allowed)).all()  # what it scored, truthfully


def test_two_allowed_documents_both_come_back_through_the_api(model):
    m, emb = model
    m.encoder = type("E", (), {"encode": staticmethod(lambda texts: emb[:1])})()  # the query is document 0
    far = int(np.argmin(emb @ emb[0]))  # the least similar document: not in document 0's leaf
    assert m.index.doc_leaves[far][0] not in m.route(emb[:1], 1)[0]
    got = m.search("anything", k=5, beam=1, ids=["d0", f"d{far}"])[0]
    assert [h.doc_id for h in got.hits] == ["d0", f"d{far}"] and got.strategy == "exact"
    assert got.visited == 2 and got.fraction_visited == pytest.approx(2 / len(emb))


def test_large_allowed_set_is_filtered_in_the_leaves_and_widens_until_k_are_found(model):
    m, emb = model
    rng = np.random.default_rng(2)
    q = _unit(rng.normal(size=(30, 24)))
    beam = m.beam_for_budget(0.05)
    allowed = np.sort(rng.choice(len(emb), 150, replace=False))  # 7.5 %: more than the budget scores
    res, leaves = m.search_embeddings(q, 10, beam, allowed)
    assert res.strategy == "filtered"
    assert (res.indices >= 0).all() and np.isin(res.indices, allowed).all()  # k allowed hits each
    assert any(len(lv) > beam for lv in leaves)  # some query had to widen past the budget's beam
    for i in range(len(q)):  # the best allowed documents among the leaves it visited, and their count
        inside = allowed[np.isin(m.index.doc_leaves[allowed], leaves[i]).any(1)]
        np.testing.assert_array_equal(res.indices[i], _exact(emb, q[i : i + 1], inside, 10)[0])
        assert res.visited[i] == len(inside)
    plain, _ = m.search_embeddings(q, 10, beam)
    assert plain.strategy == "beam" and (res.visited < plain.visited * 2).all()
