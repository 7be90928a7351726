"""HTTP search service: ``ehi serve DIR`` (FastAPI + uvicorn) and its web page.

The model loads once. Concurrent requests are gathered into micro-batches, encoded together
and searched together, one batch at a time on a single worker thread (each batch on all
cores), so throughput grows with load instead of threads fighting over the CPU. A batch is
whatever queued while the previous one ran, and only under load (the previous batch held more
than one request) does it also wait up to ``max_wait_ms`` for more: a lone request never
waits for company.

Fair to small requests: each request is cut into chunks of bounded cost (``CHUNK_CHARS`` of
query text and ``CHUNK_HITS`` hits), and a batch takes one chunk from each waiting request in
turn, so a 3-word query sent after a maximal one (64 queries of 2,000 characters, k = 1000)
waits for one chunk of it, not for all of it. Results are written as JSON on the worker
thread, chunk by chunk, so that a large answer does not hold the event loop either.

Strict at the door: bools and strings are not numbers, every 4xx is ``{"detail": "<one
sentence>"}`` naming the field and never echoing the input, only the Host names allowed are
answered (a page elsewhere cannot read a local server through DNS rebinding), and the API
docs pages are served only when asked for.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ehi.index.shards import SHARD_TIMEOUT_S, ShardUnavailable
from ehi.limits import MAX_K, MAX_QUERIES, check_query
from ehi.model.ehi_model import EHIModel
from ehi.results import UnknownIds

# a chunk, the unit a batch takes from each waiting request: at most this much query text and
# this many hits (k x queries), or one query where a single one is larger
CHUNK_CHARS = 2000
CHUNK_HITS = 1000
# a batch: at most this many chunks' worth (and ``max_batch`` queries)
BATCH_CHUNKS = 4
# Host names answered by default: this machine's own (``--allowed-hosts`` adds others)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # strict: a bool or a string is not a number ("k": true is not 1, "budget": "0.5" is refused)
    query: Union[StrictStr, list[StrictStr]]
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    budget: Union[StrictInt, StrictFloat, None] = Field(None, gt=0, le=1, allow_inf_nan=False, description="fraction of the corpus to visit")
    beam: StrictInt | None = Field(None, ge=1, description="leaves to visit")
    ids: list[StrictStr] | None = Field(None, min_length=1, max_length=100_000, description="only these documents may be returned")

    @field_validator("query")
    @classmethod
    def _queries(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("query list is empty")
        if len(items) > MAX_QUERIES:
            raise ValueError(f"at most {MAX_QUERIES} queries per request")
        for q in items:
            check_query(q)
        return v

    @model_validator(mode="after")
    def _one_width(self):
        if self.budget is not None and self.beam is not None:
            raise ValueError("give budget or beam, not both")
        return self


def _json_safe(x):
    """A copy that can be written as JSON: non-finite floats become their names, strings that
    are not valid Unicode (lone surrogates) get backslash escapes."""
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, str):
        try:
            x.encode("utf-8")
            return x
        except UnicodeEncodeError:
            return x.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(x, dict):
        return {_json_safe(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def validation_sentence(errors) -> str:
    """The first validation error as one sentence naming the field (pydantic's "Value error, "
    prefix and the offending input left out), and how many more there are."""
    if not errors:
        return "invalid request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        return "the body is not valid JSON"
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


@dataclass
class _Request:
    """One request: its chunks still to run, and the JSON of each query's result as they come."""

    chunks: list["_Pending"]
    future: asyncio.Future = field(repr=False)
    results: list[str] = field(default_factory=list)
    left: int = 0


@dataclass
class _Pending:
    """A chunk of a request: the unit of work a batch takes from it."""

    texts: list[str]
    k: int
    beam: int
    request: _Request = field(repr=False)
    allowed: np.ndarray | None = None  # document rows a filtered request may return
    start: int = 0  # the request's index of its first query

    @property
    def cost(self) -> tuple[int, int]:
        return sum(len(t) for t in self.texts), self.k * len(self.texts)


def chunked(texts: list[str], k: int, max_chars: int = CHUNK_CHARS, max_hits: int = CHUNK_HITS) -> list[tuple[int, list[str]]]:
    """``texts`` cut into runs of at most ``max_chars`` characters and ``max_hits`` hits (at
    least one query each), with the index of each run's first query."""
    out, start, chars = [], 0, 0
    for i, t in enumerate(texts):
        if i > start and (chars + len(t) > max_chars or (i - start + 1) * k > max_hits):
            out.append((start, texts[start:i]))
            start, chars = i, 0
        chars += len(t)
    out.append((start, texts[start:]))
    return out


