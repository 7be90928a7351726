"""Frozen experiment: results/routing_speed*.json were measured at commit 68fe360 (2026-11-24), a design experiment (routing cost alone). Kept so that it can be rerun; not kept up with today's defaults.

Routing cost of deep trees against flat ones and Faiss quantizers, at 1,024 and 16,384 leaves.

Synthetic clustered unit vectors (the generator of ``scale.py``); every tree starts from
k-means over a document sample (no training: this measures the routing structure, which is
what depth changes): flat = one level of L leaves; deep = per-node (B, 2), bottom-up start,
leaves ranked by their own score under ``upper`` expanded cells. Faiss baselines route the
same queries to the same L flat k-means centroids with an exact (IndexFlatIP) or an HNSW
(IndexHNSWFlat) quantizer. Reported, one thread: routing time per query alone (median of
``--reps``) and batched, and how often a method's top leaf is the flat tree's top leaf
(routing agreement; 1.0 = routes exactly like flat k-means).

With ``--docs N`` (e.g. 1,000,000) the corpus of N vectors is indexed too, once, into one
Faiss IVF whose lists are the flat k-means leaves (the sample is the corpus's first rows), and
every router searches those same lists (``search_preassigned``): test queries drawn near random
documents; at 1 % and 5 % of the corpus visited (widths by the shared budget rule) each router's
NR@10 (share of the exact top 10 over all N found) and Recall@100 of the document the query
was drawn near, and batched QPS of routing + scan at one thread; then, for the flat tree's
NR@10 at 1 %, the narrowest width at which each router reaches it and its QPS there (equal
recall).

    python benchmarks/experiments/routing_speed.py --out benchmarks/results/routing_speed.json
    python benchmarks/experiments/routing_speed.py --docs 1000000 --out benchmarks/results/routing_speed_1m.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import faiss
import numpy as np
import torch
from lib.common import write_json
from lib.synthetic import DIM, Corpus1M, near
from threadpoolctl import threadpool_limits

from ehi.config import TreeConfig
from ehi.model.tree import Tree


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


def corpus_recall(args, L: int, quantizer, routers: dict) -> dict:
    """Index ``args.docs`` vectors once into lists = the flat leaves; every router searches them."""
    from unsupervised_scale import exact_top

    from ehi.budget import WidthSearch
    from ehi.evaluation.evaluate import neighbour_recall

    t = time.perf_counter()
    faiss.omp_set_num_threads(2)
    big = Corpus1M(args.docs, seed=0)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, L, faiss.METRIC_INNER_PRODUCT)
    for _, x in big.chunks():
        ivf.add(x)  # the exact nearest leaf: the flat tree's assignment
    sizes = np.array([ivf.invlists.list_size(i) for i in range(L)])
    rng = np.random.default_rng(2)
    pos = rng.choice(args.docs, args.test_queries, replace=False)
    q = near(big.rows(pos), rng, 1.2)
    truth = exact_top(big, q, 10)
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    print(f"  indexed {args.docs:,} vectors into {L} lists (max {sizes.max()}, {int((sizes == 0).sum())} empty) and exact top 10 in {build_s:.0f}s")

    def search(route, w):
        leaves = np.ascontiguousarray(route(q, w), dtype=np.int64)
        ivf.nprobe = leaves.shape[1]
        return ivf.search_preassigned(q, 100, leaves, np.zeros(leaves.shape, dtype=np.float32))[1]

    def measure(route, w):
        found = search(route, w)
        return (100 * float(neighbour_recall(found, truth, 10).mean()),
                100 * float(np.mean([p in row for p, row in zip(pos, found)])))

    def qps(route, w):
        return len(q) / (batched_us(lambda e: search(route, w), q, args.reps) * len(q) / 1e6)

    out = {"docs": args.docs, "test_queries": args.test_queries, "build_seconds": build_s, "rows": []}
    target = None
    for name, route in routers.items():
        ws = WidthSearch(lambda w, route=route: float(sizes[route(q, w)].sum(1).mean() / args.docs), L)
        row = {"method": name}
        for b in (0.01, 0.05):
            try:
                w = ws.largest_within(b)
            except (ValueError, RuntimeError, AssertionError):
                w = None
            if w is None:
                continue
            nr, r100 = measure(route, w)
            row[f"{b:g}"] = {"width": w, "visited": ws.fraction(w), "NR@10": nr, "R@100": r100, "qps": qps(route, w)}
        if target is None:
            target = row["0.01"]["NR@10"]
        w = 1  # the narrowest width reaching the flat tree's NR@10 at 1 %, searched up to 10 % visited
        while w < L and ws.fraction(w) <= 0.1 and measure(route, w)[0] < target:
            w = w + 1 if w < 16 else int(w * 1.15) + 1
        w = min(w, L)
        nr = measure(route, w)[0] if ws.fraction(w) <= 0.1 else None
        reached = nr is not None and nr >= target
        row["equal_recall"] = {"target_NR@10": target, "width": w, "NR@10": nr, "visited": ws.fraction(w), "qps": qps(route, w) if reached else None}
        out["rows"].append(row)
        cells = " | ".join(f"{b}: w {row[b]['width']} {100 * row[b]['visited']:.2f}% NR@10 {row[b]['NR@10']:.1f} R@100 {row[b]['R@100']:.1f} {row[b]['qps']:.0f} q/s"
                           for b in ("0.01", "0.05") if b in row)
        eq = row["equal_recall"]
        print(f"  {name:<44} {cells} | NR@10 {target:.1f}: w {eq['width']} {eq['qps'] or 0:.0f} q/s", flush=True)
    flat_eq = out["rows"][0]["equal_recall"]["qps"]
    for row in out["rows"]:
        if row["equal_recall"]["qps"]:
            row["equal_recall"]["qps_over_flat_tree"] = row["equal_recall"]["qps"] / flat_eq
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=65_536, help="documents k-means sees")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--docs", type=int, default=0, help="also index this many vectors and measure recall and QPS (e.g. 1000000)")
    ap.add_argument("--test-queries", type=int, default=1000)
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
        if args.docs:  # with a corpus: fewer fixed-cell rows (each is searched at every width)
            uppers = uppers[1::2]
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
        entry = {"leaves": L, "branching": B, "init_seconds": init_s, "rows": rows}
        if args.docs:
            routers = {f"flat tree ({L}, 1)": lambda e, w: fr.leaves(e, w)}
            for up in uppers:
                routers[f"deep tree ({B}, 2), {up} cells"] = lambda e, w, up=up: dr.leaves(e, w, upper=max(up, 1))
            # a beam per level calibrated on the routing queries above (not the test queries),
            # as EHIModel.calibrate does on training queries
            grid = sorted(set(list(range(1, min(L, 64) + 1)) + np.unique(np.geomspace(64, L, 32).astype(int)).tolist()))
            cal = dr.calibrate_upper(q, grid, 0.95)

            def calibrated(e, w):
                return dr.leaves(e, w, upper=cal[min(g for g in grid if g >= w)])

            routers[f"deep tree ({B}, 2), cells calibrated (agreement 0.95)"] = calibrated
            entry["calibrated_cells"] = {str(w): u for w, u in cal.items()}
            routers[f"Faiss IndexFlatIP quantizer ({L})"] = lambda e, w: fq.search(e, w)[1]
            for ef in (16, 64, 256):
                def hnsw(e, w, ef=ef):
                    hq.hnsw.efSearch = max(ef, w)
                    return hq.search(e, w)[1]
                routers[f"Faiss HNSW quantizer ({L}), efSearch {ef}"] = hnsw
            entry["corpus"] = corpus_recall(args, L, fq, routers)
        results.append(entry)
        print(f"\n{L} leaves ({B} x {B}), {args.queries} queries, one thread, bottom-up k-means start in {init_s:.0f}s")
        print(f"  {'method':<44} {'ms alone':>9} {'x flat':>7} {'us/q batched':>13} {'top leaf = flat':>16}")
        for r in rows:
            print(f"  {r['method']:<44} {r['ms_alone']:>9.3f} {r['speedup_over_flat_alone']:>7.1f} {r['us_batched']:>13.1f} {100 * r['agreement']:>15.1f}%")
    write_json(args.out, {"sample": args.sample, "queries": args.queries, "docs": args.docs, "results": results})


if __name__ == "__main__":
    main()
