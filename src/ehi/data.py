"""BEIR-format datasets: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``.

Errors name the file and the line, because users feed these files by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Corpus:
    ids: list[str]
    titles: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def documents(self) -> list[str]:
        """Title and text joined, the way BEIR models are evaluated."""
        return [f"{t} {x}".strip() if t else x for t, x in zip(self.titles, self.texts)]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for i, t, x in zip(self.ids, self.titles, self.texts):
            h.update(f"{i}\x00{t}\x00{x}\x01".encode())
        return h.hexdigest()


@dataclass
class Dataset:
    root: Path
    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def split(self, name: str) -> dict[str, dict[str, int]]:
        """Relevance judgements of a split, loaded on first use."""
        if name not in self.qrels:
            self.qrels[name] = load_qrels(self.root / "qrels" / f"{name}.tsv")
        return self.qrels[name]

    def check_qrels(self, name: str, strict: bool = False) -> dict[str, list[str]]:
        """Relevant pairs of a split, after checking that they name known queries and
        documents (a warning with counts, or an error with ``strict``) and that some exist."""
        qrels = self.split(name)
        path = self.root / "qrels" / f"{name}.tsv"
        if not self.queries:
            raise DataError(f"{self.root / 'queries.jsonl'}: no queries, which the qrels of {path} need (without labels: --unsupervised)")
        docs = set(self.corpus.ids)
        bad_q = sum(q not in self.queries for q in qrels)
        bad_d = sum(d not in docs for rows in qrels.values() for d in rows)
        if bad_q or bad_d:
            msg = f"{path}: {bad_q} unknown query ids and {bad_d} unknown document ids"
            if strict:
                raise DataError(msg)
            log.warning("%s (ignored)", msg)
        rel = {q: [d for d in ds if d in docs] for q, ds in self.relevant(name).items()}
        rel = {q: ds for q, ds in rel.items() if ds}
        if not rel:
            raise DataError(f"{path}: no relevant (score > 0) pair of a known query and document")
        return rel

    def relevant(self, name: str) -> dict[str, list[str]]:
        """query id -> relevant document ids (score > 0), for queries that exist."""
        out: dict[str, list[str]] = {}
        for qid, docs in self.split(name).items():
            rel = [d for d, s in docs.items() if s > 0]
            if rel and qid in self.queries:
                out[qid] = rel
        return out


def _decoded(path: Path, lineno: int, raw: bytes) -> str:
    """One line of a file as UTF-8 text; DataError naming the file and line if it is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 text ({e.reason})") from None


