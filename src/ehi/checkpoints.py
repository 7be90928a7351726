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
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .artifacts import ArtifactError, read_manifest, write_artifact
from .config import EHIConfig


def checkpoint_path(out_dir: str | Path) -> Path:
    """Checkpoints live beside the model directory, which a final save replaces whole."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoint")


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


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else ({k: _jsonable(v) for k, v in x.items()} if isinstance(x, dict) else x)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


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

    def save_checkpoint(self, path: Path, epoch: int) -> None:
        """Everything needed to continue bit-identically after ``epoch`` complete epochs:
        weights, optimiser state, RNG states and the mined negatives (safetensors, npy, JSON)."""

        def write(tmp: Path):
            weights = joint_state(self.encoder, self.tree)
            weights["rng.torch"] = torch.get_rng_state()
            if self.best is not None:
                weights.update({f"best.{k}": v.contiguous().cpu() for k, v in self.best[2].items()})
            weights.update({f"anchor.{i}": p.contiguous().cpu() for i, p in enumerate(self.tree_start)})
            save_file(weights, str(tmp / "weights.safetensors"))
            opt = self.optimizer.state_dict()
            tensors = {
                f"{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
                for pid, st in opt["state"].items()
                for name, v in st.items()
            }
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            if self.pool is not None:
                np.save(tmp / "negatives.npy", self.pool)
            if self.route_targets is not None:
                np.save(tmp / "query_paths.npy", self.query_paths)
                np.save(tmp / "doc_paths.npy", self.doc_paths)
                for h, t in enumerate(self.route_targets):
                    np.save(tmp / f"route_targets_{h}.npy", t)
            (tmp / "config.json").write_text(self.config.to_json())
            return {
                "kind": "checkpoint",
                "epoch": epoch,
                "data": self.data_fingerprints,
                "history": self.history,
                "validation": self.validation,
                "stage": self.stage,
                "refit_epochs": self.refit_epochs,
                "route_fit": self.route_fit,
                "best": None if self.best is None else {"epoch": self.best[0], "score": self.best[1], "reclustered": self.best[3]},
                "rng": {"numpy": _jsonable(self.rng.bit_generator.state), "python": _jsonable(random.getstate())},
            }

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
        self.pool = np.load(path / "negatives.npy", allow_pickle=False) if (path / "negatives.npy").exists() else None
        if (path / "query_paths.npy").exists():
            load = lambda name: np.load(path / name, allow_pickle=False)
            self.query_paths, self.doc_paths = load("query_paths.npy"), load("doc_paths.npy")
            self.route_targets = [load(f"route_targets_{h}.npy") for h in range(self.config.tree.height)]
        self.rng.bit_generator.state = manifest["rng"]["numpy"]
        random.setstate(_tuplify(manifest["rng"]["python"]))
        self.history = list(manifest.get("history", []))
        self.validation = list(manifest.get("validation", []))
        anchor = [weights[f"anchor.{i}"] for i in range(len(self.tree_start)) if f"anchor.{i}" in weights]
        if len(anchor) == len(self.tree_start):
            self._set_anchor([a.to(self.device) for a in anchor])
        if manifest.get("best"):
            best_state = {k[len("best.") :]: v for k, v in weights.items() if k.startswith("best.")}
            b = manifest["best"]
            self.best = (int(b["epoch"]), float(b["score"]), best_state, bool(b.get("reclustered", False)))
        self.route_fit = manifest.get("route_fit")
        self.start_epoch = int(manifest["epoch"])
        return self.start_epoch
