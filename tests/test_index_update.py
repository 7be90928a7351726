import json

import pytest

from ehi.cli import main
from ehi.model import EHIModel


@pytest.fixture
def model_dir(tiny_beir, tmp_path):
    out = tmp_path / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(out), "-B", "4", "--epochs", "2", "--no-progress"]) == 0
    return out


NEW = [
    {"_id": "new-1", "title": "volcano", "text": "Magma chambers feed the eruption of a stratovolcano near the caldera."},
    {"_id": "new-2", "title": "chess", "text": "The endgame with rook and bishop against rook is often a draw."},
]


def test_added_documents_are_found_and_removed_ones_never(model_dir, tmp_path, capsys):
    corpus = tmp_path / "new.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in NEW))
    before = EHIModel.load(model_dir).index.num_docs
    assert main(["index", "add", str(model_dir), str(corpus)]) == 0
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
    assert main(["index", "remove", str(model_dir), str(ids)]) == 0
    captured = capsys.readouterr()
    assert "removed 2 documents" in captured.out and "1 ids are not indexed" in captured.err
    m = EHIModel.load(model_dir)
    assert m.index.num_docs == before
    for q in ("volcano Magma chambers feed the eruption", "music guitar chord melody rhythm"):
        got = {h.doc_id for h in m.search(q, k=100, beam=m.tree.num_leaves)[0].hits}
        assert "new-1" not in got and "music-3" not in got
    assert main(["index", "remove", str(model_dir), str(ids), "--strict"]) == 2


def test_adding_an_existing_id_is_refused(model_dir, tmp_path, capsys):
    corpus = tmp_path / "dup.jsonl"
    corpus.write_text(json.dumps({"_id": "music-1", "text": "x"}) + "\n")
    assert main(["index", "add", str(model_dir), str(corpus)]) == 2
    assert "already indexed" in capsys.readouterr().err
