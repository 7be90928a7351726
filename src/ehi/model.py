"""A trained EHI retriever: encoder + tree + leaf index, saved and reloaded as one directory."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from .artifacts import ArtifactError, read_manifest, write_artifact
from .budget import calibrated_width, resolve_width
from .config import EHIConfig
from .encoder import Encoder
from .index import LeafIndex
from .leaf_sketch import LeafSketch
from .limits import MAX_QUERY_CHARS, check_k, check_query  # noqa: F401  (MAX_QUERY_CHARS: its old home)
from .sharding import SHARD_TIMEOUT_S, read_shard_map, write_shards
from .tree import Tree


class UnknownIds(ValueError):
    """Document ids that are not indexed: how many, and the first one's position and id (the
    server says the position only: it never echoes a request's input)."""

    def __init__(self, count: int, position: int, first: str):
        shown = first if len(first) <= 60 else first[:57] + "..."
        super().__init__(f"{count} ids are not indexed (first: {shown!r})")
        self.count, self.position, self.first = count, position, first


@dataclass
class Hit:
    doc_id: str
    score: float
    title: str = ""


@dataclass
class Hits:
    """One query's result: what the API returns, the CLI prints and the server sends."""

    hits: list[Hit]
    visited: int  # documents scored
    fraction_visited: float
    leaves: list[int]
    query: str | None = None
    # how the documents were found: "beam" (the leaves the beam visits), "filtered" (the
    # allowed documents in those leaves, widened until k are found), "exact" (every allowed
    # document scored: a filter no larger than the budget's document count)
    strategy: str = "beam"

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "hits": [{"id": h.doc_id, "title": h.title, "score": h.score} for h in self.hits],
            "leaves": self.leaves,
            "visited": self.visited,
            "fraction_visited": self.fraction_visited,
            "strategy": self.strategy,
        }


MODEL_FILES = ("config.json", "encoder.safetensors", "tree.safetensors")
INDEX_FILES = ("index.faiss", "doc_leaves.npy", "doc_embeddings.npy", "documents.json")
SKETCH_FILE = "leaf_sketch.safetensors"  # the spread router's (optional: fitted when missing)
LEGACY_INDEX_FILES = INDEX_FILES[1:]  # before the Faiss index: rebuilt from these on load
SHARDED_INDEX_FILES = ("shards.json", *LEGACY_INDEX_FILES)  # the lists in shard files (sharding.py)


