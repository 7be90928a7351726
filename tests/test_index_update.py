import json

import pytest
from conftest import copy_model

from ehi.cli import main
from ehi.model.ehi_model import EHIModel


@pytest.fixture
def model_dir(trained_tiny, tmp_path):
    return copy_model(trained_tiny, tmp_path)  # these tests change the model


NEW = [
    {"_id": "new-1", "title": "volcano", "text": "Magma chambers feed the eruption of a stratovolcano near the caldera."},
    {"_id": "new-2", "title": "chess", "text": "The endgame with rook and bishop against rook is often a draw."},
]


def test_added_documents_are_found_and_removed_ones_never(model_dir, tmp_path, capsys):
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in NEW))
    before = EHIModel.load(model_dir).index.num_docs
    assert main(["index", "add", str(model_dir), str(corpus), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "added 2 documents" in out and "before:" in out and "after:" in out
    m = EHIModel.load(model_dir)
    assert m.index.num_docs == before + 2
    for d in NEW:
        text = f"{d['title']} {d['text']}"
        leaf = int(m.route(m.encoder.encode([text]), 1)[0, 0])
        assert m.index.doc_leaves[m.doc_ids.index(d["_id"])][0] == leaf
        hits = m.search(text, k=3, beam=1)[0].hits  # its own leaf is visited
        assert hits[0].doc_id == d["_id"] and hits[0].score == pytest.approx(1.0, abs=1e-4)

    ids = tmp_path / "gone.txt"
    ids.write_text("new-1\nmusic-3\nnot-there\n")
    assert main(["index", "remove", str(model_dir), str(ids), "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "removed 2 documents" in captured.out and "1 ids are not indexed" in captured.err
    m = EHIModel.load(model_dir)
    assert m.index.num_docs == before
    for q in ("volcano Magma chambers feed the eruption", "music guitar chord melody rhythm"):
        got = {h.doc_id for h in m.search(q, k=100, beam=m.tree.num_leaves)[0].hits}
        assert "new-1" not in got and "music-3" not in got
    assert main(["index", "remove", str(model_dir), str(ids), "--strict", "--overwrite"]) == 2


def test_adding_an_existing_id_is_refused(model_dir, tmp_path, capsys):
    corpus = tmp_path / "dup.jsonl"
    corpus.write_text(json.dumps({"_id": "music-1", "text": "x"}) + "\n")
    assert main(["index", "add", str(model_dir), str(corpus), "--overwrite"]) == 2
    assert "already indexed" in capsys.readouterr().err


def test_compressed_index_built_by_the_cli_is_saved_searched_and_reloaded(model_dir, tiny_beir, tmp_path, capsys):
    out = tmp_path / "pq"
    args = ["index", "build", str(model_dir), "--data", str(tiny_beir), "--codec", "pq", "--pq-m", "8", "--rerank", "60", "--out", str(out)]
    assert main(args) == 0
    flat, pq = EHIModel.load(model_dir), EHIModel.load(out, mmap=True)
    assert pq.index.codec == "pq" and pq.config.index.rerank == 60 and (out / "index.faiss").exists()
    assert pq.index.nbytes() < flat.index.nbytes() / 4
    q = "guitar chord melody music"
    a, b = flat.search(q, k=5, beam=4)[0], pq.search(q, k=5, beam=4)[0]
    # every candidate re-ranked from the float vectors: the flat index's exact ranking
    assert [h.doc_id for h in a.hits] == [h.doc_id for h in b.hits]
    assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits], abs=1e-5)
    with pytest.raises(ValueError, match="read-only"):
        pq.add_documents(["x"], [""], pq.encoder.encode(["a new document"]))
    assert main(["index", "build", str(model_dir), "--data", str(tiny_beir), "--codec", "pq", "--pq-m", "7", "--out", str(tmp_path / "bad")]) == 2
    assert "must divide" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_model_saved_before_the_faiss_index_still_loads(model_dir, tmp_path):
    import shutil

    from ehi.artifacts import seal_manifest

    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    (old / "index.faiss").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"].pop("index.faiss")
    (old / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    q = "oven flour bake sauce"
    want = EHIModel.load(model_dir).search(q, k=5, beam=2)[0]
    got = EHIModel.load(old).search(q, k=5, beam=2)[0]
    assert [h.doc_id for h in got.hits] == [h.doc_id for h in want.hits]


def test_search_can_be_restricted_to_document_ids(model_dir, tmp_path, capsys):
    m = EHIModel.load(model_dir)
    allowed = ["music-1", "cooking-2", "finance-3"]
    hits = m.search("guitar chord melody music", k=10, beam=m.tree.num_leaves, ids=allowed)[0].hits
    assert [h.doc_id for h in hits][0] == "music-1" and {h.doc_id for h in hits} == set(allowed)
    with pytest.raises(ValueError, match="not indexed"):
        m.search("music", ids=["nope"])
    ids = tmp_path / "ids.txt"
    ids.write_text("cooking-2\nfinance-3\n")
    assert main(["search", str(model_dir), "guitar chord", "--beam", "4", "--ids", str(ids), "--json"]) == 0
    assert {h["id"] for h in json.loads(capsys.readouterr().out)[0]["hits"]} == {"cooking-2", "finance-3"}


@pytest.mark.parametrize("command", ["build", "add", "remove"])
def test_index_commands_replace_a_model_only_when_asked(model_dir, tiny_beir, tmp_path, capsys, command):
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in NEW))
    ids = tmp_path / "gone.txt"
    ids.write_text("music-3\n")
    other = tmp_path / "other"
    assert main(["index", "build", str(model_dir), "--data", str(tiny_beir), "--out", str(other)]) == 0  # a new folder: fine
    arg = {"build": ["--data", str(tiny_beir)], "add": [str(corpus)], "remove": [str(ids)]}[command]
    snapshot = {p: {f.name: f.read_bytes() for f in p.iterdir()} for p in (model_dir, other)}
    capsys.readouterr()
    assert main(["index", command, str(model_dir), *arg]) == 2  # in place, not asked
    assert "--overwrite" in capsys.readouterr().err
    assert main(["index", command, str(model_dir), *arg, "--out", str(other)]) == 2  # onto another model
    assert "--overwrite" in capsys.readouterr().err
    assert {p: {f.name: f.read_bytes() for f in p.iterdir()} for p in (model_dir, other)} == snapshot
    assert main(["index", command, str(model_dir), *arg, "--out", str(other), "--overwrite"]) == 0
    assert main(["index", command, str(model_dir), *arg, "--overwrite"]) == 0
