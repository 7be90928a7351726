"""Which leaf scorer a trained EHI model should search with (issue 31): its learned tree, the
training-free mean + λ·spread of each leaf's documents, or both.

``routing_generalization.py`` showed the training-free router beats centroid routing over the
*untrained* encoder's k-means leaves. This asks the question the product needs: over a
*trained* model's own encoder and leaves (documents stay where the tree put them), does the
spread router beat the learned tree on questions about documents no training question touched,
and what does it cost on the touched ones? Variants, each a (Q, L) leaf score:

- ``tree``: the model's learned router (what ``ehi search`` ships);
- ``means``: each leaf's mean document, ``q·μ_c`` (centroid routing over the tree's leaves);
- ``spread λ``: ``q·μ_c + λ‖S_c q‖`` (``ehi.model.leaf_sketch``; rank ``--rank``);
- ``spread λ, basis k``: the same with every leaf's directions projected on one shared
  k-dimensional basis (``--basis``; a single query's product then fits in a core's L2);
- ``tree + w·spread λ``: both standardised per query (each leaf's score minus the query's mean
  over leaves, over its standard deviation), summed with weight ``w`` on the spread.

Recall@100 at 1 / 2 / 5 / 10 / 20 % of the corpus visited (the shared budget rule, measured on
the judged queries) over touched and untouched queries apart. Decision splits only:

- a model trained with ``--no-refit`` (``--held-out``): its validation hold-out of the training
  queries, which it never trained on; touched = a remaining training query shares a relevant
  document;
- a model trained on every training query, judged on ``--split dev`` (touched by the train qrels).

    python benchmarks/spread_routing.py --model runs/cf --data ../shared/datasets/climate-fever-dev --split dev
    python benchmarks/spread_routing.py --model /tmp/sf0 --data ../shared/datasets/scifact --held-out
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from lib.common import write_json

from ehi.data import load_beir
from ehi.evaluation.evaluate import TOUCHED, UNTOUCHED, add_touch_split, ehi_curve, split_by_touch, untouched_queries
from ehi.model.ehi_model import EHIModel
from ehi.model.leaf_sketch import MIN_CANDIDATES, LeafSketch
from ehi.training.validation import holdout

BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)


def standardised(s: np.ndarray) -> np.ndarray:
    s = s - s.mean(1, keepdims=True)
    return s / np.maximum(s.std(1, keepdims=True), 1e-9)


@torch.no_grad()
def tree_scores(model: EHIModel, q: np.ndarray) -> np.ndarray:
    return np.concatenate([model.tree.leaf_log_probs(torch.from_numpy(q[s : s + 4096])).numpy() for s in range(0, len(q), 4096)])


def judged(model: EHIModel, ds, args):
    """(query ids, qrels, (touched, untouched) ids, what they are)."""
    if args.held_out:
        split = "train"
        train_q, val_q, _ = holdout(ds, split, None, model.config.train)
        if not val_q:
            raise SystemExit("the model's config holds out no training queries")
        rel = ds.relevant(split)
        touched_docs = {d for q in train_q for d in rel[q]}
        qids = sorted(val_q)
        new = set(untouched_queries(qids, rel, touched_docs))
        groups = ([q for q in qids if q not in new], sorted(new))
        what = f"{len(qids)} held-out training queries (never trained on)"
    else:
        split = args.split
        rel = ds.relevant(split)
        qids = sorted(rel)
        groups = split_by_touch(ds, qids, split)
        what = f"{len(qids)} {split} queries"
    qrels = {q: ds.split(split)[q] for q in qids}
    return qids, qrels, groups, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--held-out", action="store_true", help="judge the model's validation hold-out of the train queries (a --no-refit model)")
    ap.add_argument("--lam", type=float, nargs="*", default=[1.0, 2.0, 3.0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--blend", type=float, nargs="*", default=[0.5, 1.0, 2.0], help="weights w of tree + w·spread (at the first --lam)")
    ap.add_argument("--blend-lam", type=float, default=2.0)
    ap.add_argument("--candidates", type=int, nargs="*", default=[],
                    help="also: spread at --blend-lam computed only for the M leaves of highest mean (at least the beam), for each M (issue 33: a cheaper single query)")
    ap.add_argument("--basis", type=int, nargs="*", default=[],
                    help="also: spread at --blend-lam scored in a basis of this many dimensions shared by all leaves, for each (issue 33: L2-sized products)")
    ap.add_argument("--candidates-per-beam", type=float, nargs="*", default=[], help="the same with M = this many times the beam (at least --candidates-min)")
    ap.add_argument("--candidates-min", type=int, default=MIN_CANDIDATES)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model = EHIModel.load(args.model)
    ds = load_beir(args.data)
    qids, qrels, groups, what = judged(model, ds, args)
    enc = model.encoder
    q = enc.embed_all(enc.features([ds.queries[i] for i in qids], "encoding queries"))
    t = time.perf_counter()
    sketch = LeafSketch.fit(model.index.vectors, model.index.doc_leaves, model.tree.num_leaves, args.rank)
    fit_s = time.perf_counter() - t
    tree = tree_scores(model, q)
    variants = {"tree": tree, "means": sketch.scores(q, 0.0)}
    for lam in args.lam:
        variants[f"spread {lam:g}"] = sketch.scores(q, lam)
    for k in args.basis:
        variants[f"spread {args.blend_lam:g}, basis {k}"] = LeafSketch(sketch.means, sketch.spread, sketch.counts, k).scores(q, args.blend_lam, approximate=True)
    zt, zs = standardised(tree), standardised(sketch.scores(q, args.blend_lam))
    for w in args.blend:
        variants[f"tree + {w:g}·spread {args.blend_lam:g}"] = zt + w * zs

    pruned = {f"spread {args.blend_lam:g}, {m} candidates": (lambda beam, m=m: m) for m in args.candidates}
    pruned |= {f"spread {args.blend_lam:g}, {c:g}x beam candidates": (lambda beam, c=c: max(args.candidates_min, int(c * beam))) for c in args.candidates_per_beam}
    # the candidates ranked by the shared basis's score instead of the mean, then scored exactly
    sketches = {name: sketch for name in pruned}
    for k in args.basis:
        based = LeafSketch(sketch.means, sketch.spread, sketch.counts, k)
        for c in args.candidates_per_beam:
            name = f"basis {k}, {c:g}x beam (≥{args.candidates_min}) exact"
            pruned[name], sketches[name] = (lambda beam, c=c: max(args.candidates_min, int(c * beam))), based

    print(f"{args.model} on {what}: {len(groups[0]) if groups else '?'} touched, {len(groups[1]) if groups else '?'} untouched; sketch fit {fit_s:.1f} s")
    results = {}
    for name in [*variants, *pruned]:
        if name in pruned:  # routed per width, as search does: pruning depends on the beam
            model.route = lambda emb, beam, m=pruned[name], sk=sketches[name]: sk.top(emb, beam, args.blend_lam, candidates=m(beam))
        else:
            order = np.argsort(-variants[name], axis=1, kind="stable")
            model.route = lambda emb, beam, order=order: order[:, :beam]  # only ever asked about q
        rows = ehi_curve(name, model, q, qids, qrels, BUDGETS)
        add_touch_split(rows, groups)
        results[name] = {f"{r.budget:g}": {k: r.metrics.get(k) for k in ("R@100", TOUCHED, UNTOUCHED)} | {"visited": r.fraction_visited} for r in rows}
    for m in ("R@100", TOUCHED, UNTOUCHED):
        print(f"\n{m}")
        print(f"{'router':<28}" + "".join(f"{100 * b:>7.0f}%" for b in BUDGETS))
        for name, res in results.items():
            cells = [res.get(f"{b:g}", {}).get(m) for b in BUDGETS]
            print(f"{name:<28}" + "".join(f"{c:>8.1f}" if c is not None else f"{'—':>8}" for c in cells))
    if args.out:
        write_json(args.out, {"model": args.model, "data": args.data, "judged": what, "touched": len(groups[0]) if groups else None,
                              "untouched": len(groups[1]) if groups else None, "rank": args.rank, "sketch_fit_s": fit_s, "results": results})


if __name__ == "__main__":
    main()
