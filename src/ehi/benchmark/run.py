"""``ehi benchmark``: EHI against the two-stage pipeline, same encoder, same budget, same run.

Methods, each evaluated at every budget under one rule (``evaluation.BUDGET_RULE``):
- EHI: the jointly trained encoder and tree (searched with the model's router, by default
  the spread router over the tree's leaves);
- DE + exact / Faiss-IVF / ScaNN / spread router / HNSW: a dual encoder (same base model,
  trainable scope, epochs and batch size as EHI) trained with the siamese loss only, hard
  negatives from exact search, then indexed with off-the-shelf partitions of as many lists as
  EHI has leaves (the spread router: spherical k-means lists probed by the training-free
  mean + spread score, after Optimist), or a Faiss HNSW graph (M 32, efConstruction 200;
  efSearch is its width, the documents it scores its cost);
- EHI encoder + the same: EHI's trained encoder with the off-the-shelf indexes on top (paper
  appendix E.8), which isolates what the learned tree adds;
- untrained encoder + the same: the base model as it ships, no training at all: what a user
  gets without ehi;
- ablations of EHI (``--ablation NAME``).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ehi import __version__
from ehi.artifacts import write_file_atomic
from ehi.benchmark.report import write_report
from ehi.config import EHIConfig, apply_overrides
from ehi.data import Dataset
from ehi.evaluation.evaluate import (
    BUDGET_RULE,
    BUDGETS,
    Row,
    add_touch_split,
    budget_curve,
    ehi_curve,
    exact_row,
    ivf_curve,
    split_by_touch,
)
from ehi.progress import bars, phase

ABLATIONS: dict[str, dict] = {
    "no-siamese": {"train.lambda_siamese": 0.0},
    "no-indexing": {"train.lambda_indexing": 0.0},
    "no-intra-leaf": {"train.lambda_intra_leaf": 0.0},
    "no-hard-negatives": {"train.hard_negatives": 0},
    "refresh-1": {"train.refresh_every": 1},
    "refresh-10": {"train.refresh_every": 10},
    "B40-H1": {"tree.branching": 40, "tree.height": 1},
    "B6-H2": {"tree.branching": 6, "tree.height": 2},
    "B4-H3": {"tree.branching": 4, "tree.height": 3},
    "d2l-2": {"index.d2l": 2},
    "d2l-3": {"index.d2l": 3},
    "random-init": {"tree.init": "random"},
    "no-balance": {"train.load_balance": 0.0},
}
BASELINES = (
    "DE + Faiss-IVF", "DE + ScaNN", "DE + HNSW", "DE + spread router", "untrained encoder + Faiss-IVF", "untrained encoder + ScaNN",
    "untrained encoder + HNSW", "untrained encoder + spread router", "EHI encoder + Faiss-IVF",
)


def dual_encoder_config(config: EHIConfig) -> EHIConfig:
    """The DE baseline: EHI's encoder settings, the siamese loss only, exact-search negatives."""
    return apply_overrides(
        config,
        {
            "train.lambda_indexing": 0.0,
            "train.lambda_intra_leaf": 0.0,
            "train.load_balance": 0.0,
            "train.negatives_from": "exact",
            # no tree is learned: the dual encoder trains on every training query, last epoch
            "train.val_fraction": 0.0,
        },
    )


@dataclass
class SeedRun:
    seed: int
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    leaf_sizes: dict[str, list[int]] = field(default_factory=dict)
    validation: dict | None = None  # EHI's validated-training report (curve, kept epoch)
    touch_counts: dict | None = None  # evaluated queries that training queries touch / do not


