"""Runs a model's routed experts out of the byte-budgeted device cache, one MoE layer call at a time (the prefill,
and the decode when it is not on the fast step). Orchestrates one layer call in these stages:

    router (transformers) -> top_k_index [T, K], top_k_weights [T, K]
    trim:           (--visual-top-k: engine/visual_topk.py) a rule that drops some pairs: they keep an expert id the
                    token needs anyway, weight 0, and are not computed
    route:          observers.observe(layer, hidden, index, weights) (trace, predictors); the routing to the
                    host (the one sync) -> the distinct experts needed
    plan:           schedule.plan_waves(needed, resident, slots): waves that fit the slots together
    make resident:  per wave: hits cache.touch; misses cache.claim (the policy's victim), then load_slots (the
                    one way slots are filled: misses, preloads, prefetches and the fast step's misses alike;
                    queued together, consecutive ones as one copy);
    compute:        experts already on the device first (grouped.experts_on_slots over the slot pool), then the
                    rest once their copies (tickets) have landed
    prefetch:       prefetcher.issue: predicted experts of the next layers, queued behind this layer's misses;
                    on a GPU once the compute is queued (the host's work for it overlaps that compute), elsewhere
                    before it (CPU compute runs on the host, a device profile's clock would book the copies after)
    combine:        sum over each token's K pair rows -> hidden [T, H]
    with CPU experts (--cpu-experts on|auto, cpu/hybrid.py): after route, the misses placed on the CPU leave the
    device's list and run on a worker thread; their pair rows join the device's before the combine
    policy.retain == False: the layer's experts leave the cache (load-on-demand baseline)

transformers' experts modules reach `forward` through the hook the engine attaches to each of them (hooks.py),
which says which MoE layer the module is.
"""

from __future__ import annotations

import time
from concurrent.futures import wait as futures_wait

import numpy as np
import torch
from .cache import ExpertCache
from ..step.grouped import MAX_GROUPS, experts_on_slots, window_banks, windows
from .schedule import plan_waves
from .transfer import TransferEngine

