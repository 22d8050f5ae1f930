"""Eviction policies behind one small protocol.

A policy only keeps bookkeeping about keys `(layer, expert)` and, when asked, names a resident victim that is not
pinned by the step in progress. It never touches memory, slots or copies, and the cache never asks which policy
it is: capabilities are attributes (`retain`).

    on_access(key)         the step used a resident expert (a hit)
    on_insert(key)         an expert was copied into a slot (it is resident from now on)
    on_evict(key)          an expert left its slot
    choose_victim(pinned)  which resident key, not in `pinned`, to evict (cost independent of the cache size
                           for LRU: the cache may hold thousands of experts and evict on every miss)
    retain                 False: keep nothing between layers (load on demand)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from typing import Protocol

from .errors import UserError

Key = tuple[int, int]


class Policy(Protocol):
    retain: bool

    def on_access(self, key: Key) -> None: ...
    def on_insert(self, key: Key) -> None: ...
    def on_evict(self, key: Key) -> None: ...
    def choose_victim(self, pinned: Container[Key]) -> Key: ...


class LRUPolicy:
    """Least recently used first."""

    retain = True

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_access(self, key: Key) -> None:
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


class LFUPolicy:
    """Fewest uses since insertion first; ties go to the least recently used."""

    retain = True

    def __init__(self):
        self._count: dict[Key, int] = {}
        self._clock = 0
        self._last: dict[Key, int] = {}

    def _touch(self, key: Key) -> None:
        self._clock += 1
        self._last[key] = self._clock

    def on_access(self, key: Key) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._touch(key)

    def on_insert(self, key: Key) -> None:
        self._count[key] = 1
        self._touch(key)

    def on_evict(self, key: Key) -> None:
        self._count.pop(key, None)
        self._last.pop(key, None)

    def choose_victim(self, pinned: Container[Key]) -> Key:
        try:
            return min((k for k in self._count if k not in pinned),
                       key=lambda k: (self._count[k], self._last.get(k, 0)))
        except ValueError:
            raise LookupError("no evictable expert") from None


class NoCachePolicy(LRUPolicy):
    """Load on demand, keep nothing: every use is a miss (the `ondemand` baseline)."""

    retain = False


POLICIES: dict[str, type] = {"lru": LRUPolicy, "lfu": LFUPolicy, "none": NoCachePolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise UserError(f"unknown cache policy {name!r}", f"use one of {', '.join(sorted(POLICIES))}") from None
