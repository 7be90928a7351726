"""Puts ``benchmarks/`` on the import path, so that an experiment run as
``python benchmarks/experiments/NAME.py`` finds the shared ``lib`` beside it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
