"""Frozen experiment: results/hierarchy_cells.json were measured at commit fdfe964 (2026-11-23), a design experiment (no training). Kept so that it can be rerun; not kept up with today's defaults.

Why deep trees route worse than flat ones: the partition, measured without any training.

On the untrained encoder's embeddings, for the (query, relevant document) pairs of the
decision queries (SciFact: a fixed 20 % of train claims; Climate-FEVER: dev), the share of
pairs whose query lands in the leaf that holds the document, under:
- flat spherical k-means with B^H leaves (what a one-level tree starts from);
- hierarchical k-means (B cells, then B children k-means'd inside each cell; what per-node
  trees start from), greedy;
- bottom-up: the flat k-means leaves grouped into B balanced cells of B leaves, routed with
  ``upper`` cells expanded, leaves ranked by path log-probability (EHI's beam search) or by
  their own score (flat-equivalent when every cell is expanded).

    python benchmarks/experiments/hierarchy_cells.py --out benchmarks/results/hierarchy_cells.json
"""

from __future__ import annotations

import argparse

import _path  # noqa: F401  (benchmarks/ on the import path, for lib)
import numpy as np
from lib.common import write_json
from lib.corpora import CORPORA, split_queries

from ehi.config import EncoderConfig
from ehi.data import load_beir
from ehi.encode.encoder import Encoder
from ehi.model.kmeans import balanced_groups, spherical_kmeans

T = 0.1  # the tree's k-means temperature


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branching", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/hierarchy_cells.json")
    args = ap.parse_args()
    B = args.branching
    enc = Encoder(EncoderConfig())
    out = {"branching": B, "height": 2, "corpora": {}}
    for name, corpus in CORPORA.items():
        ds = load_beir(corpus["path"])
        _, decide, split = split_queries(ds, corpus, 0.2)
        D = enc.embed_all(enc.features(ds.corpus.documents(), f"encoding {name}"))
        Q = enc.embed_all(enc.features([ds.queries[q] for q in decide], "encoding queries"))
        row = {d: i for i, d in enumerate(ds.corpus.ids)}
        pairs = np.array([(qi, row[d]) for qi, q in enumerate(decide) for d, s in ds.split(split)[q].items() if s > 0 and d in row])

        def same(q_leaf, d_leaf):
            return float(np.mean(q_leaf[pairs[:, 0]] == d_leaf[pairs[:, 1]]))

        res = {}
        C = spherical_kmeans(D, B * B, 25, 0)
        res["flat k-means"] = same((Q @ C.T).argmax(1), (D @ C.T).argmax(1))
        top = spherical_kmeans(D, B, 25, 0)
        cd, cq = (D @ top.T).argmax(1), (Q @ top.T).argmax(1)
        res["top-level cell only"] = same(cq, cd)
        ld, lq = np.zeros(len(D), int), np.zeros(len(Q), int)
        for j in range(B):
            sub = spherical_kmeans(D[cd == j], B, 25, j + 1) if (cd == j).sum() >= B else top[[j] * B]
            ld[cd == j] = j * B + (D[cd == j] @ sub.T).argmax(1)
            lq[cq == j] = j * B + (Q[cq == j] @ sub.T).argmax(1)
        res["hierarchical k-means, greedy"] = same(lq, ld)
        grp = balanced_groups(C, B, B, 0)
        kids = np.stack([np.flatnonzero(grp == g) for g in range(B)])  # (B, B) leaf centroids per cell
        G = np.stack([C[k].mean(0) for k in kids])
        G /= np.linalg.norm(G, axis=1, keepdims=True)

        def bottom_up(X, upper, by):
            l0 = log_softmax(X @ G.T / T)
            cells = np.argsort(-l0, axis=1)[:, :upper]
            logits = np.einsum("nd,nkbd->nkb", X, C[kids[cells]]) / T
            s = logits if by == "leaf" else np.take_along_axis(l0, cells, 1)[:, :, None] + log_softmax(logits)
            best = s.reshape(len(X), -1).argmax(1)
            return kids[cells].reshape(len(X), -1)[np.arange(len(X)), best]

        for by in ("path", "leaf"):
            for upper in (1, 2, 3, B):
                res[f"bottom-up, {upper} cells expanded, ranked by {by}"] = same(bottom_up(Q, upper, by), bottom_up(D, upper, by))
        out["corpora"][name] = {"pairs": len(pairs), "same_leaf": res}
        print(f"\n{name}: share of {len(pairs)} (query, relevant document) pairs in the same leaf, {B}x{B} = {B * B} leaves")
        for k, v in res.items():
            print(f"  {k:<48} {100 * v:5.1f} %")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
