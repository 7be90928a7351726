"""Command line: ``ehi train | tune | evaluate | search | index | serve | benchmark | cache``, mirroring the Python API."""

from __future__ import annotations

import argparse
import re
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .benchmark import ABLATIONS  # noqa: E402
from .config import BACKENDS, ROUTERS  # noqa: E402
from .limits import MAX_K  # noqa: E402


def _budget(text: str) -> float:
    try:
        v = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1] (or 0-100%), got {text!r}")
    return v


def _device(text: str) -> str:
    """cpu, cuda or cuda:N, and a GPU only where torch sees one: checked before any work."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        idx = int(text.split(":")[1]) if ":" in text else 0
        if idx >= n:
            raise argparse.ArgumentTypeError(f"{text}: no such GPU here (torch sees {n})")
    return text


def _int_in(text: str, lo: int, hi: int | None = None) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {v}" if hi is not None else f"must be >= {lo}, got {v}")
    return v


def _float_in(text: str, ok, bounds: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text!r}")
    return v


def _ms(text: str) -> float:
    return _float_in(text, lambda v: 0 <= v <= 1000, "0..1000 ms")


def _seconds(text: str) -> float:
    return _float_in(text, lambda v: 0 < v <= 3600, "(0, 3600] seconds")


def _port(text: str) -> int:
    return _int_in(text, 0, 65535)


def _positive(text: str) -> int:
    return _int_in(text, 1)


def _k(text: str) -> int:
    return _int_in(text, 1, MAX_K)


def _int_nonneg(text: str) -> int:
    return _int_in(text, 0)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless the help already says it or there is none
    to say (None / False: the config's value, or off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


BACKEND_HELP = ("what runs the frozen transformer: auto (ONNX Runtime where it can: the adapter scope on the CPU; else torch), "
                "torch, onnx (same embeddings, faster) or onnx-int8 (quantized: faster, a little less exact)")
def _backend_override(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder-backend", choices=BACKENDS, help=BACKEND_HELP + " (default: the model's)")


REPARTITION_HELP = ("then re-draw the leaves as k-means over every document (replaces the learned partition): for documents "
                    "unlike the trained ones, e.g. a new topic, which the trained leaves have no room for")
ROUTER_HELP = ("how a search picks its leaves: spread (each leaf's mean and spread of its documents' inner products with the "
               "query; routes questions about documents no training query touched) or tree (the learned tree; cheaper per query)")


def _router_option(p: argparse.ArgumentParser, saved: bool) -> None:
    p.add_argument("--router", choices=ROUTERS, help=ROUTER_HELP + (" (saved in the model; default spread)" if saved else " (default: the model's)"))


class _Parser(argparse.ArgumentParser):
    """Every parser, subcommands' included (argparse makes them of their parent's class),
    shows option defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


