"""Evaluation: metrics at budgets of the corpus visited, and the baselines measured beside EHI."""

from ehi.evaluation.evaluate import BUDGET_RULE, BUDGETS, Row, evaluate_model, format_table

__all__ = ["BUDGETS", "BUDGET_RULE", "Row", "evaluate_model", "format_table"]
