import numpy as np
import pytest
import torch

from ehi.config import TreeConfig
from ehi.model.tree import Tree, leaf_to_path, path_to_leaf
from ehi.training.losses import load_balance_penalty


def make_tree(B, H, d=8, seed=0, **tree_config):
    """A tree with a non-trivial U; the paper's one-hot conditioning unless told otherwise."""
    torch.manual_seed(seed)
    tree = Tree(d, TreeConfig(branching=B, height=H, **{"conditioning": "one-hot", **tree_config}))
    # a non-trivial U so that F(x) = x + ReLU(U^T x) matters
    with torch.no_grad():
        for level in tree.levels:
            level.U.normal_(0, 0.5)
    return tree


@pytest.mark.parametrize("B,H", [(5, 1), (3, 2), (2, 3)])
def test_path_embedding_shape_and_level_sums(B, H):
    tree = make_tree(B, H)
    e = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    r = tree.route(e)
    assert r.path_embedding.shape == (7, B * H)
    assert r.path.shape == (7, H)
    # level h's block sums to the probability of the arg-max prefix chosen above it
    prefix = torch.ones(7)
    for h in range(H):
        block = r.path_embedding[:, h * B : (h + 1) * B]
        assert torch.allclose(block.sum(1), prefix, atol=1e-6)
        prefix = prefix * r.level_probs[h].gather(1, r.path[:, h : h + 1]).squeeze(1)
    assert torch.all(r.leaf < B**H)


def test_level_input_orders_most_recent_choice_first():
    tree = make_tree(3, 3)
    e = torch.zeros(1, 8)
    x = tree._level_input(e, torch.tensor([[2, 0]]))
    # [o(i^2); o(i^1); e] with i^1 = 2, i^2 = 0
    assert x[0, :3].tolist() == [1, 0, 0]
    assert x[0, 3:6].tolist() == [0, 0, 1]


@pytest.mark.parametrize("B,H", [(6, 1), (3, 2), (2, 3)])
def test_full_beam_equals_brute_force_enumeration(B, H):
    tree = make_tree(B, H)
    e = torch.nn.functional.normalize(torch.randn(11, 8), dim=-1)
    brute = tree.leaf_log_probs(e)  # (N, L)
    assert torch.allclose(brute.exp().sum(1), torch.ones(11), atol=1e-5)
    leaves, logp = tree.beam_search(e, beam=B**H)
    order = brute.argsort(dim=1, descending=True)
    assert torch.equal(leaves, order)
    assert torch.allclose(logp, brute.gather(1, leaves), atol=1e-5)


@pytest.mark.parametrize("B,H", [(6, 1), (3, 2), (2, 3)])
def test_partial_beam_scores_are_exact_leaf_probabilities(B, H):
    tree = make_tree(B, H)
    e = torch.randn(9, 8)
    brute = tree.leaf_log_probs(e)
    for beam in (1, 2, 3):
        leaves, logp = tree.beam_search(e, beam)
        assert leaves.shape == (9, min(beam, B**H))
        assert torch.allclose(logp, brute.gather(1, leaves), atol=1e-5)
        if H == 1:  # a single level: the beam is the exact top-beta
            assert torch.equal(leaves, brute.topk(beam, dim=1).indices)
    # beam 1 is the greedy arg-max path that training follows
    assert torch.equal(tree.beam_search(e, 1)[0][:, 0], tree.route(e).leaf)


def test_beam_search_is_batched_consistently():
    tree = make_tree(3, 2)
    e = torch.randn(20, 8)
    full, _ = tree.beam_search(e, 4)
    one_by_one = torch.cat([tree.beam_search(e[i : i + 1], 4)[0] for i in range(20)])
    chunked, _ = tree.beam_search(e, 4, chunk=7)
    assert torch.equal(full, one_by_one) and torch.equal(full, chunked)


def test_leaf_path_roundtrip():
    leaves = torch.arange(27)
    assert torch.equal(path_to_leaf(leaf_to_path(leaves, 3, 3), 3), leaves)


