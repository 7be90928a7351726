"""Beyond one machine, on Ray: embed and route a corpus over workers (Ray Data), and serve a
sharded index from one Ray actor per shard.

Ray is an extra (``pip install 'ehi[ray]'``); nothing else in ehi imports this module at the
top. The same code runs on a laptop (a local Ray started on first use) and on a cluster
(``address``: ``auto`` or ``ray://host:10001``). On a cluster the model folder must be on
storage every node reads (a shared file system): shard actors open their shard files from it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from .artifacts import ArtifactError, sha256_file
from .sharding import SHARD_TIMEOUT_S, ShardedIndex, ShardUnavailable, check_shard_lists, open_shard

RAY_EXTRA = "pip install 'ehi[ray]'"
# Ray's core worker logs (C++, to fd 2) that Ray Data's own actor pool keeps its constructor
# arguments in the object store: a fact about Ray's internals the user cannot act on
_POOL_NOISE = re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker.*constructor arguments in the object store")


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError(f"needs the 'ray' extra (ray not installed): {RAY_EXTRA}") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Ray, initialised once: the cluster at ``address``, else a local one (``num_cpus``)."""
    ray = _ray()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        try:
            # errors only: its notices (token authentication, progress bars off) are not ours
            ray.init(**kwargs, include_dashboard=False, log_to_driver=os.environ.get("EHI_RAY_LOGS") == "1", logging_level=logging.ERROR, configure_logging=True)
        except ConnectionError as e:
            raise ValueError(f"cannot reach the Ray cluster at {address}: {e}") from None
        logging.getLogger("ray").setLevel(logging.ERROR)
    return ray


def _quiet_data(ray) -> None:
    import warnings

    with warnings.catch_warnings():  # Ray's own context warns of its deprecated fields
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---- distributed build: embed and route over Ray Data ----------------------------------------
def _weights(model) -> bytes:
    """The trained tensors a worker needs (safetensors bytes: no pickle of the model)."""
    from safetensors.torch import save

    from .checkpoints import joint_state

    return save(joint_state(model.encoder, model.tree))


class _EmbedRoute:
    """A Ray Data worker: the encoder and the tree's router loaded once, then each batch
    embedded and routed (``EHIModel.embed_corpus`` and ``route``, on a share of the rows)."""

    def __init__(self, config_json: str, weights: list, d2l: int, upper: int, device: str, threads: int):
        import json

        import torch
        from safetensors.torch import load

        from .checkpoints import split_state
        from .config import EHIConfig
        from .encoder import Encoder
        from .tree import Tree

        torch.set_num_threads(max(1, threads))
        enc_state, tree_state = split_state(load(_ray().get(weights[0])))
        config = EHIConfig.from_dict(json.loads(config_json)).validate()
        self.encoder = Encoder(config.encoder, device=device)
        self.encoder.load_trainable(enc_state)
        self.encoder.eval()
        self.encoder.progress = False
        tree = Tree.from_state(self.encoder.dim, config.tree, tree_state, device)
        self.router, self.d2l, self.upper = tree.router(), d2l, upper

    def __call__(self, batch: dict) -> dict:
        enc = self.encoder
        if "text" in batch:
            emb = enc.embed_all(enc.features([str(t) for t in batch["text"]], use_cache=False))
        else:
            emb = enc.embed_vectors(np.array(batch["vector"], dtype=np.float32))  # Ray's arrays are read-only: a copy torch may own
        n = len(emb)
        return {
            "row": batch["row"], "embedding": emb, "leaves": self.router.leaves(emb, self.d2l, self.upper),
            # which worker, and its peak resident memory so far (the build's per-worker cost)
            "worker": np.full(n, os.getpid(), dtype=np.int64), "peak_bytes": np.full(n, _proc_bytes("VmHWM"), dtype=np.int64),
        }


