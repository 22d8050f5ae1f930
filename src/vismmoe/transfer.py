"""Moves expert blobs from a store into device slots, and accounts for the time compute waited on them.

On a GPU every copy is issued on one dedicated copy stream from pinned host memory and returns an event; the
compute stream waits on that event (device-side, the host does not block). How long compute actually stalled is
measured with CUDA events and resolved once per request (`drain_stalls`), so the hot path never synchronises for
bookkeeping. On the CPU a copy is a plain memcpy on the calling thread and all of it is stall.

It does not decide what to copy or where: the cache and the layer schedule do.
"""

from __future__ import annotations

import time
from collections import deque

import torch


class TransferEngine:
    def __init__(self, device: torch.device, store):
        self.device = device
        self.store = store
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._pending: deque = deque()          # (event, blob) whose staging memory is still being read
        self._stall_pairs: list = []            # (layer, ready_event, done_event)
        self._cpu_stall: dict[int, float] = {}
        self._span_start = None                 # copy-stream event before the first copy of a batch
        self._spans: list = []                  # (start, done) events of copy batches, resolved in drain
        self.copy_s = 0.0                       # seconds the link was busy copying (resolved per drain)
        self.bytes_copied = 0

    # ---- copies ----------------------------------------------------------------------------------------------
    def copy_in(self, layer: int, layer_pos: int, expert: int, dst: torch.Tensor, after=None):
        """Start copying one expert into `dst` (a slot row), once event `after` (the last compute that read the
        slot) has passed. Returns an event on GPU, None on CPU (already done)."""
        self._reclaim()
        if not self.cuda:
            t0 = time.perf_counter()
            blob = self.store.blob(layer_pos, expert)
            dst.copy_(blob)
            self.store.release(blob)
            dt = time.perf_counter() - t0
            self._cpu_stall[layer] = self._cpu_stall.get(layer, 0.0) + dt
            self.copy_s += dt
            self.bytes_copied += dst.numel() * dst.element_size()
            return None
        blob = self.store.blob(layer_pos, expert)
        if after is not None:       # the slot's previous expert may still be read by queued compute
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            if self._span_start is None:
                self._span_start = torch.cuda.Event(enable_timing=True)
                self._span_start.record(self.stream)
            dst.copy_(blob, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.stream)
        if self.store.tier == "disk":
            self._pending.append((done, blob))
        self.bytes_copied += dst.numel() * dst.element_size()
        return done

    def wait(self, layer: int, done) -> None:
        """Make the compute stream wait for `done` (the last copy a computation needs)."""
        if done is None:
            return
        self._spans.append((self._span_start, done))
        self._span_start = None
        stream = torch.cuda.current_stream(self.device)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record(stream)
        stream.wait_event(done)
        self._stall_pairs.append((layer, ready, done))

    def _reclaim(self) -> None:
        ring = getattr(self.store, "ring", None)
        limit = ring.shape[0] - 1 if ring is not None else 0
        while self._pending and (len(self._pending) > limit or self._pending[0][0].query()):
            ev, blob = self._pending.popleft()
            ev.synchronize()
            self.store.release(blob)

    # ---- accounting ------------------------------------------------------------------------------------------
    def drain_stalls(self) -> dict[int, float]:
        """Seconds compute waited on copies, per layer, since the last drain. Synchronises (call per request)."""
        out = dict(self._cpu_stall)
        self._cpu_stall.clear()
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