class Batcher:
    """Collects concurrent requests and runs them as one encode + one search per beam width,
    taking a chunk from each waiting request in turn (see the module docstring)."""

    def __init__(self, model: EHIModel, max_batch: int = 64, max_wait_ms: float = 2.0, adaptive: bool = True, chunks: bool = True):
        """``chunks=False``: every request is one chunk and batches are bounded by ``max_batch``
        alone (the server before fair batching, for ``benchmarks/load_test.py --mixed``)."""
        self.model = model
        self.limits = (CHUNK_CHARS, CHUNK_HITS, BATCH_CHUNKS) if chunks else (float("inf"), float("inf"), 1)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.waiting: list[_Request] = []  # requests with chunks left, in turn order
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ehi-search")
        self.task: asyncio.Task | None = None
        self.adaptive = adaptive  # False: every batch waits (the server before adaptive waiting)
        self.loaded = False  # the previous batch held more than one request

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=False)

    async def submit(self, texts: list[str], k: int, beam: int, allowed: np.ndarray | None = None) -> list[str]:
        """Each query's result as JSON text (``Hits.to_dict``), in order."""
        req = _Request([], asyncio.get_running_loop().create_future())
        req.chunks = [_Pending(part, k, beam, req, allowed, start) for start, part in chunked(texts, k, *self.limits[:2])]
        req.results, req.left = [""] * len(texts), len(req.chunks)
        await self.queue.put(req)
        return await req.future

    def _take(self, batch: list[_Pending]) -> bool:
        """Adds to ``batch`` the next chunk of each waiting request in turn (a request with
        chunks left goes to the back) while it has room; False once it is full."""
        max_chars, max_hits, chunks = self.limits
        chars = sum(c.cost[0] for c in batch)
        hits = sum(c.cost[1] for c in batch)
        queries = sum(len(c.texts) for c in batch)
        while self.waiting:
            req = self.waiting[0]
            if req.future.done():  # failed, or its client went away: the rest need not run
                self.waiting.pop(0)
                continue
            c, h = req.chunks[0].cost
            n = len(req.chunks[0].texts)
            if batch and (queries + n > self.max_batch or chars + c > chunks * max_chars or hits + h > chunks * max_hits):
                return False
            batch.append(req.chunks.pop(0))
            chars, hits, queries = chars + c, hits + h, queries + n
            self.waiting.pop(0)
            if req.chunks:
                self.waiting.append(req)
        return True

    async def _gather(self) -> list[_Pending]:
        """The next batch: a chunk of each waiting request in turn, with what queued meanwhile;
        a loaded server waits up to ``max_wait`` for more."""
        loop = asyncio.get_running_loop()
        if not self.waiting:
            self.waiting.append(await self.queue.get())
        while not self.queue.empty():
            self.waiting.append(self.queue.get_nowait())
        batch: list[_Pending] = []
        room = self._take(batch)
        wait = self.max_wait > 0 and (self.loaded or not self.adaptive)
        deadline = loop.time() + self.max_wait
        while room and wait and not self.waiting:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                self.waiting.append(await asyncio.wait_for(self.queue.get(), timeout))
            except asyncio.TimeoutError:
                break
            room = self._take(batch)
        self.loaded = len({id(c.request) for c in batch}) > 1
        return batch

    def _done(self, chunk: _Pending, results=None, error: BaseException | None = None) -> None:
        req = chunk.request
        if req.future.done():
            return
        if error is not None:
            req.future.set_exception(error)  # its other chunks are dropped by _take
            return
        req.results[chunk.start : chunk.start + len(results)] = results
        req.left -= 1
        if req.left == 0:
            req.future.set_result(req.results)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:  # every waiting request had failed or been given up
                continue
            try:
                results = await loop.run_in_executor(self.pool, self._search, batch)
                for chunk, res in zip(batch, results):
                    self._done(chunk, res)
            except Exception as e:
                if len(batch) == 1 or isinstance(e, ShardUnavailable):  # a missing shard fails them all alike
                    for chunk in batch:
                        self._done(chunk, error=e)
                    continue
                # one request must not fail the others batched with it: run each alone
                for chunk in batch:
                    try:
                        res = (await loop.run_in_executor(self.pool, self._search, [chunk]))[0]
                    except Exception as e1:
                        self._done(chunk, error=e1)
                    else:
                        self._done(chunk, res)

    def _search(self, batch: list[_Pending]) -> list[list[str]]:
        model = self.model
        texts = [t for item in batch for t in item.texts]
        emb = model.encoder.encode(texts)
        out: list[list[str] | None] = [None] * len(batch)
        starts = np.cumsum([0] + [len(item.texts) for item in batch])
        # one search per beam width for unfiltered requests; a filtered one searches alone
        groups = [[i for i, item in enumerate(batch) if item.beam == beam and item.allowed is None] for beam in sorted({item.beam for item in batch})]
        groups = [g for g in groups if g] + [[i] for i, item in enumerate(batch) if item.allowed is not None]
        for members in groups:
            beam, allowed = batch[members[0]].beam, batch[members[0]].allowed
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
            k = max(batch[i].k for i in members)
            res, leaves = model.search_embeddings(emb[rows], k, beam, allowed)
            r = 0
            for i in members:
                item = batch[i]
                out[i] = [_dumps(h.to_dict()) for h in model.to_hits(res, leaves, item.texts, item.k, offset=r)]
                r += len(item.texts)
        return out


