"""Eviction policies, the wave planner, and the cache mechanism on tiny inputs."""

from __future__ import annotations

import pytest
import torch

from vismmoe.offload.cache import ExpertCache
from vismmoe.errors import UserError
from vismmoe.offload.policies import (
    BeladyPolicy,
    LFRUPolicy,
    LFUPolicy,
    LRUPolicy,
    NoCachePolicy,
    PredictivePolicy,
    make_policy,
)
from vismmoe.offload.schedule import plan_waves
from vismmoe.formats import DenseFormat


def test_lru_evicts_least_recent():
    p = LRUPolicy()
    for k in [(0, 1), (0, 2), (0, 3)]:
        p.on_insert(k)
    p.on_use((0, 1))
    assert p.choose_victim(set()) == (0, 2)
    assert p.choose_victim({(0, 2)}) == (0, 3)
    p.on_evict((0, 2))
    assert p.choose_victim(set()) == (0, 3)
    with pytest.raises(LookupError):
        p.choose_victim({(0, 1), (0, 3)})


def test_lfu_evicts_least_frequent_then_oldest():
    p = LFUPolicy()
    for k in [(0, 1), (0, 2), (0, 3)]:
        p.on_insert(k)
    p.on_use((0, 1))
    p.on_use((0, 3))
    assert p.choose_victim(set()) == (0, 2)
    p.on_use((0, 2))
    # all used twice now; (0, 1) was touched longest ago
    assert p.choose_victim(set()) == (0, 1)
    assert p.choose_victim({(0, 1)}) == (0, 3)


def test_unknown_policy_is_a_user_error():
    with pytest.raises(UserError, match="lru, lfu, lfru, predictive, none$"):
        make_policy("fifo")
    with pytest.raises(UserError, match="recorded trace"):
        make_policy("belady")


def test_plan_waves_hits_first_and_capacity():
    assert plan_waves([1, 2, 3], {2}, 3) == [[2, 1, 3]]
    assert plan_waves([1, 2, 3, 4, 5], {5}, 2) == [[5, 1], [2, 3], [4]]
    assert plan_waves([1, 2], {1, 2}, 2) == [[1, 2]]
    assert plan_waves([4, 5, 6], set(), 1) == [[4], [5], [6]]
    for needed, res, cap in [([1, 2, 3, 4, 5, 6, 7], {3, 6}, 3), (list(range(20)), set(range(0, 20, 3)), 7)]:
        waves = plan_waves(needed, res, cap)
        assert sorted(e for w in waves for e in w) == sorted(needed)
        assert all(len(w) <= cap for w in waves)
        assert set(waves[0]) >= res & set(needed)


def _cache(slots, policy):
    return ExpertCache(DenseFormat(8, 4, torch.float32), slots, torch.device("cpu"), policy)


def test_cache_claims_free_slots_then_evicts_unpinned():
    c = _cache(2, LRUPolicy())
    s1 = c.claim((0, 1), pinned={(0, 1)})
    s2 = c.claim((0, 2), pinned={(0, 2)})
    assert {s1, s2} == {0, 1}
    c.touch((0, 1))
    s3 = c.claim((1, 7), pinned={(1, 7), (0, 2)})     # (0, 2) is pinned, so (0, 1) must go despite recency
    assert s3 == s1 and not c.resident((0, 1)) and c.resident((0, 2))
    with pytest.raises(LookupError):
        c.claim((1, 8), pinned={(1, 7), (0, 2), (1, 8)})
    t = c.counters.total()
    assert (t.hits, t.misses) == (1, 3)
    assert t.bytes_moved == 3 * c.layout.nbytes
    assert c.peak_resident == 2 and len(c.slot_of) <= c.num_slots


def test_none_policy_keeps_nothing():
    assert NoCachePolicy.retain is False and LRUPolicy.retain is True


def test_lfru_prefers_recent_frequency():
    p = LFRUPolicy(moe_layers=[0], half_life_tokens=1.0)      # half-life: one layer call
    p.on_insert((0, 1))
    for _ in range(3):
        p.on_use((0, 1))                  # used often, long ago
    for _ in range(6):
        p.on_layer(0)
    p.on_insert((0, 2))                   # used once, just now
    p.on_use((0, 2))
    assert p.choose_victim(set()) == (0, 1)
    p.on_use((0, 1))
    p.on_use((0, 1))
    assert p.choose_victim(set()) == (0, 2)


