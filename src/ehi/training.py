"""Joint training of encoder and tree: L = l1 L_siamese + l2 L_indexing + l3 L_intra-leaf
(+ an optional load-balance penalty), with hard negatives mined from the current tree."""

from __future__ import annotations

import copy
import json
import logging
import random
import resource
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .artifacts import ArtifactError, read_manifest, write_artifact
from .config import EHIConfig
from .data import Dataset, document_spans
from .distributed import all_gather_ids, all_gather_with_grad, barrier, gather_rows, is_main, map_rows, rank_world, shard_rows
from .encoder import PRECOMPUTED, Encoder, Features, text_keys
from .losses import ehi_losses, routing_cross_entropy, soft_routing_cross_entropy
from .mining import mine_pool, positives_matrix, routing_targets, sample_negatives
from .model import EHIModel
from .progress import bars, phase
from .routing import fit_router, routing_examples, shrunk
from .tree import Tree, leaf_to_path, load_balance_penalty
from .validation import Validator, format_validation, holdout, selection_message

log = logging.getLogger(__name__)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _normalised(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=-1)


@dataclass
class TrainingSet:
    """Training queries and their (query row, document row) positive pairs."""

    query_ids: list[str]
    pairs: np.ndarray  # (P, 2)
    positives: np.ndarray  # (Q, max positives), -1 padded

    @classmethod
    def from_dataset(cls, dataset: Dataset, split: str = "train", query_ids: list[str] | None = None) -> "TrainingSet":
        row = {d: i for i, d in enumerate(dataset.corpus.ids)}
        rel = dataset.relevant(split)
        qids = [q for q in (query_ids if query_ids is not None else rel) if q in rel]
        pos, missing = [], 0
        for q in qids:
            docs = [row[d] for d in rel[q] if d in row]
            missing += len(rel[q]) - len(docs)
            pos.append(docs)
        if missing:
            log.warning("%s qrels: %d relevant documents are not in the corpus (ignored)", split, missing)
        keep = [i for i, p in enumerate(pos) if p]
        qids, pos = [qids[i] for i in keep], [pos[i] for i in keep]
        if not qids:
            raise ValueError(f"split {split!r} has no query with a relevant document in the corpus")
        pairs = np.array([(qi, d) for qi, p in enumerate(pos) for d in p], dtype=np.int64)
        return cls(qids, pairs, positives_matrix(pos))


class _Joint(torch.nn.Module):
    """Encoder and tree as one module, so that DistributedDataParallel syncs both."""

    def __init__(self, encoder: Encoder, tree: Tree):
        super().__init__()
        self.encoder, self.tree = encoder, tree
        self.q_feats: Features | None = None
        self.d_feats: Features | None = None

    def forward(self, q_rows: torch.Tensor, d_rows: torch.Tensor, tree_grad: float = 1.0):
        e_q = self.encoder.embed(self.q_feats, q_rows)
        e_d = self.encoder.embed(self.d_feats, d_rows)
        e = torch.cat([e_q, e_d])
        if tree_grad != 1.0:  # same values, the tree's gradient into the encoder scaled
            e = tree_grad * e + (1.0 - tree_grad) * e.detach()
        r = self.tree.route(e)
        return (e_q, e_d, r.path_embedding, *r.level_probs)


