"""Requests from many clients onto one engine: a bounded queue and a worker thread that runs them in batches.

    submit(request)  ->  queued (QueueFull when `max_queue` wait already: the server answers 429)
    worker           ->  takes the oldest request and up to `max_batch - 1` more that are waiting, drops those
                         cancelled while they waited, runs the rest as ONE batch (Engine.generate_requests:
                         prefill together, decode steps together, each row stops on its own), then calls each
                         request's `done` callback
    a request cancelled while it runs stops at its next token; when every row of a batch is done the batch ends
    and its KV cache is freed

Batching is static (a batch runs to its end; newcomers wait for the next one): `max_batch` 1 takes requests in
turn. Which is faster depends on the machine, the model and the budget: docs/serving.md has the measurements
behind the default. The engine runs one batch at a time; preparing requests (images, tokens) happens in the
server's threads, beside it.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from ..errors import UserError
from ..request import GenerationRequest

log = logging.getLogger("vismmoe.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` requests already."""


class Scheduler:
    def __init__(self, engine, *, max_batch: int = 1, max_queue: int = 16,
                 on_batch: Callable[[list[GenerationRequest]], None] | None = None):
        if max_batch < 1 or max_queue < 1:
            raise UserError(f"--max-batch {max_batch} / --max-queue {max_queue} must be at least 1",
                            "give positive numbers")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.on_batch = on_batch
        self._waiting: collections.deque = collections.deque()    # (request, done callback)
        self._cv = threading.Condition()
        self._closed = False
        self.running = 0                        # requests in the batch that runs now
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="vismmoe-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, req: GenerationRequest, done: Callable[[GenerationRequest, BaseException | None], None]) -> None:
        """Queue `req`; `done(req, error)` is called from the worker thread once it finished (error None), was
        cancelled while waiting, or failed (the exception)."""
        with self._cv:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append((req, done))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _take(self) -> list[tuple[GenerationRequest, Callable]]:
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            batch = []
            while self._waiting and len(batch) < self.max_batch:
                batch.append(self._waiting.popleft())
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return                                                  # closed
            live = []
            for req, done in batch:
                if req.cancelled.is_set():
                    req.finish_reason = "cancelled"
                    _call(done, req, None)
                else:
                    live.append((req, done))
            if not live:
                continue
            reqs = [r for r, _ in live]
            self.running = len(reqs)
            error = None
            try:
                self.engine.generate_requests(reqs)
                self.batches += 1
            except Exception as e:                  # a bug or a device failure: the batch's requests get a 500
                log.exception("batch of %d requests failed", len(reqs))
                error = e
            finally:
                self.running = 0
            if self.on_batch is not None and error is None:
                self.on_batch(reqs)
            for req, done in live:
                _call(done, req, error)


def _call(done, req, error) -> None:
    """A done callback that fails is logged: the worker thread must keep serving."""
    try:
        done(req, error)
    except Exception:
        log.exception("done callback failed")
