"""Frozen experiment: results/printed only (README figures of its time) were measured at commit e43c6e1, measured under earlier defaults (128 leaves). Kept so that it can be rerun; not kept up with today's defaults.

Initialisation and load balance on SciFact: the part of EHI the paper leaves open.

Trains {k-means, random} initialisation x {with, without} the load-balance penalty (and any
extra variants given as JSON overrides), several seeds each. Model choices are made on a
held-out split of the *train* queries (``val``); ``test`` is reported beside it, never used
to choose. Prints a table of Recall@100 at each budget and writes JSON.

    python benchmarks/experiments/init_balance.py --data ../shared/datasets/scifact --seeds 3 --out reports/init_balance.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
from lib.common import select_variants, write_json

from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.evaluation.evaluate import evaluate_model
from ehi.training.trainer import Trainer

VARIANTS = {
    "kmeans + balance (default)": {},
    "kmeans, no balance": {"train.load_balance": 0.0},
    "random + balance": {"tree.init": "random"},
    "random, no balance": {"tree.init": "random", "train.load_balance": 0.0},
    "kmeans, untrained (epochs=0)": {"train.epochs": 0},
}
BUDGETS = (0.02, 0.05, 0.1, 0.2, 0.3)


def configure(overrides: dict, seed: int) -> EHIConfig:
    cfg = EHIConfig()
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    cfg.train.seed = seed
    return cfg.validate()


def recall_at_budgets(rows) -> dict:
    return {
        f"{r.budget:g}": {"R@100": r.metrics["R@100"], "visited": r.fraction_visited, "beam": r.width}
        for r in rows
        if r.method == "EHI"
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/scifact")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--val-queries", type=int, default=160, help="train queries held out for model choice")
    ap.add_argument("--variant", action="append", default=[], help='extra NAME=JSON, e.g. \'B64={"tree.branching": 64}\'')
    ap.add_argument("--only", nargs="*", help="run only these variant names")
    ap.add_argument("--out", default="reports/init_balance.json")
    args = ap.parse_args()

    variants = select_variants(VARIANTS, args.variant, args.only)

    ds = load_beir(args.data)
    rel = sorted(ds.relevant("train"))
    perm = np.random.default_rng(1234).permutation(len(rel))
    val = [rel[i] for i in perm[: args.val_queries]]
    train_q = [rel[i] for i in perm[args.val_queries :]]

    results = {}
    for name, overrides in variants.items():
        runs = []
        for seed in range(args.seeds):
            t = time.perf_counter()
            trainer = Trainer(configure(overrides, seed), ds, "train", train_q)
            model = trainer.fit(progress=False)
            train_s = time.perf_counter() - t
            st = model.index.leaf_stats()
            runs.append(
                {
                    "seed": seed,
                    "train_seconds": train_s,
                    "leaves": st,
                    "val": recall_at_budgets(evaluate_model(model, ds, "train", BUDGETS, baselines=False, query_ids=val)),
                    "test": recall_at_budgets(evaluate_model(model, ds, "test", BUDGETS, baselines=False)),
                }
            )
            print(f"{name} seed {seed}: {train_s:.0f}s, leaf sizes {st['min']}..{st['max']}", file=sys.stderr, flush=True)
        results[name] = {"overrides": overrides, "runs": runs}

    def cell(runs, split, b):
        vals = [r[split][f"{b:g}"]["R@100"] if f"{b:g}" in r[split] else np.nan for r in runs]
        vis = [r[split][f"{b:g}"]["visited"] if f"{b:g}" in r[split] else np.nan for r in runs]
        return f"{np.nanmean(vals):5.1f}±{np.nanstd(vals):3.1f} ({100 * np.nanmean(vis):4.1f}%)"

    for split in ("val", "test"):
        print(f"\nRecall@100 on {split} (mean±std over {args.seeds} seeds; mean fraction visited)")
        print(f"{'variant':<30}" + "".join(f"{f'<={100 * b:.0f}%':>20}" for b in BUDGETS) + f"{'max leaf':>10}")
        for name, res in results.items():
            mx = np.mean([r["leaves"]["max"] for r in res["runs"]])
            print(f"{name:<30}" + "".join(f"{cell(res['runs'], split, b):>20}" for b in BUDGETS) + f"{mx:>10.0f}")

    write_json(args.out, {"python": platform.python_version(), "budgets": BUDGETS, "results": results})


if __name__ == "__main__":
    main()
