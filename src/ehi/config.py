"""Typed configuration saved beside every model (``config.json``).

Defaults are the ones measured on SciFact (see README): they must train within the
CPU budget and beat Faiss-IVF at equal fraction of the corpus visited.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PRECOMPUTED = "precomputed"  # model_name of a model trained on the user's own embeddings
Scope = Literal["adapter", "top-k", "full"]
Init = Literal["kmeans", "random"]
NegativesFrom = Literal["tree", "exact"]
Codec = Literal["flat", "sq8", "pq"]
Conditioning = Literal["per-node", "one-hot"]
NodeInit = Literal["bottom-up", "top-down"]
LeafRank = Literal["leaf", "path"]
ValGroup = Literal["auto", "random", "documents"]
SCOPES, INITS, NEGATIVES_FROM, CODECS = get_args(Scope), get_args(Init), get_args(NegativesFrom), get_args(Codec)
CONDITIONINGS, NODE_INITS, LEAF_RANKS = get_args(Conditioning), get_args(NodeInit), get_args(LeafRank)
VAL_GROUPS = get_args(ValGroup)


# what runs the frozen transformer (ehi.encode.onnx): auto = ONNX Runtime where it can
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


@dataclass
class EncoderConfig:
    model_name: str = DEFAULT_MODEL
    # adapter: frozen transformer, cached embeddings, trainable residual linear layer (identity init).
    # top-k: frozen lower layers cached, the top ``top_k_layers`` transformer layers trained.
    # full: the whole transformer trained (GPU territory).
    scope: Scope = "adapter"
    top_k_layers: int = 1
    max_seq_length: int = 256
    encode_batch_size: int = 64
    dim: int = 0  # embedding size; only read for precomputed embeddings
    # what runs the frozen transformer: auto = ONNX Runtime where it can (adapter scope on the
    # CPU: the same embeddings to 1e-7, faster), else torch; onnx-int8 is quantized (opt-in)
    backend: str = "auto"

    def validate(self) -> None:
        if self.model_name == PRECOMPUTED and (self.scope != "adapter" or self.dim < 1):
            raise ValueError("precomputed embeddings need scope 'adapter' and dim >= 1")
        if self.scope not in SCOPES:
            raise ValueError(f"encoder scope must be one of {SCOPES}, got {self.scope!r}")
        if self.top_k_layers < 1:
            raise ValueError("top_k_layers must be >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"encoder backend must be one of {BACKENDS}, got {self.backend!r}")


# the leaf count from which an auto-height tree has two levels (TreeConfig.resolve_height):
# a (128, 2) tree's training step costs 0.46-0.53x a flat tree's at 16,384 leaves, but a
# (64, 2) one's 1.10-1.14x at 4,096 (two runs of benchmarks/depth_cost.py)
AUTO_DEEP_LEAVES = 16384


@dataclass
class TreeConfig:
    # 0 = auto, resolved when training sees the corpus (``resolve_branching``): about 4·sqrt(N)
    # leaves, rounded to a power of two (Faiss's rule of thumb for nlist). On SciFact and
    # Climate-FEVER (~5k documents) that is 256 leaves of ~20 documents, which beat 128 on the
    # held-out queries of both (benchmarks/experiments/generalization.py)
    branching: int = 0
    # 0 = auto, resolved with the branching (``resolve_height``): one level below
    # AUTO_DEEP_LEAVES leaves (16.8M documents at the auto leaf count), two from there. A search
    # ranks the leaves themselves (spread router), so depth changes what training costs, not
    # what a search costs; and at equal leaves a trained (12, 2) tree still recalls 5-6 points
    # less than (144, 1) at <= 1-2 % on SciFact (SQuAD: within 0.7), docs/performance.md "Depth"
    height: int = 0
    init: Init = "kmeans"
    # softmax temperature of the k-means initialisation: W = centroids / temperature
    temperature: float = 0.1
    kmeans_iters: int = 25
    # how a level below the first knows the path above (H > 1; one level is the same either way):
    # per-node = one B-way classifier per node (a (B^h, d, B) weight tensor gathered by the
    # prefix), initialised by hierarchical k-means; one-hot = the paper's shared classifier fed
    # [o(i^{h-1}); ...; o(i^1); e] (kept for comparison; README "Depth")
    conditioning: Conditioning = "per-node"
    # per-node k-means start: bottom-up = flat k-means leaves grouped into balanced cells of B
    # (a deep tree whose leaves are a flat tree's); top-down = each cell's children k-means'd
    # inside it (benchmarks/experiments/hierarchy_cells.py measures both)
    node_init: NodeInit = "bottom-up"
    # search keeps max(beam, upper_beam) nodes at the levels above the leaves (H > 1; 0 = auto:
    # B/2 for per-node trees ranked by leaf) and ranks the leaves under them by their own score
    # (leaf) or by the path probability (path, the paper's); measured in README "Depth"
    upper_beam: int = 0
    leaf_rank: LeafRank = "leaf"
    # a beam per level for per-node (B, 2) trees ranked by leaf with upper_beam 0 (0 = off):
    # the cells expanded for each beam width are calibrated on training queries (with the
    # budget calibration) as the fewest whose top leaves agree on this share with expanding
    # every cell. Off by default: at 0.95 it tied B/2 cells at <= 2-5 % on both corpora, lost
    # up to 1.6 points at 10-20 %, and at 16k leaves it needs 64-128 cells (README "Depth")
    upper_agreement: float = 0.0

    def search_upper_beam(self) -> int:
        if self.upper_beam or self.height == 1:
            return self.upper_beam
        return -(-self.branching // 2) if self.conditioning == "per-node" and self.leaf_rank == "leaf" else 0

    @property
    def num_leaves(self) -> int:
        return self.branching**self.height

    @staticmethod
    def auto_leaves(num_docs: int) -> float:
        """About 4·sqrt(N) leaves (Faiss's rule of thumb for nlist), at most one per 2 documents."""
        return max(2.0, min(4 * math.sqrt(num_docs), num_docs / 2))

    def resolve_height(self, num_docs: int) -> int:
        """The auto height for a corpus of ``num_docs``: 1 while the auto leaf count is below
        AUTO_DEEP_LEAVES, else 2; 1 when only the branching is given (B leaves, as asked)."""
        if self.height:
            return self.height
        return 1 if self.branching or self.auto_leaves(num_docs) < AUTO_DEEP_LEAVES else 2

    def resolve_branching(self, num_docs: int) -> int:
        """The auto branching for a corpus of ``num_docs``: B^H ~ 4·sqrt(N) leaves, B a power of
        two, at least 2, and at most one leaf per 2 documents."""
        if self.branching:
            return self.branching
        height = self.resolve_height(num_docs)
        b = 2 ** round(math.log2(self.auto_leaves(num_docs)) / height)
        while b > 2 and b**height > num_docs:
            b //= 2
        return max(2, b)

    def resolved(self, num_docs: int) -> tuple[int, int]:
        """(B, H) for a corpus of ``num_docs``: the given values, auto where 0."""
        return self.resolve_branching(num_docs), self.resolve_height(num_docs)

    def leaves_for(self, num_docs: int) -> int:
        """B^H for a corpus of ``num_docs`` (auto values resolved)."""
        b, h = self.resolved(num_docs)
        return b**h

    def validate(self) -> None:
        if self.branching != 0 and self.branching < 2:
            raise ValueError(f"branching B must be >= 2 (or 0 for auto), got {self.branching}")
        if self.height < 0:
            raise ValueError(f"height H must be >= 1 (or 0 for auto), got {self.height}")
        if self.init not in INITS:
            raise ValueError(f"tree init must be one of {INITS}, got {self.init!r}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.upper_beam < 0:
            raise ValueError("upper_beam must be >= 0")
        if not 0 <= self.upper_agreement <= 1:
            raise ValueError(f"upper_agreement must be in [0, 1] (0 = off), got {self.upper_agreement}")
        if self.node_init not in NODE_INITS or self.leaf_rank not in LEAF_RANKS:
            raise ValueError(f"node_init must be one of {NODE_INITS} and leaf_rank one of {LEAF_RANKS}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"tree conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr_encoder: float = 2e-4
    lr_indexer: float = 1e-3
    weight_decay: float = 0.01
    margin: float = 0.3  # gamma of all three triplet hinges
    tau: float = 0.9  # intra-leaf loss applies to document pairs with cosine below tau
    lambda_siamese: float = 1.0
    lambda_indexing: float = 1.0
    lambda_intra_leaf: float = 0.1
    # scale of the tree losses' gradient that reaches the encoder (1 = fully joint, 0 = the
    # encoder learns from the siamese loss only while the tree adapts to it)
    tree_grad_to_encoder: float = 1.0
    load_balance: float = 0.3  # weight of the batch load-balance penalty (0 disables it)
    # weight of ||theta - theta_0||^2 / ||theta_0||^2 over the tree's parameters: keeps the tree
    # near its k-means start, which also routes the documents no training query touches
    tree_anchor: float = 0.0
    # negatives whose cosine to the positive is >= this are treated as unlabelled positives and
    # left out of every hinge (1 = off); dense corpora hold many near-duplicate evidence texts
    negative_tau: float = 1.0
    # weight of a cross-entropy that routes each query to its positive's leaf at every level
    # (where their prefixes agree): it ranks the right leaf among all, which beam search needs
    lambda_routing: float = 0.0
    # weight of a soft cross-entropy routing each query to the leaves that hold its exact
    # neighbours (their share per child, refreshed with the negatives every ``refresh_every``
    # epochs) plus each of ``batch_size`` random documents to its own current leaf, which keeps
    # the partition in place while the router learns the queries (unsupervised training, where
    # the neighbours are the teacher's; README "No labels")
    lambda_neighbours: float = 0.0
    # every this many epochs (0 = never) the tree is re-initialised by k-means over the current
    # encoder's documents, so that a moved encoder does not leave it routing a stale geometry
    recluster_every: int = 0
    # after training, the router is fitted to what search does (training/router_fit.py): this many epochs of
    # logit-adjusted cross-entropy toward the leaf of each training query's positive and of each
    # of ``route_fit_spans`` spans per document toward its document's leaf (0 = auto: about
    # 50,000 spans, 1 to 4 per document, as measured: 4 on SciFact, 2 on SQuAD); the change
    # is scaled by each ``route_fit_shrink`` factor and the best on held-out queries kept (the
    # unfitted router, factor 0, is always a candidate; without validation the largest is used)
    route_fit_epochs: int = 5  # 0 = off
    route_fit_lr: float = 1e-3
    route_fit_spans: int = 0
    # what one document's spans weigh together, against one training query
    route_fit_span_weight: float = 4.0
    route_fit_shrink: list[float] = field(default_factory=lambda: [0.5, 1.0])

    def spans_per_document(self, num_docs: int) -> int:
        """``route_fit_spans``, or the auto count for a corpus of ``num_docs``."""
        return self.route_fit_spans or min(4, max(1, round(50_000 / max(num_docs, 1))))
    hard_negatives: int = 4  # hard negatives per (query, positive) pair, 0 = in-batch only
    # where hard negatives come from: "tree" (the leaves the query reaches, EHI) or "exact"
    # (exact search over the corpus, as a plain dual encoder is trained)
    negatives_from: NegativesFrom = "tree"
    refresh_every: int = 5  # epochs between hard-negative refreshes (r)
    # leaves per query searched when mining hard negatives: 16 (of 256) beat 2 on both decision
    # corpora at 1 % visited (Climate-FEVER dev +10.7, SciFact held-out +2.6; 3 seeds) and tied
    # exact-search mining; benchmarks/results/mining_negatives.json
    mining_beam: int = 16
    mining_pool: int = 50  # candidates per query (ranked by cosine) to sample negatives from
    seed: int = 0
    device: str = "cpu"
    # Validated training: routing quality (Recall@100 at ``val_budgets`` of the corpus visited)
    # is measured on held-out queries at epoch 0 (the k-means tree) and after every epoch, and
    # the best state is kept, so a tree that routes worse than its start is never shipped.
    # Held out: ``val_split``'s qrels if named (never the split you report on), otherwise
    # ``val_fraction`` of the training queries (0 = no validation, keep the last epoch).
    val_fraction: float = 0.2
    val_split: str = ""
    # how the held-out queries are drawn: "random" (their documents keep other training
    # queries), "documents" (whole document groups — an article's paragraphs when titles
    # repeat, else single documents — so the held-out queries point at documents no training
    # query touches, which is what a user's new documents are; issue 20) or "auto": random,
    # unless under a quarter of those are untouched (every training query's article has many
    # questions, as in SQuAD), then half random and half whole groups, so that validation's
    # untouched guard has queries enough to refuse an encoder that loses on new documents
    val_group: ValGroup = "auto"
    # at most this many queries are held out (0 = no cap): 2,000 judge routing to within about
    # a point, and every extra one is a query the selection stage does not train on
    val_max_queries: int = 2000
    # training pairs one stage sees at most (0 = no cap): a large training set gets fewer
    # epochs (SQuAD's 66k pairs: 3), so that training stays within minutes on a CPU
    max_pairs: int = 250_000
    val_budgets: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2])
    # after validation picked the epoch, train again from the same start on every training
    # query (the held-out ones included) for that many epochs: few-query corpora need them all
    val_refit: bool = True
    # also validate, after each epoch, k-means over the current encoder's documents in place of
    # the learned tree, and keep it when it routes the held-out queries better: the shipped
    # tree is then never worse on them than k-means over the very encoder EHI trained
    val_recluster: bool = True

    def validate(self) -> None:
        if self.val_group not in VAL_GROUPS:
            raise ValueError(f"val_group must be one of {', '.join(VAL_GROUPS)}, got {self.val_group!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.val_budgets or not all(0 < b <= 1 for b in self.val_budgets):
            raise ValueError(f"val_budgets must be fractions in (0, 1], got {self.val_budgets}")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (in-batch negatives)")
        if self.negatives_from not in NEGATIVES_FROM:
            raise ValueError(f"negatives_from must be one of {NEGATIVES_FROM}, got {self.negatives_from!r}")
        if self.recluster_every < 0:
            raise ValueError("recluster_every must be >= 0")
        if self.route_fit_epochs < 0 or self.route_fit_spans < 0 or self.route_fit_span_weight < 0:
            raise ValueError("route_fit_epochs, route_fit_spans and route_fit_span_weight must be >= 0")
        if not all(0 < a <= 1 for a in self.route_fit_shrink):
            raise ValueError(f"route_fit_shrink must be factors in (0, 1], got {self.route_fit_shrink}")
        if self.val_max_queries < 0 or self.max_pairs < 0:
            raise ValueError("val_max_queries and max_pairs must be >= 0 (0 = no cap)")
        if self.refresh_every < 1:
            raise ValueError("refresh_every must be >= 1")


ROUTERS = ("spread", "tree")


@dataclass
class IndexConfig:
    d2l: int = 1  # leaves each document is stored in
    # how the visited leaves' vectors are stored and scanned (Faiss): flat = float32, exact
    # cosine; sq8 = 8-bit scalar quantizer (1/4 the bytes); pq = product quantizer with pq_m
    # one-byte codes per vector (0: dim/8), re-ranked exactly on its top ``rerank`` (0 = off)
    codec: Codec = "flat"
    pq_m: int = 0
    rerank: int = 0
    # files the lists are saved in: 1 = index.faiss; S > 1 = S shard files holding whole
    # leaves, balanced by documents, for serving from S processes or machines (index/shards.py)
    shards: int = 1
    # how a search picks its leaves: "spread" scores every leaf by its documents' mean inner
    # product with the query plus spread_lambda times their spread along it (leaf_sketch.py;
    # no training question shapes it, so it routes questions about documents no training
    # query touched as well as the others); "tree" by the learned tree's path probability
    # (cheaper: no (L, rank, d) sketch to multiply). Chosen on decision splits of three corpora
    # (benchmarks/spread_routing.py). Documents are placed by the tree either way.
    router: str = "spread"
    spread_lambda: float = 2.0
    spread_rank: int = 8
    # what makes the spread router cheap without changing its choices: a basis of spread_basis
    # dimensions shared by every leaf's directions gives a cheap score, which picks
    # max(24, spread_candidates x beam) leaves to score exactly while that is at most an eighth of
    # the leaves (beyond, and with 0: every leaf scored exactly).
    # (64, 4) kept the Recall@100 of scoring every leaf exactly at 1-20 % visited, to the
    # tenth, on SciFact's held-out train claims (3 seeds), Climate-FEVER dev and SQuAD dev (2 x
    # beam lost 0.6 at 5 % on two SciFact seeds, a floor of 16 lost 0.6 at 2 % on one, the basis
    # alone up to 6 points), at about half a narrow single query's cost
    # (benchmarks/spread_routing.py --basis, search_speed.py)
    spread_basis: int = 64
    spread_candidates: float = 4.0

    def update(self, **values) -> None:
        """Set the fields given (None: left as it is)."""
        for name, v in values.items():
            if v is not None:
                setattr(self, name, v)

    def validate(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"index.router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if not 0 <= self.spread_lambda <= 100 or not 1 <= self.spread_rank <= 256:
            raise ValueError("index.spread_lambda must be in 0..100 and index.spread_rank in 1..256")
        if not 0 <= self.spread_basis <= 4096 or not 0 <= self.spread_candidates <= 1000:
            raise ValueError("index.spread_basis must be in 0..4096 and index.spread_candidates in 0..1000")
        if self.d2l < 1:
            raise ValueError("d2l must be >= 1")
        if self.shards < 1:
            raise ValueError("shards must be >= 1")
        if self.codec not in CODECS:
            raise ValueError(f"index.codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.pq_m < 0 or self.rerank < 0:
            raise ValueError("index.pq_m and index.rerank must be >= 0")


@dataclass
class EHIConfig:
    """Every setting of a model, in four typed sections, saved as ``config.json`` beside it.

    Attributes
    ----------
    encoder : EncoderConfig
        The sentence-transformer, its trainable scope (adapter, top-k layers, full) and backend.
    tree : TreeConfig
        Branching B (0: chosen from the corpus size), height H, initialisation.
    train : TrainConfig
        Epochs, batch size, loss weights, negatives, validation and the router fit.
    index : IndexConfig
        Documents per leaf (d2l), codec, shards, and the search router (``spread`` or ``tree``).

    Examples
    --------
    >>> from ehi.config import EHIConfig
    >>> cfg = EHIConfig()
    >>> cfg.tree.branching, cfg.index.codec = 64, "sq8"
    >>> EHIConfig.from_dict(cfg.to_dict()).validate().tree.branching
    64
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def validate(self) -> "EHIConfig":
        self.encoder.validate()
        self.tree.validate()
        self.train.validate()
        self.index.validate()
        if self.tree.branching and self.tree.height and self.index.d2l > self.tree.num_leaves:
            raise ValueError("d2l cannot exceed the number of leaves")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EHIConfig":
        def build(klass, values):
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
            return klass(**values)

        return cls(
            encoder=build(EncoderConfig, d.get("encoder", {})),
            tree=build(TreeConfig, d.get("tree", {})),
            train=build(TrainConfig, d.get("train", {})),
            index=build(IndexConfig, d.get("index", {})),
        )


def apply_overrides(config: "EHIConfig", overrides: dict) -> "EHIConfig":
    """A validated copy of ``config`` with ``{"section.field": value}`` overrides applied."""
    cfg = copy.deepcopy(config)
    for key, value in overrides.items():
        section, name = key.split(".")
        if not hasattr(getattr(cfg, section), name):
            raise ValueError(f"unknown config field {key!r}")
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()
