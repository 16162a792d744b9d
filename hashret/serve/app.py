"""The service: the engines of one server, their batchers and metrics, and the FastAPI
application over them."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np

from hashret.engine import Engine, finish
from hashret.errors import ConflictError, HashretError, NotFoundError, as_flags, check
from hashret.serve.batcher import MicroBatcher

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765


class Service:
    """The engines, their batchers, the metrics and the read-only refresher of one server."""

    def __init__(self, indexes, checkpoint=None, rerank=None, dataset=None, data_root=None,
                 readonly: bool = False, window_ms: float = 0.0, max_batch: int = 256,
                 refresh_s: float = 0.5, max_body_mb: float = 16.0, ray=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        check(len(indexes) > 0, "give at least one --index")
        check(window_ms >= 0 and max_batch >= 1, "--batch-window-ms must be >= 0 and --max-batch >= 1")
        self.readonly, self.refresh_s = readonly, refresh_s
        self.max_body = int(max_body_mb * 2**20)
        self.engines: dict[str, Engine] = {}
        try:
            for path in indexes:
                eng = Engine.open(path, checkpoint, rerank=rerank, dataset=dataset,
                                  data_root=data_root, readonly=readonly, ray=ray)
                check(eng.name not in self.engines, f"two indexes are named {eng.name}: serve folders "
                      "with different names")
                self.engines[eng.name] = eng
        except BaseException:
            for eng in self.engines.values():
                eng.close()
            raise
        reg = self.registry = CollectorRegistry()
        self.requests = Counter("hashret_requests", "Requests answered", ["route", "status"], registry=reg)
        self.errors = Counter("hashret_errors", "Requests answered with an error", ["route", "status"],
                              registry=reg)
        self.latency = Histogram("hashret_request_seconds", "Time to answer a request", ["route"], registry=reg,
                                 buckets=(.0005, .001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.batch_sizes = Histogram("hashret_batch_queries", "Queries per kernel call", ["index"], registry=reg,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        items = Gauge("hashret_items", "Items (alive) in the index", ["index"], registry=reg)
        for name, eng in self.engines.items():
            items.labels(name).set_function(lambda e=eng: len(e.index))
        for eng in self.engines.values():
            eng.max_k, eng.max_candidates = 10_000, 100_000
        self.batchers = {name: MicroBatcher(eng, window_ms / 1e3, max_batch,
                                            self.batch_sizes.labels(name).observe)
                         for name, eng in self.engines.items()}

        self.refresh_problem = None
        self._stop = threading.Event()
        self._refresher = None
        if readonly:
            self._refresher = threading.Thread(target=self._refresh_loop, name="refresh", daemon=True)
            self._refresher.start()

    def _refresh_loop(self):
        while not self._stop.wait(self.refresh_s):
            for eng in self.engines.values():
                try:
                    eng.refresh()
                    self.refresh_problem = None
                except HashretError as exc:  # keep serving the last good snapshot, say why
                    self.refresh_problem = f"{eng.name}: {exc}"

    def close(self):
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=10)
        for b in self.batchers.values():
            b.close()
        for eng in self.engines.values():
            eng.close()

    # -- requests -------------------------------------------------------------------------
    def engine_for(self, body: dict) -> Engine:
        """The index a request names (``"index"``), else the one that answers its kind of
        query: a text query goes to the index of image codes and image features to the text
        index; anything else to the first index."""
        name = body.get("index")
        if name is not None:
            if name not in self.engines:
                raise NotFoundError(f"unknown index {name!r}: this server has {sorted(self.engines)}")
            return self.engines[name]
        want = "text" if "text" in body else "image" if "image_features" in body else None
        if want is not None:
            for eng in self.engines.values():
                if eng.query_modality == want:
                    return eng
        return next(iter(self.engines.values()))

    async def search(self, body: dict) -> dict:
        _only(body, {"item", "text", "image_features", "codes", "k", "candidates", "rerank", "index"}, "/search")
        eng = self.engine_for(body)
        rerank = body.get("rerank", False)
        check(isinstance(rerank, bool), "rerank must be true or false")
        # the one search path, Engine.search_steps, with this index's micro-batcher as its scan
        # step; torch (encoding, re-ranking) runs off the event loop, a code query stays on it
        steps = eng.search_steps(text=body.get("text"), image_features=body.get("image_features"),
                                 item=body.get("item"), codes=body.get("codes"), k=body.get("k", 10),
                                 rerank=rerank, candidates=body.get("candidates"))
        codes, width = next(steps) if body.get("codes") is not None else await asyncio.to_thread(next, steps)
        scanned = await self.batchers[eng.name].scan(codes, width)
        out = await asyncio.to_thread(finish, steps, scanned) if rerank else finish(steps, scanned)
        out["index"] = eng.name
        return out

    def add(self, body: dict) -> dict:
        _only(body, {"codes", "image_features", "text", "ids", "items", "index"}, "/items")
        self._writable()
        eng = self.engine_for({"index": body.get("index")})
        return {**eng.add(codes=body.get("codes"), image_features=body.get("image_features"),
                          text=body.get("text"), ids=body.get("ids"), items=body.get("items")),
                "index": eng.name}

    def remove(self, body: dict) -> dict:
        _only(body, {"ids", "index"}, "DELETE /items")
        self._writable()
        eng = self.engine_for({"index": body.get("index")})
        return {**eng.remove(body.get("ids")), "index": eng.name}

    def _writable(self):
        if self.readonly:
            raise ConflictError("this server is read-only (--read-only): write through the index's "
                                "writer, this server picks the changes up")

    def health(self) -> dict:
        return {"status": "ok" if self.refresh_problem is None else "degraded",
                "problem": self.refresh_problem, "readonly": self.readonly,
                "indexes": {n: len(e.index) for n, e in self.engines.items()}}

    def info(self) -> dict:
        return {"readonly": self.readonly, "indexes": [e.info() for e in self.engines.values()]}


def _only(body: dict, allowed: set, route: str):
    extra = sorted(set(body) - allowed)
    check(not extra, f"unknown field(s) {', '.join(map(repr, extra))} for {route}: use {sorted(allowed)}")


def status_of(exc: BaseException) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, _TooLarge):
        return 413
    if isinstance(exc, HashretError):
        return 400
    return 500


class _TooLarge(HashretError):
    pass


PAGE = resources.files("hashret.serve").joinpath("search.html").read_text(encoding="utf-8")


def create_app(service: Service):
    """The FastAPI application over ``service`` (which the caller closes)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="hashret", docs_url=None, redoc_url=None, openapi_url=None)

    children: dict = {}

    def reply(route, status, payload, started):
        key = (route, status)
        if key not in children:  # prometheus_client's labels() costs a lock and a lookup
            children[key] = (service.requests.labels(route, str(status)), service.latency.labels(route),
                             service.errors.labels(route, str(status)) if status >= 400 else None)
        requests, latency, errors = children[key]
        requests.inc()
        latency.observe(time.perf_counter() - started)
        if errors is not None:
            errors.inc()
        return Response(json.dumps(payload, allow_nan=False).encode(), status_code=status,
                        media_type="application/json")

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > service.max_body:
            raise _TooLarge(f"the request body has {int(size)} bytes, over this server's limit of "
                            f"{service.max_body} (--max-body-mb): send fewer items per request")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > service.max_body:
                raise _TooLarge(f"the request body is over this server's limit of {service.max_body} "
                                "bytes (--max-body-mb): send fewer items per request")
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HashretError(f"the request body is not JSON ({exc}): send a JSON object") from None
        check(isinstance(obj, dict), "the request body must be a JSON object")
        return obj

    def handler(route, fn, needs_body=True):
        async def endpoint(request: Request):
            started = time.perf_counter()
            try:
                body = await read_json(request) if needs_body else None
                out = fn(body) if needs_body else fn()
                if asyncio.iscoroutine(out):
                    out = await out
                return reply(route, 200, out, started)
            except Exception as exc:  # noqa: BLE001 -- one JSON line, the server keeps serving
                status = status_of(exc)
                # a server's settings are its command line's flags: name them so
                msg = as_flags(str(exc)) if status < 500 else f"internal error ({type(exc).__name__}: {exc})"
                return reply(route, status, {"error": msg.splitlines()[0] if msg else type(exc).__name__},
                             started)

        return endpoint

    # plain Starlette routes: the endpoints take the Request and parse the JSON themselves, so
    # every error is hashret's one line (and no validation layer runs per request)
    route = app.router.add_route
    route("/search", handler("/search", service.search), methods=["POST"])
    add = handler("/items", lambda b: asyncio.to_thread(service.add, b))
    remove = handler("DELETE /items", lambda b: asyncio.to_thread(service.remove, b))

    async def items(request: Request):
        return await (add if request.method == "POST" else remove)(request)

    route("/items", items, methods=["POST", "DELETE"])
    route("/health", handler("/health", service.health, False), methods=["GET"])
    route("/info", handler("/info", service.info, False), methods=["GET"])

    async def metrics(request: Request):
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(request: Request):
        return HTMLResponse(PAGE)

    route("/metrics", metrics, methods=["GET"])
    route("/", page, methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path} (routes: "
                                      "POST /search, POST|DELETE /items, GET /health /info /metrics /)"},
                            status_code=exc.status_code)

    return app


