"""Retrieval quality against the fraction of the corpus visited, computed by ir-measures.

Every method is evaluated under the budget rule of ``budget.py``, measured on the evaluated
queries; the fraction actually visited is printed beside each budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG

from ehi.budget import BUDGET_RULE, WidthSearch  # noqa: F401  (the rule lives in budget.py)

BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MEASURES = [R @ 10, R @ 20, R @ 50, R @ 100, nDCG @ 1, nDCG @ 3, nDCG @ 5, nDCG @ 10, RR @ 10]
TABLE_MEASURES = ["R@10", "R@20", "R@50", "R@100", "nDCG@10", "RR@10", "NR@10", "NR@100"]
# neighbour recall: the share of the exact top-k under the method's own encoder found in its
# top k (what ANN benchmarks report; needs no relevance judgements)
NEIGHBOUR_KS = (10, 100)


@dataclass
class Row:
    method: str
    budget: float | None  # None for exact search
    width: int  # beam (EHI) or nprobe (IVF); 0 for exact search
    fraction_visited: float
    metrics: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, float] = field(default_factory=dict)  # R@100 of each query (0..1)

    def to_dict(self, per_query: bool = False) -> dict:
        out = {
            "method": self.method,
            "budget": self.budget,
            "width": self.width,
            "fraction_visited": self.fraction_visited,
            "metrics": self.metrics,
        }
        if per_query:
            out["per_query_R@100"] = self.per_query
        return out


def make_run(qids: list[str], indices: np.ndarray, scores: np.ndarray, doc_ids: list[str]) -> dict:
    """ir-measures run; a query with no candidate keeps an empty entry so it scores 0."""
    run: dict[str, dict[str, float]] = {}
    for q, row, srow in zip(qids, indices, scores):
        docs = {doc_ids[j]: float(s) for j, s in zip(row, srow) if j >= 0}
        run[q] = docs or {"__no_candidate__": 0.0}
    return run


def measure(qrels: dict, run: dict) -> dict[str, float]:
    """Aggregate metrics (x100) over the judged queries."""
    agg = ir_measures.calc_aggregate(MEASURES, qrels, run)
    return {str(m): 100.0 * float(agg[m]) for m in MEASURES}


def evaluate_run(path, dataset, split: str) -> tuple[dict[str, float], int]:
    """(metrics, queries) of a TREC run file against a split's qrels, over every judged query
    with a relevant document; a judged query the run leaves out scores 0."""
    from pathlib import Path

    path = Path(path)
    try:
        run: dict[str, dict[str, float]] = {}
        for r in ir_measures.read_trec_run(str(path)):
            run.setdefault(r.query_id, {})[r.doc_id] = float(r.score)
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: not a TREC run file (qid Q0 docid rank score tag): {e}") from None
    qids = sorted(dataset.relevant(split))
    if not set(run) & set(qids):
        raise ValueError(f"{path}: none of its {len(run)} query ids is judged in split {split!r}")
    qrels = {q: dataset.split(split)[q] for q in qids}
    return measure(qrels, {q: run.get(q, {}) for q in qids}), len(qids)


def per_query(qrels: dict, run: dict, measure_name: str = "R@100") -> dict[str, float]:
    """One query's value per query id, for paired significance tests."""
    m = ir_measures.parse_measure(measure_name)
    return {r.query_id: float(r.value) for r in ir_measures.iter_calc([m], qrels, run)}


def scores(qrels: dict | None, qids, idx: np.ndarray, sc: np.ndarray, doc_ids, truth: np.ndarray | None) -> tuple[dict, dict]:
    """(metrics, per-query R@100) of one ranked run: the qrels measures when there are qrels,
    neighbour recall (NR@10, NR@100) when the exact neighbours ``truth`` are given."""
    metrics, pq = {}, {}
    if qrels is not None:
        run = make_run(qids, idx, sc, doc_ids)
        metrics, pq = measure(qrels, run), per_query(qrels, run)
    if truth is not None:
        for k in NEIGHBOUR_KS:  # a corpus smaller than k: its top k is all of it
            kk = min(k, truth.shape[1])
            if idx.shape[1] >= kk:
                metrics[f"NR@{k}"] = 100.0 * float(neighbour_recall(idx, truth, kk).mean())
    return metrics, pq


def exact_row(method: str, q_emb, doc_emb, qids, doc_ids, qrels, k: int = 100) -> Row:
    return exact_row_and_truth(method, q_emb, doc_emb, qids, doc_ids, qrels, k, neighbours=False)[0]


def exact_row_and_truth(
    method: str, q_emb, doc_emb, qids, doc_ids, qrels, k: int = 100, neighbours: bool = True
) -> tuple[Row, np.ndarray | None]:
    """Exact search once, for both: its row and (``neighbours``) the truth every other row
    over these embeddings is judged against for neighbour recall (the top 100)."""
    from ehi.evaluation.baselines import exact_search

    n_truth = max(NEIGHBOUR_KS) if neighbours else 0
    idx, sc = exact_search(q_emb, doc_emb, max(k, n_truth))
    truth = idx[:, :n_truth] if neighbours else None
    return Row(method, None, 0, 1.0, *scores(qrels, qids, idx[:, :k], sc[:, :k], doc_ids, truth)), truth