def index_curves(
    prefix, q_emb, d_emb, nlist, seed, qids, doc_ids, qrels, budgets, k=100, scann=True, exact=None, truth=None, hnsw=True, spread=True,
):
    """Exact search, Faiss-IVF, ScaNN, spherical k-means probed by the training-free spread
    router (``SpreadIVFBaseline``) and HNSW over one set of embeddings; ``exact`` and
    ``truth``: the exact row and neighbours already computed (``exact_row_and_truth``), for
    neighbour recall."""
    from ehi.evaluation.baselines import HNSWBaseline, ScaNNBaseline, SpreadIVFBaseline

    rows = [exact or exact_row(f"{prefix} + exact", q_emb, d_emb, qids, doc_ids, qrels, k)]
    ivf_rows, ivf = ivf_curve(f"{prefix} + Faiss-IVF", q_emb, d_emb, nlist, seed, qids, doc_ids, qrels, budgets, k, truth)
    rows += ivf_rows
    sizes = {f"{prefix} + Faiss-IVF": ivf.list_sizes.tolist()}
    if scann:
        sc = ScaNNBaseline(d_emb, nlist, seed)
        rows += budget_curve(
            f"{prefix} + ScaNN", nlist, lambda w: sc.visited_fraction(q_emb, w),
            lambda w: sc.search(q_emb, k, w)[:2], qids, doc_ids, qrels, budgets, truth,
        )
    if spread:
        sp = SpreadIVFBaseline(d_emb, nlist, seed)
        with sp.sketch.sweeping():
            rows += budget_curve(
                f"{prefix} + spread router", nlist, lambda w: sp.visited_fraction(q_emb, w),
                lambda w: sp.search(q_emb, k, w)[:2], qids, doc_ids, qrels, budgets, truth,
            )
    if hnsw:
        hn = HNSWBaseline(d_emb)
        rows += budget_curve(
            f"{prefix} + HNSW", hn.max_width, lambda w: hn.visited_fraction(q_emb, w, k),
            lambda w: hn.search(q_emb, k, w)[:2], qids, doc_ids, qrels, budgets, truth,
        )
    return rows, sizes


def untrained_encoder(config: EHIConfig):
    """The base model as it ships (the adapter starts as the identity): the no-training row."""
    from ehi.encode.encoder import Encoder

    enc = Encoder(config.encoder, device=config.train.device)
    enc.eval()
    return enc


def run_seed(dataset: Dataset, config: EHIConfig, seed: int, split: str, budgets, ablations, progress=True) -> SeedRun:
    from ehi.training.trainer import Trainer

    out = SeedRun(seed)
    rel = dataset.relevant(split)
    qids = sorted(rel)
    qrels = {q: dataset.split(split)[q] for q in qids}
    texts = [dataset.queries[q] for q in qids]
    doc_ids = dataset.corpus.ids
    touch = split_by_touch(dataset, qids, split)
    if touch:
        out.touch_counts = {"touched": len(touch[0]), "untouched": len(touch[1])}

    def train(cfg, label):
        t = time.perf_counter()
        trainer = Trainer(apply_overrides(cfg, {"train.seed": seed}), dataset)
        model = trainer.fit(progress=False)
        out.timings[f"train {label}"] = time.perf_counter() - t
        q_emb = model.encoder.embed_all(model.encoder.features(texts, "encoding queries"))
        return model, q_emb

    steps = ["EHI", "DE"] + list(ablations)
    bar = tqdm(steps, desc=f"seed {seed}", disable=not bars(progress))
    for step in bar:
        bar.set_postfix_str(step)
        if progress:
            phase(f"seed {seed}: {step}")
        t = time.perf_counter()
        done = len(out.rows)
        if step == "EHI":
            model, q_emb = train(config, "EHI")
            out.validation = model.validation
            out.rows += ehi_curve("EHI", model, q_emb, qids, qrels, budgets)
            rows, sizes = index_curves("EHI encoder", q_emb, model.index.embeddings, model.tree.num_leaves, seed, qids, doc_ids, qrels, budgets)
            out.rows += rows
            out.leaf_sizes["EHI"] = model.index.leaf_sizes().tolist()
            out.leaf_sizes.update(sizes)
            nlist = model.tree.num_leaves
            base = untrained_encoder(config)
            bq = base.embed_all(base.features(texts, "encoding queries"))
            bd = base.embed_all(base.features(dataset.corpus.documents(), "encoding corpus"))
            rows, _ = index_curves("untrained encoder", bq, bd, nlist, seed, qids, doc_ids, qrels, budgets)
            out.rows += rows
        elif step == "DE":
            de, q_emb = train(dual_encoder_config(config), "DE")
            rows, sizes = index_curves("DE", q_emb, de.index.embeddings, nlist, seed, qids, doc_ids, qrels, budgets)
            out.rows += rows
            out.leaf_sizes.update(sizes)
        else:
            m, q_emb = train(apply_overrides(config, ABLATIONS[step]), step)
            out.rows += ehi_curve(f"EHI ({step})", m, q_emb, qids, qrels, budgets)
        add_touch_split(out.rows[done:], touch)
        out.timings[f"evaluate {step}"] = time.perf_counter() - t - out.timings.get(f"train {step}", 0.0)
        if progress:
            phase(f"seed {seed}: {step} done in {time.perf_counter() - t:.0f}s\n" + finished_rows(out.rows[done:]))
    return out


