"""Evaluation: metrics at budgets of the corpus visited, and the baselines measured beside EHI."""

from ehi.evaluation.evaluate import BUDGETS, Row, evaluate_model

__all__ = ["BUDGETS", "Row", "evaluate_model"]