def _dumps(x) -> str:
    """JSON text of a result; a lone surrogate in a title becomes its JSON escape."""
    return json.dumps(x, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")


def create_app(
    model_dir: str | Path, max_batch: int = 64, max_wait_ms: float = 2.0, backend: str | None = None, adaptive: bool = True,
    shards: int | None = None, ray_address: str | None = None, shard_timeout: float = SHARD_TIMEOUT_S,
    allowed_hosts: list[str] | None = None, docs: bool = False, chunks: bool = True, router: str | None = None,
) -> FastAPI:
    """The service; with ``shards`` its index is served by that many Ray actors (``ehi.index.ray_shards``).
    ``allowed_hosts``: the Host names it answers (default ``LOCAL_HOSTS``; ``"*"``: any);
    ``docs``: serve the API docs at /docs and /openapi.json; ``router``: search with this
    router instead of the model's."""
    # read-only, mapped: no copy of the index in memory (with shards: in the shards' actors)
    model = EHIModel.load(model_dir, mmap=True, backend=backend, shards=shards, ray_address=ray_address, shard_timeout=shard_timeout, router=router)
    if model.index is None:
        raise ValueError(f"{model_dir}: the model has no index; run 'ehi index build' first")
    if model.encoder.precomputed:
        raise ValueError(f"{model_dir}: trained on precomputed embeddings, it cannot encode text queries to serve")
    batcher = Batcher(model, max_batch, max_wait_ms, adaptive, chunks)
    sizes = model.index.leaf_sizes()
    counts, edges = np.histogram(sizes, bins=min(30, max(1, int(sizes.max()) + 1)))
    stats = {
        "documents": int(model.index.num_docs),
        "leaves": int(model.tree.num_leaves),
        "branching": model.config.tree.branching,
        "height": model.config.tree.height,
        "d2l": model.index.d2l,
        "leaf_sizes": sizes.tolist(),
        "leaf_size_histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        "leaf_stats": model.index.leaf_stats(),
        "beam_calibration": model.beam_calibration,
        "config": model.config.to_dict(),
        # documents each shard holds (one entry: a single index)
        "shards": model.index.shard_documents(),
    }

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="ehi", description="End-to-end Hierarchical Indexing: search service", lifespan=lifespan,
        docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None,
    )
    app.state.model = model
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOCAL_HOSTS))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and request.method == "POST":
            # FastAPI's one 400: a body it could not parse as JSON (invalid UTF-8, nesting
            # too deep for the parser); documented, like any unparseable body, as a 422
            return JSONResponse(status_code=422, content={"detail": "the body is not valid JSON"})
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError) -> JSONResponse:
        # one shape for every 4xx, {"detail": "<one sentence>"}: the default handler's list
        # echoes the input (a 2,000-character query back to its sender; NaN or a lone surrogate
        # that cannot be written as JSON turned 422s into 500s)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind != "application/json":
            got = f"got {kind!r}" if kind else "none was sent"
            return JSONResponse(status_code=415, content={"detail": f"send the body as JSON with Content-Type: application/json ({got})"})
        return JSONResponse(status_code=422, content={"detail": _json_safe(validation_sentence(exc.errors()))})

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("ehi").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "documents": stats["documents"], "leaves": stats["leaves"]}

    @app.get("/stats")
    def get_stats() -> dict:
        return stats

    @app.post("/search")
    async def search(req: SearchRequest) -> Response:
        t = time.perf_counter()
        texts = [req.query] if isinstance(req.query, str) else list(req.query)
        try:
            beam = model.resolve_beam(req.beam, req.budget)  # the API's rule and default
        except ValueError as e:
            raise HTTPException(422, f"{'beam' if req.beam is not None else 'budget'}: {e}") from None
        try:
            allowed = None if req.ids is None else model.rows_of(req.ids)
        except UnknownIds as e:  # its count and position, never the ids themselves
            raise HTTPException(422, f"ids: {e.count} of them are not indexed (the first is item {e.position})") from None
        try:
            results = await batcher.submit(texts, req.k, beam, allowed)
        except ShardUnavailable as e:  # never an answer from the other shards alone
            raise HTTPException(503, str(e)) from None
        # the results are JSON already (written on the worker thread): joined, not re-encoded
        body = '{"results":[' + ",".join(results) + f'],"beam":{beam},"latency_ms":{1000 * (time.perf_counter() - t)!r}}}'
        return Response(body.encode("utf-8"), media_type="application/json")

    return app


def serve(
    model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
    backend: str | None = None, max_wait_ms: float = 2.0, adaptive: bool = True, shards: int | None = None, ray_address: str | None = None,
    shard_timeout: float = SHARD_TIMEOUT_S, allowed_hosts: list[str] | None = None, docs: bool = False, chunks: bool = True,
    router: str | None = None,
) -> None:
    import uvicorn

    if allowed_hosts is None and host not in ("0.0.0.0", "::", ""):
        allowed_hosts = [*LOCAL_HOSTS, host]  # the address it was asked to listen on
    app = create_app(model_dir, max_wait_ms=max_wait_ms, backend=backend, adaptive=adaptive, shards=shards, ray_address=ray_address,
                     shard_timeout=shard_timeout, allowed_hosts=allowed_hosts, docs=docs, chunks=chunks, router=router)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
