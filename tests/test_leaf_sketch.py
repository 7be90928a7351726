"""The spread router: what its scores mean, that it is the default search router, that it
is saved, checked and kept current, and that the tree stays where documents are placed."""

import json

import numpy as np
import pytest
from conftest import tiny_config

from ehi.artifacts import ArtifactError, seal_manifest, sha256_file
from ehi.data import load_beir, load_corpus
from ehi.model.ehi_model import EHIModel
from ehi.model.leaf_sketch import MIN_CANDIDATES, LeafSketch
from ehi.model.persistence import SKETCH_FILE
from ehi.training.trainer import train


def test_scores_are_the_mean_plus_lambda_standard_deviations_of_each_leafs_inner_products():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 5)).astype(np.float32)
    leaves = rng.integers(0, 3, size=90)
    sk = LeafSketch.fit(x, leaves, num_leaves=4, rank=5)  # full rank: exact; leaf 3 is empty
    q = rng.normal(size=(7, 5)).astype(np.float32)
    got = sk.scores(q, lam=1.5)
    for c in range(3):
        ip = q @ x[leaves == c].T
        assert np.allclose(got[:, c], ip.mean(1) + 1.5 * ip.std(1), atol=1e-4)
    assert np.isneginf(got[:, 3]).all()
    assert (sk.top(q, 4, 1.5)[:, :3] != 3).all()  # the empty leaf comes last, never before a full one
    # a document in two leaves counts in both
    two = np.stack([leaves, (leaves + 1) % 3], 1)
    sk2 = LeafSketch.fit(x, two, 4, 2)
    assert sk2.counts[:3].tolist() == np.bincount(two.ravel(), minlength=3).tolist()


def test_pruned_scoring_agrees_with_full_scoring_given_every_leaf_as_candidate():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    sk = LeafSketch.fit(x, rng.integers(0, 20, size=400), 20, 3)
    q = rng.normal(size=(50, 8)).astype(np.float32)
    assert (sk.top(q, 5, 2.0, candidates=20) == sk.top(q, 5, 2.0)).all()
    assert sk.top(q, 5, 2.0, candidates=8).shape == (50, 5)


