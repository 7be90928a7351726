"""Old import path of ``ehi.training.tuning`` (``ehi.tuning.tune``), kept for code written before the subpackages."""

from ehi.training.tuning import *  # noqa: F403
from ehi.training.tuning import tune  # noqa: F401
