"""Frozen experiment: results/routing_generalization*.json, routing_spread*.json were measured at commit fff1276 (2026-12-02), the experiment that led to the spread router. Kept so that it can be rerun; not kept up with today's defaults.

Why the learned router loses to k-means on new documents, and what fixes it (issue 20).

Routing alone, isolated from encoder training: the untrained encoder's embeddings, spherical
k-means leaves (as many as ``ehi train`` makes), and an H = 1 EHI tree (``F(e;U)``, ``W``
started at the centroids / T) trained by cross-entropy toward the leaf of each training
example's document. What varies is *what it learns from*:

- ``k-means``: no training (centroid routing = Faiss-IVF over the same lists);
- ``questions``: the labelled training questions only (what a router fitted to questions does);
- ``spans``: document spans (8-16 words of each document's own text, ``unsupervised.document_spans``)
  routed to their document's leaf: every document teaches its own leaf, none is starved;
- ``questions + spans``: both, each document's spans weighted like ``--span-weight`` questions (default 1);
- ``..., prior-adjusted``: the same examples with the logit-adjusted loss of ``ehi.training.router_fit``
  (the examples' leaf prior added inside the softmax), what ``ehi train``'s router fit does;
- ``shrink a``: the adjusted fit's parameter change scaled by ``a`` (``--blend``), the
  candidates ``ehi train`` chooses from; ``blend a``: the centroid and the adjusted router's
  log-probabilities mixed (not realisable as one tree, kept for comparison);
- ``docs re-routed``: the same router also assigns the documents (as EHI's tree does) instead
  of keeping their k-means leaves;
- ``mean + λ·spread`` (``--spread λ…``): a training-free router in the spirit of Optimist (Bruch,
  Krishnan, Nardini, NeurIPS 2025): a leaf scores its mean inner product with the query plus λ
  times the spread of its documents' inner products along the query, ``q·μ_c + λ‖S_c q‖``, with
  ``S_c`` the top ``--spread-rank`` principal directions of the leaf's centred documents, scaled
  by their standard deviations (a sketch of the second moment). It needs no training question,
  so it has no train / new gap by construction. ``--only NAMES`` keeps only those trained
  variants (``k-means`` always runs; ``--spans 0`` skips the spans).

Judged only on decision splits, on queries never trained on, at 1 / 2 / 5 / 10 / 20 % of the
corpus visited (the shared budget rule, measured on the judged queries), Recall@100:
- SciFact: a fixed 20 % of the train claims (seed 12345);
- Climate-FEVER: ``dev``;
- SQuAD: ``seen articles`` = 5 % of the train questions held out (their articles keep other
  training questions) and ``dev`` = articles no training question touches.
Also per split: where the positive's leaf ranks under each router (share at rank 1, median)
and the oracle bound (visit the positive's leaf first, then centroid order).

    python benchmarks/experiments/routing_generalization.py --out benchmarks/results/routing_generalization.json
"""

from __future__ import annotations

import argparse
import sys
import time

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
import torch
from lib.common import write_json

from ehi.config import EncoderConfig, TreeConfig
from ehi.data import load_beir
from ehi.encode.encoder import Encoder
from ehi.model.tree import Tree
from ehi.training.router_fit import RoutingExamples, fit_router, shrunk
from ehi.training.unsupervised import document_spans

CORPORA = {
    "scifact": {"path": "../shared/datasets/scifact", "decide": [("held-out train", 0.2)]},
    "climate-fever": {"path": "../shared/datasets/climate-fever-dev", "decide": [("dev", "dev")]},
    "squad": {"path": "../shared/datasets/squad", "decide": [("seen articles", 0.05), ("dev (new articles)", "dev")]},
}
BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
DECIDE_SEED = 12345


def embed(enc: Encoder, texts: list[str], desc: str) -> np.ndarray:
    return enc.features(texts, desc).dense.numpy()


