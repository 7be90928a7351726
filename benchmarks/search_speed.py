"""Search speed on SciFact: EHI against Faiss IndexIVFFlat with as many lists as EHI has leaves.

Both get the same query embeddings (encoding is the same cost for both and is left out);
EHI's time includes routing through the tree. Widths are chosen so that each method visits
about 10 % and about 2 % of the corpus (the shared budget rule). QPS is measured in the same
process, the two methods interleaved, several repetitions, median reported; batched over all
queries and one query at a time, with 1 and 2 threads.

    python benchmarks/search_speed.py --data ../shared/datasets/scifact --out reports/search_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import torch
from threadpoolctl import threadpool_limits

from common import write_json
from ehi.baselines import IVFBaseline
from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.budget import WidthSearch
from ehi.model import EHIModel
from ehi.training import train


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--model", help="trained model directory (default: train one with the defaults)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--out", default="reports/search_speed.json")
    args = ap.parse_args()

    ds = load_beir(args.data)
    model = EHIModel.load(args.model) if args.model else train(ds, EHIConfig(), progress=False)
    qids = sorted(ds.queries)
    q = model.encoder.embed_all(model.encoder.features([ds.queries[i] for i in qids], "encoding queries"))
    d = model.index.embeddings
    L = model.tree.num_leaves
    ivf = IVFBaseline(d, L, seed=0)

    ehi_w = WidthSearch(lambda w: model.visited_fraction(q, w), L)
    ivf_w = WidthSearch(lambda w: ivf.visited_fraction(q, w), L)
    results = {"queries": len(q), "documents": len(d), "leaves": L, "budgets": {}}
    for budget in (0.10, 0.02):
        bw, iw = ehi_w.largest_within(budget), ivf_w.largest_within(budget)
        row = {"ehi_beam": bw, "ivf_nprobe": iw, "ehi_visited": ehi_w.fraction(bw), "ivf_visited": ivf_w.fraction(iw)}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            limits = threadpool_limits(limits=threads)  # numpy's BLAS (EHI scans leaves with it)
            ivf.index.nprobe = iw

            def ehi_batch():
                model.search_embeddings(q, 100, bw)

            def ivf_batch():
                ivf.index.search(q, 100)

            def ehi_single():
                for i in range(args.single):
                    model.search_embeddings(q[i : i + 1], 100, bw)

            def ivf_single():
                for i in range(args.single):
                    ivf.index.search(q[i : i + 1], 100)

            ehi_batch(), ivf_batch()  # warm-up
            tb = {"ehi": [], "ivf": []}
            ts = {"ehi": [], "ivf": []}
            for _ in range(args.reps):  # interleaved, so that machine noise hits both alike
                tb["ehi"] += timed(ehi_batch, 1)
                tb["ivf"] += timed(ivf_batch, 1)
                ts["ehi"] += timed(ehi_single, 1)
                ts["ivf"] += timed(ivf_single, 1)
            qps = {m: len(q) / statistics.median(v) for m, v in tb.items()}
            lat = {m: 1000 * statistics.median(v) / args.single for m, v in ts.items()}
            limits.restore_original_limits()
            row[f"threads={threads}"] = {
                "batched_qps": qps,
                "batched_qps_ratio_ehi_over_ivf": qps["ehi"] / qps["ivf"],
                "single_query_ms": lat,
                "single_query_qps_ratio_ehi_over_ivf": lat["ivf"] / lat["ehi"],
            }
        results["budgets"][f"{budget:g}"] = row

    print(f"SciFact search speed: {len(q)} queries, {len(d)} documents, {L} leaves/lists, k=100 (median of {args.reps})")
    print(f"{'budget':>7} {'thr':>4} {'EHI visited':>12} {'IVF visited':>12} {'EHI QPS':>9} {'IVF QPS':>9} {'ratio':>6} {'EHI ms/q':>9} {'IVF ms/q':>9} {'ratio':>6}")
    for b, row in results["budgets"].items():
        for threads in (1, 2):
            r = row[f"threads={threads}"]
            print(
                f"{100 * float(b):>6.0f}% {threads:>4} {100 * row['ehi_visited']:>11.1f}% {100 * row['ivf_visited']:>11.1f}% "
                f"{r['batched_qps']['ehi']:>9.0f} {r['batched_qps']['ivf']:>9.0f} {r['batched_qps_ratio_ehi_over_ivf']:>6.2f} "
                f"{r['single_query_ms']['ehi']:>9.3f} {r['single_query_ms']['ivf']:>9.3f} {r['single_query_qps_ratio_ehi_over_ivf']:>6.2f}"
            )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
