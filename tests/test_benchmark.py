import json

import numpy as np
import pytest

from ehi.benchmark.run import SeedRun, aggregate, significance, write_report
from ehi.evaluation.baselines import HNSWBaseline, IVFBaseline, ScaNNBaseline, exact_search
from ehi.evaluation.evaluate import Row, budget_curve


def _emb(n, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_budget_rule_on_a_toy_index_with_known_list_sizes():
    # four lists of 10, 20, 30, 40 documents, probed in that order: cumulative 10/30/60/100 %
    cumulative = {1: 0.1, 2: 0.3, 3: 0.6, 4: 1.0}
    searched = []

    def search(w):
        searched.append(w)
        return np.array([[0]]), np.array([[1.0]])

    rows = budget_curve("toy", 4, cumulative.__getitem__, search, ["q"], ["d"], {"q": {"d": 1}}, budgets=(0.05, 0.1, 0.29, 0.3, 0.5, 1.0))
    chosen = {r.budget: (r.width, r.fraction_visited) for r in rows}
    assert 0.05 not in chosen  # even one list exceeds 5 %: no row rather than an over-budget one
    assert chosen[0.1] == (1, 0.1) and chosen[0.29] == (1, 0.1) and chosen[0.3] == (2, 0.3)
    assert chosen[0.5] == (2, 0.3) and chosen[1.0] == (4, 1.0)
    assert sorted(set(searched)) == [1, 2, 4]  # each width searched once


def test_ivf_with_every_list_probed_is_exact_search():
    d, q = _emb(2000), _emb(40, seed=1)
    ivf = IVFBaseline(d, 32)
    idx, scores, visited = ivf.search(q, 10, nprobe=32)
    ref, ref_scores = exact_search(q, d, 10)
    assert np.array_equal(idx, ref) and np.allclose(scores, ref_scores, atol=1e-5)
    assert (visited == 2000).all() and ivf.visited_fraction(q, 32) == 1.0
    # fewer probes visit exactly the probed lists' documents
    lists = ivf.probes(q, 3)
    assert np.array_equal(ivf.search(q, 10, 3)[2], ivf.list_sizes[lists].sum(1))


def test_the_spread_router_baseline_probes_its_lists_in_sketch_order_and_is_exact_over_all():
    from ehi.evaluation.baselines import SpreadIVFBaseline

    d, q = _emb(2000), _emb(40, seed=4)
    sp = SpreadIVFBaseline(d, 32)
    idx, scores, visited = sp.search(q, 10, 32)
    ref, ref_scores = exact_search(q, d, 10)
    assert np.array_equal(idx, ref) and np.allclose(scores, ref_scores, atol=1e-5)
    assert (visited == 2000).all() and sp.list_sizes.sum() == 2000
    lists = sp.probes(q, 3)
    assert np.array_equal(lists, sp.sketch.top(q, 3, sp.lam))
    # a narrow search returns only documents of the probed lists, and counts them
    _, home = sp.quantizer.search(d, 1)
    got, _, visited = sp.search(q, 10, 3)
    assert all(home[i, 0] in row for g, row in zip(got, lists) for i in g if i >= 0)
    assert np.array_equal(visited, sp.list_sizes[lists].sum(1))


def test_scann_full_search_is_exact_and_counts_visits():
    d, q = _emb(2000), _emb(20, seed=2)
    sc = ScaNNBaseline(d, 20)
    idx, _, visited = sc.search(q, 10, 20)
    assert np.array_equal(idx, exact_search(q, d, 10)[0])
    assert (visited == 2000).all()
    assert 0 < sc.visited_fraction(q, 2) < 0.5


def test_hnsw_with_ef_over_the_corpus_is_exact_and_counts_what_it_scores():
    d, q = _emb(2000), _emb(20, seed=3)
    hn = HNSWBaseline(d)
    idx, scores, visited = hn.search(q, 10, hn.max_width)
    ref, ref_scores = exact_search(q, d, 10)
    assert np.array_equal(idx, ref) and np.allclose(scores, ref_scores, atol=1e-5)
    assert (visited == 2000).all() and hn.visited_fraction(q, hn.max_width, 10) == 1.0
    # a narrow search scores a part of the corpus, and more with a wider one
    assert 0 < hn.visited_fraction(q, 10, 10) < hn.visited_fraction(q, 200, 10) < 1
    assert hn.nbytes() > 2000 * 16 * 4  # the vectors and the graph


def _synthetic_runs(seeds=2):
    rng = np.random.default_rng(0)
    qids = [f"q{i}" for i in range(30)]
    runs = []
    for s in range(seeds):
        run = SeedRun(s, timings={"train EHI": 1.0})
        for method, base in (("EHI", 0.8), ("DE + Faiss-IVF", 0.5), ("DE + ScaNN", 0.6)):
            for b in (0.05, 0.1):
                pq = {q: float(rng.random() < base + b) for q in qids}
                run.rows.append(Row(method, b, 2, b * 0.9, {m: 100 * np.mean(list(pq.values())) for m in ("R@10", "R@20", "R@50", "R@100", "nDCG@10", "RR@10")}, pq))
        run.rows.append(Row("DE + exact", None, 0, 1.0, {m: 95.0 for m in ("R@10", "R@20", "R@50", "R@100", "nDCG@10", "RR@10")}, {q: 1.0 for q in qids}))
        run.leaf_sizes = {"EHI": [3, 4, 5], "DE + Faiss-IVF": [1, 5, 6]}
        runs.append(run)
    return runs


def test_report_writer_on_a_tiny_synthetic_run(tmp_path):
    runs = _synthetic_runs()
    agg = aggregate(runs)
    ehi10 = next(c for c in agg if c["method"] == "EHI" and c["budget"] == 0.1)
    vals = [r.metrics["R@100"] for run in runs for r in run.rows if r.method == "EHI" and r.budget == 0.1]
    assert ehi10["metrics"]["R@100"]["mean"] == pytest.approx(np.mean(vals))
    assert ehi10["metrics"]["R@100"]["std"] == pytest.approx(np.std(vals))
    sig = significance(runs, (0.05, 0.1))
    assert [s["baseline"] for s in sig] == ["DE + ScaNN", "DE + ScaNN"]
    # the reported test is Wilcoxon's on per-query recall averaged over seeds, against that baseline
    from scipy.stats import wilcoxon

    def per_query(method, b):
        rows = [r for run in runs for r in run.rows if r.method == method and r.budget == b]
        qids = sorted(rows[0].per_query)
        return np.array([[r.per_query[q] for q in qids] for r in rows]).mean(0)

    for s in sig:
        e, base = per_query("EHI", s["budget"]), per_query("DE + ScaNN", s["budget"])
        assert s["p_value"] == pytest.approx(wilcoxon(e, base, zero_method="zsplit").pvalue)
        assert s["difference"] == pytest.approx(100 * (e.mean() - base.mean()))
    results = {
        "dataset": "toy", "split": "test", "seeds": 2, "budgets": [0.05, 0.1], "command": "ehi benchmark --toy",
        "aggregate": agg, "significance": sig, "timings": {"total": 2.0}, "leaf_sizes": runs[0].leaf_sizes,
    }
    write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| EHI |" in report and "≤10%" in report and "DE + ScaNN" in report and "ehi benchmark --toy" in report
    for png in ("recall_vs_visited.png", "leaf_sizes.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    json.dumps(results)  # everything in the results is JSON-serialisable


def test_the_report_shows_touched_and_untouched_queries_apart(tmp_path):
    from ehi.evaluation.evaluate import add_touch_split

    runs = _synthetic_runs()
    qids = sorted(runs[0].rows[0].per_query)
    groups = (qids[:10], qids[10:])
    for run in runs:
        add_touch_split(run.rows, groups)
        run.touch_counts = {"touched": 10, "untouched": 20}
    agg = aggregate(runs)
    results = {
        "dataset": "toy", "split": "test", "seeds": 2, "budgets": [0.05, 0.1], "command": "ehi benchmark --toy",
        "aggregate": agg, "significance": significance(runs, (0.05, 0.1)), "timings": {"total": 2.0}, "leaf_sizes": runs[0].leaf_sizes,
        "runs": [{"seed": r.seed, "touch_counts": r.touch_counts} for r in runs],
    }
    write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Recall@100 on touched queries" in report and "## Recall@100 on untouched queries" in report
    assert "20 of the 30 queries: no training query points" in report
    ehi = next(c for c in agg if c["method"] == "EHI" and c["budget"] == 0.1)
    want = ehi["metrics"]["R@100 untouched"]
    assert f"{want['mean']:.1f} ± {want['std']:.1f}" in report.split("## Recall@100 on untouched queries")[1].split("\n| EHI |")[1].split("\n")[0]
