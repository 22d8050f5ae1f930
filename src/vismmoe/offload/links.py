"""Link profiles: the host->device (or disk->RAM) link a run pretends to have.

`real` uses the machine's own link untouched. Every other profile is EMULATED: copies still run on the real link
(which is faster), and a virtual link clock decides when each copy would have arrived over the emulated one:
a copy asked for at host time t starts at max(t, when the link frees up), takes `latency + bytes / bandwidth`,
and its data counts as arrived only then; compute that needs it waits until that time. The clock is serial, like
one DMA engine or one flash channel, so overlapping prefetch with compute is emulated faithfully while a queue of
copies still pays for every byte.

Numbers (documented sources, rounded):
- `edge`: 12 GB/s, 10 us per transfer: PCIe 3.0 x16 moves about 12-13 GB/s in practice (15.75 GB/s raw), the
  link of many edge GPU boxes and of discrete GPUs in older hosts.
- `mobile`: 3 GB/s, 50 us per transfer: UFS 4.0 flash reads sequentially at up to about 4.2 GB/s (JEDEC
  UFS 4.0, vendor datasheets), about 3 GB/s sustained for chunked reads, with per-request latency in the tens of
  microseconds: experts streamed from flash on a phone.
- `GBps=N` (optionally `GBps=N,us=L`): any bandwidth and latency.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from ..errors import UserError


# The real link's rate where a number is needed (prefetch sizing, the bound): pinned host-to-device copies on the
# H200's PCIe gen5 measured 53 GB/s; on a CPU "copying in" is a memcpy.
REAL_GBPS = {"cuda": 53.0, "cpu": 8.0}


@dataclass(frozen=True)
class LinkProfile:
    name: str
    gbps: float | None          # None: the real link, not emulated
    latency_s: float = 0.0

    @property
    def emulated(self) -> bool:
        return self.gbps is not None

    def rate_gbps(self, device_type: str = "cpu") -> float:
        """The emulated bandwidth, or the real link's assumed one on this kind of device."""
        return self.gbps if self.emulated else REAL_GBPS.get(device_type, REAL_GBPS["cpu"])

    def seconds(self, nbytes: int, device_type: str = "cpu") -> float:
        """How long one copy of `nbytes` takes on this link."""
        return self.latency_s + nbytes / (self.rate_gbps(device_type) * 1e9)

    def label(self) -> str:
        if not self.emulated:
            return "real"
        return f"{self.name} (emulated {self.gbps:g} GB/s, {self.latency_s * 1e6:g} us/transfer)"


PROFILES = {
    "real": LinkProfile("real", None),
    "edge": LinkProfile("edge", 12.0, 10e-6),
    "mobile": LinkProfile("mobile", 3.0, 50e-6),
}
_CUSTOM = re.compile(r"^gbps=([0-9]*\.?[0-9]+)(?:,us=([0-9]*\.?[0-9]+))?$", re.IGNORECASE)


def get_link(name: str) -> LinkProfile:
    if name in PROFILES:
        return PROFILES[name]
    m = _CUSTOM.match(name.strip())
    if m and float(m.group(1)) > 0:
        return LinkProfile(name, float(m.group(1)), float(m.group(2) or 0) * 1e-6)
    raise UserError(f"unknown link profile {name!r}", "use real, edge, mobile, or GBps=N[,us=L] (e.g. GBps=8,us=20)")


class LinkClock:
    """Serial virtual link: `book(nbytes)` returns the host time the bytes would have arrived. A device profile's
    clock (profiles/clock.py) subclasses it to book on the emulated device's time instead (`virtual`)."""

    virtual = False

    def __init__(self, profile: LinkProfile):
        self.profile = profile
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.busy_s = 0.0

    def book(self, nbytes: int, now: float | None = None) -> float:
        if not self.profile.emulated:
            return 0.0
        now = time.perf_counter() if now is None else now
        dur = self.profile.seconds(nbytes)
        with self._lock:
            start = max(now, self._free_at)
            self._free_at = start + dur
            self.busy_s += dur
            return self._free_at

    def now(self) -> float:
        """The time arrivals are booked in (here the host's)."""
        return time.perf_counter()

    def wait_until(self, ready: float) -> float:
        """Sleep until `ready` (host time); returns the seconds slept."""
        delay = ready - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return max(0.0, delay)
