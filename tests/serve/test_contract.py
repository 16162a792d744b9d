"""The service's contract: /openapi.json describes every route, and real replies match it;
hostile and malformed requests of every family get one 4xx JSON line -- never a 500, never a
file read from a path the request names, never a silent acceptance -- and the server stays
healthy after each."""

import json
import re

import numpy as np
import pytest

from hashret.index import HashIndex

jsonschema = pytest.importorskip("jsonschema")


def _check(doc, name, value):
    """``value`` against ``#/components/schemas/name`` of the OpenAPI document ``doc``."""
    validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **doc})
    errors = sorted(validator.iter_errors(value), key=str)
    assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"


def test_openapi_describes_every_route_and_the_replies_match_it(built, server, tmp_path):
    import shutil

    ix = tmp_path / "ix"
    shutil.copytree(built / "ix_text", ix)
    s = server("--index", ix, "--index", built / "ix_image", "--checkpoint", built / "a")
    status, doc = s.get("/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == {("POST", "/search"), ("POST", "/items"), ("DELETE", "/items"), ("GET", "/info"),
                      ("GET", "/health")}
    for method, path in routes:
        op = doc["paths"][path][method.lower()]
        assert "200" in op["responses"] and "400" in op["responses"]
        if method != "GET":
            assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components")
    with HashIndex.open(ix) as index:
        code = index.packed_codes([3])[0].tobytes().hex()
    replies = [
        ("SearchReply", s.post("/search", {"codes": [code, code], "k": 3, "index": "ix"})),
        ("SearchReply", s.post("/search", {"text": "w1 w7", "k": 2})),
        ("SearchReply", s.post("/search", {"item": 5, "k": 2, "index": "ix"})),
        ("AddReply", s.post("/items", {"codes": ["0a0b0c0d"], "ids": [99_001], "items": [{"caption": "x"}],
                                       "index": "ix"})),
        ("RemoveReply", s.call("DELETE", "/items", {"ids": [99_001], "index": "ix"})),
        ("InfoReply", s.get("/info")),
        ("HealthReply", s.get("/health")),
        ("ErrorReply", s.post("/search", {"codes": ["zz"], "index": "ix"})),
        ("ErrorReply", s.post("/search", {"item": 10**6, "index": "ix"})),
    ]
    for name, (status, body) in replies:
        assert (status == 200) == (name != "ErrorReply"), (name, status, body)
        _check(doc, name, body)
    # and a request the schema refuses is refused by the server
    _check(doc, "SearchRequest", {"codes": [code], "k": 3})
    with pytest.raises(AssertionError):
        _check(doc, "SearchRequest", {"codes": code, "k": "3"})


