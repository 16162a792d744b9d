"""hashret serve: the contract, parity with `hashret query --json`, writes that survive a
SIGKILL, hot pick-up in read-only mode, bad requests, SIGTERM, micro-batching and the page
in a real browser. Servers run as subprocesses on a free loopback port and are stopped by
the fixture."""

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from hashret.cli import main
from hashret.data import load_dataset
from hashret.engine import Engine
from hashret.index import HashIndex
from tests.serve.conftest import SPEC

def cli_json(*args):
    res = CliRunner().invoke(main, ["query", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_contract_and_parity_with_the_cli(built, server):
    root = built
    s = server("--index", root / "ix_text", "--index", root / "ix_image", "--checkpoint", root / "a")
    q = int(load_dataset(SPEC).part("query")[0])
    status, out = s.post("/search", {"item": q, "k": 7, "index": "ix_text"})
    assert status == 200 and out["query_modality"] == "image" and out["index"] == "ix_text"
    assert out["results"][0] == cli_json("--index", root / "ix_text", "--checkpoint", root / "a", "--item", q, "-k", 7)
    # a text query goes to the image index by itself; same answer as the CLI's
    status, out = s.post("/search", {"text": "w1 w7 w30 zebra", "k": 5})
    assert status == 200 and out["index"] == "ix_image" and out["unknown_words"] == ["zebra"]
    assert out["results"][0] == cli_json("--index", root / "ix_image", "--checkpoint", root / "a",
                                         "--text", "w1 w7 w30 zebra", "-k", 5)
    # `hashret query --server` prints what the local query prints
    res = CliRunner().invoke(main, ["query", "--server", s.url, "--text", "w1 w7 w30 zebra", "-k", "5", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == out["results"][0]
    # codes: hex of the packed bytes; the nearest of an indexed code is itself
    with HashIndex.open(root / "ix_text") as ix:
        code = ix.packed_codes([3])[0]
        d, ids = ix.search(code[None], 4)
    status, out = s.post("/search", {"codes": [code.tobytes().hex()], "k": 4, "index": "ix_text"})
    assert [r["id"] for r in out["results"][0]] == ids[0].tolist()
    assert [r["distance"] for r in out["results"][0]] == d[0].tolist()
    status, health = s.get("/health")
    assert status == 200 and health["status"] == "ok" and health["indexes"]["ix_text"] == 540
    status, info = s.get("/info")
    assert status == 200 and {i["name"] for i in info["indexes"]} == {"ix_text", "ix_image"}
    status, metrics = s.get("/metrics")
    for name in ("hashret_requests_total", "hashret_request_seconds_bucket", "hashret_items",
                 "hashret_batch_queries_bucket", "hashret_errors_total"):
        assert name in metrics
    assert re.search(r'hashret_requests_total\{route="/search",status="200"\} 4\.0', metrics)
    assert "<form" in s.get("/")[1]
    assert s.stop() == 0


def test_writes_are_durable_across_a_sigkill(built, server, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(built / "ix_text", ix)
    s = server("--index", ix, "--checkpoint", built / "a")
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(3, 4), dtype=np.uint8)
    status, out = s.post("/items", {"codes": [c.tobytes().hex() for c in codes], "ids": [10_001, 10_002, 10_003],
                                    "items": [{"caption": "new"}, None, {"n": 3}]})
    assert status == 200 and out == {"added": 3, "ids": [10_001, 10_002, 10_003], "items": 543, "index": "ix"}
    feats = rng.normal(size=(2, 50)).tolist()  # text features would need texts: codes and text
    status, out = s.post("/items", {"text": ["w1 w2", "w3"], "ids": [10_004, 10_005]})
    assert status == 200 and out["items"] == 545
    status, out = s.call("DELETE", "/items", {"ids": [10_002]})
    assert status == 200 and out["removed"] == 1 and out["items"] == 544
    status, out = s.post("/search", {"codes": [codes[0].tobytes().hex()], "k": 1})
    assert out["results"][0][0]["id"] == 10_001 and out["results"][0][0]["item"] == {"caption": "new"}
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL  # acknowledged writes must survive this
    with HashIndex.open(ix) as back:
        assert len(back) == 544 and back.contains(10_001) and not back.contains(10_002)
        assert back.items([10_003]) == [{"n": 3}]
    s2 = server("--index", ix, "--checkpoint", built / "a")
    status, out = s2.post("/search", {"codes": [codes[2].tobytes().hex()], "k": 1})
    assert out["results"][0][0]["id"] == 10_003
    assert feats  # (features of the wrong side are refused: see test_bad_requests)


def test_read_only_server_picks_up_another_writers_batches(built, server, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(built / "ix_text", ix)
    s = server("--index", ix, "--read-only", "--refresh-s", "0.2")
    status, out = s.post("/items", {"codes": ["00000000"], "ids": [1]})
    assert status == 409 and "read-only" in out["error"]
    code = np.array([[1, 2, 3, 4]], dtype=np.uint8)
    with HashIndex.open(ix, readonly=False) as w:
        w.add(code, ids=[77_777])
        t = time.time()
        while time.time() - t < 5:
            out = s.post("/search", {"codes": [code[0].tobytes().hex()], "k": 1})[1]
            if out["results"][0][0]["id"] == 77_777:
                break
            time.sleep(0.05)
        seen = time.time() - t
    assert out["results"][0][0] == {"rank": 1, "id": 77_777, "distance": 0, "item": None,
                                    "attributes": {"labels": []}}  # added without labels: none
    assert seen < 1.0, f"picked up after {seen:.2f} s"
    assert s.get("/health")[1]["indexes"]["ix"] == 541


def test_bad_requests_get_one_json_line_and_the_server_keeps_serving(built, server, tmp_path):
    root = built
    s = server("--index", root / "ix_text", "--index", root / "other_text", "--checkpoint", root / "a",
               "--max-body-mb", "0.01")
    cases = [
        (dict(raw=b"{not json"), 400, "not JSON"),
        (dict(raw=b"[1, 2]"), 400, "JSON object"),
        ({"image_features": [[0.0] * 7], "index": "ix_text"}, 400, "20"),
        ({"item": 10**6, "index": "ix_text"}, 404, "unknown item"),
        ({"item": "no-such-key", "index": "ix_text"}, 404, "unknown item"),
        ({"item": 1, "k": 0, "index": "ix_text"}, 400, "k must be"),
        ({"item": 1, "k": "5", "index": "ix_text"}, 400, "k must be"),
        ({"item": 1, "k": 10**9, "index": "ix_text"}, 400, "limit of 10000"),
        ({"item": 1, "index": "nope"}, 404, "unknown index"),
        ({"item": 1, "colour": "red"}, 400, "unknown field"),
        ({"codes": ["zz"], "index": "ix_text"}, 400, "not hex"),
        ({"codes": ["0011"], "index": "ix_text"}, 400, "32-bit"),
        ({"item": 1, "text": "w1"}, 400, "exactly one"),
        ({"item": 1, "rerank": True, "index": "ix_text"}, 400, "re-rank"),
        ({"item": 1, "index": "other_text"}, 409, "built with model"),  # another model's index
        (dict(raw=json.dumps({"codes": ["00000000"] * 2000}).encode()), 413, "limit"),
    ]
    for body, status, words in cases:
        got = s.post("/search", **body) if "raw" in body else s.post("/search", body)
        assert got[0] == status and words in got[1]["error"], (body if "raw" not in body else body["raw"][:40], got)
        assert "Traceback" not in got[1]["error"] and "\n" not in got[1]["error"]
    assert s.call("DELETE", "/items", {"ids": [10**9]})[0] == 404
    assert s.post("/items", {"codes": ["00000000"], "ids": [0]})[0] == 400  # id 0 is taken
    assert s.get("/nope")[0] == 404 and "error" in s.get("/nope")[1]
    assert s.call("PUT", "/search", {})[0] == 405
    # the other model's index still answers code queries
    assert s.post("/search", {"codes": ["00000000"], "index": "other_text", "k": 2})[0] == 200
    assert s.get("/health")[1]["status"] == "ok"
    assert s.stop() == 0


def test_sigterm_finishes_in_flight_requests_and_exits_0(built, server):
    s = server("--index", built / "ix_text", "--batch-window-ms", "400")
    got = []
    t = threading.Thread(target=lambda: got.append(s.post("/search", {"codes": ["01020304"], "k": 3})))
    t.start()
    time.sleep(0.15)  # the search now waits in the batcher's window
    assert s.stop(signal.SIGTERM) == 0
    t.join(timeout=30)
    assert got and got[0][0] == 200 and len(got[0][1]["results"][0]) == 3


def test_micro_batching_scans_waiting_queries_together_with_the_same_answers(built):
    from hashret.serve import MicroBatcher

    sizes = []
    with Engine.open(built / "ix_text") as eng:
        b = MicroBatcher(eng, window_s=0.2, max_batch=64, observe=sizes.append)
        rng = np.random.default_rng(1)
        queries = [rng.integers(0, 256, size=(1 + i % 2, 4), dtype=np.uint8) for i in range(12)]
        futs = [b.submit(q, 1 + i) for i, q in enumerate(queries)]
        for i, (q, f) in enumerate(zip(queries, futs)):
            d, ids = f.result(timeout=30)
            rd, rids = eng.index.search(q, 1 + i)
            np.testing.assert_array_equal(d, rd)
            np.testing.assert_array_equal(ids, rids)
        b.close()
    assert sizes == [sum(len(q) for q in queries)]  # one kernel call for all twelve requests


def test_the_page_searches_in_a_real_browser(built, server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium (.ci/run installs it)")
        pytest.skip("no chromium here (apt-get install chromium)")
    root = built
    s = server("--index", root / "ix_image", "--checkpoint", root / "a")
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=15000", "--dump-dom", f"{s.url}/?text=w1+w7&k=5"],
                         capture_output=True, text=True, timeout=120)
    shown = [int(i) for i in re.findall(r'<li class="result" data-id="(\d+)"', out.stdout)]
    expect = s.post("/search", {"text": "w1 w7", "k": 5})[1]["results"][0]
    assert shown == [r["id"] for r in expect], out.stdout[-2000:]
    assert 'data-done="1"' in out.stdout
    only = {"labels": {"none": ["concept0"]}}  # a filter, given in the page's address
    from urllib.parse import quote

    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--virtual-time-budget=15000", "--dump-dom",
                          f"{s.url}/?text=w1+w7&k=5&filter={quote(json.dumps(only))}"],
                         capture_output=True, text=True, timeout=120)
    shown = [int(i) for i in re.findall(r'<li class="result" data-id="(\d+)"', out.stdout)]
    expect = s.post("/search", {"text": "w1 w7", "k": 5, "filter": only})[1]["results"][0]
    assert shown == [r["id"] for r in expect] and shown, out.stdout[-2000:]


def _browser(chromium, *args):
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=15000",
                           *args], capture_output=True, text=True, timeout=120).stdout


def test_the_page_searches_by_item_follows_more_like_this_pages_and_shows_its_results(built, server, tmp_path):
    from tests.serve.test_access import _chromium

    chromium = _chromium()
    s = server("--index", built / "ix_image", "--index", built / "ix_text", "--checkpoint", built / "a")

    def shown(dom):
        return [int(i) for i in re.findall(r'<li class="result" data-id="(\d+)"', dom)]

    # an item search on a chosen index: the query item is shown, the results are the API's
    dom = _browser(chromium, "--dump-dom", f"{s.url}/?index=ix_text&item=3&k=4")
    expect = s.post("/search", {"item": 3, "index": "ix_text", "k": 4})[1]
    assert shown(dom) == [r["id"] for r in expect["results"][0]] and shown(dom), dom[-2000:]
    assert "item 3" in dom and 'data-done="1"' in dom
    # "more like this" on a result is a link to that item's search on the same index
    more = re.findall(r'<a class="more" href="([^"]+)"', dom)
    assert len(more) == 4 and "item=" in more[1] and "index=ix_text" in more[1]
    second = expect["results"][0][1]["id"]
    dom = _browser(chromium, "--dump-dom", s.url + "/" + more[1].replace("&amp;", "&"))
    again = s.post("/search", {"item": second, "index": "ix_text", "k": 4})[1]
    assert shown(dom) == [r["id"] for r in again["results"][0]]
    # page 2 of 3 per page is results 4-6 of the same ranking
    dom = _browser(chromium, "--dump-dom", f"{s.url}/?text=w1+w7&k=3&page=1")
    full = s.post("/search", {"text": "w1 w7", "k": 6})[1]["results"][0]
    assert shown(dom) == [r["id"] for r in full[3:6]]
    assert re.findall(r'data-rank="(\d+)"', dom) == ["4", "5", "6"]
    # and the results are on screen: far more ink below the form than on the empty page
    from PIL import Image

    def ink(url, name):
        path = tmp_path / name
        _browser(chromium, f"--screenshot={path}", "--window-size=1000,1200", url)
        img = np.asarray(Image.open(path).convert("L"))
        return int((img[250:] < 128).sum())

    assert ink(f"{s.url}/?text=w1+w7&k=5", "results.png") > 5 * max(1, ink(f"{s.url}/", "empty.png"))


def test_the_cli_and_the_server_search_through_engine_search(built, monkeypatch):
    """One search path: a CLI query (Engine.search) and a served one both run
    Engine.search_steps -- checks, encoding, re-ranking, payloads -- the server with its
    micro-batcher as the scan step, and they answer alike."""
    import asyncio

    from hashret.serve import Service

    calls, scans = [], []
    real = Engine.search_steps

    def spy(self, *args, **kw):
        calls.append(self.name)
        return real(self, *args, **kw)

    monkeypatch.setattr(Engine, "search_steps", spy)
    cli = cli_json("--index", built / "ix_image", "--checkpoint", built / "a", "--text", "w1 w7 w30", "-k", "5")
    assert calls == ["ix_image"]
    service = Service([built / "ix_image"], built / "a")
    try:
        batcher = service.batchers["ix_image"]
        real_scan = batcher.scan

        async def scan(codes, width, filter=None):
            scans.append(width)
            return await real_scan(codes, width, filter)

        batcher.scan = scan
        served = asyncio.run(service.search({"text": "w1 w7 w30", "k": 5}))
    finally:
        service.close()
    assert calls == ["ix_image", "ix_image"] and scans == [5]
    assert [(h["id"], h["distance"]) for h in served["results"][0]] == [(h["id"], h["distance"]) for h in cli]


def test_filtered_search_through_the_cli_the_server_and_the_batcher_equals_the_index(built, server, tmp_path):
    from hashret.serve.batcher import MicroBatcher

    ds = load_dataset(SPEC)
    ix = built / "ix_text"
    with HashIndex.open(ix) as index:
        code = index.packed_codes([3])[0].tobytes().hex()
        names = index.attribute_columns()[0]["names"]
        assert names == list(ds.label_names)  # build-index stored the dataset's labels
        q = index.packed_codes([3, 9])
        filters = [{"labels": {"any": [names[1]]}}, {"labels": {"all": [names[0], names[2]]}},
                   {"not": {"labels": {"any": names[:3]}}, "id": {"not_in": [3]}}]
        expect = [index.search(q[:1], 7, filter=f)[1][0].tolist() for f in filters]
    for f, want in zip(filters, expect):
        rows = np.asarray(want)[np.asarray(want) >= 0]
        got = cli_json("--index", ix, "--codes", code, "-k", 7, "--filter", json.dumps(f))
        assert [r["id"] for r in got] == rows.tolist()
        for r in got:  # each hit shows what it was selected by
            assert set(r["attributes"]["labels"]) == {names[j] for j in np.flatnonzero(ds.labels[r["id"]])}
    s = server("--index", ix)
    for f, want in zip(filters, expect):
        status, out = s.post("/search", {"codes": [code], "k": 7, "filter": f})
        assert status == 200 and [r["id"] for r in out["results"][0]] == [i for i in want if i >= 0]
    bare = s.url.removeprefix("http://")  # --server as host:port, the way serve was given it
    got = cli_json("--server", bare, "--codes", code, "-k", 7, "--filter", json.dumps(filters[0]))
    assert [r["id"] for r in got] == [i for i in expect[0] if i >= 0]
    # requests with different filters waiting together: one scan per filter, each its own answer
    with Engine.open(ix) as eng:
        batcher = MicroBatcher(eng, window_s=0.2)
        try:
            futures = [batcher.submit(q[:1], 7, f) for f in filters] + [batcher.submit(q[1:], 7, filters[0])]
            got = [f.result(timeout=30)[1][0].tolist() for f in futures]
        finally:
            batcher.close()
        assert got[:3] == expect and got[3] == eng.index.search(q[1:], 7, filter=filters[0])[1][0].tolist()
    bad = CliRunner().invoke(main, ["query", "--index", str(ix), "--codes", code, "--filter", "{labels: 1}"])
    assert bad.exit_code != 0 and bad.output.startswith("error: --filter is not JSON") and bad.output.count("\n") == 1
    bad = CliRunner().invoke(main, ["query", "--index", str(ix), "--codes", code, "--filter",
                                    '{"labels": {"any": ["dragon"]}}'])
    assert bad.exit_code != 0 and "error: filter.labels.any: unknown label 'dragon'" in bad.output


def test_a_batch_window_waits_for_requests_that_trickle_in(built):
    # --batch-window-ms: requests arriving within the window share one scan, even when the
    # first finds nothing else waiting (the batcher once took only what was already queued)
    from hashret.serve import MicroBatcher

    sizes = []
    with Engine.open(built / "ix_text") as eng:
        eng.scan(np.zeros((1, 4), np.uint8), 1)
        b = MicroBatcher(eng, window_s=0.5, observe=sizes.append)
        futs = []
        for _ in range(6):
            futs.append(b.submit(np.zeros((1, 4), np.uint8), 3))
            time.sleep(0.02)
        for f in futs:
            f.result(timeout=30)
        b.close()
    assert sizes == [6]
