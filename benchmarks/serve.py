"""hashret serve under load: searches/s and latency, with and without micro-batching, beside
in-process search and one process per query (the CLI).

    python benchmarks/serve.py                       # 10^6 and 10^7 random 64-bit codes
    python benchmarks/serve.py --sizes 1000000 --seconds 5 --concurrency 1,32

For each index size it builds an index of random 64-bit codes (kept under --dir to reuse),
starts ``hashret serve`` on a free loopback port (one run with micro-batching as configured
by default, one with ``--max-batch 1``: one scan per request) and drives ``POST /search``
with random code queries (k = 10) from the *load generator* below: an asyncio client in
this process that holds one keep-alive HTTP/1.1 connection per simulated client and sends
the next request as soon as the previous answer arrives (closed loop, so concurrency is the
number of requests in flight). Each step runs --seconds (default 10, at most 20) after a 1 s
warm-up; latency is per request as the client sees it (median p50, p95, p99). Then the same
step again from an outside generator, wrk (Debian's package; a Lua script sends the same
bodies), where it is installed. The servers run as an operator's would: with --api-keys (a
read key every request sends; --no-keys to leave them off) and the access log written to a
file. Server and generator share this machine's cores: the figures are the whole system's.

Beside them, in the same run: the in-process scan (``Engine.scan``, one query and a batch
of 32: the median of 50) and ``hashret query --index IDX --codes HEX`` as a fresh process
per query (the median of 3).
"""

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _timing import median_ms  # noqa: E402

from hashret.engine import Engine  # noqa: E402
from hashret.index import HashIndex  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _client(port, bodies, start_at, stop_at, lat, errors, seed, key):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head_out = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n" % port
                + (b"Authorization: Bearer %s\r\n" % key.encode() if key else b""))
    i = int(np.random.default_rng(seed).integers(len(bodies)))  # each client starts elsewhere
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            body = bodies[i % len(bodies)]
            i += 1
            writer.write(head_out + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            size = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            await reader.readexactly(size)
            done = time.perf_counter()
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n")[0])
            if now >= start_at:
                lat.append(done - now)
    finally:
        writer.close()


async def _load(port, bodies, clients, seconds, key, warmup=1.0):
    lat, errors = [], []
    start = time.perf_counter() + warmup
    stop = start + seconds
    await asyncio.gather(*[_client(port, bodies, start, stop, lat, errors, c, key) for c in range(clients)])
    return lat, errors, seconds


def drive(port, bodies, clients, seconds, key=None) -> dict:
    """The load generator: ``clients`` closed-loop keep-alive connections for ``seconds``."""
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    lat, errors, secs = run(_load(port, bodies, clients, seconds, key))
    lat = np.array(lat) * 1e3
    return {"clients": clients, "qps": len(lat) / secs, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "requests": int(len(lat)), "errors": len(errors)}


def drive_wrk(port, bodies, clients, seconds, key, workdir: Path) -> dict:
    """The outside load generator: wrk (Debian's package) with a Lua script that sends the same
    bodies (and key), ``clients`` keep-alive connections for ``seconds``."""
    script = workdir / "search.lua"
    lines = ["local bodies = {"] + [f"  [[{b.decode()}]]," for b in bodies] + ["}", "local i = 0",
             "request = function()", "  i = i + 1",
             '  local h = {["Content-Type"] = "application/json"' + (f', ["Authorization"] = "Bearer {key}"' if key else "") + "}",
             '  return wrk.format("POST", "/search", h, bodies[(i % #bodies) + 1])', "end"]
    script.write_text("\n".join(lines) + "\n")
    subprocess.run(["wrk", "-t1", "-c1", "-d1s", "-s", str(script), f"http://127.0.0.1:{port}"],
                   capture_output=True, check=True)  # warm-up, as the own client's first second
    out = subprocess.run(["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{int(seconds)}s", "--latency",
                          "-s", str(script), f"http://127.0.0.1:{port}"],
                         capture_output=True, text=True, check=True).stdout

    def ms(text):
        value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    pct = {int(m.group(1)): ms(m.group(2)) for m in re.finditer(r"^\s+(\d+)%\s+(\S+)", out, re.M)}
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"clients": clients, "qps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": pct.get(50), "p99_ms": pct.get(99), "errors": int(bad.group(1)) if bad else 0}