def embed_and_route(
    model, texts: list[str] | None = None, vectors: np.ndarray | None = None, d2l: int = 1,
    workers: int = 2, address: str | None = None, batch_size: int = 256, gpus_per_worker: float | None = None, stats: dict | None = None,
):
    """Final embeddings (N, d) and top-``d2l`` leaves (N, d2l) of the documents' ``texts`` (or
    precomputed base ``vectors``), computed by ``workers`` Ray actors that each load the model
    once (on a GPU where the cluster has them); rows come back in input order. ``stats``, if
    given, receives each worker's peak resident bytes."""
    ray = connect(address)
    import pyarrow as pa

    _quiet_data(ray)
    n = len(texts) if texts is not None else len(vectors)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    cpus = ray.cluster_resources().get("CPU", 1)
    per_worker = max(1, int(cpus // workers))
    # at least four blocks per worker, so that the pool stays busy to the end
    block = max(1, min(10_000, -(-n // (4 * workers))))
    batch_size = min(batch_size, block)
    tables = []
    for s in range(0, n, block):
        rows = np.arange(s, min(n, s + block), dtype=np.int64)
        if texts is not None:
            tables.append(pa.table({"row": rows, "text": texts[s : s + block]}))
        else:
            from ray.data.extensions import ArrowTensorArray

            tables.append(pa.table({"row": rows, "vector": ArrowTensorArray.from_numpy(np.ascontiguousarray(vectors[s : s + block], dtype=np.float32))}))
    weights = [ray.put(_weights(model))]  # in a list: fetched by the worker, not an actor argument
    setup = {
        "config_json": model.config.to_json(), "weights": weights, "d2l": d2l, "upper": model.upper_beam(d2l),
        "device": device, "threads": per_worker,
    }

    class EmbedRoute(_EmbedRoute):  # the setup travels with the class: restartable workers
        def __init__(self):
            super().__init__(**setup)

    ds = ray.data.from_arrow(tables).map_batches(
        EmbedRoute, compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch_size, batch_format="numpy",
        num_cpus=min(per_worker, cpus / workers), num_gpus=gpus_per_worker,
    )
    emb = np.empty((n, model.encoder.dim), dtype=np.float32)
    leaves = np.empty((n, d2l), dtype=np.int64)
    seen = np.zeros(n, dtype=bool)
    peaks: dict[int, int] = {}
    from tqdm.auto import tqdm

    from .progress import LONG, bars, filtered_stderr, phase

    if n >= LONG:
        phase(f"embedding and routing {n} documents on {workers} Ray workers")
    with filtered_stderr(_POOL_NOISE) as real, tqdm(total=n, desc="embedding and routing on Ray", unit="doc", file=real, disable=not bars(n >= LONG)) as progress:
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows = b["row"]
            emb[rows], leaves[rows], seen[rows] = b["embedding"], b["leaves"].reshape(len(rows), d2l), True
            for pid in np.unique(b["worker"]):
                peaks[int(pid)] = max(peaks.get(int(pid), 0), int(b["peak_bytes"][b["worker"] == pid].max()))
            progress.update(len(rows))
    if stats is not None:
        stats["worker_peak_bytes"] = sorted(peaks.values())
    if not seen.all():
        raise RuntimeError(f"Ray returned {int(seen.sum())} of {n} documents")
    return emb, leaves


# ---- sharded serving: a Ray actor per shard --------------------------------------------------
class ShardActor:
    """Holds one shard file, memory-mapped, and scans the lists it holds."""

    def __init__(self, folder: str, name: str, shard: int, digest: str, leaf_shard: np.ndarray, sizes: np.ndarray, threads: int):
        import faiss

        path = Path(folder) / name
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path}: checksum mismatch (file corrupted or truncated)")
        faiss.omp_set_num_threads(max(1, threads))
        self.index = open_shard(path)
        check_shard_lists(self.index.ivf, name, leaf_shard, shard, sizes)
        self.shard = shard

    def ready(self) -> dict:
        return {"shard": self.shard, "pid": os.getpid(), "rss_bytes": _proc_bytes("VmRSS"), "peak_bytes": _proc_bytes("VmHWM")}

    def scan(self, q, leaves, fetch, allowed, n):
        return self.index.scan(q, leaves, fetch, allowed, n)


def _proc_bytes(field: str) -> int:
    """A memory figure of this process from /proc (VmRSS: resident now; VmHWM: its peak); 0
    where there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RemoteShard:
    """A shard actor as ``ShardedIndex`` sees it: scans start at once and are waited for with
    a deadline; a dead, restarting or late actor becomes ``ShardUnavailable`` naming it."""

    def __init__(self, actor, number: int, count: int):
        self.actor, self.number, self.count = actor, number, count

    def submit(self, q, leaves, fetch, allowed, n):
        ray = _ray()
        ref = self.actor.scan.remote(q, leaves, fetch, allowed, n)

        def result(timeout: float):
            try:
                return ray.get(ref, timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref)
                raise ShardUnavailable(self.number, self.count, f"no answer within {timeout:.1f} s") from None
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                why = "restarting" if isinstance(e, ray.exceptions.ActorUnavailableError) else "its actor died"
                raise ShardUnavailable(self.number, self.count, why) from None

        return result

    def info(self, timeout: float = 60) -> dict:
        return _ray().get(self.actor.ready.remote(), timeout=timeout)

    def close(self) -> None:
        _ray().kill(self.actor, no_restart=True)


def serve_shards(
    folder: Path, base, leaf_shard: np.ndarray, files: list[str], digests: list[str], address: str | None = None,
    timeout: float = SHARD_TIMEOUT_S, start_timeout: float = 600, cpus_per_shard: float | None = None,
) -> ShardedIndex:
    """One Ray actor per shard file (restarted by Ray when it dies), ready before this returns.
    Each asks for ``cpus_per_shard`` CPUs (default: an equal share of the cluster's) and scans
    on as many threads."""
    ray = connect(address)
    count = len(files)
    cpus = ray.cluster_resources().get("CPU", 1)
    per_shard = cpus / count if cpus_per_shard is None else cpus_per_shard
    remote = ray.remote(ShardActor).options(max_restarts=-1, max_task_retries=0, num_cpus=per_shard)
    sizes = base.leaf_sizes()
    actors = [
        remote.remote(str(Path(folder).resolve()), name, s, digest, np.asarray(leaf_shard), sizes, max(1, int(per_shard)))
        for s, (name, digest) in enumerate(zip(files, digests))
    ]
    shards = [RemoteShard(a, s, count) for s, a in enumerate(actors)]
    index = ShardedIndex(base, leaf_shard, shards, timeout)
    deadline = time.monotonic() + start_timeout
    for s in shards:
        try:
            s.info(max(0.0, deadline - time.monotonic()))
        except ray.exceptions.RayActorError as e:
            index.close()
            cause = str(e).strip().splitlines()[-1][:300]
            raise ArtifactError(f"{Path(folder) / files[s.number]}: shard {s.number} failed to start ({cause})") from None
        except ray.exceptions.GetTimeoutError:
            index.close()
            free = ray.available_resources().get("CPU", 0)
            raise ValueError(
                f"shard {s.number} of {count} was not running within {start_timeout:.0f} s: each needs {per_shard:g} CPU "
                f"and the Ray cluster has {free:g} of {cpus:g} free (other work holds them?)"
            ) from None
    return index


def shard_memory(index: ShardedIndex) -> list[int]:
    """Resident bytes of each shard's actor process (what it holds after its scans so far)."""
    return [int(s.info()["rss_bytes"]) for s in index.shards]

