import faiss
import numpy as np
import pytest

from ehi.index.leaf_index import LeafIndex


def _data(n=300, d=16, L=10, d2l=1, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    leaves = np.stack([rng.permutation(L)[:d2l] for _ in range(n)])
    return emb, leaves


@pytest.mark.parametrize("k", [3, 15, 40])
@pytest.mark.parametrize("d2l", [1, 2, 3])
def test_leaf_search_equals_exact_ranking_over_the_same_candidates(d2l, k):
    # leaves hold ~30 documents (x d2l): with k below that each leaf hands on only its own top k
    emb, leaves = _data(d2l=d2l)
    index = LeafIndex(leaves, emb, 10)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((25, 16)).astype(np.float32)
    q_leaves = np.stack([rng.permutation(10)[:3] for _ in range(25)])
    res = index.search(q, q_leaves, k=k)
    for i in range(25):
        cand = np.where(np.isin(leaves, q_leaves[i]).any(1))[0]
        assert res.visited[i] == len(cand)
        ref = cand[np.argsort(-(emb[cand] @ q[i]), kind="stable")][:k]
        assert np.array_equal(res.indices[i], ref)
        assert np.allclose(res.scores[i], emb[ref] @ q[i], atol=1e-5)
    assert np.array_equal(index.visited_counts(q_leaves), res.visited)


def test_visiting_every_leaf_is_exact_search():
    emb, leaves = _data()
    index = LeafIndex(leaves, emb, 10)
    q = emb[:5] + 0.1
    res = index.search(q, np.tile(np.arange(10), (5, 1)), k=20)
    exact = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :20]
    assert np.array_equal(res.indices, exact)
    assert (res.visited == 300).all()


def test_each_leaf_list_holds_exactly_its_documents_and_stats():
    emb, leaves = _data(n=50, L=5)
    index = LeafIndex(leaves, emb, 5)
    sizes = index.leaf_sizes()
    assert sizes.sum() == 50
    inv = index.ivf.invlists
    for l in range(5):
        ids = faiss.rev_swig_ptr(inv.get_ids(l), inv.list_size(l)).copy()
        assert sorted(ids.tolist()) == np.flatnonzero(leaves[:, 0] == l).tolist()
    st = index.leaf_stats()
    assert st["min"] == sizes.min() and st["max"] == sizes.max() and st["ideal_per_leaf"] == 10
    # documents stand in for queries: expected per visited leaf is sum(c_i^2) / N
    assert st["expected_per_leaf"] == pytest.approx((sizes**2).sum() / 50)


def test_empty_leaves_and_short_results():
    emb, _ = _data(n=4, L=3)
    index = LeafIndex(np.array([0, 0, 2, 2]), emb, 3)
    res = index.search(emb[:1], np.array([[1, 0]]), k=5)
    assert res.visited[0] == 2
    assert (res.indices[0, 2:] == -1).all() and np.isneginf(res.scores[0, 2:]).all()


def test_an_empty_last_leaf_in_the_beam_is_harmless():
    emb, _ = _data(n=6, L=4)
    index = LeafIndex(np.array([0, 0, 1, 1, 2, 2]), emb, 4)  # leaf 3 is empty
    res = index.search(emb[:2], np.array([[3, 0], [3, 2]]), k=4)
    assert res.visited.tolist() == [2, 2]
    assert set(res.indices[0, :2]) == {0, 1} and set(res.indices[1, :2]) == {4, 5}
    assert (res.indices[:, 2:] == -1).all()


def _queries(n=25, d=16, L=10, beta=3, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, np.stack([rng.permutation(L)[:beta] for _ in range(n)])


def _recall(res, ref, k):
    return np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(res.indices, ref.indices)])


