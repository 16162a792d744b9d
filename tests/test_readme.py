"""The README's examples, run as written: the quickstart's commands, the Python API block that
follows them, and the service's commands against the server they start (on a free port, the
one change: a test must not take 8765)."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.serve.conftest import Server, free_port  # the service tests' server runner

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def block(section: str, lang: str = "") -> str:
    """The first fenced block (``lang`` or none) under the ``## section`` heading."""
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    found = re.search(rf"```{lang}\n(.*?)```", body, re.S)
    assert found, f"no ```{lang} block under '## {section}'"
    return found.group(1)


def commands(text: str) -> list:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("pip ")]


def run(line: str, cwd) -> str:
    res = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{line}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart's commands, in order, in an empty folder."""
    cwd = tmp_path_factory.mktemp("readme")
    outputs = [run(line, cwd) for line in commands(block("Quickstart"))]
    return cwd, outputs


def test_the_quickstart_runs_as_written(quickstart):
    cwd, outputs = quickstart
    assert (cwd / "runs" / "gch64" / "config.json").is_file() and (cwd / "idx" / "wiki-image").is_dir()
    hits = json.loads(outputs[-1])  # the --json line
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert {"id", "distance", "item"} <= set(hits[0])


def test_the_python_api_block_runs_after_the_quickstart(quickstart, monkeypatch):
    cwd, _ = quickstart
    monkeypatch.chdir(cwd)
    scope = {}
    exec(compile(block("The Python API in ten lines", "python"), "README.md", "exec"), scope)
    assert len(scope["hits"]) == 5
    assert scope["distances"].shape == scope["ids"].shape == (2, 10)
    assert len(scope["memory"]) == 2


def test_the_service_block_runs_against_its_server(quickstart):
    cwd, _ = quickstart
    lines = commands(block("The service"))
    serve = [line for line in lines if line.startswith("hashret serve")]
    assert len(serve) == 1 and "--port 8765" in serve[0]
    port = free_port()
    args = shlex.split(serve[0].split("#")[0])[2:]  # after "hashret serve"
    args[args.index("--port") + 1] = str(port)
    args = [str(cwd / a) if a.startswith(("idx/", "runs/")) else a for a in args]
    server = Server([a for a in args if a not in ("--port", str(port))], port)
    try:
        server.wait_ready()
        for line in lines:
            if line.startswith("curl"):
                out = run(line.split("  #")[0].replace("localhost:8765", f"127.0.0.1:{port}"), cwd)
                reply = json.loads(out)
                assert "error" not in reply, (line, reply)
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def text_search(tmp_path_factory):
    """The text search block's commands in order in an empty folder; the backgrounded server
    is run (and stopped) here on a free port instead of 8766, waited for before the curl."""
    cwd = tmp_path_factory.mktemp("text-search")
    lines = commands(block("Text search"))
    serve = [line for line in lines if line.startswith("hashret serve")]
    assert len(serve) == 1 and serve[0].rstrip().endswith("&") and "--port 8766" in serve[0]
    port, server, outputs = free_port(), None, {}
    try:
        for line in lines:
            if line.startswith("hashret serve"):
                args = shlex.split(line.rstrip(" &"))[2:]
                args = [str(cwd / a) if a.startswith(("idx/", "runs/")) else a for a in args]
                args = args[:args.index("--port")] + args[args.index("--port") + 2:]
                server = Server(args, port)
                server.wait_ready()
            else:
                outputs[line.split()[0] + " " + line.split()[1]] = run(line.replace("localhost:8766", f"127.0.0.1:{port}"), cwd)
    finally:
        if server is not None:
            assert server.stop() == 0
    return cwd, lines, outputs


def test_the_text_search_block_runs_as_written_to_a_served_text_search(text_search):
    _, lines, outputs = text_search
    assert len(lines) <= 5
    reply = json.loads(outputs["curl -s"])
    assert "error" not in reply and len(reply["results"][0]) == 3, reply
    assert reply["known_words"] == ["sunset", "beach"]
    assert {"tags", "labels"} <= set(reply["results"][0][0]["item"])
    assert outputs["hashret query"].count("mirflickr/") == 5  # the --text query's five images, with their keys


# the docs' Python examples, run as written (own-data.md's is a template of the file's keys,
# its path run end to end by tests/serve/test_own_data.py)
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("doc,nth", [("filters.md", 0), ("sharding.md", 0), ("usage.md", 0), ("usage.md", 1)])
def test_the_docs_python_examples_run_as_written(doc, nth, text_search, tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S)[nth]
    cwd = text_search[0] if "runs/flickr" in code else tmp_path  # after the README's text search
    monkeypatch.chdir(cwd)
    exec(compile(code, f"docs/{doc}", "exec"), {"print": lambda *a, **k: None})
