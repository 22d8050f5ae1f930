"""What this machine can do for the placement model, measured once and cached.

    link     GB/s of one expert-sized copy host -> device (pinned, CUDA), or of the memcpy into a slot (CPU device)
    cpu      per (expert format, H, I, dtype, kernel): seconds the executor takes for one expert at 1, 2, 4, ... 64
             tokens (and the GB/s of expert bytes and GFLOP/s that gives), the host's cores only; the kernel is the
             one the executor runs here (`VISMMOE_CPU_KERNEL`, executor.kernel_key), so switching it measures anew
    handoff  seconds one hand-off to the worker thread and back costs (the CPU side's fixed cost per layer)

Stored as JSON in the cache folder (`$VISMMOE_CACHE`, else `~/.cache/vismmoe`), one file per machine
(`rates-<key>.json`, the key hashed from CPU model, core count, torch threads and GPU name). `vismmoe
calibrate-rates` measures again and rewrites it; an engine with `--cpu-experts auto` measures on first use what the
file lacks (a new format or shape: under a second for experts of a few MiB) and adds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

TOKENS = (1, 2, 4, 8, 16, 32, 64)       # tokens per expert the CPU is measured at
VERSION = 1


def cache_dir() -> str:
    return os.environ.get("VISMMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vismmoe")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict:
    """What the rates depend on: CPU model, cores, torch threads, GPU name (None without one)."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu}


def machine_key(m: dict) -> str:
    return hashlib.sha1(json.dumps(m, sort_keys=True).encode()).hexdigest()[:12]


def shape_key(layout) -> str:
    """A CPU row's key: format spec, shape, dtype and the kernel that computes it (executor.kernel_key: rates
    measured with torch are not used for the native kernel, nor those of another build of it)."""
    from .executor import kernel_key
    return f"{layout.spec()}|{layout.hidden}x{layout.inter}|{str(layout.dtype).replace('torch.', '')}|" \
        f"{kernel_key(layout)}"


@dataclass
class Rates:
    """Measured rates of one machine (see the module docstring). `cpu[shape_key]` = seconds per expert at
    `TOKENS`."""

    machine: dict
    link_gbps: float | None = None           # None: not measured (no device of that kind)
    handoff_s: float = 0.0
    cpu: dict[str, list[float]] = field(default_factory=dict)
    tokens: tuple[int, ...] = TOKENS
    _keys: dict = field(default_factory=dict, repr=False, compare=False)     # id(layout) -> (layout, shape key)

    def cpu_s(self, layout, tokens: int) -> float:
        """Seconds for one expert of `layout` at `tokens` tokens: linear between measured token counts, and
        proportional to the tokens past the last one. KeyError when the shape was not measured. The row is the
        kernel's that computes `layout` at this object's first look-up of it (the placement asks per miss)."""
        got = self._keys.get(id(layout))
        if got is None or got[0] is not layout:
            got = self._keys[id(layout)] = (layout, shape_key(layout))
        secs = self.cpu[got[1]]
        ts = self.tokens
        if tokens >= ts[-1]:
            return secs[-1] * tokens / ts[-1]
        return float(np.interp(tokens, ts, secs))

    def to_json(self) -> dict:
        return {"version": VERSION, "machine": self.machine, "link_gbps": self.link_gbps,
                "handoff_s": self.handoff_s, "tokens": list(self.tokens), "cpu": self.cpu}

    @classmethod
    def from_json(cls, d: dict) -> Rates:
        return cls(machine=d["machine"], link_gbps=d.get("link_gbps"), handoff_s=float(d.get("handoff_s", 0.0)),
                   cpu={k: [float(x) for x in v] for k, v in d.get("cpu", {}).items()},
                   tokens=tuple(d.get("tokens", TOKENS)))

    def summary(self, layout) -> list[dict]:
        """Per measured token count: seconds, GB/s of expert bytes, GFLOP/s (3 matmuls of 2*H*I per token)."""
        out = []
        key = shape_key(layout)
        for t, s in zip(self.tokens, self.cpu.get(key, [])):
            out.append({"tokens": t, "ms": s * 1e3, "gbps": layout.nbytes / s / 1e9,
                        "gflops": 6 * layout.hidden * layout.inter * t / s / 1e9, "kernel": key.rsplit("|", 1)[1]})
        return out


def path_for(m: dict) -> str:
    return os.path.join(cache_dir(), f"rates-{machine_key(m)}.json")


