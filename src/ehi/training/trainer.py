"""Joint training of encoder and tree: L = l1 L_siamese + l2 L_indexing + l3 L_intra-leaf
(+ an optional load-balance penalty), with hard negatives mined from the current tree."""

from __future__ import annotations

import copy
import logging
import resource
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ehi.artifacts import read_manifest
from ehi.config import AUTO_DEEP_LEAVES, PRECOMPUTED, EHIConfig
from ehi.data import Dataset
from ehi.encode.cache import Features, text_keys
from ehi.encode.encoder import Encoder
from ehi.model.ehi_model import EHIModel
from ehi.model.router import Router
from ehi.model.tree import Tree
from ehi.progress import phase
from ehi.training.checkpoints import Checkpoints, checkpoint_path, data_fingerprints
from ehi.training.distributed import barrier, gather_rows, is_main, map_rows, rank_world, shard_rows
from ehi.training.loop import EpochLoop, TrainingSet, _Joint, _normalised, seed_everything
from ehi.training.selection import Selection
from ehi.training.state import TrainerState
from ehi.training.validation import Validator, holdout

log = logging.getLogger(__name__)
__all__ = ["Trainer", "TrainingSet", "checkpoint_path", "leaf_report", "seed_everything", "train"]


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def leaf_report(model: EHIModel, query_emb: np.ndarray | None = None) -> str:
    st = model.index.leaf_stats(None if query_emb is None else model.route(query_emb, 1))
    return (
        f"leaves {st['leaves']}: size min {st['min']} / median {st['median']:.0f} / max {st['max']}, "
        f"{st['empty']} empty; expected documents per visited leaf {st['expected_per_leaf']:.1f} "
        f"(ideal N/L = {st['ideal_per_leaf']:.1f})"
    )


