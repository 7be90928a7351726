"""Off-the-shelf indexes over the same embeddings, searched at the same fraction visited:
Faiss IVF (k-means lists), ScaNN (its partitioner) and Faiss HNSW (a graph)."""

from __future__ import annotations

import re

import numpy as np

from ehi.config import IndexConfig
from ehi.progress import filtered_stderr

# ScaNN logs through absl's C++ logging straight to file descriptor 2 ("All log messages
# before absl::InitializeLog() ...", then an I-line per partitioner run): facts about its
# k-means a user cannot act on. Those lines are dropped; anything else it writes is kept.
_ABSL_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} \d\d:\d\d:\d\d)")


class IVFBaseline:
    """Faiss IndexIVFFlat with inner product (cosine on normalised embeddings).

    The fraction visited at a given nprobe is the size of the probed inverted lists over N,
    the same cost measure as EHI's leaves.
    """

    name = "Faiss-IVF"

    def __init__(self, doc_emb: np.ndarray, nlist: int, seed: int = 0, spherical: bool = False):
        import faiss

        x = np.ascontiguousarray(doc_emb, dtype=np.float32)
        self.n, d = x.shape
        self.nlist = nlist
        self.quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFFlat(self.quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = seed
        self.index.cp.spherical = spherical
        # as many lists as EHI has leaves, on purpose: a small corpus gives fewer than Faiss's
        # 39 training points per list, and its warning about it is not the user's to act on
        # (the recall it gets is what the comparison measures)
        self.index.cp.min_points_per_centroid = 1
        self.index.train(x)
        self.index.add(x)
        inv = self.index.invlists
        self.list_sizes = np.array([inv.list_size(i) for i in range(nlist)], dtype=np.int64)

    @property
    def max_width(self) -> int:
        return self.nlist

    def probes(self, q_emb: np.ndarray, nprobe: int) -> np.ndarray:
        _, lists = self.quantizer.search(np.ascontiguousarray(q_emb, dtype=np.float32), nprobe)
        return lists

    def visited_fraction(self, q_emb: np.ndarray, nprobe: int) -> float:
        lists = self.probes(q_emb, nprobe)
        return float(self.list_sizes[lists].sum(1).mean() / self.n)

    def search(self, q_emb: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices, scores, visited per query)."""
        q = np.ascontiguousarray(q_emb, dtype=np.float32)
        self.index.nprobe = nprobe
        scores, idx = self.index.search(q, k)
        visited = self.list_sizes[self.probes(q, nprobe)].sum(1)
        return idx, scores, visited


class SpreadIVFBaseline(IVFBaseline):
    """Training-free routing after Optimist (Bruch, Krishnan, Nardini, NeurIPS 2025): spherical
    k-means lists, probed in the order of each list's mean plus ``lam`` times the spread of its
    documents' inner products with the query (``leaf_sketch.LeafSketch``, rank ``rank``,
    searched with the same shared basis and candidates as EHI's)
    instead of by centroid. What EHI's own spread router would be over an off-the-shelf
    partition: the baseline that isolates what training the tree and encoder adds."""

    name = "k-means + spread router"

    def __init__(self, doc_emb: np.ndarray, nlist: int, seed: int = 0, lam: float = IndexConfig.spread_lambda,
                 rank: int = IndexConfig.spread_rank, basis: int = IndexConfig.spread_basis, per_beam: float = IndexConfig.spread_candidates):
        from ehi.model.leaf_sketch import LeafSketch

        super().__init__(doc_emb, nlist, seed, spherical=True)
        self.lam = lam
        x = np.ascontiguousarray(doc_emb, dtype=np.float32)
        _, lists = self.quantizer.search(x, 1)  # each document's list, as add() assigned it
        self.sketch = LeafSketch.fit(x, lists[:, 0], nlist, rank, basis, per_beam)

    def probes(self, q_emb: np.ndarray, nprobe: int) -> np.ndarray:
        return self.sketch.top(np.ascontiguousarray(q_emb, dtype=np.float32), nprobe, self.lam)

    def search(self, q_emb: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(q_emb, dtype=np.float32)
        lists = self.probes(q, nprobe)
        self.index.nprobe = lists.shape[1]  # Faiss checks the preassigned lists against it
        scores, idx = self.index.search_preassigned(q, k, lists, np.zeros(lists.shape, dtype=np.float32))
        return idx, scores, self.list_sizes[lists].sum(1)


def exact_search(q_emb: np.ndarray, doc_emb: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k (embeddings are normalised)."""
    import faiss

    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(np.ascontiguousarray(doc_emb, dtype=np.float32))
    scores, idx = index.search(np.ascontiguousarray(q_emb, dtype=np.float32), min(k, doc_emb.shape[0]))
    return idx, scores


class ScaNNBaseline:
    """ScaNN partitioning (k-means tree, spherical, ``num_leaves`` = EHI's leaves,
    ``min_partition_size=1`` so that it really has that many) with exact float32 scoring
    inside the searched leaves: no quantisation and no reordering, so the documents scored
    are exactly those of the searched partitions. The fraction visited is measured by asking
    for every candidate and counting the finite scores returned."""

    name = "ScaNN"

    def __init__(self, doc_emb: np.ndarray, num_leaves: int, seed: int = 0):
        import scann

        x = np.ascontiguousarray(doc_emb, dtype=np.float32)
        self.n = x.shape[0]
        self.num_leaves = num_leaves
        self.config = {
            "partitioning": "tree",
            "num_leaves": num_leaves,
            "min_partition_size": 1,
            "spherical": True,
            "training_sample_size": self.n,
            "scoring": "brute_force float32, no reordering",
            "seed": "ScaNN's own (not settable from Python)",
        }
        with filtered_stderr(_ABSL_NOISE):
            self.searcher = (
                scann.scann_ops_pybind.builder(x, 100, "dot_product")
                .tree(num_leaves=num_leaves, num_leaves_to_search=1, training_sample_size=self.n, min_partition_size=1, spherical=True)
                .score_brute_force()
                .build()
            )

    @property
    def max_width(self) -> int:
        return self.num_leaves

    def visited(self, q_emb: np.ndarray, leaves_to_search: int) -> np.ndarray:
        _, d = self.searcher.search_batched(
            np.ascontiguousarray(q_emb, dtype=np.float32), final_num_neighbors=self.n, leaves_to_search=leaves_to_search
        )
        return np.isfinite(d).sum(1)

    def visited_fraction(self, q_emb: np.ndarray, leaves_to_search: int) -> float:
        return float(self.visited(q_emb, leaves_to_search).mean() / self.n)

    def search(self, q_emb: np.ndarray, k: int, leaves_to_search: int):
        idx, d = self.searcher.search_batched(
            np.ascontiguousarray(q_emb, dtype=np.float32), final_num_neighbors=k, leaves_to_search=leaves_to_search
        )
        idx = np.asarray(idx, dtype=np.int64).copy()
        d = np.asarray(d, dtype=np.float32).copy()
        bad = ~np.isfinite(d)
        idx[bad], d[bad] = -1, -np.inf
        return idx, d, self.visited(q_emb, leaves_to_search)


class HNSWBaseline:
    """Faiss IndexHNSWFlat with inner product: the graph index most users (and most vector
    databases) would pick. ``M`` = 32 neighbours per node and efConstruction 200 by default;
    the width a budget chooses is efSearch (Faiss searches with max(efSearch, k)).

    Its fraction visited is the distance computations per query over N, counted by Faiss
    (``hnsw_stats.ndis``; a document's vector is read at most once per query): the documents a
    query scores, EHI's and IVF's cost measure. The graph walk reads many documents that are
    not near the answer, so at k = 100 a small corpus may need most of itself even at the
    smallest efSearch: the budget table then shows no HNSW row below that."""

    name = "HNSW"

    def __init__(self, doc_emb: np.ndarray, M: int = 32, ef_construction: int = 200, max_ef: int = 4096):
        import faiss

        x = np.ascontiguousarray(doc_emb, dtype=np.float32)
        self.n, d = x.shape
        self.M, self.ef_construction = M, ef_construction
        self.index = faiss.IndexHNSWFlat(d, M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(x)
        self.max_ef = max(1, min(max_ef, self.n))

    @property
    def max_width(self) -> int:
        return self.max_ef

    def nbytes(self) -> int:
        """Bytes of the serialized index (vectors and graph)."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def _search(self, q_emb: np.ndarray, k: int, ef: int):
        import faiss

        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef)
        q = np.ascontiguousarray(q_emb, dtype=np.float32)
        faiss.cvar.hnsw_stats.reset()
        scores, idx = self.index.search(q, min(k, self.n), params=params)
        return idx, scores, faiss.cvar.hnsw_stats.ndis / max(1, len(q))

    def visited_fraction(self, q_emb: np.ndarray, ef: int, k: int = 100) -> float:
        """Mean fraction of the corpus a search for ``k`` at ``ef`` scores."""
        return float(min(1.0, self._search(q_emb, k, ef)[2] / self.n))

    def search(self, q_emb: np.ndarray, k: int, ef: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices, scores, documents scored per query: the batch's mean, as Faiss counts
        the batch as a whole)."""
        idx, scores, per_query = self._search(q_emb, k, ef)
        return idx, scores, np.full(len(idx), min(float(self.n), per_query))
