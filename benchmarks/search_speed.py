"""Search speed and index size on SciFact: EHI against Faiss IndexIVFFlat / IndexIVFPQ with as
many lists as EHI has leaves, same run.

Every method gets the same query embeddings (encoding is the same cost for all and is left
out); EHI's time includes routing through the tree. Widths are chosen so that each method
visits about 2 % and about 10 % of the corpus (the shared budget rule). Reported per budget
and thread count (1, 2): single-query latency p50 / p99 over ``--single`` queries, and
batched QPS over all queries (median of ``--reps`` interleaved repetitions, so that machine
noise hits all alike). A third row scans *EHI's own leaves* with plain Faiss
(``search_preassigned`` given the leaves EHI's beam chose, routing excluded): the floor EHI's
Python layer is measured against. Then, per codec of EHI's index (flat, sq8, pq, pq with
exact re-rank) against Faiss IVFPQ: bytes of the index and Recall@100 on the test claims.

Then, **at equal Recall@100** (the user's comparison): for EHI's widths at 1 / 2 / 5 % of the
corpus, the fewest Faiss IVFFlat lists (and ScaNN leaves) whose Recall@100 on the ``--split``
queries reaches EHI's, and each method's batched QPS and single-query p50 there.

``--curves``: **recall against throughput**, as ann-benchmarks draws it. Every method swept over
its width (EHI and EHI + PQ: beam; Faiss IVFFlat and IVFPQ: nprobe, as many lists as EHI has
leaves; ScaNN: leaves searched; Faiss HNSW, M 32 and efConstruction 200: efSearch), each point
with Recall@100 and Recall@10 on the ``--split`` queries, batched QPS and single-query p50 on
one thread (encoding excluded), and each method's bytes; a 2 x 2 plot (R@100 and R@10 against
batched QPS and against p50, log scale) beside the JSON.

    python benchmarks/search_speed.py --model runs/scifact --out reports/search_speed.json
    python benchmarks/search_speed.py --model runs/scifact --curves-only --out benchmarks/results/curves_scifact.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np
from lib.common import write_json
from threadpoolctl import threadpool_limits

from ehi.budget import WidthSearch
from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.evaluation.baselines import IVFBaseline
from ehi.evaluation.evaluate import make_run, measure
from ehi.model.ehi_model import EHIModel
from ehi.training.trainer import train


def timed_each(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def pct(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--model", help="trained model directory (default: train one with the defaults)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--single", type=int, default=300, help="queries timed one at a time, per repetition")
    ap.add_argument("--split", default="test", help="judged queries for the equal-recall comparison")
    ap.add_argument("--max-queries", type=int, default=2000, help="queries timed (a sample of the dataset's, seeded)")
    ap.add_argument("--skip-codecs", action="store_true")
    ap.add_argument("--curves-only", action="store_true", help="only the recall-QPS curves of every method")
    ap.add_argument("--out", default="reports/search_speed.json")
    args = ap.parse_args()

    ds = load_beir(args.data)
    model = EHIModel.load(args.model) if args.model else train(ds, EHIConfig(), progress=False)
    if args.curves_only:
        out = recall_qps_curves(model, ds, args.split, args.reps, args.single)
        write_json(args.out, out)
        plot_curves(out, args.out.rsplit(".", 1)[0] + ".png", f"{ds.root.name} ({args.split}): {out['documents']:,} documents, {out['queries']} queries")
        return
    qids = sorted(ds.queries)
    if len(qids) > args.max_queries:
        qids = sorted(np.random.default_rng(0).choice(qids, args.max_queries, replace=False).tolist())
    q = np.ascontiguousarray(model.encoder.embed_all(model.encoder.features([ds.queries[i] for i in qids], "encoding queries")))
    d = np.ascontiguousarray(model.index.vectors, dtype=np.float32)
    L = model.tree.num_leaves
    ivf = IVFBaseline(d, L, seed=0)
    plain = model.index.ivf  # EHI's leaves as a plain Faiss index, for the floor

    ehi_w = WidthSearch(lambda w: model.visited_fraction(q, w), L)
    ivf_w = WidthSearch(lambda w: ivf.visited_fraction(q, w), L)
    with model.sweeping():  # the widths only: every timed search below routes afresh
        widths = {b: (ehi_w.largest_within(b), ivf_w.largest_within(b)) for b in (0.02, 0.10)}
    results = {"queries": len(q), "documents": len(d), "leaves": L, "faiss": faiss.__version__, "budgets": {},
               "spread_search": {"basis": model.config.index.spread_basis, "candidates_per_beam": model.config.index.spread_candidates}}
    ic = model.config.index

    def every_leaf(fn):
        """``fn`` with every leaf's spread scored exactly (the router before candidates)."""
        def run(*a):
            saved, ic.spread_candidates = ic.spread_candidates, 0.0
            try:
                return fn(*a)
            finally:
                ic.spread_candidates = saved
        return run

    for budget in (0.02, 0.10):
        bw, iw = widths[budget]
        if bw is None or iw is None:  # a leaf of this corpus holds more than the budget
            print(f"≤{budget:.0%}: no width of {'EHI' if bw is None else 'IVFFlat'} visits within it; skipped")
            continue
        row = {"ehi_beam": bw, "ivf_nprobe": iw, "ehi_visited": ehi_w.fraction(bw), "ivf_visited": ivf_w.fraction(iw)}
        ehi_leaves = model.route(q, bw)
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)
            limits = threadpool_limits(limits=threads)
            ivf.index.nprobe = iw
            params = faiss.SearchParametersIVF()
            params.nprobe = bw

            methods = {
                "ehi": (lambda i: model.search_embeddings(q[i : i + 1], 100, bw), lambda: model.search_embeddings(q, 100, bw)),
                "faiss_ivfflat": (lambda i: ivf.index.search(q[i : i + 1], 100), lambda: ivf.index.search(q, 100)),
                "faiss_on_ehi_leaves": (
                    lambda i: plain.search_preassigned(q[i : i + 1], 100, ehi_leaves[i : i + 1], None),
                    lambda: plain.search_preassigned(q, 100, ehi_leaves, None),
                ),
                "ehi_every_leaf_scored": (every_leaf(lambda i: model.search_embeddings(q[i : i + 1], 100, bw)),
                                          every_leaf(lambda: model.search_embeddings(q, 100, bw))),
                # routing alone against the Faiss quantizer's lookup of as many lists
                "ehi_route": (lambda i: model.route(q[i : i + 1], bw), lambda: model.route(q, bw)),
                "faiss_quantizer": (lambda i: ivf.index.quantizer.search(q[i : i + 1], bw), lambda: ivf.index.quantizer.search(q, bw)),
            }
            plain.nprobe = bw
            for single, batch in methods.values():  # warm-up
                batch(), single(0)
            lat = {m: [] for m in methods}
            bat = {m: [] for m in methods}
            for _ in range(args.reps):  # interleaved
                for m, (single, batch) in methods.items():
                    lat[m] += timed_each(single, args.single)
                    t = time.perf_counter()
                    batch()
                    bat[m].append(time.perf_counter() - t)
            limits.restore_original_limits()
            r = {
                m: {"p50_ms": pct(lat[m], 50), "p99_ms": pct(lat[m], 99), "batched_qps": len(q) / statistics.median(bat[m])}
                for m in methods
            }
            r["latency_ratio_ehi_over_ivfflat"] = r["ehi"]["p50_ms"] / r["faiss_ivfflat"]["p50_ms"]
            r["qps_ratio_ehi_over_ivfflat"] = r["ehi"]["batched_qps"] / r["faiss_ivfflat"]["batched_qps"]
            r["route_ratio_over_quantizer"] = r["ehi_route"]["p50_ms"] / r["faiss_quantizer"]["p50_ms"]
            row[f"threads={threads}"] = r
        results["budgets"][f"{budget:g}"] = row
    faiss.omp_set_num_threads(2)

    results["equal_recall"] = equal_recall(model, ds, args.split, ivf, args.reps, args.single)
    if args.skip_codecs:
        write_json(args.out, results)
        return

    # ---- codecs: bytes and recall at ~10 % visited -----------------------------------------
    test = ds.split("test")
    tq = [i for i in qids if i in test]
    pos = {i: n for n, i in enumerate(qids)}
    rows = np.array([pos[i] for i in tq], dtype=np.int64)
    qrels = {i: test[i] for i in tq}
    raw = len(d) * d.shape[1] * 4
    codecs = {}
    bw = ehi_w.largest_within(0.10)
    variants = {"flat": ("flat", 0, 0), "sq8": ("sq8", 0, 0), "pq48": ("pq", 48, 0), "pq48+rerank200": ("pq", 48, 200)}
    for name, (codec, m, rr) in variants.items():
        model.config.index.codec, model.config.index.pq_m, model.config.index.rerank = codec, m, rr
        model.build_index(d, model.doc_ids, model.doc_titles)
        res, _ = model.search_embeddings(q[rows], 100, bw)
        r100 = measure(qrels, make_run(tq, res.indices, res.scores, model.doc_ids))["R@100"]
        codecs[name] = {"bytes": model.index.nbytes(), "x_raw": model.index.nbytes() / raw, "R@100": r100}
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d.shape[1]), d.shape[1], L, 48, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(d)
    pq.add(d)
    pq.nprobe = ivf_w.largest_within(0.10)
    D, I = pq.search(q[rows], 100)
    ivf.index.nprobe = pq.nprobe
    D2, I2 = ivf.index.search(q[rows], 100)
    codecs["faiss IVFFlat"] = {"bytes": raw + L * d.shape[1] * 4 + len(d) * 8, "R@100": measure(qrels, make_run(tq, I2, D2, model.doc_ids))["R@100"]}
    codecs["faiss IVFPQ48"] = {"bytes": len(d) * (48 + 8) + L * d.shape[1] * 4, "R@100": measure(qrels, make_run(tq, I, D, model.doc_ids))["R@100"]}
    for v in codecs.values():
        v["x_raw"] = v["bytes"] / raw
    results["codecs_at_10pct"] = codecs

    print(f"SciFact search: {len(q)} queries, {len(d)} documents, {L} leaves/lists, k=100, encoding excluded")
    print(f"{'budget':>6} {'thr':>3} {'method':<22} {'visited':>8} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>8}")
    for b, row in results["budgets"].items():
        for threads in (1, 2):
            r = row[f"threads={threads}"]
            for m in ("ehi", "ehi_every_leaf_scored", "faiss_ivfflat", "faiss_on_ehi_leaves", "ehi_route", "faiss_quantizer"):
                vis = row["ivf_visited"] if m == "faiss_ivfflat" else row["ehi_visited"]
                print(f"{100 * float(b):>5.0f}% {threads:>3} {m:<22} {100 * vis:>7.1f}% {r[m]['p50_ms']:>8.3f} {r[m]['p99_ms']:>8.3f} {r[m]['batched_qps']:>8.0f}")
            print(f"{'':>11} EHI / IVFFlat: latency {r['latency_ratio_ehi_over_ivfflat']:.2f}x, QPS {r['qps_ratio_ehi_over_ivfflat']:.2f}x; "
                  f"routing / quantizer lookup (single query) {r['route_ratio_over_quantizer']:.2f}x")
    print(f"\ncodecs at ~10 % visited (test claims): {'bytes':>10} {'x raw':>6} {'R@100':>6}")
    for name, c in codecs.items():
        print(f"  {name:<36} {c['bytes']:>10,} {c['x_raw']:>6.3f} {c['R@100']:>6.1f}")
    write_json(args.out, results)


