"""The physical bound of a request: max(compute with every expert resident, bytes an optimal cache must move
divided by link bandwidth). `phased` tightens it with causality: decode cannot start before the prefill has both
computed and moved the experts it needs, so a request also takes at least max(prefill compute, prefill bytes /
bandwidth) + decode compute. The optimal cache is Belady's: on a miss, evict the expert whose next use is farthest
in the future, knowing the whole routing trace. Each MoE layer call needs its experts at the same time (they are
pinned for the call); a call needing more experts than the cache holds streams the excess, which the bound
charges as misses too."""

from __future__ import annotations

from ..offload.trace import RoutingTrace

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


def prefill_calls(trace: RoutingTrace) -> int:
    """How many of `access_groups(trace)` belong to the prefill (the leading prefill steps)."""
    n = 0
    for step in trace.steps:
        if step["kind"] != "prefill":
            break
        n += len(step["layers"])
    return n


def phased(compute_s: float, prefill_compute_s: float, bytes_: float, prefill_bytes: float, gbps: float) -> float:
    """Lower bound on a request's time: the larger of the plain bound (compute alone, bytes alone) and the causal
    one (the prefill's compute or its own least bytes, whichever is longer, then the decode's compute)."""
    rate = gbps * 1e9
    return max(compute_s, bytes_ / rate,
               max(prefill_compute_s, prefill_bytes / rate) + (compute_s - prefill_compute_s))


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
