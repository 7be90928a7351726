"""HTTP search service: ``ehi serve DIR`` (FastAPI + uvicorn) and its web page.

The model loads once. Concurrent requests are gathered into micro-batches, encoded together
and searched together, one batch at a time on a single worker thread (each batch on all
cores), so throughput grows with load instead of threads fighting over the CPU. A batch is
whatever queued while the previous one ran (up to ``max_batch`` queries), and only under load
(the previous batch held more than one request) does it also wait up to ``max_wait_ms`` for
more: a lone request never waits for company.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .model import EHIModel, check_query
from .sharding import SHARD_TIMEOUT_S, ShardUnavailable

MAX_QUERIES = 64


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Union[str, list[str]]
    k: int = Field(10, ge=1, le=1000)
    budget: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="fraction of the corpus to visit")
    beam: int | None = Field(None, ge=1, description="leaves to visit")
    ids: list[str] | None = Field(None, min_length=1, max_length=100_000, description="only these documents may be returned")

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
class _Pending:
    texts: list[str]
    k: int
    beam: int
    future: asyncio.Future = field(repr=False)
    allowed: np.ndarray | None = None  # document rows a filtered request may return


class Batcher:
    """Collects concurrent requests and runs them as one encode + one search per beam width."""

    def __init__(self, model: EHIModel, max_batch: int = 64, max_wait_ms: float = 2.0, adaptive: bool = True):
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
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

    async def submit(self, texts: list[str], k: int, beam: int, allowed: np.ndarray | None = None):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(texts, k, beam, fut, allowed))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            n = len(batch[0].texts)
            # what queued meanwhile joins at once; only a loaded server waits for more
            wait = self.max_wait > 0 and (self.loaded or not self.adaptive)
            deadline = loop.time() + self.max_wait
            while n < self.max_batch:
                if not self.queue.empty():
                    item = self.queue.get_nowait()
                else:
                    timeout = deadline - loop.time()
                    if not wait or timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                batch.append(item)
                n += len(item.texts)
            self.loaded = len(batch) > 1
            try:
                results = await loop.run_in_executor(self.pool, self._search, batch)
                for item, res in zip(batch, results):
                    if not item.future.done():
                        item.future.set_result(res)
            except Exception as e:
                if len(batch) == 1 or isinstance(e, ShardUnavailable):  # a missing shard fails them all alike
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(e)
                    continue
                # one request must not fail the others batched with it: run each alone
                for item in batch:
                    try:
                        res = (await loop.run_in_executor(self.pool, self._search, [item]))[0]
                    except Exception as e1:
                        if not item.future.done():
                            item.future.set_exception(e1)
                    else:
                        if not item.future.done():
                            item.future.set_result(res)

    def _search(self, batch: list[_Pending]):
        model = self.model
        texts = [t for item in batch for t in item.texts]
        emb = model.encoder.encode(texts)
        out: list[list[dict] | None] = [None] * len(batch)
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
                out[i] = [h.to_dict() for h in model.to_hits(res, leaves, item.texts, item.k, offset=r)]
                r += len(item.texts)
        return out


def create_app(
    model_dir: str | Path, max_batch: int = 64, max_wait_ms: float = 2.0, backend: str | None = None, adaptive: bool = True,
    shards: int | None = None, ray_address: str | None = None, shard_timeout: float = SHARD_TIMEOUT_S,
) -> FastAPI:
    """The service; with ``shards`` its index is served by that many Ray actors (``ehi.cluster``)."""
    # read-only, mapped: no copy of the index in memory (with shards: in the shards' actors)
    model = EHIModel.load(model_dir, mmap=True, backend=backend, shards=shards, ray_address=ray_address, shard_timeout=shard_timeout)
    if model.index is None:
        raise ValueError(f"{model_dir}: the model has no index; run 'ehi index build' first")
    if model.encoder.precomputed:
        raise ValueError(f"{model_dir}: trained on precomputed embeddings, it cannot encode text queries to serve")
    batcher = Batcher(model, max_batch, max_wait_ms, adaptive)
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

    app = FastAPI(title="ehi", description="End-to-end Hierarchical Indexing: search service", lifespan=lifespan)
    app.state.model = model

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
    async def search(req: SearchRequest) -> dict:
        t = time.perf_counter()
        texts = [req.query] if isinstance(req.query, str) else list(req.query)
        try:
            beam = model.resolve_beam(req.beam, req.budget)  # the API's rule and default
            allowed = None if req.ids is None else model.rows_of(req.ids)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        try:
            results = await batcher.submit(texts, req.k, beam, allowed)
        except ShardUnavailable as e:  # never an answer from the other shards alone
            raise HTTPException(503, str(e)) from None
        return {
            "results": results if isinstance(req.query, list) else results[:1],
            "beam": beam,
            "latency_ms": 1000 * (time.perf_counter() - t),
        }

    return app


def serve(
    model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
    backend: str | None = None, max_wait_ms: float = 2.0, adaptive: bool = True, shards: int | None = None, ray_address: str | None = None,
    shard_timeout: float = SHARD_TIMEOUT_S,
) -> None:
    import uvicorn

    app = create_app(model_dir, max_wait_ms=max_wait_ms, backend=backend, adaptive=adaptive, shards=shards, ray_address=ray_address, shard_timeout=shard_timeout)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
