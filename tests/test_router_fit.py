"""The router fitted to search (ehi.training.router_fit): what each example weighs, the logit adjustment,
and the Trainer's choice between the fitted and the unfitted router on held-out queries."""

import numpy as np
import torch
from conftest import tiny_config

from ehi.config import TreeConfig
from ehi.data import load_beir
from ehi.model.tree import Tree
from ehi.training.router_fit import child_log_prior, fit_router, routing_examples, shrunk
from ehi.training.trainer import Trainer


def test_a_query_weighs_one_and_a_documents_spans_weigh_span_weight():
    positives = np.array([[0, 1], [2, -1]])  # query 0 has two positives, query 1 one
    doc_paths = np.array([[0], [1], [2], [3]])
    span_rows = np.array([0, 0, 3])  # document 0 has two spans, document 3 one
    ex = routing_examples(np.eye(2, 4, dtype=np.float32), positives, doc_paths, np.ones((3, 4), np.float32), span_rows, 4.0)
    assert ex.path[:, 0].tolist() == [0, 1, 2, 0, 0, 3]
    assert np.allclose(ex.weight, [0.5, 0.5, 1.0, 2.0, 2.0, 4.0])
    assert len(ex.emb) == 6


def test_child_prior_is_per_node_and_never_minus_infinity():
    path = np.array([[0, 1], [0, 1], [1, 0]])
    prior = child_log_prior(path, np.ones(3), 2)
    top, below = prior[0].exp().numpy(), prior[1].exp().numpy()
    assert top.shape == (1, 2) and below.shape == (2, 2)
    assert np.allclose(top.sum(1), 1) and np.allclose(below.sum(1), 1)
    assert top[0, 0] > 0.6 and below[0, 1] > 0.99 and below[1, 0] > 0.99
    assert np.isfinite(prior[1].numpy()).all()  # child (0, 0) had no example


def argmax_paths(tree, x):
    with torch.no_grad():
        return tree.route(torch.from_numpy(x)).path.numpy()


def _clusters(seed=0, n_clusters=8, per=40, d=16, noise=0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    x = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(n_clusters * per, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_questions_on_half_the_corpus_do_not_starve_the_other_half():
    """Training questions only ever point at documents of half the leaves. Fitted on them
    alone the router pulls new questions on the other half away from their leaves; with
    every document's spans and the logit adjustment their leaves stay nearly as reachable as
    under the k-means start."""
    docs = _clusters()
    rng = np.random.default_rng(1)
    start = Tree(16, TreeConfig(branching=8, height=1))
    start.init_kmeans(docs, seed=0)
    doc_paths = argmax_paths(start, docs)
    seen = np.flatnonzero(doc_paths[:, 0] < 4)
    unseen = np.flatnonzero(doc_paths[:, 0] >= 4)

    def questions(rows, n):
        pick = rng.choice(rows, n)
        q = docs[pick] + 0.35 * rng.normal(size=(n, 16)).astype(np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True), pick

    q_train, pos_train = questions(seen, 1500)
    q_new, pos_new = questions(unseen, 400)
    span_emb, span_rows = questions(np.arange(len(docs)), 2 * len(docs))

    def first_leaf_share(tree):
        return float((argmax_paths(tree, q_new)[:, 0] == doc_paths[pos_new, 0]).mean())

    def fitted(with_spans, adjust):
        tree = Tree(16, TreeConfig(branching=8, height=1))
        tree.load_state_dict(start.state_dict())
        s_emb, s_rows = (span_emb, span_rows) if with_spans else (span_emb[:0], span_rows[:0])
        ex = routing_examples(q_train, pos_train[:, None], doc_paths, s_emb, s_rows, 4.0)
        fit_router(tree, ex, epochs=5, lr=1e-2, weight_decay=0.01, seed=0, adjust=adjust)
        return tree

    base = first_leaf_share(start)
    questions_only = first_leaf_share(fitted(False, False))
    both = first_leaf_share(fitted(True, True))
    assert questions_only < base - 0.2  # the starvation this guards against (0.31 vs 0.62)
    assert both > base - 0.06 and both > questions_only + 0.2  # 0.58


def test_shrink_zero_is_the_start_and_one_the_fit():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.ones(3)}
    assert torch.equal(shrunk(a, b, 0.0)["w"], a["w"]) and torch.equal(shrunk(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(shrunk(a, b, 0.5)["w"], torch.full((3,), 0.5))


def test_the_trainer_keeps_the_unfitted_router_when_the_fit_routes_held_out_queries_worse(tiny_beir, monkeypatch):
    import ehi.training.selection as selection

    def scramble(tree, *args, **kwargs):
        with torch.no_grad():
            for level in tree.levels:
                level.W.copy_(torch.randn_like(level.W) * 5)

    monkeypatch.setattr(selection, "fit_router", scramble)
    ds = load_beir(tiny_beir)
    trainer = Trainer(tiny_config(epochs=2), ds)
    model = trainer.fit(progress=False, build_index=False)
    rf = model.validation["route_fit"]
    assert set(rf["scores"]) == {"0", "0.5", "1"} and rf["kept"] == 0.0
    assert rf["scores"]["0"] > max(rf["scores"]["0.5"], rf["scores"]["1"])
    # the shipped tree is the selected one, not a scrambled one
    selected = trainer.state.best.state["tree.levels.0.W"] if not trainer.state.stage == "refit" else None
    if selected is not None:
        assert torch.equal(model.tree.levels[0].W.detach(), selected)


def test_the_trainer_applies_the_kept_fit_on_every_training_query(tiny_beir, monkeypatch):
    from ehi.training.validation import Validator

    calls = []
    real = Validator.__call__

    def prefer_fitted(self, model, d_emb):  # a validator that always scores the newest state higher
        out = real(self, model, d_emb)
        out["score"] = float(len(calls))
        calls.append(1)
        return out

    monkeypatch.setattr(Validator, "__call__", prefer_fitted)
    ds = load_beir(tiny_beir)
    trainer = Trainer(tiny_config(epochs=1, val_recluster=False), ds)
    seen = []
    real_fit = Trainer._fit_router

    def spy(self, train_set, q_feats, d_emb):
        seen.append(len(train_set.query_ids))
        return real_fit(self, train_set, q_feats, d_emb)

    monkeypatch.setattr(Trainer, "_fit_router", spy)
    model = trainer.fit(progress=False, build_index=False)
    assert model.validation["route_fit"]["kept"] == 1.0
    # chosen on the training part, applied on every training query (held-out ones included)
    assert seen == [len(ds.relevant("train")) - len(trainer.validator.query_ids), len(ds.relevant("train"))]
