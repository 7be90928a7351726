"""A trained EHI retriever: encoder + tree + leaf index, saved and reloaded as one directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ehi.config import EHIConfig
from ehi.encode.encoder import Encoder
from ehi.index.leaf_index import LeafIndex
from ehi.index.shards import SHARD_TIMEOUT_S
from ehi.limits import check_k, check_query
from ehi.model import persistence
from ehi.model.calibration import Calibration, fraction_visited
from ehi.model.documents import Documents
from ehi.model.leaf_sketch import LeafSketch
from ehi.model.router import Router
from ehi.model.tree import Tree
from ehi.results import Hit, Hits, UnknownIds, to_hits  # noqa: F401  (Hit, UnknownIds: their old home)


class EHIModel:
    """The retriever: ``search`` texts, ``index_corpus`` / ``add_corpus`` / ``remove_documents``,
    ``save`` and ``load``. Routing and its budget calibration live in ``router``, the indexed
    documents' ids in ``documents``, the lists in ``index`` (``ehi.index``).

    Examples
    --------
    >>> import ehi
    >>> ds = ehi.load_beir("../shared/datasets/scifact")                 # doctest: +SKIP
    >>> model = ehi.train(ds, out_dir="runs/scifact")                     # doctest: +SKIP
    >>> model = ehi.EHIModel.load("runs/scifact")                         # doctest: +SKIP
    >>> hits = model.search(["does aspirin prevent cancer?"], k=10, budget=0.02)  # doctest: +SKIP
    >>> hits[0].hits[0].doc_id, hits[0].fraction_visited                  # doctest: +SKIP
    """

    def __init__(
        self, config: EHIConfig, encoder: Encoder, tree: Tree, index: LeafIndex | None = None, doc_ids: list[str] | None = None,
        doc_titles: list[str] | None = None, corpus_fingerprint: str = "", beam_calibration: list | None = None, validation: dict | None = None,
    ):
        self.config, self.encoder, self.index = config, encoder, index
        self.router = Router(tree, config, Calibration(beam_calibration))
        self.documents = Documents(doc_ids, doc_titles, corpus_fingerprint)
        self.validation = validation  # validated training: held-out routing quality per epoch and the epoch kept

    # the parts' state, under the names the API has always had
    tree = property(lambda self: self.router.tree)
    doc_ids = property(lambda self: self.documents.ids, lambda self, v: setattr(self.documents, "ids", list(v)))
    doc_titles = property(lambda self: self.documents.titles, lambda self, v: setattr(self.documents, "titles", list(v)))
    corpus_fingerprint = property(lambda self: self.documents.fingerprint, lambda self, v: setattr(self.documents, "fingerprint", v))
    beam_calibration = property(lambda self: self.router.calibration.rows, lambda self, v: setattr(self.router, "calibration", Calibration(v)))

    # ---- routing and the budget ----------------------------------------------------------
    def route(self, emb: np.ndarray, beam: int) -> np.ndarray:
        """The leaves a search visits: top-``beam`` per row, best first (``Router.route``)."""
        return self.router.route(emb, beam, self.index)

    def place(self, emb: np.ndarray, width: int) -> np.ndarray:
        """The tree's top-``width`` leaves per row: where documents are stored."""
        return self.router.place(emb, width)

    def leaf_sketch(self) -> LeafSketch:
        return self.router.leaf_sketch(self.index)

    def sweeping(self):
        """A context in which one batch of queries searched at many widths is routed once
        (the caller does not change the array meanwhile); see ``LeafSketch.sweeping``."""
        return self.router.sweeping(self.index)

    def calibrate(self, query_emb: np.ndarray) -> list[list[float]]:
        """Mean fraction visited at each width of a grid, so that a budget maps to a beam."""
        return self.router.calibrate(self.index, query_emb).rows

    def recalibrate(self, sample: int = 2000, seed: int = 0) -> None:
        self.router.recalibrate(self.index, sample, seed)

    def visited_fraction(self, query_emb: np.ndarray, beam: int) -> float:
        """Mean fraction of the corpus the queries visit at ``beam`` (the budget measure)."""
        return fraction_visited(self.index, self.route(query_emb, beam))

    def beam_for_budget(self, budget: float) -> int:
        """The beam that visits ``budget`` of the corpus under the budget rule (``ehi.budget``)."""
        return self.router.calibration.width(budget)

    def resolve_beam(self, beam: int | None = None, budget: float | None = None) -> int:
        """The beam a search uses: ``beam``, or the one for ``budget``, or the default budget."""
        return self.router.calibration.resolve(self.tree.num_leaves, beam, budget)

    def budget_documents(self, beam: int) -> float:
        """Documents a search of ``beam`` leaves scores on average."""
        return self.router.calibration.fraction(beam, self.tree.num_leaves) * self.index.num_docs

    # ---- the index -------------------------------------------------------------------------
    def build_index(self, doc_emb: np.ndarray, doc_ids: list[str], doc_titles: list[str] | None = None, codec: str | None = None,
                    leaves: np.ndarray | None = None) -> LeafIndex:
        """Store each document (final embeddings) in its top-d2l leaves (or the given ``leaves``)."""
        ic = self.config.index
        leaves = self.place(doc_emb, ic.d2l) if leaves is None else leaves
        self.router.sketch = None
        self.index = LeafIndex(leaves, doc_emb, self.tree.num_leaves, codec or ic.codec, ic.pq_m, ic.rerank, self.config.train.seed)
        self.documents = Documents(doc_ids, doc_titles, self.corpus_fingerprint)
        return self.index

    def set_index_options(self, d2l=None, codec=None, pq_m=None, rerank=None, shards=None, router=None, spread_lambda=None,
                          spread_basis=None, spread_candidates=None) -> None:
        """Change how the next index is built, saved and searched (kept in the config); checked at once."""
        ic = self.config.index
        ranking = (ic.router, ic.spread_lambda, ic.spread_basis, ic.spread_candidates)
        ic.update(d2l=d2l, codec=codec, pq_m=pq_m, rerank=rerank, shards=shards, router=router, spread_lambda=spread_lambda,
                  spread_basis=spread_basis, spread_candidates=spread_candidates)
        self.config.validate()
        if self.index is not None and (ic.router, ic.spread_lambda, ic.spread_basis, ic.spread_candidates) != ranking:
            self.recalibrate()  # the budget -> beam map belongs to the ranking of the leaves
        if ic.shards > self.tree.num_leaves:
            raise ValueError(f"{ic.shards} shards for {self.tree.num_leaves} leaves: at most one shard per leaf")
        if self.index is not None and rerank is not None:
            self.index.rerank = ic.rerank

    def embed_corpus(self, corpus, desc: str = "corpus") -> np.ndarray:
        return self.encoder.embed_all(self.encoder.features(corpus.documents(), f"encoding {desc}"), desc=f"embedding {desc}")

    def index_corpus(self, corpus, d2l: int | None = None, codec: str | None = None, pq_m: int | None = None, rerank: int | None = None,
                     shards: int | None = None, workers: int | None = None, ray_address: str | None = None) -> None:
        """Encode and index a whole corpus (``data.Corpus``), replacing any index. ``workers``:
        on that many Ray workers (``ehi.model.ray_build``, at ``ray_address``); ``shards``: files."""
        self.set_index_options(d2l, codec, pq_m, rerank, shards)
        if workers:
            from ehi.model.ray_build import embed_and_route

            emb, leaves = embed_and_route(self, texts=corpus.documents(), d2l=self.config.index.d2l, workers=workers, address=ray_address)
            self.build_index(emb, corpus.ids, corpus.titles, leaves=leaves)
        else:
            self.build_index(self.embed_corpus(corpus), corpus.ids, corpus.titles)
        self.corpus_fingerprint = corpus.fingerprint()
        self.recalibrate()

    def add_corpus(self, corpus) -> None:
        """Encode new documents and place them in their leaves (no retraining)."""
        _indexed(self, "add to").documents.check_new(corpus.ids)
        self.add_documents(corpus.ids, corpus.titles, self.embed_corpus(corpus, "new documents"))

    def add_documents(self, ids: list[str], titles: list[str], emb: np.ndarray) -> None:
        """Place new documents (final embeddings) in their leaves; the calibration is re-measured."""
        _indexed(self, "add to").documents.check_new(ids)
        self.index.add(emb, self.place(emb, self.index.d2l))
        self.router.sketch = None
        self.documents.added(ids, titles)
        self.recalibrate()

    def remove_documents(self, ids: list[str]) -> int:
        """Drop documents by id; returns how many were indexed (0: nothing changed)."""
        drop = set(ids)
        keep = np.array([d not in drop for d in _indexed(self, "remove from").doc_ids], dtype=bool)
        removed = int((~keep).sum())
        if removed == len(keep) and removed:
            raise ValueError("removing every document would leave an empty index")
        if removed:
            self.index = self.index.keep(np.flatnonzero(keep))
            self.router.sketch = None
            self.documents.kept(keep, drop)
            self.recalibrate()
        return removed

    def repartition(self, seed: int | None = None) -> None:
        """Re-draw the leaves as k-means over every document (gives up the learned partition):
        for documents added after training unlike the trained ones (a new topic)."""
        emb = np.asarray(_indexed(self, "repartition").index.vectors)
        self.tree.reset_to_kmeans(emb, seed=self.config.train.seed if seed is None else seed)
        self.tree.eval()
        self.build_index(emb, self.doc_ids, self.doc_titles)
        self.recalibrate()

    # ---- search ----------------------------------------------------------------------------
    def search_embeddings(self, q_emb: np.ndarray, k: int, beam: int, allowed: np.ndarray | None = None):
        """(SearchResult, leaves visited per query) of final query embeddings (Q, d); ``allowed``
        rows: see ``ehi.model.filtering``. ``k`` beyond the corpus is clamped."""
        k = min(k, self.index.num_docs)
        if allowed is None:
            leaves = self.route(q_emb, beam)
            return self.index.search(q_emb, leaves, k), leaves
        from ehi.model.filtering import search_allowed

        return search_allowed(self, q_emb, k, beam, allowed)

    def rows_of(self, ids) -> np.ndarray:
        """Index rows of document ids; ``UnknownIds`` (a ValueError) for ids not indexed."""
        return self.documents.rows_of(ids)

    def to_hits(self, res, leaves: np.ndarray, queries=None, k: int | None = None, offset: int = 0) -> list[Hits]:
        """Rows ``offset ..`` of a search result as ``Hits``, one per query (top ``k``)."""
        return to_hits(res, leaves, self.doc_ids, self.doc_titles, self.index.num_docs, queries, k, offset)

    def search(self, queries: str | list[str], k: int = 10, beam: int | None = None, budget: float | None = None,
               ids: list[str] | None = None) -> list[Hits]:
        """One ``Hits`` per query text, in order. ``beam`` (leaves visited) or ``budget`` (fraction
        of the corpus; default ``budget.DEFAULT_BUDGET``); ``ids``: only these may be returned."""
        if self.index is None:
            raise ValueError("the model has no index; build one first")
        texts = [check_query(q) for q in ([queries] if isinstance(queries, str) else list(queries))]
        if not texts:
            return []
        check_k(k)
        beam = self.resolve_beam(beam, budget)
        allowed = None if ids is None else self.rows_of(ids)
        res, leaves = self.search_embeddings(self.encoder.encode(texts), k, beam, allowed)
        return self.to_hits(res, leaves, texts, k)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the model (config, weights, index, documents) to ``path`` atomically."""
        return persistence.save_model(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", mmap: bool = False, backend: str | None = None, shards: int | None = None,
             ray_address: str | None = None, shard_timeout: float = SHARD_TIMEOUT_S, router: str | None = None) -> "EHIModel":
        """Open a saved model. ``mmap``: index and vectors mapped from disk, read-only.
        ``backend``: run the frozen transformer on this backend instead of the saved one.
        ``shards``: serve the index from that many Ray actors, one per shard file (saved so:
        ``ehi index shard``), at ``ray_address`` (default: a local Ray); a shard silent for
        ``shard_timeout`` seconds fails the search (``ShardUnavailable``). ``router``: search
        with this router ("spread" or "tree") instead of the saved one (re-calibrated)."""
        return persistence.load_model(cls, path, device, mmap, backend, shards, ray_address, shard_timeout, router)

    @classmethod
    def from_weights(cls, config: EHIConfig, encoder: Encoder, enc_state: dict, tree_state: dict, where: str | Path = "") -> "EHIModel":
        """A model without an index, from its config and trained tensors."""
        return persistence.from_weights(cls, config, encoder, enc_state, tree_state, where)


def _indexed(model: EHIModel, verb: str) -> EHIModel:
    if model.index is None:
        raise ValueError(f"the model has no index to {verb}")
    return model
