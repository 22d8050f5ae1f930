"""Moves expert blobs from a store into device slots, and accounts for the time compute waited on them.

Every copy returns a `Ticket`. On a GPU the copy runs on one dedicated copy stream from pinned host memory and the
ticket holds its event; compute waits on it device-side (the host does not block), and how long compute really
stalled is measured with CUDA events, resolved once per request (`drain`). On the CPU a worker thread does the
memcpy (torch releases the GIL), so copies overlap compute there too; the ticket holds its future. With an
emulated link (links.py) the ticket also carries the host time its bytes would have arrived, and waiting for it
sleeps until then.

Disk tier: reads from the checkpoint files run on an I/O thread pool (`IO_THREADS`), so several experts are read
at once and the thread that asked never blocks on the disk. On the GPU the reading thread also queues the
host-to-device copy on the copy stream (under a lock, so "queued last" stays well defined) and sets the
ticket's event; staging-ring slots are given back once their copy has finished, by whichever thread needs room.
A read that fails (the store raises a UserError naming the file and tensor) fails its ticket: the error reaches
the caller from `wait`, the staging slot goes back, and a later copy into the same slot still runs.

It does not decide what to copy or where: the cache, the layer schedule and the prefetcher do.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch

from .links import LinkClock, LinkProfile, PROFILES


@dataclass
class Ticket:
    """One expert copy in flight (or done)."""

    layer: int
    nbytes: int
    seq: int
    event: object = None        # torch.cuda.Event on the copy stream
    future: Future | None = None
    ready_at: float = 0.0       # emulated arrival time (perf_counter clock); 0 without emulation
    enq: int = 0                # GPU: position in the copy stream's queue
    clock: object = None        # a virtual link clock whose time `ready_at` is in (device profiles); None: host

    def done(self) -> bool:
        """Whether the data has arrived. On a device profile's virtual link the device clock alone decides (the
        real copy thread's progress must not change the emulated schedule; `wait` still joins the real copy
        before compute reads the slot)."""
        if self.clock is not None:
            return self.clock.now() >= self.ready_at
        if self.ready_at and time.perf_counter() < self.ready_at:
            return False
        if self.future is not None and not self.future.done():
            return False
        if self.event is not None:
            return self.event.query()
        return True


def copy_runs(items: list[tuple]) -> list[tuple[int, int]]:
    """[i, j) ranges of `items` ((layer, layer_pos, expert, slot, after)) that one copy can carry: consecutive
    experts of one layer into consecutive slots, none after the first waiting on an event other than the first's
    (a copy stream runs in order, so the first's wait holds back the rest)."""
    runs, i, n = [], 0, len(items)
    while i < n:
        _, layer_pos, expert, slot, after = items[i]
        j = i + 1
        while j < n:
            _, lp, e, s, a = items[j]
            if lp != layer_pos or e != expert + j - i or s != slot + j - i or (a is not None and a is not after):
                break
            j += 1
        runs.append((i, j))
        i = j
    return runs


IO_THREADS = 4          # parallel reads from the checkpoint files (disk tier)


def _after(prev: Future | None) -> None:
    """Wait until the earlier copy into the same slot has ended; its failure is its own ticket's to report."""
    if prev is not None:
        wait_futures([prev])


class TransferEngine:
    def __init__(self, device: torch.device, store, link: LinkProfile = PROFILES["real"]):
        self.device = device
        self.store = store
        self.cuda = device.type == "cuda"
        self.disk = getattr(store, "tier", "host") == "disk"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        if self.disk:               # fewer readers than staging slots, so a slot is always on its way back
            threads = max(1, min(IO_THREADS, store.ring.shape[0] - 1))
            self.worker = ThreadPoolExecutor(threads, thread_name_prefix="vismmoe-io")
        else:
            self.worker = None if self.cuda else ThreadPoolExecutor(1, thread_name_prefix="vismmoe-copy")
        self._lock = threading.Lock()           # copy-stream queueing and the pending list (I/O threads)
        self._last_into: dict[int, Future] = {}  # disk tier: the latest copy into each slot (by address)
        self._enq = itertools.count(1)          # order copies were queued on the copy stream
        self.clock = LinkClock(link)
        self._seq = itertools.count()
        self._pending: deque = deque()          # (event, blob): staging memory still being read (disk tier, GPU)
        self._stall_pairs: list = []            # (layer, ready_event, done_event) on GPU
        self._host_stall: dict[int, float] = {}
        self.host_wait_s = 0.0                  # running total of host waits for link time (emulated delay, disk)
        self._span_start = None                 # copy-stream event before the first copy of a batch
        self._spans: list = []                  # (start, done) events of copy batches, resolved in drain
        self.copy_s = 0.0                       # seconds the real link was busy copying (resolved per drain)
        self.bytes_copied = 0
        self.timeline = None                    # timeline.Timeline: copy spans are recorded into it when set
        self._gpu_spans: list = []              # (layer, expert, start event, done event, kind) for the timeline

    @property
    def waits_on_host(self) -> bool:
        """Whether compute waits for copies on the host (CPU, emulated link, disk tier), where the wait can be
        timed; on the GPU with the real link the compute stream waits on the copy stream instead."""
        return not self.cuda or self.link.emulated or self.disk

    @property
    def host_waited(self):
        """() -> seconds the host has waited for link time so far, or None where waits are not on the host."""
        return (lambda: self.host_wait_s) if self.waits_on_host else None

    @property
    def link(self) -> LinkProfile:
        return self.clock.profile

    @contextmanager
    def unthrottled(self):
        """The machine's own link while inside (no emulated delay), the emulated clock again after: for a
        benchmark's warm-up, which is there for kernels and allocations, not to pay link time."""
        clock = self.clock
        self.clock = LinkClock(PROFILES["real"])
        try:
            yield
        finally:
            self.clock = clock

    def link_busy_s(self) -> float:
        """Seconds the link was busy: the emulated clock's when emulating, else the measured copy time."""
        return self.clock.busy_s if self.link.emulated else self.copy_s

    # ---- copies ----------------------------------------------------------------------------------------------
    def copy_in(self, layer: int, layer_pos: int, expert: int, dst: torch.Tensor, after=None,
                kind: str = "demand") -> Ticket:
        """Start copying one expert into `dst` (a slot row), once event `after` (the last compute that read the
        slot, GPU only) has passed. `kind` (demand | prefetch) only labels the timeline."""
        return self.copy_in_many(dst.view(1, -1), [(layer, layer_pos, expert, 0, after)], kind)[0]

    def copy_in_many(self, pool: torch.Tensor, items: list[tuple], kind: str = "demand") -> list[Ticket]:
        """Start the copies `items` into rows of `pool` ([slots, numel]), each (layer, layer_pos, expert, slot,
        after) as for `copy_in`, in this order: one ticket each. On a GPU from host memory they are queued in
        one visit to the copy stream, and a run of experts that follow each other both in the store and in the
        pool (a cold layer's misses land in consecutive free slots) is one copy with one event: queueing a copy
        costs the host about half of what a 4-bit expert takes on the link, and a prefill's compute waits for
        the host. On the CPU (host tier) each layer's items are one job for the copy thread, their tickets one
        future."""
        if not items:                   # a layer call with every expert resident: no visit to the stream
            return []
        nbytes = pool.shape[1] * pool.element_size()
        self.bytes_copied += nbytes * len(items)
        tickets = [Ticket(layer=item[0], nbytes=nbytes, seq=next(self._seq)) for item in items]
        if self.cuda and not self.disk:
            self._queue_runs(pool, items, tickets, kind)
        elif not self.disk:         # CPU, host tier: one job per layer's items (handing a job over costs more
            # than copying a small expert, with the worker busy)
            for _, group in itertools.groupby(zip(items, tickets), key=lambda pair: pair[0][0]):
                group = list(group)
                future = self.worker.submit(self._cpu_copies, pool, [item for item, _ in group], kind)
                for _, ticket in group:
                    ticket.future = future
        else:
            for (layer, layer_pos, expert, slot, after), ticket in zip(items, tickets):
                dst = pool[slot]
                # two copies into one slot (a prefetch evicted before it landed, then the slot reused) must land
                # in order: with several I/O threads the later one first waits for the earlier one (started first)
                prev = self._last_into.get(dst.data_ptr())
                if not self.cuda:   # disk tier: read (and copied) on an I/O thread
                    ticket.future = self.worker.submit(self._cpu_copy, layer_pos, expert, dst, layer, kind, prev)
                else:               # disk tier: read on an I/O thread, which then queues the copy
                    ticket.future = self.worker.submit(self._disk_copy, ticket, layer, layer_pos, expert, dst,
                                                       after, kind, prev)
                self._last_into[dst.data_ptr()] = ticket.future
        for (layer, _, expert, _, _), ticket in zip(items, tickets):
            ticket.ready_at = self._book(layer, expert, nbytes, kind)
            if self.clock.virtual:
                ticket.clock = self.clock
        return tickets

    def _queue_runs(self, pool: torch.Tensor, items: list[tuple], tickets: list[Ticket], kind: str) -> None:
        """GPU, host tier: queue `items` on the copy stream, each run of consecutive experts of one layer into
        consecutive slots (that waits on nothing new) as one copy."""
        with self._lock, torch.cuda.stream(self.stream):
            for i, j in copy_runs(items):
                _, layer_pos, expert, slot, after = items[i]
                blobs = self.store.layer_blobs(layer_pos)[expert:expert + j - i]
                self._enqueue(tickets[i:j], [(it[0], it[2]) for it in items[i:j]], blobs, pool[slot:slot + j - i],
                              after, kind)

    def _enqueue(self, tickets: list[Ticket], keys: list[tuple[int, int]], blob: torch.Tensor, dst: torch.Tensor,
                 after, kind: str) -> None:
        """Queue blob -> dst on the copy stream after event `after` (the last compute that read the slots); the
        caller holds the lock and has made the copy stream current. `tickets` and `keys` ((layer, expert)) are
        the experts this one copy carries."""
        if after is not None:
            self.stream.wait_event(after)
        if self._span_start is None:
            self._span_start = torch.cuda.Event(enable_timing=True)
            self._span_start.record(self.stream)
        if self.timeline is not None and not self.link.emulated:
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
        dst.copy_(blob, non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record(self.stream)
        if self.disk:
            self._pending.append((done, blob))
        enq = next(self._enq)
        for ticket, (layer, expert) in zip(tickets, keys):
            if self.timeline is not None and not self.link.emulated:
                self._gpu_spans.append((layer, expert, start, done, kind))
            ticket.enq = enq
            ticket.event = done

    def _disk_copy(self, ticket: Ticket, layer: int, layer_pos: int, expert: int, dst: torch.Tensor, after,
                   kind: str, prev: Future | None = None) -> None:
        _after(prev)
        blob = self.staged(layer_pos, expert)
        try:
            with self._lock, torch.cuda.stream(self.stream):
                self._enqueue([ticket], [(layer, expert)], blob, dst, after, kind)
        except BaseException:
            self.store.release(blob)        # never queued: nothing will reclaim its slot
            raise

    def staged(self, layer_pos: int, expert: int) -> torch.Tensor:
        """Disk tier: the expert read into a slot of the store's staging ring ([numel] blob; the caller gives it
        back with `store.release`). Finished copies' slots are given back first (waiting for the oldest copy when
        all are taken), so this never blocks on a slot that only a later reclaim would free."""
        while True:
            self._reclaim(need_room=True)
            blob = self.store.blob(layer_pos, expert, block=False)
            if blob is not None:
                return blob
            time.sleep(1e-4)        # every slot is being filled by another reader right now

    def _book(self, layer: int, expert: int, nbytes: int, kind: str) -> float:
        ready = self.clock.book(nbytes)
        if self.timeline is not None and self.link.emulated and not self.clock.virtual:
            dur = self.link.seconds(nbytes)
            self.timeline.add_copy(layer, expert, ready - dur, ready, kind)
        return ready

    def _cpu_copies(self, pool: torch.Tensor, items: list[tuple], kind: str) -> None:
        for layer, layer_pos, expert, slot, _ in items:
            self._cpu_copy(layer_pos, expert, pool[slot], layer, kind)

    def _cpu_copy(self, layer_pos: int, expert: int, dst: torch.Tensor, layer: int = -1, kind: str = "demand",
                  prev: Future | None = None):
        _after(prev)
        t0 = time.perf_counter()
        blob = self.store.blob(layer_pos, expert)
        try:
            dst.copy_(blob)
        finally:
            self.store.release(blob)
        t1 = time.perf_counter()
        with self._lock:
            self.copy_s += t1 - t0
        if self.timeline is not None and not self.link.emulated:
            self.timeline.add_copy(layer, expert, t0, t1, kind)

    def resolve_timeline(self, anchor_event, anchor_time: float) -> None:
        """GPU: turn recorded copy events into host-clock spans relative to `anchor_event` recorded at
        `anchor_time` (call after a synchronisation)."""
        for layer, expert, start, done, kind in self._gpu_spans:
            s = anchor_time + anchor_event.elapsed_time(start) / 1e3
            e = anchor_time + anchor_event.elapsed_time(done) / 1e3
            self.timeline.add_copy(layer, expert, s, e, kind)
        self._gpu_spans.clear()

    def remaining_s(self, tickets: list[Ticket]) -> float:
        """About how long until every ticket's data has arrived: exact on an emulated link (its clock), else the
        bytes not yet arrived over the link's rate (an upper bound: some may be partly copied)."""
        pending = [t for t in tickets if t is not None and not t.done()]
        if not pending:
            return 0.0
        if self.link.emulated:
            return max(0.0, max(t.ready_at for t in pending) - self.clock.now())
        rate = self.link.rate_gbps(self.device.type) * 1e9
        return sum(t.nbytes for t in pending) / rate

    def wait(self, layer: int, tickets: list[Ticket]) -> None:
        """Make compute wait until every ticket's data has arrived (emulated arrival included)."""
        tickets = [t for t in tickets if t is not None]
        if not tickets:
            return
        t0 = time.perf_counter()
        ready_at = max(t.ready_at for t in tickets)
        for t in tickets:
            if t.future is not None:
                t.future.result()
        if self.clock.virtual:              # a device profile: the wait moves the device clock, not the host
            stall = self.clock.wait_until(ready_at)
            if stall > 0:
                self._host_stall[layer] = self._host_stall.get(layer, 0.0) + stall
                self.host_wait_s += stall
            return
        t1 = time.perf_counter()
        self.clock.wait_until(ready_at)
        host = time.perf_counter() - t0
        if host > 0 and self.waits_on_host:                                      # the host itself waited
            self._host_stall[layer] = self._host_stall.get(layer, 0.0) + host
            # link time only: the emulated link's delay, and disk reads; a CPU copy thread's memcpy is work that
            # competes with compute (prefetching overlaps it), not link time
            self.host_wait_s += host if self.disk else time.perf_counter() - t1
        if self.cuda:
            last = max(tickets, key=lambda t: t.enq)            # one stream: events complete in queue order
            stream = torch.cuda.current_stream(self.device)
            ready = torch.cuda.Event(enable_timing=True)
            ready.record(stream)
            stream.wait_event(last.event)
            self._stall_pairs.append((layer, ready, last.event))
            with self._lock:
                if self._span_start is not None:
                    self._spans.append((self._span_start, last.event))
                    self._span_start = None

    def _reclaim(self, need_room: bool = False) -> None:
        """Give staging slots back for copies that finished; with `need_room`, wait for the oldest copy when every
        slot is taken (the copy stream never waits on the host, so this always ends)."""
        ring = getattr(self.store, "ring", None)
        limit = ring.shape[0] - 1 if ring is not None else 0
        while True:
            with self._lock:
                if not self._pending:
                    return
                ev, blob = self._pending[0]
                full = len(self._pending) > limit or (need_room and not self.store.has_room())
                if not (full or ev.query()):
                    return
                self._pending.popleft()
            ev.synchronize()
            self.store.release(blob)

    # ---- accounting ------------------------------------------------------------------------------------------
    def drain(self) -> dict[int, float]:
        """Seconds compute waited on copies, per layer, since the last drain. Synchronises (call per request)."""
        out = dict(self._host_stall)
        self._host_stall.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for layer, ready, done in self._stall_pairs:
                waited = ready.elapsed_time(done) / 1e3   # negative when the copy finished before compute got there
                if waited > 0:
                    out[layer] = out.get(layer, 0.0) + waited
            self._stall_pairs.clear()
            for start, done in self._spans:
                self.copy_s += start.elapsed_time(done) / 1e3
            self._spans.clear()
            self._reclaim()
        return out
