import json

import pytest

from ehi.cli import main


@pytest.fixture(scope="module")
def cli_model(tiny_beir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "m"
    rc = main(["train", "--data", str(tiny_beir), "--out", str(out), "-B", "4", "--epochs", "2", "--batch-size", "16", "--no-progress"])
    assert rc == 0
    return out


def test_train_search_evaluate(cli_model, tiny_beir, capsys, tmp_path):
    capsys.readouterr()
    assert main(["search", str(cli_model), "guitar chord music", "-k", "3", "--beam", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out[0]["hits"]) == 3 and out[0]["hits"][0]["id"].startswith("music")
    assert out[0]["fraction_visited"] == pytest.approx(1.0)
    assert main(["search", str(cli_model), "guitar chord music", "--budget", "50%"]) == 0
    text = capsys.readouterr().out
    first = next(line.split() for line in text.splitlines() if line.strip().startswith("1."))
    assert "visited" in text and first[2].startswith("music")  # rank 1 is a music document
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(cli_model), "--data", str(tiny_beir), "--budgets", "0.5", "1.0", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "EHI encoder, exact" in table and "Faiss-IVF" in table and "budget rule" in table
    rows = json.loads(report.read_text())
    exact = next(r for r in rows if r["method"] == "EHI encoder, exact")
    full = next(r for r in rows if r["method"] == "EHI" and r["budget"] == 1.0)
    # visiting every leaf is exact search
    assert full["metrics"]["R@100"] == pytest.approx(exact["metrics"]["R@100"])


def test_index_rebuilds_with_more_leaves_per_document(cli_model, tiny_beir, tmp_path, capsys):
    out = tmp_path / "m2"
    assert main(["index", "build", str(cli_model), "--data", str(tiny_beir), "--d2l", "2", "--out", str(out)]) == 0
    from ehi.model import EHIModel

    m = EHIModel.load(out)
    assert m.index.d2l == 2 and m.index.leaf_sizes().sum() == 120


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    (tmp_path / "queries.jsonl").write_text("")
    rc = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "corpus.jsonl:2: duplicate _id 'a'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["search", str(tmp_path), "q"]) == 2
    assert "not an ehi model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["search", str(tmp_path), "q", "--budget", "1.5"])
    assert e.value.code == 2


def test_no_progress_silences_every_bar_including_encoding(tmp_path, monkeypatch, capsys):
    from conftest import write_beir

    monkeypatch.setenv("EHI_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: the corpus is encoded
    root = write_beir(tmp_path / "d", n_per_topic=50)  # 300 documents: above the bars' threshold
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "m"), "-B", "8", "--epochs", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "it/s]" not in err and "Batches" not in err, err[-500:]
