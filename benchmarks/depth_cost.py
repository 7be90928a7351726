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
  same leaves' centroids; clustered synthetic documents (the generator of ``scale.py``), 10
  per leaf, leaves = nearest of L random documents (no k-means: at 16k leaves it would
  take longer than the measurement).

    python benchmarks/depth_cost.py --out benchmarks/results/depth_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from lib.common import write_json

from ehi.config import TreeConfig
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
    """Per-query routing at 1 % of the leaves: spread router against Faiss quantizers."""
    import faiss
    from lib.synthetic import Corpus1M, near

    from ehi.config import IndexConfig
    from ehi.model.leaf_sketch import LeafSketch

    faiss.omp_set_num_threads(1)  # one query at a time, as a server sees them
    ic = IndexConfig()
    out = []
    print(f"\n{'leaves':>7} {'beam':>5} {'spread us':>10} {'flat q us':>10} {'HNSW q us':>10} {'spread/flat':>12}", flush=True)
    for L in args.leaves:
        corpus = Corpus1M(10 * L, seed=0)
        x = np.concatenate([c for _, c in corpus.chunks()])
        rng = np.random.default_rng(1)
        cent = np.ascontiguousarray(x[rng.choice(len(x), L, replace=False)])
        flat = faiss.IndexFlatIP(D)
        flat.add(cent)
        leaves = flat.search(x, 1)[1][:, 0]
        sk = LeafSketch.fit(x, leaves, L, ic.spread_rank, ic.spread_basis, ic.spread_candidates)
        hnsw = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.add(cent)
        q = near(x[rng.choice(len(x), args.queries, replace=False)], rng, 1.2).astype(np.float32)
        beam = max(1, L // 100)
        hnsw.hnsw.efSearch = max(64, beam)

        def per_query_us(fn) -> float:
            return 1000 * median_ms(lambda: [fn(q[i : i + 1]) for i in range(len(q))], args.reps) / len(q)

        row = {"leaves": L, "beam": beam, "spread_us": per_query_us(lambda e: sk.top(e, beam, ic.spread_lambda)),
               "flat_quantizer_us": per_query_us(lambda e: flat.search(e, beam)),
               "hnsw_quantizer_us": per_query_us(lambda e: hnsw.search(e, beam))}
        out.append(row)
        print(f"{L:>7} {beam:>5} {row['spread_us']:>10.1f} {row['flat_quantizer_us']:>10.1f} {row['hnsw_quantizer_us']:>10.1f} "
              f"{row['spread_us'] / row['flat_quantizer_us']:>12.2f}", flush=True)
    return out


if __name__ == "__main__":
    main()