def equal_recall(model, ds, split: str, ivf: IVFBaseline, reps: int, single: int) -> dict:
    """EHI at its 1 / 2 / 5 % widths against the fewest IVF lists and ScaNN leaves reaching its
    Recall@100 on the split's judged queries; batched QPS and single-query p50 of each (2 threads)."""
    from ehi.evaluation.baselines import ScaNNBaseline

    rel = ds.relevant(split)
    jq = sorted(rel)
    qrels = {i: ds.split(split)[i] for i in jq}
    qe = np.ascontiguousarray(model.encoder.embed_all(model.encoder.features([ds.queries[i] for i in jq], "encoding queries")))
    L = model.tree.num_leaves
    sc = ScaNNBaseline(np.ascontiguousarray(model.index.vectors, dtype=np.float32), L)
    ids = model.doc_ids

    def recall(idx, scores):
        return measure(qrels, make_run(jq, idx, scores, ids))["R@100"]

    def ivf_search(w):
        ivf.index.nprobe = w
        D, I = ivf.index.search(qe, 100)
        return I, D

    def fewest(search, target):
        lo, hi = 1, L  # recall grows with the width: the smallest width reaching the target
        if recall(*search(hi)) < target - 1e-9:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if recall(*search(mid)) >= target - 1e-9:
                hi = mid
            else:
                lo = mid + 1
        return lo

    ehi_w = WidthSearch(lambda w: model.visited_fraction(qe, w), L)
    out = {"queries": len(jq), "split": split, "budgets": {}}
    faiss.omp_set_num_threads(2)
    for budget in (0.01, 0.02, 0.05):
        bw = ehi_w.largest_within(budget)
        if bw is None:
            continue
        res, _ = model.search_embeddings(qe, 100, bw)
        target = recall(res.indices, res.scores)
        iw = fewest(ivf_search, target)
        sw = fewest(lambda w: sc.search(qe, 100, w)[:2], target)
        row = {"ehi_beam": bw, "ehi_visited": ehi_w.fraction(bw), "ehi_R@100": target, "ivf_nprobe": iw, "scann_leaves": sw}
        if iw is not None:
            row["ivf_visited"] = ivf.visited_fraction(qe, iw)
        methods = {"ehi": (lambda i: model.search_embeddings(qe[i : i + 1], 100, bw), lambda: model.search_embeddings(qe, 100, bw))}
        if iw is not None:
            methods["faiss_ivfflat"] = (lambda i: ivf.index.search(qe[i : i + 1], 100), lambda: ivf.index.search(qe, 100))
        if sw is not None:
            methods["scann"] = (lambda i: sc.searcher.search_batched(qe[i : i + 1], final_num_neighbors=100, leaves_to_search=sw),
                                lambda: sc.searcher.search_batched(qe, final_num_neighbors=100, leaves_to_search=sw))
        if iw is not None:
            ivf.index.nprobe = iw
        for one, batch in methods.values():
            batch(), one(0)
        lat = {m: [] for m in methods}
        bat = {m: [] for m in methods}
        n = min(single, len(qe))
        for _ in range(reps):
            for m, (one, batch) in methods.items():
                lat[m] += timed_each(one, n)
                t = time.perf_counter()
                batch()
                bat[m].append(time.perf_counter() - t)
        for m in methods:
            row[m] = {"p50_ms": pct(lat[m], 50), "batched_qps": len(qe) / statistics.median(bat[m])}
        for m in ("faiss_ivfflat", "scann"):
            if m in row:
                row[f"qps_ratio_ehi_over_{m}"] = row["ehi"]["batched_qps"] / row[m]["batched_qps"]
                row[f"p50_ratio_ehi_over_{m}"] = row["ehi"]["p50_ms"] / row[m]["p50_ms"]
        out["budgets"][f"{budget:g}"] = row
        print(f"equal recall at EHI's {budget:.0%} width (beam {bw}, R@100 {target:.1f}): IVF nprobe {iw}, ScaNN leaves {sw}; "
              + "; ".join(f"{m} QPS {row[m]['batched_qps']:.0f} p50 {row[m]['p50_ms']:.3f} ms" for m in methods)
              + "".join(f"; EHI/{m} QPS {row[f'qps_ratio_ehi_over_{m}']:.2f}x" for m in ("faiss_ivfflat", "scann") if m in row), flush=True)
    return out


