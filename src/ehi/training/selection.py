"""Selection: which trained state ships, and why.

Held-out queries score the learned tree and k-means over the current encoder after every
epoch; the best state is kept, the run refits on every training query for that many epochs,
and the router fit is scaled by the factor held-out queries prefer (validation.py scores,
router_fit.py fits). A mixin of ``Trainer`` (trainer.py); its state is ``Trainer.state``."""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ehi.config import PRECOMPUTED
from ehi.data import document_spans
from ehi.encode.cache import Features
from ehi.model.ehi_model import EHIModel
from ehi.training.loop import TrainingSet, _normalised, seed_everything
from ehi.training.router_fit import fit_router, routing_examples, shrunk
from ehi.training.state import Best
from ehi.training.validation import format_validation, selection_message, untouched_worse

log = logging.getLogger("ehi.training")


class Selection:
    """Validation of candidates, the choice and its reason, the refit plan, the router fit."""

    def _refit_set(self, split, query_ids, val_qids, val_feats, query_embeddings) -> None:
        """Every training query and its features, for the refit (when the held-out queries
        came from the training split and the refit is on)."""
        dataset, tc = self.dataset, self.config.train
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
                if query_embeddings is not None:
                    row = {q: i for i, q in enumerate(dataset.queries)}
                    rows = _normalised(query_embeddings[[row[q] for q in rest]]).numpy()
                else:
                    rows = self._features([dataset.queries[q] for q in rest], "encoding queries").rows()
                feats.update(zip(rest, rows))
            self.full_q_feats = Features.from_rows([feats[q] for q in self.full_set.query_ids], self.q_feats)

    def _kmeans_tree(self, d_emb: np.ndarray | None = None) -> None:
        """The tree's weights only: k-means over the current documents, U at its small start."""
        self.tree.reset_to_kmeans(self._doc_embeddings() if d_emb is None else d_emb, seed=self.config.train.seed)

    def _validate(self, epoch: int, progress: bool) -> dict:
        tc = self.config.train
        with self.phase("validate"):
            d_emb = self._doc_embeddings()  # once: only the tree changes between the candidates
            entry = {"epoch": epoch, **self.validator(EHIModel(self.config, self.encoder, self.tree), d_emb)}
            learned = self._state()
            candidates = [(entry, False, learned)]
            if tc.val_recluster and epoch > 0:
                self._kmeans_tree(d_emb)
                km = self.validator(EHIModel(self.config, self.encoder, self.tree), d_emb)
                entry["kmeans"] = km
                candidates.append((km, True, self._state()))
                self._load_state(learned)
        self.state.validation.append(entry)
        for judged, reclustered, state in candidates:
            if self._refused(judged):
                continue
            if self.state.best is None or judged["score"] > self.state.best[1]:
                self.state.best = Best(epoch, judged["score"], state, reclustered)
        if progress:
            tqdm.write(f"validation epoch {epoch}: " + format_validation(entry))
        return entry

    def _refused(self, judged: dict) -> bool:
        """The guard of documents no training query touches: a state whose held-out Recall@100
        on them is clearly (beyond the noise, ``untouched_worse``) below the k-means start's
        is never kept, however well it does on the others. The start's per-query figures are
        kept in its entry (the reference, also across a resume); the others' are dropped."""
        new = judged.get("new_documents")
        if not new or "per_query" not in new:
            return False
        if judged is self.state.validation[0]:
            return False  # the reference itself
        per_query = new.pop("per_query")
        start = self.state.validation[0].get("new_documents") if self.state.validation else None
        why = untouched_worse(start["per_query"], per_query) if start and "per_query" in start else None
        if why:
            judged["refused"] = why
        return why is not None

    def restore_best(self, progress: bool = True) -> None:
        """Go back to the best validated state (the k-means start if training never beat it)."""
        if self.state.best is None:
            return
        epoch, score, state, reclustered = self.state.best
        self._load_state(state)
        msg = selection_message(self.state.validation, epoch, reclustered)
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
            "kept_epoch": self.state.best[0] if self.state.best else None,
            "kept_tree": ("k-means over that epoch's encoder" if self.state.best[3] else "learned") if self.state.best else None,
            "refit": (
                {"epochs": self.state.refit_epochs, "queries": len(self.full_set.query_ids)} if self.state.stage == "refit" else None
            ),
            "why": selection_message(self.state.validation, self.state.best[0], self.state.best[3]) if self.state.best else "",
            "route_fit": self.state.route_fit,
            # the reference's per-query figures stay in the checkpoint (the guard needs them on
            # a resume), not in the model's metadata
            "curve": [{**e, "new_documents": {k: v for k, v in e["new_documents"].items() if k != "per_query"}}
                      if "new_documents" in e else e for e in self.state.validation],
        }

    # ---- the router fitted to search (router_fit.py) -------------------------------------------
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
        if self.validator is None or self.state.best is None:  # nothing to choose on
            self.state.route_fit = {"kept": max(tc.route_fit_shrink), "scores": None}
            return
        start = self._state()
        d_emb = self._doc_embeddings()  # once: the fit and its candidates share the encoder
        fitted = self._fit_router(self.train_set, self.q_feats, d_emb)
        scores = {"0": self.state.best[1]}
        with self.phase("validate"):
            for a in tc.route_fit_shrink:
                self._load_state(shrunk(start, fitted, a))
                scores[f"{a:g}"] = self.validator(EHIModel(self.config, self.encoder, self.tree), d_emb)["score"]
        self._load_state(start)
        kept = max(scores, key=lambda k: (scores[k], -float(k)))
        self.state.route_fit = {"kept": float(kept), "scores": scores}
        if progress:
            tqdm.write(f"router fit: held-out score by shrink factor {' '.join(f'{k}:{v:.2f}' for k, v in scores.items())}; kept {kept}")

    def apply_route_fit(self, progress: bool = True) -> None:
        """Fit the final tree's router on every training query, scaled by the kept factor."""
        start = self._state()
        train_set, q_feats = (self.full_set, self.full_q_feats) if self.full_set is not None else (self.train_set, self.q_feats)
        fitted = self._fit_router(train_set, q_feats, self._doc_embeddings())
        self._load_state(shrunk(start, fitted, self.state.route_fit["kept"]))
        if progress:
            tqdm.write(f"router fit on {len(train_set.query_ids)} training queries, shrink {self.state.route_fit['kept']:g}")

    def _enter_refit(self, epochs: int, progress: bool = False) -> None:
        """Back to the start (k-means tree, identity adapter, fresh optimiser and RNG), now with
        every training query, for the number of epochs validation chose."""
        tc = self.config.train
        self.state.stage, self.state.refit_epochs = "refit", epochs
        self._load_state(self.start_state)
        self.optimizer = self._optimizer()
        seed_everything(tc.seed)
        self.state.rng = np.random.default_rng(tc.seed)
        self.train_set, self.q_feats = self.full_set, self.full_q_feats
        getattr(self.joint, "module", self.joint).q_feats = self.q_feats
        self.state.pool = None
        self.state.route_targets = None
        self.state.epoch = 0
        if progress:
            tqdm.write(f"refit: training again on all {len(self.train_set.query_ids)} training queries for {epochs} epochs")
