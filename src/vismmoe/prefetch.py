"""Prefetch: turn a predictor's lookahead into copies that overlap the current layer's compute.

Called by the runtime right after a layer's own misses were queued (so they keep the front of the link):

    for depth d = 1..D, target layer l+d:
        probs = predictor.predict(l, d)               # [E]
        candidates: experts not resident with prob >= p_min, most probable first, nearer layers first
    within the in-flight byte allowance (link bandwidth x recent layer time x D: deeper lookahead on faster
    links, nothing queued that the link could not deliver in time):
        cache.claim_prefetch(key, pinned)            # never evicts what this layer or a nearer prefetch needs,
                                                     # nor (policy.admit) what is needed before the key
        transfer.copy_in(...)                        # ticket on the slot; the target layer waits on it if early
    policy.hint(target, probs)                        # the predictive policy keeps what is about to be used

Prefetched experts live in ordinary slots, so bytes in flight are always inside the budget. A wrong guess costs
bytes (counted as wasted when the expert leaves unused) and a slot, never correctness: the target layer
loads whatever it really needs on demand.

Adaptive depth (the default; `fixed_lookahead` turns it off): a cost model per layer call, from EMAs kept apart
for layer calls with a similar token count (decode, and prefills of similar length):
    L  compute time of a layer call (a floor of the time between layer calls, host waits for copies excluded)
    M  copy time of the experts not resident before prefetching (demand misses + prefetch hits)
    H  = min(M, resident share x L)   what hits-first scheduling already hides under the hits' compute
    q  precision of this phase's prefetches (used at their target layer / issued for it)
    W  = M (1 - q) / q                link time the wrong guesses add
Without prefetch a layer call takes about L + M - H; with it, about max(L, M + W). Prefetch runs ceil(M / L)
layers ahead (at most D) when that saves more than STALL_MIN x L, and not at all otherwise: on a fast link
hits-first already hides the copies (and the predictor's launches would only cost time); on a saturated link
(M >> L) prefetch can hide at most the compute that hits-first left uncovered, L - H, and wrong guesses cost
W of link time, so it pays only when the predictor is precise enough. While prefetch is off in a phase its q
relaxes toward the prior, so a phase is re-tried now and then and a link or cache that changes is noticed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class _Phase:
    """Timing of layer calls with a similar token count (decode steps, or prefills of a similar length)."""
    layer_s: float = 0.0                         # floor of the wall time between layer calls (compute)
    miss_s: float | None = None                  # EMA of copy seconds per layer call for experts not resident
    resident: float = 0.0                        # EMA of the share of a layer call's experts already resident
    q: float = 0.8                               # EMA of prefetch precision at the target layer (prior: 0.8)


class Prefetcher:
    STALL_MIN = 0.1                              # expected saving below this share of a layer: no prefetch
    PRIOR_Q = 0.8                                # precision assumed before a phase measured its own

    def __init__(self, predictor, depth: int = 3, p_min: float = 0.2, link_gbps: float = 53.0,
                 copy_s: float = 0.0, adaptive: bool = True, waited=None):
        self.predictor = predictor
        self.max_depth = depth
        self.depth = depth                       # depth in force for the layer call in progress
        self.p_min = p_min
        self.link_gbps = link_gbps
        self.copy_s = copy_s                     # one expert over the link
        self.adaptive = adaptive
        self.waited = waited                     # () -> seconds the host has waited for copies so far
        self._waited_at = 0.0
        self._phases: dict[int, _Phase] = {}     # per token-count bucket (decode and prefill differ)
        self._phase = None                       # phase of the layer call in progress
        self._last = None
        parts = (predictor, getattr(predictor, "gate", None), getattr(predictor, "trace", None))
        self._depths = [(p, p.depth) for p in parts if p is not None and hasattr(p, "depth")]
        self._issued_for: dict[int, int] = {}    # target layer -> prefetches issued for its next call

    def lead(self) -> float | None:
        """Layer times the expected copies of one layer call need (None before anything was measured)."""
        ph = self._phase
        if ph is None or ph.miss_s is None or ph.layer_s <= 0:
            return None
        return ph.miss_s / ph.layer_s

    def stall_share(self) -> float | None:
        """Expected wait without prefetch, in layer times: copies minus the hits' compute they overlap."""
        lead = self.lead()
        return None if lead is None else lead - self._phase.resident

    def saving(self) -> float | None:
        """Expected seconds per layer call that prefetching saves (negative: it would cost), from the cost model
        in the module docstring; None before anything was measured."""
        ph = self._phase
        if self.lead() is None:
            return None
        L, M = ph.layer_s, ph.miss_s
        H = min(M, ph.resident * L)
        W = M * (1.0 - ph.q) / max(ph.q, 0.05)
        return M - H if L >= M + W else L - H - W

    def _choose_depth(self) -> int:
        gain = self.saving() if self.adaptive else None
        if gain is None:
            return self.max_depth
        if gain < self.STALL_MIN * self._phase.layer_s:
            return 0
        return min(self.max_depth, max(1, math.ceil(self.lead())))

    def note(self, layer: int, needed: int, not_resident: int, pf_hits: int) -> None:
        """A layer call needed `needed` experts, `not_resident` of them absent before prefetching, `pf_hits` of
        them brought in by prefetches not used before."""
        ph = self._phase
        issued = self._issued_for.pop(layer, 0)
        if ph is None:
            return
        copy = not_resident * self.copy_s
        share = 1.0 - not_resident / max(needed, 1)
        if ph.miss_s is None:
            ph.miss_s, ph.resident = copy, share
        else:
            ph.miss_s = 0.7 * ph.miss_s + 0.3 * copy
            ph.resident = 0.7 * ph.resident + 0.3 * share
        if issued:
            ph.q = 0.7 * ph.q + 0.3 * min(1.0, pf_hits / issued)
        elif self.depth == 0:                   # not measuring: drift back toward the prior (re-try now and then)
            ph.q += 0.01 * (self.PRIOR_Q - ph.q)

    def observe(self, layer, hidden, top_k_index, top_k_weights) -> None:
        now = time.perf_counter()
        waited = self.waited() if self.waited is not None else 0.0
        if self._last is not None and self._phase is not None:
            # the interval minus what the host spent waiting for copies (an emulated link, the CPU, the disk tier;
            # a saturated link would otherwise pass its copy time off as compute)
            dt = now - self._last - (waited - self._waited_at)
            if dt < 1.0:                         # ignore gaps between requests
                # a slowly rising floor: the time of a layer call without waiting for copies (waits only add
                # to it), so the lead does not shrink because the copies being measured made layers longer
                ph = self._phase
                dt = max(dt, 1e-6)
                ph.layer_s = dt if ph.layer_s == 0 else min(dt, 1.02 * ph.layer_s)
        self._last, self._waited_at = now, waited
        bucket = min(int(hidden.shape[0]), 1 << 16).bit_length()          # 1 token, 2-3, 4-7, ...
        self._phase = self._phases.setdefault(bucket, _Phase())
        self.depth = self._choose_depth()
        if self.depth == 0:
            return                               # nothing to predict: no router launches
        for p, most in self._depths:
            p.depth = min(most, self.depth)
        self.predictor.observe(layer, hidden, top_k_index, top_k_weights)

    def allowance_bytes(self, expert_bytes: int, top_k: int) -> int:
        """Bytes the link can deliver during `depth` layer times; at least one layer's top-k."""
        layer_s = self._phase.layer_s if self._phase is not None else 0.0
        by_link = self.link_gbps * 1e9 * layer_s * self.depth
        return int(max(by_link, top_k * expert_bytes))

    def issue(self, runtime, layer: int, pinned: set) -> None:
        if self.depth == 0:
            return
        cache = runtime.cache
        layers = runtime.moe_layers
        p = runtime.layer_pos[layer]
        budget = self.allowance_bytes(cache.layout.nbytes, runtime.top_k)
        # keep room: never prefetch into more than half the slots beyond what this layer pins
        room = max(0, cache.num_slots // 2 - len(pinned))
        wanted: list[tuple[int, float, int, int]] = []      # (depth, -prob, layer, expert)
        for d in range(1, self.depth + 1):
            if p + d >= len(layers):
                break
            probs = self.predictor.predict(layer, d)
            if probs is None:
                continue
            target = layers[p + d]
            cache.policy.hint(target, probs)
            for e in np.nonzero(probs >= self.p_min)[0].tolist():
                wanted.append((d, -float(probs[e]), target, e))
        wanted.sort()
        protect = set(pinned) | {(t, e) for _, _, t, e in wanted}
        spent = 0
        for _, _, target, e in wanted:
            key = (target, e)
            if cache.resident(key):
                continue
            if spent + cache.layout.nbytes > budget or room <= 0:
                break
            try:
                slot = cache.claim_prefetch(key, protect)
            except LookupError:
                break
            cache.ticket[slot] = runtime.transfer.copy_in(target, runtime.layer_pos[target], e, cache.pool[slot],
                                                          after=cache.last_use[slot], kind="prefetch")
            spent += cache.layout.nbytes
            room -= 1
            self._issued_for[target] = self._issued_for.get(target, 0) + 1
