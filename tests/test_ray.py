"""Beyond one process on a local Ray: the distributed build and the shard actors give exactly
what one process gives, and a dead shard is reported, never answered around."""

import json
import time

import numpy as np
import pytest

pytest.importorskip("ray")

from conftest import tiny_config  # noqa: E402
from test_sharding import byo_model, same_results  # noqa: E402

from ehi.cli import main  # noqa: E402
from ehi.data import load_beir  # noqa: E402
from ehi.model.ehi_model import EHIModel  # noqa: E402
from ehi.training.trainer import train  # noqa: E402

pytestmark = pytest.mark.ray  # every test here starts a local Ray


@pytest.fixture(scope="module")
def ray_local():
    from ehi.ray_session import connect

    ray = connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def text_model(tiny_beir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster") / "tiny"
    train(load_beir(tiny_beir), tiny_config(branching=8, epochs=2), out_dir=out, progress=False)
    return out


def _lists(model_dir):
    """Each leaf's document rows, read from whichever files hold the lists."""
    m = EHIModel.load(model_dir)
    inv = m.index.ivf.invlists
    import faiss

    return [sorted(faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).tolist()) for i in range(m.index.num_leaves)], m


def test_ray_build_gives_the_same_leaves_and_lists_on_one_or_two_workers(ray_local, text_model, tiny_beir, tmp_path):
    assert main(["index", "build", str(text_model), "--data", str(tiny_beir), "--out", str(tmp_path / "one")]) == 0
    for workers in (1, 2):
        out = tmp_path / f"ray{workers}"
        argv = ["index", "build", str(text_model), "--data", str(tiny_beir), "--out", str(out), "--ray", "--workers", str(workers), "--shards", "2"]
        assert main(argv) == 0
    lists, one = _lists(tmp_path / "one")
    for workers in (1, 2):
        got, m = _lists(tmp_path / f"ray{workers}")
        assert got == lists, f"{workers} workers"
        assert np.array_equal(m.index.doc_leaves, one.index.doc_leaves)
        assert np.allclose(m.index.vectors, one.index.vectors, atol=1e-6)
        assert m.doc_ids == one.doc_ids and m.config.index.shards == 2
        assert json.loads((tmp_path / f"ray{workers}" / "shards.json").read_text())["count"] == 2


@pytest.mark.parametrize("count", [2, 4])
def test_shard_actors_return_what_one_process_returns(ray_local, tmp_path, count):
    m = byo_model(d2l=2)
    m.set_index_options(shards=count)
    m.save(tmp_path / "m")
    served = EHIModel.load(tmp_path / "m", shards=count)
    assert served.index.shard_count == count and sum(served.index.shard_documents()) == 3000 * 2
    same_results(m, served)
    same_results(m, served, allowed=np.arange(0, 3000, 5))


def test_a_killed_shard_gets_a_503_naming_it_then_requests_succeed_again(ray_local, text_model, tmp_path):
    from fastapi.testclient import TestClient

    from ehi.server import create_app

    assert main(["index", "shard", str(text_model), "--shards", "2", "--out", str(tmp_path / "s")]) == 0
    app = create_app(tmp_path / "s", shards=2)
    body = {"query": "telescope galaxy astronomy", "k": 5, "beam": 8}  # every leaf: both shards
    with TestClient(app, base_url="http://127.0.0.1") as client:
        first = client.post("/search", json=body)
        assert first.status_code == 200
        index = app.state.model.index
        ray_local.kill(index.lists.shards[1].actor, no_restart=False)
        refused, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:  # the kill lands asynchronously: until a request meets it
            t = time.monotonic()
            r = client.post("/search", json=body)
            if r.status_code == 503:
                refused = (r, time.monotonic() - t)
                break
            assert r.json()["results"] == first.json()["results"]  # never a partial answer
        assert refused is not None
        r, took = refused
        assert "shard 1 of 2 is unavailable" in r.json()["detail"] and took < 5
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # Ray restarts the actor: the next requests succeed
            r = client.post("/search", json=body)
            if r.status_code == 200:
                break
            assert r.status_code == 503
            time.sleep(0.1)
        assert r.status_code == 200 and r.json()["results"] == first.json()["results"]