class Trainer(EpochLoop, Selection, Checkpoints):
    """Joint training as a story: fit (loop.py), select and refit (selection.py), checkpoint
    each epoch (checkpoints.py), build the index and save (``run``). What it changes as it
    goes lives in one ``TrainerState`` (state.py), which the checkpoints save and restore whole."""

    def __init__(
        self,
        config: EHIConfig,
        dataset: Dataset,
        split: str = "train",
        query_ids: list[str] | None = None,
        doc_embeddings: np.ndarray | None = None,
        query_embeddings: np.ndarray | None = None,
        judgements: str | None = None,
    ):
        """``doc_embeddings`` (N, d) and ``query_embeddings`` (rows in ``dataset.queries``
        order) replace the transformer: bring-your-own-encoder mode, adapter + tree trained.
        ``judgements``: the qrels split validation scores against and the neighbour routing
        targets come from (default: the validation / training split; unsupervised training
        trains on nearest-neighbour pairs and judges on the top-100)."""
        config = copy.deepcopy(config)
        self.config = config.validate()
        self.rank, self.world = rank_world()
        self.dataset = dataset
        tc = config.train
        seed_everything(tc.seed)
        self.state = TrainerState(rng=np.random.default_rng(tc.seed))
        self.device = tc.device
        train_qids, val_qids, self.val_split = holdout(dataset, split, query_ids, tc)
        self.judgements = judgements or split
        self.train_set = TrainingSet.from_dataset(dataset, split, train_qids)
        if (doc_embeddings is None) != (query_embeddings is None):
            raise ValueError("give both document and query embeddings, or neither")
        if doc_embeddings is not None:
            if doc_embeddings.shape[0] != len(dataset.corpus):
                raise ValueError(f"{doc_embeddings.shape[0]} document embeddings for {len(dataset.corpus)} documents")
            if query_embeddings.shape[0] != len(dataset.queries):
                raise ValueError(f"{query_embeddings.shape[0]} query embeddings for {len(dataset.queries)} queries")
            if query_embeddings.shape[1] != doc_embeddings.shape[1]:
                raise ValueError("query and document embeddings differ in dimension")
            config.encoder.model_name = PRECOMPUTED
            config.encoder.scope = "adapter"
            config.encoder.dim = int(doc_embeddings.shape[1])
        self.shape_note = ""  # what training says about a tree shape it chose
        if not (config.tree.branching and config.tree.height):  # auto: resolved from the corpus size, saved resolved
            n = len(dataset.corpus)
            auto_height = not config.tree.height
            config.tree.branching, config.tree.height = config.tree.resolved(n)
            config.validate()
            if auto_height:
                self.shape_note = (f"tree height {config.tree.height} chosen for {n} documents ({config.tree.branching}^{config.tree.height}"
                                   f" = {config.tree.num_leaves} leaves; two levels from {AUTO_DEEP_LEAVES} leaves; -H to choose)")
                log.info(self.shape_note)
        self.encoder = Encoder(config.encoder, device=self.device)
        self.timings: dict[str, float] = {}
        self.peak_rss: dict[str, float] = {}
        with self.phase("encode"):
            if doc_embeddings is not None:
                self.doc_feats = Features(dense=_normalised(doc_embeddings))
                row = {q: i for i, q in enumerate(dataset.queries)}
                self.q_feats = Features(dense=_normalised(query_embeddings[[row[q] for q in self.train_set.query_ids]]))
                val_feats = Features(dense=_normalised(query_embeddings[[row[q] for q in val_qids]])) if val_qids else None
            else:
                self.doc_feats = self._features(dataset.corpus.documents(), "encoding corpus")
                self.q_feats = self._features([dataset.queries[q] for q in self.train_set.query_ids], "encoding queries")
                val_feats = self._features([dataset.queries[q] for q in val_qids], "encoding validation queries") if val_qids else None
        val_judged = judgements or self.val_split
        # what --resume checks the data against (checkpoints.py)
        self.data_fingerprints = data_fingerprints(
            dataset, [*self.train_set.query_ids, *(val_qids or [])], [split, self.judgements, *([self.val_split] if val_qids else [])],
            (doc_embeddings, query_embeddings),
        )
        self.validator = (
            Validator(dataset, val_judged, val_qids, val_feats, tc.val_budgets,
                      trained_docs=self.train_set.pairs[:, 1] if judgements is None else None)
            if val_qids else None
        )
        # the refit trains on the held-out queries too, when they came from the training split
        self._refit_set(split, query_ids, val_qids, val_feats, query_embeddings)
        self.tree = Tree(self.encoder.dim, config.tree).to(self.device)
        # where the tree places documents and queries (negatives, routing targets); its numpy copy
        # of the weights is re-taken only after they change
        self.router = Router(self.tree, config)
        self.joint = _Joint(self.encoder, self.tree)
        self.joint.q_feats, self.joint.d_feats = self.q_feats, self.doc_feats
        with self.phase("init_tree"):
            if config.tree.init == "kmeans":
                self.tree.init_kmeans(self.encoder.embed_all(self.doc_feats, desc="embedding corpus"), seed=tc.seed)
            else:
                self.tree.init_random(seed=tc.seed)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # every rank starts from rank 0's tree (k-means may differ by a ulp across ranks)
            self.joint = DistributedDataParallel(self.joint, forward_sync_buffers=False)
        # the start the anchor penalty pulls toward and the refit restarts from (recomputed
        # identically on resume)
        self.start_state = self._state()
        self._set_anchor([p.detach().clone() for p in self.tree.parameters()])
        self.optimizer = self._optimizer()
        self.spans: tuple[Features, np.ndarray] | None = None  # document spans, encoded once

    def epochs(self) -> int:
        """``epochs``, cut so that the selection stage sees at most ``max_pairs`` pairs."""
        tc = self.config.train
        if not tc.max_pairs or not tc.epochs:
            return tc.epochs
        return min(tc.epochs, max(1, tc.max_pairs // len(self.train_set.pairs)))

    def _optimizer(self) -> torch.optim.Optimizer:
        tc = self.config.train
        enc_params = [p for p in self.encoder.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            [
                {"params": enc_params, "lr": tc.lr_encoder, "name": "encoder"},
                {"params": list(self.tree.parameters()), "lr": tc.lr_indexer, "name": "indexer"},
            ],
            weight_decay=tc.weight_decay,
        )

    @contextmanager
    def phase(self, name: str):
        """Accumulate wall time and record the peak RSS at the end of a phase."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
            self.peak_rss[name] = peak_rss_gib()

    def _features(self, texts: list[str], desc: str) -> Features:
        """Frozen features, computed once: from the cache, or split over the ranks and gathered
        (the main rank writes the cache)."""
        if self.world == 1:
            return self.encoder.features(texts, desc)
        path = self.encoder.cache_path(texts)
        cached = self.encoder.load_cached(path) if path is not None else None
        if path is None or cached is not None:
            return cached if cached is not None else self.encoder.features(texts, desc)
        local = self.encoder.compute_features([texts[i] for i in shard_rows(len(texts))], desc).rows()
        like = Features(dense=torch.empty(0)) if self.config.encoder.scope == "adapter" else Features(states=torch.empty(0))
        feats = Features.from_rows(gather_rows(local, len(texts)), like)
        if is_main():
            self.encoder.save_cached(path, feats, text_keys(texts))
        barrier()
        return feats

    def _doc_embeddings(self) -> np.ndarray:
        """The corpus under the current encoder (rows split over the ranks and gathered)."""
        return map_rows(lambda rows: self.encoder.embed_all(self.doc_feats, rows=rows), len(self.doc_feats))

    def fit(
        self, out_dir: str | Path | None = None, progress: bool = True, on_epoch: Callable | None = None, build_index: bool = True
    ) -> EHIModel:
        """Train; then index the training corpus, unless ``build_index`` is False (the caller
        indexes another corpus, e.g. streaming)."""
        self.encoder.progress = progress
        if self.state.stage == "select":
            if progress and self.shape_note and self.state.epoch == 0:
                phase(self.shape_note)
            if progress and self.epochs() < self.config.train.epochs:
                tqdm.write(f"{len(self.train_set.pairs)} training pairs: {self.epochs()} epochs (max_pairs {self.config.train.max_pairs})")
            if progress:
                phase(f"training: {self.epochs()} epochs over {len(self.train_set.pairs)} pairs of {len(self.train_set.query_ids)} queries"
                      + (f", validating after each on {self.validator.describe()}" if self.validator is not None else ""))
            if self.validator is not None and self.state.epoch == 0 and not self.state.validation:
                self._validate(0, progress)
            self._run(self.epochs(), out_dir, progress, on_epoch)
            self.restore_best(progress)
            if self.config.train.route_fit_epochs:
                if progress:
                    phase("router fit: fitting to training queries and document spans, scored on held-out queries")
                self.choose_route_fit(progress)
            if self.full_set is not None and self.state.best is not None and self.state.best[0] > 0:
                self._enter_refit(self.state.best[0], progress)
        if self.state.stage == "refit":
            self._run(self.state.refit_epochs, out_dir, progress, on_epoch)
            if self.state.best[3]:  # validation kept k-means over the encoder of that epoch
                self._kmeans_tree()
        if self.state.route_fit and self.state.route_fit["kept"] > 0:
            self.apply_route_fit(progress)
        if not build_index:
            self.encoder.eval()
            self.tree.eval()
            return EHIModel(self.config, self.encoder, self.tree, validation=self.validation_report())
        return self.build_model()

    def run(
        self, out_dir: str | Path | None = None, resume: bool = False, progress: bool = True, log=None, keep_checkpoint: bool = False
    ) -> EHIModel:
        """What ``train()`` and ``ehi train`` do: continue from the checkpoint beside ``out_dir``
        if asked, fit, and save the model to ``out_dir`` (the main process only). The
        checkpoint, written each epoch for ``resume`` after a kill, is removed once the model
        is saved unless ``keep_checkpoint``."""
        if resume:
            if out_dir is None:
                raise ValueError("resume needs out_dir")
            ckpt = checkpoint_path(out_dir)
            if not (ckpt / "manifest.json").exists():
                raise ValueError(f"--resume: no checkpoint at {ckpt}")
            done = self.resume(ckpt)
            if log:
                log(f"resuming after epoch {done} of {self.epochs()}")
        model = self.fit(out_dir, progress=progress)
        model.training_timings = self.timings
        model.training_history = self.state.history
        if out_dir is not None and is_main():
            model.save(out_dir)
            ckpt = checkpoint_path(out_dir)
            if not keep_checkpoint and (ckpt / "manifest.json").exists() and read_manifest(ckpt).get("kind") == "checkpoint":
                shutil.rmtree(ckpt)
        return model

    def build_model(self) -> EHIModel:
        if self.encoder.progress:
            phase(f"indexing {len(self.dataset.corpus)} documents")
        with self.phase("index"):
            self.encoder.eval()
            self.tree.eval()
            model = EHIModel(
                self.config, self.encoder, self.tree, corpus_fingerprint=self.dataset.corpus.fingerprint(),
                validation=self.validation_report(),
            )
            d_emb = self.encoder.embed_all(self.doc_feats, desc="indexing corpus")
            model.build_index(d_emb, self.dataset.corpus.ids, self.dataset.corpus.titles)
            del d_emb
            model.calibrate(self.encoder.embed_all(self.q_feats))
        return model


def train(
    dataset: Dataset,
    config: EHIConfig | None = None,
    out_dir: str | Path | None = None,
    split: str = "train",
    query_ids: list[str] | None = None,
    progress: bool = True,
    resume: bool = False,
    keep_checkpoint: bool = False,
) -> EHIModel:
    """Train EHI (encoder and tree together) on a dataset's judged queries, and index its corpus.

    Parameters
    ----------
    dataset : Dataset
        A BEIR dataset (``ehi.load_beir``): corpus, queries and qrels.
    config : EHIConfig, optional
        Encoder, tree, training and index settings (default: ``EHIConfig()``); saved with the model.
    out_dir : str or Path, optional
        Where the model is saved (atomically); a checkpoint is kept beside it during training.
    split : str
        The qrels split trained on (a share of its queries is held out for validation).
    query_ids : list of str, optional
        Train on these queries of ``split`` only.
    progress : bool
        Progress bars and phase lines.
    resume : bool
        Continue from the checkpoint beside ``out_dir`` (refused if the data or config differ).
    keep_checkpoint : bool
        Keep the checkpoint after the model is saved.

    Returns
    -------
    EHIModel
        The trained model with its index built over ``dataset.corpus``.

    Examples
    --------
    >>> import ehi
    >>> ds = ehi.load_beir("../shared/datasets/scifact")              # doctest: +SKIP
    >>> cfg = ehi.EHIConfig()
    >>> cfg.train.epochs = 10
    >>> model = ehi.train(ds, cfg, out_dir="runs/scifact")             # doctest: +SKIP
    >>> model.search("aspirin and cancer", k=5, budget=0.02)[0].hits  # doctest: +SKIP
    """
    trainer = Trainer(config or EHIConfig(), dataset, split, query_ids)
    return trainer.run(out_dir, resume=resume, progress=progress, keep_checkpoint=keep_checkpoint)