def test_predictive_evicts_farthest_next_use():
    p = PredictivePolicy(moe_layers=[0, 1, 2, 3], num_experts=4)
    for layer in (0, 1, 2, 3):            # one pass: layer l used expert l
        p.on_layer(layer)
        p.on_insert((layer, layer))
        p.on_use((layer, layer))
    p.on_layer(0)
    # now at layer 0: layer 1 comes next, layer 0's own experts only after a full cycle
    assert p.choose_victim({(0, 0)}) == (3, 3)
    assert p.choose_victim({(0, 0), (3, 3)}) == (2, 2)
    # a hint that layer 2's expert is certain next time protects it even though layer 2 is far
    p.hint(2, [0, 0, 1.0, 0])
    for _ in range(5):                    # make layer 1's expert look rare
        p.on_layer(1)
    p.on_layer(0)
    assert p.choose_victim({(0, 0), (3, 3)}) == (1, 1)


def _two_phase_stream(p, old: int, new: int, calls_old: int, calls_new: int) -> None:
    """Layer 0 uses expert `old` for many calls, then expert `new` (one layer, so no cycle distance)."""
    for e, n in ((old, calls_old), (new, calls_new)):
        for _ in range(n):
            p.on_layer(0)
            p.on_use((0, e))


def test_predictive_short_memory_follows_a_shift_of_experts():
    """A long decode settles on new experts: the short memory, which scores better on the recent calls, takes
    over and protects them, where the long memory alone still keeps the expert of the earlier requests."""
    for spec, victim in (("predictive", (0, 1)), ("predictive:short=0", (0, 2))):
        p = make_policy(spec, moe_layers=[0], num_experts=4)
        _two_phase_stream(p, old=1, new=2, calls_old=60, calls_new=12)
        for k in ((0, 1), (0, 2)):
            p.on_insert(k)
        p.on_layer(0)
        assert p.choose_victim(set()) == victim, spec


def test_predictive_keeps_the_long_memory_on_a_stationary_mix():
    """Requests drawing from one mix (expert 1 in 3 calls of 4, expert 2 in 1 of 4): the long memory predicts it
    better, so a recent run of expert 2 does not make the policy drop expert 1."""
    p = PredictivePolicy(moe_layers=[0], num_experts=4)
    for i in range(200 + 3):                              # ... ending with a run of three calls of expert 2
        p.on_layer(0)
        p.on_use((0, 1 if i % 4 and i < 200 else 2))
    p.expected_next_use()                                 # counts the running call's uses
    assert p._freq(1, 0)[2] > p._freq(1, 0)[1]           # the short memory alone would now favour expert 2
    assert p.best == 0                                    # but the long memory scored better
    for k in ((0, 1), (0, 2)):
        p.on_insert(k)
    p.on_layer(0)
    assert p.choose_victim(set()) == (0, 2)


def test_belady_evicts_the_farthest_future_use():
    future = [{(0, 1), (0, 2)}, {(0, 3)}, {(0, 1)}, {(0, 2)}]
    p = BeladyPolicy(future=future)
    for k in [(0, 1), (0, 2)]:
        p.on_insert(k)
    p.on_layer(0)
    p.on_layer(0)                         # at call 1, needing (0, 3): (0, 2) is used later than (0, 1)
    assert p.choose_victim({(0, 3)}) == (0, 2)


