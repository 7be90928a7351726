"""The benchmark's report: ``report.md`` with its tables, and the recall and leaf-size plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ehi.artifacts import write_file_atomic
from ehi.evaluation.evaluate import (
    BUDGET_RULE,
    TOUCHED,
    UNTOUCHED,
)

REPORT_MEASURES = ("R@10", "R@20", "R@50", "R@100", "nDCG@10", "RR@10")



def _fmt(cell: dict | None, measure: str = "R@100") -> str:
    if cell is None or measure not in cell["metrics"]:
        return "—"
    m = cell["metrics"][measure]
    return f"{m['mean']:.1f} ± {m['std']:.1f}" if cell["seeds"] > 1 else f"{m['mean']:.1f}"


NEIGHBOUR_MEASURES = ("NR@10", "NR@100")
NEIGHBOUR_NOTE = ("neighbour recall NR@k: the share of the exact top-k under the method's encoder found in its top k "
                  "(what ANN benchmarks report as recall)")


def write_report(results: dict, out: Path) -> None:
    """report.md (tables in the style of the paper's Table 6), and the two plots."""
    agg = results["aggregate"]
    budgets = results["budgets"]
    methods = list(dict.fromkeys(c["method"] for c in agg))
    by = {(c["method"], c["budget"]): c for c in agg}
    unsupervised = results.get("unsupervised", False)
    judged = any("R@100" in c["metrics"] for c in agg)
    curves = (list(NEIGHBOUR_MEASURES) if unsupervised else []) + (["R@100"] if judged else [])
    lines = [
        f"# ehi benchmark: {results['dataset']} ({results['split']} split)" + (", unsupervised" if unsupervised else ""),
        "",
        f"Command: `{results['command']}`",
        "",
        f"{results['seeds']} seeds, mean ± std. Budget rule: {BUDGET_RULE}; "
        "a cell is empty when even the narrowest search exceeds the budget.",
    ]
    if unsupervised:
        lines += ["", f"Unsupervised: EHI trained without qrels ({results.get('pseudo_queries', '')}); {NEIGHBOUR_NOTE}."]
    for measure in curves:
        lines += [
            "",
            f"## {measure} against the fraction of the corpus visited",
            "",
            "| method | " + " | ".join(f"≤{100 * b:g}%" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for m in methods:
            if by.get((m, None)):
                continue
            lines.append(f"| {m} | " + " | ".join(_fmt(by.get((m, b)), measure) for b in budgets) + " |")
    exact_measures = [x for x in REPORT_MEASURES if judged] + (list(NEIGHBOUR_MEASURES) if unsupervised else [])
    lines += ["", "Exact search (100 % visited):", "", "| method | " + " | ".join(exact_measures) + " |", "|---|" + "---|" * len(exact_measures)]
    for m in methods:
        if (m, None) in by:
            lines.append(f"| {m} | " + " | ".join(_fmt(by[(m, None)], x) for x in exact_measures) + " |")
    if unsupervised:
        lines += ["", "Wall time (s, summed over seeds): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
        write_file_atomic(out / "report.md", "\n".join(lines))
        plot_recall(agg, out / "recall_vs_visited.png", results["dataset"], "NR@100")
        plot_leaf_sizes(results["leaf_sizes"], out / "leaf_sizes.png")
        return
    counts = next((r.get("touch_counts") for r in results.get("runs", []) if r.get("touch_counts")), None)
    for measure, group in ((TOUCHED, "touched"), (UNTOUCHED, "untouched")):
        if not counts or not counts[group]:
            continue
        lines += ["", f"## Recall@100 on {group} queries against the fraction of the corpus visited", "",
                  f"{counts[group]} of the {counts['touched'] + counts['untouched']} queries: "
                  + ("some training query points at one of their relevant documents." if group == "touched"
                     else "no training query points at any of their relevant documents (where routing must generalise)."), "",
                  "| method | " + " | ".join(f"≤{100 * b:g}%" for b in budgets) + " | exact |", "|---|" + "---|" * (len(budgets) + 1)]
        for m in methods:  # exact search: its one cell in the last column
            lines.append(f"| {m} | " + " | ".join(_fmt(by.get((m, b)), measure) for b in budgets) + f" | {_fmt(by.get((m, None)), measure)} |")
    for b in [b for b in (0.05, 0.1, 0.2) if b in budgets]:
        lines += ["", f"## All measures at ≤{100 * b:g}% visited (mean fraction visited in brackets)", "",
                  "| method | visited | " + " | ".join(REPORT_MEASURES) + " |", "|---|---|" + "---|" * len(REPORT_MEASURES)]
        for m in methods:
            c = by.get((m, b))
            if c:
                lines.append(f"| {m} | {100 * c['fraction_visited']['mean']:.1f}% | " + " | ".join(_fmt(c, x) for x in REPORT_MEASURES) + " |")
    lines += ["", "## EHI against the best baseline (DE, untrained encoder or EHI encoder with Faiss-IVF / ScaNN / spread router / HNSW)", "",
              "| budget | best baseline | EHI R@100 | baseline R@100 | difference | p-value |", "|---|---|---|---|---|---|"]
    for s in results["significance"]:
        lines.append(f"| ≤{100 * s['budget']:g}% | {s['baseline']} | {s['ehi_R@100']:.1f} | {s['baseline_R@100']:.1f} | {s['difference']:+.1f} | {s['p_value']:.2g} |")
    lines += ["", "## EHI's learned tree against k-means over its own encoder (EHI encoder + Faiss-IVF)", "",
              "Same encoder, as many lists as leaves: the difference is what the learned routing adds.", "",
              "| budget | EHI R@100 | EHI encoder + Faiss-IVF | difference |", "|---|---|---|---|"]
    for g in results.get("own_encoder_gap", []):
        lines.append(f"| ≤{100 * g['budget']:g}% | {g['EHI']:.1f} | {g['EHI encoder + Faiss-IVF']:.1f} | {g['difference']:+.1f} |")
    val = [r for r in results.get("runs", []) if r.get("validation")]
    if val:
        v0 = val[0]["validation"]
        lines += ["", "## Validated training", "",
                  f"Held out: {v0['held_out']}; score: {v0['score']} at budgets "
                  + ", ".join(f"{100 * b:g}%" for b in v0["budgets"]) + ".", "",
                  "| seed | kept epoch | kept tree | score at epoch 0 (k-means start) | score kept | learned tree at the last epoch | refit |",
                  "|---|---|---|---|---|---|---|"]
        for r in val:
            v = r["validation"]
            curve = {e["epoch"]: e for e in v["curve"]}
            kept = curve[v["kept_epoch"]]
            kept_score = kept["score"] if v["kept_tree"] == "learned" else kept["kmeans"]["score"]
            refit = f"{v['refit']['epochs']} epochs on {v['refit']['queries']} queries" if v.get("refit") else "—"
            start = curve[0]["score"] if 0 in curve else float("nan")
            lines.append(f"| {r['seed']} | {v['kept_epoch']} | {v['kept_tree']} | {start:.1f} | {kept_score:.1f} | "
                         f"{v['curve'][-1]['score']:.1f} | {refit} |")
    lines += ["", f"Test: {results['significance'][0]['test'] if results['significance'] else 'n/a'}.", "",
              "ScaNN configuration: " + json.dumps(results.get("scann_config", {})), "",
              "Wall time (s, summed over seeds): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
    write_file_atomic(out / "report.md", "\n".join(lines))
    plot_recall(agg, out / "recall_vs_visited.png", results["dataset"])
    plot_leaf_sizes(results["leaf_sizes"], out / "leaf_sizes.png")


def plot_recall(agg: list[dict], path: Path, title: str, measure: str = "R@100") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = list(dict.fromkeys(c["method"] for c in agg if c["budget"] is not None))
    colours = plt.get_cmap("tab20")(np.arange(len(methods)) % 20)
    for m, colour in zip(methods, colours):
        cells = sorted((c for c in agg if c["method"] == m and c["budget"] is not None), key=lambda c: c["budget"])
        x = [100 * c["fraction_visited"]["mean"] for c in cells]
        y = [c["metrics"][measure]["mean"] for c in cells]
        e = [c["metrics"][measure]["std"] for c in cells]
        style = "-" if m == "EHI" else ("--" if m.startswith("DE") else ":")
        ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, ls=style, lw=2.2 if m == "EHI" else 1.2, label=m, color=colour)
    exact = [c for c in agg if c["budget"] is None and c["method"] in ("DE + exact", "EHI encoder + exact") and measure in c["metrics"]]
    for c in sorted(exact, key=lambda c: c["metrics"][measure]["mean"]):
        y = c["metrics"][measure]["mean"]
        ax.axhline(y, color="grey", lw=0.8, ls="-.")
        top = y == max(e["metrics"][measure]["mean"] for e in exact)
        ax.annotate(f"{c['method']} {y:.1f}", (0.01, y), xycoords=("axes fraction", "data"),
                    va="bottom" if top else "top", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the corpus visited (%)")
    ax.set_ylabel(f"{measure} (%)")
    ax.set_title(f"{title}: {measure} against fraction visited")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_leaf_sizes(sizes: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = [k for k in ("EHI", "DE + Faiss-IVF", "EHI encoder + Faiss-IVF", "encoder + Faiss-IVF") if k in sizes]
    top = max(max(sizes[k]) for k in keys)
    bins = np.linspace(0, top + 1, 30)
    for k in keys:
        ax.hist(sizes[k], bins=bins, alpha=0.5, label=f"{k} (max {max(sizes[k])}, empty {sum(s == 0 for s in sizes[k])})")
    ax.set_xlabel("documents per leaf / inverted list")
    ax.set_ylabel("number of leaves")
    ax.set_title("Leaf sizes (seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
