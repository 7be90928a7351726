"""A sharded index served by Ray actors (``ehi serve --shards``): one actor per shard file,
memory-mapped, scanning the lists it holds. On a cluster the model folder must be on storage
every node reads (a shared file system): shard actors open their shard files from it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ehi.artifacts import ArtifactError, sha256_file
from ehi.index.leaf_index import LeafIndex
from ehi.index.shards import SHARD_TIMEOUT_S, ShardUnavailable, check_shard_lists, open_shard, sharded_index
from ehi.ray_session import connect, proc_bytes, ray_module


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
        return {"shard": self.shard, "pid": os.getpid(), "rss_bytes": proc_bytes("VmRSS"), "peak_bytes": proc_bytes("VmHWM")}

    def scan(self, q, leaves, fetch, allowed, n):
        return self.index.scan(q, leaves, fetch, allowed, n)


class RemoteShard:
    """A shard actor as ``ShardedLists`` sees it: scans start at once and are waited for with
    a deadline; a dead, restarting or late actor becomes ``ShardUnavailable`` naming it."""

    def __init__(self, actor, number: int, count: int):
        self.actor, self.number, self.count = actor, number, count

    def submit(self, q, leaves, fetch, allowed, n):
        ray = ray_module()
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
        return ray_module().get(self.actor.ready.remote(), timeout=timeout)

    def close(self) -> None:
        ray_module().kill(self.actor, no_restart=True)


def serve_shards(
    folder: Path, base, leaf_shard: np.ndarray, files: list[str], digests: list[str], address: str | None = None,
    timeout: float = SHARD_TIMEOUT_S, start_timeout: float = 600, cpus_per_shard: float | None = None,
) -> LeafIndex:
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
    index = sharded_index(base, leaf_shard, shards, timeout)
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


def shard_memory(index: LeafIndex) -> list[int]:
    """Resident bytes of each shard's actor process (what it holds after its scans so far)."""
    return [int(s.info()["rss_bytes"]) for s in index.lists.shards]
