"""Frozen experiment: results/partition_smoothing.json were measured at commit 00c520c (2026-11-24), a design experiment (no training). Kept so that it can be rerun; not kept up with today's defaults.

Would a partition that follows the neighbour graph beat k-means for neighbour recall?

No training: 256 spherical k-means leaves over the untrained encoder's documents, against the
same k-means run on documents smoothed by their neighbourhoods — each document replaced by the
mean of its exact top-k documents (k = 5, 20), or by the mean of itself and the training
queries whose exact top 100 hold it — with queries routed to the mean of each leaf's original
documents. Judged on queries that no variant sees (SciFact: a fixed 20 % of the train claims;
Climate-FEVER: dev), NR@100 (share of the exact top 100 in the visited leaves) at 1 / 2 / 5 /
10 % of the corpus visited, under the shared budget rule (mean over the judged queries).

    python benchmarks/experiments/partition_smoothing.py --seeds 2 --out benchmarks/results/partition_smoothing.json
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
from lib.common import write_json
from lib.corpora import CORPORA, split_queries

from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.encode.encoder import Encoder
from ehi.evaluation.baselines import exact_search
from ehi.model.kmeans import spherical_kmeans

LEAVES = 256
BUDGETS = (0.01, 0.02, 0.05, 0.1)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def neighbour_recall_curve(assign: np.ndarray, centroids: np.ndarray, q: np.ndarray, truth: np.ndarray) -> dict:
    sizes = np.bincount(assign, minlength=LEAVES)
    order = np.argsort(-(q @ centroids.T), 1)
    mean_frac = (np.cumsum(sizes[order], 1) / len(assign)).mean(0)
    rows = np.arange(len(q))[:, None]
    out = {}
    for b in BUDGETS:
        w = int((mean_frac <= b + 1e-12).sum())
        if w:
            visited = np.zeros((len(q), LEAVES), dtype=bool)
            np.put_along_axis(visited, order[:, :w], True, 1)
            out[f"{b:g}"] = {"width": w, "NR@100": round(100 * float(visited[rows, assign[truth]].mean()), 2)}
    return out


def partition(x: np.ndarray, docs: np.ndarray, seed: int):
    """Leaves by k-means over ``x``; routing centroids = mean of each leaf's original documents."""
    c = spherical_kmeans(x, LEAVES, 25, seed)
    a = np.argmax(x @ c.T, 1)
    cent = np.stack([docs[a == j].mean(0) if (a == j).any() else c[j] for j in range(LEAVES)])
    return a, unit(cent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="reports/partition_smoothing.json")
    args = ap.parse_args()
    results: dict = {"leaves": LEAVES, "budgets": BUDGETS, "corpora": {}}
    for name, corpus in CORPORA.items():
        ds = load_beir(corpus["path"])
        train_q, decide_q, _ = split_queries(ds, corpus, 0.2)
        enc = Encoder(EHIConfig().encoder)
        d = enc.embed_all(enc.features(ds.corpus.documents(), "encoding corpus"))
        qt = enc.embed_all(enc.features([ds.queries[x] for x in train_q], "encoding queries"))
        qd = enc.embed_all(enc.features([ds.queries[x] for x in decide_q], "encoding queries"))
        truth = exact_search(qd, d, 100)[0]
        smoothed = {}
        for k in (5, 20):
            nd = exact_search(d, d, k)[0]
            smoothed[f"documents smoothed by their top {k}"] = unit(d[nd].mean(1))
        acc, cnt = d.copy(), np.ones(len(d))
        for i, row in enumerate(exact_search(qt, d, 100)[0]):
            acc[row] += qt[i]
            cnt[row] += 1
        smoothed["documents smoothed by the training queries that retrieve them"] = unit(acc / cnt[:, None])
        rows = {}
        for seed in range(args.seeds):
            for label, x in {"k-means": d, **smoothed}.items():
                a, cent = partition(x, d, seed)
                rows.setdefault(label, []).append(neighbour_recall_curve(a, cent, qd, truth))
        results["corpora"][name] = {}
        for label, runs in rows.items():
            mean = {b: round(float(np.mean([r[b]["NR@100"] for r in runs if b in r])), 2) for b in runs[0]}
            results["corpora"][name][label] = {"runs": runs, "mean_NR@100": mean}
            print(f"{name:14s} {label:62s} " + " ".join(f"{float(b) * 100:g}%:{v:.1f}" for b, v in mean.items()), flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
