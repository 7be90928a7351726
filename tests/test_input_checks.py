"""Every bad input stops with one line naming the file and line (or the flag), exit code 2,
no traceback, and nothing written."""

import json
from pathlib import Path

import pytest
from conftest import write_beir

from ehi.cli import main


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "data", n_per_topic=5)


def run_train(beir, tmp_path, capsys, *extra):
    out = tmp_path / "out"
    rc = main(["train", "--data", str(beir), "--out", str(out), "-B", "3", "--epochs", "1", "--no-progress", *extra])
    err = capsys.readouterr().err
    return rc, err, out


def corrupt_corpus(beir, lines):
    (beir / "corpus.jsonl").write_bytes(lines)


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', "corpus.jsonl:2: invalid JSON"),
        (b'{"_id": "a", "text": "x"}\n{"text": "y"}\n', "corpus.jsonl:2: missing field '_id'"),
        (b'{"_id": "a", "title": "t"}\n', "corpus.jsonl:1: missing field 'text'"),
        (b'{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "corpus.jsonl:2: duplicate _id 'a'"),
        (b'{"_id": "a", "text": "caf\xe9"}\n', "corpus.jsonl:1: not valid UTF-8"),
        (b"\n\n", "corpus.jsonl: corpus is empty"),
    ],
)
def test_corpus_errors(beir, tmp_path, capsys, content, message):
    corrupt_corpus(beir, content)
    rc, err, out = run_train(beir, tmp_path, capsys)
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.checkpoint").exists()


def test_empty_text_is_allowed_with_a_warning(beir, tmp_path, capsys, caplog):
    with open(beir / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps({"_id": "blank", "title": "", "text": ""}) + "\n")
    rc, err, out = run_train(beir, tmp_path, capsys)
    assert rc == 0 and "1 documents have empty text" in err + caplog.text and out.exists()


@pytest.mark.parametrize(
    "qrels,message",
    [
        ("query-id\tcorpus-id\n", "train.tsv:1: expected header"),
        ("query-id\tcorpus-id\tscore\nq-music-1\tmusic-1\n", "train.tsv:2: expected 3 tab-separated columns"),
        ("query-id\tcorpus-id\tscore\nq-music-1\tmusic-1\tyes\n", "train.tsv:2: score 'yes' is not an integer"),
        ("query-id\tcorpus-id\tscore\nq-music-1\tmusic-1\t0\n", "train.tsv: no relevant (score > 0) pair"),
    ],
)
def test_qrels_errors(beir, tmp_path, capsys, qrels, message):
    (beir / "qrels" / "train.tsv").write_text(qrels)
    rc, err, out = run_train(beir, tmp_path, capsys)
    assert rc == 2 and message in err and not out.exists()


def test_unknown_ids_in_qrels_warn_or_fail_under_strict(beir, tmp_path, capsys, caplog):
    with open(beir / "qrels" / "train.tsv", "a") as fh:
        fh.write("ghost-query\tmusic-1\t1\nq-music-1\tghost-doc\t1\n")
    rc, err, out = run_train(beir, tmp_path, capsys, "--strict")
    assert rc == 2 and "1 unknown query ids and 1 unknown document ids" in err and not out.exists()
    rc, err, out = run_train(beir, tmp_path, capsys)
    assert rc == 0 and "1 unknown query ids and 1 unknown document ids" in err + caplog.text


