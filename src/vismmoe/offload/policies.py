"""Eviction policies behind one small protocol.

A policy only keeps bookkeeping about keys `(layer, expert)` and, when asked, names a resident victim that is not
pinned by the step in progress. It never touches memory, slots or copies, and the cache never asks which policy
it is: capabilities are attributes (`retain`) and optional hooks.

    on_layer(layer)        the runtime is about to run MoE layer `layer` (one "layer call")
    on_calls(calls)        several layer calls at once, [(layer, experts it used), ...] in order: what on_layer and
                           on_use of each would do, in one go (a decode step's books; `predictive` vectorises it)
    on_insert(key)         an expert was copied into a slot: resident from now on (a demand miss or a prefetch)
    on_use(key)            compute used the expert in this layer call (a hit, or a demand miss once loaded)
    on_evict(key)          an expert left its slot
    hint(layer, probs)     a predictor's probabilities [E] that experts of an upcoming `layer` will be used
    admit(victim, key)     may a prefetch of `key` evict `victim`? (policies that estimate next uses say no
                           when the victim is needed first; the others always admit, as published prefetchers do)
    choose_victim(pinned)  which resident key, not in `pinned`, to evict; cost must not grow with the cache size
                           for the common case (a cache can hold thousands of experts and evict on every miss)
    next_victims(n, skip)  the next `n` victims in the order `choose_victim` would name them one eviction after
                           another, leaving out keys `skip(key)` refuses, without changing the policy's state
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

from ..config import split_spec
from ..errors import UserError

Key = tuple[int, int]


class _Base:
    retain = True

    def on_layer(self, layer: int) -> None:
        pass

    def on_calls(self, calls: Sequence[tuple[int, Sequence[int]]]) -> None:
        for layer, experts in calls:
            self.on_layer(layer)
            for e in experts:
                self.on_use((layer, e))

    def hint(self, layer: int, probs) -> None:
        pass

    def on_use(self, key: Key) -> None:
        pass

    def admit(self, victim: Key, key: Key) -> bool:
        return True

    def next_victims(self, n: int, skip) -> list[Key]:
        out: list[Key] = []
        seen: set[Key] = set()
        while len(out) < n:
            try:
                key = self.choose_victim(seen)
            except LookupError:
                break
            seen.add(key)
            if not skip(key):
                out.append(key)
        return out


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

    def next_victims(self, n: int, skip) -> list[Key]:
        return list(itertools.islice((k for k in self._order if not skip(k)), n))     # oldest first

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

    The frequency p comes from one of two memories of the same counts: a long one (every call weighs the same;
    right when requests draw from one stationary mix, as short VQA answers do) and a short one (each layer's counts
    decay by SHORT per call of that layer; right when a long decode settles on its own experts, which the earlier
    requests' counts would outvote). Each layer call scores both by the log-likelihood of the experts it actually
    used, with scores decaying by SCORE_DECAY per call; the better-scoring memory ranks the victims.

    Cost: the expected next use of every resident expert is one vectorised expression over [L, E]; the farthest
    QUEUE of them are ranked at the first eviction of a layer call (again after a hint, and eight times deeper
    when used up), and each eviction then pops the next unpinned one, so a prefill that evicts thousands of
    experts costs a few rankings per layer, not a scan per eviction. A call's uses are counted in one go when it
    ends, and scoring it is a few [2, E] operations.
    """

    QUEUE = 32                                           # victims ranked at first; x8 each time they run out
    SHORT = 0.85
    SCORE_DECAY = 0.95

    def __init__(self, moe_layers: Sequence[int] = (), num_experts: int = 1, admit_all: bool = False,
                 memories: Sequence[float] = (1.0, SHORT), **_):
        self.layers = list(moe_layers)
        self.pos = {l: i for i, l in enumerate(self.layers)}
        self.L = max(1, len(self.layers))
        self.E = max(1, num_experts)
        self.admit_all = admit_all                       # ablation: prefetches displace any victim
        self.cur = -1                                    # position of the layer running (or last run)
        self.decay = np.asarray(memories, dtype=np.float64)             # [M] per-call decay of each memory
        self.calls = np.zeros((len(self.decay), self.L))
        self.uses = np.zeros((len(self.decay), self.L, self.E))
        self.score = np.zeros(len(self.decay))
        self.best = 0                                    # the memory that ranks victims
        self._expect: np.ndarray | None = None          # [M, E] what each memory expected of the running call
        self._used = np.zeros(self.E, dtype=bool)       # experts the running layer call used
        self._pending = np.zeros(self.E, dtype=bool)    # ... and not yet counted
        self._any_pending = False
        self.hints: dict[int, np.ndarray] = {}
        self.res = np.zeros((self.L, self.E), dtype=bool)
        self._all_rows = np.arange(self.L)
        self._next: np.ndarray | None = None            # expected_next_use() until the counts or hints change
        self._queue: list[Key] | None = None            # ranked victims, farthest expected use first
        self._qi = 0
        self._qn = self.QUEUE

    def _freq(self, m, rows) -> np.ndarray:
        return self._prob(self.uses[m, rows], self.calls[m, rows][..., None])

    def _prob(self, uses: np.ndarray, calls: np.ndarray) -> np.ndarray:
        """Smoothed use frequency, kept below 1. Uses booked outside a layer's own call (`on_use` of another layer:
        the fast step claims its misses after the step, whose `on_calls` then counts them again) can outnumber the
        calls; a frequency above 1 made log(1 - p) NaN, the memories' scores NaN, and the ranking memory stuck at
        the first (seen in ERNIE's fast-step decode)."""
        return np.minimum((uses + 0.1) / (calls + 0.1 * self.E), 1.0 - 1e-6)

    def _score_call(self) -> None:
        """Score each memory on the layer call that just ended: log-likelihood of the experts it used."""
        if self._expect is None:
            return
        prob = self._expect                              # in (0, 1): a call adds at most one use per expert
        ll = np.log(np.where(self._used, prob, 1.0 - prob)).sum(axis=1)
        self.score = self.score * self.SCORE_DECAY + ll
        self.best = int(self.score.argmax())
        self._expect = None

    def _count_pending(self) -> None:
        if self._any_pending:
            self.uses[:, self.cur] += self._pending
            self._pending[:] = False
            self._any_pending = False

    def on_layer(self, layer: int) -> None:
        self._score_call()
        self._count_pending()
        self._used[:] = False
        self.cur = self.pos[layer]
        self.uses[:, self.cur] *= self.decay[:, None]
        self.calls[:, self.cur] *= self.decay
        self.calls[:, self.cur] += 1
        if len(self.decay) > 1:                          # one memory alone has nothing to choose between
            self._expect = self._freq(slice(None), self.cur)
        self.hints.pop(self.cur, None)                   # the hint for this layer has been consumed
        self._queue, self._qn, self._next = None, self.QUEUE, None

    def on_calls(self, calls: Sequence[tuple[int, Sequence[int]]]) -> None:
        """`on_layer` and `on_use` of each call in turn, vectorised over the calls (a decode step's layers: distinct
        positions); the same state bit for bit (the same elementwise operations per call, the scores summed in the
        same order: tests/test_policies.py). Calls that repeat a layer run one by one."""
        pos = [self.pos[layer] for layer, _ in calls]
        if len(calls) < 2 or len(set(pos)) != len(pos):
            return super().on_calls(calls)
        self._score_call()
        self._count_pending()
        n, P = len(pos), np.asarray(pos)
        used = np.zeros((n, self.E), dtype=bool)
        for i, (_, experts) in enumerate(calls):
            used[i, list(experts)] = True
        U = self.uses[:, P]                                            # [M, n, E] (a copy)
        U *= self.decay[:, None, None]
        C = self.calls[:, P] * self.decay[:, None] + 1                 # [M, n]
        if len(self.decay) > 1:
            expect = self._prob(U, C[..., None])                        # each call's _freq, as on_layer makes it
            ll = np.log(np.where(used[None, :-1], expect[:, :-1], 1.0 - expect[:, :-1])).sum(axis=-1)
            score = self.score.tolist()
            for m in range(len(score)):                                 # score * SCORE_DECAY + ll, call by call
                for i in range(n - 1):
                    score[m] = score[m] * self.SCORE_DECAY + float(ll[m, i])
            self.score = np.asarray(score)
            self.best = int(self.score.argmax())
            self._expect = expect[:, -1]
        U[:, :-1] += used[None, :-1]                                   # counted when the next call starts
        self.uses[:, P] = U
        self.calls[:, P] = C
        self.cur = pos[-1]
        self._used[:] = used[-1]
        self._pending[:] = used[-1]
        self._any_pending = bool(used[-1].any())
        for p in pos:
            self.hints.pop(p, None)
        self._queue, self._qn, self._next = None, self.QUEUE, None

    def on_insert(self, key: Key) -> None:
        self.res[self.pos[key[0]], key[1]] = True

    def on_use(self, key: Key) -> None:
        self._next = None
        p = self.pos[key[0]]
        if p != self.cur:                                # not the running call's layer (tests, replays)
            self.uses[:, p, key[1]] += 1
            return
        self._pending[key[1]] = self._used[key[1]] = True    # counted in one go when the call ends (or is ranked)
        self._any_pending = True

    def on_evict(self, key: Key) -> None:
        self.res[self.pos[key[0]], key[1]] = False

    def hint(self, layer: int, probs) -> None:
        self.hints[self.pos[layer]] = np.asarray(probs, dtype=np.float64)
        self._queue, self._qn, self._next = None, self.QUEUE, None

    def _expected(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), E] expected layer calls until each expert of these layer positions is next used."""
        self._count_pending()
        prob = self._freq(self.best, rows)
        for i, p in enumerate(rows.tolist()):
            h = self.hints.get(p)
            if h is not None:
                prob[i] = np.maximum(prob[i], h)
        d = (rows - self.cur) % self.L
        d[d == 0] = self.L                               # the running layer comes back after a full cycle
        return d[:, None] + self.L * (1.0 / np.maximum(prob, 1e-6) - 1.0)

    def expected_next_use(self) -> np.ndarray:
        """[L, E] expected layer calls until each expert is next used (kept until a use, a hint or the next layer
        call changes it: a prefetch's admission checks and a ranking read it, not a recomputation each)."""
        if self._next is None:
            self._next = self._expected(self._all_rows)
        return self._next

    def _next_use(self, key: Key) -> float:
        return float(self.expected_next_use()[self.pos[key[0]], key[1]])

    def admit(self, victim: Key, key: Key) -> bool:
        """A prefetch only displaces an expert expected to be needed later than the one it brings in (else the
        swap turns a future hit into a miss: churn that costs link time twice)."""
        return self.admit_all or self._next_use(victim) > self._next_use(key)

    def _rank(self, n: int) -> list[Key]:
        t = np.where(self.res, self.expected_next_use(), -np.inf).ravel()
        n = min(n, int(self.res.sum()))
        if n == 0:
            return []
        top = np.argpartition(-t, n - 1)[:n] if n < t.size else np.arange(t.size)
        top = top[np.argsort(-t[top], kind="stable")]
        top = top[t[top] > -np.inf].tolist()
        return [(self.layers[i // self.E], i % self.E) for i in top]

    def next_victims(self, n: int, skip) -> list[Key]:
        saved = self._queue, self._qi, self._qn          # choose_victim walks (and may rebuild) the ranked queue
        try:
            return super().next_victims(n, skip)
        finally:
            self._queue, self._qi, self._qn = saved

    def choose_victim(self, pinned: Container[Key]) -> Key:
        fresh = False                                    # ranked during this call of choose_victim
        while True:
            if self._queue is None:
                self._queue, self._qi, fresh = self._rank(self._qn), 0, True
            while self._qi < len(self._queue):
                key = self._queue[self._qi]
                self._qi += 1
                if key not in pinned and self.res[self.pos[key[0]], key[1]]:
                    return key
            if fresh and self._qn >= self.res.sum():     # every resident expert was ranked: all pinned
                raise LookupError("no evictable expert")
            self._queue = None                           # used up (or pinned): rank afresh, deeper if it was fresh
            self._qn *= 8 if fresh else 1


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
# the policies a running engine can use: belady needs the future, so only trace replays (bench/simulate.py) take it
ONLINE_POLICIES = tuple(n for n in POLICIES if n != "belady")


def make_policy(spec: str, **context):
    """`spec`: a name, or `name:knob=value[,...]` (ablations: `predictive:admit=0` turns prefetch admission off,
    `predictive:short=0` keeps only the long memory of expert frequencies). `context`: moe_layers, num_experts (and
    future, for belady) -- each policy takes what it needs."""
    name, knobs = split_spec(spec)
    try:
        cls = POLICIES[name]
    except KeyError:
        raise UserError(f"unknown cache policy {name!r}", f"use one of {', '.join(ONLINE_POLICIES)}") from None
    kw = {}
    for key, value, item in knobs:
        if cls is not PredictivePolicy or key not in ("admit", "short") or value not in ("0", "1"):
            raise UserError(f"unknown policy option {item!r} in {spec!r}",
                            "the options are predictive:admit=0|1 and predictive:short=0|1")
        if key == "admit":
            kw["admit_all"] = value == "0"
        elif value == "0":
            kw["memories"] = (1.0,)                     # ablation: the long memory alone
    return cls(**context, **kw)