def recall_at(q_emb, d_emb, doc_leaf, leaf_order, rel_rows, budgets, k=100):
    """Recall@k (x100) at each budget: per query, the visited leaves are the first ``w`` of
    ``leaf_order`` (Q, L), w the largest width whose mean fraction visited is within the
    budget; candidates are ranked by cosine."""
    n = len(d_emb)
    sizes = np.bincount(doc_leaf, minlength=leaf_order.shape[1])
    frac = np.cumsum(sizes[leaf_order], axis=1).mean(0) / n  # mean fraction visited by width
    widths = {f"{b:g}": int(np.searchsorted(frac, b + 1e-12, side="right")) for b in budgets}
    rank = np.empty_like(leaf_order)  # each leaf's position in the query's order
    np.put_along_axis(rank, leaf_order, np.arange(leaf_order.shape[1])[None, :], axis=1)
    out = {}
    for b in budgets:
        w = widths[f"{b:g}"]
        if w == 0:
            out[f"{b:g}"] = None
            continue
        total = 0.0
        for s in range(0, len(q_emb), 512):
            sc = q_emb[s : s + 512] @ d_emb.T
            visited = rank[s : s + 512][:, doc_leaf] < w  # (q, N)
            sc = np.where(visited, sc, -np.inf)
            kth = -np.partition(-sc, min(k, n) - 1, axis=1)[:, min(k, n) - 1]
            for i, rows in enumerate(rel_rows[s : s + 512]):
                found = [visited[i, r] and sc[i, r] >= kth[i] for r in rows]
                total += float(np.mean(found))
        out[f"{b:g}"] = 100.0 * total / len(q_emb)
    return out, {key: float(frac[max(w - 1, 0)]) for key, w in widths.items()}


def spread_router(d_emb: np.ndarray, doc_leaf: np.ndarray, L: int, lam: float, rank: int):
    """``q -> q·μ_c + λ‖S_c q‖`` per leaf c (module docstring), as a scorer of (Q, d) rows."""
    d = d_emb.shape[1]
    mu = np.zeros((L, d), dtype=np.float32)
    S = np.zeros((L, rank, d), dtype=np.float32)
    for c in range(L):
        x = d_emb[doc_leaf == c]
        if not len(x):
            mu[c] = -np.inf  # an empty leaf is never worth visiting
            continue
        mu[c] = x.mean(0)
        if len(x) > 1:
            _, sv, vt = np.linalg.svd(x - mu[c], full_matrices=False)
            r = min(rank, len(sv))
            S[c, :r] = (sv[:r, None] / np.sqrt(len(x))) * vt[:r]
    flat = S.reshape(L * rank, d).T.copy()  # (d, L*r)

    def score(q: np.ndarray) -> np.ndarray:
        out = np.empty((len(q), L), dtype=np.float32)
        for s in range(0, len(q), 1024):
            qq = q[s : s + 1024]
            spread = np.linalg.norm((qq @ flat).reshape(len(qq), L, rank), axis=2)
            out[s : s + 1024] = qq @ mu.T + lam * spread
        return out

    return score


@torch.no_grad()
def leaf_scores(tree: Tree, x: np.ndarray) -> np.ndarray:
    return np.concatenate([tree.levels[0](torch.from_numpy(x[s : s + 4096])).numpy() for s in range(0, len(x), 4096)])


