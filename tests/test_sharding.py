"""A model saved in shards searches exactly as the one index it was split from (no Ray needed)."""

import json

import numpy as np
import pytest
import torch

from ehi.artifacts import ArtifactError
from ehi.config import PRECOMPUTED, EHIConfig
from ehi.encode.encoder import Encoder
from ehi.index.shards import ShardedLists, assign_shards
from ehi.model.ehi_model import EHIModel
from ehi.model.tree import Tree

DIM = 24


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def byo_model(d2l=1, codec="flat", rerank=0, n=3000, leaves=32, seed=0):
    """An untrained tree over random documents with a bring-your-own-embeddings encoder, so
    that it saves and loads like any model."""
    torch.manual_seed(seed)
    cfg = EHIConfig()
    cfg.encoder.model_name, cfg.encoder.dim = PRECOMPUTED, DIM
    cfg.tree.branching, cfg.index.d2l, cfg.index.codec, cfg.index.rerank = leaves, d2l, codec, rerank
    enc = Encoder(cfg.encoder)
    m = EHIModel(cfg, enc, Tree(DIM, cfg.tree).eval())
    emb = _unit(np.random.default_rng(seed).normal(size=(n, DIM)))
    m.build_index(emb, [f"d{i}" for i in range(n)], [f"title {i}" for i in range(n)])
    m.recalibrate()
    return m


def _queries(n=50, seed=1):
    return _unit(np.random.default_rng(seed).normal(size=(n, DIM)))


def same_results(a: EHIModel, b: EHIModel, beams=(1, 3, 8), allowed=None):
    q = _queries()
    for beam in beams:
        ra, la = a.search_embeddings(q, 10, beam, allowed)
        rb, lb = b.search_embeddings(q, 10, beam, allowed)
        assert [np.asarray(x).tolist() for x in la] == [np.asarray(x).tolist() for x in lb]
        assert np.array_equal(ra.indices, rb.indices), f"beam {beam}"
        assert np.array_equal(ra.scores, rb.scores)
        assert np.array_equal(ra.visited, rb.visited) and ra.strategy == rb.strategy


def test_shards_balance_documents_and_hold_whole_leaves():
    sizes = np.random.default_rng(0).integers(0, 500, size=200)
    for count in (1, 2, 3, 7):
        of = assign_shards(sizes, count)
        load = np.bincount(of, weights=sizes, minlength=count)
        assert of.shape == (200,) and set(of) == set(range(count))
        assert load.max() - load.min() <= sizes.max()  # greedy bound: within one leaf
    assert np.array_equal(assign_shards(sizes, 3), assign_shards(sizes, 3))
    with pytest.raises(ValueError, match="at most one shard per leaf"):
        assign_shards(sizes[:2], 3)


@pytest.mark.parametrize("d2l,codec,rerank", [(1, "flat", 0), (2, "flat", 0), (1, "pq", 40), (2, "sq8", 0)])
def test_sharded_model_searches_like_the_whole_index(tmp_path, d2l, codec, rerank):
    m = byo_model(d2l, codec, rerank)
    m.set_index_options(shards=3)
    m.save(tmp_path / "m")
    files = json.loads((tmp_path / "m" / "manifest.json").read_text())["files"]
    assert "index.faiss" not in files and {"shards.json", "shard-0-of-3.faiss", "shard-2-of-3.faiss"} <= set(files)
    shard_map = json.loads((tmp_path / "m" / "shards.json").read_text())
    assert sum(shard_map["documents"]) == 3000 * d2l and len(shard_map["leaf_shard"]) == 32

    mapped = EHIModel.load(tmp_path / "m", mmap=True)  # each shard file scanned apart, merged
    assert isinstance(mapped.index.lists, ShardedLists) and mapped.index.shard_count == 3
    same_results(m, mapped)
    same_results(m, mapped, allowed=np.arange(0, 3000, 7))  # filtered: scanned in the shards too
    same_results(m, mapped, allowed=np.arange(0, 60))  # small filter: exact over the rows

    merged = EHIModel.load(tmp_path / "m")  # in memory: one index again, writable
    assert not isinstance(merged.index.lists, ShardedLists) and merged.config.index.shards == 3
    same_results(m, merged)


def test_a_changed_sharded_model_is_saved_in_as_many_shards(tmp_path):
    m = byo_model()
    m.set_index_options(shards=2)
    m.save(tmp_path / "m")
    loaded = EHIModel.load(tmp_path / "m")
    new = _unit(np.random.default_rng(5).normal(size=(100, DIM)))
    loaded.add_documents([f"n{i}" for i in range(100)], [""] * 100, new)
    loaded.remove_documents([f"d{i}" for i in range(50)])
    loaded.save(tmp_path / "m2")
    again = EHIModel.load(tmp_path / "m2", mmap=True)
    assert again.index.shard_count == 2
    same_results(loaded, again)
    with pytest.raises(ValueError, match="read-only"):
        again.add_documents(["x"], [""], new[:1])
    with pytest.raises(ValueError, match="read-only"):
        again.save(tmp_path / "m3")
    assert not (tmp_path / "m3").exists()


def test_a_corrupted_or_mismatched_shard_is_named(tmp_path):
    m = byo_model()
    m.set_index_options(shards=2)
    m.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"saved in 2 shards, not 4: run 'ehi index shard .* --shards 4"):
        EHIModel.load(tmp_path / "m", shards=4)
    shard = tmp_path / "m" / "shard-1-of-2.faiss"
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(ArtifactError, match="shard-1-of-2.faiss: checksum mismatch"):
        EHIModel.load(tmp_path / "m", mmap=True)
