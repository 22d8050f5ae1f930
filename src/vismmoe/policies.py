"""Eviction policies behind one small protocol.

A policy only keeps bookkeeping about keys `(layer, expert)` and, when asked, names a resident victim that is not
pinned by the step in progress. It never touches memory, slots or copies, and the cache never asks which policy
it is: capabilities are attributes (`retain`) and optional hooks.

    on_layer(layer)        the runtime is about to run MoE layer `layer` (one "layer call")
    on_insert(key)         an expert was copied into a slot: resident from now on (a demand miss or a prefetch)
    on_use(key)            compute used the expert in this layer call (a hit, or a demand miss once loaded)
    on_evict(key)          an expert left its slot
    hint(layer, probs)     a predictor's probabilities [E] that experts of an upcoming `layer` will be used
    choose_victim(pinned)  which resident key, not in `pinned`, to evict; cost must not grow with the cache size
                           for the common case (a cache can hold thousands of experts and evict on every miss)
    retain                 False: keep nothing between layers (load on demand)

Policies: `lru`, `lfu`, `lfru` (frequency with exponential recency decay, CRF-style), `predictive` (evicts the
expert whose expected next use is farthest away, knowing that MoE layers are visited in a fixed cycle), `none`
(load on demand), and `belady` (offline oracle over a recorded trace: an upper bound, never a real policy).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Container, Sequence

import numpy as np

from .errors import UserError

Key = tuple[int, int]


class _Base:
    retain = True

    def on_layer(self, layer: int) -> None:
        pass

    def hint(self, layer: int, probs) -> None:
        pass

    def on_use(self, key: Key) -> None:
        pass


class LRUPolicy(_Base):
    """Least recently used first."""

    def __init__(self, **_):
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_use(self, key: Key) -> None:
        self._order.move_to_end(key)

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def choose_victim(self, pinned: Container[Key]) -> Key:
        for key in self._order:          # oldest first; skips at most len(pinned) keys
            if key not in pinned:
                return key
        raise LookupError("no evictable expert")


class _HeapPolicy(_Base):
    """Evicts the smallest `_rank(key)`; ranks change only on the key's own events (lazy-deletion heap)."""

    def __init__(self, **_):
        self._rank: dict[Key, tuple] = {}
        self._heap: list = []
        self._tie = itertools.count()

    def _set(self, key: Key, rank: tuple) -> None:
        self._rank[key] = rank
        heapq.heappush(self._heap, (rank, next(self._tie), key))

    def on_evict(self, key: Key) -> None:
        self._rank.pop(key, None)

    def choose_victim(self, pinned: Container[Key]) -> Key:
        skipped, victim = [], None
        while self._heap:
            entry = heapq.heappop(self._heap)
            rank, _, key = entry
            if self._rank.get(key) != rank:
                continue                                  # stale entry
            if key in pinned:
                skipped.append(entry)
                continue
            victim = key
            skipped.append(entry)                         # stays valid until on_evict
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        if victim is None:
            raise LookupError("no evictable expert")
        return victim


