"""Validated training: how well the current tree routes held-out queries.

A learned index can route worse than the k-means tree it starts from (it fits the training
queries and re-routes documents no query was trained on). So training measures routing on
queries it never trains on, at epoch 0 and after every epoch, and keeps the best state.
"""

from __future__ import annotations

import logging

import numpy as np

from ehi.config import TrainConfig
from ehi.data import Dataset
from ehi.encode.cache import Features
from ehi.evaluation.evaluate import ehi_curve, make_run, measure, untouched_queries

log = logging.getLogger(__name__)

MIN_VAL_QUERIES = 10  # fewer held-out queries than this say nothing; validation is skipped
# val_group "auto": a random hold-out with fewer untouched queries than this share of it gives the
# untouched guard too few to see a loss (SQuAD: 11-22 of 2,000), so half of
# the hold-out is then drawn as whole document groups. Random hold-outs of SciFact (46 %) and
# Climate-FEVER (58 %) are well above it and stay as they are.
MIN_UNTOUCHED_SHARE = 0.25


def holdout(
    dataset: Dataset, split: str, query_ids: list[str] | None, tc: TrainConfig
) -> tuple[list[str] | None, list[str], str]:
    """(training query ids, validation query ids, validation split).

    ``tc.val_split`` names a qrels split to validate on (its queries are removed from
    training); otherwise ``tc.val_fraction`` of the training queries is held out, drawn with
    the training seed as ``tc.val_group`` says: at random, as whole document groups, or
    ("auto") at random unless too few of those queries are untouched, then half of them as
    whole groups. Too few queries to hold out: no validation, with a warning."""
    rel = dataset.relevant(split)
    pool = sorted(q for q in (query_ids if query_ids is not None else rel) if q in rel)
    if tc.val_split:
        if tc.val_split == split:
            raise ValueError(f"val_split {tc.val_split!r} is the training split; hold out another split or use val_fraction")
        val = sorted(dataset.relevant(tc.val_split))
        if not val:
            raise ValueError(f"val_split {tc.val_split!r} has no query with a relevant document")
        held = set(val)
        return [q for q in pool if q not in held], val, tc.val_split
    if tc.val_fraction <= 0 or tc.epochs == 0:
        return query_ids, [], ""
    if tc.val_group == "documents":
        return grouped_holdout(dataset, split, pool, tc)
    n_val = val_count(len(pool), tc)
    if n_val < MIN_VAL_QUERIES or len(pool) - n_val < 2:
        log.warning(
            "%d training queries: too few to hold out %.0f%% for validation; training on all, keeping the last epoch",
            len(pool), 100 * tc.val_fraction,
        )
        return query_ids, [], ""
    order = np.random.default_rng(tc.seed).permutation(len(pool))
    val = [pool[i] for i in order[:n_val]]
    if tc.val_group == "auto":
        mixed = mixed_holdout(dataset, split, pool, val, tc)
        if mixed is not None:
            return mixed
    held = set(val)
    return [q for q in pool if q not in held], sorted(val), split


def val_count(pool: int, tc: TrainConfig) -> int:
    """How many of ``pool`` queries to hold out: ``val_fraction``, at most ``val_max_queries``."""
    n = int(round(tc.val_fraction * pool))
    return min(n, tc.val_max_queries) if tc.val_max_queries else n


def document_groups(dataset: Dataset) -> dict[str, str]:
    """Each document's group: its title when other documents share it (the paragraphs of one
    article), else the document itself."""
    from collections import Counter

    counts = Counter(dataset.corpus.titles)
    return {d: (f"title:{t}" if t and counts[t] > 1 else f"doc:{d}") for d, t in zip(dataset.corpus.ids, dataset.corpus.titles)}


def query_groups(dataset: Dataset, split: str, pool: list[str]) -> dict[str, set[str]]:
    """The document groups (``document_groups``) each query of ``pool`` points at (queries on
    no known document left out)."""
    rel = dataset.relevant(split)
    group = document_groups(dataset)
    q_groups = {q: {group[d] for d in rel[q] if d in group} for q in pool}
    return {q: g for q, g in q_groups.items() if g}


def hold_groups(q_groups: dict[str, set[str]], target: int, seed: int) -> tuple[set[str], list[str]]:
    """Whole groups drawn at random until ``target`` queries of ``q_groups`` point only at
    them: (held groups, those queries)."""
    by_group: dict[str, list[str]] = {}
    for q, gs in q_groups.items():
        for g in gs:
            by_group.setdefault(g, []).append(q)
    names = sorted(by_group)
    held: set[str] = set()
    val: list[str] = []
    left = {q: len(gs) for q, gs in q_groups.items()}  # groups of each query not yet held out
    for i in np.random.default_rng(seed).permutation(len(names)):
        if len(val) >= target:
            break
        held.add(names[i])
        for q in by_group[names[i]]:
            left[q] -= 1
            if left[q] == 0:
                val.append(q)
    return held, val


