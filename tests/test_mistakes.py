"""What a user does by mistake (or an attacker on purpose) fails in one line, never crashes,
misleads or locks others out: the eight cases of the reliability probe (docs/tests-and-limits.md),
each of which failed before it was mended, and bad text in input files."""

import asyncio
import json
import os
import shutil
import stat

import pytest
from fastapi.testclient import TestClient

from ehi.artifacts import ArtifactError
from ehi.cli import main
from ehi.model.ehi_model import EHIModel
from ehi.training.trainer import checkpoint_path

TRAIN = ["-B", "6", "--epochs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tiny_beir, tmp_path_factory):
    """A model and the checkpoint of its last epoch (kept)."""
    out = tmp_path_factory.mktemp("mistakes") / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(out), *TRAIN, "--keep-checkpoint"]) == 0
    assert (checkpoint_path(out) / "manifest.json").exists()
    return out


def _copy_beir(src, dst, corpus_lines):
    shutil.copytree(src, dst)
    (dst / "corpus.jsonl").write_text("".join(corpus_lines))
    return dst


# 1 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["reordered", "smaller"])
def test_resume_on_other_data_is_one_line_and_leaves_the_model(trained, tiny_beir, tmp_path, capsys, change):
    lines = (tiny_beir / "corpus.jsonl").read_text().splitlines(keepends=True)
    other = _copy_beir(tiny_beir, tmp_path / "other", lines[::-1] if change == "reordered" else lines[:-12])
    before = (trained / "manifest.json").read_bytes()
    capsys.readouterr()
    code = main(["train", "--data", str(other), "--out", str(trained), *TRAIN, "--resume", "--overwrite", "--keep-checkpoint"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "trained on other data (corpus" in err and "without --resume" in err
    assert (trained / "manifest.json").read_bytes() == before


def test_resume_on_the_same_data_still_runs(trained, tiny_beir, tmp_path):
    shutil.copytree(trained, tmp_path / "m")
    shutil.copytree(checkpoint_path(trained), checkpoint_path(tmp_path / "m"))
    assert main(["train", "--data", str(tiny_beir), "--out", str(tmp_path / "m"), *TRAIN, "--resume", "--overwrite"]) == 0


# 2 --------------------------------------------------------------------------------------
def test_k_is_capped_in_the_cli_and_the_api_and_clamped_to_the_corpus(trained, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["search", str(trained), "guitar chord", "-k", "1000000000"])
    assert e.value.code == 2 and "argument -k: must be in 1..1000" in capsys.readouterr().err
    model = EHIModel.load(trained)
    with pytest.raises(ValueError, match="k must be a whole number from 1 to 1000"):
        model.search("guitar chord", k=10**9)
    hits = model.search("guitar chord", k=1000, beam=model.tree.num_leaves)[0]
    assert len(hits.hits) == 60  # the whole corpus, not 1000 rows of padding
    assert main(["search", str(trained), "guitar chord", "-k", "1000", "--beam", "6", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["hits"]) == 60


# 3, 7, 8 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(trained):
    from ehi.server import create_app

    with TestClient(create_app(trained), base_url="http://127.0.0.1") as c:
        yield c


@pytest.mark.parametrize("body,field", [
    ({"query": "a", "budget": True}, "budget"), ({"query": "a", "beam": True}, "beam"), ({"query": "a", "k": True}, "k"),
    ({"query": "a", "k": "5"}, "k"), ({"query": "a", "budget": "0.5"}, "budget"), ({"query": "a", "k": 2.0}, "k"),
    ({"query": 5}, "query"), ({"query": "a", "ids": [1]}, "ids"),
])
def test_the_server_schema_is_strict_and_names_the_field(client, body, field):
    r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field)


def test_unknown_ids_are_named_by_field_and_position_never_echoed(client):
    long_id = "z" * 50_000
    r = client.post("/search", json={"query": "guitar", "ids": ["music-1", long_id]})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail == "ids: 1 of them are not indexed (the first is item 1)"


@pytest.mark.parametrize("raw", [b'{"query": "gu\xff\xfetar"}', b'{"query": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
def test_an_unparseable_body_gets_the_documented_422(client, raw):
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json() == {"detail": "the body is not valid JSON"}


def test_only_allowed_host_names_are_answered_and_docs_are_off_by_default(trained, client):
    from ehi.server import create_app

    assert client.get("/health").status_code == 200
    assert client.get("/health", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/health", headers={"host": "evil.example"}).status_code == 400
    assert client.post("/search", json={"query": "guitar"}, headers={"host": "evil.example"}).status_code == 400
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
    with TestClient(create_app(trained, allowed_hosts=["search.example.org"], docs=True), base_url="http://search.example.org") as c:
        assert c.get("/health").status_code == 200 and c.get("/openapi.json").status_code == 200
        assert c.get("/health", headers={"host": "127.0.0.1"}).status_code == 400


def test_a_small_request_is_not_stuck_behind_a_maximal_one(trained, monkeypatch):
    """A maximal request (64 queries of 2,000 characters, k = 1000) runs a bounded chunk per
    batch, and a 3-word request queued after it joins the first batch, not the last."""
    import ehi.server as server

    batches = []

    class Recording(server.Batcher):
        def _search(self, batch):
            batches.append([(len(c.texts), sum(len(t) for t in c.texts), c.k) for c in batch])
            return [[json.dumps({"q": t[:5]}) for t in c.texts] for c in batch]

    heavy = [f"{i} " + "x" * 1995 for i in range(64)]

    async def run():
        b = Recording(EHIModel.load(trained), max_wait_ms=0)
        jobs = [asyncio.ensure_future(b.submit(heavy, 1000, 2)), asyncio.ensure_future(b.submit(["guitar chord melody"], 10, 2))]
        await asyncio.sleep(0)  # both queued before the batcher runs: the heavy one first
        b.start()
        out = await asyncio.gather(*jobs)
        await b.stop()
        return out

    heavy_out, light_out = asyncio.run(run())
    assert [json.loads(x)["q"] for x in heavy_out] == [t[:5] for t in heavy]  # every query, in order
    assert json.loads(light_out[0])["q"] == "guita"
    first = batches[0]
    assert (1, 19, 10) in first  # the light request rides in the first batch
    assert sum(n for n, _, _ in first) < 64  # beside one chunk of the heavy one, not all of it
    for batch in batches:  # no batch costs more than its bound
        assert sum(c for _, c, _ in batch) <= server.BATCH_CHUNKS * server.CHUNK_CHARS
        assert sum(n * k for n, _, k in batch) <= server.BATCH_CHUNKS * server.CHUNK_HITS


# 4 --------------------------------------------------------------------------------------
def _modes(path):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.iterdir()]}


def test_a_save_keeps_the_folders_permissions_or_the_umasks(trained, tmp_path, tiny_beir):
    old = os.umask(0o022)
    try:
        model = EHIModel.load(trained)
        model.save(tmp_path / "new")
        modes = _modes(tmp_path / "new")
        assert modes.pop("new") == 0o755 and set(modes.values()) == {0o644}
        # a model the user opened to a group: an update in place keeps it so
        shared = tmp_path / "shared"
        shutil.copytree(trained, shared)
        os.chmod(shared, 0o750)
        for f in shared.iterdir():
            os.chmod(f, 0o640)
        extra = tmp_path / "extra.jsonl"
        extra.write_text(json.dumps({"_id": "new-1", "title": "t", "text": "a guitar and a piano"}) + "\n")
        assert main(["index", "add", str(shared), str(extra), "--overwrite"]) == 0
        modes = _modes(shared)
        assert modes.pop("shared") == 0o750 and set(modes.values()) == {0o640}
    finally:
        os.umask(old)


# 5 --------------------------------------------------------------------------------------
def test_an_edited_manifest_value_is_refused(trained, tmp_path, capsys):
    dst = tmp_path / "edited"
    shutil.copytree(trained, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["beam_calibration"] = [[b, 0.0] for b, *_ in m["beam_calibration"]]  # every beam "within" any budget
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="manifest.json: its values do not match its checksum"):
        EHIModel.load(dst)
    assert main(["search", str(dst), "guitar", "--budget", "20%"]) == 2
    assert "do not match its checksum" in capsys.readouterr().err


def test_a_calibration_that_cannot_be_true_is_refused_even_when_resealed(trained, tmp_path):
    from ehi.artifacts import seal_manifest

    dst = tmp_path / "resealed"
    shutil.copytree(trained, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["beam_calibration"] = [[1, 0.5], [99, 2.0]]
    (dst / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    with pytest.raises(ArtifactError, match="beam_calibration row 1"):
        EHIModel.load(dst)


# 6 --------------------------------------------------------------------------------------
def test_the_search_line_says_when_the_budget_is_below_one_leaf(trained, tmp_path, capsys):
    model = EHIModel.load(trained)
    model.beam_calibration = [[1, 0.0727], *[[b, 0.0727 * b] for b in range(2, 7)]]
    model.save(tmp_path / "m")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "m"), "guitar chord", "--budget", "5%"]) == 0
    out = capsys.readouterr().out
    assert "budget 5 % is below one leaf: beam 1, 7.3 % on training queries" in out
    assert "within it" not in out
    assert main(["search", str(tmp_path / "m"), "guitar chord", "--budget", "15%"]) == 0
    assert "budget 15 %: beam 2, whose calibrated mean on training queries is within it" in capsys.readouterr().out


# bad text in files ------------------------------------------------------------------------
def test_a_lone_surrogate_in_an_input_file_is_one_line_naming_file_and_line(trained, tiny_beir, tmp_path, capsys):
    lines = (tiny_beir / "corpus.jsonl").read_text().splitlines(keepends=True)
    bad = json.dumps({"_id": "bad", "title": "", "text": "fine, then \ud800"}) + "\n"
    assert "\\ud800" in bad
    data = _copy_beir(tiny_beir, tmp_path / "bad", lines[:3] + [bad] + lines[3:])
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), *TRAIN]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{data / 'corpus.jsonl'}:4: field 'text' is not valid Unicode text" in err and "\n" not in err
    assert not (tmp_path / "m").exists()
    extra = tmp_path / "extra.jsonl"
    extra.write_text(bad)
    assert main(["index", "add", str(trained), str(extra), "--out", str(tmp_path / "added")]) == 2
    assert f"{extra}:1: field 'text'" in capsys.readouterr().err and not (tmp_path / "added").exists()
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"_id": "q1", "text": "\udc80 oops"}) + "\n")
    assert main(["search", str(trained), "--queries", str(queries)]) == 2
    assert f"{queries}:1: field 'text'" in capsys.readouterr().err
    # plain-text files: a surrogate's UTF-8 bytes (or any non-UTF-8 line) name the file and line
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"astronomy-1\ncooking-2\nbad-\xed\xa0\x80\n")
    assert main(["index", "remove", str(trained), str(ids), "--out", str(tmp_path / "removed")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{ids}:3: not valid UTF-8 text" in err and "\n" not in err and not (tmp_path / "removed").exists()
    tsv = tmp_path / "q.tsv"
    tsv.write_bytes(b"q1\tstars\nq2\tcaf\xe9\n")
    assert main(["search", str(trained), "--queries", str(tsv)]) == 2
    assert f"{tsv}:2: not valid UTF-8 text" in capsys.readouterr().err


def test_a_request_whose_client_went_away_stops_taking_batches(trained):
    import ehi.server as server

    batches, jobs = [], []

    class Recording(server.Batcher):
        def _search(self, batch):
            batches.append(sum(len(c.texts) for c in batch))
            jobs[0].cancel()  # the heavy client disconnects while its first chunks run
            return [[json.dumps({}) for _ in c.texts] for c in batch]

    async def run():
        b = Recording(EHIModel.load(trained), max_wait_ms=0)
        jobs.append(asyncio.ensure_future(b.submit(["x" * 1999] * 64, 1000, 2)))
        await asyncio.sleep(0)
        b.start()
        with pytest.raises(asyncio.CancelledError):
            await jobs[0]
        assert len(await b.submit(["guitar"], 10, 2)) == 1  # the server goes on serving others
        await b.stop()

    asyncio.run(run())
    assert batches[0] < 64 and sum(batches) < 64 and batches[-1] == 1
