"""What one search may ask: the bounds the API, the CLI and the server share.

A search allocates (queries x k) results and encodes each query up to the encoder's length,
so each of these is capped: a mistyped ``-k 1000000000`` is a one-line error, not a
MemoryError, and a k larger than the corpus is clamped to it.
"""

from __future__ import annotations

MAX_QUERY_CHARS = 2000
MAX_K = 1000  # hits per query
MAX_QUERIES = 64  # queries per server request


def check_query(q) -> str:
    """A query text as search accepts it; ValueError saying why otherwise."""
    if not isinstance(q, str):
        raise ValueError(f"query must be a string, got {type(q).__name__}")
    try:
        q.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("query is not valid Unicode text (unpaired surrogate)") from None
    if not q.strip():
        raise ValueError("query is empty")
    if len(q) > MAX_QUERY_CHARS:
        raise ValueError(f"query longer than {MAX_QUERY_CHARS} characters")
    return q


def check_k(k) -> int:
    """Hits per query as search accepts them: a whole number in 1..MAX_K."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")
    return k
