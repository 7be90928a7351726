"""Leaf index: the learned tree's leaves as the inverted lists of a Faiss ``IndexIVF``.

Faiss never assigns documents: each goes into the lists of its top-d2l leaves (as the tree
routed it) with ``add_core``, and search scans the lists the beam chose with
``search_preassigned``. So the scan, the codecs (``flat``: exact float32; ``sq8``: 8-bit
scalar quantizer; ``pq``: product quantizer, optionally re-ranked exactly from the float
vectors) and the file format are Faiss's own; what is EHI's is which leaves a vector lives
in and which leaves a query visits. The coarse quantizer holds each leaf's mean document,
so the saved ``index.faiss`` also works on its own in any Faiss tool (routed by centroid).

Faiss ids are document rows; a row's vector, leaves, id and title live at that row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ehi.index.faiss_ivf import (  # noqa: F401  (CODECS, read_ivf, id_selector: their old home)
    CODECS,
    PARALLEL_OVER_QUERIES,
    FaissLists,
    codec_of,
    codec_pq_m,
    f32,
    i64,
    id_selector,
    new_ivf,
    normalised,
    read_ivf,
)

READ_ONLY = "a sharded index opened for search is read-only; load the model with mmap=False to change or save it"


@dataclass
class SearchResult:
    indices: np.ndarray  # (Q, k) document rows, best first, -1 past the candidates
    scores: np.ndarray  # (Q, k) cosine scores (approximate for sq8/pq without re-rank), -inf past them
    visited: np.ndarray  # (Q,) distinct documents scored (with a filter: allowed ones only)
    strategy: str = "beam"  # "beam", "filtered" (allowed documents in the beam's leaves), "exact" (every allowed one)


class LeafIndex:
    """Documents in the leaves the tree gave them, scanned by Faiss.

    Every index wraps one trained Faiss IVF (``from_ivf``): built from documents and their
    leaves (the constructor), empty to fill chunk by chunk (``empty``), read from disk
    (``ehi.index.store``), or a subset (``keep``). Its lists are scanned in this process or,
    after ``serve_from``, by shards. ``vectors`` are the float32 document embeddings in row
    order (memory-mapped after loading): the exact re-rank of ``pq`` reads them, and nothing
    else needs them at search time.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> emb = rng.standard_normal((100, 8)).astype(np.float32)
    >>> emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    >>> index = LeafIndex(rng.integers(0, 4, 100), emb, num_leaves=4)
    >>> res = index.search(emb[:2], leaves=np.array([[0, 1], [2, 3]]), k=5)
    >>> res.indices.shape, int(res.visited[0]) == int(index.leaf_sizes()[[0, 1]].sum())
    ((2, 5), True)
    """

    def __init__(self, doc_leaves: np.ndarray, embeddings: np.ndarray, num_leaves: int, codec: str = "flat", pq_m: int = 0,
                 rerank: int = 0, seed: int = 0):
        doc_leaves = i64(doc_leaves)
        if doc_leaves.ndim == 1:
            doc_leaves = doc_leaves[:, None]
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] != doc_leaves.shape[0]:
            raise ValueError("one embedding per document is required")
        pq_m = codec_pq_m(codec, pq_m, embeddings.shape[1])
        if doc_leaves.size and (doc_leaves.min() < 0 or doc_leaves.max() >= num_leaves):
            raise ValueError("leaf id out of range")
        ivf = new_ivf(num_leaves, codec, pq_m, leaf_centroids(doc_leaves, embeddings, num_leaves), embeddings, seed)
        self._wrap(ivf, np.zeros((0, doc_leaves.shape[1]), dtype=np.int64), None, read_only=False, rerank=rerank)
        self.add(embeddings, doc_leaves)

    @classmethod
    def empty(cls, num_leaves: int, dim: int, d2l: int, centroids: np.ndarray, train: np.ndarray, codec: str = "flat", pq_m: int = 0,
              rerank: int = 0, seed: int = 0) -> "LeafIndex":
        """An index to fill chunk by chunk with ``add`` (corpora larger than memory twice
        over): ``centroids`` are the leaves' document sums or means (``leaf_centroids(...,
        normalise=False)`` added up over the chunks; scaled to unit length here), ``train`` a
        sample the codec learns from (unused by ``flat``)."""
        ivf = new_ivf(num_leaves, codec, codec_pq_m(codec, pq_m, dim), f32(normalised(np.asarray(centroids))), train, seed)
        return cls.from_ivf(ivf, np.zeros((0, d2l), dtype=np.int64), None, read_only=False, rerank=rerank)

    @classmethod
    def from_ivf(cls, ivf, doc_leaves: np.ndarray, vectors: np.ndarray | None, read_only: bool, rerank: int = 0) -> "LeafIndex":
        """An index around a Faiss IVF (its lists' sizes as they are)."""
        out = cls.__new__(cls)
        out._wrap(ivf, doc_leaves, vectors, read_only, rerank)
        return out

    def _wrap(self, ivf, doc_leaves: np.ndarray, vectors: np.ndarray | None, read_only: bool, rerank: int) -> None:
        """The one place an index's state is set: around ``ivf``, whose lists it scans."""
        self.ivf = ivf
        ivf.parallel_mode = PARALLEL_OVER_QUERIES
        self.num_leaves, self.codec, self.rerank = ivf.nlist, codec_of(ivf), int(rerank)
        self.pq_m = ivf.pq.M if self.codec == "pq" else 0
        self.code_size = ivf.code_size
        self.centroids = faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist)
        self.lists = FaissLists(ivf, self.centroids, self.codec)
        self.doc_leaves = doc_leaves
        # float vectors kept beside the codes only where the codes are not them (sq8, pq):
        # flat lists hold the vectors themselves and ``vectors`` reads them back
        self._chunks, self._vectors = ([vectors], vectors) if vectors is not None else ([], None)
        self._sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        self._members = self._pad = self._where = None
        self.read_only = read_only

    def serve_from(self, lists) -> None:
        """Scan through other ``lists`` (shards, ``ehi.index.shards``) from now on: the rows
        stay here, the index becomes read-only and has no Faiss lists of its own."""
        self.lists, self.ivf, self.read_only = lists, None, True

    # ---- changes ----------------------------------------------------------------------------
    def _add(self, start: int, x: np.ndarray, leaves: np.ndarray) -> None:
        """Rows ``start ..`` into their leaves' lists: O(new rows)."""
        x = f32(x)
        for j in range(leaves.shape[1]):
            a = i64(leaves[:, j])
            ids = np.arange(start, start + len(x), dtype=np.int64)
            # ids and a stay referenced here: faiss.contrib's add_preassigned drops its own
            # reference to ids before the call, and the array can be freed under Faiss
            self.ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(a))
            self._sizes += np.bincount(a, minlength=self.num_leaves)
        self._members = self._pad = self._where = None

    def _check_writable(self) -> None:
        if self.read_only:
            raise ValueError("this index was opened memory-mapped (read-only); load the model with mmap=False to change it")

    def add(self, embeddings: np.ndarray, leaves: np.ndarray) -> None:
        """Append documents (rows after the current ones) into the given leaves."""
        self._check_writable()
        leaves = i64(leaves).reshape(len(embeddings), -1)
        if leaves.shape[1] != self.d2l:
            raise ValueError(f"expected {self.d2l} leaves per document, got {leaves.shape[1]}")
        if leaves.size and (leaves.min() < 0 or leaves.max() >= self.num_leaves):
            raise ValueError("leaf id out of range")
        start = self.num_docs
        self._add(start, embeddings, leaves)
        self.doc_leaves = np.concatenate([self.doc_leaves, leaves]) if start else leaves
        if self.codec != "flat":
            self._chunks.append(np.asarray(embeddings))
        self._vectors = None

    def keep(self, rows: np.ndarray) -> "LeafIndex":
        """A new index of only ``rows`` (renumbered 0..), with the same trained codec."""
        self._check_writable()
        rows = i64(rows)
        vecs = np.asarray(self.vectors[rows])
        ivf = faiss.clone_index(self.ivf)  # trained state kept, lists emptied
        ivf.reset()
        out = LeafIndex.from_ivf(ivf, self.doc_leaves[rows], None, read_only=False, rerank=self.rerank)
        out._chunks = [vecs] if self.codec != "flat" else []
        out._add(0, vecs, out.doc_leaves)
        return out

    # ---- what it holds ----------------------------------------------------------------------
    @property
    def d2l(self) -> int:
        return self.doc_leaves.shape[1]

    @property
    def num_docs(self) -> int:
        return self.doc_leaves.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def shard_count(self) -> int:
        return self.lists.count

    @property
    def vectors(self) -> np.ndarray:
        """Row-order float embeddings: memory-mapped after loading; for sq8/pq the kept
        float copy; for flat read back from the lists (a fresh array; not kept)."""
        if self._vectors is not None:
            return self._vectors
        if self.codec == "flat":
            out = np.empty((self.num_docs, self.dim), dtype=np.float32)
            for lst in np.flatnonzero(self._sizes):
                ids, vecs = self._flat_list(int(lst))
                out[ids] = vecs
            return out
        self._vectors = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [self._vectors]
        return self._vectors

    embeddings = vectors  # the name earlier versions used

    def _flat_list(self, lst: int) -> tuple[np.ndarray, np.ndarray]:
        """A flat list's document rows and float vectors, as views of Faiss's memory."""
        inv = self.ivf.invlists
        n = inv.list_size(lst)
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), n)
        codes = faiss.rev_swig_ptr(inv.get_codes(lst), n * inv.code_size)
        return ids, np.frombuffer(codes, dtype=np.float32).reshape(n, self.dim)

    def rows_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Float vectors of some rows (sorted): from the kept or mapped copy, else read out of
        the flat lists where they live, one list at a time."""
        rows = i64(rows)
        if self._vectors is not None or self._chunks:
            return f32(self.vectors[rows])
        if self._where is None:  # each row's (list, position), one of its copies
            where_list, where_at = np.zeros(self.num_docs, dtype=np.int64), np.zeros(self.num_docs, dtype=np.int64)
            for lst in np.flatnonzero(self._sizes):
                ids = self._flat_list(int(lst))[0]
                where_list[ids], where_at[ids] = lst, np.arange(len(ids))
            self._where = (where_list, where_at)
        where_list, where_at = self._where
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        lists = where_list[rows]
        for lst in np.unique(lists):
            mine = np.flatnonzero(lists == lst)
            out[mine] = self._flat_list(int(lst))[1][where_at[rows[mine]]]
        return out

    def leaf_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def shard_documents(self) -> list[int]:
        """Documents (copies) each shard holds (one index is one shard)."""
        return self.lists.documents(self._sizes)

    def nbytes(self) -> int:
        """Bytes the scanned codes and ids take (what a search holds in memory)."""
        return int(self._sizes.sum()) * (self.code_size + 8) + self.centroids.nbytes

    def leaf_stats(self, query_leaves: np.ndarray | None = None) -> dict:
        """Balance of the documents over the leaves (``leaf_stats``)."""
        return leaf_stats(self, query_leaves)

    # ---- search -----------------------------------------------------------------------------
    def visited_counts(self, leaves: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Distinct documents in each row's leaves (Q, beta); -1 entries are no leaf. With
        ``rows``: only those documents count (what a filtered scan scores)."""
        leaves = i64(leaves)
        leaves = leaves.reshape(len(leaves), -1)
        if self.d2l == 1:
            # a document lives in one leaf: sizes add up (-1 reads the trailing 0)
            if rows is None and self._pad is None:
                self._pad = np.append(self._sizes, 0)
            return (self._pad if rows is None else self.leaf_counts(rows, pad=True))[leaves].sum(1)
        # documents x queries overlap counts of a sparse product; its non-zeros per column
        # are the distinct documents each query visits
        from scipy.sparse import csr_matrix

        if self._members is None:  # (N, L): which leaves hold each document
            n, d2l = self.doc_leaves.shape
            member_rows = np.repeat(np.arange(n), d2l)
            self._members = csr_matrix((np.ones(n * d2l, dtype=np.int32), (member_rows, self.doc_leaves.ravel())), shape=(n, self.num_leaves))
        docs_in = self._members if rows is None else self._members[i64(rows)]
        r, c = np.nonzero(leaves >= 0)
        visits = csr_matrix((np.ones(len(r), dtype=np.int32), (leaves[r, c], r)), shape=(self.num_leaves, len(leaves)))
        return np.asarray((docs_in @ visits).astype(bool).sum(0)).ravel().astype(np.int64)

    def leaf_counts(self, rows: np.ndarray, pad: bool = False) -> np.ndarray:
        """Copies of the documents ``rows`` in each leaf (L,), and a trailing 0 with ``pad``
        (what leaf id -1 reads)."""
        return np.bincount(self.doc_leaves[i64(rows)].ravel(), minlength=self.num_leaves + pad)

    def search(
        self, queries: np.ndarray, leaves: np.ndarray, k: int, allowed: np.ndarray | None = None, visited: np.ndarray | None = None
    ) -> SearchResult:
        """The top ``k`` documents by cosine among those in each query's ``leaves`` (Q, beta).

        ``allowed``: optional document rows to restrict the search to (Faiss IDSelector).
        ``visited``: the documents each query scores, when the caller counted them already."""
        q = f32(queries)
        leaves = i64(leaves).reshape(len(q), -1)
        if visited is None:
            visited = self.visited_counts(leaves, allowed)  # with a filter: the allowed documents scored
        # copies of a document in several visited leaves come back once each: fetch enough
        fetch = k * self.d2l
        if self.codec == "pq" and self.rerank:
            fetch = max(fetch, self.rerank)
        D, I = self.scan(q, leaves, fetch, allowed, self.num_docs)
        if self.codec == "pq" and self.rerank:
            D, I = _rerank(self, q, I)
        if self.d2l > 1:
            D, I = _dedupe(D, I)
        if fetch != k:
            D, I = np.ascontiguousarray(D[:, :k]), np.ascontiguousarray(I[:, :k])
        return SearchResult(I, D, visited, "beam" if allowed is None else "filtered")

    def scan(self, q: np.ndarray, leaves: np.ndarray, fetch: int, allowed: np.ndarray | None = None, n: int | None = None):
        """The lists' scan (``Lists.scan``) of ``leaves`` (Q, beta; -1 = none)."""
        q = f32(q)
        return self.lists.scan(q, i64(leaves).reshape(len(q), -1), fetch, allowed, self.num_docs if n is None else n)

    def close(self) -> None:
        """Stop the processes that serve its lists (Ray actors); it cannot search afterwards."""
        self.lists.close()

    # ---- files ------------------------------------------------------------------------------
    def write(self, folder: Path) -> list[str]:
        """Files written into ``folder`` (the caller's atomic save); ``shards.write_shards``
        writes the lists as several files instead."""
        if self.ivf is None:
            raise ValueError(READ_ONLY)
        faiss.write_index(self.ivf, str(folder / "index.faiss"))
        return ["index.faiss", *self.write_rows(folder)]

    def write_rows(self, folder: Path) -> list[str]:
        """Each row's leaves and float vector (what routing-free reads and re-ranks need)."""
        np.save(folder / "doc_leaves.npy", self.doc_leaves)
        np.save(folder / "doc_embeddings.npy", f32(self.vectors))
        return ["doc_leaves.npy", "doc_embeddings.npy"]

    @classmethod
    def read(cls, folder: Path, doc_leaves: np.ndarray, vectors: np.ndarray, num_leaves: int, mmap: bool = False, ivf=None,
             check_lists: bool = True) -> "LeafIndex":
        """Open a saved index (``index.faiss``, or the given Faiss ``ivf``); with ``mmap`` its
        lists are mapped from disk (read-only), so opening costs no memory up front. Raises
        ValueError if it does not match the rows."""
        if ivf is None:
            ivf = read_ivf(folder / "index.faiss", mmap)
        if ivf.nlist != num_leaves or ivf.d != vectors.shape[1]:
            raise ValueError(f"index has {ivf.nlist} lists of dimension {ivf.d}; the model has {num_leaves} leaves of {vectors.shape[1]}")
        doc_leaves = i64(doc_leaves).reshape(len(doc_leaves), -1)
        out = cls.from_ivf(ivf, doc_leaves, vectors, read_only=mmap)
        sizes = np.bincount(doc_leaves.ravel(), minlength=num_leaves).astype(np.int64)
        if check_lists and not np.array_equal(out._sizes, sizes):
            raise ValueError("its lists do not hold the documents doc_leaves.npy assigns")
        out._sizes = sizes  # the rows' count (a shard's lists hold only part of them)
        return out