def _read_index(path: Path, num_leaves: int, dim: int):
    """The index files, checked against each other: one line naming the file otherwise."""
    try:
        leaves = np.load(path / "doc_leaves.npy", allow_pickle=False)
        # memory-mapped: only the leaf-ordered copy the index makes stays in memory
        emb = np.load(path / "doc_embeddings.npy", allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise
        raise ArtifactError(f"{path}: unreadable index array ({e})") from None
    if emb.ndim != 2 or emb.shape[1] != dim or not np.issubdtype(emb.dtype, np.floating):
        raise ArtifactError(f"{path / 'doc_embeddings.npy'}: expected a float (N, {dim}) array, got {emb.dtype} {emb.shape}")
    if not np.isfinite(emb).all():
        raise ArtifactError(f"{path / 'doc_embeddings.npy'}: holds NaN or infinite values")
    if leaves.ndim not in (1, 2) or leaves.shape[0] != emb.shape[0] or not np.issubdtype(leaves.dtype, np.integer):
        raise ArtifactError(f"{path / 'doc_leaves.npy'}: expected {emb.shape[0]} rows of integer leaf ids, got {leaves.dtype} {leaves.shape}")
    if leaves.size and (leaves.min() < 0 or leaves.max() >= num_leaves):
        raise ArtifactError(f"{path / 'doc_leaves.npy'}: leaf ids outside 0..{num_leaves - 1}")
    try:
        docs = json.loads((path / "documents.json").read_text(encoding="utf-8"))
        ids, titles = docs["ids"], docs["titles"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path / 'documents.json'}: unreadable ({e})") from None
    if not (isinstance(ids, list) and isinstance(titles, list) and len(ids) == len(titles) == emb.shape[0]):
        raise ArtifactError(f"{path / 'documents.json'}: expected {emb.shape[0]} ids and titles, one per embedding row")
    if len(set(map(str, ids))) != len(ids):
        raise ArtifactError(f"{path / 'documents.json'}: duplicate document ids")
    return leaves, emb, [str(i) for i in ids], [str(t) for t in titles]


def _checked_calibration(cal, num_leaves: int, where: Path) -> list:
    """A saved budget calibration as search trusts it: rows [beam, mean fraction visited(,
    nodes kept above the leaves)], beams increasing within the tree's leaves, fractions in
    [0, 1]; ArtifactError naming the file otherwise."""
    def bad(why: str):
        return ArtifactError(f"{where}: beam_calibration {why}")

    if not isinstance(cal, list):
        raise bad("must be a list of [beam, fraction] rows")
    prev_beam = 0
    for i, row in enumerate(cal):
        if not isinstance(row, list) or len(row) not in (2, 3) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in row):
            raise bad(f"row {i} is not [beam, fraction] or [beam, fraction, upper beam]")
        beam, frac = row[0], row[1]
        if beam != int(beam) or not prev_beam < beam <= num_leaves:
            raise bad(f"row {i}: beam {beam} is not an increasing whole number within the {num_leaves} leaves")
        if not (np.isfinite(frac) and 0 <= frac <= 1 + 1e-9):
            raise bad(f"row {i}: fraction {frac} is not in [0, 1]")
        if len(row) == 3 and (row[2] != int(row[2]) or row[2] < 1):
            raise bad(f"row {i}: upper beam {row[2]} is not a positive whole number")
        prev_beam = beam
    return cal


def _chain_fingerprint(previous: str, op: str, ids) -> str:
    """The indexed corpus's fingerprint after an update: the old one chained with the change."""
    import hashlib

    h = hashlib.sha256(f"{previous}\x00{op}".encode())
    for i in ids:
        h.update(b"\x00" + str(i).encode())
    return h.hexdigest()


