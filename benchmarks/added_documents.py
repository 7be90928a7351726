"""Documents added after training (issue 31): are questions about them found as well as
k-means over the same encoder finds them?

Per corpus and seed: a random 20 % of the documents is set aside; EHI trains (the defaults) on
the rest, with every training query that points at a set-aside document dropped, so no training
question ever touched them; then they are added with ``EHIModel.add_documents`` (placed by the
tree, no retraining: what ``ehi index add`` does). Judged: the queries all of whose relevant
documents were added, from the training split (never trained on: they were dropped) and from
``dev`` where the corpus has it. Recall@100 at 1 / 2 / 5 / 10 / 20 % of the corpus visited
(the shared budget rule) for

- EHI as it searches by default (the spread router, its sketch re-fitted with the added documents),
- EHI with its tree router,
- EHI after ``repartition`` (``ehi index add --repartition``: k-means over every document),
- the same trained encoder over all documents with Faiss-IVF (k-means fitted on every document,
  added ones included: the bar the issue sets), ScaNN and k-means + spread router,
- the untrained encoder with Faiss-IVF and k-means + spread router.

    python benchmarks/added_documents.py --corpus scifact climate-fever --seeds 3 --out benchmarks/results/added_documents.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from lib.common import write_json

from ehi.benchmark.run import index_curves, untrained_encoder
from ehi.config import EHIConfig
from ehi.data import Corpus, Dataset, load_beir
from ehi.evaluation.evaluate import ehi_curve
from ehi.training.trainer import Trainer

CORPORA = {"scifact": "../shared/datasets/scifact", "climate-fever": "../shared/datasets/climate-fever-dev", "squad": "../shared/datasets/squad"}
BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)


def split_corpus(ds: Dataset, seed: int, share: float):
    rng = np.random.default_rng(1000 + seed)
    n = len(ds.corpus)
    added = np.zeros(n, dtype=bool)
    added[rng.choice(n, size=int(share * n), replace=False)] = True
    c = ds.corpus
    pick = lambda mask: Corpus([c.ids[i] for i in np.flatnonzero(mask)], [c.titles[i] for i in np.flatnonzero(mask)], [c.texts[i] for i in np.flatnonzero(mask)])
    return pick(~added), pick(added)


def run(name: str, path: str, seed: int, share: float) -> dict:
    ds = load_beir(path)
    kept, new = split_corpus(ds, seed, share)
    new_ids = set(new.ids)
    rel_train = ds.relevant("train")
    train_qrels = {q: ds.split("train")[q] for q, docs in rel_train.items() if not any(d in new_ids for d in docs)}
    judged: dict[str, dict] = {}  # query -> qrels, about added documents only
    for split in ("train", "dev"):
        if split == "dev" and not (ds.root / "qrels" / "dev.tsv").exists():
            continue
        for q, docs in ds.relevant(split).items():
            if all(d in new_ids for d in docs):
                judged[q] = ds.split(split)[q]
    small = Dataset(ds.root, kept, ds.queries, {"train": train_qrels})
    cfg = EHIConfig()
    cfg.train.seed = seed
    t = time.perf_counter()
    model = Trainer(cfg, small).fit(progress=False)
    train_s = time.perf_counter() - t
    enc = model.encoder
    model.add_documents(new.ids, new.titles, enc.embed_all(enc.features(new.documents(), "added documents")))
    qids = sorted(judged)
    q_emb = enc.embed_all(enc.features([ds.queries[q] for q in qids], "queries"))
    rows = ehi_curve("EHI (spread router)", model, q_emb, qids, judged, BUDGETS)
    model.config.index.router = "tree"
    model.recalibrate()
    rows += ehi_curve("EHI (tree router)", model, q_emb, qids, judged, BUDGETS)
    L, ids = model.tree.num_leaves, model.doc_ids
    vectors = np.array(model.index.vectors)  # before the leaves are re-drawn
    model.config.index.router = "spread"
    model.repartition()  # what ehi index add --repartition does
    rows += ehi_curve("EHI, leaves re-drawn (spread router)", model, q_emb, qids, judged, BUDGETS)
    rows += index_curves("EHI encoder", q_emb, vectors, L, seed, qids, ids, judged, BUDGETS, hnsw=False)[0]
    base = untrained_encoder(cfg)
    docs = {d: t for d, t in zip(ds.corpus.ids, ds.corpus.documents())}
    bd = base.embed_all(base.features([docs[d] for d in ids], "corpus (untrained)"))
    bq = base.embed_all(base.features([ds.queries[q] for q in qids], "queries (untrained)"))
    rows += index_curves("untrained encoder", bq, bd, L, seed, qids, ids, judged, BUDGETS, scann=False, hnsw=False)[0]
    out = {"corpus": name, "seed": seed, "added_documents": len(new), "kept_documents": len(kept),
           "training_queries": len(train_qrels), "judged_queries": len(qids), "train_seconds": train_s, "rows": {}}
    for r in rows:
        out["rows"].setdefault(r.method, {})["exact" if r.budget is None else f"{r.budget:g}"] = r.metrics["R@100"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", default=["scifact", "climate-fever"], help=f"{', '.join(sorted(CORPORA))} or a BEIR folder")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--share", type=float, default=0.2, help="share of the documents added after training")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = [run(c, CORPORA.get(c, c), s, args.share) for c in args.corpus for s in range(args.seeds)]
    summary = {}
    for c in args.corpus:
        mine = [r for r in runs if r["corpus"] == c]
        methods = list(mine[0]["rows"])
        print(f"\n{c}: {mine[0]['added_documents']} documents added after training, {np.mean([r['judged_queries'] for r in mine]):.0f} "
              f"queries about them (mean of {len(mine)} seeds); Recall@100")
        print(f"{'method':<40}" + "".join(f"{100 * b:>7.0f}%" for b in BUDGETS) + f"{'exact':>8}")
        summary[c] = {}
        for m in methods:
            cells = {}
            for key in [f"{b:g}" for b in BUDGETS] + ["exact"]:
                xs = [r["rows"][m].get(key) for r in mine if r["rows"][m].get(key) is not None]
                cells[key] = float(np.mean(xs)) if len(xs) == len(mine) else None
            summary[c][m] = cells
            print(f"{m:<40}" + "".join(f"{cells[k]:>8.1f}" if cells[k] is not None else f"{'—':>8}" for k in cells))
    if args.out:
        write_json(args.out, {"share": args.share, "budgets": list(BUDGETS), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
