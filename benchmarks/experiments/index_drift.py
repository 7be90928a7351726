"""Frozen experiment: results/index_drift.json were measured at commit c9cd6eb (2026-12-02), measured with the tree router. Kept so that it can be rerun; not kept up with today's defaults.

Leaf balance and recall after adding 20 % new documents to a trained index (no retraining).

EHI is trained on a random 80 % of SciFact's abstracts (adapter + tree over the cached
all-MiniLM-L6-v2 embeddings, i.e. the default adapter scope), the other 20 % are then routed
into the trained tree with ``add_documents``. Reported: leaf-size statistics before and after
the addition, and test Recall@100 over the full corpus at fixed budgets, against a model
trained on the full corpus from the start.

    python benchmarks/experiments/index_drift.py --data ../shared/datasets/scifact --out reports/index_drift.json
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
from lib.common import write_json

from ehi.config import EHIConfig, EncoderConfig
from ehi.data import Corpus, Dataset, load_beir
from ehi.encode.encoder import Encoder
from ehi.evaluation.evaluate import ehi_curve
from ehi.training.trainer import Trainer

BUDGETS = (0.02, 0.05, 0.1, 0.2)


def train_on(ds: Dataset, keep: np.ndarray, doc_raw: np.ndarray, q_raw: np.ndarray, seed: int):
    sub = Dataset(
        root=ds.root,
        corpus=Corpus([ds.corpus.ids[i] for i in keep], [ds.corpus.titles[i] for i in keep], [ds.corpus.texts[i] for i in keep]),
        queries=ds.queries,
        qrels=ds.qrels,
    )
    cfg = EHIConfig()
    cfg.train.seed = seed
    return Trainer(cfg, sub, doc_embeddings=doc_raw[keep], query_embeddings=q_raw).fit(progress=False)


def recall_curve(model, q_raw_test, qids, qrels):
    rows = ehi_curve("EHI", model, model.encoder.embed_vectors(q_raw_test), qids, qrels, BUDGETS)
    return {f"{r.budget:g}": {"R@100": r.metrics["R@100"], "visited": r.fraction_visited} for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--new-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/index_drift.json")
    args = ap.parse_args()

    ds = load_beir(args.data)
    ds.split("train")
    enc = Encoder(EncoderConfig())
    doc_raw = enc.features(ds.corpus.documents(), "encoding corpus").dense.numpy()
    q_raw = enc.features([ds.queries[q] for q in ds.queries], "encoding queries").dense.numpy()
    qrow = {q: i for i, q in enumerate(ds.queries)}
    rel = ds.relevant("test")
    qids = sorted(rel)
    qrels = {q: ds.split("test")[q] for q in qids}
    q_test = q_raw[[qrow[q] for q in qids]]

    n = len(ds.corpus)
    perm = np.random.default_rng(args.seed).permutation(n)
    n_new = int(round(args.new_fraction * n))
    old, new = np.sort(perm[n_new:]), np.sort(perm[:n_new])

    model = train_on(ds, old, doc_raw, q_raw, args.seed)
    before = model.index.leaf_stats()
    model.add_documents([ds.corpus.ids[i] for i in new], [ds.corpus.titles[i] for i in new], model.encoder.embed_vectors(doc_raw[new]))
    after = model.index.leaf_stats()
    added = recall_curve(model, q_test, qids, qrels)
    full = train_on(ds, np.arange(n), doc_raw, q_raw, args.seed)
    reference = recall_curve(full, q_test, qids, qrels)
    ref_stats = full.index.leaf_stats()

    print(f"{n_new} of {n} SciFact abstracts added to a tree trained on the other {n - n_new}")
    print(f"{'leaves':<28} {'docs':>6} {'min':>5} {'median':>7} {'max':>5} {'empty':>6} {'E[docs/leaf]':>13} {'ideal':>7}")
    for name, st in (("trained on 80 %", before), ("+ 20 % added", after), ("trained on 100 %", ref_stats)):
        print(f"{name:<28} {st['documents']:>6} {st['min']:>5} {st['median']:>7.0f} {st['max']:>5} {st['empty']:>6} {st['expected_per_leaf']:>13.1f} {st['ideal_per_leaf']:>7.1f}")
    print("\nRecall@100 on test over the full corpus (fraction visited)")
    print(f"{'budget':>7} {'80 % + added':>16} {'trained on 100 %':>18}")
    for b in added:
        a, r = added[b], reference.get(b)
        print(f"{100 * float(b):>6.0f}% {a['R@100']:>8.1f} ({100 * a['visited']:4.1f}%) {r['R@100']:>10.1f} ({100 * r['visited']:4.1f}%)")
    write_json(args.out, {"added": n_new, "documents": n, "before": before, "after": after, "reference": ref_stats,
                          "recall_added": added, "recall_reference": reference})


if __name__ == "__main__":
    main()