def budget_curve(
    method: str,
    max_width: int,
    visited_fraction: Callable[[int], float],
    search: Callable[[int], tuple[np.ndarray, np.ndarray]],
    qids: list[str],
    doc_ids: list[str],
    qrels: dict | None,
    budgets=BUDGETS,
    truth: np.ndarray | None = None,
) -> list[Row]:
    """Evaluate a method at each budget under the shared rule (widths searched lazily);
    ``truth``: the exact neighbours, for neighbour recall."""
    widths = WidthSearch(visited_fraction, max_width)
    rows, cache = [], {}  # width -> (metrics, per-query R@100)
    for b in budgets:
        w = widths.largest_within(b)
        if w is None:
            continue
        if w not in cache:
            idx, sc = search(w)
            cache[w] = scores(qrels, qids, idx, sc, doc_ids, truth)
        rows.append(Row(method, b, w, widths.fraction(w), *cache[w]))
    return rows


def format_table(rows: list[Row], measures=TABLE_MEASURES) -> str:
    """One line per row; the measures no row has (no qrels, or no neighbour truth) left out."""
    measures = [m for m in measures if any(m in r.metrics for r in rows)]
    head = f"{'method':<26} {'budget':>7} {'width':>5} {'visited':>8} " + " ".join(f"{m:>8}" for m in measures)
    lines = [head, "-" * len(head)]
    for r in rows:
        budget = "exact" if r.budget is None else f"{100 * r.budget:.0f}%"
        lines.append(
            f"{r.method:<26} {budget:>7} {r.width:>5} {100 * r.fraction_visited:>7.1f}% "
            + " ".join(f"{r.metrics[m]:>8.1f}" if m in r.metrics else f"{'—':>8}" for m in measures)
        )
    return "\n".join(lines)


def ehi_curve(name: str, model, q_emb: np.ndarray, qids, qrels, budgets=BUDGETS, k: int = 100, truth=None) -> list[Row]:
    """A trained model at every budget: beams chosen by the shared rule."""

    def search(w):
        res, _ = model.search_embeddings(q_emb, k, w)
        return res.indices, res.scores

    with model.sweeping():
        return budget_curve(
            name, model.tree.num_leaves, lambda w: model.visited_fraction(q_emb, w), search, qids, model.doc_ids, qrels, budgets,
            truth,
        )


def ivf_curve(name: str, q_emb, d_emb, nlist: int, seed: int, qids, doc_ids, qrels, budgets=BUDGETS, k: int = 100, truth=None):
    """Faiss-IVF with ``nlist`` lists over the given embeddings at every budget; also returns
    the index (for its list sizes)."""
    from ehi.evaluation.baselines import IVFBaseline

    ivf = IVFBaseline(d_emb, nlist, seed)
    rows = budget_curve(
        name, nlist, lambda w: ivf.visited_fraction(q_emb, w), lambda w: ivf.search(q_emb, k, w)[:2],
        qids, doc_ids, qrels, budgets, truth,
    )
    return rows, ivf


def has_qrels(dataset, split: str) -> bool:
    return split in dataset.qrels or (dataset.root / "qrels" / f"{split}.tsv").exists()


# Recall@100 apart over the queries whose relevant documents some training query points at
# ("touched": routing has been taught where they live) and those it does not (a new article,
# documents added after training: where routing must generalise)
TOUCHED, UNTOUCHED = "R@100 touched", "R@100 untouched"


def untouched_queries(qids, relevant: dict, touched: set) -> list[str]:
    """The queries none of whose relevant documents is in ``touched`` (the rule validation's
    ``new_documents`` and the touched / untouched split share)."""
    return [q for q in qids if not any(d in touched for d in relevant.get(q, ()))]


def split_by_touch(dataset, qids, split: str, train_split: str = "train") -> tuple[list[str], list[str]] | None:
    """(touched, untouched) queries of ``split``: touched when some query of ``train_split``'s
    qrels has one of its relevant documents. None without training qrels, or when ``split``
    is the training split itself."""
    if split == train_split or not has_qrels(dataset, train_split):
        return None
    touched = {d for docs in dataset.relevant(train_split).values() for d in docs}
    new = set(untouched_queries(qids, dataset.relevant(split), touched))
    return [q for q in qids if q not in new], sorted(new)


def add_touch_split(rows: list[Row], groups: tuple[list[str], list[str]] | None) -> None:
    """Each judged row's Recall@100 over the touched and over the untouched queries (from its
    per-query Recall@100), added to its metrics; a group without queries is left out."""
    if groups is None:
        return
    for r in rows:
        if not r.per_query:
            continue
        for name, qs in zip((TOUCHED, UNTOUCHED), groups):
            if qs:
                r.metrics[name] = 100.0 * float(np.mean([r.per_query.get(q, 0.0) for q in qs]))


