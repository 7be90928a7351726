"""Old import path of ``ehi.training.unsupervised``, kept for code written before the subpackages."""

from ehi.training.unsupervised import *  # noqa: F403
from ehi.training.unsupervised import train_unsupervised, unsupervised_config  # noqa: F401