def _clustered(seed=2, n=6000, d=32, leaves=256):
    """Documents in ``leaves`` clusters (each its own leaf) and queries drawn near documents."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(leaves, d))
    lab = rng.integers(0, leaves, size=n)
    x = centres[lab] + rng.normal(size=(n, d)) * rng.uniform(0.3, 1.5, size=(leaves, 1))[lab]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[rng.choice(n, 400, replace=False)] + 0.05 * rng.normal(size=(400, d)).astype(np.float32)
    return x, lab, q.astype(np.float32)


def test_candidates_from_a_shared_basis_return_the_leaves_exact_scoring_returns():
    # what the default search rule promises: the same leaves as scoring every leaf exactly
    # (checked here on clustered data; measured on real corpora in benchmarks/spread_routing.py)
    x, lab, q = _clustered()
    exact = LeafSketch.fit(x, lab, 256, rank=4)
    fast = exact.with_search(basis=16, per_beam=4.0)
    assert fast is not exact and fast.with_search(16, 4.0) is fast
    for beam in (1, 3):  # MIN_CANDIDATES for a narrow beam
        assert fast.candidate_count(beam) == MIN_CANDIDATES
        want, got = exact.top(q, beam, 2.0), fast.top(q, beam, 2.0)
        same = np.mean([set(a) == set(b) for a, b in zip(want, got)])
        assert same >= 0.98, (beam, same)
        # whatever was chosen is ranked by the exact score
        sc = np.take_along_axis(exact.scores(q, 2.0), got, 1)
        assert (np.diff(sc, axis=1) <= 1e-6).all()
    # 4 x beam from 7 on, and every leaf once that is more than an eighth of them
    assert [fast.candidate_count(b) for b in (6, 8, 9)] == [24, 32, 256]
    # the shared basis alone is an approximation; candidates scored exactly are not
    approx = _top_of(fast.scores(q, 2.0, approximate=True), 3)
    assert np.mean([set(a) == set(b) for a, b in zip(approx, exact.top(q, 3, 2.0))]) < 0.9


def _top_of(s, k):
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_a_query_gets_the_same_leaves_alone_as_in_any_batch(monkeypatch):
    # one query reads its candidates' directions, a batch multiplies each candidate leaf's
    # directions by its queries, a sweep scores every leaf: which one ran must not change a
    # query's leaves (the server batches requests)
    x, lab, q = _clustered(seed=3)
    fast = LeafSketch.fit(x, lab, 256, rank=4, basis=16, per_beam=4.0)
    ran = []
    for path in ("_one", "_gathered"):
        real = getattr(fast, path)
        monkeypatch.setattr(fast, path, lambda *a, real=real, path=path: ran.append(path) or real(*a))
    many = np.ascontiguousarray(np.tile(q, (2, 1)))  # 800: remembered inside a sweep
    for beam in (2, 5, 40):  # 40: every leaf scored
        alone = np.concatenate([fast.top(q[i : i + 1], beam, 2.0) for i in range(len(q))])
        assert (alone == fast.top(q, beam, 2.0)).all()
        assert (alone[:5] == fast.top(q[:5], beam, 2.0)).all()
        with fast.sweeping():
            assert (alone == fast.top(many, beam, 2.0)[: len(q)]).all()
    assert {"_one", "_gathered"} <= set(ran)


def test_a_reused_query_buffer_is_routed_afresh_and_a_sweep_routes_once():
    x, lab, q = _clustered(seed=4)
    sk = LeafSketch.fit(x, lab, 256, rank=4, basis=16, per_beam=4.0)
    buf = np.ascontiguousarray(np.tile(q, (2, 1)))  # 800 queries: large enough to be remembered
    first = sk.top(buf, 3, 2.0)
    buf[:] = buf[::-1]  # the caller's buffer now holds other queries
    assert (sk.top(buf, 3, 2.0) == first[::-1]).all()
    want = {beam: sk.top(buf, beam, 2.0) for beam in (1, 2, 5, 3)}
    calls = []
    real = sk._norms
    sk._norms = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    with sk.sweeping():
        for beam in want:
            assert (sk.top(buf, beam, 2.0) == want[beam]).all()
    assert len(calls) == 2  # the cheap and the exact spreads, once for the four widths
    sk.top(buf, 2, 2.0)
    assert len(calls) > 2  # outside a sweep nothing is kept


def test_the_search_rule_comes_from_the_config_and_is_checked(trained_tiny):
    model = EHIModel.load(trained_tiny)
    ic = model.config.index
    sk = model.leaf_sketch()
    assert sk.per_beam == ic.spread_candidates > 0  # the default prunes
    assert sk.basis == (ic.spread_basis if ic.spread_basis < model.index.dim else 0)  # no basis as wide as the space
    model.config.index.spread_candidates = 0.0  # every leaf scored exactly
    assert model.leaf_sketch().candidate_count(1) == model.tree.num_leaves
    for bad in ({"spread_basis": -1}, {"spread_candidates": -2.0}):
        cfg = tiny_config()
        cfg.index.update(**bad)
        with pytest.raises(ValueError, match="spread_basis|spread_candidates"):
            cfg.index.validate()


@pytest.fixture(scope="module")
def model_dir(trained_tiny):
    return trained_tiny


def test_the_default_model_searches_with_the_spread_router_and_places_documents_with_the_tree(model_dir):
    model = EHIModel.load(model_dir)
    assert model.config.index.router == "spread"
    q = model.encoder.encode(["telescope galaxy astronomy", "garlic sauce cooking"])
    sk = model.leaf_sketch()
    assert (model.route(q, 3) == sk.top(q, 3, model.config.index.spread_lambda)).all()
    many = np.repeat(q, 300, axis=0)  # a batch large enough for its full leaf order to be kept
    for beam in (1, 3, 2):
        assert (model.route(many, beam) == sk.top(many, beam, model.config.index.spread_lambda)).all()
    # documents sit in the tree's top leaf, not the sketch's
    emb = model.index.vectors
    assert (model.index.doc_leaves == model.place(emb, 1)).all()


def test_the_sketch_is_saved_checked_and_reloaded(model_dir, tmp_path):
    listed = json.loads((model_dir / "manifest.json").read_text())["files"]
    assert SKETCH_FILE in listed
    model = EHIModel.load(model_dir)
    fresh = LeafSketch.fit(model.index.vectors, model.index.doc_leaves, model.tree.num_leaves, model.config.index.spread_rank)
    assert np.allclose(model.leaf_sketch().spread, fresh.spread, atol=1e-5)
    # a sketch of other leaves (re-sealed, so only the content check can catch it) is refused
    bad = tmp_path / "bad"
    model.save(bad)
    from safetensors.numpy import load_file, save_file

    t = load_file(str(bad / SKETCH_FILE))
    t["counts"] = t["counts"][::-1].copy()
    save_file(t, str(bad / SKETCH_FILE))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"][SKETCH_FILE] = sha256_file(bad / SKETCH_FILE)
    (bad / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    if not np.array_equal(t["counts"], model.index.leaf_sizes()):
        with pytest.raises(ArtifactError, match="other leaves"):
            EHIModel.load(bad)


def test_added_and_removed_documents_update_the_sketch(model_dir, tmp_path):
    model = EHIModel.load(model_dir)
    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"_id": f"n{i}", "text": f"a comet and a nebula seen through the telescope, night {i}"}) + "\n" for i in range(5)))
    model.add_corpus(load_corpus(new))
    assert model.leaf_sketch().counts.tolist() == model.index.leaf_sizes().tolist()
    out = tmp_path / "grown"
    model.save(out)
    back = EHIModel.load(out)
    assert back.leaf_sketch().counts.sum() == len(back.doc_ids)
    back.remove_documents(["n0", "n1"])
    assert back.leaf_sketch().counts.tolist() == back.index.leaf_sizes().tolist()


def test_the_tree_router_on_request_and_for_models_saved_before_the_sketch(model_dir, tmp_path):
    tree = EHIModel.load(model_dir, router="tree")
    q = tree.encoder.encode(["guitar chord melody"])
    assert (tree.route(q, 2) == tree.place(q, 2)).all()
    # the budget -> beam map is the one measured for the router searching
    saved = tree.beam_calibration
    tree.recalibrate()
    assert tree.beam_calibration == saved
    with pytest.raises(ValueError, match="router"):
        EHIModel.load(model_dir, router="nearest")
    # an older model: no router in its config, no sketch: it searches with its tree, as it did
    old = tmp_path / "old"
    tree.save(old)
    raw = json.loads((old / "config.json").read_text())
    del raw["index"]["router"]
    (old / "config.json").write_text(json.dumps(raw))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"]["config.json"] = sha256_file(old / "config.json")
    (old / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    back = EHIModel.load(old)
    assert back.config.index.router == "tree" and back.beam_calibration == tree.beam_calibration
    assert [h.doc_id for h in back.search("guitar chord melody", k=5, beam=2)[0].hits] == \
        [h.doc_id for h in tree.search("guitar chord melody", k=5, beam=2)[0].hits]


def test_the_cli_searches_with_either_router(model_dir, capsys):
    from ehi.cli import main

    for router in ("spread", "tree"):
        assert main(["search", str(model_dir), "telescope", "galaxy", "--router", router, "--beam", "2", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out


def test_questions_about_documents_added_after_training_are_found_as_well_as_by_k_means(tmp_path):
    """Train without a fifth of the documents (and every question about them), add them
    afterwards (placed by the tree, no retraining, the sketch re-fitted): questions about the
    added documents reach them at small budgets at least as often as Faiss-IVF whose k-means
    was fitted on every document, over the same encoder (benchmarks/added_documents.py on
    real corpora)."""
    from conftest import write_beir

    from ehi.data import Corpus, Dataset
    from ehi.evaluation.evaluate import ehi_curve, ivf_curve

    ds = load_beir(write_beir(tmp_path / "b", n_per_topic=30))
    late = set(np.random.default_rng(0).permutation(ds.corpus.ids)[: len(ds.corpus) // 5].tolist())
    keep = [i for i, d in enumerate(ds.corpus.ids) if d not in late]
    add = [i for i, d in enumerate(ds.corpus.ids) if d in late]
    pick = lambda rows: Corpus([ds.corpus.ids[i] for i in rows], [ds.corpus.titles[i] for i in rows], [ds.corpus.texts[i] for i in rows])
    train_qrels = {q: r for q, r in ds.split("train").items() if not any(d in late for d in r)}
    model = train(Dataset(ds.root, pick(keep), ds.queries, {"train": train_qrels}), tiny_config(branching=12, epochs=4), progress=False)
    new = pick(add)
    model.add_documents(new.ids, new.titles, model.encoder.encode(new.documents()))
    assert model.leaf_sketch().counts.sum() == len(ds.corpus)
    judged = {q: r for q, r in {**ds.split("train"), **ds.split("test")}.items() if all(d in late for d in r)}
    qids = sorted(judged)
    q = model.encoder.encode([ds.queries[i] for i in qids])
    budgets = (0.2, 0.3, 0.5)
    ehi = {r.budget: r.metrics["R@10"] for r in ehi_curve("EHI", model, q, qids, judged, budgets)}
    ivf = {r.budget: r.metrics["R@10"] for r in ivf_curve("IVF", q, model.index.vectors, 12, 0, qids, model.doc_ids, judged, budgets)[0]}
    assert set(ehi) == set(ivf) == set(budgets)
    assert all(ehi[b] >= ivf[b] for b in budgets), (ehi, ivf)


def test_a_new_topic_added_after_training_needs_the_leaves_redrawn(tmp_path):
    """Two whole topics added after training: the trained leaves have no room of their own
    for them (the tree scatters them among the others, as a Faiss-IVF trained before them
    would), so at small budgets k-means over every document finds them better; after
    ``repartition`` (``ehi index add --repartition``) EHI finds them as well as it does."""
    from conftest import write_beir

    from ehi.data import Corpus, Dataset
    from ehi.evaluation.evaluate import ehi_curve, ivf_curve

    ds = load_beir(write_beir(tmp_path / "b", n_per_topic=30))
    late = {"music", "sports"}
    keep = [i for i, d in enumerate(ds.corpus.ids) if d.split("-")[0] not in late]
    add = [i for i, d in enumerate(ds.corpus.ids) if d.split("-")[0] in late]
    pick = lambda rows: Corpus([ds.corpus.ids[i] for i in rows], [ds.corpus.titles[i] for i in rows], [ds.corpus.texts[i] for i in rows])
    train_qrels = {q: r for q, r in ds.split("train").items() if not any(d.split("-")[0] in late for d in r)}
    model = train(Dataset(ds.root, pick(keep), ds.queries, {"train": train_qrels}), tiny_config(branching=12, epochs=4), progress=False)
    new = pick(add)
    model.add_documents(new.ids, new.titles, model.encoder.encode(new.documents()))
    judged = {q: r for q, r in {**ds.split("train"), **ds.split("test")}.items() if all(d.split("-")[0] in late for d in r)}
    qids = sorted(judged)
    q = model.encoder.encode([ds.queries[i] for i in qids])
    budgets = (0.2, 0.3)
    ivf = {r.budget: r.metrics["R@10"] for r in ivf_curve("IVF", q, model.index.vectors, 12, 0, qids, model.doc_ids, judged, budgets)[0]}
    before = {r.budget: r.metrics["R@10"] for r in ehi_curve("EHI", model, q, qids, judged, budgets)}
    assert any(before.get(b, 0.0) < ivf[b] for b in budgets)  # the limit this operation exists for
    ids = list(model.doc_ids)
    model.repartition()
    assert model.doc_ids == ids and model.leaf_sketch().counts.sum() == len(ids)
    after = {r.budget: r.metrics["R@10"] for r in ehi_curve("EHI", model, q, qids, judged, budgets)}
    assert all(after[b] >= ivf[b] for b in budgets), (after, ivf)


def test_index_add_can_redraw_the_leaves(model_dir, tmp_path, capsys):
    from ehi.cli import main

    new = tmp_path / "new.jsonl"
    new.write_text("".join(json.dumps({"_id": f"n{i}", "text": f"a violin sonata in the concert hall, movement {i}"}) + "\n" for i in range(8)))
    out = tmp_path / "redrawn"
    assert main(["index", "add", str(model_dir), str(new), "--out", str(out), "--repartition"]) == 0
    assert "re-drawn as k-means over every document" in capsys.readouterr().out
    back = EHIModel.load(out)
    assert len(back.doc_ids) == len(EHIModel.load(model_dir).doc_ids) + 8
    assert (back.index.doc_leaves == back.place(back.index.vectors, 1)).all()
    assert back.leaf_sketch().counts.tolist() == back.index.leaf_sizes().tolist()
