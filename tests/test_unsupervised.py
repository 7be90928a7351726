"""Training without relevance judgements: pseudo-queries, exact neighbours, neighbour recall."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_beir

from ehi.cli import main
from ehi.data import load_beir
from ehi.evaluation.evaluate import exact_neighbours, neighbour_recall
from ehi.model.ehi_model import EHIModel
from ehi.training.losses import soft_routing_cross_entropy
from ehi.training.mining import routing_targets
from ehi.training.unsupervised import (
    JUDGED_SPLIT,
    PseudoQuerySet,
    neighbour_dataset,
    pseudo_queries,
    train_unsupervised,
    unsupervised_config,
)


def test_neighbour_recall_counts_the_true_top_k_among_the_top_k_found():
    truth = np.array([[5, 6, 7, 8], [1, 2, -1, -1]])
    found = np.array([[7, 5, 0, 9], [2, 3, 1, 4]])
    # query 0: {7, 5} of the true top 2 {5, 6} -> 1/2 at k=2; {5, 7} of {5, 6, 7, 8} -> 2/4 at k=4
    assert neighbour_recall(found, truth, 2).tolist() == [0.5, 0.5]
    assert neighbour_recall(found, truth, 4).tolist() == [0.5, 1.0]  # padding is not a neighbour
    assert neighbour_recall(found[:, ::-1], truth, 4).tolist() == [0.5, 1.0]  # order inside the top k is free


def test_exact_neighbours_match_brute_force_and_skip_the_document_itself():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((50, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = d[[3, 10]] + 0.01
    brute = np.argsort(-(q @ d.T), 1)[:, :5]
    assert exact_neighbours(q, d, 5).tolist() == brute.tolist()
    own = exact_neighbours(d[[3, 10]], d, 5, self_rows=np.array([3, 10]))
    assert 3 not in own[0] and 10 not in own[1]
    assert own.tolist() == np.argsort(-(d[[3, 10]] @ d.T), 1)[:, 1:6].tolist()


def test_routing_targets_share_neighbours_by_child_under_the_query_prefix():
    # B = 2, H = 2: documents' paths; query 0 is routed to (0, 1)
    doc_paths = np.array([[0, 0], [0, 1], [0, 1], [1, 0]])
    targets = routing_targets(np.array([[0, 1]]), np.array([[0, 1, 2, 3, -1]]), doc_paths, 2)
    assert targets[0].tolist() == [[0.75, 0.25]]  # 3 of the 4 neighbours under child 0
    assert targets[1].tolist() == [[pytest.approx(1 / 3), pytest.approx(2 / 3)]]  # among those 3


def test_soft_routing_cross_entropy_on_a_hand_computed_case():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    t = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])  # the second row has no target: not counted
    got = soft_routing_cross_entropy([p], [t], torch.zeros(2, 1, dtype=torch.long))
    want = -(0.5 * np.log(0.5) + 0.5 * np.log(0.25))
    assert float(got) == pytest.approx(want, rel=1e-5)


def _unsup_config(**train):
    cfg = unsupervised_config()
    small = tiny_config(branching=6, epochs=4, **train)
    cfg.tree.branching, cfg.train.epochs, cfg.train.batch_size, cfg.train.refresh_every = 6, 4, 16, 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    assert small.tree.branching == cfg.tree.branching
    return cfg


def test_unsupervised_training_never_reads_qrels(tmp_path):
    root = write_beir(tmp_path / "noqrels", n_per_topic=10)
    shutil.rmtree(root / "qrels")  # a corpus and unlabelled queries, nothing else
    ds = load_beir(root)
    model, trainer = train_unsupervised(ds, _unsup_config(), tmp_path / "m", progress=False)
    assert trainer.pseudo_queries.kind == "queries" and len(trainer.pseudo_queries.ids) == len(ds.queries)
    # trained on exact-neighbour pairs, judged by neighbour recall on held-out pseudo-queries;
    # validation keeps the best state, so the shipped tree is never worse on them than its start
    v = model.validation
    assert v["held_out"].endswith(f"split {JUDGED_SPLIT!r}")
    curve = {e["epoch"]: e["score"] for e in v["curve"]}
    assert curve[v["kept_epoch"]] >= curve[0]
    loaded = EHIModel.load(tmp_path / "m")
    assert loaded.index.num_docs == len(ds.corpus)
    assert loaded.config.train.lambda_neighbours > 0 and loaded.config.train.lr_encoder == 0
    hits = loaded.search("telescope galaxy astronomy", k=3, beam=6)[0].hits
    assert hits and hits[0].doc_id.startswith("astronomy")


def test_the_encoder_stays_frozen_so_exact_search_is_the_teachers(tmp_path):
    ds = load_beir(write_beir(tmp_path / "d", n_per_topic=8))
    model, _ = train_unsupervised(ds, _unsup_config(), progress=False)
    base = model.encoder.features(ds.corpus.documents()).dense.numpy()
    np.testing.assert_allclose(model.index.embeddings, base / np.linalg.norm(base, axis=1, keepdims=True), atol=1e-5)


def test_documents_stand_in_when_there_are_no_queries(tmp_path):
    root = write_beir(tmp_path / "docs-only", n_per_topic=8)
    (root / "queries.jsonl").write_text("")
    shutil.rmtree(root / "qrels")
    ds = load_beir(root)
    pq = pseudo_queries(ds)
    assert pq.kind == "document spans" and len(pq.ids) == len(ds.corpus)
    for text, did in zip(pq.texts[:5], pq.ids[:5]):
        doc = ds.corpus.texts[ds.corpus.ids.index(did[len("span:"):])]
        assert text and text in doc  # a span of its own document


def test_neighbour_dataset_pairs_each_pseudo_query_with_its_nearest_documents():
    from pathlib import Path

    from ehi.data import Corpus, Dataset

    rng = np.random.default_rng(1)
    d = rng.standard_normal((30, 6)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    ds = Dataset(Path("."), Corpus([f"d{i}" for i in range(30)], [""] * 30, [""] * 30), {})
    pq = PseudoQuerySet(["a", "b"], None, "queries")
    nd = neighbour_dataset(ds, pq, d[:2] + 0.05, d, 5)
    top = np.argsort(-((d[:2] + 0.05) @ d.T), 1)
    assert sorted(nd.relevant(JUDGED_SPLIT)["a"]) == sorted(f"d{j}" for j in top[0, :5])
    assert list(nd.split("neighbour@1")["b"]) == [f"d{top[1, 0]}"]


def test_cli_unsupervised_on_document_embeddings_only(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 16))
    docs = np.concatenate([c + 0.3 * rng.standard_normal((40, 16)) for c in centres]).astype(np.float32)
    np.save(tmp_path / "docs.npy", docs)
    out = tmp_path / "m"
    assert main(["train", "--doc-embeddings", str(tmp_path / "docs.npy"), "--unsupervised", "--out", str(out),
                 "-B", "8", "--epochs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pseudo-queries (documents)" in printed
    model = EHIModel.load(out)
    q = model.encoder.embed_vectors(docs[:40] + 0.05)
    found, _ = model.search_embeddings(q, 10, beam=8)  # every leaf: exact search
    truth = exact_neighbours(q, model.index.embeddings, 10)
    assert neighbour_recall(found.indices, truth, 10).mean() == pytest.approx(1.0)
    # labels do not go with --unsupervised
    (tmp_path / "pairs.tsv").write_text("query-id\tcorpus-id\tscore\n0\t1\t1\n")
    rc = main(["train", "--doc-embeddings", str(tmp_path / "docs.npy"), "--pairs", str(tmp_path / "pairs.tsv"),
               "--unsupervised", "--out", str(tmp_path / "m2")])
    assert rc == 2 and "--pairs are labels" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_evaluate_reports_neighbour_recall_with_and_without_qrels(tmp_path, capsys):
    root = write_beir(tmp_path / "d", n_per_topic=8)
    out = tmp_path / "m"
    assert main(["train", "--data", str(root), "--unsupervised", "--split", "train", "--out", str(out),
                 "-B", "6", "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    js = tmp_path / "rows.json"
    assert main(["evaluate", str(out), "--data", str(root), "--split", "test", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    ehi = [r for r in rows if r["method"] == "EHI"]
    assert all({"R@100", "NR@10", "NR@100"} <= set(r["metrics"]) for r in ehi)
    exact = next(r for r in rows if r["method"] == "EHI encoder, exact")
    assert exact["metrics"]["NR@10"] == pytest.approx(100.0)  # exact search finds all its own neighbours
    # no qrels for the split: neighbour recall over every query, no qrels measures
    assert main(["evaluate", str(out), "--data", str(root), "--split", "dev", "--json", str(js)]) == 0
    assert "neighbour recall only" in capsys.readouterr().err
    rows = json.loads(js.read_text())
    assert all("R@100" not in r["metrics"] and "NR@100" in r["metrics"] for r in rows)


def test_resume_between_target_refreshes_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from ehi.training.trainer import Trainer, checkpoint_path

    ds = load_beir(write_beir(tmp_path / "d", n_per_topic=10))
    # 4 epochs, targets refreshed every 2: epoch 3 is mid-cycle; the last epoch is shipped
    cfg = _unsup_config(val_fraction=0.0, lr_indexer=0.05)  # a tree that moves: targets change
    save = Trainer.save_checkpoint
    kept = tmp_path / "after-epoch-3"

    def save_and_copy(self, path):
        save(self, path)
        if self.state.epoch == 3 and self.state.stage == "select" and not kept.exists():
            shutil.copytree(path, kept)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_and_copy)
    full, _ = train_unsupervised(ds, cfg, tmp_path / "a", progress=False)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    assert (kept / "query_paths.npy").exists()  # the routing targets are checkpointed
    shutil.copytree(kept, checkpoint_path(tmp_path / "b"))
    resumed, _ = train_unsupervised(ds, cfg, tmp_path / "b", progress=False, resume=True)
    for (k, a), (_, b) in zip(full.tree.state_dict().items(), resumed.tree.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_corpus_alone_trains_unsupervised_and_supervised_training_says_what_is_missing(tmp_path, capsys):
    root = write_beir(tmp_path / "corpus-only", n_per_topic=8)
    (root / "queries.jsonl").unlink()
    shutil.rmtree(root / "qrels")
    assert main(["train", "--data", str(root), "--unsupervised", "--out", str(tmp_path / "m"), "-B", "6",
                 "--epochs", "1", "--no-progress"]) == 0
    assert "pseudo-queries (document spans)" in capsys.readouterr().out
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tastronomy-0\t1\n")
    assert main(["train", "--data", str(root), "--out", str(tmp_path / "m2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "queries.jsonl: no queries" in err and "--unsupervised" in err