def test_missing_files(tmp_path, capsys):
    rc, err, out = run_train(tmp_path / "nowhere", tmp_path, capsys)
    assert rc == 2 and "not found" in err and not out.exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["-B", "1"], "branching B must be >= 2"),
        (["-H", "-1"], "height H must be >= 1 (or 0 for auto)"),
        (["--d2l", "0"], "d2l must be >= 1"),
        (["--epochs", "-1"], "epochs must be >= 0"),
    ],
)
def test_bad_tree_flags(beir, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    rc = main(["train", "--data", str(beir), "--out", str(out), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and not out.exists()


def test_search_and_evaluate_flag_errors(beir, tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["train", "--data", str(beir), "--out", str(model), "-B", "3", "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(model), "music", "--beam", "4"]) == 2
    assert "beam 4 exceeds the tree's 3 leaves" in capsys.readouterr().err
    for bad in ("0", "1.5", "150%", "abc"):
        with pytest.raises(SystemExit) as e:
            main(["search", str(model), "music", "--budget", bad])
        assert e.value.code == 2
        assert "--budget" in capsys.readouterr().err
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq-music-0\tmusic-0\t0\n")
    assert main(["evaluate", str(model), "--data", str(beir)]) == 2
    assert "test.tsv: no relevant (score > 0) pair" in capsys.readouterr().err


def test_out_never_replaces_a_users_folder_or_file(tiny_beir, tmp_path):
    """--out on a folder with the user's files, on a file, or on the dataset itself: exit 2,
    one line, nothing touched; an existing model is replaced only with --overwrite."""
    from ehi.cli import main

    args = ["-B", "6", "--epochs", "1", "--batch-size", "16", "--no-progress"]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    afile = tmp_path / "file.bin"
    afile.write_bytes(b"keep me too")
    for out in (folder, afile, tiny_beir):
        before = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else Path(out).read_bytes()
        assert main(["train", "--data", str(tiny_beir), "--out", str(out), *args]) == 2
        after = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else Path(out).read_bytes()
        assert before == after
    assert (folder / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "mine.checkpoint").exists()
    # the index commands refuse the same places
    model = tmp_path / "model"
    assert main(["train", "--data", str(tiny_beir), "--out", str(model), *args]) == 0
    new_docs = tmp_path / "new.jsonl"
    new_docs.write_text('{"_id": "n1", "title": "", "text": "a new note on music and guitar"}\n')
    assert main(["index", "add", str(model), str(new_docs), "--out", str(folder)]) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    # a model at --out: refused without --overwrite, replaced with it
    assert main(["train", "--data", str(tiny_beir), "--out", str(model), *args]) == 2
    assert main(["train", "--data", str(tiny_beir), "--out", str(model), "--overwrite", *args]) == 0


@pytest.mark.parametrize("argv", [
    ["search", "M", "q", "--device", "tpu"],
    ["evaluate", "M", "--data", "D", "--device", "gpu0"],
    ["serve", "M", "--port", "99999"],
    ["serve", "M", "--log-level", "loud"],
])
def test_bad_device_port_or_log_level_is_a_usage_error_not_a_traceback(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: argument" in err


def test_cuda_without_a_gpu_is_refused_before_any_work(tiny_beir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tiny_beir), "--out", str(tmp_path / "m"), "--device", "cuda"])
    assert e.value.code == 2 and "no such GPU" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_removing_only_unknown_ids_writes_nothing(tiny_beir, tmp_path):
    model = tmp_path / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(model), "-B", "6", "--epochs", "1", "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    ids = tmp_path / "ids.txt"
    ids.write_text("no-such-doc\nnor-this-one\n")
    assert main(["index", "remove", str(model), str(ids), "--overwrite"]) == 0
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert main(["index", "remove", str(model), str(ids), "--strict", "--overwrite"]) == 2


def test_search_applies_the_servers_query_rule(tiny_beir, tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(model), "-B", "6", "--epochs", "1", "--no-progress"]) == 0
    capsys.readouterr()
    for q, fragment in (("   ", "query is empty"), ("x" * 2001, "longer than 2000")):
        assert main(["search", str(model), q]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1


def test_the_core_searches_without_extras_and_says_which_extra_a_command_needs(tiny_beir, tmp_path, monkeypatch, capsys):
    import sys

    model = tmp_path / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(model), "-B", "6", "--epochs", "1", "--no-progress"]) == 0
    for name in ("fastapi", "uvicorn", "scann", "matplotlib", "ray"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    capsys.readouterr()
    assert main(["search", str(model), "guitar chord"]) == 0
    assert main(["serve", str(model)]) == 2
    assert "pip install 'ehi[serve]'" in capsys.readouterr().err
    assert main(["benchmark", "--data", str(tiny_beir), "--out", str(tmp_path / "b")]) == 2
    assert "pip install 'ehi[bench]'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["index", "build", str(model), "--data", str(tiny_beir), "--ray", "--out", str(tmp_path / "r")]) == 2
    assert "pip install 'ehi[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["index", "shard", str(model), "--shards", "2", "--out", str(tmp_path / "s")]) == 0  # the core shards
    assert main(["search", str(tmp_path / "s"), "guitar chord"]) == 0
