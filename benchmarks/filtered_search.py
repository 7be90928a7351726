"""Filtered search against selectivity: EHI's rule (score a small allowed set whole, filter a
large one inside the beam's leaves and widen until k are found) beside Faiss IndexIVFFlat
with the same selector (``ehi.index.faiss_ivf.id_selector``: a Faiss ``IDSelectorBitmap``), at the same
fraction of the corpus visited.

For each share of the corpus allowed (a random subset, seeded), every test query searches
with the filter: Recall@k against exact search over the allowed set (|found ∩ exact top-k| /
min(k, allowed)), the documents scored, and the latency per query (queries one at a time on
one thread, median of ``--reps`` interleaved repetitions; also the whole set as one batch
sharing the filter, per query; query encoding left out, routing
included; each method builds its selector per query, as a request with its own filter does). Faiss IVFFlat has as many lists as the model has leaves and the nprobe the budget
rule gives on the same queries (so both visit the same mean fraction unfiltered).

    python benchmarks/filtered_search.py --model runs/scifact --out reports/filtered_search.json
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
from ehi.data import load_beir
from ehi.evaluation.baselines import IVFBaseline, exact_search
from ehi.index.leaf_index import id_selector
from ehi.model.ehi_model import EHIModel

SHARES = [0.0001, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]


def recall_vs_exact(found: np.ndarray, exact: np.ndarray, allowed: int, k: int) -> float:
    need = min(k, allowed)
    return float(np.mean([len(set(f[f >= 0]) & set(e[:need])) / need for f, e in zip(found, exact)]))


def per_query_ms(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1000 * (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/scifact")
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--split", default="test", help="queries that search (reported, nothing is chosen on them)")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/filtered_search.json")
    args = ap.parse_args()

    model = EHIModel.load(args.model)
    ds = load_beir(args.data)
    qids = sorted(ds.relevant(args.split))
    q = model.encoder.encode([ds.queries[i] for i in qids])
    docs = np.ascontiguousarray(model.index.vectors, dtype=np.float32)
    n, k = len(docs), args.k
    beam = model.resolve_beam(budget=args.budget)
    ivf = IVFBaseline(docs, model.tree.num_leaves, seed=args.seed)
    nprobe = WidthSearch(lambda w: ivf.visited_fraction(q, w), ivf.max_width).largest_within(args.budget) or 1
    frac_ehi = model.visited_fraction(q, beam)
    frac_ivf = ivf.visited_fraction(q, nprobe)
    print(f"{n} documents, {len(q)} {args.split} queries, budget {args.budget:.0%}: EHI beam {beam} "
          f"(visits {frac_ehi:.2%} unfiltered, {model.budget_documents(beam):.0f} documents by its calibration), "
          f"Faiss IVFFlat nprobe {nprobe} of {ivf.nlist} (visits {frac_ivf:.2%})")
    rng = np.random.default_rng(args.seed)
    threads = faiss.omp_get_max_threads()
    rows = []
    print(f"{'allowed':>16} | {'EHI strategy':>12} {'R@k':>6} {'scored':>7} {'ms/q':>6} {'batch':>6} | "
          f"{'IVF+IDSelector R@k':>18} {'scored':>7} {'ms/q':>6} {'batch':>6} | {'ratio':>5} {'batch':>5}")
    for share in SHARES:
        a = max(1, round(share * n))
        allowed = np.sort(rng.choice(n, a, replace=False))
        exact, _ = exact_search(q, docs[allowed], min(k, a))
        exact = allowed[exact]
        res, _ = model.search_embeddings(q, k, beam, allowed)

        def faiss_search(x):
            params = faiss.SearchParametersIVF()
            params.nprobe, params.sel = nprobe, id_selector(allowed, n)
            return ivf.index.search(x, k, params=params)[1]

        I_ivf = faiss_search(q)
        lists = ivf.probes(q, nprobe)
        per_list = np.bincount(ivf.index.quantizer.assign(docs[allowed], 1).ravel(), minlength=ivf.nlist)
        scored_ivf = float(per_list[lists].sum(1).mean())
        times = {"ehi": [], "ivf": [], "ehi_batch": [], "ivf_batch": []}
        with threadpool_limits(1):
            faiss.omp_set_num_threads(1)
            for _ in range(args.reps):  # interleaved: machine noise hits both alike
                times["ehi"].append(per_query_ms(lambda i: model.search_embeddings(q[i : i + 1], k, beam, allowed), len(q)))
                times["ivf"].append(per_query_ms(lambda i: faiss_search(q[i : i + 1]), len(q)))
                times["ehi_batch"].append(per_query_ms(lambda i: model.search_embeddings(q, k, beam, allowed), 1) / len(q))
                times["ivf_batch"].append(per_query_ms(lambda i: faiss_search(q), 1) / len(q))
            faiss.omp_set_num_threads(threads)
        row = {
            "share_allowed": share,
            "allowed": a,
            "ehi": {"strategy": res.strategy, "recall_vs_exact": recall_vs_exact(res.indices, exact, a, k),
                    "scored": float(res.visited.mean()), "ms_per_query": statistics.median(times["ehi"]),
                    "ms_per_query_batched": statistics.median(times["ehi_batch"])},
            "faiss_ivfflat_idselector": {"recall_vs_exact": recall_vs_exact(I_ivf, exact, a, k), "scored": scored_ivf,
                                         "ms_per_query": statistics.median(times["ivf"]),
                                         "ms_per_query_batched": statistics.median(times["ivf_batch"])},
        }
        row["latency_ratio"] = row["ehi"]["ms_per_query"] / row["faiss_ivfflat_idselector"]["ms_per_query"]
        row["batched_ratio"] = row["ehi"]["ms_per_query_batched"] / row["faiss_ivfflat_idselector"]["ms_per_query_batched"]
        rows.append(row)
        e, f = row["ehi"], row["faiss_ivfflat_idselector"]
        print(f"{a:>7} ({share:>7.2%}) | {e['strategy']:>12} {e['recall_vs_exact']:>6.3f} {e['scored']:>7.0f} {e['ms_per_query']:>6.3f} "
              f"{e['ms_per_query_batched']:>6.3f} | {f['recall_vs_exact']:>18.3f} {f['scored']:>7.0f} {f['ms_per_query']:>6.3f} "
              f"{f['ms_per_query_batched']:>6.3f} | {row['latency_ratio']:>5.2f} {row['batched_ratio']:>5.2f}", flush=True)
    # the same searches without a filter: what routing and the scan cost before any filter
    plain = {"ehi": [], "ivf": []}
    ivf.index.nprobe = nprobe
    with threadpool_limits(1):
        faiss.omp_set_num_threads(1)
        for _ in range(args.reps):
            plain["ehi"].append(per_query_ms(lambda i: model.search_embeddings(q[i : i + 1], k, beam), len(q)))
            plain["ivf"].append(per_query_ms(lambda i: ivf.index.search(q[i : i + 1], k), len(q)))
        faiss.omp_set_num_threads(threads)
    unfiltered = {"ehi_ms_per_query": statistics.median(plain["ehi"]), "ivf_ms_per_query": statistics.median(plain["ivf"])}
    unfiltered["ratio"] = unfiltered["ehi_ms_per_query"] / unfiltered["ivf_ms_per_query"]
    print(f"no filter: EHI {unfiltered['ehi_ms_per_query']:.3f} ms/q, Faiss IVFFlat {unfiltered['ivf_ms_per_query']:.3f} ms/q "
          f"(ratio {unfiltered['ratio']:.2f}: routing through the tree against a centroid lookup)")
    write_json(args.out, {
        "unfiltered": unfiltered,
        "command": "python benchmarks/filtered_search.py " + " ".join(f"--{k_.replace('_', '-')} {v}" for k_, v in vars(args).items() if k_ != "k") + f" -k {k}",
        "documents": n, "queries": len(q), "split": args.split, "budget": args.budget,
        "ehi_beam": beam, "ehi_fraction_visited_unfiltered": frac_ehi, "ehi_budget_documents": model.budget_documents(beam),
        "ivf_nprobe": nprobe, "ivf_nlist": ivf.nlist, "ivf_fraction_visited_unfiltered": frac_ivf,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
