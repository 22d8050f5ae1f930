"""The device expert cache: a fixed pool of slots, who lives in which slot, and the counters.

Mechanism only. The pool is ONE tensor `[S, blob]` allocated once from the byte budget, a blob per slot in the
expert format's bytes (formats/); the cache never looks inside a blob. The dense format's pool is also viewed as
fused expert banks `gate_up [S, 2I, H]` and `down [S, H, I]` (`cache.gate_up`, `cache.down`; None for quantized
formats) for code that runs transformers' own experts over the slots. Which expert to evict is the policy's call (`policies.py`); the order of loads within a layer is the
schedule's (`schedule.py`); copies are the transfer engine's (`transfer.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


Key = tuple[int, int]   # (layer, expert)


@dataclass
class LayerCounters:
    hits: int = 0               # uses of a resident expert (prefetch hits included)
    misses: int = 0             # uses that had to load the expert first
    bytes_moved: int = 0        # demand + prefetch copies
    stall_s: float = 0.0
    prefetch_issued: int = 0
    prefetch_hits: int = 0      # first use of an expert that a prefetch brought in
    wasted_bytes: int = 0       # prefetched experts evicted before any use


@dataclass
class CacheCounters:
    per_layer: dict[int, LayerCounters] = field(default_factory=dict)

    def layer(self, layer: int) -> LayerCounters:
        c = self.per_layer.get(layer)
        if c is None:
            c = self.per_layer[layer] = LayerCounters()
        return c

    def total(self) -> LayerCounters:
        t = LayerCounters()
        for c in self.per_layer.values():
            for name, value in vars(c).items():
                setattr(t, name, getattr(t, name) + value)
        return t


class ExpertCache:
    def __init__(self, layout, num_slots: int, device: torch.device, policy,
                 pool: torch.Tensor | None = None):
        """`layout`: the expert format (formats.ExpertFormat). `pool`: memory of another cache to reuse (benchmarks
        that run caches one after another; never two caches over one pool at the same time)."""
        self.layout = layout
        self.num_slots = num_slots
        self.device = device
        self.policy = policy
        if pool is not None:
            assert pool.shape == (num_slots, layout.numel) and pool.dtype == layout.pool_dtype
        self.pool = pool if pool is not None else torch.empty(num_slots, layout.numel, dtype=layout.pool_dtype,
                                                              device=device)
        views = getattr(layout, "views", None)
        self.gate_up, self.down = views(self.pool) if views else (None, None)      # [S, 2I, H], [S, H, I]
        self.slot_of: dict[Key, int] = {}
        self.owner: list[Key | None] = [None] * num_slots
        self.last_use: list[object] = [None] * num_slots        # event of the last compute that read the slot
        self.ticket: list[object] = [None] * num_slots          # transfer ticket of the copy that filled it
        self.prefetched: list[bool] = [False] * num_slots       # filled by a prefetch, not used yet
        self._free = list(range(num_slots - 1, -1, -1))
        self.counters = CacheCounters()
        self.peak_resident = 0
        self.listeners: list = []       # told of every insert and eviction: on_insert(key, slot), on_evict(key, slot)

    @property
    def budget_bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    def touch(self, key: Key, hit: bool = True) -> int:
        """A use of a resident expert: the policy hears of it; returns the slot. `hit=False`: the use did not read
        the slot (its copy had not landed), so it is not counted as a hit."""
        self.policy.on_use(key)
        c = self.counters.layer(key[0])
        c.hits += hit
        slot = self.slot_of[key]
        self._first_use(slot, c)
        return slot

    def _first_use(self, slot: int, c) -> None:
        """A prefetched slot's first use: a prefetch hit (counted in layer counters `c`)."""
        if self.prefetched[slot]:
            self.prefetched[slot] = False
            c.prefetch_hits += 1

    def touch_layer(self, layer: int, experts: list[int]) -> None:
        """A decode step's uses of MoE layer `layer`'s resident `experts` (distinct), of which the step has told
        the policy itself (`EvictionPolicy.on_calls`): each a hit, a prefetched one's first use a prefetch hit."""
        c = self.counters.layer(layer)
        c.hits += len(experts)
        for e in experts:
            self._first_use(self.slot_of[(layer, e)], c)

    def _take(self, key: Key, pinned, prefetch: bool = False) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            victim = self.policy.choose_victim(pinned)
            if prefetch and not self.policy.admit(victim, key):
                raise LookupError("the victim is needed sooner than the prefetched expert")
            slot = self.evict(victim)
            self._unfree(slot)
        self._place(key, slot)
        self.counters.layer(key[0]).bytes_moved += self.layout.nbytes
        return slot

    def _unfree(self, slot: int) -> None:
        """Take free `slot` off the free list, searching from its end: the slots taken out of turn (a landing
        candidate, a victim just evicted) are among the last ones (`victims`), and `list.remove` scans from the
        start: 83 us an adoption on a CPU with 6144 slots mostly free."""
        free = self._free
        for i in range(len(free) - 1, -1, -1):
            if free[i] == slot:
                del free[i]
                return
        raise ValueError(f"slot {slot} is not free")

    def _place(self, key: Key, slot: int) -> None:
        """`key` lives in `slot` (taken off the free ones by the caller) from now on: the books, the policy's
        insertion, the listeners."""
        self.slot_of[key] = slot
        self.owner[slot] = key
        self.policy.on_insert(key)
        self.peak_resident = max(self.peak_resident, len(self.slot_of))
        for listener in self.listeners:
            listener.on_insert(key, slot)

    def claim(self, key: Key, pinned: set[Key], count_miss: bool = True) -> int:
        """A slot for a demand miss `key` (not resident): a free one, else the policy's victim among unpinned
        residents. Counted as a miss (unless the caller counted it); the policy hears of the insertion and of
        the use. LookupError when every resident is pinned."""
        slot = self._take(key, pinned)
        self.policy.on_use(key)
        self.counters.layer(key[0]).misses += count_miss
        return slot

    def claim_prefetch(self, key: Key, pinned: set[Key]) -> int:
        """A slot for a predicted expert (not resident, not used yet). LookupError when no victim may go: none
        unpinned, or the policy judges the victim to be needed before the prefetched expert (`admit`)."""
        slot = self._take(key, pinned, prefetch=True)
        self.prefetched[slot] = True
        self.counters.layer(key[0]).prefetch_issued += 1
        return slot

    def victims(self, n: int, ready) -> list[int]:
        """Up to `n` slots a miss could take next, in order, without taking them: free slots, then the slots of
        the policy's next victims (`next_victims`: as it would choose them one after another) for which
        `ready(slot)` holds."""
        out = list(reversed(self._free[-n:]))
        if len(out) < n:
            out += [self.slot_of[k] for k in self.policy.next_victims(n - len(out),
                                                                      lambda k: not ready(self.slot_of[k]))]
        return out

    def adopt(self, key: Key, slot: int) -> None:
        """Free `slot` already holds expert `key` (not resident; written in place, no copy): `key` lives there
        now. The policy hears of the insertion and the use; the caller counts the miss and its bytes."""
        self._unfree(slot)
        self._place(key, slot)
        self.policy.on_use(key)

    def evict(self, key: Key) -> int:
        slot = self.slot_of.pop(key)
        self.owner[slot] = None
        self.ticket[slot] = None
        if self.prefetched[slot]:
            self.prefetched[slot] = False
            self.counters.layer(key[0]).wasted_bytes += self.layout.nbytes
        self._free.append(slot)
        self.policy.on_evict(key)
        for listener in self.listeners:
            listener.on_evict(key, slot)
        return slot

    def clear(self) -> None:
        for key in list(self.slot_of):
            self.evict(key)
