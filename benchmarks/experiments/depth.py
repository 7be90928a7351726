"""Frozen experiment: results/hierarchy*.json were measured at commit 68fe360 (2026-11-24), measured under earlier defaults. Kept so that it can be rerun; not kept up with today's defaults.

Per-query latency against tree depth at equal leaf count: (B, H) = (64, 1), (8, 2), (4, 3).

On SciFact's documents (the untrained all-MiniLM-L6-v2 embeddings, cached), each tree is
k-means initialised and lightly trained on the train queries; every query is then searched
alone (routing + scanning, k = 100, one thread) at the beam that visits about 10 % of the
corpus. The paper reports 2.48 / 2.40 / 1.99 ms on its hardware (MS MARCO).

    python benchmarks/experiments/depth.py --data ../shared/datasets/scifact --out reports/depth.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import torch
from lib.common import write_json

from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.evaluation.evaluate import WidthSearch
from ehi.training.trainer import Trainer

SHAPES = ((64, 1), (8, 2), (4, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="reports/depth.json")
    args = ap.parse_args()

    ds = load_beir(args.data)
    qids = sorted(ds.queries)
    results = []
    for B, H in SHAPES:
        cfg = EHIConfig()
        cfg.tree.branching, cfg.tree.height = B, H
        cfg.train.epochs = args.epochs
        trainer = Trainer(cfg, ds)
        model = trainer.fit(progress=False)
        q = model.encoder.embed_all(model.encoder.features([ds.queries[i] for i in qids], "encoding queries"))
        widths = WidthSearch(lambda w: model.visited_fraction(q, w), model.tree.num_leaves)
        beam = widths.largest_within(args.budget)
        torch.set_num_threads(1)
        route_ms, total_ms = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            for i in range(len(q)):
                model.route(q[i : i + 1], beam)
            route_ms.append(1000 * (time.perf_counter() - t) / len(q))
            t = time.perf_counter()
            for i in range(len(q)):
                model.search_embeddings(q[i : i + 1], 100, beam)
            total_ms.append(1000 * (time.perf_counter() - t) / len(q))
        torch.set_num_threads(2)
        results.append(
            {
                "branching": B, "height": H, "leaves": B**H, "beam": beam,
                "visited": widths.fraction(beam),
                "route_ms": statistics.median(route_ms), "search_ms": statistics.median(total_ms),
            }
        )
    print(f"per-query latency, one query at a time, one thread, ~{100 * args.budget:g}% of SciFact visited, k=100")
    print(f"{'B':>4} {'H':>2} {'leaves':>7} {'beam':>5} {'visited':>8} {'route ms':>9} {'search ms':>10}")
    for r in results:
        print(f"{r['branching']:>4} {r['height']:>2} {r['leaves']:>7} {r['beam']:>5} {100 * r['visited']:>7.1f}% {r['route_ms']:>9.3f} {r['search_ms']:>10.3f}")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
