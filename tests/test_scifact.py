"""The real data, on a subset small enough for CI: 400 SciFact documents, 60 train queries."""

import pytest

from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.evaluation.evaluate import evaluate_model
from ehi.training.trainer import Trainer


@pytest.fixture(scope="module")
def scifact_model(scifact_subset):
    cfg = EHIConfig()
    cfg.tree.branching = 8
    cfg.train.epochs = 6
    ds = load_beir(scifact_subset)
    trainer = Trainer(cfg, ds)
    return ds, trainer, trainer.fit(progress=False)


@pytest.mark.slow
def test_scifact_subset_end_to_end(scifact_model):
    ds, trainer, model = scifact_model
    assert len(ds.corpus) == 400
    rows = evaluate_model(model, ds, "test", budgets=(0.25, 0.5, 1.0), baselines=True)
    by = {(r.method, r.budget): r for r in rows}
    exact = by[("EHI encoder, exact", None)]
    # all leaves visited = exact search; smaller budgets visit less and recall no more
    assert by[("EHI", 1.0)].metrics == pytest.approx(exact.metrics)
    assert by[("EHI", 0.25)].fraction_visited <= 0.25
    assert by[("EHI", 0.25)].metrics["R@100"] <= exact.metrics["R@100"] + 1e-9
    # the retriever works on real claims: most relevant abstracts among the top 100 of 400
    assert exact.metrics["R@100"] > 80
    # Faiss-IVF with every list probed is exact search too
    assert by[("EHI encoder + Faiss-IVF", 1.0)].metrics["R@100"] == pytest.approx(exact.metrics["R@100"])


def test_scifact_subset_leaves_are_used(scifact_model):
    ds, _, model = scifact_model
    st = model.index.leaf_stats()
    assert st["empty"] <= 2 and st["max"] < 0.5 * st["documents"]
    # real claims do not all crowd into a few big leaves: the documents a claim's first leaf
    # holds stay within 3x of the ideal N/L
    texts = [ds.queries[q] for q in sorted(ds.relevant("test"))]
    q_emb = model.encoder.encode(texts)
    sq = model.index.leaf_stats(model.route(q_emb, 1))
    assert sq["expected_per_leaf"] < 3 * sq["ideal_per_leaf"]
