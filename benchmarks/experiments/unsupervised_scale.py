"""Frozen experiment: results/unsupervised_scale.json were measured at commit 2d85d11 (2026-11-23), measured under earlier defaults. Kept so that it can be rerun; not kept up with today's defaults.

1M vectors, no labels: unsupervised EHI (documents as pseudo-queries, their exact neighbours
as teacher) against Faiss IVFFlat with as many lists, on the synthetic corpus of scale.py.

Precomputed embeddings, documents only: EHI trains in bring-your-own-embedding mode on a
document sample (``--sample``), with ``--pseudo`` of those documents as pseudo-queries
paired with their exact top-100 among the sample; IVF runs k-means on the same sample; both
then index the full corpus streaming. Test queries are drawn near random documents (as in
scale.py) and never seen in training. Reported: training time (pairs, tree, validation),
build time, and at 1 % and 5 % of the corpus visited (widths by the shared budget rule on
the test queries): neighbour recall NR@10 / NR@100 against exact search over all N vectors,
and Recall@100 of the document each query was drawn near.

    python benchmarks/experiments/unsupervised_scale.py --out reports/unsupervised_scale.json
"""

from __future__ import annotations

import argparse
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import faiss
import numpy as np
import torch
from lib.common import write_json
from lib.synthetic import DIM, Corpus1M, build_streaming, near, recall_at_100

from ehi.budget import WidthSearch
from ehi.config import apply_overrides
from ehi.data import embeddings_dataset
from ehi.evaluation.evaluate import neighbour_recall
from ehi.training.unsupervised import train_unsupervised, unsupervised_config


def exact_top(corpus: Corpus1M, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k over every chunk, merged: the truth neighbour recall is measured against."""
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for s, x in corpus.chunks():
        index = faiss.IndexFlatIP(DIM)
        index.add(x)
        sc, ix = index.search(q, k)
        cs, ci = np.concatenate([best_s, sc], 1), np.concatenate([best_i, ix + s], 1)
        order = np.argsort(-cs, 1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)
    return best_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--branching", type=int, default=1024)
    ap.add_argument("--sample", type=int, default=100_000, help="documents both methods train on")
    ap.add_argument("--pseudo", type=int, default=20_000, help="sampled documents used as pseudo-queries")
    ap.add_argument("--test-queries", type=int, default=2_000)
    ap.add_argument("--query-spread", type=float, default=1.2)
    ap.add_argument("--epochs", type=int, help="override the unsupervised default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/unsupervised_scale.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    corpus = Corpus1M(args.docs, seed=args.seed)
    L = args.branching
    sample = np.sort(rng.choice(args.docs, size=args.sample, replace=False))
    sample_x = corpus.rows(sample)
    test_pos = rng.choice(args.docs, size=args.test_queries, replace=False)
    test_q = near(corpus.rows(test_pos), rng, args.query_spread)
    out: dict = {"docs": args.docs, "leaves": L, "args": vars(args)}

    t = time.perf_counter()
    cfg = apply_overrides(unsupervised_config(), {"tree.branching": L, "train.batch_size": 256, "train.seed": args.seed,
                                                  **({"train.epochs": args.epochs} if args.epochs else {})})
    model, trainer = train_unsupervised(embeddings_dataset(len(sample_x)), cfg, doc_embeddings=sample_x, progress=False,
                                        log_fn=print, max_queries=args.pseudo)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    model.index = build_streaming(model, corpus, L, "flat", sample_x, argparse.Namespace(pq_m=48, rerank=0))
    build_s = time.perf_counter() - t
    out["ehi"] = {"train_seconds": train_s, "build_seconds": build_s, "timings": trainer.timings,
                  "validation": model.validation and {k: model.validation[k] for k in ("kept_epoch", "why", "refit")}}
    print(f"EHI: train {train_s:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in trainer.timings.items())}), build {build_s:.0f}s")
    print(f"  {model.validation['why'] if model.validation else ''}", flush=True)

    t = time.perf_counter()
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, L, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = args.seed
    ivf.train(sample_x)
    for _, x in corpus.chunks():
        ivf.add(x)
    out["ivf"] = {"train_build_seconds": time.perf_counter() - t}
    sizes = np.array([ivf.invlists.list_size(i) for i in range(L)])

    t = time.perf_counter()
    truth = exact_top(corpus, test_q, 100)
    out["exact_seconds"] = time.perf_counter() - t
    q_ehi = model.encoder.embed_vectors(test_q)
    ehi_w = WidthSearch(lambda w: model.visited_fraction(q_ehi, w), L)
    ivf_w = WidthSearch(lambda w: float(sizes[quantizer.search(test_q, w)[1]].sum(1).mean() / args.docs), L)
    out["budgets"] = {}
    for budget in (0.01, 0.02, 0.05):
        bw, iw = ehi_w.largest_within(budget), ivf_w.largest_within(budget)
        if bw is None or iw is None:  # even one leaf / list visits more than the budget
            print(f"{100 * budget:g}%: not reachable (EHI beam {bw}, IVF nprobe {iw})")
            continue
        found = model.search_embeddings(q_ehi, 100, bw)[0].indices
        ivf.nprobe = iw
        ivf_found = ivf.search(test_q, 100)[1]
        row = {"ehi_beam": bw, "ivf_nprobe": iw, "ehi_visited": ehi_w.fraction(bw), "ivf_visited": ivf_w.fraction(iw)}
        for name, f in (("ehi", found), ("ivf", ivf_found)):
            row[f"{name}_NR@10"] = 100 * float(neighbour_recall(f, truth, 10).mean())
            row[f"{name}_NR@100"] = 100 * float(neighbour_recall(f, truth, 100).mean())
            row[f"{name}_R@100"] = recall_at_100(f, test_pos)
        out["budgets"][f"{budget:g}"] = row
        print(f"{100 * budget:g}%: EHI beam {bw} ({100 * row['ehi_visited']:.2f}%) NR@10 {row['ehi_NR@10']:.1f} NR@100 {row['ehi_NR@100']:.1f} R@100 {row['ehi_R@100']:.1f} | "
              f"IVF nprobe {iw} ({100 * row['ivf_visited']:.2f}%) NR@10 {row['ivf_NR@10']:.1f} NR@100 {row['ivf_NR@100']:.1f} R@100 {row['ivf_R@100']:.1f}", flush=True)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
