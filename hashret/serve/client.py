"""A client of ``hashret serve``: what ``hashret query --server URL`` asks with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hashret.engine import read_array
from hashret.errors import HashretError, check


def query_server(url: str, index=None, text=None, text_file=None, image_features=None, item=None,
                 k: int = 10, rerank: bool = False, candidates=None, codes=None, timeout: float = 60,
                 api_key: str | None = None, filter=None) -> dict:
    """What :func:`hashret.engine.query_index` returns, asked of a running server (``api_key``:
    sent as ``Authorization: Bearer``; ``filter``: an expression, sent as ``"filter"``). A ``.npy`` path is read here and sent as numbers: the
    server opens no file a request names."""
    import urllib.error
    import urllib.request

    given = [x is not None for x in (text, text_file, image_features, item, codes)]
    check(sum(given) == 1, "give exactly one query: --text, --text-file, --image-features, --item or --codes")
    body: dict = {"k": k}
    if text_file is not None:
        from hashret.engine.core import read_queries

        text = read_queries(text_file)
    if text is not None:
        body["text"] = text
    elif image_features is not None:
        x = read_array(image_features, "image") if isinstance(image_features, (str, Path)) else image_features
        body["image_features"] = np.asarray(x, dtype=np.float32).tolist()
    elif codes is not None:
        body["codes"] = list(codes)
    else:
        body["item"] = item
    if index is not None:
        body["index"] = Path(index).name
    if filter is not None:
        body["filter"] = filter
    if rerank:
        body["rerank"] = True
        if candidates is not None:
            body["candidates"] = candidates
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if "://" not in url:  # a bare host:port, as --host/--port were given to 'hashret serve'
        url = "http://" + url
    req = urllib.request.Request(url.rstrip("/") + "/search", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
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
