"""A process's device memory as the driver reports it: `nvidia-smi` sampled in a thread (the peak a process held),
and the free memory of the current CUDA device. Every function gives None where there is no nvidia-smi or CUDA."""

from __future__ import annotations

import shutil
import subprocess
import time
import threading


def _nvidia_smi(*query: str) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def free_mib() -> float | None:
    """Free memory of the current CUDA device as its driver counts it (what llama.cpp's --fit sees), None without
    CUDA."""
    import torch
    return torch.cuda.mem_get_info()[0] / 2**20 if torch.cuda.is_available() else None


def process_mib(pid: int) -> float | None:
    """What `nvidia-smi` says process `pid` holds on the GPU now (None without nvidia-smi or a GPU)."""
    rows = _nvidia_smi("--query-compute-apps=pid,used_memory") or []
    used = [float(r[1]) for r in rows if len(r) == 2 and r[0] == str(pid) and r[1].replace(".", "").isdigit()]
    return max(used) if used else None


class PeakMemory:
    """Samples `nvidia-smi` every `period` s in a thread; `.peak_mib` is the most a process (pid) held."""

    def __init__(self, pid: int | None = None, period: float = 0.1):
        self.pid, self.period, self.peak_mib = pid, period, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            mib = process_mib(self.pid)
            if mib is not None:
                self.peak_mib = max(self.peak_mib or 0.0, mib)
            self._stop.wait(self.period)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class Nothing:
    """A context manager that does nothing (no sampling on the CPU)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def used_mib(index: int = 0) -> float | None:
    """What `nvidia-smi` says is used on GPU `index` now, by every process (None without nvidia-smi or a GPU).
    Where one server runs at a time, its peak minus the figure before it started is what it held, child
    processes and CUDA contexts included, even where nvidia-smi lists no processes (containers)."""
    rows = _nvidia_smi(f"--id={index}", "--query-gpu=memory.used") or []
    try:
        return float(rows[0][0]) if rows else None
    except (ValueError, IndexError):
        return None


def settled_used_mib(settle_s: float = 60.0) -> float | None:
    """The GPU's used memory once it stops falling (a server stopped just before may still be handing memory back):
    the baseline a server's peak is measured against. Polls every 0.5 s until two readings 2 s apart differ by at
    most 64 MiB, or `settle_s` passes."""
    last = used_mib()
    t0 = time.monotonic()
    while last is not None and time.monotonic() - t0 < settle_s:
        time.sleep(2.0)
        now = used_mib()
        if now is None or abs(now - last) <= 64:
            return now
        last = now
    return last


class PeakUsed(PeakMemory):
    """Samples `used_mib(index)` every `period` s in a thread; `.peak_mib` is the most used on that GPU."""

    def __init__(self, index: int = 0, period: float = 0.2):
        super().__init__(None, period)
        self.index = index

    def _loop(self) -> None:
        while not self._stop.is_set():
            mib = used_mib(self.index)
            if mib is not None:
                self.peak_mib = max(self.peak_mib or 0.0, mib)
            self._stop.wait(self.period)