class OffloadRuntime:
    SPLIT_MIN = 1.0     # hits first only when the misses arrive later than this many grouped calls take

    def __init__(self, cache: ExpertCache, transfer: TransferEngine, moe_layers: tuple[int, ...], num_experts: int,
                 top_k: int):
        self.cache = cache
        self.transfer = transfer
        self.moe_layers = tuple(moe_layers)
        self.top_k = top_k
        self.prefetcher = None                  # prefetch.Prefetcher; also in observers
        self.timeline = None                    # timeline.Timeline of the request in progress, when recording
        self.clock = None                       # profiles.clock.DeviceClock: charged for each grouped call
        self.layer_pos = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts = num_experts
        self.observers: list = []
        self.cpu = None                         # cpu.hybrid.CpuSide: misses computed on the host (--cpu-experts)
        self.trim = None                        # protocols.RoutingTrim: pairs dropped before the call (--visual-top-k)
        self.max_groups = MAX_GROUPS            # slots one grouped matmul may span
        self._call_s = 0.0                      # EMA of one grouped call's host time (the hits-first split rule)
        self.cuda = cache.device.type == "cuda"
        # pinned staging for [T, K] slot indices, one buffer per (wave, window) in flight within a layer (at
        # most E of those); the next layer's host sync guarantees the previous layer's copies have finished, so
        # each layer call starts again at the first buffer and only as many are ever pinned as one call uses
        self._staging = [torch.empty(0, dtype=torch.long) for _ in range(num_experts + 2)]
        self._stage_i = 0

    @property
    def _queued_compute(self) -> bool:
        """Whether `_compute` returns with the layer's compute only queued (a GPU on real time), not done (the CPU)
        nor charged to a virtual device clock (a device profile): then prefetching after it overlaps it."""
        return self.cuda and self.clock is None

    def load_slots(self, pairs: list[tuple[tuple[int, int], int]], kind: str = "demand") -> list:
        """Copy each expert `key` of `pairs` ((key, slot), in order) into its slot, once the last compute that
        read the slot is done: the one way slots are filled, for demand misses, preloads, prefetches and the fast
        step's misses. Queued together (transfer.copy_in_many: consecutive ones become one copy). Returns the
        tickets, also kept on the cache."""
        cache = self.cache
        try:
            tickets = self.transfer.copy_in_many(
                cache.pool, [(layer, self.layer_pos[layer], expert, slot, cache.last_use[slot])
                             for (layer, expert), slot in pairs], kind=kind)
        except BaseException:
            for key, _ in pairs:            # claimed, maybe never filled: no later call may take them for hits
                if cache.resident(key):
                    cache.evict(key)
            raise
        for (_, slot), ticket in zip(pairs, tickets):
            cache.ticket[slot] = ticket
        return tickets

    def preload(self, keys: list[tuple[int, int]]) -> None:
        """Make `keys` resident in this order (into free slots first), then wait for the copies."""
        pinned = set(keys)
        pairs = [(key, self.cache.claim(key, pinned)) for key in keys if not self.cache.resident(key)]
        tickets = {key: t for (key, _), t in zip(pairs, self.load_slots(pairs))}
        self._wait(-1, tickets)
        if self.cuda:
            torch.cuda.synchronize(self.cache.device)

    def _wait(self, layer: int, tickets: dict, others: dict | None = None) -> None:
        """Wait for the copies of `tickets` ((layer, expert) -> ticket). When a copy failed (a read error on the
        disk tier), every expert of `tickets` and `others` (the rest of the wave) whose copy failed leaves the cache
        before the error goes on, so the engine stays usable and a later request reads it again."""
        try:
            self.transfer.wait(layer, list(tickets.values()))
        except Exception:
            for key, t in {**(others or {}), **tickets}.items():
                fut = getattr(t, "future", None)
                if fut is None:
                    continue
                futures_wait([fut])
                if fut.exception() is not None and self.cache.resident(key):
                    self.cache.evict(key)
            raise

    def _to_device(self, host: np.ndarray, device) -> torch.Tensor:
        """[T, K] int64 host array -> device tensor, asynchronously through a pinned staging buffer."""
        if not self.cuda:
            return torch.from_numpy(host)
        self._stage_i = (self._stage_i + 1) % len(self._staging)
        buf = self._staging[self._stage_i]
        if buf.numel() < host.size:
            size = max(host.size, 1 << 16)
            size = 1 << (size - 1).bit_length()         # grow in powers of two: few pinned allocations ever
            buf = self._staging[self._stage_i] = torch.empty(size, dtype=torch.long).pin_memory()
        view = buf[: host.size].view(host.shape)
        view.numpy()[...] = host
        return view.to(device, non_blocking=True)

    # ---- one MoE layer call: route -> plan -> make resident -> compute -> combine ----------------------------
    def forward(self, module, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor):
        """MoE layer `layer`'s experts (`module`, transformers') over hidden [T, H] with the router's top_k_index
        and top_k_weights [T, K] -> [T, H]."""
        t_start = time.perf_counter()
        dropped = None
        if self.trim is not None:
            top_k_index, top_k_weights, dropped = self.trim.trim(top_k_index, top_k_weights)
        idx, needed = self._route(layer, hidden, top_k_index, top_k_weights)
        if not needed:
            return torch.zeros_like(hidden)
        job, all_needed = None, needed
        if self.cpu is not None:                # cpu/hybrid.py: CPU-placed misses start on the host now
            # dropped pairs name an expert id past the last (E): the host computes no pair for them
            host_idx = idx if dropped is None else np.where(dropped, self.num_experts, idx)
            needed, job = self.cpu.start(self, module, layer, hidden, host_idx, top_k_weights, needed)
        waves = self._plan(layer, needed) if needed else []
        pairs = None
        prefetch = self.prefetcher is not None and len(waves) == 1
        for wave in waves:
            slot_of, tickets = self._make_resident(layer, wave)
            if prefetch and not self._queued_compute:       # behind this layer's own misses on the link
                self.prefetcher.issue(self, layer, {(layer, e) for e in wave})
            pairs = self._compute(module, hidden, idx, top_k_weights, layer, wave, slot_of, tickets, pairs, dropped)
            if prefetch and self._queued_compute:
                # still behind the misses, and after the compute was queued: the predictor's and the claims' host
                # time overlaps that compute instead of leaving the device idle
                self.prefetcher.issue(self, layer, {(layer, e) for e in wave})
        if not self.cache.policy.retain:
            for e in needed:
                if self.cache.resident((layer, e)):
                    self.cache.evict((layer, e))
        if job is not None:
            pairs = self.cpu.finish(job, pairs, top_k_index.numel(), hidden.shape[-1], self.cache.layout.dtype)
            if self.cpu.copies_behind(idx.shape[0]):
                self._copy_behind(layer, job.experts, all_needed)
        out = self._combine(pairs, top_k_index.shape, hidden.dtype)
        if self.timeline is not None:
            if self.cuda:
                torch.cuda.synchronize(self.cache.device)
            self.timeline.add_compute(layer, t_start, time.perf_counter())
        return out

    def _copy_behind(self, layer: int, experts: list[int], needed: list[int]) -> None:
        """The misses the CPU computed in this call (`experts`, of the call's `needed`) claimed and copied into
        slots, not waited for (cpu/hybrid.py): the policy hears of them as of any use, later calls hit them. No
        expert of this call leaves for them (each copy would also wait for the last compute that read its slot:
        `load_slots`). Stops at the first that finds no slot."""
        cache = self.cache
        if not cache.policy.retain:
            return
        pinned = {(layer, e) for e in needed}
        pairs = []
        for e in experts:
            key = (layer, e)
            if cache.resident(key):
                continue
            try:
                pairs.append((key, cache.claim(key, pinned, count_miss=False)))
            except LookupError:
                break
        self.load_slots(pairs)

    def _route(self, layer: int, hidden, top_k_index, top_k_weights) -> tuple[np.ndarray, list[int]]:
        """Observers see the routing; the one host sync per layer brings it to the host: (idx [T, K], the
        distinct experts needed)."""
        for obs in self.observers:
            obs.observe(layer, hidden, top_k_index, top_k_weights)
        self.cache.policy.on_layer(layer)
        idx = top_k_index.cpu().numpy()                         # [T, K]
        self._stage_i = -1                                      # the last layer's staging copies have landed
        return idx, np.unique(idx).tolist()

    def _plan(self, layer: int, needed: list[int]) -> list[list[int]]:
        """Waves of experts that fit the slots together (schedule.plan_waves), residents first."""
        cache = self.cache
        resident = {e for e in needed if cache.resident((layer, e))}
        if self.prefetcher is not None:            # how many copies this call needed without prefetch
            pf_hits = sum(cache.prefetched[cache.slot_of[(layer, e)]] for e in resident)
            self.prefetcher.note(layer, needed, len(needed) - len(resident) + pf_hits, pf_hits)
        return plan_waves(needed, resident, cache.num_slots)

    def _make_resident(self, layer: int, wave: list[int]) -> tuple[dict[int, int], dict[int, object]]:
        """Hits are touched, misses claim a slot (the policy's victim outside the wave) and are copied in:
        (expert -> slot, expert -> ticket of the copy that filled its slot, None when long landed)."""
        cache = self.cache
        pinned = {(layer, e) for e in wave}
        slot_of: dict[int, int] = {}
        misses = []
        for e in wave:
            key = (layer, e)
            if cache.resident(key):
                slot_of[e] = cache.touch(key)
            else:
                slot_of[e] = cache.claim(key, pinned)
                misses.append((key, slot_of[e]))
        self.load_slots(misses)
        return slot_of, {e: cache.ticket[slot] for e, slot in slot_of.items()}

    def _compute(self, module, hidden, idx: np.ndarray, top_k_weights, layer: int, wave: list[int],
                 slot_of: dict[int, int], tickets: dict[int, object], pairs, dropped: np.ndarray | None = None):
        """The wave's pairs as grouped matmuls over the slot pool. Hits first: experts already on the device are
        computed while the others are still arriving, when the wait is longer than one grouped call (splitting
        costs about one call's fixed work; a shorter wait is cheaper to sit out: on a CPU with experts of a few
        hundred KiB it almost always is). `dropped` [T, K]: pairs not computed (the trim's; they stay zero)."""
        ready = [e for e in wave if tickets[e] is None or tickets[e].done()]
        done = set(ready)
        waiting = [e for e in wave if e not in done] if 0 < len(ready) < len(wave) else []
        if waiting and self.transfer.remaining_s([tickets[e] for e in waiting]) < self.SPLIT_MIN * self._call_s:
            waiting = []
        for part in ([ready, waiting] if waiting else [wave]):
            self._wait(layer, {(layer, e): tickets[e] for e in part},
                       others={(layer, e): t for e, t in tickets.items()})
            for lo, hi in windows([slot_of[e] for e in part], self.max_groups):
                inside = sorted(slot_of[e] for e in part if lo <= slot_of[e] < hi)
                gate_up, down, local = window_banks(self.cache.layout, self.cache.pool, inside, lo, hi,
                                                    gather_sparse=not self.cuda)
                lut = np.full(self.num_experts, gate_up.shape[0], dtype=np.int64)  # expert -> group; else G
                for e in part:
                    if slot_of[e] in local:
                        lut[e] = local[slot_of[e]]
                sel = lut[idx]                                          # [T, K]
                if dropped is not None:
                    sel[dropped] = gate_up.shape[0]
                count = int(np.count_nonzero(sel < gate_up.shape[0]))   # pairs in this window
                slot_idx = self._to_device(sel, hidden.device)
                now = self.clock.now if self.clock is not None else time.perf_counter
                t_call = now()
                pairs = experts_on_slots(module, hidden, slot_idx, top_k_weights, gate_up, down, pairs,
                                         count=count)
                if self.clock is not None:
                    self.clock.experts(count, len(inside))
                t_call = now() - t_call         # one grouped call's time (a device profile's: on its clock)
                self._call_s = t_call if self._call_s == 0 else 0.8 * self._call_s + 0.2 * t_call
        if self.cuda:
            used = torch.cuda.Event()
            used.record()
            for slot in slot_of.values():
                self.cache.last_use[slot] = used
        return pairs

    @staticmethod
    def _combine(pairs: torch.Tensor, shape, dtype) -> torch.Tensor:
        """Sum over each token's K pair rows: [T*K, H] -> [T, H]."""
        T, K = shape
        return pairs.view(T, K, -1).sum(dim=1).to(dtype)
