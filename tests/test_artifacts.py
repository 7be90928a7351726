import json
import shutil

import numpy as np
import pytest

from ehi import artifacts
from ehi.artifacts import ArtifactError
from ehi.config import EHIConfig
from ehi.data import load_beir
from ehi.model.ehi_model import EHIModel
from ehi.training.trainer import train


@pytest.fixture(scope="module")
def saved(tiny_beir, tmp_path_factory):
    cfg = EHIConfig()
    cfg.tree.branching, cfg.train.epochs = 4, 2
    out = tmp_path_factory.mktemp("art") / "model"
    model = train(load_beir(tiny_beir), cfg, out_dir=out, progress=False)
    return model, out


def copy(out, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


FILES = ["config.json", "encoder.safetensors", "tree.safetensors", "doc_leaves.npy", "doc_embeddings.npy", "documents.json"]


@pytest.mark.parametrize("name", FILES)
def test_one_corrupted_byte_in_any_file_is_caught(saved, tmp_path, name):
    dst = copy(saved[1], tmp_path)
    data = bytearray((dst / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (dst / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name}: checksum mismatch"):
        EHIModel.load(dst)


@pytest.mark.parametrize("name", FILES + ["manifest.json"])
def test_truncated_files_are_caught(saved, tmp_path, name):
    dst = copy(saved[1], tmp_path)
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError):
        EHIModel.load(dst)


def test_newer_format_and_foreign_manifests_are_refused(saved, tmp_path):
    dst = copy(saved[1], tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**m, "format_version": artifacts.FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="newer than this ehi"):
        EHIModel.load(dst)
    (dst / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not an ehi model manifest"):
        EHIModel.load(dst)


def test_nothing_is_unpickled(saved, tmp_path):
    dst = copy(saved[1], tmp_path)
    np.save(dst / "doc_leaves.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    _relist(dst, "doc_leaves.npy")
    with pytest.raises(ValueError, match="allow_pickle"):
        EHIModel.load(dst)


def test_a_crash_during_save_leaves_the_old_model_loadable(saved, tmp_path, monkeypatch):
    model, out = saved
    dst = copy(out, tmp_path)
    before = EHIModel.load(dst).search("guitar chord", k=3, beam=4)[0]
    real_save = np.save
    calls = {"n": 0}

    def crash_on_second_array(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", crash_on_second_array)
    with pytest.raises(OSError, match="simulated"):
        model.save(dst)
    monkeypatch.undo()
    after = EHIModel.load(dst).search("guitar chord", k=3, beam=4)[0]
    assert [h.doc_id for h in before.hits] == [h.doc_id for h in after.hits]
    assert not [p for p in dst.parent.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_model(tiny_beir):
    cfg = EHIConfig()
    cfg.tree.branching, cfg.train.epochs = 4, 3
    a = train(load_beir(tiny_beir), cfg, progress=False)
    b = train(load_beir(tiny_beir), cfg, progress=False)
    for (k, v), (_, w) in zip(a.tree.state_dict().items(), b.tree.state_dict().items()):
        assert np.array_equal(v.numpy(), w.numpy()), k
    assert np.array_equal(a.index.doc_leaves, b.index.doc_leaves)


def test_a_crash_after_the_swap_leaves_the_new_model_and_the_next_save_cleans_up(saved, tmp_path, monkeypatch):
    model, out = saved
    dst = copy(out, tmp_path)
    (tmp_path / ".copy-notes").mkdir()  # a user's sibling folder: never touched

    def die(*a, **k):
        raise KeyboardInterrupt("killed before removing the old model (simulated)")

    monkeypatch.setattr(artifacts.shutil, "rmtree", die)
    with pytest.raises(KeyboardInterrupt):
        model.save(dst)
    monkeypatch.undo()
    EHIModel.load(dst)  # a complete model at the path
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".copy.")]
    assert stale, "the simulated crash should leave the old model beside the path"
    model.save(dst)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".copy.")]
    assert (tmp_path / ".copy-notes").is_dir()


@pytest.mark.slow
def test_sigkill_at_any_moment_of_repeated_saves_leaves_a_loadable_model(saved, tmp_path):
    """A process saving over the same path again and again is killed at several moments; the
    path always holds a complete model (old or new), whatever the moment."""
    import os
    import signal
    import subprocess
    import sys

    _, out = saved
    dst = copy(out, tmp_path)
    script = (
        "import sys\nfrom ehi.model import EHIModel\nm = EHIModel.load(sys.argv[1])\n"
        "print('ready', flush=True)\nwhile True:\n    m.save(sys.argv[1])\n"
    )
    for delay in (0.0, 0.003, 0.01, 0.03, 0.1):
        p = subprocess.Popen([sys.executable, "-c", script, str(dst)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert p.stdout.readline().strip() == "ready"
        import time

        time.sleep(delay)  # where the kill lands varies; the property must hold wherever it does
        p.send_signal(signal.SIGKILL)
        p.wait()
        EHIModel.load(dst)


def _edit_manifest(dst, **changes):
    """A manifest changed and sealed again: what a buggy writer could leave (a hand edit
    without its checksum is refused before these checks; test_mistakes.py)."""
    m = json.loads((dst / "manifest.json").read_text())
    m.update(changes)
    (dst / "manifest.json").write_text(json.dumps(artifacts.seal_manifest(m)))


def _relist(dst, name):
    m = json.loads((dst / "manifest.json").read_text())
    m["files"][name] = artifacts.sha256_file(dst / name)
    (dst / "manifest.json").write_text(json.dumps(artifacts.seal_manifest(m)))


@pytest.mark.parametrize("case,fragment", [
    ("empty file list", "does not list config.json"),
    ("format version as a string", "format_version must be a positive integer"),
    ("fewer document ids than rows", "documents.json: expected 60 ids and titles"),
    ("NaN embeddings", "doc_embeddings.npy: holds NaN"),
    ("an .npy that is a folder", "doc_leaves.npy: not a regular file"),
    ("half an index listed", "lists part of an index"),
])
def test_checksummed_but_inconsistent_models_fail_in_one_line(saved, tmp_path, case, fragment):
    dst = copy(saved[1], tmp_path)
    if case == "empty file list":
        _edit_manifest(dst, files={})
    elif case == "format version as a string":
        _edit_manifest(dst, format_version="1")
    elif case == "fewer document ids than rows":
        docs = json.loads((dst / "documents.json").read_text())
        docs["ids"], docs["titles"] = docs["ids"][:-1], docs["titles"][:-1]
        (dst / "documents.json").write_text(json.dumps(docs))
        _relist(dst, "documents.json")
    elif case == "NaN embeddings":
        emb = np.load(dst / "doc_embeddings.npy")
        emb[3, 5] = np.nan
        np.save(dst / "doc_embeddings.npy", emb)
        _relist(dst, "doc_embeddings.npy")
    elif case == "an .npy that is a folder":
        (dst / "doc_leaves.npy").unlink()
        (dst / "doc_leaves.npy").mkdir()
    elif case == "half an index listed":
        m = json.loads((dst / "manifest.json").read_text())
        del m["files"]["documents.json"]
        _edit_manifest(dst, files=m["files"])
    with pytest.raises(ArtifactError, match=fragment) as e:
        EHIModel.load(dst)
    assert "\n" not in str(e.value)


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tiny_beir, tmp_path, capsys):
    from ehi.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["train", "--data", str(tiny_beir), "--out", str(blocker / "model"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Loading" not in err  # refused before the encoder loaded
