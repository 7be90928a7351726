"""The epoch loop of joint training: batches, the three losses (and the optional penalties),
hard negatives mined from the current tree, neighbour routing targets, re-clustering.

A mixin of ``training.Trainer``: it reads the trainer's encoder, tree, optimiser, features
and training set, and is the only part that takes optimisation steps."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ehi.data import Dataset
from ehi.encode.cache import Features
from ehi.encode.encoder import Encoder
from ehi.model.tree import Tree, leaf_to_path
from ehi.progress import bars
from ehi.training.checkpoints import checkpoint_path
from ehi.training.distributed import all_gather_ids, all_gather_with_grad, barrier, is_main, map_rows
from ehi.training.losses import ehi_losses, load_balance_penalty, routing_cross_entropy, soft_routing_cross_entropy
from ehi.training.mining import mine_pool, positives_matrix, routing_targets, sample_negatives

log = logging.getLogger("ehi.training")


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


class EpochLoop:
    """Steps, epochs, negatives and routing targets (see the module docstring)."""

    def refresh_negatives(self) -> None:
        """Re-embed with the current encoder and mine from the leaves each query reaches
        (rows split over the ranks and gathered)."""
        tc = self.config.train
        d_emb = map_rows(lambda rows: self.encoder.embed_all(self.doc_feats, rows=rows, desc="refresh: corpus"), len(self.doc_feats))
        q_emb = map_rows(lambda rows: self.encoder.embed_all(self.q_feats, rows=rows), len(self.q_feats))
        pos = self.train_set.positives
        if tc.negatives_from == "exact":
            self.state.pool = map_rows(lambda r: mine_pool(q_emb[r], d_emb, pos[r], tc.mining_pool), len(q_emb))
            return
        doc_leaves = self.router.place(d_emb, self.config.index.d2l)
        q_leaves = self.router.place(q_emb, tc.mining_beam)  # at most every leaf (NumpyRouter.leaves)
        self.tree.train()
        self.state.pool = map_rows(
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
        self.state.doc_paths = self._top_paths(self._doc_embeddings())
        self.state.query_paths = self._top_paths(q_emb)
        self.state.route_targets = routing_targets(self.state.query_paths, self.neighbour_rows(), self.state.doc_paths, B)

    def _top_paths(self, emb: np.ndarray) -> np.ndarray:
        """(n, H) the path of each row's top leaf under the current tree, as search and the
        index place it."""
        cfg = self.config.tree
        leaves = self.router.place(emb, 1)
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

    def _anchor_penalty(self) -> torch.Tensor:
        num = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.tree.parameters(), self.tree_start))
        return num / self.tree_start_norm

    # ---- one step ----------------------------------------------------------------------
    def step(self, batch: np.ndarray) -> dict[str, float]:
        """One optimiser step on a global batch. With several ranks each takes every
        world-th pair, and the documents of all ranks serve as everyone's negatives."""
        tc = self.config.train
        if tc.hard_negatives > 0 and self.state.pool is not None:
            # drawn for the whole batch on every rank, so the RNG streams stay in step
            hard = sample_negatives(self.state.pool[batch[:, 0]], tc.hard_negatives, self.state.rng)
        else:
            hard = np.full((len(batch), 0), -1, dtype=np.int64)
        local = np.arange(self.rank, len(batch), self.world)
        qi, pi = batch[local, 0], batch[local, 1]
        hn = hard[local].ravel()
        hn = hn[hn >= 0]
        b = len(qi)
        d_rows = np.concatenate([pi, hn])
        n_main = len(d_rows)
        neighbours = tc.lambda_neighbours > 0 and self.state.route_targets is not None
        if neighbours:  # random documents, held to their own leaves (drawn on every rank alike)
            r_rows = self.state.rng.integers(0, len(self.doc_feats), tc.batch_size)[np.arange(self.rank, tc.batch_size, self.world)]
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
                [p[:b] for p in level_probs], [dev_t(target[qi]) for target in self.state.route_targets], dev_t(self.state.query_paths[qi])
            )
            rp = self.state.doc_paths[r_rows]
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

    def _run(self, epochs: int, out_dir, progress: bool, on_epoch) -> None:
        tc = self.config.train
        pairs = self.train_set.pairs
        for epoch in range(self.state.epoch, epochs):
            if tc.hard_negatives > 0 and epoch % tc.refresh_every == 0:
                with self.phase("refresh_negatives"):
                    self.refresh_negatives()
            if tc.lambda_neighbours > 0 and (epoch % tc.refresh_every == 0 or self.state.route_targets is None):
                with self.phase("refresh_targets"):
                    self.refresh_routing_targets()
            with self.phase("train_epochs"):
                record = self._epoch(epoch, pairs, progress, epochs)
            if tc.recluster_every and (epoch + 1) % tc.recluster_every == 0:
                with self.phase("recluster"):
                    self.recluster()
                record["reclustered"] = True
            if self.state.stage == "refit":
                record["stage"] = "refit"
            self.state.history.append(record)
            self.state.epoch = epoch + 1
            if progress:
                tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if self.validator is not None and self.state.stage == "select":
                self._validate(epoch + 1, progress)
            if out_dir is not None and is_main():
                self.save_checkpoint(checkpoint_path(out_dir))
            barrier()
            if on_epoch is not None:
                on_epoch(self, record)

    def _epoch(self, epoch: int, pairs: np.ndarray, progress: bool, total: int) -> dict:
        tc = self.config.train
        self.encoder.train()
        self.tree.train()
        order = self.state.rng.permutation(len(pairs))
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(
            range(0, len(order), tc.batch_size),
            desc=f"{'refit ' if self.state.stage == 'refit' else ''}epoch {epoch + 1}/{total}",
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
