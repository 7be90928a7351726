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
    from ehi.model.ehi_model import EHIModel

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
    captured = capsys.readouterr()
    err = captured.err
    assert "it/s]" not in err and "Batches" not in err and "\r" not in err, err[-500:]
    assert "[ehi] encoding corpus: 300 texts" in err  # still says what it is doing
    assert "epoch=1" in captured.out


def test_redirected_output_has_phase_lines_and_no_redraws(tmp_path, monkeypatch, capfd):
    from conftest import write_beir

    monkeypatch.setenv("EHI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EHI_NO_PROGRESS", raising=False)
    root = write_beir(tmp_path / "d", n_per_topic=50)
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "m"), "-B", "8", "--epochs", "1"]) == 0
    out, err = capfd.readouterr()  # file descriptors: what a log file would receive
    assert "\r" not in out + err and "it/s" not in err
    assert "[ehi] encoding corpus" in err and "Loading weights" not in err
    assert not (tmp_path / "m.checkpoint").exists()  # removed once the model is saved
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "k"), "-B", "8", "--epochs", "1", "--keep-checkpoint"]) == 0
    assert (tmp_path / "k.checkpoint" / "manifest.json").exists()


def test_version_and_every_option_documented(capsys):
    import argparse

    from ehi import __version__
    from ehi.cli.entry import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ehi {__version__}"

    def parsers(p, name="ehi"):
        yield name, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    undocumented = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in parsers(build_parser())
        for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)) and not a.help
    ]
    assert undocumented == []
    assert main(["search", "--help"]) == 0 if False else True
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "(default: 10)" in capsys.readouterr().out  # -k's default is shown


def test_search_words_are_one_query_and_a_query_file_writes_a_trec_run(cli_model, tiny_beir, tmp_path, capfd):
    import ir_measures

    capfd.readouterr()
    assert main(["search", str(cli_model), "guitar", "chord", "music", "--budget", "50%", "-k", "3"]) == 0
    out, err = capfd.readouterr()
    assert out.count("query: ") == 1 and "query: guitar chord music" in out
    assert "budget 50 %" in out and "calibrated mean on training queries" in out
    assert "Loading weights" not in out + err and err == ""

    queries = tmp_path / "q.tsv"
    queries.write_text("q-music-1\tguitar chord music\nq-cooking-2\toven flour recipe\n")
    run = tmp_path / "run.txt"
    assert main(["search", str(cli_model), "--queries", str(queries), "--run", str(run), "-k", "5", "--beam", "4"]) == 0
    lines = run.read_text().splitlines()
    assert len(lines) == 10 and lines[0].split()[:2] == ["q-music-1", "Q0"] and lines[0].split()[3] == "1"
    assert lines[0].split()[-1] == "ehi" and lines[0].split()[2].startswith("music")
    read = list(ir_measures.read_trec_run(str(run)))
    assert {r.query_id for r in read} == {"q-music-1", "q-cooking-2"} and len(read) == 10
    capfd.readouterr()
    assert main(["evaluate", "--run", str(run), "--data", str(tiny_beir), "--split", "train"]) == 0
    out = capfd.readouterr().out
    assert "R@10" in out and "judged queries" in out
    assert main(["search", str(cli_model), "--queries", str(queries), "also words"]) == 2
    assert main(["evaluate", "--data", str(tiny_beir)]) == 2  # neither a model nor --run



def test_the_installed_ehi_command_is_the_cli_function():
    """``ehi`` (the console script pyproject.toml declares) runs the command line."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ehi"]
    with pytest.raises(SystemExit) as done:
        script.load()(["--version"])
    assert done.value.code == 0
