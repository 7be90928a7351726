"""Frozen experiment: results/generalization.json were measured at commit 49adba4 (2026-11-23), measured before the router fit and the spread router. Kept so that it can be rerun; not kept up with today's defaults.

Which training settings route well on *both* corpora: the experiments behind the defaults.

Each variant (config overrides) is trained with several seeds on SciFact and on
Climate-FEVER and judged on queries that no variant trains on and no test split:
- SciFact: a fixed 20 % of the train queries (``--decide-fraction``, drawn with seed 12345);
  training uses the other 80 % (and validation holds out part of those);
- Climate-FEVER: the ``dev`` split; training uses ``train``.
Reported per variant: Recall@100 of EHI at 1 / 2 / 5 / 10 / 20 % of the corpus visited, the same
for "EHI encoder + Faiss-IVF" (k-means over the very encoder EHI trained, as many lists as
leaves) and the difference, the epoch validation kept, and the training time. Optionally
(``--baselines``) the dual-encoder pipelines DE + Faiss-IVF / ScaNN, trained the same way.

    python benchmarks/experiments/generalization.py --seeds 3 --out reports/generalization.json
    python benchmarks/experiments/generalization.py --seeds 3 --variant 'lr1e-4={"train.lr_indexer": 1e-4}'
"""

from __future__ import annotations

import argparse
import sys
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
from lib.common import select_variants, write_json
from lib.corpora import BUDGETS, CORPORA, split_queries

from ehi.benchmark.run import dual_encoder_config, index_curves
from ehi.config import EHIConfig, apply_overrides
from ehi.data import load_beir
from ehi.evaluation.evaluate import ehi_curve, ivf_curve
from ehi.training.trainer import Trainer

# what was tried; each is a set of overrides of the current defaults (validated training with
# refit and the k-means candidate, auto branching = 256 leaves on these ~5k-document corpora)
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "128 leaves": {"tree.branching": 128},
    "no k-means candidate": {"train.val_recluster": False},
    "no refit": {"train.val_refit": False},
    "no validation (last epoch)": {"train.val_fraction": 0.0},
    "untrained (k-means start)": {"train.epochs": 0},
    "indexer lr 1e-4": {"train.lr_indexer": 1e-4},
    "anchor to start 10": {"train.tree_anchor": 10.0},
    "near-duplicate negatives dropped (0.8)": {"train.negative_tau": 0.8},
    "no load balance": {"train.load_balance": 0.0},
    "routing cross-entropy 0.3": {"train.lambda_routing": 0.3},
    "re-cluster every 10 epochs": {"train.recluster_every": 10},
}


def curve(rows, method):
    return {f"{r.budget:g}": r.metrics["R@100"] for r in rows if r.method == method and r.budget is not None}


def run_variant(ds, train_q, decide_q, decide_split, overrides, seed, baselines):
    qrels = {q: ds.split(decide_split)[q] for q in decide_q}
    cfg = apply_overrides(EHIConfig(), {**overrides, "train.seed": seed})
    t = time.perf_counter()
    trainer = Trainer(cfg, ds, "train", query_ids=train_q)
    model = trainer.fit(progress=False)
    train_s = time.perf_counter() - t
    q_emb = model.encoder.embed_all(model.encoder.features([ds.queries[q] for q in decide_q], "encoding queries"))
    rows = ehi_curve("EHI", model, q_emb, decide_q, qrels, BUDGETS)
    L = model.tree.num_leaves
    rows += ivf_curve("EHI encoder + Faiss-IVF", q_emb, model.index.embeddings, L, seed, decide_q, ds.corpus.ids, qrels, BUDGETS)[0]
    out = {
        "EHI": curve(rows, "EHI"),
        "EHI encoder + Faiss-IVF": curve(rows, "EHI encoder + Faiss-IVF"),
        "kept_epoch": model.validation["kept_epoch"] if model.validation else None,
        "kept_tree": model.validation["kept_tree"] if model.validation else None,
        "validation": model.validation["curve"] if model.validation else None,
        "train_s": train_s,
        "leaves": L,
    }
    if baselines:
        de = Trainer(dual_encoder_config(cfg), ds, "train", query_ids=train_q).fit(progress=False)
        dq = de.encoder.embed_all(de.encoder.features([ds.queries[q] for q in decide_q], "encoding queries"))
        drows, _ = index_curves("DE", dq, de.index.embeddings, L, seed, decide_q, ds.corpus.ids, qrels, BUDGETS)
        out["DE + Faiss-IVF"] = curve(drows, "DE + Faiss-IVF")
        out["DE + ScaNN"] = curve(drows, "DE + ScaNN")
    return out


def mean_curve(runs, method):
    keys = [f"{b:g}" for b in BUDGETS]
    return {k: float(np.mean([r[method].get(k, 0.0) for r in runs])) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--decide-fraction", type=float, default=0.2, help="SciFact train queries held out for deciding")
    ap.add_argument("--variant", action="append", default=[], help="extra NAME=JSON overrides")
    ap.add_argument("--only", nargs="*", help="run only these variant names")
    ap.add_argument("--baselines", action="store_true", help="also train the dual encoder (DE + Faiss-IVF / ScaNN)")
    ap.add_argument("--out", default="reports/generalization.json")
    args = ap.parse_args()
    variants = select_variants(VARIANTS, args.variant, args.only)
    results = {"budgets": list(BUDGETS), "seeds": args.seeds, "variants": variants, "corpora": {}}
    keys = [f"{b:g}" for b in BUDGETS]
    for cname in args.corpus:
        corpus = CORPORA[cname]
        ds = load_beir(corpus["path"])
        train_q, decide_q, decide_split = split_queries(ds, corpus, args.decide_fraction)
        print(f"\n== {cname}: train on {len(train_q)} queries, decide on {len(decide_q)} ({decide_split})", flush=True)
        print(f"{'variant':<34} {'method':<12} " + " ".join(f"{100 * b:>6g}%" for b in BUDGETS) + "  kept (k: k-means tree)  train s", flush=True)
        per = {}
        for name, ov in variants.items():
            runs = [run_variant(ds, train_q, decide_q, decide_split, ov, s, args.baselines) for s in range(args.seeds)]
            ehi, ivf = mean_curve(runs, "EHI"), mean_curve(runs, "EHI encoder + Faiss-IVF")
            per[name] = {"runs": runs, "EHI": ehi, "EHI encoder + Faiss-IVF": ivf}
            kept = [f"{r['kept_epoch']}{'k' if r['kept_tree'] and r['kept_tree'] != 'learned' else ''}" if r["kept_tree"] else "-" for r in runs]
            tsec = np.mean([r["train_s"] for r in runs])
            print(f"{name:<34} {'EHI':<12} " + " ".join(f"{ehi[k]:>7.1f}" for k in keys) + f"  {kept}  {tsec:.0f}", flush=True)
            print(f"{'':<34} {'- own IVF':<12} " + " ".join(f"{ehi[k] - ivf[k]:>+7.1f}" for k in keys), flush=True)
            if args.baselines:
                for m in ("DE + Faiss-IVF", "DE + ScaNN"):
                    c = mean_curve(runs, m)
                    per[name][m] = c
                    print(f"{'':<34} {m:<12} " + " ".join(f"{c[k]:>7.1f}" for k in keys), flush=True)
        results["corpora"][cname] = {"train_queries": len(train_q), "decide_queries": len(decide_q), "decide_split": decide_split, "variants": per}
    results["command"] = " ".join(sys.argv)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
