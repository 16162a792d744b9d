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
from hashret.serve.access import (BadMediaType, Forbidden, Keys, Unauthorized, check_host, check_origin,
                                  default_hosts, log_request, request_id)
from hashret.serve.batcher import MicroBatcher
from hashret.serve.contract import (AddReply, AddRequest, ErrorReply, HealthReply, InfoReply, RemoveReply,
                                    RemoveRequest, SearchReply, SearchRequest, check_budget, parse_body, scrub,
                                    scrub_tree, validate)

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
_JSON = json.JSONEncoder(allow_nan=False)  # one encoder: json.dumps with an option builds one per call


class Service:
    """The engines, their batchers, the metrics and the read-only refresher of one server, and
    who may ask it what: ``api_keys`` (a file of ``<scope> <key>`` lines; None: no keys),
    ``allowed_hosts`` (Host names answered; default: ``bind``'s and loopback's),
    ``allow_origins`` (foreign web origins admitted), ``max_results`` (queries x k a reply may
    hold), ``log_format`` of the access log ("text" or "json")."""

    def __init__(self, indexes, checkpoint=None, rerank=None, dataset=None, data_root=None,
                 readonly: bool = False, window_ms: float = 0.0, max_batch: int = 256,
                 refresh_s: float = 0.5, max_body_mb: float = 16.0, ray=None, api_keys=None,
                 allowed_hosts=None, allow_origins=(), max_results: int = 10_000, log_format: str = "text",
                 bind: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        check(len(indexes) > 0, "give at least one --index")
        check(window_ms >= 0 and max_batch >= 1, "--batch-window-ms must be >= 0 and --max-batch >= 1")
        check(max_results >= 1, "--max-results must be >= 1")
        check(log_format in ("text", "json"), "--log-format must be text or json")
        self.readonly, self.refresh_s = readonly, refresh_s
        self.max_body = int(max_body_mb * 2**20)
        self.keys = None if api_keys is None else (api_keys if isinstance(api_keys, Keys) else Keys.load(api_keys))
        self.allowed_hosts = ({h.strip().lower() for h in allowed_hosts if h.strip()} if allowed_hosts
                              else default_hosts(bind))
        self.allow_origins = {o.strip().rstrip("/").lower() for o in allow_origins if o.strip()}
        self.max_results, self.log_format = int(max_results), log_format
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
            eng.reads_files = False  # a request's string is never a path to open
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
    def engine_for(self, name: str | None, want: str | None = None) -> Engine:
        """The index a request names, else the one that answers its kind of query (``want``:
        a text query goes to the index of image codes, image features to the text index);
        anything else to the first index."""
        if name is not None:
            if name not in self.engines:
                raise NotFoundError(f"unknown index {name!r}: this server has {sorted(self.engines)}")
            return self.engines[name]
        if want is not None:
            for eng in self.engines.values():
                if eng.query_modality == want:
                    return eng
        return next(iter(self.engines.values()))

    async def search(self, body: dict) -> dict:
        req = validate(SearchRequest, body, "/search")
        want = "text" if req.text is not None else "image" if req.image_features is not None else None
        eng = self.engine_for(req.index, want)
        check_budget(req.n_queries(one_image_per_set=getattr(eng.model, "kind", None) == "matcher"),
                     req.k, self.max_results)
        # the one search path, Engine.search_steps, with this index's micro-batcher as its scan
        # step; torch (encoding, re-ranking) runs off the event loop, a code query stays on it
        steps = eng.search_steps(text=req.text, image_features=req.image_features, item=req.item,
                                 codes=req.codes, k=req.k, rerank=req.rerank, candidates=req.candidates,
                                 filter=req.filter)
        codes, width, filter = next(steps) if req.codes is not None else await asyncio.to_thread(next, steps)
        scanned = await self.batchers[eng.name].scan(codes, width, filter)
        out = await asyncio.to_thread(finish, steps, scanned) if req.rerank else finish(steps, scanned)
        out["index"] = eng.name
        if out["warnings"]:
            out["warnings"] = [scrub(w) for w in out["warnings"]]
        return out

    def add(self, body: dict) -> dict:
        req = validate(AddRequest, body, "/items")
        self._writable()
        eng = self.engine_for(req.index)
        return {**eng.add(codes=req.codes, image_features=req.image_features, text=req.text, ids=req.ids,
                          items=req.items, attributes=req.attributes), "index": eng.name}

    def remove(self, body: dict) -> dict:
        req = validate(RemoveRequest, body, "DELETE /items")
        self._writable()
        eng = self.engine_for(req.index)
        return {**eng.remove(req.ids), "index": eng.name}

    def _writable(self):
        if self.readonly:
            raise ConflictError("this server is read-only (--read-only): write through the index's "
                                "writer, this server picks the changes up")

    def health(self) -> dict:
        return {"status": "ok" if self.refresh_problem is None else "degraded",
                "problem": None if self.refresh_problem is None else scrub(self.refresh_problem),
                "readonly": self.readonly, "auth": self.keys is not None,
                "indexes": {n: len(e.index) for n, e in self.engines.items()}}

    def info(self) -> dict:
        return {"readonly": self.readonly, "indexes": [scrub_tree(e.info()) for e in self.engines.values()]}


def status_of(exc: BaseException) -> int:
    """The HTTP status of a failure: its kind's, most specific first; 500 only for a bug."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


class _TooLarge(HashretError):
    pass


_STATUS = ((Unauthorized, 401), (Forbidden, 403), (BadMediaType, 415), (NotFoundError, 404),
           (ConflictError, 409), (_TooLarge, 413), (HashretError, 400))


PAGE = resources.files("hashret.serve").joinpath("search.html").read_text(encoding="utf-8")


# (method, path, request model, reply model, scope or None for open, summary): what the
# server routes and what /openapi.json describes come from this one table
API = [
    ("POST", "/search", SearchRequest, SearchReply, "read", "Search an index with a text, image features, "
     "a dataset item or codes"),
    ("POST", "/items", AddRequest, AddReply, "write", "Add items (committed before the reply)"),
    ("DELETE", "/items", RemoveRequest, RemoveReply, "write", "Remove items by id"),
    ("GET", "/info", None, InfoReply, "read", "The indexes served, their sizes, models and builds"),
    ("GET", "/health", None, HealthReply, None, "Liveness: open to every caller"),
]
ROUTES = "POST /search, POST|DELETE /items, GET /health /info /metrics /openapi.json /docs /"
DOC_ASSETS = {"swagger-ui-bundle.js": "application/javascript", "swagger-ui.css": "text/css",
              "favicon-32x32.png": "image/png"}


def openapi_document() -> dict:
    """The OpenAPI 3.1 description of every route, its request and its reply, written by
    FastAPI from the same pydantic models the server validates with."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.routing import APIRoute

    from hashret import __version__

    def documented():  # these routes only describe; the server's own endpoints answer
        raise NotImplementedError

    errors = {str(code): {"model": ErrorReply, "description": why} for code, why in (
        (400, "a malformed request, one line naming the field"), (401, "no API key, or an unknown one"),
        (403, "a read key on a write route, or a foreign origin"), (404, "an unknown index, item or id"),
        (409, "a query the index's model cannot answer, or a write to a read-only server"),
        (413, "a body over --max-body-mb"), (415, "a body not sent as application/json"))}
    routes, bodies = [], {}
    for method, path, request, reply, scope, summary in API:
        extra = {}
        if request is not None:
            bodies[request.__name__] = request
            extra["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{request.__name__}"}}}}
        if scope is not None:
            extra["security"] = [{"apiKey": []}]
            extra["description"] = f"Needs a key of scope {scope} when the server has --api-keys."
        routes.append(APIRoute(path, documented, methods=[method], response_model=reply, summary=summary,
                               responses=errors, openapi_extra=extra, name=f"{method} {path}"))
    doc = get_openapi(title="hashret", version=__version__, routes=routes,
                      description="Cross-modal hashing search. Every error is one JSON line {\"error\": ...}.")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, model in bodies.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    doc["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                       "description": "A key from the server's --api-keys file"}}
    return doc


def create_app(service: Service):
    """The FastAPI application over ``service`` (which the caller closes)."""
    from fastapi import FastAPI, Request
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="hashret", docs_url=None, redoc_url=None, openapi_url=None)
    children: dict = {}
    fmt = service.log_format
    openapi = json.dumps(openapi_document()).encode()
    assets = _doc_assets()

    def finish_reply(request, route, status, content, media, started, rid, cors, headers=None):
        key = (route, status)
        if key not in children:  # prometheus_client's labels() costs a lock and a lookup
            children[key] = (service.requests.labels(route, str(status)), service.latency.labels(route),
                             service.errors.labels(route, str(status)) if status >= 400 else None)
        requests, latency, errors = children[key]
        took = time.perf_counter() - started
        requests.inc()
        latency.observe(took)
        if errors is not None:
            errors.inc()
        log_request(fmt, request.method, route.rsplit(" ", 1)[-1], status, took, rid)  # label 'DELETE /items'
        headers = {**(headers or {}), "x-request-id": rid}
        if cors:
            headers["access-control-allow-origin"] = request.headers["origin"]
            headers["vary"] = "Origin"
        return Response(content, status_code=status, media_type=media, headers=headers)

    def reply(request, route, status, payload, started, rid, cors=False):
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        return finish_reply(request, route, status, _JSON.encode(payload).encode(), "application/json", started,
                            rid, cors, headers)

    def error(request, route, exc, started, rid, cors=False):
        status = status_of(exc)
        # a server's settings are its command line's flags: name them so; and never where its
        # files live
        msg = scrub(as_flags(str(exc))) if status < 500 else f"internal error ({type(exc).__name__})"
        return reply(request, route, status, {"error": msg.splitlines()[0] if msg else type(exc).__name__},
                     started, rid, cors)

    async def read_json(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise BadMediaType(f"send the body as JSON with 'content-type: application/json' (got "
                               f"{kind or 'none'!r})")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > service.max_body:
            raise _TooLarge(f"the request body has {int(size)} bytes, over this server's limit of "
                            f"{service.max_body} (--max-body-mb): send fewer items per request")
        if size is not None and size.isdigit():  # the length is known and within the limit
            return parse_body(await request.body())
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > service.max_body:
                raise _TooLarge(f"the request body is over this server's limit of {service.max_body} "
                                "bytes (--max-body-mb): send fewer items per request")
        return parse_body(bytes(body))

    def gate(request, scope):
        """Host, Origin and key, in that order; True where the reply needs CORS headers."""
        headers = request.headers
        check_host(headers.get("host"), service.allowed_hosts)
        cors = check_origin(headers.get("origin"), headers.get("host"), service.allow_origins)
        if scope is not None and service.keys is not None:
            service.keys.check(headers.get("authorization"), scope)
        return cors

    def handler(route, fn, scope, needs_body):
        async def endpoint(request: Request):
            started = time.perf_counter()
            rid = request_id(request.headers.get("x-request-id"))
            cors = False
            try:
                cors = gate(request, scope)
                out = fn(await read_json(request)) if needs_body else fn()
                if asyncio.iscoroutine(out):
                    out = await out
                return reply(request, route, 200, out, started, rid, cors)
            except Exception as exc:  # noqa: BLE001 -- one JSON line, the server keeps serving
                return error(request, route, exc, started, rid, cors)

        return endpoint

    def plain(route, make, scope=None):
        """A route that answers other than JSON (page, docs, metrics): the same gate and log."""
        async def endpoint(request: Request):
            started = time.perf_counter()
            rid = request_id(request.headers.get("x-request-id"))
            try:
                cors = gate(request, scope)
                content, media = make(request)
                return finish_reply(request, route, 200, content, media, started, rid, cors)
            except Exception as exc:  # noqa: BLE001
                return error(request, route, exc, started, rid)

        return endpoint

    # plain Starlette routes: each endpoint reads and validates its own body, so every error is
    # hashret's one line; the table API above is also what /openapi.json describes
    fns = {("POST", "/search"): service.search,
           ("POST", "/items"): lambda b: asyncio.to_thread(service.add, b),
           ("DELETE", "/items"): lambda b: asyncio.to_thread(service.remove, b),
           ("GET", "/info"): service.info, ("GET", "/health"): service.health}
    by_path: dict = {}
    for method, path, request_model, _, scope, _ in API:
        name = path if method in ("POST", "GET") else f"{method} {path}"
        by_path.setdefault(path, {})[method] = handler(name, fns[(method, path)], scope, request_model is not None)

    def dispatch(path):
        table = by_path[path]

        async def endpoint(request: Request):
            if request.method == "OPTIONS":
                return preflight(request, path, table)
            return await table[request.method](request)

        return endpoint

    def preflight(request, path, table):
        started = time.perf_counter()
        rid = request_id(request.headers.get("x-request-id"))
        try:
            check_host(request.headers.get("host"), service.allowed_hosts)
            if not check_origin(request.headers.get("origin"), request.headers.get("host"), service.allow_origins):
                raise HashretError("a preflight request needs a foreign Origin")
        except Exception as exc:  # noqa: BLE001
            return error(request, "OPTIONS", exc, started, rid)
        return finish_reply(request, "OPTIONS", 204, b"", None, started, rid, True, {
            "access-control-allow-methods": ", ".join(table), "access-control-max-age": "600",
            "access-control-allow-headers": "authorization, content-type, x-request-id"})

    route = app.router.add_route
    for path, table in by_path.items():
        route(path, dispatch(path), methods=[*table, "OPTIONS"])
    page = PAGE.encode()
    docs = get_swagger_ui_html(openapi_url="/openapi.json", title="hashret API",
                               swagger_js_url="/docs/swagger-ui-bundle.js", swagger_css_url="/docs/swagger-ui.css",
                               swagger_favicon_url="/docs/favicon-32x32.png").body
    route("/", plain("/", lambda r: (page, "text/html; charset=utf-8")), methods=["GET"])
    route("/openapi.json", plain("/openapi.json", lambda r: (openapi, "application/json")), methods=["GET"])
    route("/docs", plain("/docs", lambda r: (docs, "text/html; charset=utf-8")), methods=["GET"])
    for name, media in DOC_ASSETS.items():
        if name in assets:  # fixed names read at start: no request names a file
            route(f"/docs/{name}", plain(f"/docs/{name}", lambda r, b=assets[name], m=media: (b, m)),
                  methods=["GET"])
    route("/metrics", plain("/metrics", lambda r: (generate_latest(service.registry), CONTENT_TYPE_LATEST),
                            scope="read"), methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        started = time.perf_counter()
        rid = request_id(request.headers.get("x-request-id"))
        return reply(request, "unrouted", exc.status_code,
                     {"error": f"{exc.detail}: {request.method} {scrub(request.url.path)} (routes: {ROUTES})"},
                     started, rid)

    return app


def _doc_assets() -> dict:
    """Swagger UI's files, served by this server so that /docs works without internet."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # the serve extra brings it; without it /docs has no assets to load
        return {}
    return {name: (Path(swagger_ui_path) / name).read_bytes() for name in DOC_ASSETS
            if (Path(swagger_ui_path) / name).is_file()}


def serve(indexes, checkpoint=None, rerank=None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          readonly: bool = False, window_ms: float = 0.0, max_batch: int = 256, refresh_s: float = 0.5,
          max_body_mb: float = 16.0, dataset=None, data_root=None, ray=None, api_keys=None,
          allowed_hosts=None, allow_origins=(), max_results: int = 10_000, log_format: str = "text"):
    """Serve ``indexes`` until SIGTERM or SIGINT (in-flight requests finish; exit status 0).
    Opening every index and loading the model happen before the port opens. The policy
    arguments are :class:`Service`'s."""
    import uvicorn

    service = Service([Path(i) for i in indexes], checkpoint, rerank=rerank, dataset=dataset,
                      data_root=data_root, readonly=readonly, window_ms=window_ms,
                      max_batch=max_batch, refresh_s=refresh_s, max_body_mb=max_body_mb, ray=ray,
                      api_keys=api_keys, allowed_hosts=allowed_hosts, allow_origins=allow_origins,
                      max_results=max_results, log_format=log_format, bind=host)
    try:
        for eng in service.engines.values():  # compile / load the kernels before the first request
            eng.scan(np.zeros((1, eng.index.bits // 8), np.uint8), 1)
        app = create_app(service)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30)
        server = uvicorn.Server(config)
        names = ", ".join(f"{n} ({len(e.index)} {e.modality or 'code'} items)" for n, e in service.engines.items())
        log.info(f"serving {names} on http://{host}:{port}{' (read-only)' if readonly else ''}"
                 f"{'; API keys required' if service.keys is not None else ''}")
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