def test_predictive_admits_a_prefetch_only_over_a_later_needed_victim():
    """Prefetch admission: a prefetch may displace an expert expected to be needed after the one it brings in,
    never one needed sooner (that swap only churns); LRU, as published prefetchers, always admits."""
    p = PredictivePolicy(moe_layers=[0, 1, 2, 3], num_experts=4)
    for _ in range(3):                    # layer l always uses expert l
        for layer in (0, 1, 2, 3):
            p.on_layer(layer)
            p.on_use((layer, layer))
    for layer in (0, 1, 2, 3):
        p.on_insert((layer, layer))
    p.on_layer(0)
    p.hint(3, [0.0, 0.0, 0.0, 0.05])      # (3, 3) is unlikely next time round... but frequent: no hint lowers it
    p.hint(2, [0.0, 0.9, 0.0, 0.0])       # a likely new expert two layers ahead
    assert p.admit((3, 3), (2, 1))        # layer 3 is visited after layer 2: its expert may make room
    assert not p.admit((1, 1), (2, 1))    # layer 1's sure expert is needed first: refused
    assert LRUPolicy().admit((1, 1), (2, 1))
    cache = ExpertCache(DenseFormat(4, 2, torch.float32), 1, torch.device("cpu"), p)
    p.res[:] = False
    cache.claim((1, 1), set())
    with pytest.raises(LookupError):
        cache.claim_prefetch((2, 1), set())
    assert cache.resident((1, 1)) and not cache.resident((2, 1))


def test_predictive_admission_follows_every_change_of_uses_hints_and_layer():
    """Admission reads a kept [L, E] of expected next uses; every use, hint and layer call must renew it, so its
    answers equal a fresh computation's after each kind of change (a stale matrix would admit by old counts)."""
    import numpy as np
    rng = np.random.default_rng(1)
    L, E = 6, 8
    p = PredictivePolicy(moe_layers=list(range(L)), num_experts=E)

    def fresh(key):                     # the expected next use of one expert, computed from scratch
        return float(p._expected(np.array([key[0]]))[0, key[1]])

    for step in range(400):
        kind = rng.integers(4)
        if kind == 0:
            p.on_layer(int(rng.integers(L)))
        elif kind == 1:
            p.on_use((int(rng.integers(L)), int(rng.integers(E))))
        elif kind == 2:
            p.hint(int(rng.integers(L)), rng.random(E) * (rng.random(E) < 0.5))
        else:
            p.on_calls([(layer, rng.choice(E, 2, replace=False).tolist()) for layer in rng.choice(L, 3, replace=False)])
        for _ in range(3):
            a, b = (int(rng.integers(L)), int(rng.integers(E))), (int(rng.integers(L)), int(rng.integers(E)))
            assert p.admit(a, b) == (fresh(a) > fresh(b)), step
        kept = p.expected_next_use().copy()
        assert np.array_equal(kept, p._expected(np.arange(L))), step


def test_predictive_scores_stay_finite_when_uses_outnumber_calls():
    """The fast step books its misses (`on_use` of other layers) before the step's `on_calls` counts them again:
    a frequency above 1 made the memories' scores NaN (and argmax then keeps the first memory for good)."""
    import numpy as np
    p = PredictivePolicy(moe_layers=[0, 1, 2], num_experts=4)
    for _ in range(20):
        p.on_layer(2)
        for _ in range(3):
            p.on_use((1, 0))                  # another layer's expert, booked outside its call
        p.on_calls([(0, [0]), (1, [0]), (2, [1])])
    assert np.all(np.isfinite(p.score)) and np.all(np.isfinite(p.expected_next_use()))
    assert (p.expected_next_use() >= 0).all()


@pytest.mark.parametrize("name", ["lru", "lfu", "lfru", "predictive"])
def test_next_victims_are_the_victims_in_order_and_change_nothing(name):
    """`next_victims(n, skip)` (the fast step's landing candidates) names the victims `choose_victim` would name
    one eviction after another, leaving out those `skip` refuses, and leaves the policy as it was: the same
    victims follow, and evicting them one by one meets them in that order."""
    import random
    rng = random.Random(0)
    kw = dict(moe_layers=[0, 1, 2, 3], num_experts=8) if name == "predictive" else {}
    p = make_policy(name, **kw)
    keys = [(layer, e) for layer in range(4) for e in range(8)]
    for layer in range(4):
        p.on_layer(layer)
        for e in range(8):
            p.on_insert((layer, e))
    for _ in range(80):
        k = rng.choice(keys)
        p.on_layer(k[0])
        p.on_use(k)
    skip = lambda k: k[1] == 3                                           # noqa: E731
    first = p.next_victims(6, skip)
    assert len(first) == 6 and not any(skip(k) for k in first)
    assert p.next_victims(6, skip) == first                             # nothing changed
    got = []
    while len(got) < 6:
        v = p.choose_victim({k for k in keys if skip(k)})
        p.on_evict(v)
        got.append(v)
    assert got == first


