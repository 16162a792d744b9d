"""Who may ask the service what: API keys and scopes, Host and Origin checks, JSON-only
bodies, the access log (never a key or a body), the CLI passing a key, and the docs page and
search page in a headless browser with no network."""

import json
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from hashret.cli import main

READ = "r" * 8 + "-read-key-0123456789"
WRITE = "w" * 8 + "-write-key-0123456789"


@pytest.fixture
def keys(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# scope key\nread {READ}\n\nwrite {WRITE}\n")
    return f


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def test_keys_and_scopes(built, server, keys, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(built / "ix_text", ix)
    s = server("--index", ix, "--checkpoint", built / "a", "--api-keys", keys)
    search = {"codes": ["0a0b0c0d"], "k": 2}
    add = {"codes": ["0a0b0c0d"], "ids": [88_001]}
    status, out = s.post("/search", search)
    assert status == 401 and "needs an API key" in out["error"]
    assert s.post("/search", search, headers=bearer("x" * 30))[0] == 401
    assert s.post("/search", search, headers={"authorization": READ})[0] == 401  # not 'Bearer <key>'
    assert s.post("/search", search, headers=bearer(READ))[0] == 200
    assert s.post("/search", search, headers=bearer(WRITE))[0] == 200  # a write key may read
    status, out = s.post("/items", add, headers=bearer(READ))
    assert status == 403 and "scope write" in out["error"]
    assert s.post("/items", add)[0] == 401
    assert s.post("/items", add, headers=bearer(WRITE))[0] == 200
    assert s.call("DELETE", "/items", {"ids": [88_001]}, headers=bearer(READ))[0] == 403
    assert s.call("DELETE", "/items", {"ids": [88_001]}, headers=bearer(WRITE))[0] == 200
    assert s.get("/info")[0] == 401 and s.call("GET", "/info", headers=bearer(READ))[0] == 200
    assert s.get("/metrics")[0] == 401 and s.call("GET", "/metrics", headers=bearer(READ))[0] == 200
    health = s.get("/health")
    assert health[0] == 200 and health[1]["auth"] is True  # open, and says keys are needed
    assert s.get("/openapi.json")[0] == 200 and s.get("/docs")[0] == 200
    # the CLI passes a key, from --api-key or HASHRET_API_KEY
    args = ["query", "--server", s.url, "--codes", "0a0b0c0d", "-k", "2", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "needs an API key" in res.stderr
    assert CliRunner().invoke(main, [*args, "--api-key", READ]).exit_code == 0
    assert CliRunner().invoke(main, args, env={"HASHRET_API_KEY": READ}).exit_code == 0
    # no key, and no body, ever reaches the log
    s.stop()
    log = "".join(s.log)
    assert READ not in log and WRITE not in log and "0a0b0c0d" not in log
    assert re.search(r"^POST /search 401 [\d.]+ms id=\w+$", log, re.M)
    assert re.search(r"^POST /items 403 ", log, re.M) and re.search(r"^DELETE /items 200 ", log, re.M)


@pytest.mark.parametrize("content, why", [
    ("read short\n", "shorter than 16"),
    (f"admin {READ}\n", "scope read or write"),
    (f"read {READ} extra\n", "'<scope> <key>'"),
    ("# nothing\n", "holds no keys"),
])
def test_a_bad_key_file_is_refused_naming_the_line_not_the_key(built, tmp_path, content, why):
    f = tmp_path / "keys"
    f.write_text(content)
    res = CliRunner().invoke(main, ["serve", "--index", str(built / "ix_text"), "--api-keys", str(f)])
    assert res.exit_code == 2 and why in res.stderr
    assert READ not in res.stderr and "short\n" not in res.stderr


def test_host_origin_and_media_type(built, server):
    s = server("--index", built / "ix_text", "--allow-origin", "https://app.example")
    search = {"codes": ["0a0b0c0d"], "k": 2}
    # DNS rebinding: a name this server was not told it answers to
    status, out = s.post("/search", search, headers={"host": "evil.example"})
    assert status == 400 and "--allowed-hosts evil.example" in out["error"]
    assert s.call("GET", "/", headers={"host": "evil.example:80"})[0] == 400
    assert s.post("/search", search, headers={"host": f"localhost:{s.port}"})[0] == 200
    # a page of another site may not drive the server; an allowed origin gets CORS headers
    status, out = s.post("/search", search, headers={"origin": "http://evil.example"})
    assert status == 403 and "--allow-origin" in out["error"]
    assert s.post("/search", search, headers={"origin": s.url})[0] == 200  # same origin
    import urllib.request

    req = urllib.request.Request(s.url + "/search", data=json.dumps(search).encode(), method="POST",
                                 headers={"content-type": "application/json", "origin": "https://app.example"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    pre = urllib.request.Request(s.url + "/search", method="OPTIONS", headers={
        "origin": "https://app.example", "access-control-request-method": "POST"})
    with urllib.request.urlopen(pre, timeout=30) as r:
        assert r.status == 204 and "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"]
    # a form post (text/plain, the CSRF vector) is refused before it is read
    status, out = s.post("/search", search, headers={"content-type": "text/plain"})
    assert status == 415 and "application/json" in out["error"]
    assert s.call("DELETE", "/items", {"ids": [1]}, headers={"content-type": "application/x-www-form-urlencoded"})[0] == 415
    # every reply names its request
    req = urllib.request.Request(s.url + "/health", headers={"x-request-id": "abc-123"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["x-request-id"] == "abc-123"


def test_the_access_log_in_json(built, server):
    s = server("--index", built / "ix_text", "--log-format", "json")
    s.post("/search", {"codes": ["0a0b0c0d"], "k": 2}, headers={"x-request-id": "req-7"})
    s.post("/search", {"codes": ["zz"]})
    s.stop()
    lines = [json.loads(ln) for ln in s.log if ln.startswith("{")]
    mine = [ln for ln in lines if ln["request_id"] == "req-7"]
    assert mine and mine[0]["method"] == "POST" and mine[0]["route"] == "/search" and mine[0]["status"] == 200
    assert any(ln["status"] == 400 for ln in lines)
    assert all(set(ln) == {"method", "route", "status", "ms", "request_id"} for ln in lines)


def _chromium():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (.ci/run installs it)")
        pytest.skip("no chromium here (apt-get install chromium)")
    return chromium


def _dump(chromium, url):
    """The page's DOM after its scripts ran, in a browser that can reach nothing but loopback."""
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                           "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
                           "--virtual-time-budget=15000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120).stdout


def test_the_docs_page_renders_offline(built, server):
    chromium = _chromium()
    s = server("--index", built / "ix_text")
    dom = _dump(chromium, f"{s.url}/docs")
    for route in ("/search", "/items", "/info", "/health"):
        assert f'data-path="{route}"' in dom or f">{route}<" in dom, dom[-2000:]
    assert "opblock" in dom  # Swagger UI rendered the operations from /openapi.json


def test_the_page_asks_for_a_key_when_the_server_needs_one(built, server, keys):
    chromium = _chromium()
    s = server("--index", built / "ix_text", "--api-keys", keys)
    dom = _dump(chromium, f"{s.url}/")
    form = re.search(r'<form id="keyform"[^>]*>', dom)
    assert form and "hidden" not in form.group(0), dom[:2000]
    assert "needs an API key" in dom
