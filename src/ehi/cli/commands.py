"""One function per ``ehi`` command: read the arguments, make the API calls, print."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ehi.cli.args import LOCAL_RAY
from ehi.cli.parser import _config_from_args
from ehi.data import read_ids, read_queries, write_trec_run


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
    from ehi.artifacts import check_target
    from ehi.data import embeddings_dataset, load_beir
    from ehi.evaluation.evaluate import BUDGET_RULE, evaluate_model, format_table
    from ehi.training.distributed import is_main
    from ehi.training.trainer import Trainer, checkpoint_path, leaf_report

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
    from ehi.data import embeddings_dataset, load_beir
    from ehi.evaluation.evaluate import (
        BUDGET_RULE,
        evaluate_model,
        format_table,
        has_qrels,
    )
    from ehi.training.distributed import is_main
    from ehi.training.trainer import leaf_report
    from ehi.training.unsupervised import train_unsupervised

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


def cmd_index(args) -> None:
    from ehi.artifacts import check_target
    from ehi.data import load_beir, load_corpus
    from ehi.model.ehi_model import EHIModel
    from ehi.training.trainer import leaf_report

    if args.index_command == "remove":
        ids = read_ids(args.ids)
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


def cmd_search(args) -> None:
    from ehi.limits import check_query
    from ehi.model.ehi_model import EHIModel

    if args.queries and args.query:
        raise ValueError("give a query or --queries FILE, not both")
    if args.queries:
        pairs = read_queries(args.queries)
    elif args.query:
        pairs = [("1", check_query(" ".join(args.query)))]  # the server's rule, before loading anything
    else:
        raise ValueError("give a query (its words are one query) or --queries FILE")
    if args.run and Path(args.run).is_dir():
        raise ValueError(f"--run {args.run}: is a folder; give a file path")
    allowed = read_ids(args.ids) if args.ids else None
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
    from ehi.budget import DEFAULT_BUDGET, describe_width

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
    from ehi.encode.cache import cache_dir, cache_limit, cache_usage, clear_cache

    if args.cache_command == "clear":
        n, size = clear_cache()
        print(f"deleted {n} files ({size / 2**20:.1f} MiB) from {cache_dir()}")
        return
    n, size = cache_usage()
    print(f"{cache_dir()}: {n} files, {size / 2**20:.1f} MiB (limit {cache_limit() / 2**30:g} GiB, EHI_CACHE_MAX_GB)")


def cmd_evaluate(args) -> None:
    from ehi.data import load_beir
    from ehi.evaluation.evaluate import (
        BUDGET_RULE,
        BUDGETS,
        evaluate_model,
        evaluate_run,
        format_table,
        format_touch_table,
        has_qrels,
        split_by_touch,
    )
    from ehi.model.ehi_model import EHIModel

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
            from ehi.artifacts import write_file_atomic

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
        from ehi.artifacts import write_file_atomic

        write_file_atomic(args.json, json.dumps([r.to_dict() for r in rows], indent=2))


def cmd_benchmark(args) -> None:
    _need("bench", "scann", "matplotlib")
    from ehi.benchmark.run import run_benchmark
    from ehi.data import load_beir
    from ehi.evaluation.evaluate import BUDGETS

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
    from ehi.artifacts import write_file_atomic
    from ehi.data import load_beir
    from ehi.training.tuning import format_trial, tune

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
    from ehi.server import serve

    if args.ray and not args.shards:
        raise ValueError("--ray runs the shards of --shards S; give --shards too")
    if args.shards:
        _need("ray", "ray")
    serve(args.model, args.host, args.port, args.log_level, backend=args.encoder_backend, max_wait_ms=args.max_wait_ms, shards=args.shards, ray_address=args.ray,
          shard_timeout=args.shard_timeout, allowed_hosts=args.allowed_hosts, docs=args.docs, router=args.router)
