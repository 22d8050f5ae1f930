"""The physical bound of a request: max(compute with every expert resident, bytes an optimal cache must move
divided by link bandwidth). The optimal cache is Belady's: on a miss, evict the expert whose next use is farthest
in the future, knowing the whole routing trace. Each MoE layer call needs its experts at the same time (they are
pinned for the call); a call needing more experts than the cache holds streams the excess, which the bound
charges as misses too."""

from __future__ import annotations

from ..trace import RoutingTrace

Key = tuple[int, int]


def layer_calls(traces: list[RoutingTrace]) -> list[tuple[int, set[int]]]:
    """[(layer, experts needed)] per (step, MoE layer) call, in execution order over all traces."""
    calls = []
    for tr in traces:
        for step in tr.steps:
            for layer in sorted(step["layers"]):
                calls.append((layer, set(step["layers"][layer][0].reshape(-1).tolist())))
    return calls


def access_groups(trace: RoutingTrace) -> list[set[Key]]:
    """One set per (step, MoE layer) call, in execution order: the experts that call needed."""
    return [{(layer, e) for e in experts} for layer, experts in layer_calls([trace])]


def belady_misses(groups: list[set[Key]], capacity: int) -> int:
    """Fewest expert loads any cache of `capacity` slots needs for this sequence of calls."""
    uses: dict[Key, list[int]] = {}
    for i, g in enumerate(groups):
        for k in g:
            uses.setdefault(k, []).append(i)
    ptr = {k: 0 for k in uses}
    inf = len(groups) + 1

    def next_use(k: Key, after: int) -> int:
        lst, p = uses[k], ptr[k]
        while p < len(lst) and lst[p] <= after:
            p += 1
        ptr[k] = p
        return lst[p] if p < len(lst) else inf

    resident: set[Key] = set()
    misses = 0
    for i, g in enumerate(groups):
        misses += len(g - resident)
        pool = resident | g
        if len(pool) > capacity:
            ranked = sorted(pool, key=lambda k: next_use(k, i))
            pool = set(ranked[:capacity])
        resident = pool
    return misses