@pytest.mark.parametrize("spec", ["lru", "lfu", "lfru", "none", "predictive", "predictive:short=0"])
def test_on_calls_leaves_the_state_on_layer_and_on_use_leave(spec):
    """A decode step tells the policy its layer calls in one go (`on_calls`); the state is that of on_layer and
    on_use call by call, bit for bit (predictive vectorises it; its whole state is compared, the other policies'
    victims), so the victims named after it are the same. Hints, insertions, evictions and late uses between steps
    (so a batch may start with the last call's uses not yet counted), steps that skip layers, a call that repeats a
    layer, empty calls."""
    import numpy as np
    layers = [1, 3, 5, 7, 9]
    one, batch = (make_policy(spec, moe_layers=layers, num_experts=12) for _ in range(2))
    rng = np.random.default_rng(0)
    resident: set = set()
    for step in range(150):
        key = (layers[rng.integers(0, 5)], int(rng.integers(0, 12)))
        if key not in resident:
            resident.add(key)
            for p in (one, batch):
                p.on_insert(key)
        if len(resident) > 20:
            victims = [p.choose_victim(set()) for p in (one, batch)]
            assert victims[0] == victims[1], step
            resident.discard(victims[0])
            for p in (one, batch):
                p.on_evict(victims[0])
        if step % 5 == 0:                                                 # a predictor's hint between steps
            probs = rng.random(12)
            for p in (one, batch):
                p.hint(layers[step % 5], probs.copy())
        chosen = layers if step % 7 else layers[:2] + layers[3:]          # now and then a layer skipped
        if step % 31 == 5:
            chosen = chosen + [chosen[0]]                                 # a layer called twice: one by one
        calls = []
        for l in chosen:                                                  # uses of resident experts only
            mine = sorted(e for (k, e) in resident if k == l)
            calls.append((l, [e for e in mine if rng.random() < 0.5]))
        for layer, es in calls:
            one.on_layer(layer)
            for e in es:
                one.on_use((layer, e))
        batch.on_calls(calls)
        if step % 3 == 1:                   # a use of the running call between steps (a miss landed late)
            late = [(calls[-1][0], e) for e in sorted(e for (k, e) in resident if k == calls[-1][0])][:1]
            for p in (one, batch):
                for key in late:
                    p.on_use(key)
        if resident and spec != "none" and step % 4 == 3:      # (ranking counts the pending uses: not every step)
            assert one.next_victims(6, lambda k: False) == batch.next_victims(6, lambda k: False), step
    if isinstance(one, PredictivePolicy):
        for name in ("uses", "calls", "score", "_used", "_pending", "res"):
            assert np.array_equal(getattr(one, name), getattr(batch, name)), name
        assert (one.best, one.cur, one._any_pending) == (batch.best, batch.cur, batch._any_pending)
        assert (one._expect is None) == (batch._expect is None)
        assert one._expect is None or np.array_equal(one._expect, batch._expect)
        assert np.array_equal(one.expected_next_use(), batch.expected_next_use())


def test_adopting_a_free_slot_takes_it_off_the_free_list():
    """`ExpertCache.adopt` (landing: a miss written in place into a free slot): that slot, wherever it is on the free
    list, leaves it and no other does, so the free slots handed out next keep their order; a slot that is not
    free is refused."""
    cache = _cache(8, LRUPolicy())
    taken = [cache.claim((0, e), set()) for e in range(2)]             # the free list's last two
    free = list(cache._free)
    for slot in (free[-1], free[0], free[len(free) // 2]):            # its end (the usual case), start, middle
        cache.adopt((1, slot), slot)
        free.remove(slot)
        assert cache._free == free and cache.slot_of[(1, slot)] == slot
    with pytest.raises(ValueError):
        cache.adopt((2, 0), taken[0])
    assert [cache.claim((3, e), set()) for e in range(len(free))] == list(reversed(free))
