"""Validated training: held-out routing is measured from epoch 0, the best state is kept, a
tree worse than its k-means start is never shipped, and the curve reaches the saved model."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.model.ehi_model import EHIModel
from ehi.training.trainer import Trainer, checkpoint_path, train
from ehi.training.validation import holdout


def config(**train):
    return tiny_config(epochs=train.pop("epochs", 4), **train)


def test_holdout_is_disjoint_seeded_and_never_the_training_split(tiny_beir):
    ds = load_beir(tiny_beir)
    tr, val, split = holdout(ds, "train", None, config().train)
    assert split == "train" and len(val) == round(0.2 * 48) and not set(tr) & set(val)
    assert set(tr) | set(val) == set(ds.relevant("train"))
    assert holdout(ds, "train", None, config().train)[1] == val  # same seed, same held-out queries
    assert holdout(ds, "train", None, config(seed=1).train)[1] != val
    tr2, val2, split2 = holdout(ds, "train", None, config(val_split="test").train)
    assert split2 == "test" and val2 == sorted(ds.relevant("test"))
    with pytest.raises(ValueError, match="training split"):
        holdout(ds, "train", None, config(val_split="train").train)
    assert holdout(ds, "train", None, config(val_fraction=0.0).train)[1] == []


def test_a_tree_that_training_makes_worse_is_not_shipped(tiny_beir, monkeypatch):
    """Every epoch scrambles the tree: validation must keep the k-means start, say so, and
    the model must route exactly as the start tree does."""
    ds = load_beir(tiny_beir)

    def scramble(self, *args, **kwargs):
        with torch.no_grad():
            for level in self.tree.levels:
                level.W.copy_(torch.randn_like(level.W) * 5)
        return {"epoch": args[0] + 1, "loss": 0.0}

    monkeypatch.setattr(Trainer, "_epoch", scramble)
    trainer = Trainer(config(), ds)
    start = {k: v.clone() for k, v in trainer.tree.state_dict().items()}
    model = trainer.fit(progress=False)
    report = model.validation
    assert report["kept_epoch"] == 0 and report["kept_tree"] == "learned" and report["refit"] is None
    assert [e["epoch"] for e in report["curve"]] == [0, 1, 2, 3, 4]
    assert "did not improve routing" in report["why"]
    for k, v in model.tree.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_the_best_epoch_is_kept_then_refit_on_all_training_queries(tiny_beir, tmp_path):
    ds = load_beir(tiny_beir)
    model = train(ds, config(epochs=6), out_dir=tmp_path / "m", progress=False)
    report = model.validation
    curve = {e["epoch"]: e for e in report["curve"]}
    assert sorted(curve) == list(range(7))
    # every epoch after the start also scores k-means over that epoch's encoder
    assert all("kmeans" in e for k, e in curve.items() if k > 0)
    scores = [e["score"] for e in curve.values()] + [e["kmeans"]["score"] for e in curve.values() if "kmeans" in e]
    kept = curve[report["kept_epoch"]]
    kept_score = kept["kmeans"]["score"] if report["kept_tree"] != "learned" else kept["score"]
    assert kept_score == max(scores)
    for e in report["curve"]:
        assert set(e["R@100"]) == {"0.01", "0.02", "0.05", "0.1", "0.2"}
        assert all(0 <= v <= 100 for v in e["leaf_recall"].values())
    if report["kept_epoch"] > 0:
        assert report["refit"] == {"epochs": report["kept_epoch"], "queries": 48}
    loaded = EHIModel.load(tmp_path / "m")
    assert loaded.validation == report  # the curve is in the saved model's metadata


def test_resume_in_the_refit_stage_matches_an_uninterrupted_run(tiny_beir, tmp_path, monkeypatch):
    import itertools

    from ehi.training.validation import Validator

    ds = load_beir(tiny_beir)
    cfg = config(epochs=4, val_recluster=False)

    def improving(counter):
        # every validation scores higher than the last: the last epoch is kept, the refit runs 4
        def call(self, model, d_emb):
            s = float(next(counter))
            return {"R@100": {"0.1": s}, "leaf_recall": {"0.1": s}, "visited": {"0.1": 0.1}, "score": s}
        return call

    monkeypatch.setattr(Validator, "__call__", improving(itertools.count()))
    ref = Trainer(cfg, ds)
    ref.fit(progress=False, build_index=False)
    assert ref.state.best.epoch == 4 and ref.state.stage == "refit" and ref.state.refit_epochs == 4

    class Stop(Exception):
        pass

    def crash(trainer, record):
        if record.get("stage") == "refit" and record["epoch"] == 2:
            raise Stop

    out = tmp_path / "m"
    monkeypatch.setattr(Validator, "__call__", improving(itertools.count()))
    with pytest.raises(Stop):
        Trainer(cfg, ds).fit(out_dir=out, progress=False, on_epoch=crash, build_index=False)
    again = Trainer(cfg, ds)
    assert again.resume(checkpoint_path(out)) == 2 and again.state.stage == "refit"
    again.fit(progress=False, build_index=False)
    for (k, v), (_, w) in zip(ref.tree.state_dict().items(), again.tree.state_dict().items()):
        assert torch.equal(v, w), k
    assert np.array_equal(ref.encoder.adapter.weight.detach().numpy(), again.encoder.adapter.weight.detach().numpy())
    # and it differs from the validated state itself: the refit saw the held-out queries too
    assert not torch.equal(ref.state.best.state["tree.levels.0.W"], ref.tree.levels[0].W.detach())


def test_tune_writes_a_loadable_config_chosen_on_training_queries_only(tiny_beir, tmp_path):
    """The test qrels are made unreadable: tuning must never open them."""
    import json
    import shutil

    from ehi.cli import main

    data = tmp_path / "data"
    shutil.copytree(tiny_beir, data)
    (data / "qrels" / "test.tsv").write_text("not a qrels file\n")
    base = tmp_path / "base.json"
    cfg = config(epochs=3)
    base.write_text(cfg.to_json())
    out = tmp_path / "tuned.json"
    # a zero time limit: the given config always runs, nothing after it (whatever the speed)
    assert main(["tune", "--data", str(data), "--out", str(out), "--config", str(base), "--time-limit", "0", "--folds", "1", "--no-progress"]) == 0
    chosen = EHIConfig.from_dict(json.loads(out.read_text())).validate()
    trials = json.loads((tmp_path / "tuned.trials.json").read_text())
    assert len(trials) == 1 and trials[0]["overrides"] == {}
    assert 1 <= chosen.train.epochs <= 3 and chosen.tree.branching == 6
    best = max(trials, key=lambda t: t["score"])
    assert chosen.train.epochs == max(1, max(best["kept_epochs"]))


def test_tune_tries_every_candidate_within_its_time_and_keeps_the_best(tiny_beir):
    from ehi.training.tuning import candidates, tune

    ds = load_beir(tiny_beir)
    cfg = config(epochs=2)
    chosen, trials = tune(ds, cfg, time_limit=1e9, folds=1, progress=False)
    assert [t.overrides for t in trials] == candidates(cfg, len(ds.corpus))
    best = max(trials, key=lambda t: t.score)
    for key, value in best.overrides.items():
        section, name = key.split(".")
        assert getattr(getattr(chosen, section), name) == value
    assert chosen.train.epochs == max(1, max(best.kept))
    assert all(t.scores[0] >= t.start[0] for t in trials)  # validation never keeps worse than the start


def test_grouped_holdout_points_only_at_documents_no_training_query_touches(tmp_path):
    """val_group='documents': held-out queries are on articles (repeated titles) that no
    training query is on, so validation sees routing to new documents."""
    from ehi.data import Corpus, Dataset

    ids = [f"d{i}" for i in range(60)]
    titles = [f"article {i // 3}" for i in range(60)]  # 20 articles of 3 paragraphs
    corpus = Corpus(ids, titles, [f"text {i}" for i in range(60)])
    rng = np.random.default_rng(0)
    qrels = {f"q{j}": {ids[int(rng.integers(60))]: 1} for j in range(100)}
    qrels["q-both"] = {"d0": 1, "d59": 1}  # on two articles
    ds = Dataset(tmp_path, corpus, {q: q for q in qrels}, {"train": qrels})
    tc = config(val_group="documents", val_fraction=0.2).train
    tr, val, split = holdout(ds, "train", None, tc)
    assert split == "train" and 10 <= len(val) and not set(tr) & set(val)
    art = lambda q: {titles[ids.index(d)] for d in qrels[q]}
    held = set().union(*(art(q) for q in val))
    assert not any(art(q) & held for q in tr)  # no training query on a held-out article
    assert len(tr) + len(val) >= len(qrels) - 1  # at most the query on both kinds is in neither
    assert holdout(ds, "train", None, tc)[1] == val
    # unique titles: each document is its own group
    ds2 = Dataset(tmp_path, Corpus(ids, [f"t{i}" for i in range(60)], corpus.texts), ds.queries, {"train": qrels})
    tr2, val2, _ = holdout(ds2, "train", None, tc)
    docs = set().union(*(set(qrels[q]) for q in val2))
    assert not any(set(qrels[q]) & docs for q in tr2)
    with pytest.raises(ValueError, match="val_group"):
        config(val_group="titles").validate()


def _articles(tmp_path, n_articles, paras, queries_per_para, titled=True):
    """A corpus of articles (paragraphs sharing a title) and train questions on each paragraph."""
    from ehi.data import Corpus, Dataset

    ids = [f"d{i}" for i in range(n_articles * paras)]
    titles = [f"article {i // paras}" if titled else f"t{i}" for i in range(len(ids))]
    corpus = Corpus(ids, titles, [f"text {i}" for i in range(len(ids))])
    qrels = {f"q{d}-{j}": {d: 1} for d in ids for j in range(queries_per_para)}
    return Dataset(tmp_path, corpus, {q: q for q in qrels}, {"train": qrels}), qrels, titles, ids


def test_auto_holdout_adds_whole_articles_only_when_random_held_out_queries_are_all_touched(tmp_path):
    """val_group='auto' (the default): where every article has many questions (SQuAD), a random
    hold-out has almost no query on documents no training query touches, so the untouched guard
    sees nothing; auto then holds out half at random (part of the random hold-out) and half as
    whole articles. Where random already holds out enough untouched queries it is left alone."""
    from ehi.evaluation.evaluate import untouched_queries

    ds, qrels, titles, ids = _articles(tmp_path, 40, 3, 4)  # 480 questions, 12 per article
    rnd_tr, rnd_val, _ = holdout(ds, "train", None, config(val_group="random").train)
    tr, val, split = holdout(ds, "train", None, config().train)
    assert config().train.val_group == "auto"
    assert split == "train" and not set(tr) & set(val) and abs(len(val) - len(rnd_val)) <= 12
    untouched = untouched_queries(val, qrels, {d for q in tr for d in qrels[q]})
    assert len(untouched) >= len(val) // 2 - 1
    random_part = set(val) - set(untouched)
    assert random_part and random_part <= set(rnd_val)  # the touched half is part of the random hold-out
    art = lambda q: {titles[ids.index(d)] for d in qrels[q]}
    held = set().union(*(art(q) for q in untouched))
    assert not any(art(q) & held for q in tr)  # no training query on a held-out article
    assert holdout(ds, "train", None, config().train) == (tr, val, split)  # seeded
    # one question per document, every document its own group: random leaves enough untouched
    ds2, *_ = _articles(tmp_path, 60, 1, 1, titled=False)
    assert holdout(ds2, "train", None, config().train) == holdout(ds2, "train", None, config(val_group="random").train)


def test_grouped_holdout_trains_and_refits_on_every_query(tiny_beir):
    ds = load_beir(tiny_beir)
    trainer = Trainer(config(val_group="documents", epochs=2), ds)
    assert trainer.validator is not None
    assert sorted(trainer.full_set.query_ids) == sorted(ds.relevant("train"))
    trainer.fit(progress=False)


def test_validation_also_scores_held_out_queries_on_documents_no_training_query_touches(tiny_beir):
    """A user's new documents: the queries on them are scored apart, beside the overall score."""
    ds = load_beir(tiny_beir)
    trainer = Trainer(config(epochs=1), ds)
    v = trainer.validator
    row = {d: i for i, d in enumerate(ds.corpus.ids)}
    rel = ds.relevant("train")
    trained = set(trainer.train_set.pairs[:, 1].tolist())
    expected = [q for q in v.query_ids if not any(row[d] in trained for d in rel[q])]
    assert v.new_doc_queries == expected and expected  # one query per document here: all are new
    # a held-out query whose document a training query also points at is not "new"
    first = v.query_ids[0]
    from ehi.training.validation import Validator

    touched = Validator(ds, "train", v.query_ids, v.feats, v.budgets, trained_docs=[row[d] for d in rel[first]])
    assert first not in touched.new_doc_queries and len(touched.new_doc_queries) == len(v.query_ids) - 1
    entry = trainer._validate(0, progress=False)
    assert entry["new_documents"]["queries"] == len(expected)
    new = entry["new_documents"]["R@100"]
    assert new and set(new) <= set(entry["R@100"])
    for b, value in new.items():  # the same queries here, so the same recall at each budget searched
        assert abs(value - entry["R@100"][b]) < 1e-6


def test_train_says_what_it_holds_out_and_saves_how(tiny_beir, tmp_path, capsys):
    import json
    import re

    from ehi.cli import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(out), "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"validating after each on 10 held-out queries of split 'train'", err), err
    assert json.loads((out / "config.json").read_text())["train"]["val_group"] == "auto"
    assert main(["train", "--data", str(tiny_beir), "--out", str(tmp_path / "m2"), "--epochs", "1", "--val-group", "random"]) == 0
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["train"]["val_group"] == "random"
