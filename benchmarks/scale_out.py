"""Scale-out on Ray at 1M synthetic vectors: the index built by Ray workers and served from S
shard actors gives exactly one process's results; what that costs on this machine.

The corpus, training sample and queries are ``scale.py``'s (1M x 384 clustered unit vectors,
bring-your-own-embeddings EHI, B = 1024 leaves). Then, in one run:

- **build**: embed (adapter) + route the 1M vectors in this process, then on a local Ray with
  1 and 2 Ray Data workers: wall time, each worker's peak resident memory, and whether leaves
  and embeddings are identical to the one-process build;
- **shards**: the model saved in S = 1, 2, 4 shard files (files, documents and bytes per shard,
  balance), then served by S Ray actors (``EHIModel.load(..., shards=S)``) and, as the
  reference, mapped in this process: batched QPS over the test queries at 1 % and 5 % of the
  corpus visited (median of interleaved repetitions), Recall@100 of each and whether every
  ranking equals the one-process one, and each shard actor's resident memory after the runs.

    python benchmarks/scale_out.py --out benchmarks/results/scale_out.json
    python benchmarks/scale_out.py --docs 100000 --out reports/scale_out_100k.json   # ~3 min
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from lib.common import write_json
from lib.synthetic import DIM, Corpus1M, near, proc_status, recall_at_100, release_memory, reset_peak, train_on_sample

from ehi.index.ray_shards import shard_memory
from ehi.model.ehi_model import EHIModel
from ehi.model.ray_build import embed_and_route
from ehi.ray_session import connect

GiB = 2**30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_model(corpus: Corpus1M, args, rng, train: bool = True):
    """scale.py's EHI: adapter + tree on training pairs and a document sample (``train``
    False: only draws what training draws, so that the test queries come out the same)."""
    train_pos = rng.choice(args.docs, size=args.train_pairs, replace=False)
    sample = np.union1d(train_pos, rng.choice(args.docs, size=min(args.sample, args.docs), replace=False))
    train_q = near(corpus.rows(train_pos), rng, args.query_spread)
    if not train:
        return None
    return train_on_sample(corpus.rows(sample), {int(d): i for i, d in enumerate(sample)}, train_pos, train_q, args)


def timed_search(model: EHIModel, q: np.ndarray, beam: int) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    res, _ = model.search_embeddings(q, 100, beam)
    return time.perf_counter() - t, res.indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--branching", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1)
    ap.add_argument("--train-pairs", type=int, default=20_000)
    ap.add_argument("--sample", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--test-queries", type=int, default=2_000)
    ap.add_argument("--query-spread", type=float, default=1.2)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the sharded models are written (default: a temporary folder, removed)")
    ap.add_argument("--keep-model", help="save the trained model (no index) here, or load it from here if it is there")
    ap.add_argument("--shard-timeout", type=float, default=600, help="seconds a shard may take for one batched search")
    ap.add_argument("--out", default="reports/scale_out.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    corpus = Corpus1M(args.docs, seed=args.seed)
    out: dict = {"docs": args.docs, "dim": DIM, "leaves": args.branching, "args": vars(args), "cpus": 2}

    t = time.perf_counter()
    kept = Path(args.keep_model) if args.keep_model else None
    if kept and (kept / "manifest.json").exists():  # a rerun: the same training, not repeated
        train_model(corpus, args, rng, train=False)
        model = EHIModel.load(kept)
        out["model_loaded_from"] = str(kept)  # train_seconds is then the load
    else:
        model = train_model(corpus, args, rng)
        if kept:
            model.save(kept)
    out["train_seconds"] = time.perf_counter() - t
    test_pos = rng.choice(args.docs, size=args.test_queries, replace=False)
    test_q = near(corpus.rows(test_pos), rng, args.query_spread)
    x = np.concatenate([c for _, c in corpus.chunks()])
    release_memory()
    print(f"trained in {out['train_seconds']:.0f}s; corpus {x.nbytes / GiB:.2f} GiB", flush=True)

    # ---- build: one process, then Ray Data workers ------------------------------------------
    builds = {}
    reset_peak()  # this process's peak from here: the corpus it holds, plus the build
    t = time.perf_counter()
    emb = model.encoder.embed_vectors(x)
    leaves = model.place(emb, 1)
    builds["one process"] = {"seconds": time.perf_counter() - t, "process_peak_gib": proc_status("VmHWM")}
    connect(num_cpus=2)
    for w in args.workers:
        stats: dict = {}
        t = time.perf_counter()
        e2, l2 = embed_and_route(model, vectors=x, d2l=1, workers=w, batch_size=4096, stats=stats)
        builds[f"Ray, {w} worker{'s' * (w > 1)}"] = {
            "seconds": time.perf_counter() - t,
            "worker_peak_gib": [b / GiB for b in stats["worker_peak_bytes"]],
            "same_leaves": bool(np.array_equal(l2, leaves)),
            "max_embedding_difference": float(np.abs(e2 - emb).max()),
        }
        del e2, l2
    out["build"] = builds
    print(f"\n{'build (embed + route 1M)':<26}{'seconds':>9}  peak memory per worker (GiB)   identical")
    for name, b in builds.items():
        peaks = b.get("worker_peak_gib", [b.get("process_peak_gib", float("nan"))])
        same = "" if "same_leaves" not in b else ("yes" if b["same_leaves"] and b["max_embedding_difference"] == 0 else f"leaves {b['same_leaves']}, emb diff {b['max_embedding_difference']:.1e}")
        print(f"{name:<26}{b['seconds']:>9.1f}  {', '.join(f'{p:.2f}' for p in peaks):<30} {same}", flush=True)

    log("building the index")
    model.build_index(emb, [str(i) for i in range(args.docs)], leaves=leaves)
    del x, emb
    release_memory()
    q = model.encoder.embed_vectors(test_q)
    model.calibrate(q[: min(len(q), 2000)])
    beams = {b: model.beam_for_budget(b) for b in args.budgets}

    # ---- shards: save, serve, compare ---------------------------------------------------------
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ehi-scale-out-"))
    rows = []
    reference = {b: timed_search(model, q, beam)[1] for b, beam in beams.items()}  # the in-memory index
    try:
        for S in args.shards:
            log(f"saving in {S} shard(s)")
            model.set_index_options(shards=S)
            t = time.perf_counter()
            folder = model.save(work / f"s{S}")
            save_s = time.perf_counter() - t
            files = sorted(folder.glob("index.faiss" if S == 1 else "shard-*.faiss"))
            log("loading: mapped in this process, and on Ray actors")
            setups = [("mapped, one process", EHIModel.load(folder, mmap=True)), (f"{S} Ray actor{'s' * (S > 1)}", EHIModel.load(folder, shards=S, shard_timeout=args.shard_timeout))]
            times: dict = {(name, b): [] for name, _ in setups for b in beams}
            same: dict = {}
            found_by: dict = {}
            for _ in range(args.reps):  # interleaved: both setups see the same machine state
                for name, m in setups:
                    for b, beam in beams.items():
                        dt, found = timed_search(m, q, beam)
                        times[(name, b)].append(dt)
                        same[(name, b)] = same.get((name, b), True) and bool(np.array_equal(found, reference[b]))
                        found_by[(name, b)] = found
            log("searched")
            served = setups[1][1].index
            mem = [m / GiB for m in shard_memory(served)]
            for name, m in setups:
                row = {
                    "shards": S, "setup": name, "save_seconds": save_s,
                    "shard_files_gib": [f.stat().st_size / GiB for f in files],
                    "shard_documents": served.shard_documents(),
                    "qps": {f"{b:g}": len(q) / statistics.median(times[(name, b)]) for b in beams},
                    "recall_at_100": {f"{b:g}": recall_at_100(found_by[(name, b)], test_pos) for b in beams},
                    "identical_to_one_index": all(same[(name, b)] for b in beams),
                }
                if "Ray" in name:
                    row["actor_resident_gib"] = mem
                rows.append(row)
            served.close()  # its actors' CPUs, for the next shard count's actors
            del setups, served, m
            release_memory()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    out["beams"] = {f"{b:g}": beam for b, beam in beams.items()}
    out["serve"] = rows

    print(f"\n{'S':>2} {'setup':<22}" + "".join(f"{'QPS@' + f'{b:.0%}':>10}{'R@100':>7}" for b in beams) + "  identical  documents per shard          actor memory (GiB)")
    for r in rows:
        cells = "".join(f"{r['qps'][f'{b:g}']:>10.0f}{r['recall_at_100'][f'{b:g}']:>7.1f}" for b in beams)
        mem = ", ".join(f"{m:.2f}" for m in r.get("actor_resident_gib", [])) or "-"
        print(f"{r['shards']:>2} {r['setup']:<22}{cells}  {'yes' if r['identical_to_one_index'] else 'NO':<9}  {str(r['shard_documents']):<26} {mem}")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
