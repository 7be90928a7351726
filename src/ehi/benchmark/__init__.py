"""``ehi benchmark``: EHI against the baselines over seeds, its report and plots."""

from ehi.benchmark.run import run_benchmark

__all__ = ["run_benchmark"]
