import numpy as np
import pytest

from ehi.index import LeafIndex


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


def test_leaf_storage_is_contiguous_and_stats():
    emb, leaves = _data(n=50, L=5)
    index = LeafIndex(leaves, emb, 5)
    sizes = index.leaf_sizes()
    assert sizes.sum() == 50
    for l in range(5):
        block = index.members[index.offsets[l] : index.offsets[l + 1]]
        assert (leaves[block, 0] == l).all()
        assert np.array_equal(index.leaf_embeddings[index.offsets[l] : index.offsets[l + 1]], emb[block])
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


@pytest.mark.parametrize("d2l", [1, 2])
def test_batched_search_equals_one_query_at_a_time(d2l):
    emb, leaves = _data(d2l=d2l)
    index = LeafIndex(leaves, emb, 10)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    q_leaves = np.stack([rng.permutation(10)[:3] for _ in range(40)])
    full = index.search(q, q_leaves, k=12, batch=256)
    for batch in (1, 7):
        part = index.search(q, q_leaves, k=12, batch=batch)
        assert np.array_equal(full.indices, part.indices) and np.array_equal(full.visited, part.visited)
        assert np.allclose(full.scores, part.scores, atol=1e-5)


def test_an_empty_last_leaf_in_the_beam_is_harmless():
    emb, _ = _data(n=6, L=4)
    index = LeafIndex(np.array([0, 0, 1, 1, 2, 2]), emb, 4)  # leaf 3 is empty
    res = index.search(emb[:2], np.array([[3, 0], [3, 2]]), k=4)
    assert res.visited.tolist() == [2, 2]
    assert set(res.indices[0, :2]) == {0, 1} and set(res.indices[1, :2]) == {4, 5}
    assert (res.indices[:, 2:] == -1).all()
