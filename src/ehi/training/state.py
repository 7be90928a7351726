"""What training changes as it goes, besides the weights and the optimiser's moments: one
``TrainerState`` that the loop, the selection and the checkpoints receive and a checkpoint
saves and restores whole."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


class Best(NamedTuple):
    """The state validation keeps: its epoch, score and tensors, and whether that state's tree
    is k-means over that epoch's encoder."""

    epoch: int
    score: float
    state: dict[str, torch.Tensor]
    reclustered: bool


@dataclass(eq=False)
class TrainerState:
    """The training run's own state.

    ``epoch``: epochs completed in the current ``stage`` ("select", then "refit" for
    ``refit_epochs``); ``history``: one record per epoch; ``validation``: one entry per
    validated epoch (0 = the start tree); ``best``: the state validation keeps; ``route_fit``:
    the router fit's held-out scores and the shrink kept; ``pool``: the mined hard negatives;
    ``route_targets`` / ``query_paths`` / ``doc_paths``: the neighbour routing targets and the
    paths they were computed under; ``rng``: the generator of the batch order."""

    rng: np.random.Generator
    epoch: int = 0
    stage: str = "select"
    refit_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    best: Best | None = None
    route_fit: dict | None = None
    pool: np.ndarray | None = None
    route_targets: list[np.ndarray] | None = None
    query_paths: np.ndarray | None = None
    doc_paths: np.ndarray | None = None

    def __eq__(self, other) -> bool:
        """Equal in every field (arrays and tensors by value): what a resume must restore."""
        return isinstance(other, TrainerState) and all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    # ---- checkpoint files ---------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The best state's tensors, under ``best.*`` (saved beside the weights)."""
        return {} if self.best is None else {f"best.{k}": v.contiguous().cpu() for k, v in self.best.state.items()}

    def write(self, folder: Path) -> dict:
        """The arrays into ``folder``; returns the JSON part (for the checkpoint's manifest)."""
        if self.pool is not None:
            np.save(folder / "negatives.npy", self.pool)
        if self.route_targets is not None:
            np.save(folder / "query_paths.npy", self.query_paths)
            np.save(folder / "doc_paths.npy", self.doc_paths)
            for h, t in enumerate(self.route_targets):
                np.save(folder / f"route_targets_{h}.npy", t)
        return {
            "epoch": self.epoch,
            "history": self.history,
            "validation": self.validation,
            "stage": self.stage,
            "refit_epochs": self.refit_epochs,
            "route_fit": self.route_fit,
            "best": None if self.best is None else {"epoch": self.best.epoch, "score": self.best.score, "reclustered": self.best.reclustered},
            "rng": {"numpy": _jsonable(self.rng.bit_generator.state), "python": _jsonable(random.getstate())},
        }

    @classmethod
    def read(cls, folder: Path, saved: dict, weights: dict[str, torch.Tensor], height: int) -> "TrainerState":
        """The state ``write`` saved (``saved``: its JSON part), and Python's global random
        state restored with it."""
        load = lambda name: np.load(folder / name, allow_pickle=False)  # noqa: E731
        rng = np.random.default_rng()
        rng.bit_generator.state = saved["rng"]["numpy"]
        random.setstate(_tuplify(saved["rng"]["python"]))
        state = cls(
            rng=rng, epoch=int(saved["epoch"]), stage=saved.get("stage", "select"), refit_epochs=int(saved.get("refit_epochs", 0)),
            history=list(saved.get("history", [])), validation=list(saved.get("validation", [])), route_fit=saved.get("route_fit"),
            pool=load("negatives.npy") if (folder / "negatives.npy").exists() else None,
        )
        if (folder / "query_paths.npy").exists():
            state.query_paths, state.doc_paths = load("query_paths.npy"), load("doc_paths.npy")
            state.route_targets = [load(f"route_targets_{h}.npy") for h in range(height)]
        if saved.get("best"):
            b = saved["best"]
            best_state = {k[len("best.") :]: v for k, v in weights.items() if k.startswith("best.")}
            state.best = Best(int(b["epoch"]), float(b["score"]), best_state, bool(b.get("reclustered", False)))
        return state


def _same(a, b) -> bool:
    if isinstance(a, np.random.Generator) or isinstance(b, np.random.Generator):
        return type(a) is type(b) and a.bit_generator.state == b.bit_generator.state
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else ({k: _jsonable(v) for k, v in x.items()} if isinstance(x, dict) else x)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
