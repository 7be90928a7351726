"""The real corpora the decision experiments use, and how their decision queries are drawn
(never a test split: a held-out part of the training queries, or the dev split)."""

from __future__ import annotations

import numpy as np

CORPORA = {
    "scifact": {"path": "../shared/datasets/scifact", "train": "train", "decide": None},
    "climate-fever": {"path": "../shared/datasets/climate-fever-dev", "train": "train", "decide": "dev"},
}
BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
DECIDE_SEED = 12345


def split_queries(ds, corpus: dict, fraction: float) -> tuple[list[str], list[str], str]:
    """(training query ids, decision query ids, decision split)."""
    rel = sorted(ds.relevant(corpus["train"]))
    if corpus["decide"]:
        return rel, sorted(ds.relevant(corpus["decide"])), corpus["decide"]
    order = np.random.default_rng(DECIDE_SEED).permutation(len(rel))
    n = int(round(fraction * len(rel)))
    decide = sorted(rel[i] for i in order[:n])
    held = set(decide)
    return [q for q in rel if q not in held], decide, corpus["train"]
