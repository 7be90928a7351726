"""How validation draws its held-out queries (``train.val_group``), judged on touched and
untouched decision queries (issue 31: choose the encoder on untouched held-out queries).

Each variant trains EHI with the defaults otherwise (validation, refit, router fit, spread
router) on the training queries left after the decision split, and is judged on queries no
variant trains on, never a test split (the decision splits of ``routing_generalization.py``):
- SQuAD: ``seen articles`` = 5 % of the train questions (seed 12345; their articles keep other
  training questions: new questions on trained articles) and ``dev`` = new articles;
- SciFact: 20 % of the train claims; Climate-FEVER: ``dev`` (each split into touched and
  untouched queries by the training queries left).
Beside them, once per corpus: the untrained encoder with Faiss-IVF, ScaNN and the spread router
(as many lists as EHI's leaves), and EHI's own encoder with Faiss-IVF per variant. HNSW is left
out (``--hnsw`` adds it; on SQuAD it takes most of an hour).

    python benchmarks/experiments/val_group.py --corpus squad --out benchmarks/results/val_group_squad.json
"""

from __future__ import annotations

import argparse
import sys
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import torch
from lib.common import select_variants, write_json
from lib.corpora import BUDGETS
from route_fit import decision_splits, r100
from routing_generalization import CORPORA

from ehi.benchmark.run import index_curves, untrained_encoder
from ehi.config import EHIConfig, apply_overrides
from ehi.data import load_beir
from ehi.evaluation.evaluate import TOUCHED, UNTOUCHED, add_touch_split, ehi_curve, untouched_queries
from ehi.training.trainer import Trainer

VARIANTS = {"random": {"train.val_group": "random"}, "auto (default)": {"train.val_group": "auto"}}


def touch_groups(ds, qids, split, train_q):
    """(touched, untouched) among ``qids`` (queries of ``split``) by the training queries ``train_q``."""
    rel_train = ds.relevant("train")
    touched_docs = {d for q in train_q for d in rel_train[q]}
    new = set(untouched_queries(qids, ds.relevant(split), touched_docs))
    return [q for q in qids if q not in new], sorted(new)


def table(rows, groups) -> dict:
    """{"all" | "touched" | "untouched": {method: {budget: R@100}}}."""
    add_touch_split(rows, groups)
    out = {"all": r100(rows)}
    for part, key in (("touched", TOUCHED), ("untouched", UNTOUCHED)):
        cells: dict = {}
        for r in rows:
            if key in r.metrics:
                cells.setdefault(r.method, {})["exact" if r.budget is None else f"{r.budget:g}"] = r.metrics[key]
        out[part] = cells
    return out


def show(label, parts, groups):
    for part, cells in parts.items():
        n = len(groups[0]) + len(groups[1]) if part == "all" else len(groups[0 if part == "touched" else 1])
        if not n:
            continue
        print(f"{label} — {part} ({n} queries), R@100 at " + " / ".join(f"{b:g}" for b in BUDGETS) + " visited:", flush=True)
        for method in sorted(cells):
            v = cells[method]
            row = " ".join(f"{v[f'{b:g}']:6.1f}" if f"{b:g}" in v else "     -" for b in BUDGETS)
            print(f"  {method:<40} {row}" + (f"  exact {v['exact']:.1f}" if "exact" in v else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="squad", choices=list(CORPORA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", default=[], help="extra NAME=JSON overrides")
    ap.add_argument("--only", nargs="*", help="run only these variant names")
    ap.add_argument("--hnsw", action="store_true", help="also the untrained encoder + HNSW")
    ap.add_argument("--out", default="reports/val_group.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    spec = CORPORA[args.corpus]
    ds = load_beir(spec["path"])
    splits, train_q = decision_splits(ds, spec)
    split_of = {label: what if isinstance(what, str) else "train" for label, what in spec["decide"]}
    groups = {label: touch_groups(ds, qids, split_of[label], train_q) for label, (qids, _) in splits.items()}
    rows = {label: [] for label in splits}
    res = {"budgets": list(BUDGETS), "corpus": args.corpus, "seed": args.seed, "train_queries": len(train_q), "variants": {}}
    nlist = None
    for name, ov in select_variants(VARIANTS, args.variant, args.only).items():
        cfg = apply_overrides(EHIConfig(), {**ov, "train.seed": args.seed})
        t0 = time.perf_counter()
        model = Trainer(cfg, ds, "train", train_q).fit(progress=False)
        train_s = time.perf_counter() - t0
        v = model.validation or {}
        print(f"[{name}] trained in {train_s:.0f} s; validation on {v.get('held_out')}; {v.get('why')}", flush=True)
        res["variants"][name] = {"overrides": ov, "train_s": train_s, "validation": v}
        nlist = model.tree.num_leaves
        for label, (qids, qrels) in splits.items():
            q = model.encoder.embed_all(model.encoder.features([ds.queries[x] for x in qids], label))
            rows[label] += ehi_curve(f"EHI, val_group {name}", model, q, qids, qrels, BUDGETS)
            ivf = index_curves(f"EHI ({name}) encoder", q, model.index.embeddings, nlist, args.seed, qids, ds.corpus.ids, qrels,
                               BUDGETS, scann=False, spread=False, hnsw=False)[0]
            rows[label] += ivf
    untrained = untrained_encoder(EHIConfig())
    ud = untrained.embed_all(untrained.features(ds.corpus.documents(), "corpus"))
    res["splits"] = {}
    for label, (qids, qrels) in splits.items():
        uq = untrained.embed_all(untrained.features([ds.queries[x] for x in qids], label))
        rows[label] += index_curves("untrained encoder", uq, ud, nlist, args.seed, qids, ds.corpus.ids, qrels, BUDGETS, hnsw=args.hnsw)[0]
        parts = table(rows[label], groups[label])
        res["splits"][label] = {"queries": len(qids), "touched": len(groups[label][0]), "untouched": len(groups[label][1]), "R@100": parts}
        show(label, parts, groups[label])
    res["command"] = " ".join(sys.argv)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