def serve(indexes, checkpoint=None, rerank=None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          readonly: bool = False, window_ms: float = 0.0, max_batch: int = 256, refresh_s: float = 0.5,
          max_body_mb: float = 16.0, dataset=None, data_root=None, ray=None):
    """Serve ``indexes`` until SIGTERM or SIGINT (in-flight requests finish; exit status 0).
    Opening every index and loading the model happen before the port opens."""
    import uvicorn

    service = Service([Path(i) for i in indexes], checkpoint, rerank=rerank, dataset=dataset,
                      data_root=data_root, readonly=readonly, window_ms=window_ms,
                      max_batch=max_batch, refresh_s=refresh_s, max_body_mb=max_body_mb, ray=ray)
    try:
        for eng in service.engines.values():  # compile / load the kernels before the first request
            eng.scan(np.zeros((1, eng.index.bits // 8), np.uint8), 1)
        app = create_app(service)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30)
        server = uvicorn.Server(config)
        names = ", ".join(f"{n} ({len(e.index)} {e.modality or 'code'} items)" for n, e in service.engines.items())
        log.info(f"serving {names} on http://{host}:{port}{' (read-only)' if readonly else ''}")
        # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal under
        # the handlers it found: quiet ones make a graceful stop exit with status 0
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        import gc

        gc.freeze()  # the model and the index's objects live on: keep them out of every GC pass
        server.run()
        log.info("stopped: every in-flight request was answered")
    finally:
        service.close()
