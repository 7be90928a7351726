"""Checkpoints: everything needed to continue training bit-identically after a complete
epoch (weights, optimiser, RNG states, mined negatives, routing targets), written beside the
model directory each epoch and read by ``--resume``. A mixin of ``training.Trainer``.

A checkpoint records fingerprints of the data it was trained on (corpus, queries, qrels,
precomputed embeddings), so that ``--resume`` on other data (another corpus, the same one
reordered, edited qrels) is refused instead of continuing from rows that mean other things.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ehi.artifacts import ArtifactError, read_manifest, write_artifact
from ehi.config import EHIConfig
from ehi.model.persistence import joint_state, split_state
from ehi.training.state import TrainerState


def checkpoint_path(out_dir: str | Path) -> Path:
    """Checkpoints live beside the model directory, which a final save replaces whole."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoint")


def data_fingerprints(dataset, query_ids: list[str], splits: list[str], embeddings=()) -> dict[str, str]:
    """sha256 fingerprints of what training reads: the corpus (ids, titles, texts in order),
    the queries it uses (ids and texts in order), the qrels of ``splits`` (those read so far)
    and any precomputed embeddings."""

    def digest(parts) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        return h.hexdigest()

    out = {
        "corpus": dataset.corpus.fingerprint(),
        "queries": digest(x for q in query_ids for x in (q, dataset.queries.get(q, ""))),
        "qrels": digest(
            x for split in sorted(set(splits)) for q, docs in sorted(dataset.qrels.get(split, {}).items())
            for x in (split, q, *(f"{d}={s}" for d, s in sorted(docs.items())))
        ),
    }
    arrays = [np.ascontiguousarray(e) for e in embeddings if e is not None]
    if arrays:
        out["embeddings"] = digest(x for a in arrays for x in (a.dtype.str, a.shape, a.tobytes()))
    return out


class Checkpoints:
    """State, save and resume (see the module docstring)."""

    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"encoder.{k}": v.detach().clone() for k, v in self.encoder.trainable_state().items()}
        state.update({f"tree.{k}": v.detach().clone() for k, v in self.tree.state_dict().items()})
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        enc, tree = split_state(state)
        self.encoder.load_trainable(enc)
        self.tree.load_state_dict(tree)

    def save_checkpoint(self, path: Path) -> None:
        """Everything needed to continue bit-identically after the state's completed epochs:
        weights, optimiser moments, torch's RNG and the ``TrainerState`` (safetensors, npy, JSON)."""

        def write(tmp: Path):
            weights = joint_state(self.encoder, self.tree)
            weights["rng.torch"] = torch.get_rng_state()
            weights.update(self.state.tensors())
            weights.update({f"anchor.{i}": p.contiguous().cpu() for i, p in enumerate(self.tree_start)})
            save_file(weights, str(tmp / "weights.safetensors"))
            opt = self.optimizer.state_dict()
            tensors = {
                f"{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
                for pid, st in opt["state"].items()
                for name, v in st.items()
            }
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "config.json").write_text(self.config.to_json())
            return {"kind": "checkpoint", "data": self.data_fingerprints, **self.state.write(tmp)}

        write_artifact(path, write, {})

    def resume(self, path: str | Path) -> int:
        """Restore a checkpoint written by ``save_checkpoint``; returns the epochs it completed."""
        path = Path(path)
        manifest = read_manifest(path, required=("config.json", "weights.safetensors", "optimizer.safetensors"))
        if manifest.get("kind") != "checkpoint":
            raise ArtifactError(f"{path}: not a training checkpoint")
        saved = EHIConfig.from_dict(json.loads((path / "config.json").read_text()))
        if saved.to_dict() != self.config.to_dict():
            raise ValueError(f"{path}: the checkpoint was written with a different configuration; train anew or match it")
        data = manifest.get("data")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the checkpoint does not record the data it was trained on (an older ehi wrote it); train anew without --resume")
        differ = [k for k in sorted(set(data) | set(self.data_fingerprints)) if data.get(k) != self.data_fingerprints.get(k)]
        if differ:
            raise ValueError(
                f"{path}: the checkpoint was trained on other data ({', '.join(differ)} differ); "
                "resume with the data it was written for, or train anew without --resume"
            )
        if manifest.get("stage") == "refit":
            if self.full_set is None:
                raise ValueError(f"{path}: the checkpoint is in its refit stage but no queries were held out")
            self._enter_refit(int(manifest["refit_epochs"]))
        weights = load_file(str(path / "weights.safetensors"))
        self._load_state(weights)  # its encoder.* and tree.* tensors
        torch.set_rng_state(weights["rng.torch"])
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        state = self.optimizer.state_dict()
        restored: dict[int, dict] = {}
        for key, v in opt_tensors.items():
            pid, name = key.split(".", 1)
            restored.setdefault(int(pid), {})[name] = v
        state["state"] = restored
        self.optimizer.load_state_dict(state)
        self.state = TrainerState.read(path, manifest, weights, self.config.tree.height)
        anchor = [weights[f"anchor.{i}"] for i in range(len(self.tree_start)) if f"anchor.{i}" in weights]
        if len(anchor) == len(self.tree_start):
            self._set_anchor([a.to(self.device) for a in anchor])
        return self.state.epoch
