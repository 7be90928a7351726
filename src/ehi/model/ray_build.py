"""Embed and route a corpus over Ray Data workers (``ehi index build --ray``): each worker
loads the model once from its safetensors bytes and returns embeddings and leaves, in input
order, exactly as one process would compute them."""

from __future__ import annotations

import os
import re

import numpy as np

from ehi.ray_session import connect, proc_bytes, quiet_data, ray_module

# Ray's core worker logs (C++, to fd 2) that Ray Data's own actor pool keeps its constructor
# arguments in the object store: a fact about Ray's internals the user cannot act on
_POOL_NOISE = re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker.*constructor arguments in the object store")


def _weights(model) -> bytes:
    """The trained tensors a worker needs (safetensors bytes: no pickle of the model)."""
    from safetensors.torch import save

    from ehi.model.persistence import joint_state

    return save(joint_state(model.encoder, model.tree))


class _EmbedRoute:
    """A Ray Data worker: the encoder and the tree's router loaded once, then each batch
    embedded and routed (``EHIModel.embed_corpus`` and ``route``, on a share of the rows)."""

    def __init__(self, config_json: str, weights: list, d2l: int, upper: int, device: str, threads: int):
        import json

        import torch
        from safetensors.torch import load

        from ehi.config import EHIConfig
        from ehi.encode.encoder import Encoder
        from ehi.model.persistence import split_state
        from ehi.model.tree import Tree

        torch.set_num_threads(max(1, threads))
        enc_state, tree_state = split_state(load(ray_module().get(weights[0])))
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
            "worker": np.full(n, os.getpid(), dtype=np.int64), "peak_bytes": np.full(n, proc_bytes("VmHWM"), dtype=np.int64),
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

    quiet_data(ray)
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
        "config_json": model.config.to_json(), "weights": weights, "d2l": d2l, "upper": model.router.place_upper(d2l),
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

    from ehi.progress import LONG, bars, filtered_stderr, phase

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
