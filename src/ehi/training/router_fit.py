"""Fitting the router to what search does, without starving new documents (issue 20).

The joint losses pull a query's path embedding toward its positive's; search instead ranks
leaves, and visits the first few. A router fitted by cross-entropy toward the leaf of each
training query's positive ranks that leaf first more often for questions like the training
ones, but alone it pulls *every* question toward the leaves training questions reached and
starves the documents no question touched (SQuAD's unseen articles: -31 R@100 at 1 % visited,
``benchmarks/experiments/routing_generalization.py``). Two things keep those leaves reachable:

- every document teaches its own leaf through a few spans of its text (query-like rows);
- the loss is logit-adjusted (Menon et al., ICLR 2021): the examples' prior over each level's
  children is added inside the softmax, so the fitted scores carry no bonus for the leaves
  where training traffic went.

Documents are re-routed by the fitted tree at index time (nearly the same leaves: within 0.3
R@100 of keeping them). How far to move from the unfitted router (a shrink factor on the
parameter change) is chosen on held-out queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ehi.model.tree import Tree


@dataclass
class RoutingExamples:
    """Rows to route, the path each should follow, and what each weighs."""

    emb: np.ndarray  # (n, d)
    path: np.ndarray  # (n, H) child per level
    weight: np.ndarray  # (n,)


def routing_examples(
    q_emb: np.ndarray, positives: np.ndarray, doc_paths: np.ndarray, span_emb: np.ndarray, span_rows: np.ndarray, span_weight: float
) -> RoutingExamples:
    """Each (query, positive) toward the positive's path, a query weighing 1 in all; each span
    toward its document's path, one document's spans weighing ``span_weight`` together.

    positives (Q, P) document rows, -1 padded; doc_paths (N, H); span_rows (S,) document rows."""
    qi, pi = np.nonzero(positives >= 0)
    docs = positives[qi, pi]
    per_query = (positives >= 0).sum(1)
    spans_per_doc = np.bincount(span_rows, minlength=len(doc_paths))
    emb = np.concatenate([q_emb[qi], span_emb]).astype(np.float32, copy=False)
    path = np.concatenate([doc_paths[docs], doc_paths[span_rows]])
    weight = np.concatenate([1.0 / per_query[qi], span_weight / np.maximum(spans_per_doc[span_rows], 1)])
    return RoutingExamples(emb, path.astype(np.int64), weight.astype(np.float32))


def child_log_prior(path: np.ndarray, weight: np.ndarray, branching: int) -> list[torch.Tensor]:
    """Per level h, (B^h, B): the log share of the examples' weight under each child of each
    node, smoothed so that a child no example reaches still has a finite prior."""
    out, node = [], np.zeros(len(path), dtype=np.int64)
    for h in range(path.shape[1]):
        counts = np.zeros((branching**h, branching))
        np.add.at(counts, (node, path[:, h]), weight)
        counts += 1e-3 * max(float(weight.sum()), 1.0) / counts.size
        out.append(torch.from_numpy(np.log(counts / counts.sum(1, keepdims=True)).astype(np.float32)))
        node = node * branching + path[:, h]
    return out


def fit_router(
    tree: Tree, ex: RoutingExamples, epochs: int, lr: float, weight_decay: float, seed: int, batch_size: int = 256,
    adjust: bool = True,
) -> None:
    """Logit-adjusted (``adjust``), weighted cross-entropy of each level toward the examples'
    paths (each level under the example's own prefix), with AdamW on the tree's parameters."""
    g = torch.Generator().manual_seed(seed)
    device = next(tree.parameters()).device
    priors = [p.to(device) if adjust else torch.zeros_like(p, device=device) for p in child_log_prior(ex.path, ex.weight, tree.B)]
    X = torch.from_numpy(ex.emb).to(device)
    P = torch.from_numpy(ex.path).to(device)
    Wt = torch.from_numpy(ex.weight).to(device)
    nodes = [torch.zeros(len(P), dtype=torch.long, device=device)]
    for h in range(tree.H - 1):
        nodes.append(nodes[-1] * tree.B + P[:, h])
    opt = torch.optim.AdamW(tree.parameters(), lr=lr, weight_decay=weight_decay)
    tree.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g).to(device)
        for s in range(0, len(X), batch_size):
            i = perm[s : s + batch_size]
            loss = X.new_zeros(())
            for h, logp in enumerate(tree.forced_logp(X[i], P[i])):
                adjusted = torch.log_softmax(logp + priors[h][nodes[h][i]], dim=-1)
                nll = -adjusted.gather(1, P[i, h : h + 1])[:, 0]
                loss = loss + (nll * Wt[i]).sum() / Wt[i].sum()
            opt.zero_grad(set_to_none=True)
            (loss / tree.H).backward()
            opt.step()
    tree.eval()


def shrunk(start: dict[str, torch.Tensor], fitted: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The tree state ``start + alpha * (fitted - start)``: alpha 0 is the unfitted router."""
    return {k: start[k] + alpha * (fitted[k] - start[k]) for k in start}