def checkpoint_path(out_dir: str | Path) -> Path:
    """Checkpoints live beside the model directory, which a final save replaces whole."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".checkpoint")


def leaf_report(model: EHIModel, query_emb: np.ndarray | None = None) -> str:
    st = model.index.leaf_stats(None if query_emb is None else model.route(query_emb, 1))
    return (
        f"leaves {st['leaves']}: size min {st['min']} / median {st['median']:.0f} / max {st['max']}, "
        f"{st['empty']} empty; expected documents per visited leaf {st['expected_per_leaf']:.1f} "
        f"(ideal N/L = {st['ideal_per_leaf']:.1f})"
    )


class Trainer:
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
        self.rng = np.random.default_rng(tc.seed)
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
        if not config.tree.branching:  # auto: resolved from the corpus size, saved resolved
            config.tree.branching = config.tree.resolve_branching(len(dataset.corpus))
            config.validate()
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
        self.validator = (
            Validator(dataset, val_judged, val_qids, val_feats, tc.val_budgets,
                      trained_docs=self.train_set.pairs[:, 1] if judgements is None else None)
            if val_qids else None
        )
        # the refit trains on the held-out queries too, when they came from the training split
        self.full_set: TrainingSet | None = None
        if val_qids and self.val_split == split and tc.val_refit:
            rel = dataset.relevant(split)
            # every training query: a grouped hold-out also set aside those touching both kinds
            full = sorted(set(q for q in (query_ids if query_ids is not None else rel) if q in rel))
            self.full_set = TrainingSet.from_dataset(dataset, split, full)
            feats = dict(zip(self.train_set.query_ids, self.q_feats.rows()))
            feats.update(zip(val_qids, val_feats.rows()))
            rest = [q for q in self.full_set.query_ids if q not in feats]
            if rest:
                if doc_embeddings is not None:
                    rows = _normalised(query_embeddings[[row[q] for q in rest]]).numpy()
                else:
                    rows = self._features([dataset.queries[q] for q in rest], "encoding queries").rows()
                feats.update(zip(rest, rows))
            self.full_q_feats = Features.from_rows([feats[q] for q in self.full_set.query_ids], self.q_feats)
        self.stage = "select"  # then "refit"
        self.refit_epochs = 0
        self.tree = Tree(self.encoder.dim, config.tree).to(self.device)
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
        self.pool: np.ndarray | None = None
        # neighbour routing targets (lambda_neighbours): per level (Q, B), and the arg-max paths
        # of the training queries and of every document they were computed under
        self.route_targets: list[np.ndarray] | None = None
        self.query_paths: np.ndarray | None = None
        self.doc_paths: np.ndarray | None = None
        self.history: list[dict] = []
        self.validation: list[dict] = []  # one entry per validated epoch (0 = the start tree)
        # epoch, score, state, whether that state's tree is k-means over that epoch's encoder
        self.best: tuple[int, float, dict[str, torch.Tensor], bool] | None = None
        self.start_epoch = 0
        self.spans: tuple[Features, np.ndarray] | None = None  # document spans, encoded once
        # the router fit's held-out scores per shrink factor and the one kept (routing.py)
        self.route_fit: dict | None = None

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

    # ---- hard negatives ----------------------------------------------------------------
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

    def refresh_negatives(self) -> None:
        """Re-embed with the current encoder and mine from the leaves each query reaches
        (rows split over the ranks and gathered)."""
        tc = self.config.train
        d_emb = map_rows(lambda rows: self.encoder.embed_all(self.doc_feats, rows=rows, desc="refresh: corpus"), len(self.doc_feats))
        q_emb = map_rows(lambda rows: self.encoder.embed_all(self.q_feats, rows=rows), len(self.q_feats))
        pos = self.train_set.positives
        if tc.negatives_from == "exact":
            self.pool = map_rows(lambda r: mine_pool(q_emb[r], d_emb, pos[r], tc.mining_pool), len(q_emb))
            return
        model = EHIModel(self.config, self.encoder, self.tree)
        doc_leaves = model.route(d_emb, self.config.index.d2l)
        q_leaves = model.route(q_emb, tc.mining_beam)
        self.tree.train()
        self.pool = map_rows(
            lambda r: mine_pool(q_emb[r], d_emb, pos[r], tc.mining_pool, q_leaves[r], doc_leaves), len(q_emb)
        )

    def neighbour_rows(self) -> np.ndarray:
        """(Q, K) document rows of each training query's judged neighbours (-1 padded)."""
        row = {d: i for i, d in enumerate(self.dataset.corpus.ids)}
        rel = self.dataset.relevant(self.judgements)
        return positives_matrix([[row[d] for d in rel.get(q, []) if d in row] for q in self.train_set.query_ids])

    def refresh_routing_targets(self) -> None:
        """Where the current tree puts each document, and so where each training query's
        neighbours are: the targets of the neighbour routing loss."""
        B = self.config.tree.branching
        q_emb = map_rows(lambda rows: self.encoder.embed_all(self.q_feats, rows=rows), len(self.q_feats))
        self.doc_paths = self._top_paths(self._doc_embeddings())
        self.query_paths = self._top_paths(q_emb)
        self.route_targets = routing_targets(self.query_paths, self.neighbour_rows(), self.doc_paths, B)

    def _top_paths(self, emb: np.ndarray) -> np.ndarray:
        """(n, H) the path of each row's top leaf under the current tree, as search and the
        index place it."""
        cfg = self.config.tree
        leaves = EHIModel(self.config, self.encoder, self.tree).route(emb, 1)
        self.tree.train()
        return leaf_to_path(torch.from_numpy(leaves[:, 0]), cfg.branching, cfg.height).numpy()

    def recluster(self) -> None:
        """Re-initialise the tree by k-means over the current encoder's documents; the tree's
        optimiser moments and the anchor move to the new start."""
        self._kmeans_tree()
        for p in self.tree.parameters():
            self.optimizer.state.pop(p, None)
        self._set_anchor([p.detach().clone() for p in self.tree.parameters()])

    def _set_anchor(self, params: list[torch.Tensor]) -> None:
        """The start the anchor penalty pulls toward, and its squared norm."""
        self.tree_start = params
        self.tree_start_norm = float(sum((p**2).sum() for p in params)) + 1e-12

    def _doc_embeddings(self) -> np.ndarray:
        """The corpus under the current encoder (rows split over the ranks and gathered)."""
        return map_rows(lambda rows: self.encoder.embed_all(self.doc_feats, rows=rows), len(self.doc_feats))

    def _kmeans_tree(self, d_emb: np.ndarray | None = None) -> None:
        """The tree's weights only: k-means over the current documents, U at its small start."""
        seed = self.config.train.seed
        d_emb = self._doc_embeddings() if d_emb is None else d_emb
        self.tree.init_kmeans(d_emb, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for level in self.tree.levels:  # not zero: ReLU'(0) = 0 would freeze U
                n = level.U.shape[0]
                level.U.copy_(torch.randn(level.U.shape, generator=g) * (1e-3 / n**0.5))

    def _anchor_penalty(self) -> torch.Tensor:
        num = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.tree.parameters(), self.tree_start))
        return num / self.tree_start_norm

    # ---- validation --------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        state = {f"encoder.{k}": v.detach().clone() for k, v in self.encoder.trainable_state().items()}
        state.update({f"tree.{k}": v.detach().clone() for k, v in self.tree.state_dict().items()})
        return state

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.encoder.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("encoder."):
                    params[k[len("encoder.") :]].copy_(v)
        self.tree.load_state_dict({k[len("tree.") :]: v for k, v in state.items() if k.startswith("tree.")})

    def _validate(self, epoch: int, progress: bool) -> dict:
        tc = self.config.train
        with self.phase("validate"):
            d_emb = self._doc_embeddings()  # once: only the tree changes between the candidates
            entry = {"epoch": epoch, **self.validator(EHIModel(self.config, self.encoder, self.tree), d_emb)}
            learned = self._state()
            candidates = [(entry["score"], False, learned)]
            if tc.val_recluster and epoch > 0:
                self._kmeans_tree(d_emb)
                km = self.validator(EHIModel(self.config, self.encoder, self.tree), d_emb)
                entry["kmeans"] = km
                candidates.append((km["score"], True, self._state()))
                self._load_state(learned)
        self.validation.append(entry)
        for score, reclustered, state in candidates:
            if self.best is None or score > self.best[1]:
                self.best = (epoch, score, state, reclustered)
        if progress:
            tqdm.write(f"validation epoch {epoch}: " + format_validation(entry))
        return entry

    def restore_best(self, progress: bool = True) -> None:
        """Go back to the best validated state (the k-means start if training never beat it)."""
        if self.best is None:
            return
        epoch, score, state, reclustered = self.best
        self._load_state(state)
        msg = selection_message(self.validation, epoch, reclustered)
        log.info(msg)
        if progress:
            tqdm.write(msg)

    def validation_report(self) -> dict | None:
        """What goes into the model's metadata and the benchmark report."""
        if self.validator is None:
            return None
        return {
            "held_out": self.validator.describe(),
            "budgets": list(self.validator.budgets),
            "score": "mean Recall@100 over the budgets; a budget even beam 1 exceeds is scored on the line from 0 to beam 1",
            "kept_epoch": self.best[0] if self.best else None,
            "kept_tree": ("k-means over that epoch's encoder" if self.best[3] else "learned") if self.best else None,
            "refit": (
                {"epochs": self.refit_epochs, "queries": len(self.full_set.query_ids)} if self.stage == "refit" else None
            ),
            "why": selection_message(self.validation, self.best[0], self.best[3]) if self.best else "",
            "route_fit": self.route_fit,
            "curve": self.validation,
        }

    # ---- the router fitted to search (routing.py) -------------------------------------------
    def _span_set(self) -> tuple[Features, np.ndarray]:
        """A few spans of every document and their document rows, encoded once."""
        if self.spans is None and self.config.encoder.model_name == PRECOMPUTED:  # no text to cut
            self.spans = (self.doc_feats, np.arange(len(self.doc_feats)))  # each document stands for itself
        if self.spans is None:
            tc, corpus = self.config.train, self.dataset.corpus
            texts, rows = [], []
            for s in range(tc.spans_per_document(len(corpus))):
                t, r = document_spans(corpus, len(corpus), seed=tc.seed + s)
                texts += t
                rows.append(r)
            self.spans = (self._features(texts, "encoding document spans"), np.concatenate(rows))
        return self.spans

    def _fit_router(self, train_set: TrainingSet, q_feats: Features, d_emb: np.ndarray) -> dict[str, torch.Tensor]:
        """Fit the current tree's router (every rank alike, same seed); returns the fitted state.
        ``d_emb``: the corpus under the current encoder, which the fit leaves unchanged."""
        tc = self.config.train
        with self.phase("route_fit"):
            span_feats, span_rows = self._span_set()
            ex = routing_examples(
                self.encoder.embed_all(q_feats), train_set.positives, self._top_paths(d_emb),
                self.encoder.embed_all(span_feats), span_rows, tc.route_fit_span_weight,
            )
            fit_router(self.tree, ex, tc.route_fit_epochs, tc.route_fit_lr, tc.weight_decay, tc.seed)
        return self._state()

    def choose_route_fit(self, progress: bool = True) -> None:
        """Fit on the training queries, score each shrink factor on the held-out ones against
        the unfitted router, and go back to the unfitted state (the fit is applied at the end,
        on every training query)."""
        tc = self.config.train
        if self.validator is None or self.best is None:  # nothing to choose on
            self.route_fit = {"kept": max(tc.route_fit_shrink), "scores": None}
            return
        start = self._state()
        d_emb = self._doc_embeddings()  # once: the fit and its candidates share the encoder
        fitted = self._fit_router(self.train_set, self.q_feats, d_emb)
        scores = {"0": self.best[1]}
        with self.phase("validate"):
            for a in tc.route_fit_shrink:
                self._load_state(shrunk(start, fitted, a))
                scores[f"{a:g}"] = self.validator(EHIModel(self.config, self.encoder, self.tree), d_emb)["score"]
        self._load_state(start)
        kept = max(scores, key=lambda k: (scores[k], -float(k)))
        self.route_fit = {"kept": float(kept), "scores": scores}
        if progress:
            tqdm.write(f"router fit: held-out score by shrink factor {' '.join(f'{k}:{v:.2f}' for k, v in scores.items())}; kept {kept}")

    def apply_route_fit(self, progress: bool = True) -> None:
        """Fit the final tree's router on every training query, scaled by the kept factor."""
        start = self._state()
        train_set, q_feats = (self.full_set, self.full_q_feats) if self.full_set is not None else (self.train_set, self.q_feats)
        fitted = self._fit_router(train_set, q_feats, self._doc_embeddings())
        self._load_state(shrunk(start, fitted, self.route_fit["kept"]))
        if progress:
            tqdm.write(f"router fit on {len(train_set.query_ids)} training queries, shrink {self.route_fit['kept']:g}")

    # ---- one step ----------------------------------------------------------------------
    def step(self, batch: np.ndarray) -> dict[str, float]:
        """One optimiser step on a global batch. With several ranks each takes every
        world-th pair, and the documents of all ranks serve as everyone's negatives."""
        tc = self.config.train
        if tc.hard_negatives > 0 and self.pool is not None:
            # drawn for the whole batch on every rank, so the RNG streams stay in step
            hard = sample_negatives(self.pool[batch[:, 0]], tc.hard_negatives, self.rng)
        else:
            hard = np.full((len(batch), 0), -1, dtype=np.int64)
        local = np.arange(self.rank, len(batch), self.world)
        qi, pi = batch[local, 0], batch[local, 1]
        hn = hard[local].ravel()
        hn = hn[hn >= 0]
        b = len(qi)
        d_rows = np.concatenate([pi, hn])
        n_main = len(d_rows)
        neighbours = tc.lambda_neighbours > 0 and self.route_targets is not None
        if neighbours:  # random documents, held to their own leaves (drawn on every rank alike)
            r_rows = self.rng.integers(0, len(self.doc_feats), tc.batch_size)[np.arange(self.rank, tc.batch_size, self.world)]
            d_rows = np.concatenate([d_rows, r_rows])
        e_q, e_d, t, *level_probs = self.joint(torch.from_numpy(qi), torch.from_numpy(d_rows), tc.tree_grad_to_encoder)
        e_d, t = e_d[:n_main], t[: b + n_main]
        t_q, t_d = t[:b], t[b:]
        e_n, _ = all_gather_with_grad(e_d)
        t_n, _ = all_gather_with_grad(t_d)
        neg_ids = torch.from_numpy(all_gather_ids(d_rows[:n_main]))
        pos = torch.from_numpy(self.train_set.positives[qi])
        dev = e_q.device
        neg_mask = ~(neg_ids[None, :, None] == pos[:, None, :]).any(-1)
        same_doc = neg_ids[None, :] == torch.from_numpy(pi)[:, None]
        terms = ehi_losses(
            e_q, e_d[:b], e_n, t_q, t_d[:b], t_n, neg_mask.to(dev), same_doc.to(dev), tc.margin, tc.tau, tc.negative_tau
        )
        loss = tc.lambda_siamese * terms["siamese"] + tc.lambda_indexing * terms["indexing"] + tc.lambda_intra_leaf * terms["intra_leaf"]
        if tc.load_balance > 0:
            terms["balance"] = load_balance_penalty([p[b:] for p in level_probs])
            loss = loss + tc.load_balance * terms["balance"]
        if tc.lambda_routing > 0:
            terms["routing"] = routing_cross_entropy([p[:b] for p in level_probs], [p[b : 2 * b] for p in level_probs])
            loss = loss + tc.lambda_routing * terms["routing"]
        if neighbours:
            dev_t = lambda x: torch.from_numpy(x).to(level_probs[0].device)
            q_loss = soft_routing_cross_entropy(
                [p[:b] for p in level_probs], [dev_t(target[qi]) for target in self.route_targets], dev_t(self.query_paths[qi])
            )
            rp = self.doc_paths[r_rows]
            B = self.config.tree.branching
            d_loss = soft_routing_cross_entropy(
                [p[b + n_main :] for p in level_probs],
                [dev_t(np.eye(B, dtype=np.float32)[rp[:, h]]) for h in range(rp.shape[1])],
                dev_t(rp),
            )
            terms["neighbours"] = q_loss + d_loss
            loss = loss + tc.lambda_neighbours * terms["neighbours"]
        if tc.tree_anchor > 0:
            terms["anchor"] = self._anchor_penalty()
            loss = loss + tc.tree_anchor * terms["anchor"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["loss"] = float(loss.detach())
        return out

    def fit(
        self, out_dir: str | Path | None = None, progress: bool = True, on_epoch: Callable | None = None, build_index: bool = True
    ) -> EHIModel:
        """Train; then index the training corpus, unless ``build_index`` is False (the caller
        indexes another corpus, e.g. streaming)."""
        self.encoder.progress = progress
        if self.stage == "select":
            if progress and self.epochs() < self.config.train.epochs:
                tqdm.write(f"{len(self.train_set.pairs)} training pairs: {self.epochs()} epochs (max_pairs {self.config.train.max_pairs})")
            if progress:
                phase(f"training: {self.epochs()} epochs over {len(self.train_set.pairs)} pairs of {len(self.train_set.query_ids)} queries"
                      + (", validating on held-out queries after each" if self.validator is not None else ""))
            if self.validator is not None and self.start_epoch == 0 and not self.validation:
                self._validate(0, progress)
            self._run(self.epochs(), out_dir, progress, on_epoch)
            self.restore_best(progress)
            if self.config.train.route_fit_epochs:
                if progress:
                    phase("router fit: fitting to training queries and document spans, scored on held-out queries")
                self.choose_route_fit(progress)
            if self.full_set is not None and self.best is not None and self.best[0] > 0:
                self._enter_refit(self.best[0], progress)
        if self.stage == "refit":
            self._run(self.refit_epochs, out_dir, progress, on_epoch)
            if self.best[3]:  # validation kept k-means over the encoder of that epoch
                self._kmeans_tree()
        if self.route_fit and self.route_fit["kept"] > 0:
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
        model.training_history = self.history
        if out_dir is not None and is_main():
            model.save(out_dir)
            ckpt = checkpoint_path(out_dir)
            if not keep_checkpoint and (ckpt / "manifest.json").exists() and read_manifest(ckpt).get("kind") == "checkpoint":
                shutil.rmtree(ckpt)
        return model

    def _run(self, epochs: int, out_dir, progress: bool, on_epoch) -> None:
        tc = self.config.train
        pairs = self.train_set.pairs
        for epoch in range(self.start_epoch, epochs):
            if tc.hard_negatives > 0 and epoch % tc.refresh_every == 0:
                with self.phase("refresh_negatives"):
                    self.refresh_negatives()
            if tc.lambda_neighbours > 0 and (epoch % tc.refresh_every == 0 or self.route_targets is None):
                with self.phase("refresh_targets"):
                    self.refresh_routing_targets()
            with self.phase("train_epochs"):
                record = self._epoch(epoch, pairs, progress, epochs)
            if tc.recluster_every and (epoch + 1) % tc.recluster_every == 0:
                with self.phase("recluster"):
                    self.recluster()
                record["reclustered"] = True
            if self.stage == "refit":
                record["stage"] = "refit"
            self.history.append(record)
            if progress:
                tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if self.validator is not None and self.stage == "select":
                self._validate(epoch + 1, progress)
            if out_dir is not None and is_main():
                self.save_checkpoint(checkpoint_path(out_dir), epoch + 1)
            barrier()
            if on_epoch is not None:
                on_epoch(self, record)

    def _enter_refit(self, epochs: int, progress: bool = False) -> None:
        """Back to the start (k-means tree, identity adapter, fresh optimiser and RNG), now with
        every training query, for the number of epochs validation chose."""
        tc = self.config.train
        self.stage, self.refit_epochs = "refit", epochs
        self._load_state(self.start_state)
        self.optimizer = self._optimizer()
        seed_everything(tc.seed)
        self.rng = np.random.default_rng(tc.seed)
        self.train_set, self.q_feats = self.full_set, self.full_q_feats
        getattr(self.joint, "module", self.joint).q_feats = self.q_feats
        self.pool = None
        self.route_targets = None
        self.start_epoch = 0
        if progress:
            tqdm.write(f"refit: training again on all {len(self.train_set.query_ids)} training queries for {epochs} epochs")

    def _epoch(self, epoch: int, pairs: np.ndarray, progress: bool, total: int) -> dict:
        tc = self.config.train
        self.encoder.train()
        self.tree.train()
        order = self.rng.permutation(len(pairs))
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(
            range(0, len(order), tc.batch_size),
            desc=f"{'refit ' if self.stage == 'refit' else ''}epoch {epoch + 1}/{total}",
            disable=not bars(progress),
            leave=False,
        )
        for s in bar:
            idx = order[s : s + tc.batch_size]
            if len(idx) < max(2, self.world):
                continue
            terms = self.step(pairs[idx])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            bar.set_postfix({k: f"{v / n:.3f}" for k, v in sums.items()})
        return {"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()}}

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

    def save_checkpoint(self, path: Path, epoch: int) -> None:
        """Everything needed to continue bit-identically after ``epoch`` complete epochs:
        weights, optimiser state, RNG states and the mined negatives (safetensors, npy, JSON)."""

        def write(tmp: Path):
            weights = {f"encoder.{k}": v.contiguous().cpu() for k, v in self.encoder.trainable_state().items()}
            weights.update({f"tree.{k}": v.detach().contiguous().cpu() for k, v in self.tree.state_dict().items()})
            weights["rng.torch"] = torch.get_rng_state()
            if self.best is not None:
                weights.update({f"best.{k}": v.contiguous().cpu() for k, v in self.best[2].items()})
            weights.update({f"anchor.{i}": p.contiguous().cpu() for i, p in enumerate(self.tree_start)})
            save_file(weights, str(tmp / "weights.safetensors"))
            opt = self.optimizer.state_dict()
            tensors = {
                f"{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
                for pid, st in opt["state"].items()
                for name, v in st.items()
            }
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            if self.pool is not None:
                np.save(tmp / "negatives.npy", self.pool)
            if self.route_targets is not None:
                np.save(tmp / "query_paths.npy", self.query_paths)
                np.save(tmp / "doc_paths.npy", self.doc_paths)
                for h, t in enumerate(self.route_targets):
                    np.save(tmp / f"route_targets_{h}.npy", t)
            (tmp / "config.json").write_text(self.config.to_json())
            return {
                "kind": "checkpoint",
                "epoch": epoch,
                "history": self.history,
                "validation": self.validation,
                "stage": self.stage,
                "refit_epochs": self.refit_epochs,
                "route_fit": self.route_fit,
                "best": None if self.best is None else {"epoch": self.best[0], "score": self.best[1], "reclustered": self.best[3]},
                "rng": {"numpy": _jsonable(self.rng.bit_generator.state), "python": _jsonable(random.getstate())},
            }

        write_artifact(path, write, {})

    def resume(self, path: str | Path) -> int:
        """Restore a checkpoint written by ``save_checkpoint``; returns the epochs it completed."""
        path = Path(path)
        manifest = read_manifest(path, required=("config.json", "weights.safetensors", "optimizer.safetensors"))
        if manifest.get("kind") != "checkpoint":
            raise ArtifactError(f"{path}: not a training checkpoint")
        saved = EHIConfig.from_dict(json.loads((path / "config.json").read_text()))
        if saved.to_dict() != self.config.to_dict():
            raise ValueError(f"{path}: the checkpoint was written with a different configuration; train anew or match it")
        if manifest.get("stage") == "refit":
            if self.full_set is None:
                raise ValueError(f"{path}: the checkpoint is in its refit stage but no queries were held out")
            self._enter_refit(int(manifest["refit_epochs"]))
        weights = load_file(str(path / "weights.safetensors"))
        self._load_state(weights)  # its encoder.* and tree.* tensors
        torch.set_rng_state(weights["rng.torch"])
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        state = self.optimizer.state_dict()
        restored: dict[int, dict] = {}
        for key, v in opt_tensors.items():
            pid, name = key.split(".", 1)
            restored.setdefault(int(pid), {})[name] = v
        state["state"] = restored
        self.optimizer.load_state_dict(state)
        self.pool = np.load(path / "negatives.npy", allow_pickle=False) if (path / "negatives.npy").exists() else None
        if (path / "query_paths.npy").exists():
            load = lambda name: np.load(path / name, allow_pickle=False)
            self.query_paths, self.doc_paths = load("query_paths.npy"), load("doc_paths.npy")
            self.route_targets = [load(f"route_targets_{h}.npy") for h in range(self.config.tree.height)]
        self.rng.bit_generator.state = manifest["rng"]["numpy"]
        random.setstate(_tuplify(manifest["rng"]["python"]))
        self.history = list(manifest.get("history", []))
        self.validation = list(manifest.get("validation", []))
        anchor = [weights[f"anchor.{i}"] for i in range(len(self.tree_start)) if f"anchor.{i}" in weights]
        if len(anchor) == len(self.tree_start):
            self._set_anchor([a.to(self.device) for a in anchor])
        if manifest.get("best"):
            best_state = {k[len("best.") :]: v for k, v in weights.items() if k.startswith("best.")}
            b = manifest["best"]
            self.best = (int(b["epoch"]), float(b["score"]), best_state, bool(b.get("reclustered", False)))
        self.route_fit = manifest.get("route_fit")
        self.start_epoch = int(manifest["epoch"])
        return self.start_epoch


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else ({k: _jsonable(v) for k, v in x.items()} if isinstance(x, dict) else x)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


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
    """Train EHI on a dataset's ``split`` qrels; save the model to ``out_dir`` if given.
    With ``resume``, continue from the checkpoint beside ``out_dir`` (removed after success
    unless ``keep_checkpoint``)."""
    trainer = Trainer(config or EHIConfig(), dataset, split, query_ids)
    return trainer.run(out_dir, resume=resume, progress=progress, keep_checkpoint=keep_checkpoint)
