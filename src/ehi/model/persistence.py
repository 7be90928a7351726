"""A model's own files: ``config.json``, the encoder's and the tree's weights (safetensors)
and the spread router's sketch, written with the index's files (``ehi.index.store``) in one
atomic, checksummed save, and read back checked, one line naming the file otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ehi.artifacts import ArtifactError, read_manifest, write_artifact
from ehi.config import EHIConfig
from ehi.encode.encoder import Encoder
from ehi.index.shards import SHARD_TIMEOUT_S
from ehi.index.store import open_index, save_index, saved_layout
from ehi.model.calibration import Calibration
from ehi.model.leaf_sketch import LeafSketch
from ehi.model.tree import Tree

MODEL_FILES = ("config.json", "encoder.safetensors", "tree.safetensors")
SKETCH_FILE = "leaf_sketch.safetensors"  # the spread router's (optional: fitted when missing)


def joint_state(encoder, tree) -> dict[str, torch.Tensor]:
    """The trained tensors of encoder and tree under one set of names (``encoder.*``,
    ``tree.*``), detached, contiguous, on the CPU: what a checkpoint or a Ray worker carries."""
    state = {f"encoder.{k}": v.contiguous().cpu() for k, v in encoder.trainable_state().items()}
    state.update({f"tree.{k}": v.detach().contiguous().cpu() for k, v in tree.state_dict().items()})
    return state


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``joint_state``'s names back into the encoder's and the tree's (other keys ignored)."""
    enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    return enc, {k[len("tree.") :]: v for k, v in state.items() if k.startswith("tree.")}


def save_model(model, path: str | Path) -> Path:
    """Write ``model`` to ``path`` atomically (see ``EHIModel.save``)."""

    def write(tmp: Path):
        (tmp / "config.json").write_text(model.config.to_json())
        save_file({k: v.contiguous().cpu() for k, v in model.encoder.trainable_state().items()}, str(tmp / "encoder.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in model.tree.state_dict().items()}, str(tmp / "tree.safetensors"))
        if model.index is not None:
            save_index(model.index, tmp, model.config.index.shards, model.doc_ids, model.doc_titles)
            if model.config.index.router == "spread":  # else fitted if the router is switched
                model.leaf_sketch().save(tmp / SKETCH_FILE)

    meta = {
        "encoder_fingerprint": model.encoder.fingerprint,
        "corpus_fingerprint": model.corpus_fingerprint,
        "num_docs": len(model.doc_ids),
        "num_leaves": model.tree.num_leaves,
        "beam_calibration": model.beam_calibration,
        "validation": model.validation,
    }
    return write_artifact(path, write, meta)


def read_config(path: Path) -> EHIConfig:
    """``config.json``, with the defaults of the versions before a field existed."""
    try:
        raw = json.loads((path / "config.json").read_text())
        if isinstance(raw, dict) and isinstance(raw.get("tree"), dict):
            # saved before per-node trees existed: its deeper levels are the one-hot kind
            raw["tree"].setdefault("conditioning", "one-hot")
        if isinstance(raw, dict) and isinstance(raw.get("index"), dict):
            raw["index"].setdefault("router", "tree")  # saved before the spread router: searches as it did
        return EHIConfig.from_dict(raw).validate()
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{path / 'config.json'}: invalid config ({e})") from None


def load_model(
    cls, path: str | Path, device: str = "cpu", mmap: bool = False, backend: str | None = None,
    shards: int | None = None, ray_address: str | None = None, shard_timeout: float = SHARD_TIMEOUT_S, router: str | None = None,
):
    """Manifest -> config -> weights -> index -> documents (see ``EHIModel.load``)."""
    path = Path(path)
    manifest = read_manifest(path, required=MODEL_FILES)
    saved_layout(path, manifest["files"], shards)  # a bad index listing fails before the encoder loads
    config = read_config(path)
    if backend is not None:
        config.encoder.backend = backend
        config.validate()
    encoder = Encoder(config.encoder, device=device)
    if manifest.get("encoder_fingerprint") not in (None, encoder.fingerprint):
        raise ArtifactError(
            f"{path}: saved for base model {config.encoder.model_name} with fingerprint "
            f"{manifest['encoder_fingerprint']}, but the installed one is {encoder.fingerprint}"
        )
    try:
        enc_state = load_file(str(path / "encoder.safetensors"))
        tree_state = load_file(str(path / "tree.safetensors"))
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: unreadable weights ({e})") from None
    model = from_weights(cls, config, encoder, enc_state, tree_state, path)
    model.corpus_fingerprint = manifest.get("corpus_fingerprint", "")
    model.router.calibration = Calibration.checked(manifest.get("beam_calibration") or [], model.tree.num_leaves, path / "manifest.json")
    model.validation = manifest.get("validation")
    ic = config.index
    index, ids, titles, shard_count = open_index(
        path, manifest, model.tree.num_leaves, encoder.dim, ic.codec, ic.pq_m, ic.rerank, mmap, shards, ray_address, shard_timeout
    )
    if index is not None:
        if shard_count is not None:
            ic.shards = shard_count
        model.index = index
        model.doc_ids, model.doc_titles = ids, titles
        if SKETCH_FILE in manifest["files"]:
            model.router.sketch = LeafSketch.read(path / SKETCH_FILE, index, ic.spread_rank, ic.spread_basis, ic.spread_candidates)
    if router is not None:  # another router re-measures the budget -> beam map
        model.set_index_options(router=router)
    return model


def from_weights(cls, config: EHIConfig, encoder: Encoder, enc_state: dict, tree_state: dict, where: str | Path = ""):
    """A model without an index, from its config and trained tensors."""
    try:
        encoder.load_trainable(enc_state)
    except ValueError as e:
        raise ArtifactError(f"{Path(where) / 'encoder.safetensors'}: {e}") from None
    try:
        tree = Tree.from_state(encoder.dim, config.tree, tree_state, encoder.device_name)
    except ValueError as e:
        raise ArtifactError(f"{Path(where) / 'tree.safetensors'}: {e}") from None
    encoder.eval()
    return cls(config, encoder, tree)