class Served:
    def __init__(self, index, workdir: Path, *args):
        self.port = free_port()
        # the access log (a line per request) goes to a file, as an operator's would
        self.log = open(workdir / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "hashret.cli", "serve", "--index", str(index),
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        import urllib.request

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited: {self.log.read()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("the server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def build(path: Path, n: int, bits: int = 64, batch: int = 1 << 20):
    if (path / "data.mdb").exists():
        return
    rng = np.random.default_rng(0)
    with HashIndex.create(path, bits) as w:
        for s in range(0, n, batch):
            w.add(rng.integers(0, 256, size=(min(batch, n - s), bits // 8), dtype=np.uint8))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--seconds", type=float, default=10.0, help="per step, at most 20")
    ap.add_argument("--batch-window-ms", default="0", help="the micro-batching run's window")
    ap.add_argument("--dir", default=None, help="keep (or reuse) the indexes here")
    ap.add_argument("--out", default=None, help="write results.json here")
    ap.add_argument("--no-keys", action="store_true", help="serve without --api-keys (default: keys on)")
    ap.add_argument("--no-wrk", action="store_true", help="skip wrk (default: run it where installed)")
    args = ap.parse_args()
    seconds = min(args.seconds, 20.0)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hashret-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    bodies = [json.dumps({"codes": [rng.integers(0, 256, 8, dtype=np.uint8).tobytes().hex()], "k": 10}).encode()
              for _ in range(1000)]
    key = None if args.no_keys else secrets.token_urlsafe(24)
    keyfile = root / "keys"
    if key:
        keyfile.write_text(f"read {key}\n")
    use_wrk = not args.no_wrk and shutil.which("wrk") is not None
    if not args.no_wrk and not use_wrk:
        print("wrk is not installed (apt-get install wrk): only the benchmark's own client runs")
    report = {"generators": ["own: benchmarks/serve.py asyncio closed-loop keep-alive HTTP/1.1 client"]
              + (["wrk: wrk 4 with a Lua script sending the same bodies"] if use_wrk else []),
              "api_keys": key is not None, "seconds_per_step": seconds, "cpus": os.cpu_count(), "sizes": []}
    try:
        for n in [int(float(v)) for v in args.sizes.split(",")]:
            path = root / f"codes-{n}"
            t = time.perf_counter()
            build(path, n)
            rec = {"n": n, "build_s": time.perf_counter() - t, "runs": {}}
            with Engine.open(path) as eng:
                q1 = rng.integers(0, 256, size=(1, 8), dtype=np.uint8)
                q32 = rng.integers(0, 256, size=(32, 8), dtype=np.uint8)
                rec["inprocess_1_ms"] = median_ms(lambda: eng.scan(q1, 10), 50)
                rec["inprocess_32_ms"] = median_ms(lambda: eng.scan(q32, 10), 50)
            cli = [sys.executable, "-m", "hashret.cli", "query", "--index", str(path), "--codes",
                   q1[0].tobytes().hex(), "--json"]
            rec["cli_ms"] = median_ms(lambda: subprocess.run(cli, capture_output=True, check=True), 3)
            print(f"\n{n:,} x 64-bit codes: in-process scan 1 query {rec['inprocess_1_ms']:.2f} ms, "
                  f"32 queries {rec['inprocess_32_ms']:.2f} ms; one CLI process per query {rec['cli_ms']:.0f} ms")
            for name, extra in (("micro-batching", ["--batch-window-ms", args.batch_window_ms]),
                                ("one scan per request", ["--max-batch", "1"])):
                srv = Served(path, root, *extra, *(["--api-keys", str(keyfile)] if key else []))
                try:
                    steps = []
                    for c in [int(v) for v in args.concurrency.split(",")]:
                        r = drive(srv.port, bodies, c, seconds, key)
                        steps.append(r)
                        line = (f"  {name:22s} clients {c:4d}: own {r['qps']:6.0f} searches/s  p50 {r['p50_ms']:6.2f}  "
                                f"p99 {r['p99_ms']:6.2f} ms ({r['errors']} errors)")
                        if use_wrk:
                            w = r["wrk"] = drive_wrk(srv.port, bodies, c, seconds, key, root)
                            line += (f" | wrk {w['qps']:6.0f} searches/s  p50 {w['p50_ms']:6.2f}  p99 {w['p99_ms']:6.2f} ms "
                                     f"({w['errors']} errors)")
                        print(line, flush=True)
                    rec["runs"][name] = steps
                finally:
                    srv.stop()
            report["sizes"].append(rec)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