def load(m: dict) -> Rates | None:
    """The cached rates of machine `m`, or None (absent, unreadable, another version or machine)."""
    try:
        with open(path_for(m)) as f:
            d = json.load(f)
        if d.get("version") != VERSION or d.get("machine") != m:
            return None
        return Rates.from_json(d)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(rates: Rates) -> str | None:
    """Write `rates` to the cache folder (atomically); the path, or None where the folder cannot be written (the
    rates then live for this process only)."""
    path = path_for(rates.machine)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".rates-")
        with os.fdopen(fd, "w") as f:
            json.dump(rates.to_json(), f, indent=1)
        os.replace(tmp, path)
        return path
    except OSError:
        return None


# ---- measurements --------------------------------------------------------------------------------------------
def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_link(device: torch.device, nbytes: int = 64 << 20, reps: int = 5) -> float:
    """GB/s of a `nbytes` copy host -> `device` (pinned host memory on CUDA; a memcpy on the CPU)."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        src = src.pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

        def copy():
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
    else:
        dst = torch.empty_like(src)

        def copy():
            dst.copy_(src)
    return nbytes / _median_time(copy, reps) / 1e9


def measure_handoff(reps: int = 50) -> float:
    """Seconds of one submit to a worker thread and the wait for its result."""
    with ThreadPoolExecutor(1) as pool:
        return _median_time(lambda: pool.submit(int).result(), reps)


def random_blobs(layout, n: int, seed: int = 0) -> torch.Tensor:
    """[n, numel]: `n` experts of random weights (std 0.02) in `layout`'s blobs, on the host."""
    gen = torch.Generator().manual_seed(seed)
    H, I = layout.hidden, layout.inter
    blobs = torch.empty(n, layout.numel, dtype=layout.pool_dtype)
    for i in range(n):
        layout.quantize(torch.randn(1, 2 * I, H, generator=gen) * 0.02, torch.randn(1, H, I, generator=gen) * 0.02,
                        blobs[i:i + 1])
    return blobs


def measure_cpu(layout, tokens=TOKENS, budget_bytes: int = 96 << 20, reps: int = 3) -> list[float]:
    """Seconds per expert of `layout` (random weights) at each token count, computed by the kernel the executor runs
    here (`VISMMOE_CPU_KERNEL`): each timing runs over several experts
    (about `budget_bytes` of blobs, so the weights come from memory, not from the caches, as misses do)."""
    from .executor import CpuExecutor
    n = max(2, min(16, budget_bytes // layout.nbytes))
    blobs = random_blobs(layout, n)
    gen = torch.Generator().manual_seed(1)
    ex = CpuExecutor(layout)
    out = []
    for t in tokens:
        x = torch.randn(t, layout.hidden, generator=gen).to(layout.dtype)
        out.append(_median_time(lambda: [ex.expert(blobs[i], x) for i in range(n)], reps) / n)
    return out


def rates_for(device: torch.device, layout, link=None, measure: bool = True) -> Rates:
    """This machine's rates with `layout`'s CPU row present: from the cache, measuring (and caching) what it lacks.
    `link`: an emulated links.LinkProfile replaces the measured link rate (not cached)."""
    device = torch.device(device)
    m = machine(device)
    rates = load(m) or Rates(machine=m)
    changed = False
    if rates.link_gbps is None and measure:
        rates.link_gbps, rates.handoff_s, changed = measure_link(device), measure_handoff(), True
    if shape_key(layout) not in rates.cpu and measure:
        rates.cpu[shape_key(layout)] = measure_cpu(layout)
        changed = True
    if changed:
        save(rates)
    if link is not None and link.emulated:
        rates = Rates(machine=m, link_gbps=link.rate_gbps(device.type), handoff_s=rates.handoff_s, cpu=rates.cpu,
                      tokens=rates.tokens)
    return rates


def calibrate(device: torch.device, layouts: list) -> tuple[Rates, str | None]:
    """Measure everything again (link, hand-off, each layout's CPU row; rows of other layouts kept) and rewrite
    the cache: (the rates, the file written or None)."""
    device = torch.device(device)
    m = machine(device)
    rates = load(m) or Rates(machine=m)
    rates.link_gbps, rates.handoff_s = measure_link(device), measure_handoff()
    for layout in layouts:
        rates.cpu[shape_key(layout)] = measure_cpu(layout)
    return rates, save(rates)