def grouped_holdout(dataset: Dataset, split: str, pool: list[str], tc: TrainConfig) -> tuple[list[str], list[str], str]:
    """Hold out whole document groups (``document_groups``): the held-out queries point only
    at documents that no training query touches, as a user's new documents do. A query
    touching both kinds of group is in neither (the refit trains on it)."""
    q_groups = query_groups(dataset, split, pool)
    held, val = hold_groups(q_groups, val_count(len(q_groups), tc), tc.seed)
    if len(val) < MIN_VAL_QUERIES or len(val) == len(q_groups):
        log.warning("too few document groups to hold out %.0f%% of the queries; training on all, keeping the last epoch", 100 * tc.val_fraction)
        return pool, [], ""
    train = [q for q in pool if not (q_groups.get(q, set()) & held)]
    return train, sorted(val), split


def mixed_holdout(
    dataset: Dataset, split: str, pool: list[str], val: list[str], tc: TrainConfig
) -> tuple[list[str], list[str], str] | None:
    """``val_group="auto"``: None when the random hold-out ``val`` has enough untouched
    queries (``MIN_UNTOUCHED_SHARE``); else half of it stays (the first half drawn, so it is
    part of the random hold-out) and the other half is whole document groups drawn from the
    rest, whose queries then all leave training. Validation then scores both kinds, and the
    untouched guard has enough queries to refuse an encoder that loses on new documents."""
    rel = dataset.relevant(split)
    held_set = set(val)
    touched = {d for q in pool if q not in held_set for d in rel[q]}
    if len(untouched_queries(val, rel, touched)) >= MIN_UNTOUCHED_SHARE * len(val):
        return None
    keep = val[: len(val) - len(val) // 2]
    kept = set(keep)
    q_groups = query_groups(dataset, split, [q for q in pool if q not in kept])
    groups, grouped = hold_groups(q_groups, len(val) // 2, tc.seed)
    if len(grouped) < MIN_VAL_QUERIES or len(grouped) == len(q_groups):
        return None  # too few groups to hold out: the random hold-out as it was
    out = kept | set(grouped)
    train = [q for q in pool if q not in out and not (q_groups.get(q, set()) & groups)]
    log.info("validation holds out %d random queries and %d on %d whole document groups (the random ones had few untouched)",
             len(keep), len(grouped), len(groups))
    return train, sorted(out), split


class Validator:
    """Recall@100 at a few budgets and the recall of the visited leaves alone, on held-out
    queries, for the model's current encoder and tree."""

    def __init__(self, dataset: Dataset, split: str, query_ids: list[str], feats: Features, budgets, trained_docs=None):
        """``trained_docs``: rows of the documents training queries point at; the held-out
        queries whose documents are all outside it (a user's new documents) are also scored
        apart, as ``new_documents`` (reported, not selected on)."""
        self.split, self.query_ids, self.feats = split, list(query_ids), feats
        self.budgets = tuple(sorted(budgets))
        judged = dataset.split(split)
        self.qrels = {q: judged[q] for q in self.query_ids}
        self.doc_ids = dataset.corpus.ids
        self.titles = dataset.corpus.titles
        row = {d: i for i, d in enumerate(self.doc_ids)}
        rel = dataset.relevant(split)
        self.pairs = np.array([(qi, row[d]) for qi, q in enumerate(self.query_ids) for d in rel[q] if d in row], dtype=np.int64)
        touched = set() if trained_docs is None else {self.doc_ids[int(d)] for d in trained_docs}
        self.new_doc_queries = untouched_queries(self.query_ids, rel, touched) if trained_docs is not None else []

    def describe(self) -> str:
        new = f", {len(self.new_doc_queries)} of them on documents no training query touches" if self.new_doc_queries else ""
        return f"{len(self.query_ids)} held-out queries of split {self.split!r}{new}"

    def __call__(self, model, d_emb: np.ndarray) -> dict:
        """``d_emb``: the corpus under the model's encoder (the caller embeds it once per epoch)."""
        enc = model.encoder
        q_emb = enc.embed_all(self.feats)
        model.build_index(d_emb, self.doc_ids, self.titles, codec="flat")  # routing is judged, not codes
        # beam 1 measured too: a budget it exceeds is scored on the line from (0, 0) to it, so
        # trees whose narrowest search visits a little more than a budget still compare fairly
        rows = {r.budget: r for r in ehi_curve("EHI", model, q_emb, self.query_ids, self.qrels, self.budgets)}
        first = None
        recall, leaf_recall, visited = {}, {}, {}
        for b in self.budgets:
            key = f"{b:g}"
            r = rows.get(b)
            if r is None:  # even beam 1 visits more than b
                first = first or self.at_beam_1(model, q_emb)
                scale = b / first[1]
                recall[key] = scale * first[0]
                leaf_recall[key] = scale * self.leaf_recall(model, q_emb, 1)
                visited[key] = None
            else:
                recall[key] = r.metrics["R@100"]
                leaf_recall[key] = self.leaf_recall(model, q_emb, r.width)
                visited[key] = r.fraction_visited
        model.tree.train()
        model.encoder.train()
        out = {
            "R@100": recall,
            "leaf_recall": leaf_recall,
            "visited": visited,
            "score": float(np.mean(list(recall.values()))),
        }
        if self.new_doc_queries:  # the same searches, averaged over those queries alone
            judged = [b for b in self.budgets if b in rows]
            new = {f"{b:g}": 100.0 * float(np.mean([rows[b].per_query.get(q, 0.0) for q in self.new_doc_queries])) for b in judged}
            if new:
                # each query's Recall@100 averaged over the budgets: what the guard compares
                per_query = [100.0 * float(np.mean([rows[b].per_query.get(q, 0.0) for b in judged])) for q in self.new_doc_queries]
                out["new_documents"] = {"queries": len(self.new_doc_queries), "R@100": new, "score": float(np.mean(list(new.values()))),
                                        "per_query": per_query}
        return out

    def at_beam_1(self, model, q_emb: np.ndarray) -> tuple[float, float]:
        """(Recall@100, mean fraction visited) of the narrowest search."""
        res, _ = model.search_embeddings(q_emb, 100, 1)
        run = make_run(self.query_ids, res.indices, res.scores, self.doc_ids)
        return measure(self.qrels, run)["R@100"], model.visited_fraction(q_emb, 1)

    def leaf_recall(self, model, q_emb: np.ndarray, beam: int) -> float:
        """Share of (query, relevant document) pairs whose document sits in a visited leaf."""
        if len(self.pairs) == 0:
            return 0.0
        leaves = model.route(q_emb, beam)
        visited = np.zeros((len(q_emb), model.tree.num_leaves), dtype=bool)
        np.put_along_axis(visited, leaves, True, axis=1)
        doc_leaves = model.index.doc_leaves[self.pairs[:, 1]]  # (P, d2l)
        hit = visited[self.pairs[:, 0][:, None], doc_leaves].any(1)
        return 100.0 * float(hit.mean())


def untouched_worse(reference: list[float], candidate: list[float], z: float = 1.96) -> str | None:
    """Why a state may not ship, or None: its Recall@100 on the held-out queries no training
    query touches (per query, averaged over the budgets) is below the reference's by more than
    the noise. The noise is measured paired over the same queries: the standard error of the
    mean per-query change, times ``z`` (1.96: a 95 % interval). Few queries make the interval
    wide, so only a clear loss is refused."""
    if len(candidate) != len(reference) or len(reference) < 2:
        return None
    d = np.asarray(candidate, dtype=float) - np.asarray(reference, dtype=float)
    se = float(d.std(ddof=1)) / np.sqrt(len(d))
    if d.mean() < -z * se:
        return f"{d.mean():+.1f} points on the {len(d)} untouched held-out queries (noise ±{z * se:.1f}, 95 %, paired)"
    return None


def format_validation(entry: dict) -> str:
    def one(e):
        r = " ".join(f"{100 * float(b):g}%:{v:.1f}" for b, v in e["R@100"].items())
        lr = " ".join(f"{v:.1f}" for v in e["leaf_recall"].values())
        new = f" | new documents {e['new_documents']['score']:.2f}" if e.get("new_documents") else ""
        return f"R@100 {r} | leaf recall {lr} | score {e['score']:.2f}{new}"

    out = one(entry)
    if entry.get("refused"):
        out += f"  [not kept: {entry['refused']}]"
    if entry.get("kmeans"):
        out += f"  (k-means over this encoder: score {entry['kmeans']['score']:.2f}"
        out += f"; not kept: {entry['kmeans']['refused']})" if entry["kmeans"].get("refused") else ")"
    return out


def selection_message(curve: list[dict], kept: int, reclustered: bool = False) -> str:
    """Which epoch was kept and why, in one line for the log and the model's metadata."""
    by = {e["epoch"]: e for e in curve}
    start, last = by.get(0), curve[-1]
    best = by[kept]["kmeans"] if reclustered else by[kept]
    what = f"k-means over the epoch-{kept} encoder" if reclustered else f"the learned tree of epoch {kept}"
    parts = [f"kept {what} (of {last['epoch']} epochs): best validation score {best['score']:.2f}"]
    if start is not None:
        parts.append(f"k-means start (epoch 0) {start['score']:.2f}")
    if last["epoch"] != kept or reclustered:
        parts.append(f"learned tree at the last epoch {last['score']:.2f}")
    if kept == 0:
        parts.append("training did not improve routing on held-out queries, so the start tree is kept")
    elif reclustered:
        parts.append("the learned tree routed held-out queries worse than k-means over its own encoder")
    return "; ".join(parts)
