"""1M-vector scale benchmark: EHI (default B=1024, H=1) against Faiss IVFFlat / IVFPQ with as many lists.

A synthetic clustered corpus of N x 384 float32 vectors, generated chunk by chunk from a seed
(never stored), with queries drawn near their positive document. Both methods train on a
sample (EHI: adapter + tree on 20k training pairs plus a 100k-document sample, bring-your-
own-embedding mode; IVF: k-means on the same sample) and then index the full corpus
streaming. Reported: train + build time, peak memory of the build (peak RSS during the build
minus RSS before it, against the raw float32 corpus), batched QPS at 1 and 2 threads
(interleaved repetitions, median) and Recall@100 at 1 % and 5 % of the corpus visited; the
widths at which IVFFlat matches EHI's recall at 1 % (speed at equal recall); the time to add
1 % more documents against the full build; and per codec of EHI's index (flat, sq8, pq with
exact re-rank) against Faiss IVFPQ: bytes and Recall@100 (and QPS, routing included, for pq
with re-rank). ``--hnsw``: Faiss IndexHNSWFlat (M 32, efConstruction 200) over the same
vectors as IVF, efSearch swept (Recall@100, batched QPS at 1 and 2 threads, bytes), and at
EHI's 1 % and 5 % widths the smallest efSearch reaching EHI's Recall@100, both timed
interleaved there.

    python benchmarks/scale.py --out reports/scale.json            # N = 1,000,000
    python benchmarks/scale.py --docs 100000 --out reports/scale-100k.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np
import torch
from lib.common import write_json
from lib.synthetic import DIM, Corpus1M, build_streaming, near, proc_status, recall_at_100, release_memory, reset_peak, train_on_sample
from threadpoolctl import threadpool_limits

from ehi.budget import WidthSearch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--branching", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1)
    ap.add_argument("--pq-m", type=int, default=48)
    ap.add_argument("--rerank", type=int, default=200)
    ap.add_argument("--train-pairs", type=int, default=20_000)
    ap.add_argument("--sample", type=int, default=100_000, help="documents both methods train on")
    ap.add_argument("--test-queries", type=int, default=2_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--query-spread", type=float, default=1.2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hnsw", action="store_true", help="also Faiss HNSW (M 32, efConstruction 200): its curve and equal-recall QPS")
    ap.add_argument("--out", default="reports/scale.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)

    rng = np.random.default_rng(args.seed)
    corpus = Corpus1M(args.docs, seed=args.seed)
    raw_gib = args.docs * DIM * 4 / 2**30
    L = args.branching**args.height
    out: dict = {"docs": args.docs, "dim": DIM, "raw_gib": raw_gib, "leaves": L, "args": vars(args)}

    # ---- shared training material: a document sample and train pairs ----------------------
    t = time.perf_counter()
    train_pos = rng.choice(args.docs, size=args.train_pairs, replace=False)
    sample = np.union1d(train_pos, rng.choice(args.docs, size=args.sample, replace=False))
    sample_x = corpus.rows(sample)
    row_of = {int(d): i for i, d in enumerate(sample)}
    train_q = near(corpus.rows(train_pos), rng, args.query_spread)
    test_pos = rng.choice(args.docs, size=args.test_queries, replace=False)
    test_q = near(corpus.rows(test_pos), rng, args.query_spread)
    out["generate_seconds"] = time.perf_counter() - t

    # ---- EHI: train on the sample, index the full corpus streaming --------------------------
    rss0 = proc_status("VmRSS")
    reset_peak()
    t = time.perf_counter()
    model = train_on_sample(sample_x, row_of, train_pos, train_q, args)
    ehi_train = time.perf_counter() - t
    release_memory()
    t = time.perf_counter()
    model.index = build_streaming(model, corpus, L, "flat", sample_x, args)
    ehi_build = time.perf_counter() - t
    ehi_peak = proc_status("VmHWM") - rss0
    st = model.index.leaf_stats()
    out["ehi"] = {"train_seconds": ehi_train, "build_seconds": ehi_build, "peak_gib": ehi_peak, "leaf_stats": st}
    print(f"EHI: train {ehi_train:.0f}s, build {ehi_build:.0f}s, peak +{ehi_peak:.2f} GiB, leaves {st['min']}..{st['max']} ({st['empty']} empty)", flush=True)

    # ---- Faiss IVFFlat(L): k-means on the same sample, add the corpus streaming ----------------
    rss1 = proc_status("VmRSS")
    reset_peak()
    t = time.perf_counter()
    quantizer = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quantizer, DIM, L, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = args.seed
    ivf.train(sample_x)
    ivf_train = time.perf_counter() - t
    t = time.perf_counter()
    for _, x in corpus.chunks():
        ivf.add(x)
    ivf_build = time.perf_counter() - t
    ivf_peak = proc_status("VmHWM") - rss1
    sizes = np.array([ivf.invlists.list_size(i) for i in range(L)])
    out["ivf"] = {"train_seconds": ivf_train, "build_seconds": ivf_build, "peak_gib": ivf_peak, "list_max": int(sizes.max()), "list_empty": int((sizes == 0).sum())}
    print(f"IVF: train {ivf_train:.0f}s, build {ivf_build:.0f}s, peak +{ivf_peak:.2f} GiB", flush=True)
    sample_x_for_codecs = sample_x[:50_000].copy()
    del sample_x

    # ---- budgets, recall and QPS (1 and 2 threads), interleaved ---------------------------------
    q_ehi = model.encoder.embed_vectors(test_q)
    ehi_w = WidthSearch(lambda w: model.visited_fraction(q_ehi, w), L)
    ivf_w = WidthSearch(lambda w: float(sizes[quantizer.search(test_q, w)[1]].sum(1).mean() / args.docs), L)

    def ivf_recall(nprobe):
        ivf.nprobe = nprobe
        return recall_at_100(ivf.search(test_q, 100)[1], test_pos)

    out["budgets"] = {}
    with model.sweeping():  # the widths only: every timed search below routes afresh
        widths = {b: (ehi_w.largest_within(b), ivf_w.largest_within(b)) for b in (0.01, 0.05)}
    out["spread_search"] = {"basis": model.config.index.spread_basis, "candidates_per_beam": model.config.index.spread_candidates}
    for budget in (0.01, 0.05):
        bw, iw = widths[budget]
        res, _ = model.search_embeddings(q_ehi, 100, bw)
        row = {
            "ehi_beam": bw, "ivf_nprobe": iw,
            "ehi_visited": ehi_w.fraction(bw), "ivf_visited": ivf_w.fraction(iw),
            "ehi_recall@100": recall_at_100(res.indices, test_pos),
            "ivf_recall@100": ivf_recall(iw),
        }
        # the narrowest IVF search that recalls as much as EHI does here: speed at equal recall
        eq = iw
        while eq < L and ivf_recall(eq) < row["ehi_recall@100"]:
            eq = min(L, eq + 1 if eq < 16 else int(eq * 1.1) + 1)
        row["ivf_nprobe_equal_recall"], row["ivf_recall_equal"] = eq, ivf_recall(eq)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            limits = threadpool_limits(limits=threads)  # numpy's BLAS too (EHI routes with it)
            te, ti, tq = [], [], []
            for _ in range(args.reps):
                t = time.perf_counter()
                model.search_embeddings(q_ehi, 100, bw)
                te.append(time.perf_counter() - t)
                ivf.nprobe = iw
                t = time.perf_counter()
                ivf.search(test_q, 100)
                ti.append(time.perf_counter() - t)
                ivf.nprobe = eq
                t = time.perf_counter()
                ivf.search(test_q, 100)
                tq.append(time.perf_counter() - t)
            limits.restore_original_limits()
            n = len(test_q)
            row[f"threads={threads}"] = {
                "ehi_qps": n / statistics.median(te), "ivf_qps": n / statistics.median(ti), "ivf_qps_equal_recall": n / statistics.median(tq),
            }
            r = row[f"threads={threads}"]
            r["qps_ratio_same_visited"] = r["ehi_qps"] / r["ivf_qps"]
            r["qps_ratio_equal_recall"] = r["ehi_qps"] / r["ivf_qps_equal_recall"]
        out["budgets"][f"{budget:g}"] = row
    faiss.omp_set_num_threads(2)
    if args.hnsw:
        out["hnsw"] = hnsw_rows(corpus, test_q, test_pos, out["budgets"], lambda bw: model.search_embeddings(q_ehi, 100, bw), args)
        release_memory()
    # routing alone, for the QPS of the codecs (their scans are timed below, once the flat index is gone)
    bw1 = out["budgets"]["0.01"]["ehi_beam"]
    route_s = {threads: statistics.median([timed(lambda: model.route(q_ehi, bw1), threads) for _ in range(args.reps)]) for threads in (1, 2)}
    faiss.omp_set_num_threads(2)

    # ---- incremental add: 1 % more documents against the full build --------------------------
    extra = Corpus1M(args.docs // 100, seed=args.seed + 1)
    ext = [x for _, x in extra.chunks()]
    t = time.perf_counter()
    for x in ext:  # embed, route, append to the lists: O(new documents)
        e = model.encoder.embed_vectors(x)
        model.index.add(e, model.place(e, 1))
    out["add_1pct_seconds"] = time.perf_counter() - t
    out["add_1pct_over_build"] = out["add_1pct_seconds"] / ehi_build

    # ---- codecs: bytes and recall at 1 % visited (EHI's leaves; re-rank from float vectors) ----
    bw = out["budgets"]["0.01"]["ehi_beam"]
    codecs = {"flat": {"bytes": model.index.nbytes(), "R@100": out["budgets"]["0.01"]["ehi_recall@100"]}}
    leaves = model.route(q_ehi, bw)  # routed before the index goes: the spread router reads it
    model.index = None
    release_memory()
    for codec, rerank in (("sq8", 0), ("pq", args.rerank), ("pq", 0)):
        args_c = argparse.Namespace(**{**vars(args), "rerank": rerank})
        t = time.perf_counter()
        idx = build_streaming(model, corpus, L, codec, sample_x_for_codecs, args_c)
        build_s = time.perf_counter() - t
        res = idx.search(q_ehi, leaves, 100)
        name = codec if codec != "pq" else f"pq{idx.pq_m}" + (f"+rerank{rerank}" if rerank else "")
        codecs[name] = {"bytes": idx.nbytes(), "R@100": recall_at_100(res.indices, test_pos), "build_seconds": build_s}
        if codec == "pq" and rerank:  # QPS = queries / (routing + scan and re-rank)
            for threads in (1, 2):
                scan_s = statistics.median([timed(lambda idx=idx: idx.search(q_ehi, leaves, 100), threads) for _ in range(args.reps)])
                codecs[name][f"qps_threads={threads}"] = len(q_ehi) / (route_s[threads] + scan_s)
            faiss.omp_set_num_threads(2)
        del idx
        release_memory()
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(DIM), DIM, L, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    pq.cp.seed = args.seed
    pq.train(sample_x_for_codecs)
    for _, x in corpus.chunks():
        pq.add(x)
    pq.nprobe = out["budgets"]["0.01"]["ivf_nprobe"]
    codecs[f"faiss IVFPQ{args.pq_m}"] = {"bytes": pq.ntotal * (pq.code_size + 8) + L * DIM * 4, "R@100": recall_at_100(pq.search(test_q, 100)[1], test_pos)}
    codecs["faiss IVFFlat"] = {"bytes": args.docs * (DIM * 4 + 8) + L * DIM * 4, "R@100": out["budgets"]["0.01"]["ivf_recall@100"]}
    raw = args.docs * DIM * 4
    for c in codecs.values():
        c["x_raw"] = c["bytes"] / raw
    out["codecs_at_1pct"] = codecs

    print(f"\n{args.docs:,} x {DIM} float32 ({raw_gib:.2f} GiB raw), {L} leaves / lists, {len(test_q)} queries, 1 thread")
    print(f"{'method':<8} {'train s':>8} {'build s':>8} {'peak GiB':>9} {'x raw':>6}")
    for m in ("ehi", "ivf"):
        r = out[m]
        print(f"{m.upper():<8} {r['train_seconds']:>8.0f} {r['build_seconds']:>8.0f} {r['peak_gib']:>9.2f} {r['peak_gib'] / raw_gib:>6.2f}")
    print(f"\n{'budget':>7} {'EHI vis':>8} {'IVF vis':>8} {'EHI R@100':>10} {'IVF R@100':>10} {'thr':>4} {'EHI QPS':>8} {'IVF QPS':>8} {'ratio':>6}  {'IVF nprobe, R@100, QPS at equal recall':>40} {'ratio':>6}")
    for b, r in out["budgets"].items():
        for threads in (1, 2):
            x = r[f"threads={threads}"]
            print(
                f"{100 * float(b):>6.0f}% {100 * r['ehi_visited']:>7.2f}% {100 * r['ivf_visited']:>7.2f}% "
                f"{r['ehi_recall@100']:>10.1f} {r['ivf_recall@100']:>10.1f} {threads:>4} {x['ehi_qps']:>8.0f} {x['ivf_qps']:>8.0f} {x['qps_ratio_same_visited']:>6.2f}  "
                f"{r['ivf_nprobe_equal_recall']:>22} {r['ivf_recall_equal']:>6.1f} {x['ivf_qps_equal_recall']:>10.0f} {x['qps_ratio_equal_recall']:>6.2f}"
            )
    print(f"\nadd 1 % more documents: {out['add_1pct_seconds']:.2f}s = {100 * out['add_1pct_over_build']:.1f} % of the full build ({ehi_build:.0f}s)")
    print(f"\ncodecs at 1 % visited: {'bytes':>14} {'x raw':>6} {'R@100':>6}")
    for name, c in out["codecs_at_1pct"].items():
        print(f"  {name:<20} {c['bytes']:>14,} {c['x_raw']:>6.3f} {c['R@100']:>6.1f}" + "".join(f"  QPS {c[f'qps_threads={t}']:.0f} ({t} thr)" for t in (1, 2) if f"qps_threads={t}" in c))
    if "hnsw" in out:
        h = out["hnsw"]
        print(f"\nFaiss HNSW (M 32, efConstruction 200): build {h['build_seconds']:.0f}s, {h['bytes']:,} bytes")
        for pt in h["points"]:
            print(f"  efSearch {pt['ef_search']:>4}: R@100 {pt['R@100']:.1f}, QPS {pt['qps_threads=1']:.0f} / {pt['qps_threads=2']:.0f} (1 / 2 threads)")
        for b, eq in h["equal_recall"].items():
            if eq is None:
                print(f"  at EHI's {100 * float(b):.0f} % width: no efSearch reaches its Recall@100")
                continue
            print(f"  at EHI's {100 * float(b):.0f} % width: efSearch {eq['ef_search']} (R@100 {eq['R@100']:.1f}); "
                  + ", ".join(f"EHI / HNSW QPS {eq[f'ehi_qps_threads={t}'] / eq[f'hnsw_qps_threads={t}']:.2f}x ({t} thr)" for t in (1, 2)))
    write_json(args.out, out)


def timed(fn, threads: int) -> float:
    """Seconds one call of ``fn`` takes with Faiss and numpy's BLAS held to ``threads``."""
    faiss.omp_set_num_threads(threads)
    limits = threadpool_limits(limits=threads)
    t = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t
    limits.restore_original_limits()
    return elapsed