def _read_jsonl(path: Path, required: tuple[str, ...]):
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    seen: set[str] = set()
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
                raw = raw[3:]
            line = _decoded(path, lineno, raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            for key in required:
                if key not in obj:
                    raise DataError(f"{path}:{lineno}: missing field {key!r}")
            raw_id = obj["_id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
                raise DataError(f"{path}:{lineno}: _id must be a non-empty string or an integer, got {json.dumps(raw_id)[:40]}")
            for key in ("text", "title"):
                if obj.get(key) is not None and not isinstance(obj[key], str):
                    raise DataError(f"{path}:{lineno}: field {key!r} must be a string, got {type(obj[key]).__name__}")
            for key in ("_id", "text", "title"):
                try:
                    if isinstance(obj.get(key), str):
                        obj[key].encode("utf-8")
                except UnicodeEncodeError:  # a JSON escape like "\ud800": no tokenizer takes it
                    raise DataError(f"{path}:{lineno}: field {key!r} is not valid Unicode text (a lone surrogate escape such as \\ud800)") from None
            _id = str(raw_id)
            if _id in seen:
                raise DataError(f"{path}:{lineno}: duplicate _id {_id!r}")
            seen.add(_id)
            yield lineno, _id, obj


def load_corpus(path: str | Path) -> Corpus:
    path = Path(path)
    ids, titles, texts = [], [], []
    empty = 0
    for _, _id, obj in _read_jsonl(path, ("_id", "text")):
        ids.append(_id)
        titles.append(str(obj.get("title") or ""))
        text = str(obj["text"] or "")
        empty += not (text.strip() or titles[-1].strip())
        texts.append(text)
    if not ids:
        raise DataError(f"{path}: corpus is empty")
    if empty:
        log.warning("%s: %d documents have empty text", path, empty)
    return Corpus(ids, titles, texts)


def load_queries(path: str | Path) -> dict[str, str]:
    path = Path(path)
    return {_id: str(obj["text"]) for _, _id, obj in _read_jsonl(path, ("_id", "text"))}


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """query id -> {doc id: graded score}; scores <= 0 are kept but mean not relevant."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    qrels: dict[str, dict[str, int]] = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decoded(path, lineno, raw).rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if lineno == 1:
                if [c.strip() for c in cols] != ["query-id", "corpus-id", "score"]:
                    raise DataError(
                        f"{path}:1: expected header 'query-id<TAB>corpus-id<TAB>score', got {line!r}"
                    )
                continue
            if len(cols) != 3:
                raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(cols)}")
            qid, did, score = (c.strip() for c in cols)
            try:
                s = int(score)
            except ValueError:
                raise DataError(f"{path}:{lineno}: score {score!r} is not an integer") from None
            qrels.setdefault(qid, {})[did] = s
    return qrels


def load_beir(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Dataset:
    """Load a BEIR folder by path (``queries.jsonl`` and ``qrels/`` optional); a bare BEIR
    name that is not a local folder is downloaded."""
    root = Path(name_or_path)
    if not root.is_dir():
        root = download_beir(str(name_or_path), cache_dir)
    corpus = load_corpus(root / "corpus.jsonl")
    # a corpus alone is a dataset too (unsupervised training, neighbour recall); anything that
    # needs queries says so when it finds none
    queries = load_queries(root / "queries.jsonl") if (root / "queries.jsonl").exists() else {}
    return Dataset(root=root, corpus=corpus, queries=queries)


def download_beir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch a BEIR dataset zip (needs network access) into the cache and unpack it."""
    if "/" in name or os.sep in name:
        raise DataError(f"{name}: dataset folder not found")
    cache = Path(cache_dir or os.environ.get("EHI_DATA_DIR", Path.home() / ".cache" / "ehi" / "datasets"))
    target = cache / name
    if (target / "corpus.jsonl").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    url = BEIR_URL.format(name=name)
    zpath = cache / f"{name}.zip"
    log.info("downloading %s", url)
    try:
        urllib.request.urlretrieve(url, zpath.with_suffix(".part"))
    except OSError as e:
        raise DataError(f"{name}: not a local folder and download from {url} failed ({e})") from None
    os.replace(zpath.with_suffix(".part"), zpath)
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(cache)
    return target


def embeddings_dataset(n_docs: int, n_queries: int = 0, pairs: str | Path | None = None, split: str = "train") -> Dataset:
    """A dataset over precomputed embeddings: document and query ids are row numbers, and
    ``pairs`` is a qrels TSV (``query-id corpus-id score`` header) over those rows (none: the
    documents alone, for unsupervised training)."""
    if pairs is None:
        corpus = Corpus([str(i) for i in range(n_docs)], [""] * n_docs, [""] * n_docs)
        return Dataset(root=Path("."), corpus=corpus, queries={str(i): "" for i in range(n_queries)})
    pairs = Path(pairs)
    qrels = load_qrels(pairs)
    for qid, docs in qrels.items():
        for did in [qid, *docs]:
            limit = n_queries if did == qid else n_docs
            if not did.isdigit() or int(did) >= limit:
                kind = "query" if did == qid else "document"
                raise DataError(f"{pairs}: {kind} id {did!r} is not a row of the {kind} embeddings (0..{limit - 1})")
    corpus = Corpus([str(i) for i in range(n_docs)], [""] * n_docs, [""] * n_docs)
    return Dataset(root=pairs.parent, corpus=corpus, queries={str(i): "" for i in range(n_queries)}, qrels={split: qrels})


def document_spans(corpus: Corpus, n: int, seed: int, words: tuple[int, int] = (8, 16)) -> tuple[list[str], np.ndarray]:
    """``n`` query-like spans (a window of 8-16 words of a document's text, or its title for
    a document without text) and the rows of the documents they come from."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(corpus), size=min(n, len(corpus)), replace=False))
    spans = []
    for r in rows:
        tokens = re.findall(r"\S+", corpus.texts[r]) or re.findall(r"\S+", corpus.titles[r])
        length = int(rng.integers(words[0], words[1] + 1))
        start = int(rng.integers(0, max(1, len(tokens) - length + 1)))
        spans.append(" ".join(tokens[start : start + length]))
    return spans, rows


# ---- files the command line reads and writes besides BEIR folders ---------------------------
def text_lines(path: Path) -> list[str]:
    """A text file's lines (UTF-8, an optional BOM); a line that is not UTF-8 text (a lone
    surrogate's bytes, Latin-1) is a DataError naming the file and the line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    return [_decoded(path, n, line) for n, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), 1)]


def read_ids(file: str) -> list[str]:
    """Document ids of an id file, one per line (blank lines skipped)."""
    path = Path(file)
    ids = [line.strip() for line in text_lines(path) if line.strip()]
    if not ids:
        raise ValueError(f"{path}: no ids")
    return ids


def read_queries(file: str) -> list[tuple[str, str]]:
    """(id, text) pairs of a query file: BEIR queries.jsonl, 'id<TAB>text' lines, or one text
    per line (its line number is its id)."""
    from ehi.limits import check_query

    path = Path(file)
    if path.suffix == ".jsonl":
        pairs = list(load_queries(path).items())
    else:
        pairs = []
        for n, line in enumerate(text_lines(path), 1):
            if not line.strip():
                continue
            qid, tab, text = line.partition("\t")
            pairs.append((qid.strip(), text) if tab else (str(n), line))
    if not pairs:
        raise ValueError(f"{path}: no queries")
    for qid, text in pairs:
        try:
            check_query(text)
        except ValueError as e:
            raise ValueError(f"{path}: query {qid!r}: {e}") from None
    return pairs


def write_trec_run(path: str, qids: list[str], results, tag: str = "ehi") -> Path:
    """``qid Q0 docid rank score tag`` lines: the TREC run format trec_eval, ir-measures and
    ranx read (document ids with whitespace cannot be written in it)."""
    from ehi.artifacts import write_file_atomic

    lines = []
    for qid, r in zip(qids, results):
        for rank, h in enumerate(r.hits, 1):
            if any(c.isspace() for c in h.doc_id + qid):
                raise ValueError(f"--run {path}: id {h.doc_id if any(c.isspace() for c in h.doc_id) else qid!r} holds whitespace, which a TREC run cannot")
            lines.append(f"{qid} Q0 {h.doc_id} {rank} {h.score:.6f} {tag}\n")
    return write_file_atomic(path, "".join(lines))
