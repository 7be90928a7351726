"""EHI's three triplet hinges (margin gamma), on cosine similarities.

Each query in a batch is contrasted with every negative it may see (the other queries'
positives and all hard negatives of the batch), minus its own known positives (``mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def triplet_hinge(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    mask: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """mean over valid (i, j) of max(0, margin - cos(a_i, p_i) + cos(a_i, n_j)).

    anchor, positive: (b, d); negatives: (m, d); mask: (b, m) bool, True where n_j counts.
    Returns 0 (with a gradient path) when no pair is valid.
    """
    a = F.normalize(anchor, dim=-1)
    s_pos = (a * F.normalize(positive, dim=-1)).sum(-1, keepdim=True)
    s_neg = a @ F.normalize(negatives, dim=-1).T
    hinge = F.relu(margin - s_pos + s_neg) * mask
    return hinge.sum() / mask.sum().clamp_min(1)


def ehi_losses(
    e_q: torch.Tensor,
    e_p: torch.Tensor,
    e_n: torch.Tensor,
    t_q: torch.Tensor,
    t_p: torch.Tensor,
    t_n: torch.Tensor,
    neg_mask: torch.Tensor,
    same_doc: torch.Tensor,
    margin: float = 0.3,
    tau: float = 0.9,
    negative_tau: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The three terms, unweighted.

    e_*: encoder embeddings, t_*: path embeddings of queries (b), positives (b), negatives (m).
    neg_mask (b, m): n_j is a valid negative for query i. same_doc (b, m): n_j is p_i itself.
    - siamese: anchor q, positive p, negatives n on encoder embeddings;
    - indexing: the same triplets on path embeddings, pulling q's path toward p's;
    - intra-leaf: anchor p, positive q, negative n on path embeddings, only for documents
      that are not near-duplicates (cos(e_p, e_n) < tau): such documents should not share
      p's leaf more than its query does.
    With ``negative_tau`` < 1, negatives at least that similar to the positive are dropped
    from all three.
    """
    with torch.no_grad():
        doc_cos = F.normalize(e_p, dim=-1) @ F.normalize(e_n, dim=-1).T
        if negative_tau < 1.0:  # near-duplicates of the positive: likely unlabelled positives
            neg_mask = neg_mask & (doc_cos < negative_tau)
    siamese = triplet_hinge(e_q, e_p, e_n, neg_mask, margin)
    indexing = triplet_hinge(t_q, t_p, t_n, neg_mask, margin)
    with torch.no_grad():
        intra_mask = neg_mask & ~same_doc & (doc_cos < tau)
    intra = triplet_hinge(t_p, t_q, t_n, intra_mask, margin)
    return {"siamese": siamese, "indexing": indexing, "intra_leaf": intra}


def routing_cross_entropy(query_probs: list[torch.Tensor], doc_probs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over levels of -log p_q(level choice of the positive), where the query's and the
    positive's arg-max prefixes agree (a level's distribution is conditioned on its prefix).

    query_probs, doc_probs: H tensors (b, B) for queries and their positives, row-aligned."""
    total = query_probs[0].new_zeros(())
    agree = torch.ones(query_probs[0].shape[0], dtype=torch.bool, device=query_probs[0].device)
    for pq, pd in zip(query_probs, doc_probs):
        target = pd.detach().argmax(-1)
        nll = -torch.log(pq.gather(1, target[:, None]).squeeze(1).clamp_min(1e-12))
        total = total + (nll * agree).sum() / agree.sum().clamp_min(1)
        agree = agree & (pq.detach().argmax(-1) == target)
    return total / len(query_probs)


def soft_routing_cross_entropy(level_probs: list[torch.Tensor], targets: list[torch.Tensor], prefixes: torch.Tensor) -> torch.Tensor:
    """Mean over levels of -sum_j t_j log p_j: each level's distribution against a target
    distribution over its children (the share of a query's exact neighbours under each child,
    or a document's own child), counted where the row's arg-max prefix is still the one the
    target was computed under and the target is not empty.

    level_probs, targets: H tensors (b, B); prefixes: (b, H) child indices the targets follow."""
    total = level_probs[0].new_zeros(())
    agree = torch.ones(level_probs[0].shape[0], dtype=torch.bool, device=level_probs[0].device)
    for h, (p, t) in enumerate(zip(level_probs, targets)):
        nll = -(t * torch.log(p.clamp_min(1e-12))).sum(-1)
        w = agree & (t.sum(-1) > 0)
        total = total + (nll * w).sum() / w.sum().clamp_min(1)
        agree = agree & (p.detach().argmax(-1) == prefixes[:, h])
    return total / len(level_probs)


def load_balance_penalty(level_probs: list[torch.Tensor]) -> torch.Tensor:
    """B * sum_j mean_batch(p_j)^2 - 1 per level, summed: 0 when the batch spreads evenly."""
    total = level_probs[0].new_zeros(())
    for p in level_probs:
        m = p.mean(0)
        total = total + p.shape[1] * (m * m).sum() - 1.0
    return total
