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
"""

from __future__ import annotations

import time

import numpy as np


class Prefetcher:
    def __init__(self, predictor, depth: int = 3, p_min: float = 0.2, link_gbps: float = 53.0):
        self.predictor = predictor
        self.depth = depth
        self.p_min = p_min
        self.link_gbps = link_gbps
        self._layer_s = 0.0                      # EMA of wall time between layer calls
        self._last = None

    def observe(self, layer, hidden, top_k_index, top_k_weights) -> None:
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            if dt < 1.0:                         # ignore gaps between requests
                self._layer_s = dt if self._layer_s == 0 else 0.8 * self._layer_s + 0.2 * dt
        self._last = now
        self.predictor.observe(layer, hidden, top_k_index, top_k_weights)

    def allowance_bytes(self, expert_bytes: int, top_k: int) -> int:
        """Bytes the link can deliver during `depth` layer times; at least one layer's top-k."""
        by_link = self.link_gbps * 1e9 * self._layer_s * self.depth
        return int(max(by_link, top_k * expert_bytes))

    def issue(self, runtime, layer: int, pinned: set) -> None:
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
