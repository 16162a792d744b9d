"""Fixtures of the service's tests: two small trained models, three indexes, and servers run
as subprocesses on a free loopback port, stopped by the fixture."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from hashret.engine import build_index
from hashret.training import train

SPEC = "synthetic:n_items=600,n_labels=6,image_dim=20,text_dim=50,n_query=60,n_train=300"
QUIET = dict()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    train("label-ridge", SPEC, 32, seed=0, out=root / "a", progress=False, evaluate=False, **QUIET)
    train("cca-itq", SPEC, 32, seed=0, out=root / "c", progress=False, evaluate=False, **QUIET)
    build_index(root / "a", "text", root / "ix_text", progress=False, **QUIET)
    build_index(root / "a", "image", root / "ix_image", progress=False, **QUIET)
    build_index(root / "c", "text", root / "other_text", progress=False, **QUIET)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, port):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "hashret.cli", "serve", "--port", str(port), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list = []  # stderr, drained as it comes: the access log writes a line per request
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def wait_ready(self):
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._drain.join(timeout=10)
                raise AssertionError(f"the server exited: {''.join(self.log)}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not start in 120 s")

    def call(self, method, path, body=None, raw=None, headers=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path):
        return self.call("GET", path)

    def post(self, path, body=None, **kw):
        return self.call("POST", path, body, **kw)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def server():
    started = []

    def start(*args):
        s = Server([str(a) for a in args], free_port())
        started.append(s)  # stopped by this fixture even if it never answers
        s.wait_ready()
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(timeout=30)
