"""Recall@100 apart on queries whose relevant documents training queries touch and on those
they do not (issue 31): the split's rule, its use in ``ehi evaluate`` and in the benchmark."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from ehi.cli import main
from ehi.data import Corpus, Dataset
from ehi.evaluation.evaluate import TOUCHED, UNTOUCHED, Row, add_touch_split, split_by_touch


def _dataset():
    corpus = Corpus([f"d{i}" for i in range(6)], [""] * 6, [""] * 6)
    queries = {q: q for q in ("t1", "t2", "e1", "e2", "e3", "e4")}
    qrels = {
        "train": {"t1": {"d0": 1}, "t2": {"d1": 1, "d5": 0}},  # d5 judged not relevant: untouched
        "test": {"e1": {"d0": 1}, "e2": {"d2": 1, "d1": 2}, "e3": {"d3": 1, "d4": 1}, "e4": {"d5": 1}},
    }
    return Dataset(Path("."), corpus, queries, qrels)


def test_a_query_is_touched_when_a_training_query_points_at_one_of_its_documents():
    ds = _dataset()
    touched, untouched = split_by_touch(ds, ["e1", "e2", "e3", "e4"], "test")
    assert touched == ["e1", "e2"] and untouched == ["e3", "e4"]
    assert split_by_touch(ds, ["t1"], "train") is None  # the training split itself
    assert split_by_touch(ds, ["e1"], "test", train_split="nope") is None  # no training qrels


def test_rows_get_recall_on_each_group_from_their_per_query_recall():
    rows = [Row("EHI", 0.1, 2, 0.1, {"R@100": 50.0}, {"e1": 1.0, "e2": 0.5, "e3": 0.0, "e4": 0.5}),
            Row("exact", None, 0, 1.0, {"NR@100": 90.0}, {})]  # no judged per-query values: left alone
    add_touch_split(rows, (["e1", "e2"], ["e3", "e4"]))
    assert rows[0].metrics[TOUCHED] == pytest.approx(75.0) and rows[0].metrics[UNTOUCHED] == pytest.approx(25.0)
    assert TOUCHED not in rows[1].metrics
    add_touch_split(rows, (["e1", "e2", "e3", "e4"], []))  # an empty group is left out
    assert UNTOUCHED in rows[0].metrics and rows[0].metrics[TOUCHED] == pytest.approx(50.0)


def test_ehi_evaluate_reports_touched_and_untouched_queries_apart(tiny_beir, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(tiny_beir, data)
    with open(data / "qrels" / "train.tsv", "a") as fh:  # a training query on two test documents
        fh.write("q-music-1\tmusic-0\t1\nq-music-1\tcooking-0\t1\n")
    out = tmp_path / "m"
    assert main(["train", "--data", str(data), "--out", str(out), "-B", "4", "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), "--data", str(data), "--budgets", "0.5", "1.0", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "Recall@100 by whether a training query touches the relevant documents: 2 touched, 10 untouched queries" in text
    import json

    rows = json.loads(report.read_text())
    ehi = next(r for r in rows if r["method"] == "EHI" and r["budget"] == 1.0)
    per = ehi["metrics"]
    # the groups' recalls average back to the whole split's, weighted by their sizes
    assert (2 * per[TOUCHED] + 10 * per[UNTOUCHED]) / 12 == pytest.approx(per["R@100"], abs=1e-6)
    # the split a model trained on has no untouched queries to report
    assert main(["evaluate", str(out), "--data", str(data), "--split", "train", "--budgets", "1.0"]) == 0
    assert "touches the relevant documents" not in capsys.readouterr().out


def test_the_untouched_guard_refuses_a_clear_loss_and_lets_noise_through():
    from ehi.training.validation import untouched_worse

    rng = np.random.default_rng(0)
    ref = rng.uniform(40, 90, size=60)
    assert untouched_worse(ref, ref - 10) is not None  # every untouched query lost 10 points
    assert untouched_worse(ref, ref + rng.normal(0, 5, size=60)) is None  # noise around no change
    assert untouched_worse(ref, ref + 5) is None  # a gain is never refused
    few = ref[:4].copy()
    assert untouched_worse(few, few + np.array([-30.0, 20.0, 10.0, -15.0])) is None  # too few to tell


def test_validation_never_keeps_a_state_that_wins_on_touched_and_loses_on_untouched_queries(tiny_beir):
    """A scripted validator: epoch 2's learned tree scores best overall (its touched queries
    gain) while its untouched queries all lose; training keeps the best state that does not."""
    from conftest import tiny_config

    from ehi.data import load_beir
    from ehi.training.trainer import Trainer

    trainer = Trainer(tiny_config(epochs=3, route_fit_epochs=0, val_refit=False), load_beir(tiny_beir))
    assert trainer.validator is not None
    real = trainer.validator
    ref = list(np.linspace(40, 90, 12))
    script = iter([
        (50.0, ref),  # epoch 0: the k-means start, the reference
        (60.0, [r + 1 for r in ref]), (55.0, ref),  # epoch 1: learned, k-means over its encoder
        (95.0, [r - 20 for r in ref]), (52.0, ref),  # epoch 2: best score, every untouched query worse
        (58.0, ref), (51.0, ref),  # epoch 3
    ])

    class Scripted:
        budgets, describe = real.budgets, real.describe

        def __call__(self, model, d_emb):
            score, per_query = next(script)
            return {"R@100": {"0.1": score}, "leaf_recall": {"0.1": score}, "visited": {"0.1": 0.1}, "score": score,
                    "new_documents": {"queries": len(per_query), "R@100": {"0.1": float(np.mean(per_query))},
                                      "score": float(np.mean(per_query)), "per_query": list(per_query)}}

    trainer.validator = Scripted()
    trainer.fit(progress=False)
    assert trainer.state.best.epoch == 1 and trainer.state.best.score == 60.0
    by_epoch = {e["epoch"]: e for e in trainer.state.validation}
    assert "untouched" in by_epoch[2]["refused"]
    assert "per_query" not in by_epoch[2]["new_documents"]  # only the reference keeps them
    assert "per_query" in by_epoch[0]["new_documents"]