def run_corpus(name: str, spec: dict, args) -> dict:
    ds = load_beir(spec["path"])
    enc = Encoder(EncoderConfig())
    t0 = time.perf_counter()
    d_emb = embed(enc, ds.corpus.documents(), f"{name}: corpus")
    rel = ds.relevant("train")
    row = {d: i for i, d in enumerate(ds.corpus.ids)}
    train_q = sorted(q for q in rel if any(d in row for d in rel[q]))
    decide = {}
    for label, what in spec["decide"]:
        if isinstance(what, str):
            r = ds.relevant(what)
            decide[label] = sorted(q for q in r if any(d in row for d in r[q]))
            decide[label + ":rel"] = r
        else:
            order = np.random.default_rng(DECIDE_SEED).permutation(len(train_q))
            held = sorted(train_q[i] for i in order[: int(round(what * len(train_q)))])
            decide[label] = held
            decide[label + ":rel"] = rel
            hs = set(held)
            train_q = [q for q in train_q if q not in hs]
    q_texts = {q: ds.queries[q] for q in train_q}
    tq_emb = embed(enc, [q_texts[q] for q in train_q], f"{name}: train questions")
    spans, span_rows = [], []
    for s in range(args.spans):
        t, r = document_spans(ds.corpus, len(ds.corpus), seed=s)
        spans += t
        span_rows.append(r)
    span_rows = np.concatenate(span_rows) if span_rows else np.zeros(0, dtype=np.int64)
    sp_emb = embed(enc, spans, f"{name}: spans") if spans else np.zeros((0, d_emb.shape[1]), dtype=np.float32)
    print(f"[{name}] embeddings ready in {time.perf_counter() - t0:.0f} s: {len(d_emb)} docs, {len(train_q)} train questions, {len(spans)} spans", flush=True)
    L = TreeConfig().resolve_branching(len(d_emb))
    results = {"leaves": L, "train_questions": len(train_q), "spans": len(spans), "splits": {}}
    per_seed = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = Tree(d_emb.shape[1], TreeConfig(branching=L, height=1))
        base.init_kmeans(d_emb, seed=seed)
        km_scores_d = leaf_scores(base, d_emb)
        doc_leaf = km_scores_d.argmax(1)
        # training examples: (embedding, leaf, weight)
        tq_leaf, tq_x, tq_w = [], [], []
        for qi, q in enumerate(train_q):
            docs = [row[d] for d in rel[q] if d in row]
            for d in docs:
                tq_x.append(qi)
                tq_leaf.append(doc_leaf[d])
                tq_w.append(1.0 / len(docs))
        tq_x, tq_leaf, tq_w = np.array(tq_x), np.array(tq_leaf), np.array(tq_w)
        Xq, Yq, Wq = tq_emb[tq_x], tq_leaf, tq_w
        Xs, Ys, Ws = sp_emb, doc_leaf[span_rows], np.full(len(sp_emb), args.span_weight / max(args.spans, 1))
        variants = {"k-means": None, "questions": (Xq, Yq, Wq), "spans": (Xs, Ys, Ws),
                    "questions + spans": (np.concatenate([Xq, Xs]), np.concatenate([Yq, Ys]), np.concatenate([Wq, Ws]))}
        variants["questions, prior-adjusted"] = variants["questions"]
        variants["questions + spans, prior-adjusted"] = variants["questions + spans"]
        if args.only is not None:
            variants = {k: v for k, v in variants.items() if k == "k-means" or k in args.only}
        if not args.spans:
            variants = {k: v for k, v in variants.items() if "spans" not in k}
        routers = {}
        for vname, data in variants.items():
            tree = Tree(d_emb.shape[1], TreeConfig(branching=L, height=1))
            tree.load_state_dict(base.state_dict())
            t = time.perf_counter()
            if data is not None:
                x, y, w = data
                ex = RoutingExamples(x, y[:, None].astype(np.int64), w.astype(np.float32))
                fit_router(tree, ex, args.epochs, args.lr, 0.01, seed, adjust="adjusted" in vname)
            routers[vname] = (lambda x, tree=tree: leaf_scores(tree, x), time.perf_counter() - t, tree)
        for lam in args.spread:  # training-free: built from the documents of each leaf
            t = time.perf_counter()
            routers[f"mean + {lam:g}·spread (training-free)"] = (spread_router(d_emb, doc_leaf, L, lam, args.spread_rank), time.perf_counter() - t, None)
        fitted = routers.get("questions + spans, prior-adjusted", (None, None, None))[2]
        # the fitted change shrunk: start + a * (fitted - start), parameters of one tree
        for a in (args.blend if fitted is not None else []):
            tree = Tree(d_emb.shape[1], TreeConfig(branching=L, height=1))
            tree.load_state_dict(shrunk(base.state_dict(), fitted.state_dict(), a))
            routers[f"shrink {a:g} (q + spans, adjusted)"] = (lambda x, tree=tree: leaf_scores(tree, x), 0.0, tree)
        # the learned score as a bounded correction: half centroid log-probability, half learned
        for a in (args.blend if fitted is not None else []):
            km_s, qs_s = routers["k-means"][0], routers["questions + spans, prior-adjusted"][0]
            routers[f"blend {a:g} (q + spans, adjusted)"] = (lambda x, a=a, f=km_s, g=qs_s: (1 - a) * f(x) + a * g(x), 0.0, None)
        seed_out = {}
        for label, _ in spec["decide"]:
            qids, qrel = decide[label], decide[label + ":rel"]
            q_emb = embed(enc, [ds.queries[q] for q in qids], f"{name}: {label}")
            rel_rows = [[row[d] for d in qrel[q] if d in row] for q in qids]
            out = {}
            for vname, (scorer, secs, _) in routers.items():
                s = scorer(q_emb)
                order = np.argsort(-s, axis=1)
                rec, vis = recall_at(q_emb, d_emb, doc_leaf, order, rel_rows, BUDGETS)
                # where the (first) positive's leaf ranks
                pos_leaf = np.array([doc_leaf[r[0]] for r in rel_rows])
                rank = (s > s[np.arange(len(s)), pos_leaf][:, None]).sum(1)
                entry = {"R@100": rec, "visited": vis, "pos_leaf_rank1": 100.0 * float((rank == 0).mean()),
                         "pos_leaf_rank_median": float(np.median(rank)), "train_s": secs}
                if vname != "k-means":  # the same router also assigns the documents
                    dl = scorer(d_emb).argmax(1)
                    entry["docs re-routed"] = recall_at(q_emb, d_emb, dl, order, rel_rows, BUDGETS)[0]
                out[vname] = entry
            # oracle: the positive's leaf first, then the centroid order
            s = routers["k-means"][0](q_emb)
            pos_leaf = np.array([doc_leaf[r[0]] for r in rel_rows])
            s[np.arange(len(s)), pos_leaf] = np.inf
            out["oracle (positive's leaf first)"] = {"R@100": recall_at(q_emb, d_emb, doc_leaf, np.argsort(-s, axis=1), rel_rows, BUDGETS)[0]}
            exact = recall_at(q_emb, d_emb, np.zeros(len(d_emb), dtype=np.int64), np.zeros((len(q_emb), 1), dtype=np.int64), rel_rows, (1.0,))[0]
            out["exact"] = exact["1"]
            seed_out[label] = out
            print(f"[{name}] seed {seed} {label} ({len(qids)} queries): exact {exact['1']:.1f}", flush=True)
            for vname, e in out.items():
                if vname == "exact":
                    continue
                r = " ".join("   -  " if v is None else f"{v:6.1f}" for v in e["R@100"].values())
                extra = ""
                if "docs re-routed" in e:
                    extra = " | docs re-routed " + " ".join("   -  " if v is None else f"{v:6.1f}" for v in e["docs re-routed"].values())
                rank = f" | pos leaf @1 {e['pos_leaf_rank1']:.1f}%" if "pos_leaf_rank1" in e else ""
                print(f"  {vname:<32} {r}{rank}{extra}", flush=True)
        per_seed.append(seed_out)
    for label, _ in spec["decide"]:
        agg = {}
        for vname in per_seed[0][label]:
            if vname == "exact":
                agg[vname] = float(np.mean([s[label][vname] for s in per_seed]))
                continue
            agg[vname] = {}
            for key in ("R@100", "docs re-routed"):
                if key in per_seed[0][label][vname]:
                    agg[vname][key] = {
                        b: (None if any(s[label][vname][key][b] is None for s in per_seed)
                            else float(np.mean([s[label][vname][key][b] for s in per_seed])))
                        for b in per_seed[0][label][vname][key]
                    }
            for key in ("pos_leaf_rank1", "pos_leaf_rank_median"):
                if key in per_seed[0][label][vname]:
                    agg[vname][key] = float(np.mean([s[label][vname][key] for s in per_seed]))
        results["splits"][label] = {"queries": len(decide[label]), "mean": agg, "per_seed": [s[label] for s in per_seed]}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3, help="the indexer's default learning rate")
    ap.add_argument("--spans", type=int, default=4, help="spans per document")
    ap.add_argument("--span-weight", type=float, default=1.0, help="what one document's spans weigh together, against one question")
    ap.add_argument("--blend", type=float, nargs="*", default=[0.5], help="weights of the learned score in a centroid/learned blend, and shrink factors of the fitted change")
    ap.add_argument("--spread", type=float, nargs="*", default=[], help="λ of the training-free mean + λ·spread router (one variant each)")
    ap.add_argument("--spread-rank", type=int, default=8, help="principal directions per leaf in its spread sketch")
    ap.add_argument("--only", nargs="*", help="the trained variants to run (k-means always runs); default: all")
    ap.add_argument("--out", default="reports/routing_generalization.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = {"budgets": list(BUDGETS), "args": vars(args), "corpora": {}}
    for c in args.corpus:
        res["corpora"][c] = run_corpus(c, CORPORA[c], args)
    res["command"] = " ".join(sys.argv)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
