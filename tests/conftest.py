import atexit
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite's feature cache lives in a folder of its own, removed at the end: nothing lands
# in the user's home (set EHI_TEST_CACHE_DIR to keep one across runs)
_CACHE = os.environ.get("EHI_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="ehi-test-cache-")
os.environ["EHI_CACHE_DIR"] = _CACHE
if not os.environ.get("EHI_TEST_CACHE_DIR"):
    atexit.register(shutil.rmtree, _CACHE, True)

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "scifact"

TOPICS = {
    "astronomy": ["star", "galaxy", "telescope", "orbit", "planet", "nebula", "comet"],
    "cooking": ["recipe", "oven", "flour", "sauce", "garlic", "bake", "simmer"],
    "finance": ["stock", "bond", "interest", "market", "dividend", "inflation", "bank"],
    "medicine": ["patient", "dose", "clinical", "therapy", "tumor", "vaccine", "symptom"],
    "sports": ["goal", "match", "league", "coach", "tournament", "score", "team"],
    "music": ["melody", "guitar", "chord", "concert", "rhythm", "album", "piano"],
}


def tiny_config(branching: int = 6, epochs: int = 3, **train):
    """The small training setup the tests share: B leaves, a few epochs, batches of 16."""
    from ehi.config import EHIConfig

    cfg = EHIConfig()
    cfg.tree.branching = branching
    cfg.train.epochs = epochs
    cfg.train.batch_size = 16
    cfg.train.refresh_every = 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def write_beir(root: Path, n_per_topic: int = 10, seed: int = 0) -> Path:
    """A small BEIR folder: documents about six topics, one query per document (graded qrels)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    docs, queries, train, test = [], [], [], []
    for t, words in TOPICS.items():
        for i in range(n_per_topic):
            w = rng.sample(words, 4)
            did = f"{t}-{i}"
            docs.append({"_id": did, "title": f"{t} {w[0]}", "text": f"A note on {t}: the {w[0]} and the {w[1]} near the {w[2]}, then {w[3]}."})
            qid = f"q-{did}"
            queries.append({"_id": qid, "text": f"{w[0]} {w[1]} {t}"})
            (test if i % 5 == 0 else train).append((qid, did, 2 if i % 2 else 1))
    with open(root / "corpus.jsonl", "w") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        for q in queries:
            fh.write(json.dumps(q) + "\n")
    for name, rows in (("train", train), ("test", test)):
        with open(root / "qrels" / f"{name}.tsv", "w") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for r in rows:
                fh.write("\t".join(map(str, r)) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir") / "tiny")


@pytest.fixture(scope="session")
def trained_tiny(tiny_beir, tmp_path_factory) -> Path:
    """One model trained on ``tiny_beir`` (6 leaves, 2 epochs), saved, shared by every test
    that only reads a model; a test that changes one works on a copy (``copy_model``)."""
    from ehi.cli import main

    out = tmp_path_factory.mktemp("trained") / "m"
    assert main(["train", "--data", str(tiny_beir), "--out", str(out), "-B", "6", "--epochs", "2", "--no-progress"]) == 0
    return out


def copy_model(model: Path, where: Path) -> Path:
    """A copy of a saved model to change (the shared one stays as trained)."""
    out = where / "m"
    shutil.copytree(model, out)
    return out


@pytest.fixture(scope="session")
def scifact_subset(tmp_path_factory) -> Path:
    """SciFact restricted to 60 train and 30 test queries and 400 documents (their positives
    plus others), so that the real data is exercised in seconds."""
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip("SciFact not found in ../shared/datasets")
    root = tmp_path_factory.mktemp("scifact") / "scifact-subset"
    (root / "qrels").mkdir(parents=True)
    keep_docs: set[str] = set()
    qrels = {}
    for split, nq in (("train", 60), ("test", 30)):
        lines = (SCIFACT / "qrels" / f"{split}.tsv").read_text().splitlines()
        rows = [l.split("\t") for l in lines[1:]]
        qids = sorted({r[0] for r in rows}, key=int)[:nq]
        qrels[split] = [r for r in rows if r[0] in qids]
        keep_docs |= {r[1] for r in qrels[split]}
    docs = [json.loads(l) for l in (SCIFACT / "corpus.jsonl").read_text().splitlines()]
    for d in docs:
        if len(keep_docs) >= 400:
            break
        keep_docs.add(d["_id"])
    with open(root / "corpus.jsonl", "w") as fh:
        for d in docs:
            if d["_id"] in keep_docs:
                fh.write(json.dumps(d) + "\n")
    keep_q = {r[0] for rows in qrels.values() for r in rows}
    with open(root / "queries.jsonl", "w") as fh:
        for l in (SCIFACT / "queries.jsonl").read_text().splitlines():
            if json.loads(l)["_id"] in keep_q:
                fh.write(l + "\n")
    for split, rows in qrels.items():
        with open(root / "qrels" / f"{split}.tsv", "w") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for r in rows:
                fh.write("\t".join(r) + "\n")
    return root
