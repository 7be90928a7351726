"""Every current benchmark script (``benchmarks/*.py``; frozen experiments live in
``benchmarks/experiments``) runs end to end on small synthetic data and writes its JSON: a
script that no longer runs against today's package is caught here. Sizes are the smallest
each script's budgets allow (a leaf must hold under 1-2 % of the corpus); nothing is timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_beir

from ehi.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCALE = ["--docs", "10000", "--train-pairs", "500", "--sample", "3000", "--test-queries", "50", "--epochs", "1", "--reps", "1"]

# name: (script, arguments; M = the trained model, D = its BEIR folder)
RUNS = {
    "added_documents": ("added_documents", ["--corpus", "D", "--seeds", "1"]),
    "depth_cost": ("depth_cost", ["--leaves", "64", "256", "--reps", "1", "--route", "--queries", "5"]),
    "encoder_backend": ("encoder_backend", ["--corpus", "D", "--single", "3", "--batch-docs", "64", "--epochs", "1"]),
    "filtered_search": ("filtered_search", ["--model", "M", "--data", "D", "--reps", "1"]),
    "load_test": ("load_test", ["M", "--data", "D", "--requests", "10", "--concurrency", "1", "2", "--setups", "onnx, adaptive 2 ms", "--limit", "60"]),
    "load_test --mixed": ("load_test", ["M", "--data", "D", "--mixed", "--light-clients", "2", "--per-client", "2"]),
    "probe_server": ("probe_server", ["M", "--stalled", "3", "--in-flight", "2"]),
    "scale": ("scale", [*SCALE, "--branching", "250", "--pq-m", "8", "--rerank", "50", "--hnsw"]),  # 1 % holds a leaf
    "scale_out": ("scale_out", [*SCALE, "--branching", "100", "--shards", "1", "2", "--workers", "1"]),
    "search_speed": ("search_speed", ["--model", "M", "--data", "D", "--reps", "1", "--single", "3", "--max-queries", "40"]),
    "search_speed --curves-only": ("search_speed", ["--model", "M", "--data", "D", "--curves-only", "--reps", "1", "--single", "3", "--max-queries", "40"]),
    "showcase_query": ("showcase_query", ["--model", "M", "--data", "D"]),
    "spread_routing": ("spread_routing", ["--model", "M", "--data", "D", "--split", "test", "--lam", "2", "--blend", "1", "--basis", "16",
                                         "--candidates-per-beam", "4"]),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """1,200 synthetic documents, one question each, and a model trained on them (48 leaves)."""
    root = write_beir(tmp_path_factory.mktemp("bench") / "beir", n_per_topic=200)
    model = root.parent / "model"
    assert main(["train", "--data", str(root), "--out", str(model), "-B", "48", "--epochs", "2", "--no-progress"]) == 0
    return root, model


def test_every_current_script_has_a_smoke_run():
    assert {p.stem for p in BENCH.glob("*.py")} == {script for script, _ in RUNS.values()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.ray) if RUNS[n][0] == "scale_out" else n for n in sorted(RUNS)],
                         ids=lambda n: n.replace(" --", "-"))
def test_benchmark_script_runs_on_small_data(name, small, tmp_path):
    script, args = RUNS[name]
    if script == "scale_out":
        pytest.importorskip("ray")
    root, model = small
    args = [str(model) if a == "M" else str(root) if a == "D" else a for a in args]
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())
