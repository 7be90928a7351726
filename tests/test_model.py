import numpy as np
import pytest
from conftest import tiny_config

from ehi.artifacts import ArtifactError
from ehi.data import load_beir
from ehi.model.ehi_model import EHIModel
from ehi.training.trainer import Trainer, train


@pytest.fixture(scope="module")
def trained(tiny_beir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny-ehi"
    model = train(load_beir(tiny_beir), tiny_config(), out_dir=out, progress=False, keep_checkpoint=True)
    return model, out


def test_training_reduces_the_loss(tiny_beir):
    trainer = Trainer(tiny_config(epochs=8), load_beir(tiny_beir))
    trainer.fit(progress=False)
    # the selection stage's epochs: the refit that follows starts again from the initial state
    losses = [h["loss"] for h in trainer.state.history if h.get("stage") != "refit"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert set(trainer.state.history[0]) >= {"siamese", "indexing", "intra_leaf", "balance", "loss"}


def test_save_load_gives_identical_results(trained, tiny_beir):
    model, out = trained
    queries = ["telescope galaxy astronomy", "garlic sauce cooking", "a query about nothing in particular"]
    before = model.search(queries, k=5, beam=2)
    loaded = EHIModel.load(out)
    after = loaded.search(queries, k=5, beam=2)
    for a, b in zip(before, after):
        assert [h.doc_id for h in a.hits] == [h.doc_id for h in b.hits]
        assert np.allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-6)
        assert a.leaves == b.leaves and a.visited == b.visited
    assert loaded.config == model.config
    assert loaded.beam_calibration == model.beam_calibration


def test_search_finds_topical_documents(trained):
    model, _ = trained
    hits = model.search("telescope galaxy astronomy", k=5, beam=model.tree.num_leaves)[0].hits
    assert all(h.doc_id.startswith("astronomy") for h in hits)
    # a full beam is exact search over the trained embeddings
    assert hits[0].score == pytest.approx(max(h.score for h in hits))


def test_budget_maps_to_the_largest_beam_within_it(trained):
    model, _ = trained
    fractions = dict((int(b), f) for b, f in model.beam_calibration)
    assert fractions[model.tree.num_leaves] == pytest.approx(1.0)
    for budget in (0.2, 0.5, 1.0):
        beam = model.beam_for_budget(budget)
        assert fractions[beam] <= budget + 1e-9
        assert beam == model.tree.num_leaves or fractions[beam + 1] > budget


def test_checkpoint_written_each_epoch(trained):
    _, out = trained
    from ehi.artifacts import read_manifest
    from ehi.training.trainer import checkpoint_path

    manifest = read_manifest(checkpoint_path(out))
    assert manifest["kind"] == "checkpoint"
    # 3 validated epochs, then (if validation kept a trained state) the refit's epochs
    stages = [h.get("stage", "select") for h in manifest["history"]]
    assert stages[:3] == ["select"] * 3 and stages[3:] == ["refit"] * manifest["refit_epochs"]
    assert manifest["epoch"] == (manifest["refit_epochs"] if manifest["stage"] == "refit" else 3)


def test_corrupted_or_foreign_artifacts_fail_clearly(trained, tmp_path):
    import shutil

    _, out = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / "tree.safetensors", "r+b") as fh:
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        EHIModel.load(bad)
    with pytest.raises(ArtifactError, match="not an ehi model directory"):
        EHIModel.load(tmp_path)


def test_top_k_scope_reproduces_the_sentence_transformer_at_init():
    from ehi.config import EncoderConfig
    from ehi.encode.encoder import Encoder

    texts = ["a short text", "a somewhat longer text about telescopes and galaxies", "x"]
    enc = Encoder(EncoderConfig(scope="top-k", top_k_layers=2))
    feats = enc.features(texts, use_cache=False)
    got = enc.embed_all(feats)
    ref = enc.st.encode(texts, normalize_embeddings=True)
    assert np.allclose(got, ref, atol=1e-3)  # fp16 cache of the frozen layers
    trainable = {k for k, p in enc.named_parameters() if p.requires_grad}
    assert any(".layer.5." in k for k in trainable) and not any(".layer.3." in k for k in trainable)
    full = Encoder(EncoderConfig(scope="full"))
    assert np.allclose(full.embed_all(full.features(texts)), ref, atol=1e-5)


def test_tree_gradient_to_the_encoder_can_be_cut(tiny_beir):
    # no siamese loss and no tree gradient into the encoder: the adapter must not move
    trainer = Trainer(tiny_config(epochs=2, lambda_siamese=0.0, tree_grad_to_encoder=0.0, weight_decay=0.0), load_beir(tiny_beir))
    trainer.fit(progress=False)
    assert float(trainer.encoder.adapter.weight.detach().abs().max()) == 0.0
    moved = Trainer(tiny_config(epochs=2, lambda_siamese=0.0, weight_decay=0.0), load_beir(tiny_beir))
    moved.fit(progress=False)
    assert float(moved.encoder.adapter.weight.detach().abs().max()) > 0.0


def test_a_deep_model_saved_before_per_node_trees_loads_as_one_hot(tiny_beir, tmp_path):
    import json

    cfg = tiny_config(epochs=1)
    cfg.tree.branching, cfg.tree.height, cfg.tree.conditioning = 3, 2, "one-hot"
    out = tmp_path / "old"
    model = train(load_beir(tiny_beir), cfg, out_dir=out, progress=False)
    raw = json.loads((out / "config.json").read_text())
    del raw["tree"]["conditioning"]  # what an older ehi wrote
    from ehi.artifacts import seal_manifest, sha256_file

    (out / "config.json").write_text(json.dumps(raw))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["config.json"] = sha256_file(out / "config.json")
    (out / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    back = EHIModel.load(out)
    assert back.config.tree.conditioning == "one-hot"
    q = "guitar chord melody"
    assert [h.doc_id for h in back.search(q, k=5, beam=3)[0].hits] == [h.doc_id for h in model.search(q, k=5, beam=3)[0].hits]
