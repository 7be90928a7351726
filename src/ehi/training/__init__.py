"""Training: the loop, its losses and negatives, the router fit, model selection, checkpoints."""

from ehi.training.state import TrainerState
from ehi.training.trainer import Trainer, train
from ehi.training.tuning import tune
from ehi.training.unsupervised import train_unsupervised

__all__ = ["Trainer", "TrainerState", "train", "train_unsupervised", "tune"]
