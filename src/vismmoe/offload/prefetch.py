"""Prefetch: turn a predictor's lookahead into copies that overlap the current layer's compute.

Called by the runtime once a layer's own misses were queued (they keep the front of the link), on a GPU also after
its compute was queued (the host's work here then overlaps that compute):

    for depth d = 1..D, target layer l+d:
        probs = predictor.predict(l, d)               # [E]
        candidates: experts not resident with prob >= p_min, most probable first, nearer layers first
    within the in-flight byte allowance (link bandwidth x recent layer time x D: deeper lookahead on faster
    links, nothing queued that the link could not deliver in time):
        cache.claim_prefetch(key, pinned)            # never evicts what this layer or a nearer prefetch needs,
                                                     # nor (policy.admit) what is needed before the key
        runtime.load_slots(...)                      # tickets on the slots; the target layer waits on them if early
    policy.hint(target, probs)                        # the predictive policy keeps what is about to be used

Prefetched experts live in ordinary slots, so bytes in flight are always inside the budget. A wrong guess costs
bytes (counted as wasted when the expert leaves unused) and a slot, never correctness: the target layer
loads whatever it really needs on demand.

Adaptive depth (the default; `fixed_lookahead` turns it off): a cost model per layer call, from EMAs kept apart
for layer calls with a similar token count (decode, and prefills of similar length):
    L  compute time of a layer call (the time between layer calls less the host's waits for link time,
       averaged; where copies are waited for on the device, a slowly rising floor of that time)
    M  copy time of the experts not resident before prefetching (demand misses + prefetch hits)
    H  = min(M, resident share x L)   what hits-first scheduling already hides under the hits' compute
    S  stall of a layer call without prefetch, max(0, M - H), worked out per call and then averaged: misses
       come in bursts (one call waits for a whole expert while most calls miss nothing), and the stall of the
       average call (averaged M and H) would be zero where the average stall is not
    q  precision of this phase's prefetches (used at their target layer / issued for it)
    W  = M (1 - q) / q                link time the wrong guesses add
    P  host time the predictor and the prefetcher themselves take per layer call (router launches, bookkeeping,
       queueing copies; measured on the calls that predict)
Without prefetch a layer call takes about L + S; with it, about max(L, M + W) + P. Prefetch runs
ceil(max(M, C) / L) layers ahead (at most D; C is one expert's copy time, the least a miss waits) when that
saves more than STALL_MIN x L, and not at all otherwise: on a fast link
hits-first already hides the copies (and the predictor's launches would only cost time); on a saturated link
(M >> L) prefetch can hide at most the compute that hits-first left uncovered, L - H, and wrong guesses cost
W of link time, so it pays only when the predictor is precise enough. While prefetch is off in a phase, every
SHADOW_EVERY-th layer call still runs the predictor one layer ahead without copying anything, and the next
layer scores that guess (shadow precision), so q stays measured and a link, cache or model that changes is
noticed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class _TokenBucket:
    """Timing of layer calls with a similar token count (decode steps, or prefills of a similar length)."""
    layer_s: float = 0.0                         # compute time of a layer call (L in the module docstring)
    miss_s: float | None = None                  # EMA of copy seconds per layer call for experts not resident
    resident: float = 0.0                        # EMA of the share of a layer call's experts already resident
    q: float = 0.8                               # EMA of prefetch precision at the target layer (prior: 0.8)
    host_s: float = 0.0                          # EMA of the host time prediction and prefetching take per call
    stall_s: float | None = None                 # EMA of the per-call stall without prefetch (S); None: from M, H


class Prefetcher:
    STALL_MIN = 0.1                              # expected saving below this share of a layer: no prefetch
    SHADOW_EVERY = 8                             # while off: score the predictor on one layer call in this many

    def __init__(self, predictor, depth: int = 3, p_min: float = 0.2, link_gbps: float = 53.0,
                 copy_s: float = 0.0, adaptive: bool = True, waited=None):
        self.predictor = predictor
        self.max_depth = depth
        self.depth = depth                       # depth in force for the layer call in progress
        self.p_min = p_min
        self.link_gbps = link_gbps
        self.copy_s = copy_s                     # one expert over the link
        self.adaptive = adaptive
        self.waited = waited                     # () -> host seconds waited for link time; None: not on host
        self._waited_at = 0.0
        self._phases: dict[int, _TokenBucket] = {}     # per token-count bucket (decode and prefill differ)
        self._phase = None                       # phase of the layer call in progress
        self._last = None
        parts = (predictor, getattr(predictor, "gate", None), getattr(predictor, "trace", None))
        self._depths = [(p, p.depth) for p in parts if p is not None and hasattr(p, "depth")]
        self._issued_for: dict[int, int] = {}    # target layer -> prefetches issued for its next call
        self._shadow_for: dict[int, set] = {}    # target layer -> experts a shadow guess would have copied
        self._shadow = False                     # the layer call in progress makes a shadow guess
        self._calls = 0
        self._host_t = 0.0                       # host time of this call's predictor.observe
        self.now = time.perf_counter             # the clock layer times are read on (a device profile's: its own)

    def lead(self) -> float | None:
        """Layer times the expected copies of one layer call need (None before anything was measured)."""
        ph = self._phase
        if ph is None or ph.miss_s is None or ph.layer_s <= 0:
            return None
        return ph.miss_s / ph.layer_s

    def saving(self) -> float | None:
        """Expected seconds per layer call that prefetching saves (negative: it would cost), from the cost model
        in the module docstring; None before anything was measured."""
        ph = self._phase
        if self.lead() is None:
            return None
        L, M = ph.layer_s, ph.miss_s
        S = ph.stall_s if ph.stall_s is not None else M - min(M, ph.resident * L)
        W = M * (1.0 - ph.q) / max(ph.q, 0.05)
        return L + S - max(L, M + W) - ph.host_s

    def _choose_depth(self) -> int:
        if not self.adaptive:
            return self.max_depth
        gain = self.saving()
        if gain is None:                         # nothing measured in this phase yet: measure first
            return 0
        if gain < self.STALL_MIN * self._phase.layer_s:
            return 0
        return min(self.max_depth, max(1, math.ceil(max(self._phase.miss_s, self.copy_s) / self._phase.layer_s)))

    def choose_depth(self) -> int:
        """The depth for the call in progress from the cost model (the adaptive rule, or the fixed depth); also
        the depth the predictor parts compute ahead."""
        self.depth = self._choose_depth()
        for p, most in self._depths:
            p.depth = min(most, max(self.depth, 1))
        return self.depth

    def time_call(self, phase, compute_s: float) -> None:
        """One call of `phase` (any hashable; the fast decode step uses its own) took `compute_s` seconds of
        compute: folded into that phase's layer time L, which later `note` and `choose_depth` calls read."""
        self._phase = ph = self._phases.setdefault(phase, _TokenBucket())
        ph.layer_s = compute_s if ph.layer_s == 0 else 0.7 * ph.layer_s + 0.3 * compute_s

    def add_host_time(self, seconds: float) -> None:
        """Host seconds the predictor and the prefetching of the call in progress took (P in the cost model)."""
        ph = self._phase
        if ph is not None:
            ph.host_s = seconds if ph.host_s == 0 else 0.7 * ph.host_s + 0.3 * seconds

    def note(self, layer: int, needed: list[int], not_resident: int, pf_hits: int, issued: int | None = None,
             guessed: set | None = None) -> None:
        """A layer call needed the experts `needed`, `not_resident` of them absent before prefetching, `pf_hits`
        of them brought in by prefetches not used before. `issued`/`guessed`: the prefetches issued for this
        call, or the shadow guess made for it, where the caller keeps them (default: those `issue` recorded)."""
        ph = self._phase
        issued = self._issued_for.pop(layer, 0) if issued is None else issued
        guessed = self._shadow_for.pop(layer, None) if guessed is None else guessed
        if ph is None:
            return
        copy = not_resident * self.copy_s
        share = 1.0 - not_resident / max(len(needed), 1)
        stall = max(0.0, copy - share * ph.layer_s)         # this call, had nothing been prefetched
        if ph.miss_s is None:
            ph.miss_s, ph.resident = copy, share
        else:
            ph.miss_s = 0.7 * ph.miss_s + 0.3 * copy
            ph.resident = 0.7 * ph.resident + 0.3 * share
        ph.stall_s = stall if ph.stall_s is None else 0.7 * ph.stall_s + 0.3 * stall
        if issued:
            ph.q = 0.7 * ph.q + 0.3 * min(1.0, pf_hits / issued)
        elif guessed:                            # a shadow guess: the share of it this call really needed
            ph.q = 0.7 * ph.q + 0.3 * len(guessed.intersection(needed)) / len(guessed)

    def observe(self, layer, hidden, top_k_index, top_k_weights) -> None:
        now = self.now()
        waited = self.waited() if self.waited is not None else 0.0
        if self._last is not None and self._phase is not None:
            dt = now - self._last
            if dt < 1.0:                         # ignore gaps between requests
                ph = self._phase
                if self.waited is not None:
                    # waits are on the host: the interval minus them is this call's compute, averaged
                    dt = max(dt - (waited - self._waited_at), 1e-6)
                    ph.layer_s = dt if ph.layer_s == 0 else 0.7 * ph.layer_s + 0.3 * dt
                else:
                    # waits hide in the next sync (GPU, real link): a slowly rising floor, so the copies being
                    # measured do not pass for compute
                    ph.layer_s = dt if ph.layer_s == 0 else min(dt, 1.02 * ph.layer_s)
        self._last, self._waited_at = now, waited
        bucket = min(int(hidden.shape[0]), 1 << 16).bit_length()          # 1 token, 2-3, 4-7, ...
        self._phase = self._phases.setdefault(bucket, _TokenBucket())
        self.choose_depth()
        self._calls += 1
        self._shadow = self.depth == 0 and self._calls % self.SHADOW_EVERY == 0
        if self.depth == 0 and not self._shadow:
            return                               # nothing to predict: no router launches
        t0 = time.perf_counter()
        self.predictor.observe(layer, hidden, top_k_index, top_k_weights)
        self._host_t = time.perf_counter() - t0

    def allowance_bytes(self, expert_bytes: int, top_k: int) -> int:
        """Bytes the link can deliver during `depth` layer times; at least one layer's top-k."""
        layer_s = self._phase.layer_s if self._phase is not None else 0.0
        by_link = self.link_gbps * 1e9 * layer_s * self.depth
        return int(max(by_link, top_k * expert_bytes))

    def issue(self, runtime, layer: int, pinned: set) -> None:
        if self.depth == 0 and not self._shadow:
            return
        t0 = time.perf_counter()
        self._issue(runtime, layer, pinned)
        self.add_host_time(self._host_t + time.perf_counter() - t0)   # predict, claims, queueing copies

    def _issue(self, runtime, layer: int, pinned: set) -> None:
        cache = runtime.cache
        layers = runtime.moe_layers
        p = runtime.layer_pos[layer]
        if self.depth == 0:
            if self._shadow and p + 1 < len(layers):            # what prefetch would copy for the next layer
                probs = self.predictor.predict(layer, 1)
                target = layers[p + 1]
                if probs is not None:
                    self._shadow_for[target] = {e for e in np.nonzero(probs >= self.p_min)[0].tolist()
                                                if not cache.resident((target, e))}
            return
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
        pairs = []
        for _, _, target, e in wanted:
            key = (target, e)
            if cache.resident(key):
                continue
            if spent + cache.layout.nbytes > budget or room <= 0:
                break
            try:
                pairs.append((key, cache.claim_prefetch(key, protect)))
            except LookupError:
                break
            spent += cache.layout.nbytes
            room -= 1
            self._issued_for[target] = self._issued_for.get(target, 0) + 1
        runtime.load_slots(pairs, kind="prefetch")
