"""`cpu-local`: this machine as a device profile, from its own measured rates (a few seconds of micro-benchmarks).

Measured (best of a few runs, at the thread count torch uses):
    flops[float32]  a 512 x 512 x 512 float32 matmul's FLOP/s (bfloat16 likewise)
    mem_Bps         a 64 MiB tensor copy: (read + written bytes) / seconds
    tier            the experts' copies: one thread's copy of an expert-sized (1 MiB) tensor, bytes / seconds, and
                    the latency of handing a copy to the copy thread and back (offload/transfer.py's worker)
    op_s            one small operator's dispatch (an add of two 64-element tensors)
    mem_bytes       physical memory (os.sysconf)
Efficiencies are 1 and `miss_s` 0 here: the micro-benchmarks alone do not predict a request (a 512^3 matmul on a
shared 2-core machine is far from what the vision tower's GEMMs reach, and an expert copy costs the CPU far more
than its memcpy). `HostTimer` measures real seconds per kernel class of one request, from which
`vismmoe.bench.profiles` calibrates each class's efficiency and operator cost (prefill and decode phases) and the
per-copy cost `miss_s`, on a held-out request.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from . import KERNEL_CLASSES, DeviceProfile


def _best(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure() -> dict:
    """The raw rates of this machine (see the module docstring); units FLOP/s, bytes/s, seconds, bytes."""
    n = 512
    out = {"threads": torch.get_num_threads()}
    flops = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        flops[name] = 2 * n**3 * 4 / _best(lambda: [a @ b for _ in range(4)])
    out["flops"] = flops
    big = torch.empty(16 * 1024**2, dtype=torch.float32)
    dst = torch.empty_like(big)
    out["mem_Bps"] = 2 * big.numel() * 4 / _best(lambda: dst.copy_(big))
    blob, slot = torch.randn(256 * 1024), torch.empty(256 * 1024)
    with ThreadPoolExecutor(1) as pool:
        per = _best(lambda: [pool.submit(slot.copy_, blob).result() for _ in range(20)]) / 20
        hand = _best(lambda: [pool.submit(int).result() for _ in range(50)]) / 50
    out["tier_Bps"] = blob.numel() * 4 / max(per - hand, 1e-7)
    out["tier_latency_s"] = hand
    x, y = torch.randn(64), torch.randn(64)
    out["op_s"] = _best(lambda: [torch.add(x, y) for _ in range(500)]) / 500
    out["mem_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return out


@functools.lru_cache(maxsize=1)
def cpu_local() -> DeviceProfile:
    """This machine as a profile, measured once per process."""
    m = measure()
    how = f"measured on this machine by vismmoe.profiles.calibrate.measure ({m['threads']} torch threads)"
    return DeviceProfile(
        name="cpu-local", title=f"this machine's CPU ({os.cpu_count()} cores), measured",
        flops=m["flops"], mem_Bps=m["mem_Bps"], mem_bytes=int(m["mem_bytes"]),
        tier={"name": "host memcpy on the copy thread", "Bps": m["tier_Bps"], "latency_s": m["tier_latency_s"]},
        efficiency={k: 1.0 for k in KERNEL_CLASSES}, op_s=m["op_s"], async_launch=False, unified=True,
        sources={k: how for k in ("flops", "mem_Bps", "mem_bytes", "tier.Bps", "tier.latency_s", "op_s")}
        | {"efficiency": "1 by definition: the peaks are this machine's measured matmul and copy rates"},
        calibration="micro-benchmarks only (op_s from a small add)")


class HostTimer:
    """Stands where a DeviceClock stands (engine.clock) but measures: real seconds per kernel class of the spans
    (outermost only) and in between ("other"), on the host clock. Used to calibrate a profile's per-class operator
    cost on a held-out request; copies, waits and the link stay real."""

    def __init__(self, profile: DeviceProfile, sync=None):
        self.profile = profile
        self.sync = sync or (lambda: None)      # a GPU's synchronisation: span ends are the device's
        self.split: dict[str, float] = {}
        self._open: list = []
        self._owner = None
        self._t_req = None

    def now(self) -> float:
        return time.perf_counter()

    def begin(self, kind: str) -> None:
        if threading.get_ident() == self._owner:
            if not self._open:
                self.sync()
            self._open.append((kind, time.perf_counter()))

    def end(self, kind: str) -> None:
        if threading.get_ident() != self._owner or not self._open:
            return
        k, t0 = self._open.pop()
        if not self._open:
            self.sync()
            self.split[k] = self.split.get(k, 0.0) + time.perf_counter() - t0

    def experts(self, pairs: int, experts: int) -> None:
        pass

    @contextmanager
    def request(self):
        self._owner = threading.get_ident()
        before = sum(v for k, v in self.split.items() if k != "other")
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            total = time.perf_counter() - t0
            spans = sum(v for k, v in self.split.items() if k != "other") - before
            self.split["other"] = self.split.get("other", 0.0) + max(0.0, total - spans)
            self._owner = None

    def stats(self) -> dict:
        return {"time_source": "measured (host timer)", "measured_split_s": dict(self.split)}
