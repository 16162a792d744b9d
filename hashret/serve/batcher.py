"""The micro-batcher: the queries that wait together are scanned in one kernel call."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from hashret.engine import Engine
from hashret.index.attributes import key


class MicroBatcher:
    """Scans the queries that wait together in one kernel call.

    ``submit(codes, width, filter)`` returns a Future of (distances, ids) for those queries. The
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

    def submit(self, codes: np.ndarray, width: int, filter=None) -> Future:
        fut: Future = Future()
        self._q.put((codes, width, filter, fut))
        return fut

    async def scan(self, codes: np.ndarray, width: int, filter=None):
        """``submit`` for a coroutine: resolved on its own event loop, with no thread-safe
        Future in between."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put((codes, width, filter, _LoopFuture(loop, fut)))
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
            start = time.monotonic()
            deadline = start + wait
            while n < self.max_batch:
                try:
                    # short of ``want``: wait until the deadline; with enough, still the window
                    # the server was given (--batch-window-ms), for those arriving within it
                    left = (deadline if n < want else start + self.window_s) - time.monotonic()
                    item = self._q.get_nowait() if left <= 0 else self._q.get(timeout=left)
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
        groups: dict = {}
        for b in batch:
            text = None if b[2] is None else key(b[2])  # an expression groups by its text,
            groups.setdefault(text if text is not None or b[2] is None else id(b[2]), []).append(b)  # a row array alone
        for group in groups.values():
            self._scan_one(group)

    def _scan_one(self, batch):
        """One kernel call for requests that share a filter."""
        try:
            codes = batch[0][0] if len(batch) == 1 else np.vstack([b[0] for b in batch])
            dist, ids = self.engine.scan(codes, max(b[1] for b in batch), batch[0][2])
        except BaseException as exc:  # noqa: BLE001 -- every waiting request gets the error
            for *_, fut in batch:
                fut.set_exception(exc)
            return
        at = 0
        for codes, width, _, fut in batch:
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
