"""The index layer: the documents' lists per leaf (Faiss), their files, shards and Ray actors. No torch here."""

from ehi.index.leaf_index import CODECS, LeafIndex, SearchResult
from ehi.index.store import open_index, save_index

__all__ = ["CODECS", "LeafIndex", "SearchResult", "open_index", "save_index"]
