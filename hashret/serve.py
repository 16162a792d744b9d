"""``hashret serve``: the engine as a long-running HTTP service (FastAPI on uvicorn).

Everything that makes a one-shot ``hashret query`` slow -- importing torch, loading the
model, opening the index -- happens once. Concurrent searches are *micro-batched*: a
batcher thread per index takes every query waiting (up to ``max_batch``, and waiting up to
``window_ms`` for more; by default 0: the queries that arrived while the last scan ran form
the next batch, so a lone query waits for nothing) and scans them in one kernel call, since
one scan of many queries costs a fraction of as many scans. Writes (``POST /items``, ``DELETE /items``) commit to
LMDB before the reply; with ``readonly`` the server writes nothing and picks up what another
writer commits (``Engine.refresh``, every ``refresh_s``).

Routes: ``POST /search``, ``POST /items``, ``DELETE /items``, ``GET /health``, ``GET /info``,
``GET /metrics`` (Prometheus), ``GET /`` (a search page). Every failure is one JSON line
``{"error": ...}`` with a 4xx status for a bad request (404 unknown id or item, 409 a query
the index's model cannot answer, 413 a body over the limit); the server keeps serving.
"""

from __future__ import annotations

import os

# OpenMP threads spin for a while after each parallel region (GNU's default), taking the cores
# from the event loop between scans; a server's scans come in bursts, so they wait passively.
# Set before Numba's (and torch's) OpenMP runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from hashret.engine import Engine  # noqa: E402
from hashret.errors import ConflictError, HashretError, NotFoundError, check  # noqa: E402

DEFAULT_PORT = 8765


