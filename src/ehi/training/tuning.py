"""``ehi tune``: choose the tree's settings for a new corpus from its own training queries.

Each candidate (overrides of the given config) is trained with validation on held-out
*training* queries, once per fold (a fold is another held-out draw and seed), and scored by
its best validation score (mean Recall@100 at small budgets, see ``ehi.training.validation``). The
epochs are the ones validation kept. Candidates run in order, the given config first, until
the time limit; no test or dev qrels are ever read.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ehi.config import EHIConfig, apply_overrides
from ehi.data import Dataset
from ehi.progress import bars

log = logging.getLogger(__name__)


def candidates(config: EHIConfig, num_docs: int) -> list[dict]:
    """The given config first, then one change at a time: leaf count around ~40 documents per
    leaf (kept >= 8 documents per leaf), the indexer's learning rate, the routing loss."""
    out: list[dict] = [{}]
    B = config.tree.resolve_branching(num_docs)
    if config.tree.resolve_height(num_docs) == 1:
        for b in (B // 2, B * 2):
            if b >= 2 and num_docs / b >= 8:
                out.append({"tree.branching": b})
    lr = config.train.lr_indexer
    out += [{"train.lr_indexer": lr / 10}, {"train.lr_indexer": lr * 3}]
    out += [{"train.lambda_routing": 0.0 if config.train.lambda_routing else 1.0}]
    out += [{"tree.temperature": round(config.tree.temperature * 3, 6)}]
    out += [{"train.load_balance": 0.0 if config.train.load_balance else 0.3}]
    return out


@dataclass
class Trial:
    overrides: dict
    scores: list[float] = field(default_factory=list)  # best validation score per fold
    kept: list[int] = field(default_factory=list)  # epoch validation kept per fold
    start: list[float] = field(default_factory=list)  # the k-means start's score per fold
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else float("-inf")

    def to_dict(self) -> dict:
        return {"overrides": self.overrides, "score": self.score, "scores": self.scores, "kept_epochs": self.kept,
                "start_scores": self.start, "seconds": self.seconds}


def tune(
    dataset: Dataset,
    config: EHIConfig | None = None,
    split: str = "train",
    time_limit: float = 600.0,
    folds: int = 2,
    progress: bool = True,
) -> tuple[EHIConfig, list[Trial]]:
    """(chosen config, trials). The chosen config's ``epochs`` is the largest epoch its folds
    kept (at least 1), so training it validates again within that range."""
    from ehi.training.trainer import Trainer

    base = copy.deepcopy(config or EHIConfig()).validate()
    if base.train.val_fraction <= 0 and not base.train.val_split:
        raise ValueError("tuning needs validation: val_fraction > 0 or a val_split")
    t0 = time.perf_counter()
    trials: list[Trial] = []
    bar = tqdm(candidates(base, len(dataset.corpus)), desc="tune", disable=not bars(progress))
    for overrides in bar:
        elapsed = time.perf_counter() - t0
        per = np.mean([t.seconds for t in trials]) if trials else 0.0
        if trials and elapsed + per > time_limit:
            log.info("time limit: %d of the candidates tried", len(trials))
            break
        bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in overrides.items()) or "given config")
        trial = Trial(overrides)
        t = time.perf_counter()
        for fold in range(folds):
            cfg = apply_overrides(base, {**overrides, "train.seed": base.train.seed + fold, "train.val_refit": False})
            trainer = Trainer(cfg, dataset, split)
            if trainer.validator is None:
                raise ValueError(f"split {split!r} has too few queries to hold out for validation")
            trainer.fit(progress=False, build_index=False)
            trial.scores.append(trainer.state.best[1])
            trial.kept.append(trainer.state.best[0])
            trial.start.append(trainer.state.validation[0]["score"])
        trial.seconds = time.perf_counter() - t
        trials.append(trial)
        if progress:
            tqdm.write(format_trial(trial))
    best = max(trials, key=lambda t: t.score)
    chosen = apply_overrides(base, {**best.overrides, "train.epochs": max(1, max(best.kept))})
    return chosen, trials


def format_trial(t: Trial) -> str:
    what = ", ".join(f"{k}={v}" for k, v in t.overrides.items()) or "given config"
    return (f"{what:<32} score {t.score:6.2f} (folds {', '.join(f'{s:.1f}' for s in t.scores)}; "
            f"k-means start {np.mean(t.start):.1f}) kept epochs {t.kept}  {t.seconds:.0f}s")