LOCAL_RAY = "local"  # --ray without an address: a Ray started on this machine
NO_PROGRESS = "no progress bars, even on a terminal (a line per phase still says what runs; bars are drawn only on a terminal anyway)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="ehi", description="End-to-end Hierarchical Indexing for dense retrieval")
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
    t.add_argument("--neighbours", type=_positive, default=100, help="--unsupervised: exact neighbours per pseudo-query (default 100)")
    t.add_argument("--config", help="JSON file with config overrides, same layout as a saved config.json")
    t.add_argument("--epochs", type=int, help="training epochs (config default 20)")
    t.add_argument("--batch-size", type=int, help="query-document pairs per step")
    t.add_argument("--branching", "-B", type=int, help="children per node (B)")
    t.add_argument("--height", "-H", type=int, help="tree height (H)")
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
    _router_option(t, saved=True)
    t.add_argument("--seed", type=int, help="random seed (config default 0)")
    t.add_argument("--device", type=_device, help="cpu, cuda, cuda:1, ...")
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
    u.add_argument("--folds", type=_positive, default=2, help="held-out draws per candidate (default 2)")
    u.add_argument("--device", type=_device, help="cpu, cuda, ...")
    u.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    i = sub.add_parser("index", help="build, add to or remove from a trained model's index")
    isub = i.add_subparsers(dest="index_command", required=True)
    ib = isub.add_parser("build", help="index a corpus with a trained model")
    ib.add_argument("model", help="model directory")
    ib.add_argument("--data", required=True, help="BEIR folder whose corpus.jsonl is indexed")
    ib.add_argument("--d2l", type=_positive, help="leaves each document is stored in (default: the model's)")
    ib.add_argument("--codec", choices=["flat", "sq8", "pq"], help="how vectors are stored: flat (float32), sq8 (1 byte/dim), pq (pq-m bytes)")
    ib.add_argument("--pq-m", type=_positive, help="pq: one-byte sub-quantizers per vector; must divide the dimension (default dim/8)")
    ib.add_argument("--rerank", type=_int_nonneg, help="pq: re-rank this many candidates exactly from the float vectors (0 = off)")
    ib.add_argument("--out", help="write the changed model here (a new folder; an ehi model there needs --overwrite)")
    ib.add_argument("--overwrite", action="store_true", help="replace the model at --out, or without --out the model itself")
    ib.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    ib.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                    help="embed and route on Ray workers (the 'ray' extra): the cluster at ADDRESS ('auto', 'ray://host:10001'), or a local Ray without one")
    ib.add_argument("--workers", type=_positive, default=2, help="--ray: workers that each load the model once and embed and route a share of the corpus")
    ib.add_argument("--shards", type=_positive, help="save the lists as this many shard files, leaves balanced by documents, for 'ehi serve --shards' (default: the model's, 1)")
    _backend_override(ib)
    _router_option(ib, saved=True)
    ib.add_argument("--repartition", action="store_true", help=REPARTITION_HELP)
    ih = isub.add_parser("shard", help="re-save a model's index as S shard files (no re-encoding), for 'ehi serve --shards S'")
    ih.add_argument("model", help="model directory")
    ih.add_argument("--shards", type=_positive, required=True, help="shard files; 1 joins them back into index.faiss")
    ih.add_argument("--out", help="write the changed model here (a new folder; an ehi model there needs --overwrite)")
    ih.add_argument("--overwrite", action="store_true", help="replace the model at --out, or without --out the model itself")

    ia = isub.add_parser("add", help="route new documents into their leaves (no retraining)")
    ia.add_argument("model", help="model directory")
    ia.add_argument("corpus", help="corpus.jsonl of the new documents")
    ia.add_argument("--out", help="write the changed model here (a new folder; an ehi model there needs --overwrite)")
    ia.add_argument("--overwrite", action="store_true", help="replace the model at --out, or without --out the model itself")
    ia.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    _backend_override(ia)
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
    s.add_argument("-k", type=_k, default=10, help=f"hits per query, at most {MAX_K}")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--beam", type=_positive, help="leaves to visit")
    g.add_argument("--budget", type=_budget, help="fraction of the corpus to visit, e.g. 0.1 or 10%%: the beam whose mean on training queries is within it (default 10%%)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--ids", help="text file, one document id per line: only these may be returned (the best k of them are found)")
    s.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    _backend_override(s)
    _router_option(s, saved=False)

    e = sub.add_parser("evaluate", help="metrics against fraction visited, with exact search and Faiss-IVF; or score a run file")
    e.add_argument("model", nargs="?", help="model directory (not with --run)")
    e.add_argument("--data", required=True, help="BEIR folder or name whose qrels judge")
    e.add_argument("--split", default="test", help="qrels split to evaluate on")
    e.add_argument("--run", help="score this TREC run file (e.g. from 'ehi search --run') against the split's qrels instead of a model")
    e.add_argument("--budgets", type=_budget, nargs="+", help="fractions (default 1%% 2%% 5%% 10%% 20%% ... 100%%)")
    e.add_argument("-k", type=_k, default=100, help=f"documents retrieved per query, at most {MAX_K}")
    e.add_argument("--no-baselines", action="store_true", help="only the model, without exact search and Faiss-IVF over its encoder")
    e.add_argument("--train-split", default="train",
                   help="the qrels split the model was trained on: Recall@100 is also reported apart for queries whose relevant documents its queries touch and for those they do not")
    e.add_argument("--json", help="write every row to this JSON file")
    e.add_argument("--strict", action="store_true", help="qrels naming unknown queries or documents are errors")
    e.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    _backend_override(e)
    _router_option(e, saved=False)

    c = sub.add_parser("cache", help="the feature cache: size, or clear it")
    c.add_argument("cache_command", choices=["info", "clear"], help="info: files and size; clear: delete them")

    v = sub.add_parser("serve", help="HTTP search service with a web page")
    v.add_argument("model", help="model directory (opened memory-mapped, read-only)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=_port, default=8000, help="port to listen on")
    _backend_override(v)
    _router_option(v, saved=False)
    v.add_argument("--max-wait-ms", type=_ms, default=2.0,
                   help="under load (the previous batch held several requests), how long a micro-batch waits for more; "
                   "a lone request never waits (0: never wait)")
    v.add_argument("--shards", type=_positive,
                   help="serve the index from this many Ray actors, one per shard file (the 'ray' extra; the model saved in as many: 'ehi index shard')")
    v.add_argument("--ray", metavar="ADDRESS", help="--shards: the Ray cluster to run them on ('auto', 'ray://host:10001'; default: a local Ray)")
    v.add_argument("--shard-timeout", type=_seconds, default=5.0, metavar="SECONDS", help="--shards: a search whose shards have not all answered by then gets a 503 naming the shard")
    v.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                   help="Host header names the server answers, e.g. search.example.org (default: localhost, 127.0.0.1, ::1 and --host; '*' answers any)")
    v.add_argument("--docs", action="store_true", help="serve the API docs at /docs and /openapi.json")
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")

    b = sub.add_parser("benchmark", help="EHI vs DE, untrained encoder and EHI encoder + exact / Faiss-IVF / ScaNN, several seeds, report and plots")
    b.add_argument("--data", required=True, help="BEIR folder or name")
    b.add_argument("--out", required=True, help="folder for results.json, report.md and the plots")
    b.add_argument("--seeds", type=_positive, default=3, help="training seeds per method")
    b.add_argument("--split", default="test", help="qrels split to report on")
    b.add_argument("--config", help="JSON file with config overrides for EHI (and so for the DE baseline)")
    b.add_argument("--budgets", type=_budget, nargs="+", help="fractions of the corpus to visit (default 1%% 2%% 5%% 10%% 20%% ... 100%%)")
    b.add_argument("--ablation", action="append", default=[], choices=sorted(ABLATIONS), help="add an EHI ablation row (repeatable)")
    b.add_argument("--unsupervised", action="store_true", help="EHI trained without qrels against Faiss-IVF and ScaNN; neighbour recall beside R@100")
    b.add_argument("--device", type=_device, help="cpu, cuda, ... (training)")
    b.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    return p