class LFUPolicy(_HeapPolicy):
    """Fewest uses since insertion first; ties go to the least recently used."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._count: dict[Key, int] = {}
        self._clock = itertools.count()

    def on_insert(self, key: Key) -> None:       # counts as one use: a prefetched expert is not evicted first
        self._count[key] = 1
        self._set(key, (1, next(self._clock)))

    def on_use(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._set(key, (self._count[key], next(self._clock)))

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self._count.pop(key, None)


class LFRUPolicy(_HeapPolicy):
    """Frequency with recency decay (CRF): value = sum over uses of 2^(-age / half_life), age in layer calls.

    Values of idle keys decay at the same rate, so their order never changes with time: the rank
    log2(value) + t_last / half_life is time-independent and a heap suffices.
    """

    def __init__(self, moe_layers: Sequence[int] = (), half_life_tokens: float = 2.0, **kw):
        super().__init__(**kw)
        self.half_life = max(1.0, half_life_tokens * max(1, len(moe_layers)))
        self._t = 0
        self._val: dict[Key, tuple[float, int]] = {}     # key -> (value at t_last, t_last)

    def on_layer(self, layer: int) -> None:
        self._t += 1

    def _value_now(self, key: Key) -> float:
        v, t = self._val.get(key, (0.0, self._t))
        return v * 2.0 ** (-(self._t - t) / self.half_life)

    def _push(self, key: Key, v: float) -> None:
        self._val[key] = (v, self._t)
        self._set(key, (math.log2(v) + self._t / self.half_life, ))

    def on_insert(self, key: Key) -> None:       # counts as one use: a prefetched expert is not evicted first
        self._push(key, self._value_now(key) + 1.0)

    def on_use(self, key: Key) -> None:
        self._push(key, self._value_now(key) + 1.0)

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self._val.pop(key, None)


class PredictivePolicy(_Base):
    """Evict the expert whose expected next use lies farthest in the future.

    MoE layers run in a fixed cycle, so an expert of layer l' is next needed at the next visit of l' (cyclic
    distance d from the layer running now, in layer calls) if it is chosen there, which happens with probability
    p: its use frequency at l' (smoothed), raised to a predictor's hint for layers inside the lookahead window.
    Expected next use: d + L * (1 / p - 1). LRU is the worst choice for such a loop when the cache holds less
    than one cycle; this policy keeps the experts that the coming layers will use.
    """

    def __init__(self, moe_layers: Sequence[int] = (), num_experts: int = 1, **_):
        self.layers = list(moe_layers)
        self.pos = {l: i for i, l in enumerate(self.layers)}
        self.L = max(1, len(self.layers))
        self.E = max(1, num_experts)
        self.cur = -1                                    # position of the layer running (or last run)
        self.calls = np.zeros(self.L)
        self.uses = np.zeros((self.L, self.E))
        self.hints: dict[int, np.ndarray] = {}
        self.resident: dict[int, set[int]] = {}

    def on_layer(self, layer: int) -> None:
        self.cur = self.pos[layer]
        self.calls[self.cur] += 1
        self.hints.pop(self.cur, None)                   # the hint for this layer has been consumed

    def on_insert(self, key: Key) -> None:
        self.resident.setdefault(self.pos[key[0]], set()).add(key[1])

    def on_use(self, key: Key) -> None:
        self.uses[self.pos[key[0]], key[1]] += 1

    def on_evict(self, key: Key) -> None:
        self.resident.get(self.pos[key[0]], set()).discard(key[1])

    def hint(self, layer: int, probs) -> None:
        self.hints[self.pos[layer]] = np.asarray(probs, dtype=np.float64)

    def _prob(self, p: int) -> np.ndarray:
        prob = (self.uses[p] + 0.1) / (self.calls[p] + 0.1 * self.E)
        h = self.hints.get(p)
        return np.maximum(prob, h) if h is not None else prob

    def choose_victim(self, pinned: Container[Key]) -> Key:
        best, best_t = None, -1.0
        for p, experts in self.resident.items():
            if not experts:
                continue
            d = (p - self.cur) % self.L or self.L         # the running layer comes back after a full cycle
            prob = self._prob(p)
            layer = self.layers[p]
            for e in sorted(experts, key=lambda e: prob[e]):   # least likely first
                if (layer, e) in pinned:
                    continue
                t = d + self.L * (1.0 / max(prob[e], 1e-6) - 1.0)
                if t > best_t:
                    best, best_t = (layer, e), t
                break
        if best is None:
            raise LookupError("no evictable expert")
        return best


class NoCachePolicy(LRUPolicy):
    """Load on demand, keep nothing: every use is a miss (the `ondemand` baseline)."""

    retain = False


class BeladyPolicy(_Base):
    """Offline optimum over a known future: evict the resident expert whose next use is farthest away.

    Needs `future`: the sequence of layer calls of the run being replayed, each a set of keys (bench/bound.py
    builds it from a routing trace of the identical request). Only for bounds and tables.
    """

    def __init__(self, future: Sequence[set[Key]] | None = None, **_):
        if future is None:
            raise UserError("the belady policy needs a recorded trace to replay", "use lru, lfu, lfru or predictive")
        self.uses: dict[Key, list[int]] = {}
        for i, g in enumerate(future):
            for k in g:
                self.uses.setdefault(k, []).append(i)
        self.t = -1
        self.resident: set[Key] = set()

    def on_layer(self, layer: int) -> None:
        self.t += 1

    def on_insert(self, key: Key) -> None:
        self.resident.add(key)

    def on_evict(self, key: Key) -> None:
        self.resident.discard(key)

    def _next(self, key: Key) -> int:
        lst = self.uses.get(key, [])
        i = np.searchsorted(lst, self.t, side="right")
        return lst[i] if i < len(lst) else 1 << 60

    def choose_victim(self, pinned: Container[Key]) -> Key:
        cands = [k for k in self.resident if k not in pinned]
        if not cands:
            raise LookupError("no evictable expert")
        return max(cands, key=self._next)


POLICIES: dict[str, type] = {"lru": LRUPolicy, "lfu": LFUPolicy, "lfru": LFRUPolicy, "predictive": PredictivePolicy,
                             "none": NoCachePolicy, "belady": BeladyPolicy}


def make_policy(name: str, **context):
    """`context`: moe_layers, num_experts (and future, for belady) -- each policy takes what it needs."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UserError(f"unknown cache policy {name!r}", f"use one of {', '.join(sorted(POLICIES))}") from None
    return cls(**context)
