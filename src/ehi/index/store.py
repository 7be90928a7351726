"""Every file of a saved index, in one place: the Faiss lists (``index.faiss``, or shard files
and ``shards.json``), the row arrays and ``documents.json``. ``open_index`` reads them back,
checked against each other, in the mode asked for: in memory, memory-mapped, as local shards
or as Ray actors; ``save_index`` writes them into a folder the model's atomic save owns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ehi.artifacts import ArtifactError
from ehi.index.leaf_index import LeafIndex, read_ivf
from ehi.index.shards import SHARD_TIMEOUT_S, check_shard_lists, merged_ivf, read_shard_map, write_shards

INDEX_FILES = ("index.faiss", "doc_leaves.npy", "doc_embeddings.npy", "documents.json")
LEGACY_INDEX_FILES = INDEX_FILES[1:]  # before the Faiss index: rebuilt from these on load
SHARDED_INDEX_FILES = ("shards.json", *LEGACY_INDEX_FILES)  # the lists in shard files (shards.py)


def save_index(index: LeafIndex, folder: Path, shards: int, ids: list[str], titles: list[str]) -> None:
    """The index's files in ``folder``: whole, or in ``shards`` shard files."""
    if shards > 1:
        write_shards(index, folder, shards)
    else:
        index.write(folder)
    (folder / "documents.json").write_text(json.dumps({"ids": ids, "titles": titles}))


def saved_layout(path: Path, listed, shards: int | None = None) -> tuple[tuple, bool]:
    """The index files a manifest lists (empty: the model has no index), and whether they are
    the legacy kind; ArtifactError when it lists only part of one, ValueError when ``shards``
    are asked of a model without an index."""
    layout = INDEX_FILES if "index.faiss" in listed else (SHARDED_INDEX_FILES if "shards.json" in listed else LEGACY_INDEX_FILES)
    indexed = [f for f in layout if f in listed]
    if indexed and len(indexed) != len(layout):
        missing = sorted(set(layout) - set(indexed))
        raise ArtifactError(f"{path / 'manifest.json'}: lists part of an index but not {', '.join(missing)}")
    if shards is not None and not indexed:
        raise ValueError(f"{path}: the model has no index to serve from shards")
    return (layout if indexed else ()), layout is LEGACY_INDEX_FILES


def open_index(
    path: Path, manifest: dict, num_leaves: int, dim: int, codec: str, pq_m: int, rerank: int, mmap: bool = False,
    shards: int | None = None, ray_address: str | None = None, shard_timeout: float = SHARD_TIMEOUT_S,
) -> tuple[LeafIndex | None, list[str], list[str], int | None]:
    """The saved index, its document ids and titles, and its shard count (None: not saved in
    shards). ``mmap``: lists and vectors mapped read-only; ``shards``: served by that many Ray
    actors at ``ray_address``. (None, [], [], None) when the model has no index."""
    listed = manifest["files"]
    layout, legacy = saved_layout(path, listed, shards)
    if not layout:
        return None, [], [], None
    leaves, emb, ids, titles = _read_rows(path, num_leaves, dim)
    if legacy:  # saved before the Faiss index: rebuilt (and written on the next save)
        return LeafIndex(leaves, np.asarray(emb), num_leaves, codec, pq_m, rerank), ids, titles, None
    shard_map = None
    if layout is SHARDED_INDEX_FILES:
        try:
            shard_map = read_shard_map(path, num_leaves, listed)
        except ValueError as e:
            raise ArtifactError(str(e)) from None
    index = _open_lists(path, shard_map, leaves, emb, num_leaves, mmap, shards, (ray_address, shard_timeout), manifest)
    if index.codec != codec:
        raise ArtifactError(f"{path / layout[0]}: holds {index.codec} codes but config.json says {codec}")
    index.rerank = rerank
    return index, ids, titles, (shard_map["count"] if shard_map else None)


