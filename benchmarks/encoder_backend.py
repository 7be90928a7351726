"""Which backend runs the frozen transformer: torch, ONNX Runtime, or ONNX Runtime int8.

Per corpus, one EHI model is trained with the defaults (torch features) on the training
queries; then for each backend the corpus and the decision queries are encoded again with it
(the trained adapter and tree unchanged), the index rebuilt, and Recall@100 measured at
1 / 2 / 5 / 10 / 20 % visited and exact, on queries never trained on (SciFact: a fixed 20 % of
the train claims; Climate-FEVER: the dev claims — as in generalization.py). Beside it, the
encoding cost: one query at a time (median ms over ``--single`` queries, all cores) and a
batch of ``--batch-docs`` documents (documents/s). The default backend is the fastest whose
Recall@100 stays within 0.5 points of torch at every budget on every corpus.

    python benchmarks/encoder_backend.py --out benchmarks/results/encoder_backend.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from lib.common import write_json
from lib.corpora import CORPORA, split_queries

from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.evaluation.evaluate import ehi_curve, exact_row
from ehi.training.trainer import Trainer

BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
BACKENDS = ("torch", "onnx", "onnx-int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=list(CORPORA), help=f"{', '.join(CORPORA)} or a BEIR folder (decided on a fifth of its train queries)")
    ap.add_argument("--single", type=int, default=100, help="queries encoded one at a time, per backend")
    ap.add_argument("--batch-docs", type=int, default=512, help="documents encoded as one batch job, per backend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, help="training epochs (default: the config's)")
    ap.add_argument("--out", default="reports/encoder_backend.json")
    args = ap.parse_args()
    out = {"budgets": list(BUDGETS), "backends": list(BACKENDS), "corpora": {}}
    for name in args.corpus:
        spec = CORPORA.get(name) or {"path": name, "train": "train", "decide": None}
        ds = load_beir(spec["path"])
        train_q, decide_q, decide_split = split_queries(ds, spec, 0.2)
        qrels = {q: ds.split(decide_split)[q] for q in decide_q}
        cfg = EHIConfig()
        cfg.encoder.backend = "torch"
        cfg.train.seed = args.seed
        if args.epochs is not None:
            cfg.train.epochs = args.epochs
        model = Trainer(cfg, ds, "train", query_ids=train_q).fit(progress=False)
        enc = model.encoder
        texts = [ds.queries[q] for q in decide_q]
        docs = ds.corpus.documents()
        res = {}
        for backend in BACKENDS:
            enc.backend, enc._onnx = backend, None
            d_emb = enc.embed_all(enc.features(docs, f"encoding corpus ({backend})"))
            model.build_index(d_emb, ds.corpus.ids, ds.corpus.titles)
            q_emb = enc.embed_all(enc.features(texts, "encoding queries"))
            rows = ehi_curve("EHI", model, q_emb, decide_q, qrels, BUDGETS)
            rows.append(exact_row("exact", q_emb, d_emb, decide_q, ds.corpus.ids, qrels))
            curve = {("exact" if r.budget is None else f"{r.budget:g}"): r.metrics["R@100"] for r in rows}
            enc.encode(texts[:2])  # warm: the session and its first-call allocations
            single = []
            for t in texts[: args.single]:
                s = time.perf_counter()
                enc.encode([t])
                single.append(1000 * (time.perf_counter() - s))
            sample = docs[: args.batch_docs]
            s = time.perf_counter()
            enc.compute_features(sample)
            docs_per_s = len(sample) / (time.perf_counter() - s)
            res[backend] = {"R@100": curve, "query_ms_p50": statistics.median(single), "docs_per_s": docs_per_s}
            print(f"{name:<14} {backend:<10} R@100 " + " ".join(f"{curve.get(f'{b:g}', float('nan')):5.1f}" for b in BUDGETS)
                  + f" exact {curve['exact']:5.1f} | query p50 {res[backend]['query_ms_p50']:6.2f} ms | {docs_per_s:6.1f} docs/s", flush=True)
        base = res["torch"]["R@100"]
        for backend in BACKENDS[1:]:
            diff = {k: res[backend]["R@100"][k] - base[k] for k in base if k in res[backend]["R@100"]}
            res[backend]["R@100_minus_torch"] = diff
            res[backend]["within_0.5"] = all(abs(v) <= 0.5 for v in diff.values())
            res[backend]["speedup_query_p50"] = res["torch"]["query_ms_p50"] / res[backend]["query_ms_p50"]
        out["corpora"][name] = {"decide_split": decide_split, "queries": len(decide_q), "backends": res}
    ok = [b for b in BACKENDS[1:] if all(out["corpora"][c]["backends"][b]["within_0.5"] for c in out["corpora"])]
    fastest = min(ok, key=lambda b: statistics.mean(out["corpora"][c]["backends"][b]["query_ms_p50"] for c in out["corpora"])) if ok else "torch"
    out["default"] = fastest
    print(f"within 0.5 points of torch on every corpus: {ok or 'none'}; the default: {fastest}")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