def finished_rows(rows: list[Row]) -> str:
    """One line per method just measured: R@100 at each budget up to 20 % (exact: alone)."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.method, []).append(r)
    lines = []
    for method, rs in by.items():
        cells = [f"{r.metrics.get('R@100', float('nan')):.1f}" + (f" @{r.budget:.0%}" if r.budget is not None else "") for r in rs
                 if r.budget is None or r.budget <= 0.2 + 1e-9]
        lines.append(f"  {method:<36} R@100 " + "  ".join(cells))
    return "\n".join(lines)


def run_seed_unsupervised(dataset: Dataset, config: EHIConfig, seed: int, split: str, budgets, progress=True) -> SeedRun:
    """Unsupervised EHI against Faiss-IVF and ScaNN over the same (frozen) encoder. Evaluated:
    the split's queries when it has qrels (pseudo-queries: every other query, else document
    spans), otherwise every query (pseudo-queries: document spans), never trained on."""
    from ehi.evaluation.evaluate import exact_row_and_truth, has_qrels
    from ehi.training.unsupervised import train_unsupervised

    out = SeedRun(seed)
    if has_qrels(dataset, split):
        qids = sorted(dataset.relevant(split))
        qrels = {q: dataset.split(split)[q] for q in qids}
    else:
        qids, qrels = sorted(q for q, text in dataset.queries.items() if text.strip()), None
    held = set(qids)
    others = [q for q in dataset.queries if q not in held]
    t = time.perf_counter()
    if progress:
        phase(f"seed {seed}: EHI (no labels)")
    model, _ = train_unsupervised(
        dataset, apply_overrides(config, {"train.seed": seed}), source="queries" if others else "documents",
        query_ids=others or None, progress=False,
    )
    out.timings["train EHI"] = time.perf_counter() - t
    out.validation = model.validation
    enc = model.encoder
    q_emb = enc.embed_all(enc.features([dataset.queries[q] for q in qids], "encoding queries"))
    d_emb = model.index.embeddings
    t = time.perf_counter()
    exact, truth = exact_row_and_truth("encoder + exact", q_emb, d_emb, qids, model.doc_ids, qrels)
    out.rows += ehi_curve("EHI", model, q_emb, qids, qrels, budgets, truth=truth)
    rows, sizes = index_curves("encoder", q_emb, d_emb, model.tree.num_leaves, seed, qids, model.doc_ids, qrels, budgets,
                               exact=exact, truth=truth)
    out.rows += rows
    out.leaf_sizes["EHI"] = model.index.leaf_sizes().tolist()
    out.leaf_sizes.update(sizes)
    out.timings["evaluate"] = time.perf_counter() - t
    if progress:
        phase(f"seed {seed}: done\n" + finished_rows(out.rows))
    return out


def aggregate(runs: list[SeedRun]) -> list[dict]:
    """Mean and std over seeds of every (method, budget) cell."""
    cells: dict[tuple, list[Row]] = {}
    for run in runs:
        for r in run.rows:
            cells.setdefault((r.method, r.budget), []).append(r)
    out = []
    for (method, budget), rows in cells.items():
        metrics = {
            m: {"mean": float(np.mean([r.metrics[m] for r in rows])), "std": float(np.std([r.metrics[m] for r in rows]))}
            for m in rows[0].metrics
        }
        out.append(
            {
                "method": method,
                "budget": budget,
                "seeds": len(rows),
                "width": [r.width for r in rows],
                "fraction_visited": {
                    "mean": float(np.mean([r.fraction_visited for r in rows])),
                    "std": float(np.std([r.fraction_visited for r in rows])),
                },
                "metrics": metrics,
            }
        )
    return out


def significance(runs: list[SeedRun], budgets, ehi: str = "EHI", baselines=BASELINES) -> list[dict]:
    """Paired Wilcoxon signed-rank test of per-query Recall@100 (averaged over seeds), EHI vs
    the baseline with the best mean Recall@100 at each budget."""
    from scipy.stats import wilcoxon

    def per_query(method, budget):
        vals = [r.per_query for run in runs for r in run.rows if r.method == method and r.budget == budget]
        if len(vals) < len(runs):
            return None
        qids = sorted(vals[0])
        return np.array([[v[q] for q in qids] for v in vals]).mean(0)

    out = []
    for b in budgets:
        e = per_query(ehi, b)
        cands = [(m, per_query(m, b)) for m in baselines]
        cands = [(m, v) for m, v in cands if v is not None]
        if e is None or not cands:
            continue
        best, bv = max(cands, key=lambda mv: mv[1].mean())
        diff = e - bv
        if np.allclose(diff, 0):
            p = 1.0
        else:
            p = float(wilcoxon(e, bv, zero_method="zsplit").pvalue)
        out.append(
            {
                "budget": b,
                "baseline": best,
                "ehi_R@100": 100 * float(e.mean()),
                "baseline_R@100": 100 * float(bv.mean()),
                "difference": 100 * float(diff.mean()),
                "p_value": p,
                "test": "Wilcoxon signed-rank, paired over queries, per-query R@100 averaged over seeds",
            }
        )
    return out


def own_encoder_gap(aggregate_cells: list[dict], budgets, ehi: str = "EHI", other: str = "EHI encoder + Faiss-IVF") -> list[dict]:
    """Per budget, EHI's learned tree against k-means (Faiss-IVF) over the very encoder EHI
    trained: what the learned routing adds, or costs."""
    by = {(c["method"], c["budget"]): c for c in aggregate_cells}
    out = []
    for b in budgets:
        e, o = by.get((ehi, b)), by.get((other, b))
        if e and o:
            ev, ov = e["metrics"]["R@100"]["mean"], o["metrics"]["R@100"]["mean"]
            out.append({"budget": b, "EHI": ev, other: ov, "difference": ev - ov})
    return out


def run_benchmark(
    dataset: Dataset,
    out: str | Path,
    config: EHIConfig | None = None,
    seeds: int = 3,
    split: str = "test",
    budgets=BUDGETS,
    ablations=(),
    command: str = "",
    progress: bool = True,
    unsupervised: bool = False,
) -> dict:
    """Every method, ``seeds`` times, written to ``out`` (results.json, report.md, plots).
    ``unsupervised``: EHI trained without qrels (``config`` defaults to the unsupervised one)
    against Faiss-IVF and ScaNN over the same encoder, neighbour recall beside R@100."""
    if unsupervised:
        from ehi.training.unsupervised import unsupervised_config

        config = config or unsupervised_config()
        if ablations:
            raise ValueError("ablations are for supervised training")
    config = (config or EHIConfig()).validate()
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {sorted(ABLATIONS)}")
    from ehi.evaluation.evaluate import has_qrels

    if (not unsupervised or has_qrels(dataset, split)) and not dataset.relevant(split):
        raise ValueError(f"split {split!r} has no query with a relevant document")
    out = Path(out)
    t0 = time.perf_counter()
    if unsupervised:
        runs = [run_seed_unsupervised(dataset, config, seed, split, budgets, progress)
                for seed in tqdm(range(seeds), desc="seeds", disable=not bars(progress))]
    else:
        runs = [run_seed(dataset, config, seed, split, budgets, ablations, progress) for seed in range(seeds)]
    timings: dict[str, float] = {}
    for r in runs:
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    timings["total"] = time.perf_counter() - t0
    import faiss
    import scann
    import sentence_transformers
    import torch

    results = {
        "dataset": dataset.root.name,
        "split": split,
        "seeds": seeds,
        "budgets": list(budgets),
        "budget_rule": BUDGET_RULE,
        "command": command,
        "config": config.to_dict(),
        "dual_encoder_config": dual_encoder_config(config).to_dict(),
        "ablations": {a: ABLATIONS[a] for a in ablations},
        "scann_config": {"num_leaves": config.tree.leaves_for(len(dataset.corpus)), "min_partition_size": 1, "spherical": True, "scoring": "brute force float32, no reordering"},
        "versions": {
            "ehi": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "faiss": faiss.__version__,
            "scann": getattr(scann, "__version__", "1.4"),
        },
        "timings": timings,
        "aggregate": aggregate(runs),
        "significance": significance(runs, budgets) if not unsupervised else [],
        "unsupervised": unsupervised,
        "pseudo_queries": ("unlabelled queries of the dataset other than the evaluated ones, else document spans; "
                           "each paired with its exact top-100 under the frozen encoder") if unsupervised else None,
        "own_encoder_gap": [],
        "leaf_sizes": runs[0].leaf_sizes,
        "runs": [
            {"seed": r.seed, "timings": r.timings, "validation": r.validation, "touch_counts": r.touch_counts,
             "rows": [x.to_dict(per_query=True) for x in r.rows]}
            for r in runs
        ],
    }
    results["own_encoder_gap"] = own_encoder_gap(results["aggregate"], budgets)
    write_file_atomic(out / "results.json", json.dumps(results, indent=1))
    write_report(results, out)
    return results