class MicroBatcher:
    """Scans the queries that wait together in one kernel call.

    ``submit(codes, width)`` returns a Future of (distances, ids) for those queries. The
    batcher thread takes the first waiting request, then every request already queued or
    arriving within ``window_s`` -- under load, until the batch is as large as the last one
    or half a scan's time has passed -- up to ``max_batch`` queries, scans them at the
    widest width asked (the first w columns of a top-W answer are the top-w answer: ties
    are broken by row), and hands each request its rows. ``max_batch=1``: one scan per
    request."""

    def __init__(self, engine: Engine, window_s: float = 0.0, max_batch: int = 256, observe=None):
        self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
        self.observe = observe or (lambda n: None)
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{engine.name}", daemon=True)
        self._thread.start()

    def submit(self, codes: np.ndarray, width: int) -> Future:
        fut: Future = Future()
        self._q.put((codes, width, fut))
        return fut

    async def scan(self, codes: np.ndarray, width: int):
        """``submit`` for a coroutine: resolved on its own event loop, with no thread-safe
        Future in between."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((codes, width, _LoopFuture(loop, fut)))
        return await fut

    def close(self):
        self._q.put(None)
        self._thread.join(timeout=10)

    def _run(self):
        last_n, last_scan = 1, 0.0
        while True:
            first = self._q.get()
            if first is None:
                return
            batch, n = [first], len(first[0])
            # Under load (the last batch held several queries) the clients it answered are
            # about to send their next queries: wait for about as many, but no longer than half
            # a scan, rather than scanning the first arrival alone -- one small scan costs
            # nearly as much as a full one. A lone client's batches hold one query: no wait.
            want = min(self.max_batch, max(1, last_n))
            wait = self.window_s if want <= 1 else max(self.window_s, min(0.5 * last_scan, 0.05))
            deadline = time.monotonic() + wait
            while n < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    item = self._q.get_nowait() if n >= want or left <= 0 else self._q.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    self._q.put(None)
                    break
                batch.append(item)
                n += len(item[0])
            t = time.perf_counter()
            self._scan(batch, n)
            last_n, last_scan = n, time.perf_counter() - t

    def _scan(self, batch, n):
        self.observe(n)
        try:
            codes = batch[0][0] if len(batch) == 1 else np.vstack([b[0] for b in batch])
            dist, ids = self.engine.scan(codes, max(b[1] for b in batch))
        except BaseException as exc:  # noqa: BLE001 -- every waiting request gets the error
            for _, _, fut in batch:
                fut.set_exception(exc)
            return
        at = 0
        for codes, width, fut in batch:
            m = len(codes)
            fut.set_result((dist[at:at + m, :width], ids[at:at + m, :width]))
            at += m


class _LoopFuture:
    """An asyncio future set from the batcher thread."""

    def __init__(self, loop, fut):
        self.loop, self.fut = loop, fut

    def _set(self, value, error):
        if not self.fut.done():
            if error is not None:
                self.fut.set_exception(error)
            else:
                self.fut.set_result(value)

    def set_result(self, value):
        self.loop.call_soon_threadsafe(self._set, value, None)

    def set_exception(self, exc):
        self.loop.call_soon_threadsafe(self._set, None, exc)


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
        k, width = eng.search_widths(body.get("k", 10), rerank, body.get("candidates"))
        check(k <= 10_000, f"k must be at most 10000, got {k}")
        check(width <= 100_000, f"candidates must be at most 100000, got {width}")
        t0 = time.perf_counter()
        args = {f: body.get(f) for f in ("text", "image_features", "item", "codes")}
        if args["codes"] is not None:
            q = eng.encode_query(codes=args["codes"])
        else:
            q = await asyncio.to_thread(eng.encode_query, **args)  # torch: off the event loop
        t1 = time.perf_counter()
        dist, ids = await self.batchers[eng.name].scan(q["codes"], width)
        t2 = time.perf_counter()
        if rerank:
            out = await asyncio.to_thread(eng.finish, q, dist, ids, k, rerank, t1 - t0, t2 - t1)
        else:
            out = eng.finish(q, dist, ids, k, rerank, t1 - t0, t2 - t1)
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
                msg = str(exc) if status < 500 else f"internal error ({type(exc).__name__}: {exc})"
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
          max_body_mb: float = 16.0, dataset=None, data_root=None, ray=None, log=print):
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
        log(f"serving {names} on http://{host}:{port}{' (read-only)' if readonly else ''}")
        # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal under
        # the handlers it found: quiet ones make a graceful stop exit with status 0
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        import gc

        gc.freeze()  # the model and the index's objects live on: keep them out of every GC pass
        server.run()
        log("stopped: every in-flight request was answered")
    finally:
        service.close()


def query_server(url: str, index=None, text=None, text_file=None, image_features=None, item=None,
                 k: int = 10, rerank: bool = False, candidates=None, codes=None, timeout: float = 60) -> dict:
    """What :func:`hashret.engine.query_index` returns, asked of a running server."""
    import urllib.error
    import urllib.request

    given = [x is not None for x in (text, text_file, image_features, item, codes)]
    check(sum(given) == 1, "give exactly one query: --text, --text-file, --image-features, --item or --codes")
    body: dict = {"k": k}
    if text_file is not None:
        path = Path(text_file)
        check(path.is_file(), f"text file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    if text is not None:
        body["text"] = text
    elif image_features is not None:
        from hashret.engine import _read_array

        x = _read_array(image_features, "image") if isinstance(image_features, (str, Path)) else image_features
        body["image_features"] = np.asarray(x, dtype=np.float32).tolist()
    elif codes is not None:
        body["codes"] = list(codes)
    else:
        body["item"] = item
    if index is not None:
        body["index"] = Path(index).name
    if rerank:
        body["rerank"] = True
        if candidates is not None:
            body["candidates"] = candidates
    req = urllib.request.Request(url.rstrip("/") + "/search", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            msg = f"HTTP {exc.code}"
        raise HashretError(f"the server at {url} refused the query: {msg}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise HashretError(f"cannot reach a hashret server at {url} ({getattr(exc, 'reason', exc)}): "
                           "start one with 'hashret serve', or check the URL") from None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hashret search</title>
<style>
body{font:15px system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em;color:#222}
form{display:flex;gap:.5em;flex-wrap:wrap}input[type=text]{flex:1;min-width:14em;padding:.4em}
select,input,button{font:inherit}ol{padding-left:2em}li{margin:.35em 0}
.d{color:#666;font-size:.9em}.err{color:#b00020}pre{white-space:pre-wrap;margin:.2em 0;font-size:.85em}
</style></head><body>
<h1>hashret</h1>
<form id="f"><select id="kind"><option value="text">text</option><option value="item">item id</option></select>
<input type="text" id="q" placeholder="words, or an item id" autofocus>
<select id="index"></select><input type="number" id="k" value="10" min="1" max="1000" style="width:5em">
<button>search</button></form>
<p id="status" class="d"></p><ol id="results"></ol>
<script>
const $ = (id) => document.getElementById(id);
async function loadIndexes() {
  const info = await (await fetch("/info")).json();
  for (const ix of info.indexes) {
    const o = document.createElement("option"); o.value = ix.name;
    o.textContent = ix.name + " (" + ix.items + " " + ix.meta.modality + ")"; $("index").appendChild(o);
  }
}
async function search(kind, q, k) {
  const body = {k: Number(k), index: $("index").value || undefined};
  body[kind] = kind === "item" ? (/^\\d+$/.test(q) ? Number(q) : q) : q;
  if (kind === "text") delete body.index;
  $("status").textContent = "searching..."; $("results").innerHTML = "";
  const r = await fetch("/search", {method: "POST", headers: {"content-type": "application/json"},
                                    body: JSON.stringify(body)});
  const out = await r.json();
  if (!r.ok) { $("status").textContent = out.error; $("status").className = "err"; return; }
  $("status").className = "d";
  $("status").textContent = out.results[0].length + " results from " + out.index + " (" +
    out.query_modality + " query; search " + out.search_ms + " ms)" +
    (out.unknown_words && out.unknown_words.length ? "; unknown words: " + out.unknown_words.join(" ") : "");
  for (const res of out.results[0]) {
    const li = document.createElement("li"); li.className = "result";
    li.dataset.id = res.id; li.dataset.distance = res.distance;
    const head = document.createElement("div");
    head.textContent = "id " + res.id + " - distance " + res.distance + (res.score !== undefined ? " - score " + res.score.toFixed(4) : "");
    const pre = document.createElement("pre"); pre.textContent = res.item === null ? "" : JSON.stringify(res.item);
    li.appendChild(head); li.appendChild(pre); $("results").appendChild(li);
  }
  document.body.dataset.done = "1";
}
$("f").addEventListener("submit", (e) => { e.preventDefault(); search($("kind").value, $("q").value, $("k").value); });
loadIndexes().then(() => {
  const p = new URLSearchParams(location.search);
  for (const kind of ["text", "item"]) if (p.get(kind)) {
    $("kind").value = kind; $("q").value = p.get(kind); if (p.get("k")) $("k").value = p.get("k");
    search(kind, p.get(kind), $("k").value);
  }
});
</script></body></html>
"""
