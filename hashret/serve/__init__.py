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
``GET /metrics`` (Prometheus), ``GET /openapi.json`` and ``GET /docs`` (the contract),
``GET /`` (a search page). Every request body is checked against a typed contract
(:mod:`~hashret.serve.contract`) before any work; who may ask what -- API keys with a scope,
Host and Origin, JSON-only bodies -- and the access log are :mod:`~hashret.serve.access`'s.
Every failure is one JSON line ``{"error": ...}`` with a 4xx status (401/403 keys and
origins, 404 an unknown id or item, 409 a query the index's model cannot answer, 413 a body
over the limit, 415 a body not sent as JSON); no input gets a 500, and the server keeps
serving.
"""

from __future__ import annotations

import os

# OpenMP threads spin for a while after each parallel region (GNU's default), taking the cores
# from the event loop between scans; a server's scans come in bursts, so they wait passively.
# Set before Numba's (and torch's) OpenMP runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hashret.serve.app import DEFAULT_PORT, Service, create_app, serve, status_of  # noqa: E402
from hashret.serve.batcher import MicroBatcher  # noqa: E402
from hashret.serve.client import query_server  # noqa: E402

__all__ = ["DEFAULT_PORT", "MicroBatcher", "Service", "create_app", "query_server", "serve", "status_of"]