def _config_from_args(args):
    from .config import EHIConfig

    if getattr(args, "unsupervised", False):  # its defaults, then the user's --config and flags
        from .unsupervised import unsupervised_config

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


def _load_matrix(path: str, flag: str):
    import numpy as np

    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: cannot read a .npy array ({e})") from None
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{flag} {path}: expected a 2-d float array, got {x.dtype} {x.shape}")
    return x


def cmd_train(args) -> None:
    from .data import embeddings_dataset, load_beir
    from .evaluation import BUDGET_RULE, evaluate_model, format_table
    from .distributed import is_main
    from .training import Trainer, checkpoint_path, leaf_report

    from .artifacts import check_target

    cfg = _config_from_args(args)
    # before any work: never replace a user's file or folder, nor a model without --overwrite
    check_target(args.out, overwrite=args.overwrite)
    check_target(checkpoint_path(args.out), overwrite=True)
    if args.unsupervised:
        return _train_unsupervised(args, cfg)
    args.split = args.split or "train"
    byo = [args.doc_embeddings, args.query_embeddings, args.pairs]
    if any(byo):
        if not all(byo) or args.data:
            raise ValueError("--doc-embeddings, --query-embeddings and --pairs go together, without --data")
        d_emb, q_emb = _load_matrix(args.doc_embeddings, "--doc-embeddings"), _load_matrix(args.query_embeddings, "--query-embeddings")
        ds = embeddings_dataset(len(d_emb), len(q_emb), args.pairs, args.split)
    elif not args.data:
        raise ValueError("give --data, or --doc-embeddings with --query-embeddings and --pairs")
    else:
        d_emb = q_emb = None
        ds = load_beir(args.data)
    ds.check_qrels(args.split, strict=args.strict)  # fail on bad qrels before any work
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ds, args.split, doc_embeddings=d_emb, query_embeddings=q_emb)
    model = trainer.run(args.out, resume=args.resume, progress=is_main(), log=print, keep_checkpoint=args.keep_checkpoint)
    if not is_main():
        return  # rank 0 writes the artifacts and reports
    total = time.perf_counter() - t0
    print(f"saved {args.out}  ({len(trainer.train_set.query_ids)} queries, {len(trainer.train_set.pairs)} pairs)")
    print(
        "time (peak RSS): "
        + ", ".join(f"{k} {v:.1f}s ({trainer.peak_rss[k]:.2f} GiB)" for k, v in trainer.timings.items())
        + f"; total {total:.1f}s"
    )
    print(leaf_report(model, model.encoder.embed_all(trainer.q_feats)))
    if model.validation:
        v = model.validation
        print(f"validation on {v['held_out']}: {v['why']}")
        if v.get("refit"):
            print(f"refit on all {v['refit']['queries']} training queries for {v['refit']['epochs']} epochs")
        rf = v.get("route_fit")
        if rf and rf.get("scores"):
            scores = " ".join(f"{k}:{s:.2f}" for k, s in rf["scores"].items())
            print(f"router fit: held-out score by shrink factor {scores} (0 = unfitted); kept {rf['kept']:g}")
    if args.evaluate and d_emb is None:
        rows = evaluate_model(model, ds, "test")
        print(f"\nSciFact-style evaluation on split 'test'; budget rule: {BUDGET_RULE}\n")
        print(format_table(rows))