class EHIModel:
    def __init__(
        self,
        config: EHIConfig,
        encoder: Encoder,
        tree: Tree,
        index: LeafIndex | None = None,
        doc_ids: list[str] | None = None,
        doc_titles: list[str] | None = None,
        corpus_fingerprint: str = "",
        beam_calibration: list[float] | None = None,
        validation: dict | None = None,
    ):
        self.config = config
        self.encoder = encoder
        self.tree = tree
        self.index = index
        self.doc_ids = doc_ids or []
        self.doc_titles = doc_titles or [""] * len(self.doc_ids)
        self.corpus_fingerprint = corpus_fingerprint
        # [beam, mean fraction of the corpus visited] pairs, measured on training queries
        self.beam_calibration = beam_calibration or []
        # validated training: held-out routing quality per epoch and the epoch kept
        self.validation = validation
        self._sketch: LeafSketch | None = None  # the spread router's, of the current index

    # ---- routing and search ------------------------------------------------------------
    def route(self, emb: np.ndarray, beam: int) -> np.ndarray:
        """The leaves a search visits: top-``beam`` per row, best first (N, min(beam, L)), by
        the config's router: the leaves' mean + spread sketch (``leaf_sketch``), or the tree."""
        ic = self.config.index
        if ic.router == "spread" and self.index is not None:
            return self.leaf_sketch().top(emb, beam, ic.spread_lambda)
        return self.place(emb, beam)

    def place(self, emb: np.ndarray, width: int) -> np.ndarray:
        """The learned tree's top-``width`` leaves per row, best first: where documents are
        stored (and where training mines its negatives); routed in numpy from a snapshot of
        the tree's weights, re-taken whenever they changed."""
        return self._current_router().leaves(emb, width, self.upper_beam(width))

    def leaf_sketch(self) -> LeafSketch:
        """Each leaf's mean and spread of its documents (fitted from the index on first use,
        saved with the model, re-fitted when documents change)."""
        if self._sketch is None:
            self._sketch = LeafSketch.fit(self.index.vectors, self.index.doc_leaves, self.tree.num_leaves, self.config.index.spread_rank)
        return self._sketch

    def _current_router(self):
        params = getattr(self, "_router_params", None)
        if params is None or params[0] is not self.tree:
            params = self._router_params = (self.tree, list(self.tree.parameters()))
        version = [p._version for p in params[1]]
        if getattr(self, "_router_version", None) != version:
            self._router, self._router_version = self.tree.router(), version
        return self._router

    def upper_beam(self, beam: int) -> int:
        """Nodes kept above the leaves for a search of ``beam`` leaves: calibrated per width
        (the third entry of the calibration, for per-node leaf-ranked two-level trees), else
        max(beam, the config's upper_beam)."""
        entries = self._derived("_uppers", self.beam_calibration, lambda cal: [(int(c[0]), int(c[2])) for c in cal if len(c) > 2])
        if not entries:
            return max(beam, self.config.tree.search_upper_beam())
        i = bisect.bisect_left(entries, (beam,))  # the entry of the smallest calibrated width >= beam
        return entries[min(i, len(entries) - 1)][1]

    def build_index(
        self, doc_emb: np.ndarray, doc_ids: list[str], doc_titles: list[str] | None = None, codec: str | None = None, leaves: np.ndarray | None = None
    ) -> LeafIndex:
        """Store each document (final embeddings) in its top-d2l leaves (routed here unless
        ``leaves`` were routed elsewhere), encoded with the config's codec (or ``codec``)."""
        ic = self.config.index
        leaves = self.place(doc_emb, ic.d2l) if leaves is None else leaves
        self._sketch = None
        self.index = LeafIndex(leaves, doc_emb, self.tree.num_leaves, codec or ic.codec, ic.pq_m, ic.rerank, self.config.train.seed)
        self.doc_ids = list(doc_ids)
        self.doc_titles = list(doc_titles) if doc_titles is not None else [""] * len(doc_ids)
        return self.index

    def set_index_options(self, d2l=None, codec=None, pq_m=None, rerank=None, shards=None, router=None, spread_lambda=None) -> None:
        """Change how the next index is built, saved and searched (kept in the config); checked at once."""
        ic = self.config.index
        ranking = (ic.router, ic.spread_lambda)
        for name, v in (("d2l", d2l), ("codec", codec), ("pq_m", pq_m), ("rerank", rerank), ("shards", shards), ("router", router),
                        ("spread_lambda", spread_lambda)):
            if v is not None:
                setattr(ic, name, v)
        self.config.validate()
        if self.index is not None and (ic.router, ic.spread_lambda) != ranking:
            self.recalibrate()  # the budget -> beam map belongs to the ranking of the leaves
        if ic.shards > self.tree.num_leaves:
            raise ValueError(f"{ic.shards} shards for {self.tree.num_leaves} leaves: at most one shard per leaf")
        if self.index is not None and rerank is not None:
            self.index.rerank = ic.rerank

    def embed_corpus(self, corpus, desc: str = "corpus") -> np.ndarray:
        return self.encoder.embed_all(self.encoder.features(corpus.documents(), f"encoding {desc}"), desc=f"embedding {desc}")

    def index_corpus(
        self, corpus, d2l: int | None = None, codec: str | None = None, pq_m: int | None = None, rerank: int | None = None,
        shards: int | None = None, workers: int | None = None, ray_address: str | None = None,
    ) -> None:
        """Encode and index a whole corpus (``data.Corpus``), replacing any index; the budget
        calibration is re-measured with documents standing in for queries. ``workers``: embed
        and route on that many Ray workers (``ehi.cluster``; at ``ray_address``, else a local
        Ray) instead of in this process: the same leaves and lists. ``shards``: save the lists
        as that many shard files."""
        self.set_index_options(d2l, codec, pq_m, rerank, shards)
        if workers:
            from .cluster import embed_and_route

            emb, leaves = embed_and_route(self, texts=corpus.documents(), d2l=self.config.index.d2l, workers=workers, address=ray_address)
            self.build_index(emb, corpus.ids, corpus.titles, leaves=leaves)
        else:
            self.build_index(self.embed_corpus(corpus), corpus.ids, corpus.titles)
        self.corpus_fingerprint = corpus.fingerprint()
        self.recalibrate()

    def add_corpus(self, corpus) -> None:
        """Encode new documents and route them into their leaves (no retraining)."""
        if self.index is None:
            raise ValueError("the model has no index to add to")
        self._check_new_ids(corpus.ids)
        self.add_documents(corpus.ids, corpus.titles, self.embed_corpus(corpus, "new documents"))

    def repartition(self, seed: int | None = None) -> None:
        """Re-draw the leaves as k-means over every indexed document (the tree's weights are
        replaced by the centroids, so it places each document at its nearest one) and rebuild
        the index. For documents added after training that are unlike the trained ones (a
        new topic): the trained leaves have no room of their own for them, k-means over all
        documents does. It gives up the learned partition, so use it after such a shift."""
        if self.index is None:
            raise ValueError("the model has no index to repartition")
        emb = np.asarray(self.index.vectors)
        self.tree.reset_to_kmeans(emb, seed=self.config.train.seed if seed is None else seed)
        self.tree.eval()
        self.build_index(emb, self.doc_ids, self.doc_titles)
        self.recalibrate()

    def _rows_by_id(self) -> dict[str, int]:
        """Document id -> index row, built once per ``doc_ids`` list (every change replaces
        the list), so that filtered searches do not rebuild it per request."""
        return self._derived("_row_map", self.doc_ids, lambda ids: {d: i for i, d in enumerate(ids)})

    def _derived(self, name: str, source, build):
        """``build(source)``, kept until ``source`` is replaced by another object (every change
        to the calibration or the document list assigns a new one)."""
        cached = getattr(self, name, None)
        if cached is None or cached[0] is not source:
            cached = (source, build(source))
            setattr(self, name, cached)
        return cached[1]

    def _check_new_ids(self, ids) -> None:
        known = self._rows_by_id()
        clash = [i for i in ids if i in known]
        if clash:
            raise ValueError(f"{len(clash)} document ids are already indexed (first: {clash[0]!r})")

    def add_documents(self, ids: list[str], titles: list[str], emb: np.ndarray) -> None:
        """Route new documents (final embeddings) into their leaves; no retraining. The budget
        calibration is re-measured, since leaves grew."""
        if self.index is None:
            raise ValueError("the model has no index to add to")
        self._check_new_ids(ids)
        self.index.add(emb, self.place(emb, self.index.d2l))
        self._sketch = None
        self.doc_ids = self.doc_ids + list(ids)
        self.doc_titles = self.doc_titles + list(titles)
        self.corpus_fingerprint = _chain_fingerprint(self.corpus_fingerprint, "add", ids)
        self.recalibrate()

    def remove_documents(self, ids: list[str]) -> int:
        """Drop documents by id; returns how many were indexed (0: nothing changed)."""
        if self.index is None:
            raise ValueError("the model has no index to remove from")
        drop = set(ids)
        keep = np.array([d not in drop for d in self.doc_ids], dtype=bool)
        removed = int((~keep).sum())
        if removed == 0:
            return 0
        if removed == len(keep):
            raise ValueError("removing every document would leave an empty index")
        self.index = self.index.keep(np.flatnonzero(keep))
        self._sketch = None
        self.doc_ids = [d for d, k in zip(self.doc_ids, keep) if k]
        self.doc_titles = [t for t, k in zip(self.doc_titles, keep) if k]
        self.corpus_fingerprint = _chain_fingerprint(self.corpus_fingerprint, "remove", sorted(drop))
        self.recalibrate()
        return removed

    def recalibrate(self, sample: int = 2000, seed: int = 0) -> None:
        """Budget -> beam re-measured after the corpus changed, documents standing in for
        queries (training queries are not kept with the model)."""
        emb = self.index.vectors
        rows = np.sort(np.random.default_rng(seed).choice(len(emb), size=min(sample, len(emb)), replace=False))
        self.calibrate(emb[rows])

    def visited_fraction(self, query_emb: np.ndarray, beam: int) -> float:
        """Mean fraction of the corpus the queries visit at ``beam`` (the budget measure)."""
        return self._fraction_visited(self.route(query_emb, beam))

    def _fraction_visited(self, leaves: np.ndarray) -> float:
        return float(self.index.visited_counts(leaves).mean() / self.index.num_docs)

    def calibrate(self, query_emb: np.ndarray) -> list[list[float]]:
        """Mean fraction visited at each beam width of a grid (every width up to 64, then
        geometric), so that a budget maps to a beam at search time."""
        L = self.tree.num_leaves
        grid = sorted(set(list(range(1, min(L, 64) + 1)) + np.unique(np.geomspace(64, L, 32).astype(int)).tolist()))
        grid = [b for b in grid if b <= L]
        tc = self.config.tree
        router = self._current_router()
        if self.config.index.router == "tree" and tc.height == 2 and router.rank_by_leaf and tc.upper_beam == 0 and tc.upper_agreement > 0:
            # a beam per level: the cells expanded for each width, from the same queries
            rows = np.random.default_rng(0).permutation(len(query_emb))[:2000]  # bounds its (Q, L) masks
            uppers = router.calibrate_upper(query_emb[np.sort(rows)], grid, tc.upper_agreement)
            self.beam_calibration = [[b, self._fraction_visited(router.leaves(query_emb, b, uppers[b])), uppers[b]] for b in grid]
        else:
            self.beam_calibration = [[b, self.visited_fraction(query_emb, b)] for b in grid]
        return self.beam_calibration

    def beam_for_budget(self, budget: float) -> int:
        """The beam that visits ``budget`` of the corpus under the budget rule (budget.py)."""
        return calibrated_width(self.beam_calibration, budget)

    def resolve_beam(self, beam: int | None = None, budget: float | None = None) -> int:
        """The beam a search uses: ``beam``, or the one for ``budget``, or the default budget."""
        return resolve_width(self.tree.num_leaves, self.beam_calibration, beam, budget)

    def budget_documents(self, beam: int) -> float:
        """Documents a search of ``beam`` leaves scores on average (the calibration's mean
        fraction times the corpus; interpolated between calibrated widths)."""
        cal = self._derived("_cal_arrays", self.beam_calibration, lambda c: (np.array([x[0] for x in c], dtype=float), np.array([x[1] for x in c], dtype=float)))
        if len(cal[0]):
            frac = float(np.interp(beam, *cal))
        else:
            frac = min(1.0, beam / self.tree.num_leaves)
        return frac * self.index.num_docs

    def search_embeddings(self, q_emb: np.ndarray, k: int, beam: int, allowed: np.ndarray | None = None):
        """Search final query embeddings (Q, d); returns (SearchResult, leaves visited per query).

        ``allowed`` (document rows) restricts the result and never misses an allowed document
        the budget could afford: an allowed set no larger than the documents ``beam`` scores on
        average is scored whole, exactly (strategy "exact", no routing); a larger one is
        filtered inside the beam's leaves, and a query that finds fewer than ``k`` allowed
        documents there widens its beam (doubling, in beam order) until it has ``k`` or has
        scored as many allowed documents as the budget (strategy "filtered"). ``k`` beyond
        the corpus is clamped to it."""
        k = min(k, self.index.num_docs)
        if allowed is None:
            leaves = self.route(q_emb, beam)
            return self.index.search(q_emb, leaves, k), leaves
        from .filtering import search_allowed

        return search_allowed(self, q_emb, k, beam, allowed)

    def rows_of(self, ids) -> np.ndarray:
        """Index rows of document ids; ``UnknownIds`` (a ValueError) for ids not indexed."""
        pos = self._rows_by_id()
        missing = [n for n, i in enumerate(ids) if i not in pos]
        if missing:
            raise UnknownIds(len(missing), missing[0], ids[missing[0]])
        return np.array(sorted({pos[i] for i in ids}), dtype=np.int64)

    def to_hits(self, res, leaves: np.ndarray, queries=None, k: int | None = None, offset: int = 0) -> list[Hits]:
        """Rows ``offset ..`` of a search result as ``Hits``, one per query (top ``k``)."""
        n = len(queries) if queries is not None else len(res.indices) - offset
        out = []
        for i in range(offset, offset + n):
            hits = [
                Hit(self.doc_ids[j], float(s), self.doc_titles[j])
                for j, s in zip(res.indices[i, :k], res.scores[i, :k])
                if j >= 0
            ]
            q = None if queries is None else queries[i - offset]
            out.append(Hits(hits, int(res.visited[i]), float(res.visited[i] / self.index.num_docs), np.asarray(leaves[i]).tolist(), q, res.strategy))
        return out

    def search(
        self, queries: str | list[str], k: int = 10, beam: int | None = None, budget: float | None = None, ids: list[str] | None = None
    ) -> list[Hits]:
        """Search raw query texts; one ``Hits`` per query, in order (a single string is a list
        of one). Give ``beam`` (leaves visited) or ``budget`` (fraction of the corpus); by
        default search visits ``budget.DEFAULT_BUDGET`` of it. ``ids``: only these documents
        may be returned; the best ``k`` of them are found wherever they live when there are no
        more of them than the budget scores (see ``search_embeddings``)."""
        if self.index is None:
            raise ValueError("the model has no index; build one first")
        texts = [check_query(q) for q in ([queries] if isinstance(queries, str) else list(queries))]
        if not texts:
            return []
        check_k(k)
        beam = self.resolve_beam(beam, budget)
        allowed = None if ids is None else self.rows_of(ids)
        q = self.encoder.encode(texts)
        res, leaves = self.search_embeddings(q, k, beam, allowed)
        return self.to_hits(res, leaves, texts, k)

    # ---- persistence -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        def write(tmp: Path):
            (tmp / "config.json").write_text(self.config.to_json())
            save_file({k: v.contiguous().cpu() for k, v in self.encoder.trainable_state().items()}, str(tmp / "encoder.safetensors"))
            save_file({k: v.detach().contiguous().cpu() for k, v in self.tree.state_dict().items()}, str(tmp / "tree.safetensors"))
            if self.index is not None:
                if self.config.index.shards > 1:
                    write_shards(self.index, tmp, self.config.index.shards)
                else:
                    self.index.write(tmp)
                (tmp / "documents.json").write_text(json.dumps({"ids": self.doc_ids, "titles": self.doc_titles}))
                if self.config.index.router == "spread":  # else fitted if the router is switched
                    sk = self.leaf_sketch()
                    save_numpy({"means": sk.means, "spread": sk.spread, "counts": sk.counts}, str(tmp / SKETCH_FILE))

        meta = {
            "encoder_fingerprint": self.encoder.fingerprint,
            "corpus_fingerprint": self.corpus_fingerprint,
            "num_docs": len(self.doc_ids),
            "num_leaves": self.tree.num_leaves,
            "beam_calibration": self.beam_calibration,
            "validation": self.validation,
        }
        return write_artifact(path, write, meta)

    @classmethod
    def load(
        cls, path: str | Path, device: str = "cpu", mmap: bool = False, backend: str | None = None,
        shards: int | None = None, ray_address: str | None = None, shard_timeout: float = SHARD_TIMEOUT_S,
        router: str | None = None,
    ) -> "EHIModel":
        """Open a saved model. With ``mmap`` the index and the float vectors are mapped from
        disk, read-only: opening costs no memory up front (for search and serving).
        ``backend``: run the frozen transformer on this backend instead of the saved one.
        ``shards``: serve the index from that many Ray actors, one per shard file (the model
        must be saved in that many: ``ehi index shard``), on the Ray cluster at
        ``ray_address`` (default: a local one); read-only, like ``mmap``. A shard that has not
        answered a search within ``shard_timeout`` seconds fails it (``ShardUnavailable``).
        ``router``: search with this router ("spread" or "tree") instead of the saved one."""
        path = Path(path)
        manifest = read_manifest(path, required=MODEL_FILES)
        listed = manifest["files"]
        layout = INDEX_FILES if "index.faiss" in listed else (SHARDED_INDEX_FILES if "shards.json" in listed else LEGACY_INDEX_FILES)
        indexed = [f for f in layout if f in listed]
        legacy = layout is LEGACY_INDEX_FILES
        if indexed and len(indexed) != len(layout):
            missing = sorted(set(layout) - set(indexed))
            raise ArtifactError(f"{path / 'manifest.json'}: lists part of an index but not {', '.join(missing)}")
        if shards is not None and not indexed:
            raise ValueError(f"{path}: the model has no index to serve from shards")
        try:
            raw = json.loads((path / "config.json").read_text())
            if isinstance(raw, dict) and isinstance(raw.get("tree"), dict):
                # saved before per-node trees existed: its deeper levels are the one-hot kind
                raw["tree"].setdefault("conditioning", "one-hot")
            if isinstance(raw, dict) and isinstance(raw.get("index"), dict):
                raw["index"].setdefault("router", "tree")  # saved before the spread router: searches as it did
            config = EHIConfig.from_dict(raw).validate()
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{path / 'config.json'}: invalid config ({e})") from None
        if backend is not None:
            config.encoder.backend = backend
            config.validate()
        encoder = Encoder(config.encoder, device=device)
        if manifest.get("encoder_fingerprint") not in (None, encoder.fingerprint):
            raise ArtifactError(
                f"{path}: saved for base model {config.encoder.model_name} with fingerprint "
                f"{manifest['encoder_fingerprint']}, but the installed one is {encoder.fingerprint}"
            )
        try:
            enc_state = load_file(str(path / "encoder.safetensors"))
            tree_state = load_file(str(path / "tree.safetensors"))
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"{path}: unreadable weights ({e})") from None
        model = cls.from_weights(config, encoder, enc_state, tree_state, path)
        model.corpus_fingerprint = manifest.get("corpus_fingerprint", "")
        model.beam_calibration = _checked_calibration(manifest.get("beam_calibration") or [], model.tree.num_leaves, path / "manifest.json")
        model.validation = manifest.get("validation")
        if indexed:
            leaves, emb, ids, titles = _read_index(path, model.tree.num_leaves, encoder.dim)
            ic = config.index
            if legacy:  # saved before the Faiss index: rebuilt (and written on the next save)
                model.index = LeafIndex(leaves, np.asarray(emb), model.tree.num_leaves, ic.codec, ic.pq_m, ic.rerank)
            else:
                shard_map = None
                if layout is SHARDED_INDEX_FILES:
                    try:
                        shard_map = read_shard_map(path, model.tree.num_leaves, listed)
                    except ValueError as e:
                        raise ArtifactError(str(e)) from None
                    ic.shards = shard_map["count"]
                model.index = _open_index(path, shard_map, leaves, emb, model.tree.num_leaves, mmap, shards, (ray_address, shard_timeout), manifest)
                if model.index.codec != ic.codec:
                    raise ArtifactError(f"{path / layout[0]}: holds {model.index.codec} codes but config.json says {ic.codec}")
                model.index.rerank = ic.rerank
            model.doc_ids, model.doc_titles = ids, titles
            if SKETCH_FILE in listed:
                model._sketch = _read_sketch(path / SKETCH_FILE, model.index, config.index.spread_rank)
        if router is not None:  # another router re-measures the budget -> beam map
            model.set_index_options(router=router)
        return model

    @classmethod
    def from_weights(cls, config: EHIConfig, encoder: Encoder, enc_state: dict, tree_state: dict, where: str | Path = "") -> "EHIModel":
        """A model without an index, from its config and trained tensors."""
        try:
            encoder.load_trainable(enc_state)
        except ValueError as e:
            raise ArtifactError(f"{Path(where) / 'encoder.safetensors'}: {e}") from None
        try:
            tree = Tree.from_state(encoder.dim, config.tree, tree_state, encoder.device_name)
        except ValueError as e:
            raise ArtifactError(f"{Path(where) / 'tree.safetensors'}: {e}") from None
        encoder.eval()
        return cls(config, encoder, tree)


