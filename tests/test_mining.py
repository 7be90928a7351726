import numpy as np

from ehi.training.mining import mine_pool, positives_matrix, sample_negatives


def test_mining_never_returns_a_positive_and_ranks_by_similarity():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((200, 16)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    positives = [[int(i), int((i * 7) % 200)] for i in range(30)]
    q = d[[p[0] for p in positives]] + 0.01  # each query sits on its first positive
    pos = positives_matrix(positives)
    pool = mine_pool(q, d, pos, pool=20)
    for row, p in zip(pool, positives):
        assert not set(row.tolist()) & set(p)
    scores = np.take_along_axis(q @ d.T, pool, axis=1)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    picks = sample_negatives(pool, 5, np.random.default_rng(1))
    for row, p in zip(picks, positives):
        assert not set(row.tolist()) & set(p)


def test_mining_restricted_to_the_leaves_the_query_reaches():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((100, 8)).astype(np.float32)
    q = rng.standard_normal((10, 8)).astype(np.float32)
    doc_leaves = (np.arange(100) % 5)[:, None]
    q_leaves = np.array([[i % 5, (i + 1) % 5] for i in range(10)])
    pos = positives_matrix([[i] for i in range(10)])
    pool = mine_pool(q, d, pos, pool=100, query_leaves=q_leaves, doc_leaves=doc_leaves)
    for i, row in enumerate(pool):
        got = row[row >= 0]
        assert set(doc_leaves[got, 0]) <= set(q_leaves[i])
        assert i not in got
        # everything reachable (two leaves of 20 docs), minus the positive when it is reachable
        assert len(got) == 40 - (doc_leaves[i, 0] in q_leaves[i])


def test_sample_negatives_marks_empty_pools():
    pool = np.array([[-1, -1], [3, -1]])
    out = sample_negatives(pool, 3, np.random.default_rng(0))
    assert (out[0] == -1).all() and (out[1] == 3).all()