def _train_unsupervised(args, cfg) -> None:
    from .data import embeddings_dataset, load_beir
    from .distributed import is_main
    from .evaluation import BUDGET_RULE, evaluate_model, format_table, has_qrels
    from .training import leaf_report
    from .unsupervised import train_unsupervised

    if args.pairs:
        raise ValueError("--pairs are labels: --unsupervised trains without them")
    if args.doc_embeddings:
        if args.data:
            raise ValueError("--doc-embeddings and --data: give one")
        d_emb = _load_matrix(args.doc_embeddings, "--doc-embeddings")
        q_emb = _load_matrix(args.query_embeddings, "--query-embeddings") if args.query_embeddings else None
        if q_emb is not None and q_emb.shape[1] != d_emb.shape[1]:
            raise ValueError(f"--query-embeddings {args.query_embeddings}: dimension {q_emb.shape[1]}, documents have {d_emb.shape[1]}")
        ds, query_ids = embeddings_dataset(len(d_emb)), None
    elif args.query_embeddings:
        raise ValueError("--query-embeddings needs --doc-embeddings")
    elif not args.data:
        raise ValueError("give --data, or --doc-embeddings (and optionally --query-embeddings)")
    else:
        d_emb = q_emb = None
        ds = load_beir(args.data)
        query_ids = None
        if args.split:  # only the ids of the split's queries; its judgements are not used
            query_ids = sorted(q for q in ds.split(args.split) if q in ds.queries)
            if not query_ids:
                raise ValueError(f"--split {args.split}: none of its query ids is in {ds.root / 'queries.jsonl'}")
    t0 = time.perf_counter()
    model, trainer = train_unsupervised(
        ds, cfg, args.out, source=args.pseudo_queries, query_ids=query_ids, neighbours=args.neighbours,
        doc_embeddings=d_emb, query_embeddings=q_emb, progress=is_main(), resume=args.resume,
        log_fn=print, keep_checkpoint=args.keep_checkpoint,
    )
    if not is_main():
        return
    print(f"saved {args.out}  ({len(trainer.train_set.query_ids)} pseudo-queries trained on, {len(ds.corpus)} documents)")
    print("time (peak RSS): " + ", ".join(f"{k} {v:.1f}s ({trainer.peak_rss[k]:.2f} GiB)" for k, v in trainer.timings.items())
          + f"; total {time.perf_counter() - t0:.1f}s")
    print(leaf_report(model, model.encoder.embed_all(trainer.q_feats)))
    if model.validation:
        print(f"validation (neighbour recall of held-out pseudo-queries) on {model.validation['held_out']}: {model.validation['why']}")
    if args.evaluate and d_emb is None:
        rows = evaluate_model(model, ds, "test")
        what = "qrels and neighbour recall" if has_qrels(ds, "test") else "neighbour recall (no test qrels)"
        print(f"\nevaluation on split 'test' ({what}); budget rule: {BUDGET_RULE}\n")
        print(format_table(rows))


