"""Training without relevance judgements: the encoder's exact search is the teacher.

A search index must send a query to the leaves that hold its exact nearest neighbours, and
that needs no labels. So unsupervised training makes its own pairs: pseudo-queries (the
dataset's unlabelled queries, else short spans of its documents; or given query embeddings,
else document embeddings) paired with their exact top-k neighbours under the base encoder.
The encoder stays frozen (its exact neighbours are the truth the index is judged on), and
the tree learns to route each pseudo-query to the leaves of its neighbours, with the usual
balance penalty and validated best-epoch selection, judged by neighbour recall on held-out
pseudo-queries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ehi.config import EHIConfig, apply_overrides
from ehi.data import Dataset, document_spans
from ehi.evaluation.evaluate import exact_neighbours

log = logging.getLogger(__name__)

PseudoQueries = Literal["auto", "queries", "documents"]
PAIRS_SPLIT = "neighbour@1"  # the training pairs: each pseudo-query and its nearest document
JUDGED_SPLIT = "neighbours"  # its top ``neighbours``: the validation judgements, the routing targets
# the settings unsupervised training overrides (benchmarks/experiments/unsupervised.py measured them)
OVERRIDES = {
    "train.lr_encoder": 0.0,  # frozen: the exact neighbours of this very encoder are the truth
    "train.lambda_siamese": 0.0,
    "train.lambda_indexing": 0.0,
    "train.lambda_intra_leaf": 0.0,
    "train.lambda_neighbours": 1.0,
    "train.hard_negatives": 0,
    "train.lr_indexer": 3e-4,
    "train.epochs": 10,
    "train.val_recluster": False,  # k-means over a frozen encoder is the start tree
    "train.route_fit_epochs": 0,  # its pairs are a teacher's neighbours, not labels (not measured there)
}
MAX_PSEUDO_QUERIES = 20_000


@dataclass
class PseudoQuerySet:
    """Pseudo-queries: their ids, and texts (text mode) or rows of the given embeddings."""

    ids: list[str]
    texts: list[str] | None
    kind: str  # "queries", "document spans" or "documents"
    doc_rows: np.ndarray | None = None  # documents standing in for queries (excluded from their own neighbours)


def unsupervised_config(config: EHIConfig | None = None) -> EHIConfig:
    """``config`` with the unsupervised settings (``OVERRIDES``) applied."""
    return apply_overrides(config or EHIConfig(), OVERRIDES)


def pseudo_queries(
    dataset: Dataset, source: PseudoQueries = "auto", query_ids: list[str] | None = None, seed: int = 0,
    max_queries: int = MAX_PSEUDO_QUERIES,
) -> PseudoQuerySet:
    """What the index learns to route. ``auto``: the dataset's queries (``query_ids``, else all
    of queries.jsonl; their relevance judgements are never read) when it has any, else spans
    of its documents."""
    queries = query_ids if query_ids is not None else list(dataset.queries)
    queries = [q for q in queries if dataset.queries.get(q, "").strip()]
    if source == "queries" and not queries:
        raise ValueError(f"{dataset.root}: no queries to train on; use pseudo_queries='documents'")
    if source in ("auto", "queries") and queries:
        queries = [queries[i] for i in _sample(len(queries), max_queries, seed)]
        return PseudoQuerySet(queries, [dataset.queries[q] for q in queries], "queries")
    spans, rows = document_spans(dataset.corpus, max_queries, seed)
    return PseudoQuerySet([f"span:{dataset.corpus.ids[r]}" for r in rows], spans, "document spans")


def neighbour_dataset(dataset: Dataset, pseudo: PseudoQuerySet, q_emb: np.ndarray, d_emb: np.ndarray, k: int) -> Dataset:
    """The dataset unsupervised training runs on: the same corpus, the pseudo-queries as
    queries, and the teacher's judgements as two qrels splits (``PAIRS_SPLIT``: the nearest
    document; ``JUDGED_SPLIT``: the top ``k``)."""
    nn = exact_neighbours(q_emb, d_emb, k, pseudo.doc_rows)
    ids = dataset.corpus.ids
    judged = {q: {ids[j]: k - r for r, j in enumerate(row) if j >= 0} for q, row in zip(pseudo.ids, nn)}
    pairs = {q: {ids[row[0]]: 1} for q, row in zip(pseudo.ids, nn) if row[0] >= 0}
    texts = pseudo.texts if pseudo.texts is not None else [""] * len(pseudo.ids)
    return Dataset(root=dataset.root, corpus=dataset.corpus, queries=dict(zip(pseudo.ids, texts)),
                   qrels={PAIRS_SPLIT: pairs, JUDGED_SPLIT: judged})


def train_unsupervised(
    dataset: Dataset,
    config: EHIConfig | None = None,
    out_dir=None,
    source: PseudoQueries = "auto",
    query_ids: list[str] | None = None,
    neighbours: int = 100,
    doc_embeddings: np.ndarray | None = None,
    query_embeddings: np.ndarray | None = None,
    progress: bool = True,
    resume: bool = False,
    log_fn=None,
    max_queries: int = MAX_PSEUDO_QUERIES,
    keep_checkpoint: bool = False,
):
    """Train EHI without qrels (module docstring); returns (model, trainer), the model saved to
    ``out_dir`` if given. ``config`` defaults to ``unsupervised_config()``; start from it to
    change a setting. With ``doc_embeddings`` (and optionally unlabelled ``query_embeddings``)
    it runs on precomputed vectors: ``dataset`` then needs only the corpus ids. At most
    ``max_queries`` pseudo-queries are drawn (seeded)."""
    from ehi.encode.encoder import Encoder
    from ehi.training.trainer import Trainer

    cfg = config if config is not None else unsupervised_config()
    if query_embeddings is not None and doc_embeddings is None:
        raise ValueError("query embeddings need document embeddings")
    seed = cfg.train.seed
    if doc_embeddings is not None:
        d_emb = _unit(doc_embeddings)
        if query_embeddings is not None:
            q_all = _unit(query_embeddings)
            rows = _sample(len(q_all), max_queries, seed)
            pseudo = PseudoQuerySet([f"q{r}" for r in rows], None, "queries")
            q_emb = q_all[rows]
        else:
            rows = _sample(len(d_emb), max_queries, seed)
            pseudo = PseudoQuerySet([f"doc{r}" for r in rows], None, "documents", doc_rows=rows)
            q_emb = d_emb[rows]
    else:
        pseudo = pseudo_queries(dataset, source, query_ids, seed, max_queries)
        enc = Encoder(cfg.encoder, device=cfg.train.device)
        enc.progress = progress
        d_emb = enc.embed_all(enc.features(dataset.corpus.documents(), "encoding corpus"))
        q_emb = enc.embed_all(enc.features(pseudo.texts, "encoding pseudo-queries"))
    if log_fn:
        log_fn(f"unsupervised: {len(pseudo.ids)} pseudo-queries ({pseudo.kind}), each paired with its exact top {neighbours}")
    ds = neighbour_dataset(dataset, pseudo, q_emb, d_emb, neighbours)
    trainer = Trainer(
        cfg, ds, PAIRS_SPLIT, judgements=JUDGED_SPLIT,
        doc_embeddings=d_emb if doc_embeddings is not None else None,
        query_embeddings=q_emb if doc_embeddings is not None else None,
    )
    trainer.pseudo_queries = pseudo
    model = trainer.run(out_dir, resume=resume, progress=progress, log=log_fn, keep_checkpoint=keep_checkpoint)
    return model, trainer


def _sample(n: int, at_most: int, seed: int) -> np.ndarray:
    """All of ``range(n)``, or ``at_most`` of it drawn with the seed, in order."""
    if n <= at_most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, at_most, replace=False))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
