"""The split decode step: a fast step's misses computed on the host's cores, or read over the link in a launch of
their own, while the device waits at that MoE layer (`--cpu-experts on|auto` on the fast step).

The fast step's one graph reads a miss over the link inside its experts kernel: the host learns the routing only
after the step. To compute a miss on the CPU, the host must see each MoE layer's routing before the next layer
runs. A split step does that:

    launch:  the address table holds 0 for every expert without a slot: the kernels read nothing for those pairs
             and give zeros (moe_kernel); slots are read as in the one-graph step
    per MoE layer p, a segment (graphs.StepGraphs.run_split; one CUDA graph each, captured on first use):
        the device runs the decoder layers up to p's, then copies p's routing and input to pinned host memory
        the host waits for it (the boundary), then `between`:
            misses = experts of p's live pairs with no slot
            placement (cpu/placement.py): the CPU's and the link's
            the link's: the experts kernels launched again over an address table that holds only them (their
                        page-locked host blobs), their rows added into `Bucket.extra` on the device
            the CPU's:  the executor (cpu/executor.py) on the host's cores meanwhile; rows summed per token,
                        copied into `Bucket.extra`
        the next segment adds `Bucket.extra` to the residual stream (the family's routed output is a plain sum
        into it: `Family.moe_output_additive`) and clears it
    after the step (fast_step.FastStep._finish): the link's misses are claimed and copied into slots as a
    one-graph step's are; on CUDA the CPU's too, behind the step (not counted as misses: the step did not wait
    for them), so the cache keeps learning the working set (as decode-sized eager layer calls do: cpu/hybrid.py)

Numerics: the CPU computes in float32 what the device computes in the model's dtype, and the misses' rows join
the residual stream after the layer's other terms instead of with them: close, not equal (tests/
test_split_step.py states the tolerance). `--cpu-experts off` never splits and stays bit-exact.

Whether a step splits is `cpu/placement.py` `SplitRule`'s call (each boundary costs a host round trip, worth it
only for steps with misses enough); which misses go where is `Placement`'s. This module is the mechanism.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from . import moe_kernel
from ..cpu.placement import SplitRule


class SplitMisses:
    """The host side of split steps for one engine's `FastStep` `fs`, with the engine's CPU side `cpu`
    (cpu/hybrid.py `CpuSide`: its executor, placement and counters)."""

    def __init__(self, fs, cpu):
        self.fs, self.cpu = fs, cpu
        self.cuda = fs.cuda
        L, E = len(fs.moe_layers), fs.E
        self.gates = [getattr(fs.family.moe_block(fs.model, layer).experts, "_apply_gate", None)
                      for layer in fs.moe_layers]
        # the split step's own placement: the eager one's rates, its own in-place correction. The CPU's work here
        # runs inline while the device waits, not on the worker beside a running device path (whose jobs measured
        # about 3x their calibration: docs/cpu-experts.md), so the eager correction would misjudge it; its fetch_s
        # follows the rule's measured cost of a miss read over the link by the kernels
        pl = None if cpu.placement is None else dataclasses.replace(cpu.placement, scale=1.0)
        self.placement = pl
        fetch_s = pl.fetch_s if pl is not None else fs.layout.nbytes / 50e9
        self.rule = SplitRule(fetch_s=fetch_s,
                              cpu_s=(lambda: pl.cpu_s(1) * pl.scale) if pl is not None else (lambda: fetch_s),
                              boundaries=len(fs.sg.split_ends), always=pl is None,
                              shared=not self.cuda)
        if self.cuda:
            self.addr_host = torch.zeros((L, E), dtype=torch.int64).pin_memory()
            self.addr_dev = torch.zeros((L, E), dtype=torch.int64, device=fs.device)
            self.no_land = torch.zeros(0, dtype=torch.long, device=fs.device)
        self._rows_host: dict[int, torch.Tensor] = {}     # bucket rows B -> pinned [L, B, 1, H]: the CPU's rows
        self._link_warm: set[int] = set()                 # bucket rows B the link launch has run for
        self.steps = 0              # split steps run
        self.link_experts = 0       # misses of split steps read over the link by their own launch
        self.cpu_experts = 0        # misses of split steps computed on the CPU
        self.work_s = 0.0           # host seconds of the running step's `between` calls that had misses
        # the link launches' own cost: CUDA events around each (after the step: seconds per expert read, from the
        # launch's host call on, as the stream was idle then), a running mean that becomes the split placement's
        # fetch_s (the one-graph step's fitted cost does not apply: a launch over a layer's few link misses has
        # few blocks to keep the link's reads in flight)
        self._link_events: list = []
        self._events: dict[int, tuple] = {}                   # MoE layer position -> its launch's pair of events
        self.link_launch_s: float | None = None
        # an emulated link (device profiles): a miss costs the emulated seconds the step sleeps after it, which
        # neither the device time nor the events see: the placement keeps the emulated figure, nothing is fitted
        self.emulated = bool(fs.runtime.transfer.clock.profile.emulated)

    def wanted(self) -> bool:
        return self.rule.want()

    def begin(self, fl, b) -> None:
        """A split step of bucket `b` is launched: no pair computed on the CPU yet, `b.extra` clear (a step that
        failed between two segments may have left rows there; the bucket is shared with the model's other
        engines). CUDA: the link launch's kernels are compiled now for this bucket's rows, not mid-step."""
        fl.cpu_pairs = np.zeros((len(self.fs.moe_layers), b.rows * self.fs.K), dtype=bool)
        b.extra.zero_()
        self.work_s = 0.0
        self._link_events = []
        self.steps += 1
        if self.cuda and b.B not in self._link_warm:
            self._link_warm.add(b.B)
            self._launch_link(b, 0, torch.zeros_like(self.addr_dev[0]))    # address 0 everywhere: reads nothing

    def between(self, b, fl, p: int) -> None:
        """After MoE layer p's segment (its routing and input in `b.out_host`): its misses computed, their rows
        into `b.extra` for the next segment."""
        fs, K = self.fs, self.fs.K
        real = b.rows * K
        idx = b.out_host["route_idx"][p].numpy()[:real].copy()          # [rows*K]
        missing = fl.used[p][idx] < 0
        if not missing.any():
            return
        t0 = time.perf_counter()
        misses = sorted(set(idx[missing].tolist()))
        tokens = np.bincount(idx, minlength=fs.E)
        pl = self.placement
        cpu = misses if pl is None else pl.choose(misses, tokens)
        link = sorted(set(misses) - set(cpu))
        if link:
            self._link(b, p, idx, link)
        if cpu:
            self._cpu(b, fl, p, idx, tokens, cpu)
        self.work_s += time.perf_counter() - t0

    def _link(self, b, p: int, idx: np.ndarray, link: list[int]) -> None:
        """The experts `link` of MoE layer p, read over the link by a launch of the experts kernels of their own
        (CUDA; on the CPU the reference over their host blobs); their rows into `b.extra`."""
        fs, B, K = self.fs, b.B, self.fs.K
        if self.cuda:
            a = self.addr_host[p].numpy()
            a[:] = 0
            a[link] = fs.host_addr[p, link]
            self.addr_dev[p].copy_(self.addr_host[p], non_blocking=True)
            ev = self._events.get(p)
            if ev is None:
                ev = self._events[p] = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev[0].record()
            y = self._launch_link(b, p, self.addr_dev[p])
            ev[1].record()
            self._link_events.append((ev, len(link)))
        else:                               # the CPU step's arithmetic over the link's blobs, zeros for the rest
            bank = fs.store.layer_blobs(fs.store_pos[p])
            take = torch.from_numpy(np.isin(idx, link))[:, None]
            blobs = torch.where(take, bank[torch.from_numpy(idx)], bank.new_zeros(len(idx), bank.shape[1]))
            y = fs.sg.experts[p].reference(blobs, b.route_h[p], b.route_idx[p].view(B, K), b.route_w[p].view(B, K),
                                           b.rows)
        b.extra.view(B, -1).add_(y)
        self.link_experts += len(link)

    def _launch_link(self, b, p: int, addr: torch.Tensor) -> torch.Tensor:
        """The experts kernels over MoE layer p's recorded routing and input, reading through `addr` -> [B, H]."""
        B, K = b.B, self.fs.K
        ex = self.fs.sg.experts[p]
        return moe_kernel.decode_experts(b.route_h[p], b.route_idx[p].view(B, K), b.route_w[p].view(B, K), addr,
                                         torch.empty_like(b.route_idx[p]), torch.empty_like(b.route_w[p]), b.live,
                                         self.no_land, ex.pos, ex.inter, ex.spec, ex.act)

    def _cpu(self, b, fl, p: int, idx: np.ndarray, tokens: np.ndarray, experts: list[int]) -> None:
        """The experts `experts` of MoE layer p on the host's cores (`tokens[e]`: pairs routed to e); their rows
        summed per token into `b.extra`."""
        fs, K, n = self.fs, self.fs.K, b.rows
        h = b.out_host["route_h"][p][:n]                                        # [rows, H], the layer's input
        w = b.out_host["route_w"][p][:n * K].view(n, K)
        # inline on this thread: no hand-off to the worker, which `predict` includes
        pl = self.placement
        predicted = pl.predict(experts, tokens) - pl.handoff_s if pl else 0.0
        pick, rows = self.cpu.compute(fs.store_pos[p], h, idx.reshape(n, K), w, experts, self.gates[p],
                                      time.perf_counter(), predicted, placement=pl)
        acc = torch.zeros(n, h.shape[-1], dtype=torch.float32).index_add_(0, pick // K, rows)
        self.cpu_experts += len(experts)
        fl.cpu_pairs[p, pick.numpy()] = True
        if self.cuda:
            host = self._rows_host.get(b.B)
            if host is None:
                host = self._rows_host[b.B] = torch.zeros((len(fs.moe_layers), b.B, 1, h.shape[-1]),
                                                          dtype=b.extra.dtype).pin_memory()
            host[p, :n, 0] = acc.to(host.dtype)
            host[p, n:] = 0
            b.extra.add_(host[p].to(fs.device, non_blocking=True))
        else:
            b.extra[:n, 0] += acc.to(b.extra.dtype)

    def _price_link(self, measured: bool) -> None:
        """The split placement's fetch_s: the link launches' seconds per expert (this step's events when
        `measured` and it had any, folded into a running mean; a split step without any drifts it back toward the
        fitted one-graph cost, so the link is tried again), else the rule's fitted cost."""
        if measured and self._link_events:                      # the step is done: its events have their times
            s_ = sum(a.elapsed_time(b) for (a, b), _ in self._link_events) / 1e3
            per = s_ / sum(n for _, n in self._link_events)
            self.link_launch_s = per if self.link_launch_s is None else 0.7 * self.link_launch_s + 0.3 * per
        elif measured and self.link_launch_s is not None:
            self.link_launch_s += SplitRule.DRIFT * (self.rule.fetch_s - self.link_launch_s)
        if self.placement is not None:
            self.placement.fetch_s = self.link_launch_s if self.link_launch_s is not None else self.rule.fetch_s

    def after(self, fl, dev_s: float, clean_s: float | None, misses: int, rows: int = 1) -> None:
        """A step finished with `misses` experts not in a slot (split or not): the rule's books. A step that
        compiled or captured graphs (`fl.captured`) says nothing of what a boundary costs."""
        split = fl.cpu_pairs is not None
        self.rule.observe_step(misses, split, None if fl.captured or self.emulated else dev_s, rows)
        if not self.emulated:               # the link's prices (under an emulated link the placement keeps its own)
            self._price_link(split and not fl.captured)
        self._link_events = []
        if clean_s is None:                 # no step was clean (small budgets): the fit's clean step
            clean_s = self.rule.clean_s(rows)
        if split and clean_s is not None and not fl.captured:
            self.rule.observe_split(dev_s - clean_s - self.work_s)