def _read_ids(file: str) -> list[str]:
    path = Path(file)
    try:
        ids = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if not ids:
        raise ValueError(f"{path}: no ids")
    return ids


def cmd_index(args) -> None:
    from .data import load_beir, load_corpus
    from .model import EHIModel
    from .training import leaf_report

    from .artifacts import check_target

    if args.index_command == "remove":
        ids = _read_ids(args.ids)
    # before any work: never a user's file or folder, and no model replaced unless asked
    if args.out:
        check_target(args.out, overwrite=args.overwrite)
    elif not args.overwrite:
        raise ValueError(f"this would rewrite {args.model} in place; pass --overwrite to do so, or --out NEW_DIR to keep it")
    if getattr(args, "ray", None):
        _need("ray", "ray")
    model = EHIModel.load(args.model, device=getattr(args, "device", "cpu"), backend=getattr(args, "encoder_backend", None))
    before = leaf_report(model) if model.index is not None else None
    if args.index_command == "build":
        corpus = load_beir(args.data).corpus
        if args.router:
            model.set_index_options(router=args.router)
        address = None if args.ray in (None, LOCAL_RAY) else args.ray
        model.index_corpus(
            corpus, d2l=args.d2l, codec=args.codec, pq_m=args.pq_m, rerank=args.rerank, shards=args.shards,
            workers=args.workers if args.ray else None, ray_address=address,
        )
        on = f" on {args.workers} Ray workers" if args.ray else ""
        what = f"indexed {len(corpus)} documents{on}"
    elif args.index_command == "shard":
        if model.index is None:
            raise ValueError(f"{args.model}: the model has no index to shard; run 'ehi index build' first")
        model.set_index_options(shards=args.shards)
        what = f"saved the index in {args.shards} shard{'s' * (args.shards > 1)}"
    elif args.index_command == "add":
        new = load_corpus(args.corpus)
        model.add_corpus(new)
        what = f"added {len(new)} documents"
    else:
        known = set(model.doc_ids)
        unknown = [i for i in ids if i not in known]
        if unknown and args.strict:
            raise ValueError(f"{args.ids}: {len(unknown)} ids are not indexed (first: {unknown[0]!r})")
        if unknown:
            print(f"warning: {len(unknown)} ids are not indexed (ignored)", file=sys.stderr)
        removed = model.remove_documents(ids)
        if not removed:
            print(f"nothing to remove: none of the ids is indexed; {args.model} left unchanged", file=sys.stderr)
            return
        what = f"removed {removed} documents"
    out = args.out or args.model
    if getattr(args, "repartition", False):
        model.repartition()
        what += ", leaves re-drawn as k-means over every document"
    model.save(out)
    print(f"{what}; {model.index.num_docs} documents in {out}")
    if model.config.index.shards > 1:
        shard_map = json.loads((Path(out) / "shards.json").read_text())
        print(f"shards: {model.config.index.shards}, documents per shard {shard_map['documents']}")
    changed = before and args.index_command in ("add", "remove")
    if changed:
        print(f"before: {before}")
    print(f"{'after: ' if changed else ''}{leaf_report(model)}")