def leaf_stats(index: "LeafIndex", query_leaves: np.ndarray | None = None) -> dict:
    """Balance of the documents over the leaves.

    The expected documents scanned in one leaf is sum_i p_i c_i, with c_i the size of
    leaf i and p_i the share of queries whose top leaf it is (``query_leaves``, else the
    documents' own top leaves stand in for the queries); a balanced tree gives N*d2l / L.
    """
    sizes = index.leaf_sizes()
    top = index.doc_leaves[:, 0] if query_leaves is None else np.asarray(query_leaves).reshape(len(query_leaves), -1)[:, 0]
    p = np.bincount(top, minlength=index.num_leaves) / max(len(top), 1)
    return {
        "leaves": int(index.num_leaves),
        "documents": int(index.num_docs),
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "empty": int((sizes == 0).sum()),
        "expected_per_leaf": float((p * sizes).sum()),
        "ideal_per_leaf": index.num_docs * index.d2l / index.num_leaves,
    }


def leaf_centroids(doc_leaves: np.ndarray, emb: np.ndarray, num_leaves: int, normalise: bool = True) -> np.ndarray:
    """Each leaf's mean document (unit length; zero for an empty leaf). With ``normalise``
    False: the sums, to add up over chunks and normalise once."""
    from scipy.sparse import csr_matrix

    doc_leaves = i64(doc_leaves).reshape(len(emb), -1)
    n, d2l = doc_leaves.shape
    member = csr_matrix((np.ones(n * d2l), (doc_leaves.ravel(), np.repeat(np.arange(n), d2l))), shape=(num_leaves, n))
    c = np.asarray(member @ np.asarray(emb, dtype=np.float64))
    return f32(normalised(c)) if normalise else c