def hnsw_rows(corpus, test_q, test_pos, budgets, ehi_search, args, efs=(100, 128, 192, 256, 384, 512)) -> dict:
    """Faiss HNSW over the corpus: build time, bytes, a curve over efSearch (Faiss searches with
    max(efSearch, k), so 100 is its narrowest at k = 100), and at each of EHI's widths the
    smallest efSearch reaching EHI's Recall@100, timed interleaved with EHI there."""
    faiss.omp_set_num_threads(2)
    index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    t = time.perf_counter()
    for _, x in corpus.chunks():
        index.add(x)
    build = time.perf_counter() - t
    graph = sum(faiss.vector_to_array(v).nbytes for v in (index.hnsw.neighbors, index.hnsw.offsets, index.hnsw.levels))
    out = {"build_seconds": build, "bytes": index.ntotal * DIM * 4 + graph, "points": [], "equal_recall": {}}

    def params(ef):
        p = faiss.SearchParametersHNSW()
        p.efSearch = ef
        return p

    for ef in efs:
        pt = {"ef_search": ef, "R@100": recall_at_100(index.search(test_q, 100, params=params(ef))[1], test_pos)}
        for threads in (1, 2):
            pt[f"qps_threads={threads}"] = len(test_q) / statistics.median([timed(lambda: index.search(test_q, 100, params=params(ef)), threads) for _ in range(args.reps)])
        out["points"].append(pt)
        print(f"HNSW efSearch {ef}: R@100 {pt['R@100']:.1f}", flush=True)
    for b, row in budgets.items():
        eq = next((pt for pt in out["points"] if pt["R@100"] >= row["ehi_recall@100"] - 1e-9), None)
        if eq is None:
            out["equal_recall"][b] = None
            continue
        eq = {"ef_search": eq["ef_search"], "R@100": eq["R@100"], "ehi_R@100": row["ehi_recall@100"]}
        for threads in (1, 2):
            te, th = [], []
            for _ in range(args.reps):  # interleaved
                te.append(timed(lambda: ehi_search(row["ehi_beam"]), threads))
                th.append(timed(lambda: index.search(test_q, 100, params=params(eq["ef_search"])), threads))
            eq[f"ehi_qps_threads={threads}"] = len(test_q) / statistics.median(te)
            eq[f"hnsw_qps_threads={threads}"] = len(test_q) / statistics.median(th)
        out["equal_recall"][b] = eq
    faiss.omp_set_num_threads(2)
    return out


if __name__ == "__main__":
    main()