def _read_queries(file: str) -> list[tuple[str, str]]:
    """(id, text) pairs of a query file: BEIR queries.jsonl, 'id<TAB>text' lines, or one text
    per line (its line number is its id)."""
    from .limits import check_query

    path = Path(file)
    if path.suffix == ".jsonl":
        from .data import load_queries

        pairs = list(load_queries(path).items())
    else:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read ({e})") from None
        pairs = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            qid, tab, text = line.partition("\t")
            pairs.append((qid.strip(), text) if tab else (str(n), line))
    if not pairs:
        raise ValueError(f"{path}: no queries")
    for qid, text in pairs:
        try:
            check_query(text)
        except ValueError as e:
            raise ValueError(f"{path}: query {qid!r}: {e}") from None
    return pairs


def write_trec_run(path: str, qids: list[str], results, tag: str = "ehi") -> Path:
    """``qid Q0 docid rank score tag`` lines: the TREC run format trec_eval, ir-measures and
    ranx read (document ids with whitespace cannot be written in it)."""
    from .artifacts import write_file_atomic

    lines = []
    for qid, r in zip(qids, results):
        for rank, h in enumerate(r.hits, 1):
            if any(c.isspace() for c in h.doc_id + qid):
                raise ValueError(f"--run {path}: id {h.doc_id if any(c.isspace() for c in h.doc_id) else qid!r} holds whitespace, which a TREC run cannot")
            lines.append(f"{qid} Q0 {h.doc_id} {rank} {h.score:.6f} {tag}\n")
    return write_file_atomic(path, "".join(lines))


