"""The ``ehi`` argument parser, and the config a command's flags make."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ehi.benchmark.run import ABLATIONS  # noqa: E402
from ehi.cli.args import (
    BACKEND_HELP,
    LOCAL_RAY,
    NO_PROGRESS,
    REPARTITION_HELP,
    Parser,
    backend_override,
    budget_arg,
    device_arg,
    k_arg,
    ms_arg,
    nonneg_arg,
    port_arg,
    positive_arg,
    router_option,
    seconds_arg,
)
from ehi.config import BACKENDS  # noqa: E402
from ehi.limits import MAX_K  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from ehi import __version__

    p = Parser(prog="ehi", description="End-to-end Hierarchical Indexing for dense retrieval")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    p.add_argument("--version", action="version", version=f"ehi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train encoder and tree jointly, build the index, save the model")
    t.add_argument("--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or BEIR name")
    t.add_argument("--doc-embeddings", help="bring your own encoder: (N, d) float .npy of the documents")
    t.add_argument("--query-embeddings", help="(Q, d) float .npy of the queries")
    t.add_argument("--pairs", help="qrels TSV over embedding rows (query row, document row, score)")
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--split", help="qrels split to train on (default: train); with --unsupervised: only this split's queries are pseudo-queries (its judgements are not read)")
    t.add_argument("--unsupervised", action="store_true",
                   help="no qrels: pseudo-queries (unlabelled queries, else document spans; or --query-embeddings, else documents) learn to reach their exact neighbours")
    t.add_argument("--pseudo-queries", choices=["auto", "queries", "documents"], default="auto",
                   help="--unsupervised: what stands in for queries (default auto: the dataset's queries if any, else document spans)")
    t.add_argument("--neighbours", type=positive_arg, default=100, help="--unsupervised: exact neighbours per pseudo-query (default 100)")
    t.add_argument("--config", help="JSON file with config overrides, same layout as a saved config.json")
    t.add_argument("--epochs", type=int, help="training epochs (config default 20)")
    t.add_argument("--batch-size", type=int, help="query-document pairs per step")
    t.add_argument("--branching", "-B", type=int, help="children per node (B)")
    t.add_argument("--height", "-H", type=int, help="tree height (H; default 0 = auto: 1 below 16,384 leaves, then 2)")
    t.add_argument("--init", choices=["kmeans", "random"], help="how the tree starts: k-means of the documents, or random")
    t.add_argument("--load-balance", type=float, help="weight of the load-balance penalty (0 = off)")
    t.add_argument("--scope", choices=["adapter", "top-k", "full"], help="trainable part of the encoder")
    t.add_argument("--top-k-layers", type=int, help="--scope top-k: transformer layers trained")
    t.add_argument("--model", help="sentence-transformers model name or folder")
    t.add_argument("--encoder-backend", choices=BACKENDS, help=BACKEND_HELP + " (saved in the model; config default auto)")
    t.add_argument("--hard-negatives", type=int, help="negatives per query drawn from the leaves it reaches (0 = in-batch only)")
    t.add_argument("--refresh-every", type=int, help="epochs between refreshes of the hard negatives (r)")
    t.add_argument("--d2l", type=int, help="leaves each document is stored in")
    t.add_argument("--codec", choices=["flat", "sq8", "pq"], help="index codec (default flat); see 'ehi index build'")
    router_option(t, saved=True)
    t.add_argument("--seed", type=int, help="random seed (config default 0)")
    t.add_argument("--device", type=device_arg, help="cpu, cuda, cuda:1, ...")
    t.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    t.add_argument("--evaluate", action="store_true", help="evaluate on the test split afterwards")
    t.add_argument("--resume", action="store_true", help="continue from the last complete epoch (OUT.checkpoint)")
    t.add_argument("--keep-checkpoint", action="store_true", help="keep OUT.checkpoint after a successful run (removed by default)")
    t.add_argument("--overwrite", action="store_true", help="replace an ehi model already at --out")
    t.add_argument("--strict", action="store_true", help="qrels naming unknown queries or documents are errors, not warnings")
    t.add_argument("--val-fraction", type=float, help="training queries held out to validate routing each epoch (0 = off; default 0.2)")
    t.add_argument("--val-group", choices=["random", "documents"],
                   help="held-out queries drawn at random (default) or by whole document groups (an article when titles repeat): "
                   "documents no training query touches")
    t.add_argument("--val-split", help="validate on this qrels split instead (e.g. dev; never the split you report on)")
    t.add_argument("--no-refit", action="store_true", help="ship the validated state itself, not a retrain on all queries")

    u = sub.add_parser("tune", help="choose branching, epochs and the tree's learning settings from training queries")
    u.add_argument("--data", required=True, help="BEIR folder or name")
    u.add_argument("--out", required=True, help="JSON config to write (use it with 'ehi train --config')")
    u.add_argument("--split", default="train", help="qrels split to tune on (default: train)")
    u.add_argument("--config", help="JSON config to start from")
    u.add_argument("--time-limit", type=float, default=600, help="seconds; candidates stop once the next would exceed it (default 600)")
    u.add_argument("--folds", type=positive_arg, default=2, help="held-out draws per candidate (default 2)")
    u.add_argument("--device", type=device_arg, help="cpu, cuda, ...")
    u.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    i = sub.add_parser("index", help="build, add to or remove from a trained model's index")
    isub = i.add_subparsers(dest="index_command", required=True)
    ib = isub.add_parser("build", help="index a corpus with a trained model")
    ib.add_argument("model", help="model directory")
    ib.add_argument("--data", required=True, help="BEIR folder whose corpus.jsonl is indexed")
    ib.add_argument("--d2l", type=positive_arg, help="leaves each document is stored in (default: the model's)")
    ib.add_argument("--codec", choices=["flat", "sq8", "pq"], help="how vectors are stored: flat (float32), sq8 (1 byte/dim), pq (pq-m bytes)")
    ib.add_argument("--pq-m", type=positive_arg, help="pq: one-byte sub-quantizers per vector; must divide the dimension (default dim/8)")
    ib.add_argument("--rerank", type=nonneg_arg, help="pq: re-rank this many candidates exactly from the float vectors (0 = off)")
    ib.add_argument("--out", help="write the changed model here (a new folder; an ehi model there needs --overwrite)")
    ib.add_argument("--overwrite", action="store_true", help="replace the model at --out, or without --out the model itself")
    ib.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, ...")
    ib.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                    help="embed and route on Ray workers (the 'ray' extra): the cluster at ADDRESS ('auto', 'ray://host:10001'), or a local Ray without one")
    ib.add_argument("--workers", type=positive_arg, default=2, help="--ray: workers that each load the model once and embed and route a share of the corpus")
    ib.add_argument("--shards", type=positive_arg, help="save the lists as this many shard files, leaves balanced by documents, for 'ehi serve --shards' (default: the model's, 1)")
    backend_override(ib)
    router_option(ib, saved=True)
    ib.add_argument("--repartition", action="store_true", help=REPARTITION_HELP)
    ih = isub.add_parser("shard", help="re-save a model's index as S shard files (no re-encoding), for 'ehi serve --shards S'")
    ih.add_argument("model", help="model directory")
    ih.add_argument("--shards", type=positive_arg, required=True, help="shard files; 1 joins them back into index.faiss")
    ih.add_argument("--out", help="write the changed model here (a new folder; an ehi model there needs --overwrite)")
    ih.add_argument("--overwrite", action="store_true", help="replace the model at --out, or without --out the model itself")

    ia = isub.add_parser("add", help="route new documents into their leaves (no retraining)")
    ia.add_argument("model", help="model directory")
    ia.add_argument("corpus", help="corpus.jsonl of the new documents")
    ia.add_argument("--out", help="write the changed model here (a new folder; an ehi model there needs --overwrite)")
    ia.add_argument("--overwrite", action="store_true", help="replace the model at --out, or without --out the model itself")
    ia.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, ...")
    backend_override(ia)
    ia.add_argument("--repartition", action="store_true", help=REPARTITION_HELP)
    ir = isub.add_parser("remove", help="drop documents by id")
    ir.add_argument("model", help="model directory")
    ir.add_argument("ids", help="text file, one document id per line")
    ir.add_argument("--out", help="write the changed model here (a new folder; an ehi model there needs --overwrite)")
    ir.add_argument("--overwrite", action="store_true", help="replace the model at --out, or without --out the model itself")
    ir.add_argument("--strict", action="store_true", help="ids that are not indexed are an error")

    s = sub.add_parser("search", help="search a trained model")
    s.add_argument("model", help="model directory")
    s.add_argument("query", nargs="*", help="the query: its words are one query (quote it or not); several queries: --queries FILE")
    s.add_argument("--queries", help="one query per line ('id<TAB>text', or text alone: its line number is its id), or a BEIR queries.jsonl")
    s.add_argument("--run", help="write a TREC run file (qid Q0 docid rank score ehi) that trec_eval, ir-measures and ranx read")
    s.add_argument("-k", type=k_arg, default=10, help=f"hits per query, at most {MAX_K}")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--beam", type=positive_arg, help="leaves to visit")
    g.add_argument("--budget", type=budget_arg, help="fraction of the corpus to visit, e.g. 0.1 or 10%%: the beam whose mean on training queries is within it (default 10%%)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--ids", help="text file, one document id per line: only these may be returned (the best k of them are found)")
    s.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, ...")
    backend_override(s)
    router_option(s, saved=False)

    e = sub.add_parser("evaluate", help="metrics against fraction visited, with exact search and Faiss-IVF; or score a run file")
    e.add_argument("model", nargs="?", help="model directory (not with --run)")
    e.add_argument("--data", required=True, help="BEIR folder or name whose qrels judge")
    e.add_argument("--split", default="test", help="qrels split to evaluate on")
    e.add_argument("--run", help="score this TREC run file (e.g. from 'ehi search --run') against the split's qrels instead of a model")
    e.add_argument("--budgets", type=budget_arg, nargs="+", help="fractions (default 1%% 2%% 5%% 10%% 20%% ... 100%%)")
    e.add_argument("-k", type=k_arg, default=100, help=f"documents retrieved per query, at most {MAX_K}")
    e.add_argument("--no-baselines", action="store_true", help="only the model, without exact search and Faiss-IVF over its encoder")
    e.add_argument("--train-split", default="train",
                   help="the qrels split the model was trained on: Recall@100 is also reported apart for queries whose relevant documents its queries touch and for those they do not")
    e.add_argument("--json", help="write every row to this JSON file")
    e.add_argument("--strict", action="store_true", help="qrels naming unknown queries or documents are errors")
    e.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, ...")
    backend_override(e)
    router_option(e, saved=False)

    c = sub.add_parser("cache", help="the feature cache: size, or clear it")
    c.add_argument("cache_command", choices=["info", "clear"], help="info: files and size; clear: delete them")

    v = sub.add_parser("serve", help="HTTP search service with a web page")
    v.add_argument("model", help="model directory (opened memory-mapped, read-only)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=port_arg, default=8000, help="port to listen on")
    backend_override(v)
    router_option(v, saved=False)
    v.add_argument("--max-wait-ms", type=ms_arg, default=2.0,
                   help="under load (the previous batch held several requests), how long a micro-batch waits for more; "
                   "a lone request never waits (0: never wait)")
    v.add_argument("--shards", type=positive_arg,
                   help="serve the index from this many Ray actors, one per shard file (the 'ray' extra; the model saved in as many: 'ehi index shard')")
    v.add_argument("--ray", metavar="ADDRESS", help="--shards: the Ray cluster to run them on ('auto', 'ray://host:10001'; default: a local Ray)")
    v.add_argument("--shard-timeout", type=seconds_arg, default=5.0, metavar="SECONDS", help="--shards: a search whose shards have not all answered by then gets a 503 naming the shard")
    v.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                   help="Host header names the server answers, e.g. search.example.org (default: localhost, 127.0.0.1, ::1 and --host; '*' answers any)")
    v.add_argument("--docs", action="store_true", help="serve the API docs at /docs and /openapi.json")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")

    b = sub.add_parser("benchmark", help="EHI vs DE, untrained encoder and EHI encoder + exact / Faiss-IVF / ScaNN, several seeds, report and plots")
    b.add_argument("--data", required=True, help="BEIR folder or name")
    b.add_argument("--out", required=True, help="folder for results.json, report.md and the plots")
    b.add_argument("--seeds", type=positive_arg, default=3, help="training seeds per method")
    b.add_argument("--split", default="test", help="qrels split to report on")
    b.add_argument("--config", help="JSON file with config overrides for EHI (and so for the DE baseline)")
    b.add_argument("--budgets", type=budget_arg, nargs="+", help="fractions of the corpus to visit (default 1%% 2%% 5%% 10%% 20%% ... 100%%)")
    b.add_argument("--ablation", action="append", default=[], choices=sorted(ABLATIONS), help="add an EHI ablation row (repeatable)")
    b.add_argument("--unsupervised", action="store_true", help="EHI trained without qrels against Faiss-IVF and ScaNN; neighbour recall beside R@100")
    b.add_argument("--device", type=device_arg, help="cpu, cuda, ... (training)")
    b.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    return p


def _config_from_args(args):
    from ehi.config import EHIConfig

    if getattr(args, "unsupervised", False):  # its defaults, then the user's --config and flags
        from ehi.training.unsupervised import unsupervised_config

        cfg = unsupervised_config()
    else:
        cfg = EHIConfig()
    if args.config:
        try:
            cfg = EHIConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
            raise ValueError(f"--config {args.config}: {e}") from None
    mapping = {
        "epochs": ("train", "epochs"),
        "batch_size": ("train", "batch_size"),
        "branching": ("tree", "branching"),
        "height": ("tree", "height"),
        "init": ("tree", "init"),
        "load_balance": ("train", "load_balance"),
        "scope": ("encoder", "scope"),
        "top_k_layers": ("encoder", "top_k_layers"),
        "model": ("encoder", "model_name"),
        "encoder_backend": ("encoder", "backend"),
        "hard_negatives": ("train", "hard_negatives"),
        "refresh_every": ("train", "refresh_every"),
        "d2l": ("index", "d2l"),
        "codec": ("index", "codec"),
        "router": ("index", "router"),
        "seed": ("train", "seed"),
        "device": ("train", "device"),
        "val_fraction": ("train", "val_fraction"),
        "val_split": ("train", "val_split"),
        "val_group": ("train", "val_group"),
    }
    for arg, (section, name) in mapping.items():
        v = getattr(args, arg, None)
        if v is not None:
            setattr(getattr(cfg, section), name, v)
    if getattr(args, "no_refit", False):
        cfg.train.val_refit = False
    return cfg.validate()
