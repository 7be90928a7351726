"""Frozen experiment: results/route_fit*.json were measured at commit 9f3be96 (2026-12-02), measured with the tree router. Kept so that it can be rerun; not kept up with today's defaults.

The router fit inside ``ehi train`` (issue 20): what it adds on top of EHI's trainer, and
against the untrained encoder and EHI's own encoder with Faiss-IVF / ScaNN, on seen and on
new documents.

One EHI training per corpus with the defaults (validation, refit) but the router fit off; then,
from that same trained state, the router fitted on every training query with shrink factor
0.5 and 1 (``Trainer.apply_route_fit``). Each is judged on decision splits only, never
trained on, at 1 / 2 / 5 / 10 / 20 % of the corpus visited (the shared budget rule), R@100:
- SciFact: 20 % of the train claims (seed 12345);
- Climate-FEVER: ``dev``;
- SQuAD: ``seen articles`` = 5 % of the train questions (their articles keep other
  training questions) and ``dev`` = articles no training question touches.

    python benchmarks/experiments/route_fit.py --corpus scifact climate-fever squad
"""

from __future__ import annotations

import argparse
import sys
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
import torch
from lib.common import write_json
from routing_generalization import CORPORA, DECIDE_SEED  # the same decision splits

from ehi.benchmark.run import index_curves, untrained_encoder
from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.evaluation.evaluate import BUDGETS, ehi_curve
from ehi.training.trainer import Trainer


def decision_splits(ds, spec):
    """{label: (query ids, qrels)} and the training query ids left."""
    row = set(ds.corpus.ids)
    rel = ds.relevant("train")
    train_q = sorted(q for q in rel if any(d in row for d in rel[q]))
    out = {}
    for label, what in spec["decide"]:
        if isinstance(what, str):
            r = ds.relevant(what)
            qids = sorted(q for q in r if any(d in row for d in r[q]))
            out[label] = (qids, {q: ds.split(what)[q] for q in qids})
        else:
            order = np.random.default_rng(DECIDE_SEED).permutation(len(train_q))
            held = sorted(train_q[i] for i in order[: int(round(what * len(train_q)))])
            out[label] = (held, {q: ds.split("train")[q] for q in held})
            hs = set(held)
            train_q = [q for q in train_q if q not in hs]
    return out, train_q


def r100(rows) -> dict:
    """{method: {budget or "exact": R@100}}."""
    out: dict = {}
    for r in rows:
        out.setdefault(r.method, {})["exact" if r.budget is None else f"{r.budget:g}"] = r.metrics["R@100"]
    return out


def run_corpus(name, spec, args):
    ds = load_beir(spec["path"])
    splits, train_q = decision_splits(ds, spec)
    cfg = EHIConfig()
    cfg.train.seed = args.seed
    cfg.train.route_fit_epochs = 0  # fitted below, from the same trained state
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ds, "train", train_q)
    trainer.fit(progress=not args.no_progress, build_index=False)
    train_s = time.perf_counter() - t0
    print(f"[{name}] trained in {train_s:.0f} s on {len(train_q)} queries; {trainer.validation_report()['why']}", flush=True)
    trainer.config.train.route_fit_epochs = args.epochs
    trainer.config.train.route_fit_span_weight = args.span_weight
    base_state = trainer._state()
    enc = trainer.encoder
    queries = {label: enc.embed_all(enc.features([ds.queries[q] for q in qids], label)) for label, (qids, _) in splits.items()}
    rows = {label: [] for label in splits}
    fit_s = {}
    for a in [0.0] + args.shrink:  # one model at a time: a model shares the trainer's tree
        trainer._load_state(base_state)
        arm = "EHI" if not a else f"EHI + router fit {a:g}"
        t = time.perf_counter()
        if a:
            trainer.state.route_fit = {"kept": a, "scores": None}
            trainer.apply_route_fit(progress=False)
        fit_s[arm] = time.perf_counter() - t
        model = trainer.build_model()
        for label, (qids, qrels) in splits.items():
            rows[label] += ehi_curve(arm, model, queries[label], qids, qrels, BUDGETS)
        if not a:
            validation, d_emb, nlist = model.validation, model.index.embeddings.copy(), model.tree.num_leaves
    untrained = untrained_encoder(cfg)
    ud = untrained.embed_all(untrained.features(ds.corpus.documents(), "corpus"))
    out = {"train_s": train_s, "route_fit_s": fit_s, "validation": validation, "splits": {}}
    for label, (qids, qrels) in splits.items():
        rows[label] += index_curves("EHI encoder", queries[label], d_emb, nlist, args.seed, qids, ds.corpus.ids, qrels, BUDGETS)[0]
        uq = untrained.embed_all(untrained.features([ds.queries[q] for q in qids], label))
        rows[label] += index_curves("untrained encoder", uq, ud, nlist, args.seed, qids, ds.corpus.ids, qrels, BUDGETS)[0]
        table = r100(rows[label])
        out["splits"][label] = {"queries": len(qids), "R@100": table}
        print(f"[{name}] {label} ({len(qids)} queries), R@100 at " + " / ".join(f"{b:g}" for b in BUDGETS) + " visited:", flush=True)
        for method in sorted(table):
            vals = table[method]
            cells = " ".join(f"{vals[f'{b:g}']:6.1f}" if f"{b:g}" in vals else "     -" for b in BUDGETS)
            print(f"  {method:<36} {cells}" + (f"  exact {vals['exact']:.1f}" if "exact" in vals else ""), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=EHIConfig().train.route_fit_epochs, help="router fit epochs")
    ap.add_argument("--span-weight", type=float, default=EHIConfig().train.route_fit_span_weight)
    ap.add_argument("--shrink", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="reports/route_fit.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = {"budgets": list(BUDGETS), "args": vars(args), "corpora": {}}
    for c in args.corpus:
        res["corpora"][c] = run_corpus(c, CORPORA[c], args)
        write_json(args.out, res)
    res["command"] = " ".join(sys.argv)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
