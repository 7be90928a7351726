"""Routing cost of deep trees against flat ones and Faiss quantizers, at 1,024 and 16,384 leaves.

Synthetic clustered unit vectors (the generator of ``scale.py``); every tree starts from
k-means over a document sample (no training: this measures the routing structure, which is
what depth changes): flat = one level of L leaves; deep = per-node (B, 2), bottom-up start,
leaves ranked by their own score under ``upper`` expanded cells. Faiss baselines route the
same queries to the same L flat k-means centroids with an exact (IndexFlatIP) or an HNSW
(IndexHNSWFlat) quantizer. Reported, one thread: routing time per query alone (median of
``--reps``) and batched, and how often a method's top leaf is the flat tree's top leaf
(routing agreement; 1.0 = routes exactly like flat k-means).

    python benchmarks/routing_speed.py --out benchmarks/results/routing_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from common import write_json
from ehi.config import TreeConfig
from ehi.tree import Tree
from scale import DIM, Corpus1M, near


def per_query_ms(fn, q, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(len(q)):
            fn(q[i : i + 1])
        out.append(1000 * (time.perf_counter() - t) / len(q))
    return statistics.median(out)


def batched_us(fn, q, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(q)
        out.append(1e6 * (time.perf_counter() - t) / len(q))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=65_536, help="documents k-means sees")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/routing_speed.json")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    threadpool_limits(1)
    torch.set_num_threads(1)
    corpus = Corpus1M(args.sample, seed=0)
    x = np.concatenate([c for _, c in corpus.chunks()])
    rng = np.random.default_rng(1)
    q = near(x[rng.choice(len(x), args.queries, replace=False)], rng, 1.2)
    results = []
    for L, B, uppers in ((1024, 32, (2, 4, 8, 16)), (16384, 128, (4, 8, 16, 64))):
        t = time.perf_counter()
        deep = Tree(DIM, TreeConfig(branching=B, height=2, conditioning="per-node", node_init="bottom-up", leaf_rank="leaf", kmeans_iters=10))
        deep.init_kmeans(x, seed=0)
        init_s = time.perf_counter() - t
        with torch.no_grad():
            for level in deep.levels:
                level.U.zero_()
        # the flat tree over the very leaves of the deep one (its k-means), so agreement isolates routing
        W1 = deep.levels[1].W.detach().numpy()  # (B cells, d, B leaves)
        leaves = np.concatenate([W1[j].T for j in range(B)]) * deep.config.temperature  # leaf j*B + k
        flat = Tree(DIM, TreeConfig(branching=L, height=1))
        with torch.no_grad():
            flat.levels[0].W.copy_(torch.from_numpy(np.ascontiguousarray(leaves.T / deep.config.temperature)))
            flat.levels[0].U.zero_()
        fr, dr = flat.router(), deep.router()
        truth = fr.leaves(q, 1)[:, 0]
        rows = []
        rows.append({"method": f"flat tree ({L}, 1)", "ms_alone": per_query_ms(lambda e: fr.leaves(e, 1), q, args.reps),
                     "us_batched": batched_us(lambda e: fr.leaves(e, 1), q, args.reps), "agreement": 1.0})
        for up in uppers:
            top = dr.leaves(q, 1, upper=up)[:, 0]
            rows.append({"method": f"deep tree ({B}, 2), {up} cells", "ms_alone": per_query_ms(lambda e, up=up: dr.leaves(e, 1, upper=up), q, args.reps),
                         "us_batched": batched_us(lambda e, up=up: dr.leaves(e, 1, upper=up), q, args.reps),
                         "agreement": float(np.mean(top == truth))})
        fq = faiss.IndexFlatIP(DIM)
        fq.add(np.ascontiguousarray(leaves))
        rows.append({"method": f"Faiss IndexFlatIP quantizer ({L})", "ms_alone": per_query_ms(lambda e: fq.search(e, 1), q, args.reps),
                     "us_batched": batched_us(lambda e: fq.search(e, 1), q, args.reps),
                     "agreement": float(np.mean(fq.search(q, 1)[1][:, 0] == truth))})
        hq = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        hq.add(np.ascontiguousarray(leaves))
        for ef in (16, 64):
            hq.hnsw.efSearch = ef
            rows.append({"method": f"Faiss HNSW quantizer ({L}), efSearch {ef}", "ms_alone": per_query_ms(lambda e: hq.search(e, 1), q, args.reps),
                         "us_batched": batched_us(lambda e: hq.search(e, 1), q, args.reps),
                         "agreement": float(np.mean(hq.search(q, 1)[1][:, 0] == truth))})
        for r in rows:
            r["speedup_over_flat_alone"] = rows[0]["ms_alone"] / r["ms_alone"]
        results.append({"leaves": L, "branching": B, "init_seconds": init_s, "rows": rows})
        print(f"\n{L} leaves ({B} x {B}), {args.queries} queries, one thread, bottom-up k-means start in {init_s:.0f}s")
        print(f"  {'method':<44} {'ms alone':>9} {'x flat':>7} {'us/q batched':>13} {'top leaf = flat':>16}")
        for r in rows:
            print(f"  {r['method']:<44} {r['ms_alone']:>9.3f} {r['speedup_over_flat_alone']:>7.1f} {r['us_batched']:>13.1f} {100 * r['agreement']:>15.1f}%")
    write_json(args.out, {"sample": args.sample, "queries": args.queries, "results": results})


if __name__ == "__main__":
    main()