def test_compressed_codecs_are_smaller_and_pq_rerank_restores_the_exact_ranking():
    emb, leaves = _data(n=3000, d=32, L=10)
    q, ql = _queries(d=32)
    flat = LeafIndex(leaves, emb, 10)
    ref = flat.search(q, ql, 10)
    sq8 = LeafIndex(leaves, emb, 10, codec="sq8")
    pq = LeafIndex(leaves, emb, 10, codec="pq", pq_m=8)
    assert sq8.nbytes() < 0.4 * flat.nbytes() and pq.nbytes() < 0.2 * flat.nbytes()
    assert _recall(sq8.search(q, ql, 10), ref, 10) >= 0.9
    assert (sq8.search(q, ql, 10).visited == ref.visited).all()
    pq.rerank = 300  # every candidate of a leaf of ~300: re-ranked exactly
    res = pq.search(q, ql, 10)
    assert np.array_equal(res.indices, ref.indices) and np.allclose(res.scores, ref.scores, atol=1e-5)


def test_padded_beams_skip_missing_leaves():
    emb, leaves = _data()
    index = LeafIndex(leaves, emb, 10)
    q, ql = _queries()
    padded = ql.copy()
    padded[:, 2] = -1
    a, b = index.search(q, padded, 10), index.search(q, ql[:, :2], 10)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.visited, b.visited)


@pytest.mark.parametrize("d2l", [1, 2])
def test_adding_documents_equals_indexing_them_from_the_start(d2l):
    emb, leaves = _data(d2l=d2l)
    q, ql = _queries()
    grown = LeafIndex(leaves[:200], emb[:200], 10)
    grown.add(emb[200:], leaves[200:])
    full = LeafIndex(leaves, emb, 10)
    a, b = grown.search(q, ql, 15), full.search(q, ql, 15)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.visited, b.visited)
    assert np.array_equal(grown.vectors, emb) and np.array_equal(grown.leaf_sizes(), full.leaf_sizes())


def test_keeping_rows_renumbers_them_like_a_fresh_index():
    emb, leaves = _data(d2l=2)
    q, ql = _queries()
    rows = np.arange(0, 300, 3)
    a = LeafIndex(leaves, emb, 10).keep(rows).search(q, ql, 10)
    b = LeafIndex(leaves[rows], emb[rows], 10).search(q, ql, 10)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.visited, b.visited)


def test_allowed_rows_filter_inside_the_scan():
    emb, leaves = _data()
    q, ql = _queries()
    index = LeafIndex(leaves, emb, 10)
    allowed = np.arange(1, 300, 2)
    res = index.search(q, ql, 10, allowed=allowed)
    for i in range(len(q)):
        cand = [j for j in np.flatnonzero(np.isin(leaves[:, 0], ql[i])) if j in set(allowed)]
        ref = sorted(cand, key=lambda j: -(emb[j] @ q[i]))[:10]
        assert res.indices[i, : len(ref)].tolist() == ref


@pytest.mark.parametrize("codec", ["flat", "sq8", "pq"])
def test_written_index_reads_back_memory_mapped_and_read_only(tmp_path, codec):
    emb, leaves = _data(n=2000, d=32)
    q, ql = _queries(d=32)
    index = LeafIndex(leaves, emb, 10, codec=codec, pq_m=8)
    index.write(tmp_path)
    vecs = np.load(tmp_path / "doc_embeddings.npy", mmap_mode="r")
    back = LeafIndex.read(tmp_path, np.load(tmp_path / "doc_leaves.npy"), vecs, 10, mmap=True)
    a, b = index.search(q, ql, 10), back.search(q, ql, 10)
    assert back.codec == codec and np.array_equal(a.indices, b.indices) and np.allclose(a.scores, b.scores)
    with pytest.raises(ValueError, match="read-only"):
        back.add(emb[:3], leaves[:3])
    with pytest.raises(ValueError, match="do not hold"):
        LeafIndex.read(tmp_path, np.roll(np.load(tmp_path / "doc_leaves.npy"), 1) % 9, vecs, 10)
