"""Which leaves a search visits, and where documents are stored.

The learned tree *places* documents (and training mines its negatives from the leaves it
reaches); a search *routes* by the config's router: the spread sketch of each leaf's
documents (``spread``, default) or the same tree (``tree``)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np

from ehi.config import EHIConfig
from ehi.model.calibration import Calibration, measure
from ehi.model.leaf_sketch import LeafSketch
from ehi.model.tree import Tree


class Router:
    """A tree and the search router over an index's leaves, with its budget calibration.

    Training uses it directly (``place``); ``EHIModel`` routes its searches through it.

    Examples
    --------
    >>> router = Router(tree, config)                     # doctest: +SKIP
    >>> router.place(doc_embeddings, width=1)[:, 0]       # each document's top leaf  # doctest: +SKIP
    """

    def __init__(self, tree: Tree, config: EHIConfig, calibration: Calibration | None = None):
        self.tree, self.config = tree, config
        self.calibration = calibration or Calibration()
        self.sketch: LeafSketch | None = None  # the spread router's, of the current index
        self._params: tuple | None = None
        self._snapshot = self._version = None

    def route(self, emb: np.ndarray, beam: int, index=None) -> np.ndarray:
        """The leaves a search visits: top-``beam`` per row, best first (N, min(beam, L))."""
        ic = self.config.index
        if ic.router == "spread" and index is not None:
            return self.leaf_sketch(index).top(emb, beam, ic.spread_lambda)
        return self.snapshot().leaves(emb, beam, self.upper_beam(beam))

    @contextmanager
    def sweeping(self, index=None):
        """Routes inside reuse a large batch's leaf order across widths (``LeafSketch.sweeping``)."""
        spread = self.config.index.router == "spread" and index is not None
        with self.leaf_sketch(index).sweeping() if spread else nullcontext():
            yield

    def place(self, emb: np.ndarray, width: int) -> np.ndarray:
        """The learned tree's top-``width`` leaves per row, best first: where documents are
        stored and the leaves training mines and routes by (``place_upper`` nodes above)."""
        return self.snapshot().leaves(emb, width, self.place_upper(width))

    def place_upper(self, width: int) -> int:
        """Nodes kept above the leaves when placing: the tree router's search beam (a document
        is where that search looks), but every node under the spread router, which ranks the
        leaves themselves. A deep tree then stores each document in its best leaf of all, as
        a flat tree over the same leaves would; B/2 nodes per level misplaced documents near
        cell borders (untrained (6, 3) tree on SciFact: 4-6 points of Recall@100 lost at
        <= 1-5 %, docs/performance.md "Depth")."""
        if self.config.index.router == "spread" and self.tree.config.height > 1:
            return self.tree.num_leaves // self.tree.config.branching
        return self.upper_beam(width)

    def leaf_sketch(self, index) -> LeafSketch:
        """Each leaf's mean and spread of its documents (fitted from ``index`` on first use;
        ``sketch = None`` whenever the documents change)."""
        ic = self.config.index
        if self.sketch is None:
            self.sketch = LeafSketch.fit(index.vectors, index.doc_leaves, self.tree.num_leaves, ic.spread_rank, ic.spread_basis,
                                         ic.spread_candidates)
        # the search rule (basis, candidates) is the config's, whichever sketch was read or fitted
        self.sketch = self.sketch.with_search(ic.spread_basis, ic.spread_candidates)
        return self.sketch

    def snapshot(self):
        """The tree routed in numpy, re-taken whenever its weights changed (training steps)."""
        if self._params is None or self._params[0] is not self.tree:
            self._params = (self.tree, list(self.tree.parameters()))
        version = [p._version for p in self._params[1]]
        if self._version != version:
            self._snapshot, self._version = self.tree.router(), version
        return self._snapshot

    def upper_beam(self, beam: int) -> int:
        """Nodes kept above the leaves for a search of ``beam`` leaves: calibrated per width,
        else max(beam, the config's upper beam)."""
        return self.calibration.upper_beam(beam, max(beam, self.config.tree.search_upper_beam()))

    def calibrate(self, index, query_emb: np.ndarray) -> Calibration:
        with self.sweeping(index):
            self.calibration = measure(self, index, query_emb)
        return self.calibration

    def recalibrate(self, index, sample: int = 2000, seed: int = 0) -> None:
        """Re-measured after the corpus changed, documents standing in for queries (training
        queries are not kept with the model)."""
        emb = index.vectors
        rows = np.sort(np.random.default_rng(seed).choice(len(emb), size=min(sample, len(emb)), replace=False))
        self.calibrate(index, emb[rows])
