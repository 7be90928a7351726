"""Frozen experiment: results/unsupervised*.json were measured at commit 82c98b0 (2026-12-02), measured before the router fit (off in that mode) and the spread router. Kept so that it can be rerun; not kept up with today's defaults.

Unsupervised EHI (no qrels: pseudo-queries and their exact neighbours) against Faiss-IVF
and ScaNN over the same encoder with as many lists, on queries it never trained on.

Pseudo-queries are unlabelled query texts: SciFact's train claims minus a fixed 20 % held
out for deciding (seed 12345), Climate-FEVER's train claims (decided on dev); with
``--pseudo documents`` document spans instead. Qrels are read only to score R@100 on the
decision queries. Reported per variant: neighbour recall NR@10 / NR@100 (share of the exact
top-k under the encoder found in the top k) and Recall@100 at 1 / 2 / 5 / 10 / 20 % of the
corpus visited, mean over seeds.

    python benchmarks/experiments/unsupervised.py --seeds 2 --out benchmarks/results/unsupervised.json
    python benchmarks/experiments/unsupervised.py --seeds 2 --variant 'lr1e-3={"train.lr_indexer": 1e-3}' --only lr1e-3
"""

from __future__ import annotations

import argparse
import sys
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
from lib.common import select_variants, write_json
from lib.corpora import CORPORA, split_queries

from ehi.benchmark.run import index_curves
from ehi.config import apply_overrides
from ehi.data import load_beir
from ehi.evaluation.evaluate import ehi_curve, exact_row_and_truth
from ehi.training.unsupervised import train_unsupervised, unsupervised_config

BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "untrained (k-means start)": {"train.epochs": 0},
    "triplet losses instead (EHI's, frozen encoder)": {
        "train.lambda_neighbours": 0.0, "train.lambda_indexing": 1.0, "train.lambda_intra_leaf": 0.1,
        "train.hard_negatives": 4, "train.lr_indexer": 1e-3, "train.epochs": 20,
    },
    "indexer lr 1e-3": {"train.lr_indexer": 1e-3},
    "targets fixed at the start": {"train.refresh_every": 1000},
    "no load balance": {"train.load_balance": 0.0},
}


def cells(rows, method):
    out = {}
    for r in rows:
        if r.method == method and r.budget is not None:
            out[f"{r.budget:g}"] = {m: round(r.metrics[m], 2) for m in ("NR@10", "NR@100", "R@100") if m in r.metrics}
    return out


def run(corpus_name, ds, train_q, decide_q, decide_split, overrides, seed, pseudo, baselines):
    cfg = apply_overrides(unsupervised_config(), {"train.seed": seed, **overrides})
    t = time.perf_counter()
    model, trainer = train_unsupervised(ds, cfg, source=pseudo,
                                        query_ids=train_q, progress=False)
    train_s = time.perf_counter() - t
    enc = model.encoder
    q_emb = enc.embed_all(enc.features([ds.queries[q] for q in decide_q], "encoding queries"))
    qrels = {q: ds.split(decide_split)[q] for q in decide_q}
    d_emb = model.index.embeddings
    exact, truth = exact_row_and_truth("base + exact", q_emb, d_emb, decide_q, model.doc_ids, qrels)
    rows = ehi_curve("EHI", model, q_emb, decide_q, qrels, BUDGETS, truth=truth)
    out = {"EHI": cells(rows, "EHI"), "train_s": round(train_s, 1), "kept": model.validation and model.validation["kept_epoch"],
           "oracle routing over EHI's leaves": oracle_cells(model, truth)}
    if baselines:
        base, _ = index_curves("base", q_emb, d_emb, model.tree.num_leaves, seed, decide_q, model.doc_ids, qrels, BUDGETS,
                               exact=exact, truth=truth)
        out["Faiss-IVF"] = cells(base, "base + Faiss-IVF")
        out["ScaNN"] = cells(base, "base + ScaNN")
    return out


def oracle_cells(model, truth: np.ndarray) -> dict:
    """A near-best router over this model's leaves (it knows the answers): each query visits
    first the leaves with the most of its exact top 100 per document (the greedy knapsack
    order for a budget of documents); the budget rule picks the width. NR@100 here is the share
    of the top 100 inside the visited leaves (the scan finds all of them)."""
    L = model.tree.num_leaves
    doc_leaf = model.index.doc_leaves[:, 0]
    sizes = np.bincount(doc_leaf, minlength=L)
    count = np.zeros((len(truth), L))
    for i, row in enumerate(truth):
        np.add.at(count[i], doc_leaf[row], 1.0)
    order = np.argsort(-count / np.maximum(sizes, 1)[None, :], 1, kind="stable")
    frac = np.cumsum(sizes[order], 1).mean(0) / len(doc_leaf)
    out = {}
    for b in BUDGETS:
        w = int((frac <= b + 1e-12).sum())
        if w:
            out[f"{b:g}"] = {"NR@100": round(100 * float(np.take_along_axis(count, order[:, :w], 1).sum(1).mean() / truth.shape[1]), 2)}
    return out


def mean_cells(runs, method):
    keys = runs[0][method].keys()
    return {b: {m: round(float(np.mean([r[method][b][m] for r in runs if b in r[method]])), 2) for m in runs[0][method][b]} for b in keys}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--variant", action="append", default=[], help="NAME=JSON overrides (repeatable)")
    p.add_argument("--only", action="append", default=[], help="run only these variants")
    p.add_argument("--pseudo", default="auto", choices=["auto", "queries", "documents"])
    p.add_argument("--corpus", action="append", choices=sorted(CORPORA))
    p.add_argument("--out", default="reports/unsupervised.json")
    args = p.parse_args(argv)
    variants = select_variants(VARIANTS, args.variant, args.only)
    results = {"command": "python benchmarks/experiments/unsupervised.py " + " ".join(sys.argv[1:]), "budgets": BUDGETS,
               "pseudo": args.pseudo, "variants": {}}
    for name in args.corpus or sorted(CORPORA, reverse=True):
        corpus = CORPORA[name]
        ds = load_beir(corpus["path"])
        train_q, decide_q, decide_split = split_queries(ds, corpus, 0.2)
        for vname, over in variants.items():
            runs = [run(name, ds, train_q, decide_q, decide_split, over, s, args.pseudo, vname == next(iter(variants))) for s in range(args.seeds)]
            entry = {"overrides": over, "runs": runs, "EHI": mean_cells(runs, "EHI")}
            for b in ("Faiss-IVF", "ScaNN", "oracle routing over EHI's leaves"):
                if b in runs[0]:
                    entry[b] = mean_cells(runs, b)
            results["variants"].setdefault(vname, {})[name] = entry
            line = " ".join(f"{float(b) * 100:g}%:{c.get('NR@100', 0):.1f}/{c.get('R@100', 0):.1f}" for b, c in entry["EHI"].items())
            print(f"{name:14s} {vname:40s} EHI NR@100/R@100 {line}  kept {[r['kept'] for r in runs]} {np.mean([r['train_s'] for r in runs]):.0f}s", flush=True)
            for b in ("Faiss-IVF", "ScaNN", "oracle routing over EHI's leaves"):
                if b in entry:
                    line = " ".join(f"{float(k) * 100:g}%:{c.get('NR@100', 0):.1f}/{c.get('R@100', 0):.1f}" for k, c in entry[b].items())
                    print(f"{name:14s} {b:40s}     NR@100/R@100 {line}", flush=True)
            write_json(args.out, results)


if __name__ == "__main__":
    main()
