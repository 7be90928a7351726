"""Bring your own encoder: train adapter + tree on precomputed embeddings."""

import numpy as np
import pytest

from ehi.cli import main
from ehi.model.ehi_model import EHIModel


@pytest.fixture
def byo(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((8, 24))
    docs = np.concatenate([c + 0.3 * rng.standard_normal((40, 24)) for c in centers]).astype(np.float32)
    pos = rng.choice(len(docs), size=120, replace=False)
    queries = (docs[pos] + 0.2 * rng.standard_normal((120, 24))).astype(np.float32)
    np.save(tmp_path / "docs.npy", docs)
    np.save(tmp_path / "queries.npy", queries)
    with open(tmp_path / "pairs.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qi, d in enumerate(pos):
            fh.write(f"{qi}\t{d}\t1\n")
    return tmp_path, docs, queries, pos


def test_train_on_precomputed_embeddings(byo, capsys):
    path, docs, queries, pos = byo
    out = path / "model"
    args = ["train", "--doc-embeddings", str(path / "docs.npy"), "--query-embeddings", str(path / "queries.npy"),
            "--pairs", str(path / "pairs.tsv"), "--out", str(out), "-B", "8", "--epochs", "3", "--no-progress"]
    assert main(args) == 0
    assert "peak RSS" in capsys.readouterr().out
    model = EHIModel.load(out)
    assert model.encoder.st is None and model.index.num_docs == len(docs)
    q = model.encoder.embed_vectors(queries[:20])
    res, _ = model.search_embeddings(q, 10, beam=8)
    assert np.mean([p in row for p, row in zip(pos[:20], res.indices)]) >= 0.9
    # text cannot be encoded by such a model: a clear error, exit 2
    assert main(["search", str(out), "some text"]) == 2
    assert "precomputed embeddings" in capsys.readouterr().err


def test_precomputed_input_errors(byo, capsys):
    path, *_ = byo
    (path / "bad.tsv").write_text("query-id\tcorpus-id\tscore\n0\t99999\t1\n")
    rc = main(["train", "--doc-embeddings", str(path / "docs.npy"), "--query-embeddings", str(path / "queries.npy"),
               "--pairs", str(path / "bad.tsv"), "--out", str(path / "m")])
    assert rc == 2 and "document id '99999' is not a row" in capsys.readouterr().err
    rc = main(["train", "--doc-embeddings", str(path / "docs.npy"), "--out", str(path / "m")])
    assert rc == 2 and "go together" in capsys.readouterr().err