def _rerank(index: "LeafIndex", q: np.ndarray, I: np.ndarray):
    """Exact cosine of the candidates from the float vectors (read from disk if mapped)."""
    ok = I >= 0
    rows = np.where(ok, I, 0)
    uniq, inv = np.unique(rows, return_inverse=True)
    vecs = f32(index.vectors[uniq])  # one sorted gather from the (memory-mapped) vectors
    S = np.einsum("qkd,qd->qk", vecs[inv.reshape(rows.shape)], q)
    S = np.where(ok, S, -np.inf)
    order = np.argsort(-S, axis=1, kind="stable")
    return np.take_along_axis(S, order, 1).astype(np.float32), np.take_along_axis(np.where(ok, I, -1), order, 1)


def _dedupe(D: np.ndarray, I: np.ndarray):
    """Keep each document's best copy per row (rows are sorted best first)."""
    srt = np.argsort(I, axis=1, kind="stable")
    si = np.take_along_axis(I, srt, 1)
    dup_sorted = np.zeros_like(si, dtype=bool)
    dup_sorted[:, 1:] = (si[:, 1:] == si[:, :-1]) & (si[:, 1:] >= 0)
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, srt, dup_sorted, 1)
    D = np.where(dup, -np.inf, D)
    order = np.argsort(-D, axis=1, kind="stable")
    I = np.where(np.isfinite(np.take_along_axis(D, order, 1)), np.take_along_axis(I, order, 1), -1)
    return np.take_along_axis(D, order, 1), I