def format_touch_table(rows: list[Row], groups: tuple[list[str], list[str]]) -> str:
    """Recall@100 on touched and untouched queries, one line per row that has them."""
    head = f"{'method':<26} {'budget':>7} {'touched':>8} {'untouched':>10}"
    lines = [f"Recall@100 by whether a training query touches the relevant documents: {len(groups[0])} touched, {len(groups[1])} untouched queries",
             head, "-" * len(head)]
    for r in rows:
        if TOUCHED in r.metrics or UNTOUCHED in r.metrics:
            budget = "exact" if r.budget is None else f"{100 * r.budget:.0f}%"
            cells = [f"{r.metrics[m]:>{w}.1f}" if m in r.metrics else f"{'—':>{w}}" for m, w in ((TOUCHED, 8), (UNTOUCHED, 10))]
            lines.append(f"{r.method:<26} {budget:>7} " + " ".join(cells))
    return "\n".join(lines)


def evaluate_model(
    model, dataset, split: str = "test", budgets=BUDGETS, k: int = 100, baselines: bool = True, query_ids=None,
    train_split: str = "train",
) -> list[Row]:
    """EHI at every budget, exact search over the trained encoder, and (optionally) Faiss-IVF
    with as many lists as EHI has leaves, over the trained and the untrained encoder. Every
    row has neighbour recall against exact search over its own encoder; the qrels measures too
    when the split has qrels (without them: every query of the dataset, or ``query_ids``), and
    Recall@100 apart on touched and untouched queries (``split_by_touch`` against
    ``train_split``) when the dataset has its qrels."""
    if has_qrels(dataset, split):
        rel = dataset.relevant(split)
        if not rel:
            raise ValueError(f"split {split!r} has no query with a relevant document")
        qids = sorted(rel if query_ids is None else set(query_ids) & set(rel))
        qrels = {q: dataset.split(split)[q] for q in qids}
    else:
        qids = sorted(q for q in (query_ids if query_ids is not None else dataset.queries) if dataset.queries[q].strip())
        if not qids:
            raise ValueError(f"{dataset.root}: no qrels for split {split!r} and no queries to measure neighbour recall on")
        qrels = None
    texts = [dataset.queries[q] for q in qids]
    enc = model.encoder
    q_emb = enc.embed_all(enc.features(texts, "encoding queries"))
    doc_ids = model.doc_ids
    d_emb = model.index.embeddings
    exact, truth = exact_row_and_truth("EHI encoder, exact", q_emb, d_emb, qids, doc_ids, qrels, k)
    rows = ehi_curve("EHI", model, q_emb, qids, qrels, budgets, k, truth)
    rows.append(exact)
    if baselines:
        nlist = model.tree.num_leaves
        seed = model.config.train.seed
        rows += ivf_curve("EHI encoder + Faiss-IVF", q_emb, d_emb, nlist, seed, qids, doc_ids, qrels, budgets, k, truth)[0]
        # the untrained encoder: what the two-stage pipeline starts from
        base = base_embeddings(model, dataset, texts)
        if base is not None:
            bq, bd = base
            base_exact, bt = exact_row_and_truth("base encoder, exact", bq, bd, qids, doc_ids, qrels, k)
            rows.append(base_exact)
            rows += ivf_curve("base encoder + Faiss-IVF", bq, bd, nlist, seed, qids, doc_ids, qrels, budgets, k, bt)[0]
    if qrels is not None:
        add_touch_split(rows, split_by_touch(dataset, qids, split, train_split))
    return rows


def base_embeddings(model, dataset, query_texts: list[str]):
    """Untrained sentence-transformer embeddings (cached), for the adapter scope only, where
    they are exactly the cached frozen features."""
    enc = model.encoder
    if enc.config.scope != "adapter":
        return None
    q = enc.features(query_texts, "encoding queries").dense.numpy()
    d = enc.features(dataset.corpus.documents(), "encoding corpus").dense.numpy()
    return q, d


def exact_neighbours(q_emb: np.ndarray, d_emb: np.ndarray, k: int = 100, self_rows: np.ndarray | None = None) -> np.ndarray:
    """(Q, min(k, N)) rows of the most similar documents (exact search), best first: the truth
    of neighbour recall. ``self_rows[i]`` (a document standing in for query i) is never its
    own neighbour."""
    from ehi.evaluation.baselines import exact_search

    if self_rows is None:
        return exact_search(q_emb, d_emb, k)[0]
    k = min(k, d_emb.shape[0] - 1)
    idx = exact_search(q_emb, d_emb, k + 1)[0]
    return np.stack([row[row != own][:k] for row, own in zip(idx, self_rows)])


def neighbour_recall(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Per query, the share of its exact top-``k`` (``truth`` rows, best first) among the
    top-``k`` ``found`` rows (best first, -1 padded): what ANN benchmarks call recall@k."""
    t, f = truth[:, :k], found[:, :k]
    hits = (f[:, :, None] == t[:, None, :]) & (t[:, None, :] >= 0)
    return hits.any(1).sum(1) / np.maximum((t >= 0).sum(1), 1)