def _read_sketch(path: Path, index: LeafIndex, rank: int) -> LeafSketch:
    """The saved leaf sketch, checked against the index it summarises."""
    try:
        t = load_numpy(str(path))
        sk = LeafSketch(t["means"], t["spread"], t["counts"])
    except Exception as e:  # safetensors' own error types, a missing tensor, a bad shape
        raise ArtifactError(f"{path}: unreadable leaf sketch ({e})") from None
    L, d = index.num_leaves, index.dim
    if sk.means.shape != (L, d) or sk.spread.shape != (L, rank, d):
        raise ArtifactError(f"{path}: expected ({L}, {d}) means and ({L}, {rank}, {d}) spreads, got {sk.means.shape} and {sk.spread.shape}")
    if not np.array_equal(sk.counts, index.leaf_sizes()):
        raise ArtifactError(f"{path}: summarises other leaves than the index holds (saved from another index)")
    return sk


def _open_index(path: Path, shard_map: dict | None, leaves, emb, num_leaves: int, mmap: bool, shards, ray, manifest) -> LeafIndex:
    """The saved index (``shard_map``: saved in shards): whole, merged from its shard files, or
    served by its shards (in this process when mapped, or by Ray actors with ``shards``)."""
    from .index import read_ivf
    from .sharding import check_shard_lists, merged_ivf

    sharded = shard_map is not None
    count = shard_map["count"] if sharded else 1
    if shards is not None and shards != count:
        raise ValueError(
            f"{path}: saved in {count} shard{'s' * (count > 1)}, not {shards}: run 'ehi index shard {path} --shards {shards} --overwrite' first"
        )
    try:
        if not sharded and shards is None:
            return LeafIndex.read(path, leaves, emb if mmap else np.asarray(emb), num_leaves, mmap=mmap)
        if sharded and shards is None and not mmap:
            return LeafIndex.read(path, leaves, np.asarray(emb), num_leaves, ivf=merged_ivf(path, shard_map))
        files = shard_map["files"] if sharded else ["index.faiss"]
        first = read_ivf(path / files[0], mmap=True)
        base = LeafIndex.read(path, leaves, emb, num_leaves, mmap=True, ivf=first, check_lists=not sharded)
        leaf_shard = shard_map["leaf_shard"] if sharded else np.zeros(num_leaves, dtype=np.int64)
        if shards is None:  # mapped in this process: each shard scans its own lists
            from .sharding import LocalShard, ShardedIndex, open_shard

            local = []
            for s, name in enumerate(files):
                shard = open_shard(path / name, ivf=first if s == 0 else None)  # the first is read already
                check_shard_lists(shard.ivf, name, leaf_shard, s, base.leaf_sizes())
                local.append(LocalShard(shard, s))
            return ShardedIndex(base, leaf_shard, local)
    except ValueError as e:
        raise ArtifactError(f"{path / ('shards.json' if sharded else 'index.faiss')}: {e}") from None
    from .cluster import serve_shards

    return serve_shards(path, base, leaf_shard, files, [manifest["files"][f] for f in files], *ray)