def cmd_search(args) -> None:
    from .limits import check_query
    from .model import EHIModel

    if args.queries and args.query:
        raise ValueError("give a query or --queries FILE, not both")
    if args.queries:
        pairs = _read_queries(args.queries)
    elif args.query:
        pairs = [("1", check_query(" ".join(args.query)))]  # the server's rule, before loading anything
    else:
        raise ValueError("give a query (its words are one query) or --queries FILE")
    if args.run and Path(args.run).is_dir():
        raise ValueError(f"--run {args.run}: is a folder; give a file path")
    allowed = _read_ids(args.ids) if args.ids else None
    model = EHIModel.load(args.model, device=args.device, mmap=True, backend=args.encoder_backend, router=args.router)
    if model.index is None:
        raise ValueError(f"{args.model}: the model has no index; run 'ehi index build' first")
    qids, texts = [q for q, _ in pairs], [t for _, t in pairs]
    results = model.search(texts, k=args.k, beam=args.beam, budget=args.budget, ids=allowed)
    if args.run:
        out = write_trec_run(args.run, qids, results)
        print(f"wrote {len(results)} queries' hits to {out}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return
    if args.run and len(results) > 1:
        return
    for r in results:
        print(f"query: {r.query}\n{search_line(model, r, args)}")
        for rank, h in enumerate(r.hits, 1):
            print(f"{rank:>3}. {h.score:.4f}  {h.doc_id}  {h.title[:90]}")


def search_line(model, r, args) -> str:
    """What a search cost, and why: the budget is a calibrated mean, not a cap per query."""
    from .budget import DEFAULT_BUDGET, describe_width

    visited = f"visited {r.visited} documents ({100 * r.fraction_visited:.1f} %)"
    if r.strategy == "exact":
        return f"{visited}: every allowed document scored exactly (the filter allows no more than the budget scores)"
    where = f"in {len(r.leaves)} leaves"
    if args.beam is not None:
        why = f"beam {args.beam}"
    else:
        b = args.budget if args.budget is not None else DEFAULT_BUDGET
        why = describe_width(model.beam_calibration, b, model.resolve_beam(None, args.budget))
    if r.strategy == "filtered":
        return f"{visited} {where} ({why}; allowed documents only, leaves added in beam order until {args.k} were found)"
    return f"{visited} {where} ({why})"


def cmd_cache(args) -> None:
    from .encoder import cache_dir, cache_limit, cache_usage, clear_cache

    if args.cache_command == "clear":
        n, size = clear_cache()
        print(f"deleted {n} files ({size / 2**20:.1f} MiB) from {cache_dir()}")
        return
    n, size = cache_usage()
    print(f"{cache_dir()}: {n} files, {size / 2**20:.1f} MiB (limit {cache_limit() / 2**30:g} GiB, EHI_CACHE_MAX_GB)")


def cmd_evaluate(args) -> None:
    from .data import load_beir
    from .evaluation import BUDGET_RULE, BUDGETS, evaluate_model, evaluate_run, format_table, format_touch_table, has_qrels, split_by_touch
    from .model import EHIModel

    if bool(args.run) == bool(args.model):
        raise ValueError("give a model directory or --run FILE (one of them)")
    ds = load_beir(args.data)
    judged = has_qrels(ds, args.split)
    if args.run:
        if not judged:
            raise ValueError(f"--run needs qrels: {ds.root / 'qrels' / (args.split + '.tsv')} not found")
        ds.check_qrels(args.split, strict=args.strict)
        metrics, n = evaluate_run(args.run, ds, args.split)
        print(f"{args.run}: {n} judged queries of split {args.split!r}")
        print("  ".join(f"{m} {v:.1f}" for m, v in metrics.items()))
        if args.json:
            from .artifacts import write_file_atomic

            write_file_atomic(args.json, json.dumps({"run": args.run, "split": args.split, "queries": n, "metrics": metrics}, indent=2))
        return
    model = EHIModel.load(args.model, device=args.device, backend=args.encoder_backend, router=args.router)
    if judged:
        ds.check_qrels(args.split, strict=args.strict)
    else:
        print(f"no qrels for split {args.split!r}: neighbour recall only, over all {len(ds.queries)} queries", file=sys.stderr)
    if ds.corpus.fingerprint() != model.corpus_fingerprint:
        print(f"warning: {args.data} corpus differs from the indexed one; run 'ehi index' first", file=sys.stderr)
    rows = evaluate_model(model, ds, args.split, tuple(args.budgets or BUDGETS), args.k, not args.no_baselines, train_split=args.train_split)
    print(f"split {args.split!r}, {model.tree.num_leaves} leaves; budget rule: {BUDGET_RULE}\n")
    print(format_table(rows))
    groups = split_by_touch(ds, sorted(ds.relevant(args.split)), args.split, args.train_split) if judged else None
    if groups:
        print("\n" + format_touch_table(rows, groups))
    if args.json:
        from .artifacts import write_file_atomic

        write_file_atomic(args.json, json.dumps([r.to_dict() for r in rows], indent=2))


def cmd_benchmark(args) -> None:
    _need("bench", "scann", "matplotlib")
    from .benchmark import run_benchmark
    from .data import load_beir
    from .evaluation import BUDGETS

    cfg = _config_from_args(args)
    ds = load_beir(args.data)
    command = "ehi " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("ehi") else "ehi benchmark ..."
    res = run_benchmark(
        ds, args.out, cfg, args.seeds, args.split, tuple(args.budgets or BUDGETS), args.ablation,
        command=command, progress=True, unsupervised=args.unsupervised,
    )
    print((Path(args.out) / "report.md").read_text())
    print(f"wrote {args.out}/results.json, report.md, recall_vs_visited.png, leaf_sizes.png in {res['timings']['total']:.0f}s")


def _need(extra: str, *modules: str) -> None:
    """A clear one-line error, before any work, when an optional part is not installed."""
    import importlib.util

    def absent(m: str) -> bool:
        try:
            return importlib.util.find_spec(m) is None
        except (ImportError, ValueError):  # e.g. blocked in sys.modules
            return True

    missing = [m for m in modules if absent(m)]
    if missing:
        raise ValueError(f"needs the '{extra}' extra ({', '.join(missing)} not installed): pip install 'ehi[{extra}]'")


def cmd_tune(args) -> None:
    from .artifacts import write_file_atomic
    from .data import load_beir
    from .tuning import format_trial, tune

    cfg = _config_from_args(args)
    ds = load_beir(args.data)
    ds.check_qrels(args.split)
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a .json file path")
    t = time.perf_counter()
    chosen, trials = tune(ds, cfg, args.split, args.time_limit, args.folds, progress=True)
    print(f"\n{len(trials)} candidates in {time.perf_counter() - t:.0f}s (limit {args.time_limit:.0f}s), "
          f"each validated on held-out '{args.split}' queries, {args.folds} folds:")
    for tr in sorted(trials, key=lambda tr: -tr.score):
        print("  " + format_trial(tr))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, chosen.to_json())
    trials_path = write_file_atomic(out.with_name(out.stem + ".trials.json"), json.dumps([tr.to_dict() for tr in trials], indent=2))
    print(f"wrote {out} (ehi train --config {out}) and {trials_path}")


