"""Deep trees: a (B, 2) or (B, 3) tree stores documents where a flat tree over the same leaves
would, so that a search reaches them as well, and ``ehi train`` picks the height when asked."""

import numpy as np
import pytest

from ehi.config import EHIConfig, TreeConfig
from ehi.data import Corpus, Dataset
from ehi.training.trainer import Trainer


def _overlapping_clusters(seed=0, clusters=64, per=25, d=24, queries=400):
    """Documents in clusters that overlap (so cells of leaves have borders that matter) and
    queries drawn near documents, with their source document as the one relevant."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    lab = np.repeat(np.arange(clusters), per)
    x = centres[lab] + rng.normal(size=(len(lab), d)) * 0.9
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    src = rng.choice(len(x), queries, replace=False)
    q = (x[src] + 0.15 * rng.normal(size=(queries, d))).astype(np.float32)
    ids = [f"d{i}" for i in range(len(x))]
    ds = Dataset(root=None, corpus=Corpus(ids, [""] * len(ids), [""] * len(ids)), queries={f"q{i}": "" for i in range(queries)},
                 qrels={"train": {f"q{i}": {ids[s]: 1} for i, s in enumerate(src)}})
    return ds, x, q, src


def _found_at(model, q, src, budget) -> float:
    """Share of queries whose source document is among the top 10 at ``budget`` visited."""
    beam = model.beam_for_budget(budget)
    res, _ = model.search_embeddings(model.encoder.embed_vectors(q), 10, beam=beam)
    return float(np.mean([s in row for s, row in zip(src, res.indices)]))


@pytest.mark.parametrize("branching, height", [(8, 2), (4, 3)])
def test_a_deep_tree_reaches_documents_as_well_as_a_flat_tree_over_as_many_leaves(branching, height):
    # the k-means start (no training) isolates where documents are stored: the deep tree's
    # leaves are the flat tree's k-means leaves grouped into cells, and the default search
    # router ranks leaves; a deep tree that stored each document under only the best half of
    # its cells lost 3-8 points here at 2-5 % (and 4-6 on SciFact, docs/performance.md "Depth")
    ds, x, q, src = _overlapping_clusters()
    found = {}
    for B, H in ((branching**height, 1), (branching, height)):
        cfg = EHIConfig()
        cfg.tree.branching, cfg.tree.height = B, H
        cfg.train.epochs = 0
        model = Trainer(cfg, ds, doc_embeddings=x, query_embeddings=q).fit(progress=False)
        assert model.tree.num_leaves == branching**height
        found[H] = [_found_at(model, q, src, b) for b in (0.02, 0.05, 0.1)]
    # 400 queries: one is 0.25 points; the tolerance is 1 point at every budget
    assert all(deep >= flat - 0.01 for deep, flat in zip(found[height], found[1])), found


def test_the_height_is_chosen_from_the_corpus_size_unless_given():
    from ehi.config import AUTO_DEEP_LEAVES

    auto = TreeConfig()
    assert auto.height == 0 and auto.resolved(5_000) == (256, 1)  # SciFact-sized: one level of 256
    n = int((AUTO_DEEP_LEAVES / 4) ** 2)  # where 4·sqrt(N) reaches the crossover
    b, h = auto.resolved(n)
    assert h == 2 and b**2 == AUTO_DEEP_LEAVES
    assert auto.resolved(n - 50_000)[1] == 1
    assert TreeConfig(height=1).resolved(n) == (AUTO_DEEP_LEAVES, 1)  # a given height is kept
    assert TreeConfig(branching=12).resolved(n) == (12, 1)  # a given branching alone: one level of it
    from ehi.model.tree import Tree

    assert Tree(8, TreeConfig(branching=4)).H == 1  # a tree built by hand from a given branching
    with pytest.raises(ValueError, match="resolved for a corpus"):
        Tree(8, TreeConfig())


def test_train_says_which_height_it_chose_and_saves_it(tiny_beir, tmp_path, capsys):
    import json

    from ehi.cli import main

    out = tmp_path / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(out), "--epochs", "1"]) == 0
    assert "tree height 1 chosen for 60 documents (32^1 = 32 leaves" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["tree"]["height"] == 1
    assert main(["train", "--data", str(tiny_beir), "--out", str(tmp_path / "m2"), "-H", "2", "--epochs", "1"]) == 0
    assert "chosen" not in capsys.readouterr().err  # a given height is not announced as chosen
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["tree"]["height"] == 2
