"""The seam between the offload runtime's layer call and the CPU side (executor + placement).

    runtime.forward(layer):  route -> idx [T, K] on the host (the layer's one sync)
        start():  misses = needed experts not resident in the cache
                  cpu = all misses (on) | placement.choose(misses, tokens per expert, link queue) (auto)
                  hidden [T, H], weights [T, K] to the host; the executor's job goes to the worker thread (GPU) or
                  runs at once (CPU device: the same cores would only take turns)
                  -> the rest of `needed` (hits and fetched misses) for the device path
        ... the device path plans, copies and computes the rest meanwhile ...
        finish(): the job's pair rows [C, H] to the device, written into the layer's pair rows `pairs [T*K, H]`
                  (rows the device path did not write are zeros), before the sum over each token's K pairs

CPU-computed experts are counted apart (`experts`, `pairs`, `busy_s`), not as misses: no step waited on the link
for them. Where `copy_behind` holds (a CUDA device, the default there) they are still claimed and copied into
slots behind the layer call (the runtime's `_copy_behind`; the fast step's split steps do the same), so the cache
keeps learning the working set: without it an expert the CPU computes never becomes resident, and `on` kept the
cache empty (measured: docs/cpu-experts.md). On a CPU device the copy would take the same cores, and on the disk
tier it would read the expert from its files again: off there. Only decode-sized layer calls copy behind (at most
`BEHIND_MAX_TOKENS` tokens): a prefill's link is busy with its own misses, and copying the CPU's behind them made
`auto`'s TTFT a third longer on the H100 machine.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .executor import CpuExecutor
from .placement import Placement


BEHIND_MAX_TOKENS = 64     # the most tokens of an eager layer call whose CPU-computed misses are copied behind


class CpuSide:
    """The CPU expert side of one engine's runtime. `mode`: "on" (every miss on the CPU) or "auto" (placement).
    `store`: the host tier (offload.store HostStore or DiskStore), `layer_pos`: MoE layer -> its index there."""

    def __init__(self, mode: str, layout, store, device: torch.device, layer_pos: dict[int, int],
                 rates=None, link=None):
        if mode not in ("on", "auto"):
            raise ValueError(f"CpuSide mode {mode!r}")
        self.mode = mode
        self.layout = layout
        self.store = store
        self.device = device
        self.layer_pos = layer_pos
        self.executor = CpuExecutor(layout)
        self.cuda = device.type == "cuda"
        # the disk tier stages each blob in a ring slot given back after use (host blobs are permanent: the
        # executor may then hold a whole layer call's blobs for one native call)
        self.staged = getattr(store, "tier", None) != "host"
        # CPU-computed misses copied into slots behind the call (docstring); not from the disk tier, whose copy would
        # read each expert from its files a second time through the staging ring the CPU side also waits on
        self.copy_behind = self.cuda and not self.staged
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="vismmoe-cpu-experts") if self.cuda else None
        self.link = link
        self.placement = None
        if mode == "auto":
            from .rates import rates_for
            rates = rates or rates_for(device, layout, link)
            fetch_s = (link.seconds(layout.nbytes, device.type) if link is not None and link.emulated
                       else layout.nbytes / (rates.link_gbps * 1e9))
            self.placement = Placement(fetch_s=fetch_s, cpu_s=lambda t: rates.cpu_s(layout, t),
                                       handoff_s=rates.handoff_s if self.cuda else 0.0, shared=not self.cuda)
        self.experts = 0            # (layer, expert) computations the CPU did
        self.pairs = 0              # (token, expert) pairs among them
        self.busy_s = 0.0           # seconds the executor worked

    def copies_behind(self, tokens: int) -> bool:
        """Whether an eager layer call of `tokens` tokens copies its CPU-computed misses in behind (docstring)."""
        return self.copy_behind and tokens <= BEHIND_MAX_TOKENS

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True)

    def _backlog_s(self, transfer) -> float:
        """Seconds of copies queued on the link ahead of this layer's (the emulated link's clock; 0 on the real
        link, whose queue is not tracked on the host)."""
        clock = transfer.clock
        if not clock.profile.emulated:
            return 0.0
        return max(0.0, clock._free_at - time.perf_counter())

    def start(self, runtime, module, layer: int, hidden: torch.Tensor, idx: np.ndarray,
              weights: torch.Tensor, needed: list[int]):
        """Split `needed` (experts of this layer call) into the CPU's and the device's; the CPU's start now. `idx`
        [T, K]: a pair whose id is E (the layer's expert count) is not computed (dropped by --visual-top-k).
        Returns (the device's experts, a job for `finish`, or None when the CPU takes nothing)."""
        cache = runtime.cache
        misses = [e for e in needed if not cache.resident((layer, e))]
        if not misses:
            return needed, None
        if self.placement is None:
            cpu = misses
        else:
            tokens = np.bincount(idx.reshape(-1), minlength=runtime.num_experts)      # (an id E: no pair)
            cpu = self.placement.choose(misses, tokens, self._backlog_s(runtime.transfer))
        if not cpu:
            return needed, None
        taken = set(cpu)
        h = hidden.detach().to("cpu")
        w = weights.detach().to("cpu")
        gate = getattr(module, "_apply_gate", None)
        pos = self.layer_pos[layer]
        t_sub = time.perf_counter()
        predicted = self.placement.predict(cpu, tokens) if self.placement is not None else 0.0
        run = lambda: self.compute(pos, h, idx, w, cpu, gate, t_sub, predicted)      # noqa: E731
        job = self.worker.submit(run) if self.worker is not None else _Done(run())
        job.experts = cpu
        return [e for e in needed if e not in taken], job

    def compute(self, pos: int, h: torch.Tensor, idx: np.ndarray, w: torch.Tensor, cpu: list[int], gate,
                t_sub: float, predicted: float, placement: Placement | None = None):
        """The experts `cpu` of the MoE layer at store row `pos` for the host's `h [T, H]`, `idx [T, K]`,
        `w [T, K]` (executor.pairs: (pair indices, weighted rows)), with the books: busy time, counters, and the
        correction of `placement` (default: this side's) by what the job took since `t_sub` against the
        `predicted` seconds. Runs where it is called: the worker thread (`start`), or the split decode step's host
        side (step/split_step.py, with its own placement)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            got = self.executor.pairs(lambda e: self.store.blob(pos, e), h, idx, w, cpu, gate=gate,
                                      release=self.store.release if self.staged else None)
        t1 = time.perf_counter()
        self.busy_s += t1 - t0
        placement = placement or self.placement
        if placement is not None:                   # what the job took here, against what the rates promised
            placement.observe(predicted, t1 - t_sub)
        self.experts += len(cpu)
        self.pairs += int(got[0].numel())
        return got

    def finish(self, job, pairs: torch.Tensor | None, P: int, H: int, dtype: torch.dtype) -> torch.Tensor:
        """Write the job's rows into `pairs [P, H]` (made, zero-filled, when the device computed nothing)."""
        pick, rows = job.result()
        if pairs is None:
            pairs = torch.zeros(P, H, dtype=dtype, device=self.device)
        pairs[pick.to(self.device, non_blocking=True)] = rows.to(self.device, pairs.dtype, non_blocking=True)
        return pairs


class _Done:
    """A job that already ran (the CPU device runs it inline)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value
