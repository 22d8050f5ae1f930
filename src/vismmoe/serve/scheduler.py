"""Requests from many clients onto one engine: a bounded queue and a worker thread that runs them.

    submit(request)  ->  queued (QueueFull when `max_batch + max_queue` are held already, running and waiting
                         together: the server answers 429); a free row counts as a place whatever the worker is
                         doing (idle, prefilling, decoding), so a burst always gets the same number of places
    worker, batching "continuous" (default): between two decode steps of the running rows, the waiting
                         requests (up to `max_batch` rows in all) are prefilled together, as one batch, and join
                         them (RunningBatch.admit_group: under an expert budget one prefill copies the experts
                         the newcomers share once); with `--prefill-chunk`, ONE newcomer at a time, a long prompt
                         one chunk per decode step, the next taken once it joined; a row that finishes (EOS, stop string, token limit), is cancelled (client
                         gone) or fails (its sampling) leaves at once and its `done` callback is called; its
                         place is free for the next newcomer (engine/running.py). With `admit_wait_s` (serve
                         --admit-wait-ms), while rows run, fewer newcomers than free places wait until the oldest
                         has waited that long, so more of them share one prefill (`_admit_now`)
    worker, batching "static": takes the oldest request and up to `max_batch - 1` more that are waiting, drops
                         those cancelled while they waited, runs the rest as ONE batch (Engine.generate_requests:
                         prefill together, decode steps together, each row stops on its own) to its end, then
                         calls each request's `done` callback; newcomers wait for the next batch
    drain(timeout)   ->  (shutdown) no new request is taken (ShuttingDown); those queued or running may finish
                         until the deadline, then each is cancelled with finish reason "shutdown"

One request never fails the others: a row's own failure (its preparation, its sampling) ends that row alone with
its `error`. Continuous: a newcomer whose prefill raises fails alone (the running rows are untouched; newcomers prefilled
together are admitted one by one when their batched prefill raises); a decode
step that raises fails the rows of that step. Static: a batch that fails as a whole before any row got a token
(an exception in the prefill) runs its rows again one by one, so the one that caused it fails alone.

A model whose KV cannot be re-batched row by row (sliding-window attention layers: step/rows.py) runs static.
docs/serving.md has the measurements of both. Preparing requests (images, tokens) happens in the server's
threads, beside the engine.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from ..errors import UserError
from ..engine.request import GenerationRequest
from ..engine.running import RunningBatch, blocker

log = logging.getLogger("vismmoe.serve")


class QueueFull(Exception):
    """The scheduler holds `max_batch + max_queue` requests already (running and waiting)."""


class ShuttingDown(QueueFull):
    """The server drains for its shutdown: it takes no new request."""


class Scheduler:
    def __init__(self, engine, *, max_batch: int = 1, max_queue: int = 16, batching: str = "continuous",
                 on_batch: Callable[[list[GenerationRequest]], None] | None = None,
                 on_start: Callable[[GenerationRequest], None] | None = None, admit_wait_s: float = 0.0):
        if max_batch < 1 or max_queue < 1:
            raise UserError(f"--max-batch {max_batch} / --max-queue {max_queue} must be at least 1",
                            "give positive numbers")
        if batching not in ("continuous", "static"):
            raise UserError(f"--batching {batching!r} is not known", "give continuous or static")
        if batching == "continuous" and blocker(engine) is not None:
            log.warning("continuous batching cannot run this model (%s): batching statically", blocker(engine))
            batching = "static"
        self.engine, self.max_batch, self.max_queue, self.batching = engine, max_batch, max_queue, batching
        self.admit_wait_s = admit_wait_s        # continuous: how long newcomers may wait to share one prefill
        self.on_batch = on_batch                # (requests of a static batch, or rows of a continuous step)
        self.on_start = on_start                # a request leaves the queue for the engine (queue time)
        self._waiting: collections.deque = collections.deque()    # (request, done callback)
        self._cv = threading.Condition()
        self._closed = False
        self._draining = False
        self._cancel_reason: str | None = None  # set by cancel_all: every request is cancelled from then on
        self._running: list[GenerationRequest] = []
        self.running = 0                        # requests in the batch that runs now
        self.batches = 0                        # static: batches run; continuous: steps that finished a row
        # rows per decode step (occupancy): continuous, each step's running rows; static, each batch's rows (every
        # row of a static batch runs every step of it)
        self.steps = 0
        self.rows_stepped = 0
        loop = self._loop_continuous if batching == "continuous" else self._loop
        self._thread = threading.Thread(target=loop, name="vismmoe-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, req: GenerationRequest, done: Callable[[GenerationRequest, BaseException | None], None]) -> None:
        """Queue `req`; `done(req, error)` is called from the worker thread once it finished (error None), was
        cancelled while waiting, or failed (the exception)."""
        with self._cv:
            if self._closed or self._draining:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) + len(self._running) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self._running)} requests running and {len(self._waiting)} waiting, the most "
                                f"it holds: --max-batch {self.max_batch} + --max-queue {self.max_queue}")
            self._waiting.append((req, done))
            self._cv.notify()

    def drain(self, timeout_s: float) -> None:
        """Take no new request; after `timeout_s` seconds cancel every request still queued or running, with
        finish reason "shutdown" (each row stops at its next token). Returns at once."""
        with self._cv:
            self._draining = True
        timer = threading.Timer(timeout_s, self.cancel_all, args=("shutdown",))
        timer.daemon = True
        timer.start()

    def cancel_all(self, reason: str) -> None:
        """Cancel every request queued or running, and any the worker takes from now on, with finish reason
        `reason`."""
        with self._cv:
            self._cancel_reason = reason
            reqs = [r for r, _ in self._waiting] + list(self._running)
        for r in reqs:
            r.cancel(reason)

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
            if self._cancel_reason is not None:
                for req, _ in batch:
                    req.cancel(self._cancel_reason)
            self._running = [req for req, _ in batch]          # still held: they left the queue for the engine
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return                                                  # closed
            live = []
            for req, done in batch:
                if req.cancelled.is_set():
                    req.finish_reason = req.cancel_reason
                    _call(done, req, None)
                else:
                    live.append((req, done))
            if not live:
                continue
            reqs = [r for r, _ in live]
            error = self._run(reqs)
            if error is not None and len(reqs) > 1 and not any(r.token_ids or r.finish_reason for r in reqs):
                # failed before any row had a token: find the row that fails by running each alone
                log.warning("batch of %d requests failed before its first token: running them one by one",
                            len(reqs))
                errors = {id(r): self._run([r]) for r in reqs}
            else:
                errors = {id(r): error for r in reqs}
            for req, done in live:
                _call(done, req, req.error or errors[id(req)])

    def _started(self, req: GenerationRequest) -> None:
        req.t_start = req.t_start or time.perf_counter()
        if self.on_start is not None:
            try:
                self.on_start(req)
            except Exception:
                log.exception("start callback failed")

    def _loop_continuous(self) -> None:
        batch = RunningBatch(self.engine, capacity=self.max_batch)
        callbacks: dict[int, Callable] = {}
        while True:
            with self._cv:
                while not self._waiting and not len(batch) and not self._closed:
                    self._cv.wait()
                if self._closed and not self._waiting and not len(batch):
                    return
                news = []
                if batch.prefilling is None:
                    # whole prompts join together (one batched prefill); a chunked one alone, piece by piece
                    room = self.max_batch - len(batch) if not self.engine.prefill_chunk else 1
                    if self._admit_now(batch, room):
                        while self._waiting and len(news) < room:
                            news.append(self._waiting.popleft())
                if self._cancel_reason is not None:
                    for r in batch.requests + [n[0] for n in news]:
                        r.cancel(self._cancel_reason)
                self._running = batch.requests + [n[0] for n in news]
            finished = []
            live = []
            for req, done in news:
                self._started(req)
                if req.cancelled.is_set():
                    req.finish_reason = req.cancel_reason
                    _call(done, req, None)
                else:
                    callbacks[id(req)] = done
                    live.append(req)
            if live:
                try:
                    finished += batch.admit(live[0]) if len(live) == 1 else batch.admit_group(live)
                except Exception as e:      # a bug or a device failure in its prefill or join: these requests' 500
                    log.exception("prefill of %d requests failed", len(live))
                    for req in live:
                        if id(req) in callbacks and not any(r is req for r in batch.requests):
                            req.finish_reason = req.finish_reason or "error"
                            _call(callbacks.pop(id(req), None), req, e)
            self.running = len(batch)
            if len(batch):
                try:
                    finished += batch.step()
                except Exception as e:          # the decode step failed as a whole: its rows get a 500
                    log.exception("decode step of %d rows failed", len(batch.stepped))
                    for r in batch.abort():
                        r.finish_reason = r.finish_reason or "error"
                        _call(callbacks.pop(id(r), None), r, e)
                if batch.stepped:                   # rows a decode step ran (none: only first tokens were given)
                    self.steps += 1
                    self.rows_stepped += len(batch.stepped)
                if self.on_batch is not None and batch.stepped:
                    self.on_batch(batch.stepped)
            self.running = len(batch)
            with self._cv:                          # places free before their clients hear (and send again)
                self._running = batch.requests
            for r in finished:
                _call(callbacks.pop(id(r), None), r, r.error)
            if finished:
                self.batches += 1

    def _admit_now(self, batch: RunningBatch, room: int) -> bool:
        """Whether the waiting newcomers join now (the lock held). Under an expert budget a prefill is mostly
        copying the experts its tokens route to, and newcomers prefilled together copy the experts they share
        once (RunningBatch.admit_group). So while rows run, fewer newcomers than free places wait until the
        oldest has waited `admit_wait_s`: the running rows keep decoding meanwhile. An idle batch admits at
        once; so does a full set of newcomers, and one chunked prefill (`--prefill-chunk`)."""
        if not self.admit_wait_s or not len(batch) or len(self._waiting) >= room or self.engine.prefill_chunk:
            return True
        return not self._waiting or time.perf_counter() - self._waiting[0][0].t_submit >= self.admit_wait_s

    def _run(self, reqs: list[GenerationRequest]) -> Exception | None:
        """One batch on the engine; the exception that failed it as a whole (None: it ran; rows' own errors are
        on the rows)."""
        for r in reqs:
            self._started(r)
        with self._cv:
            self._running = list(reqs)
            if self._cancel_reason is not None:
                for r in reqs:
                    r.cancel(self._cancel_reason)
        self.running = len(reqs)
        self.steps += 1
        self.rows_stepped += len(reqs)
        try:
            self.engine.generate_requests(reqs, row_errors="keep")
            self.batches += 1
        except Exception as e:                  # a bug or a device failure: these requests get a 500
            log.exception("batch of %d requests failed", len(reqs))
            return e
        finally:
            self.running = 0
            with self._cv:
                self._running = []
        if self.on_batch is not None:
            self.on_batch(reqs)
        return None


def _call(done, req, error) -> None:
    """A done callback that fails is logged: the worker thread must keep serving. None: the request was answered
    already (a newcomer failed at its join, then its rows' next step failed too)."""
    if done is None:
        return
    try:
        done(req, error)
    except Exception:
        log.exception("done callback failed")