def test_hostile_and_malformed_requests_get_a_4xx_line_and_leave_the_server_healthy(built, server, tmp_path):
    import shutil

    ix = tmp_path / "ix"
    shutil.copytree(built / "ix_text", ix)
    secret = tmp_path / "secret.npy"
    np.save(secret, np.zeros((1, 20), np.float32))  # readable, and the right shape
    s = server("--index", ix, "--index", built / "ix_image", "--checkpoint", built / "a")
    before = s.get("/health")[1]["indexes"]
    deep = b'{"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    families = [
        # a path in a request is never opened: the same refusal whether it exists or not
        ("POST", "/search", {"image_features": str(secret), "index": "ix"}, 400, "rows of finite numbers"),
        ("POST", "/search", {"image_features": "/etc/passwd", "index": "ix"}, 400, "rows of finite numbers"),
        ("POST", "/items", {"image_features": str(secret), "index": "ix"}, 400, "rows of finite numbers"),
        # nesting
        ("POST", "/search", deep, 400, "nests deeper"),
        ("POST", "/items", deep, 400, "nests deeper"),
        ("DELETE", "/items", deep, 400, "nests deeper"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "items": [{"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]}, 400, "nests deeper"),
        # wrong types where a name, an object or an id belongs
        ("POST", "/search", {"item": 1, "index": ["ix"]}, 400, "index must be"),
        ("POST", "/search", {"item": 1, "index": {"a": 1}}, 400, "index must be"),
        ("DELETE", "/items", {"ids": [[1]]}, 400, "ids must be"),
        ("DELETE", "/items", {"ids": []}, 400, "ids must be"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "items": {"caption": "x"}, "index": "ix"}, 400, "items must be"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "items": "x", "index": "ix"}, 400, "items must be"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "items": ["x"], "index": "ix"}, 400, "items must be"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "ids": [-1], "index": "ix"}, 400, "ids must be"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "ids": [True], "index": "ix"}, 400, "ids must be"),
        # one query kind, and nothing silently ignored
        ("POST", "/search", {"item": 2, "codes": ["0a0b0c0d"]}, 400, "exactly one"),
        ("POST", "/search", {"k": 3}, 400, "exactly one"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "text": "w1"}, 400, "exactly one"),
        # non-finite numbers and strings for numbers
        ("POST", "/search", b'{"image_features": [[NaN, 1]], "index": "ix"}', 400, "NaN"),
        ("POST", "/search", {"image_features": [[1e999] * 20], "index": "ix"}, 400, "finite"),
        ("POST", "/search", {"image_features": [["1"] * 20], "index": "ix"}, 400, "image_features must be"),
        ("POST", "/search", {"item": 1, "rerank": "yes"}, 400, "rerank must be"),
        # amplification: 200 codes x k = 10,000 in a 2 kB request
        ("POST", "/search", {"codes": ["0a0b0c0d"] * 200, "k": 10_000, "index": "ix"}, 400, "--max-results"),
        # filters: checked against the index's attributes before anything is scanned
        ("POST", "/search", {"codes": ["0a0b0c0d"], "filter": {"colour": {"eq": 1}}, "index": "ix"}, 400,
         "no attribute 'colour'"),
        ("POST", "/search", {"codes": ["0a0b0c0d"], "filter": {"labels": {"any": ["dragon"]}}, "index": "ix"}, 400,
         "unknown label 'dragon'"),
        ("POST", "/search", {"codes": ["0a0b0c0d"], "filter": {"id": {"in": ["a"]}}, "index": "ix"}, 400,
         "list of integer ids"),
        ("POST", "/search", {"codes": ["0a0b0c0d"], "filter": 5, "index": "ix"}, 400, "filter must be"),
        ("POST", "/search", {"codes": ["0a0b0c0d"], "filter": {"labels": {"any": "concept1"}}, "index": "ix"}, 400,
         "must be a list"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "ids": [5001], "attributes": {"labels": [["concept1"], []]},
                             "index": "ix"}, 400,
         "attribute 'labels' has 2 values for 1 codes"),
        ("POST", "/items", {"codes": ["0a0b0c0d"], "ids": [5001], "attributes": {"year": [2000]}, "index": "ix"}, 400,
         "this index stores attributes labels"),
        # bodies that are not JSON objects
        ("POST", "/search", b"[]", 400, "JSON object"),
        ("POST", "/search", b"", 400, "not JSON"),
        ("POST", "/search", b"\xff\xfe", 400, "not JSON"),
    ]
    for method, path, body, status, words in families:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got = s.call(method, path, raw=raw)
        shown = raw[:60]
        assert got[0] == status, (shown, got)
        assert words in got[1]["error"] and "\n" not in got[1]["error"], (shown, got)
        assert str(tmp_path) not in got[1]["error"] and "/etc" not in got[1]["error"], (shown, got)
        assert s.get("/health")[1]["status"] == "ok"
    assert s.get("/health")[1]["indexes"] == before  # nothing written by any of them


def test_replies_carry_no_absolute_server_paths(built, server):
    s = server("--index", built / "ix_text", "--checkpoint", built / "a")
    texts = [json.dumps(s.get("/info")[1]), json.dumps(s.get("/health")[1]),
             json.dumps(s.post("/search", {"item": 10**6})[1])]
    for text in texts:
        assert str(built) not in text
        assert not re.search(r'"/[^"\s]*/', text), text[:300]
    info = s.get("/info")[1]["indexes"][0]
    assert info["name"] == "ix_text" and info["meta"]["checkpoint"] == "a"


def test_the_curl_examples_in_readme_and_docs_match_the_contract():
    """Every `curl --json BODY .../ROUTE` line of the README and docs/service.md sends a body the
    contract accepts, to a route it documents."""
    from pathlib import Path

    from hashret.serve.app import openapi_document

    doc = openapi_document()
    root = Path(__file__).resolve().parents[2]
    seen = 0
    for page in (root / "README.md", root / "docs" / "service.md"):
        for line in page.read_text(encoding="utf-8").splitlines():
            m = re.search(r"curl (?:-s )?(-X (\w+) )?--json '([^']*)'.*?(/\w+)\s*(#.*)?$", line)
            if not m:
                continue
            method, body, path = (m.group(2) or "POST"), json.loads(m.group(3)), m.group(4)
            op = doc["paths"][path][method.lower()]
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
            _check(doc, ref, body)
            seen += 1
    assert seen >= 8