def _read_rows(path: Path, num_leaves: int, dim: int):
    """The row arrays and documents, checked against each other: one line naming the file otherwise."""
    try:
        leaves = np.load(path / "doc_leaves.npy", allow_pickle=False)
        # memory-mapped: only the leaf-ordered copy the index makes stays in memory
        emb = np.load(path / "doc_embeddings.npy", allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise
        raise ArtifactError(f"{path}: unreadable index array ({e})") from None
    if emb.ndim != 2 or emb.shape[1] != dim or not np.issubdtype(emb.dtype, np.floating):
        raise ArtifactError(f"{path / 'doc_embeddings.npy'}: expected a float (N, {dim}) array, got {emb.dtype} {emb.shape}")
    if not np.isfinite(emb).all():
        raise ArtifactError(f"{path / 'doc_embeddings.npy'}: holds NaN or infinite values")
    if leaves.ndim not in (1, 2) or leaves.shape[0] != emb.shape[0] or not np.issubdtype(leaves.dtype, np.integer):
        raise ArtifactError(f"{path / 'doc_leaves.npy'}: expected {emb.shape[0]} rows of integer leaf ids, got {leaves.dtype} {leaves.shape}")
    if leaves.size and (leaves.min() < 0 or leaves.max() >= num_leaves):
        raise ArtifactError(f"{path / 'doc_leaves.npy'}: leaf ids outside 0..{num_leaves - 1}")
    try:
        docs = json.loads((path / "documents.json").read_text(encoding="utf-8"))
        ids, titles = docs["ids"], docs["titles"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path / 'documents.json'}: unreadable ({e})") from None
    if not (isinstance(ids, list) and isinstance(titles, list) and len(ids) == len(titles) == emb.shape[0]):
        raise ArtifactError(f"{path / 'documents.json'}: expected {emb.shape[0]} ids and titles, one per embedding row")
    if len(set(map(str, ids))) != len(ids):
        raise ArtifactError(f"{path / 'documents.json'}: duplicate document ids")
    return leaves, emb, [str(i) for i in ids], [str(t) for t in titles]


def _open_lists(path: Path, shard_map: dict | None, leaves, emb, num_leaves: int, mmap: bool, shards, ray, manifest) -> LeafIndex:
    """The saved lists (``shard_map``: saved in shards): whole, merged from its shard files, or
    served by its shards (in this process when mapped, or by Ray actors with ``shards``)."""
    sharded = shard_map is not None
    count = shard_map["count"] if sharded else 1
    if shards is not None and shards != count:
        raise ValueError(
            f"{path}: saved in {count} shard{'s' * (count > 1)}, not {shards}: run 'ehi index shard {path} --shards {shards} --overwrite' first"
        )
    try:
        if not sharded and shards is None:
            return LeafIndex.read(path, leaves, emb if mmap else np.asarray(emb), num_leaves, mmap=mmap)
        if sharded and shards is None and not mmap:
            return LeafIndex.read(path, leaves, np.asarray(emb), num_leaves, ivf=merged_ivf(path, shard_map))
        files = shard_map["files"] if sharded else ["index.faiss"]
        first = read_ivf(path / files[0], mmap=True)
        base = LeafIndex.read(path, leaves, emb, num_leaves, mmap=True, ivf=first, check_lists=not sharded)
        leaf_shard = shard_map["leaf_shard"] if sharded else np.zeros(num_leaves, dtype=np.int64)
        if shards is None:  # mapped in this process: each shard scans its own lists
            from ehi.index.shards import LocalShard, open_shard, sharded_index

            local = []
            for s, name in enumerate(files):
                shard = open_shard(path / name, ivf=first if s == 0 else None)  # the first is read already
                check_shard_lists(shard.ivf, name, leaf_shard, s, base.leaf_sizes())
                local.append(LocalShard(shard, s))
            return sharded_index(base, leaf_shard, local)
    except ValueError as e:
        raise ArtifactError(f"{path / ('shards.json' if sharded else 'index.faiss')}: {e}") from None
    from ehi.index.ray_shards import serve_shards

    return serve_shards(path, base, leaf_shard, files, [manifest["files"][f] for f in files], *ray)
