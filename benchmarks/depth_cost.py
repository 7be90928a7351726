"""What a tree's height costs in training and placement, by leaf count: the crossover behind
``ehi train``'s automatic height (``tree.height: 0``).

Under the spread router a search ranks the leaves themselves, so the height changes neither
what a search visits nor its cost; it changes the tree's training step (a flat tree scores
all L leaves of every row, a (B, 2) tree 2·B) and the placement of documents (every node
expanded: L leaves either way, see ``Router.place_upper``). Measured on random unit vectors
(d = 384, the default encoder's), k-means-free random trees, ``--threads`` threads:

- step: one training step of the tree alone — route ``--rows`` rows (a batch of 64 pairs
  with 4 hard negatives each: 384), a triplet hinge on the path embeddings, backward, AdamW;
- place: per document, its top leaf with every node above expanded (numpy / Faiss, as the
  index is built);
- route (``--route``): one query's leaves at 1 % of the leaves, by the spread router (the
  default search, the same for every height) against a Faiss flat and HNSW quantizer over the
  same leaves' centroids, and a two-level spread router (an experiment: cells of sqrt(L)
  leaves choose the leaves scored); clustered synthetic documents (the generator of
  ``scale.py``), ``--per-leaf`` per leaf, leaves = nearest of L random documents (no k-means:
  at 16k leaves it would take longer than the measurement); queries drawn near documents.

    python benchmarks/depth_cost.py --out benchmarks/results/depth_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np
import torch
from lib.common import write_json
from lib.synthetic import Corpus1M, near

from ehi.config import IndexConfig, TreeConfig
from ehi.model.kmeans import balanced_groups
from ehi.model.leaf_sketch import LeafSketch
from ehi.model.tree import Tree
from ehi.training.losses import triplet_hinge

D = 384


def shapes(leaves: int) -> list[tuple[int, int]]:
    """(B, H) with B^H = ``leaves`` exactly, for H = 1, 2, 3."""
    out = [(leaves, 1)]
    for h in (2, 3):
        b = round(leaves ** (1 / h))
        if b**h == leaves:
            out.append((b, h))
    return out


def median_ms(fn, reps: int) -> float:
    fn()  # warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--docs", type=int, default=4096, help="documents placed per timing")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--route", action="store_true", help="also time one query's routing by leaf count")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--per-leaf", type=int, default=40, help="documents per leaf for --route")
    ap.add_argument("--out", default="benchmarks/results/depth_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.normal(size=(n, D)).astype(np.float32))
    e = torch.from_numpy(unit(args.rows))
    docs = unit(args.docs)
    rows = []
    print(f"{'leaves':>7} {'tree':>12} {'params M':>9} {'step ms':>8} {'x flat':>7} {'place us/doc':>13}", flush=True)
    for L in args.leaves:
        flat_step = None
        for B, H in shapes(L):
            torch.manual_seed(0)
            tree = Tree(D, TreeConfig(branching=B, height=H))
            opt = torch.optim.AdamW(tree.parameters(), lr=1e-3)
            b = args.rows // 6  # 64 pairs: q, p and 4 negatives per pair, as a batch routes them

            def step():
                t = tree.route(e).path_embedding
                loss = triplet_hinge(t[:b], t[b : 2 * b], t[2 * b :], torch.ones(b, len(t) - 2 * b, dtype=torch.bool), 0.3)
                opt.zero_grad()
                loss.backward()
                opt.step()

            step_ms = median_ms(step, args.reps)
            flat_step = flat_step or step_ms
            router = tree.router()
            upper = L // B  # every node above the leaves (Router.place_upper)
            place_us = 1000 * median_ms(lambda: router.leaves(docs, 1, upper), args.reps) / args.docs
            params = sum(p.numel() for p in tree.parameters()) / 1e6
            rows.append({"leaves": L, "branching": B, "height": H, "params_M": params, "step_ms": step_ms,
                         "step_over_flat": step_ms / flat_step, "place_us_per_doc": place_us})
            print(f"{L:>7} {f'({B}, {H})':>12} {params:>9.2f} {step_ms:>8.2f} {step_ms / flat_step:>7.2f} {place_us:>13.2f}", flush=True)
    routes = route_costs(args) if args.route else []
    write_json(args.out, {"rows": rows, "routing": routes, "dim": D, "rows_per_step": args.rows, "threads": args.threads,
                          "command": "python benchmarks/depth_cost.py" + (" --route" if args.route else "")})


def route_costs(args) -> list[dict]:
    """Per-query routing at 1 % of the leaves: the spread router against Faiss quantizers, and
    (an experiment, not shipped) a two-level spread router over cells of sqrt(L) leaves."""
    faiss.omp_set_num_threads(1)  # one query at a time, as a server sees them
    ic = IndexConfig()
    lam = ic.spread_lambda
    out = []
    print(f"\n{'leaves':>7} {'beam':>5} {'router':<34} {'us/query':>9} {'x spread':>9} {'source leaf reached':>20} {'= spread leaves':>16}", flush=True)
    for L in args.leaves:
        corpus = Corpus1M(args.per_leaf * L, seed=0)
        x = np.concatenate([c for _, c in corpus.chunks()])
        rng = np.random.default_rng(1)
        cent = np.ascontiguousarray(x[rng.choice(len(x), L, replace=False)])
        flat = faiss.IndexFlatIP(D)
        flat.add(cent)
        leaves = flat.search(x, 1)[1][:, 0]
        sk = LeafSketch.fit(x, leaves, L, ic.spread_rank, ic.spread_basis, ic.spread_candidates)
        hnsw = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(cent)
        src = rng.choice(len(x), args.queries, replace=False)
        q = near(x[src], rng, 1.2).astype(np.float32)
        beam = max(1, L // 100)
        hnsw.hnsw.efSearch = max(64, beam)
        routers = {"spread (flat, shipped)": lambda e: sk.top(e, beam, lam),
                   "Faiss flat quantizer": lambda e: flat.search(e, beam)[1],
                   "Faiss HNSW quantizer": lambda e: hnsw.search(e, beam)[1]}
        B = round(L**0.5)
        if B * B == L and L >= 256:
            routers.update(two_level_routers(x, leaves, sk, B, beam, lam))
        ref = sk.top(q, beam, lam)
        base_us = None
        for name, route in routers.items():
            us = 1000 * median_ms(lambda: [route(q[i : i + 1]) for i in range(len(q))], args.reps) / len(q)
            got = np.concatenate([route(q[i : i + 1]) for i in range(len(q))])
            base_us = base_us or us
            row = {"leaves": L, "beam": beam, "router": name, "us_per_query": us, "over_spread": us / base_us,
                   "source_leaf_reached": float(np.mean([leaves[s] in g for s, g in zip(src, got)])),
                   "spread_leaves_found": float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref.tolist(), got.tolist())]))}
            out.append(row)
            print(f"{L:>7} {beam:>5} {name:<34} {us:>9.1f} {us / base_us:>9.2f} {100 * row['source_leaf_reached']:>19.1f}% "
                  f"{100 * row['spread_leaves_found']:>15.1f}%", flush=True)
    return out


def two_level_routers(x, leaves, sk, B, beam, lam) -> dict:
    """The leaves grouped into B cells of B (balanced k-means over the leaf means, as a
    bottom-up tree's cells are); a query's best ``cells`` cells by their own spread sketch
    give the candidate leaves, scored like the flat router's candidates (the shared basis's
    cheap score picks max(24, 4 x beam), scored exactly)."""
    means = sk.means / np.maximum(np.linalg.norm(sk.means, axis=1, keepdims=True), 1e-12)
    cell_of = balanced_groups(means, B, B, seed=0)
    members = np.argsort(cell_of, kind="stable").reshape(B, B)  # the leaves of each cell
    cells = LeafSketch.fit(x, cell_of[leaves], B, sk.rank)
    L, r, k = sk.num_leaves, sk.rank, sk.basis
    coords = np.ascontiguousarray(sk._coords.T.reshape(L, r, k))  # leaf-major: one gather per query
    M = max(24, 4 * beam)

    def route(e, C):
        qv = e[0]
        cand = members[cells.top(e, C, lam)[0]].ravel()
        base = sk.means[cand] @ qv
        y = coords[cand] @ (qv @ sk._proj)
        cheap = base + lam * np.sqrt((y * y).sum(1))
        if M < len(cand):
            keep = np.argpartition(-cheap, M - 1)[:M]
            cand, base = cand[keep], base[keep]
        z = sk.spread[cand].reshape(len(cand) * r, -1) @ qv
        sc = base + lam * np.sqrt((z * z).reshape(len(cand), r).sum(1))
        return cand[np.argsort(-sc, kind="stable")[:beam]][None]

    need = -(-M // B)  # cells whose leaves can hold the candidates
    return {f"two-level spread, {C} of {B} cells": (lambda e, C=C: route(e, C)) for C in sorted({need, 2 * need, 4 * need}) if C <= B}


if __name__ == "__main__":
    main()