def cmd_serve(args) -> None:
    _need("serve", "fastapi", "uvicorn")
    from .server import serve

    if args.ray and not args.shards:
        raise ValueError("--ray runs the shards of --shards S; give --shards too")
    if args.shards:
        _need("ray", "ray")
    serve(args.model, args.host, args.port, args.log_level, backend=args.encoder_backend, max_wait_ms=args.max_wait_ms, shards=args.shards, ray_address=args.ray,
          shard_timeout=args.shard_timeout, allowed_hosts=args.allowed_hosts, docs=args.docs, router=args.router)


COMMANDS = {"cache": cmd_cache, "serve": cmd_serve, "tune": cmd_tune, "train": cmd_train, "index": cmd_index, "search": cmd_search, "evaluate": cmd_evaluate, "benchmark": cmd_benchmark}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "search" and not any(x.startswith("-") and len(x) > 1 for x in extra):
        # words after an option ('ehi search M --budget 5% protein folding') are the query's too
        args.query = [*args.query, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run parsed arguments: exit code 2 with one line for bad input, 0 otherwise."""
    from .artifacts import ArtifactError
    from .data import DataError

    for stream in (sys.stdout, sys.stderr):  # a redirected log shows each line as it happens
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    quiet = getattr(args, "no_progress", False)
    before = os.environ.get("EHI_NO_PROGRESS")
    if quiet:  # inner bars too (encoding, embedding), for this command only
        os.environ["EHI_NO_PROGRESS"] = "1"
    try:
        COMMANDS[args.command](args)
    except (DataError, ArtifactError, ValueError) as e:
        print(f"ehi {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if quiet:
            if before is None:
                os.environ.pop("EHI_NO_PROGRESS", None)
            else:
                os.environ["EHI_NO_PROGRESS"] = before
    return 0


if __name__ == "__main__":
    sys.exit(main())