def recall_qps_curves(model, ds, split: str, reps: int, single: int) -> dict:
    """Every method over its width: R@100, R@10, batched QPS and single-query p50 on one thread."""
    from ehi.evaluation.baselines import HNSWBaseline, ScaNNBaseline

    rel = ds.relevant(split)
    jq = sorted(rel)
    qrels = {i: ds.split(split)[i] for i in jq}
    qe = np.ascontiguousarray(model.encoder.embed_all(model.encoder.features([ds.queries[i] for i in jq], "encoding queries")))
    d = np.ascontiguousarray(model.index.vectors, dtype=np.float32)
    n, dim = d.shape
    L = model.tree.num_leaves
    ids = model.doc_ids
    widths = [w for w in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024) if w <= L]
    router_bytes = sum(p.numel() * 4 for p in model.tree.parameters())
    ivf = IVFBaseline(d, L, seed=0)
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, L, 48, 8, faiss.METRIC_INNER_PRODUCT)
    ivfpq.cp.min_points_per_centroid = 1  # as many lists as EHI has leaves, as IVFBaseline does
    ivfpq.pq.cp.min_points_per_centroid = 1  # 256 codes per sub-quantizer on a small corpus: the recall is what is measured
    ivfpq.train(d)
    ivfpq.add(d)
    sc = ScaNNBaseline(d, L)
    hn = HNSWBaseline(d)
    ehi_flat = model.index
    ic = model.config.index
    saved = ic.codec, ic.pq_m, ic.rerank  # values: ic is the config object being changed
    ic.codec, ic.pq_m, ic.rerank = "pq", 48, 200
    ehi_pq = model.build_index(d, model.doc_ids, model.doc_titles)
    ic.codec, ic.pq_m, ic.rerank = saved

    def ehi_with(index, router=None):
        def run(q, w):
            model.index = index
            ic.router = router or shipped_router
            try:
                return model.search_embeddings(q, 100, w)[0]
            finally:
                ic.router = shipped_router
        return lambda q, w: (lambda r: (r.indices, r.scores))(run(q, w))

    shipped_router = ic.router
    sk = model.leaf_sketch()
    sketch_bytes = sk.means.nbytes + sk.spread.nbytes

    def ivf_with(index):
        def run(q, w):
            index.nprobe = w
            D, I = index.search(q, 100)
            return I, D
        return run

    def hnsw(q, w):
        p = faiss.SearchParametersHNSW()
        p.efSearch = w
        D, I = hn.index.search(q, 100, params=p)
        return I, D

    methods = {  # name -> (search(q, width), widths, bytes)
        "EHI": (ehi_with(ehi_flat, "spread"), widths, ehi_flat.nbytes() + router_bytes + sketch_bytes),
        "EHI (tree router)": (ehi_with(ehi_flat, "tree"), widths, ehi_flat.nbytes() + router_bytes),
        "EHI + PQ48 (re-rank 200)": (ehi_with(ehi_pq, "spread"), widths, ehi_pq.nbytes() + router_bytes + sketch_bytes),
        "Faiss IVFFlat": (ivf_with(ivf.index), widths, n * dim * 4 + n * 8 + L * dim * 4),
        "Faiss IVFPQ48": (ivf_with(ivfpq), widths, n * (48 + 8) + L * dim * 4 + 48 * 256 * (dim // 48) * 4),
        "ScaNN": (lambda q, w: sc.searcher.search_batched(q, final_num_neighbors=100, leaves_to_search=w), widths, n * dim * 4 + L * dim * 4),
        "Faiss HNSW (M 32)": (hnsw, [16, 32, 64, 100, 128, 200, 256, 400, 512, 800, 1024, 2048], hn.nbytes()),
    }
    out = {"split": split, "queries": len(jq), "documents": n, "leaves": L, "threads": 1, "k": 100,
           "note": "EHI + PQ re-ranks its top 200 with the float32 vectors (memory-mapped from the model), not counted in its bytes",
           "methods": {}}
    faiss.omp_set_num_threads(1)
    limits = threadpool_limits(limits=1)
    nq = min(single, len(qe))
    try:
        for name, (search, ws, nbytes) in methods.items():
            points = []
            for w in ws:
                idx, scores = search(qe, w)
                m = measure(qrels, make_run(jq, np.asarray(idx), np.asarray(scores), ids))
                search(qe[:1], w)  # warm-up
                lat, bat = [], []
                for _ in range(reps):
                    lat += timed_each(lambda i: search(qe[i : i + 1], w), nq)
                    t = time.perf_counter()
                    search(qe, w)
                    bat.append(time.perf_counter() - t)
                points.append({"width": w, "R@100": m["R@100"], "R@10": m["R@10"], "batched_qps": len(qe) / statistics.median(bat),
                               "p50_ms": pct(lat, 50)})
            out["methods"][name] = {"bytes": int(nbytes), "points": points}
            print(f"{name:<26} {nbytes / 2**20:7.1f} MiB | " + "  ".join(
                f"w{p['width']}: R@100 {p['R@100']:.1f} {p['batched_qps']:.0f} QPS {p['p50_ms']:.3f} ms" for p in points[:: max(1, len(points) // 5)]), flush=True)
    finally:
        limits.restore_original_limits()
        faiss.omp_set_num_threads(2)
        model.index = ehi_flat
    out["at_recall"] = at_recall(out)
    return out


def at_recall(out: dict, targets=(80, 85, 90, 93)) -> dict:
    """Per R@100 target: each method's best batched QPS and best single-query p50 among the
    widths that reach it (None: none does), printed as a table."""
    table = {}
    print(f"\n{'R@100 >=':<10}" + "".join(f"{m[:22]:>24}" for m in out["methods"]) + "   (batched QPS / p50 us)")
    for t in targets:
        row = {}
        for name, m in out["methods"].items():
            pts = [p for p in m["points"] if p["R@100"] >= t]
            row[name] = {"batched_qps": max(p["batched_qps"] for p in pts), "p50_ms": min(p["p50_ms"] for p in pts)} if pts else None
        table[str(t)] = row
        cells = [f"{c['batched_qps']:.0f} / {1000 * c['p50_ms']:.0f}" if c else "-" for c in row.values()]
        print(f"{t:<10}" + "".join(f"{c:>24}" for c in cells))
    return table


def plot_curves(out: dict, path: str, title: str) -> None:
    """R@100 and R@10 against batched QPS and single-query p50 (log scale), one line a method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, measure_name in enumerate(("R@100", "R@10")):
        for col, (x, label) in enumerate((("batched_qps", "batched queries per second (1 thread)"), ("p50_ms", "single-query p50 latency, ms (1 thread)"))):
            ax = axes[row][col]
            for name, m in out["methods"].items():
                pts = m["points"]
                ax.plot([p[x] for p in pts], [p[measure_name] for p in pts], marker="o", ms=3, label=f"{name} ({m['bytes'] / 2**20:.1f} MiB)")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{measure_name} ({out['split']})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title + "; encoding excluded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