def _blobs(n_per, centers, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + 0.05 * rng.standard_normal((n_per, c.shape[0])) for c in centers])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_kmeans_init_is_a_soft_ivf():
    import faiss

    rng = np.random.default_rng(1)
    centers = rng.standard_normal((4, 16))
    x = _blobs(50, centers)
    tree = Tree(16, TreeConfig(branching=4, height=1, temperature=0.05))
    tree.init_kmeans(x, seed=0)
    leaf = tree.route(torch.from_numpy(x)).leaf.numpy()
    # every blob lands in its own leaf, as k-means (faiss, same seed) assigns it
    km = faiss.Kmeans(16, 4, niter=25, seed=0, spherical=True)
    km.train(x)
    _, a = km.index.search(x, 1)
    assert len(set(leaf)) == 4
    assert np.array_equal(leaf, a[:, 0])


def test_hierarchical_kmeans_init_routes_to_nearest_residual_centroids():
    rng = np.random.default_rng(2)
    x = _blobs(30, rng.standard_normal((9, 12)))
    tree = Tree(12, TreeConfig(branching=3, height=2, conditioning="one-hot"))
    tree.init_kmeans(x, seed=0)
    r = tree.route(torch.from_numpy(x))
    sizes = np.bincount(r.leaf.numpy(), minlength=9)
    assert (sizes > 0).sum() >= 6  # the two levels split the data, not one leaf
    # level-2 choice is the nearest residual centroid: recompute it by hand
    W1 = tree.levels[1].W.detach().numpy() * tree.config.temperature
    C1 = W1[3:].T  # residual codebook (B, d)
    i1 = r.path[:, 0].numpy()
    means = np.stack([x[i1 == c].mean(0) for c in range(3)])  # level-0 cluster means
    resid = x - means[i1]
    nearest = ((resid[:, None, :] - C1[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(nearest, r.path[:, 1].numpy())


def test_load_balance_penalty_zero_when_uniform():
    uniform = torch.full((10, 4), 0.25)
    skewed = torch.tensor([[1.0, 0, 0, 0]] * 10)
    assert float(load_balance_penalty([uniform])) == pytest.approx(0.0, abs=1e-6)
    assert float(load_balance_penalty([skewed])) == pytest.approx(3.0)


@pytest.mark.parametrize("B,H,beam", [(16, 1, 5), (4, 2, 3), (3, 3, 4), (3, 3, 27)])
def test_numpy_router_routes_like_the_tree(B, H, beam):
    """Search routes in numpy; it must pick the leaves (and path scores) training's torch
    beam search picks."""
    tree = make_tree(B, H, d=16)
    x = torch.randn(200, 16)
    want_leaves, want_scores = tree.beam_search(x, beam)
    leaves, scores = tree.router().beam_search(x.numpy(), beam)
    assert np.array_equal(leaves, want_leaves.numpy())
    assert np.allclose(scores, want_scores.numpy(), atol=1e-5)


@pytest.mark.parametrize("B,H", [(3, 2), (2, 3), (4, 2)])
def test_per_node_full_beam_equals_enumeration_and_numpy_routes_alike(B, H):
    tree = make_tree(B, H, d=16, conditioning="per-node", leaf_rank="path")
    x = torch.randn(50, 16)
    leaves, scores = tree.beam_search(x, tree.num_leaves)
    brute = tree.leaf_log_probs(x)
    assert torch.allclose(scores, brute.gather(1, leaves), atol=1e-5)
    assert torch.allclose(scores, brute.sort(1, descending=True).values, atol=1e-5)
    for beam in (1, 3, tree.num_leaves):
        want_l, want_s = tree.beam_search(x, beam)
        got_l, got_s = tree.router().beam_search(x.numpy(), beam)
        assert np.array_equal(got_l, want_l.numpy()) and np.allclose(got_s, want_s.numpy(), atol=1e-5)
    # route() follows the arg-max path, each level with its own node's classifier
    r = tree.route(x)
    assert torch.equal(r.leaf, tree.beam_search(x, 1)[0][:, 0])
    assert torch.allclose(r.path_embedding.reshape(50, H, B).sum(-1)[:, 0], torch.ones(50))


def test_per_node_init_is_hierarchical_kmeans():
    """At step 0 a deep per-node tree routes every document like hierarchical k-means: to the
    nearest centroid among its own cell's children, level after level."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((16, 16)).astype(np.float32)
    x = (np.repeat(centers, 25, 0) + 0.05 * rng.standard_normal((400, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tree = Tree(16, TreeConfig(branching=4, height=2, conditioning="per-node", node_init="top-down"))
    tree.init_kmeans(x, seed=0)
    with torch.no_grad():
        for level in tree.levels:
            level.U.zero_()
    leaves = tree.route(torch.from_numpy(x)).leaf.numpy()
    assert len(np.unique(leaves)) >= 12  # k-means in every cell: the leaves are used
    W0 = tree.levels[0].W.detach().numpy()
    top = (x @ W0).argmax(1)
    for j in range(4):  # level 2 splits only within its cell, with that cell's own centroids
        rows = top == j
        W1 = tree.levels[1].W[j].detach().numpy()
        assert np.array_equal(leaves[rows], j * 4 + (x[rows] @ W1).argmax(1))


def test_bottom_up_tree_ranked_by_leaf_with_every_cell_expanded_routes_like_flat_kmeans():
    """Bottom-up start: the leaves are flat k-means centroids, grouped into balanced cells; a
    search that expands every cell and ranks leaves by their own score is the flat tree's."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tree = Tree(16, TreeConfig(branching=4, height=2, conditioning="per-node", node_init="bottom-up", leaf_rank="leaf"))
    tree.init_kmeans(x, seed=0)
    with torch.no_grad():
        for level in tree.levels:
            level.U.zero_()
    W1 = tree.levels[1].W.detach().numpy()  # (4 cells, d, 4 leaves)
    leaf_centroids = np.concatenate([W1[j].T for j in range(4)])  # leaf j*4+k
    assert np.allclose(np.linalg.norm(leaf_centroids * tree.config.temperature, axis=1), 1, atol=1e-5)
    flat = (x @ leaf_centroids.T).argmax(1)
    got = tree.router().leaves(x, 1, upper=4)[:, 0]
    assert np.array_equal(got, flat)
    # every cell holds exactly B leaves: the grouping is balanced by construction
    assert W1.shape == (4, 16, 4)


@pytest.mark.parametrize("beam,upper", [(1, 2), (3, 2), (5, 4), (16, 0)])
def test_two_level_search_on_faiss_equals_the_numpy_beam(beam, upper):
    """Search runs a (B, 2) leaf-ranked tree as a Faiss IVF over the leaves' classifiers; it
    must pick the leaves the plain beam search picks."""
    tree = make_tree(4, 2, d=16, conditioning="per-node", leaf_rank="leaf")
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    r = tree.router()
    assert np.array_equal(r.leaves(x, beam, upper), r.beam_search(x, beam, upper=upper)[0])


def test_calibrated_cells_per_width_are_the_fewest_that_agree_with_expanding_all():
    """A beam per level: for each leaf width, the cells kept above are the fewest (doubling
    from what the width needs) whose top leaves share >= the agreement with all cells."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 16))
    x = np.concatenate([c + 0.4 * rng.standard_normal((40, 16)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tree = Tree(16, TreeConfig(branching=8, height=2, conditioning="per-node", leaf_rank="leaf"))
    tree.init_kmeans(x, seed=0)  # bottom-up: cells of nearby leaves
    r = tree.router()
    widths = [1, 2, 4, 8, 12]
    uppers = r.calibrate_upper(x, widths, 0.9)
    rows = np.arange(len(x))[:, None]

    def agreement(w, u):
        ref = np.zeros((len(x), 64), dtype=bool)
        ref[rows, r.leaves(x, w, upper=8)] = True
        return ref[rows, r.leaves(x, w, upper=u)].mean()

    for w in widths:
        u = uppers[w]
        assert u >= -(-w // 8) and (u == 8 or agreement(w, u) >= 0.9)
        if -(-w // 8) < u and w <= 64 // 8:  # the next smaller candidate did not agree enough
            assert agreement(w, u // 2) < 0.9
    assert uppers[1] < 8 and uppers[12] == 8  # it saves cells; widths above L/8 expand all
