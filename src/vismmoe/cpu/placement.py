"""Placement: which of a layer call's missing experts the CPU computes and which are fetched to the device.

A cost model over measured rates (rates.py), not a rule:

    fetch(e)   = one expert's bytes over the link (plus the link's queue ahead of this layer's copies)
    cpu(e, t)  = the executor's measured seconds for one expert at t tokens (t = pairs routed to e this call),
                 plus one hand-off to the worker thread when the CPU gets anything

Device and CPU work at the same time (hits stay on the device and run meanwhile), so the layer waits for the later
of the two: the misses are placed to make `max(link finish, CPU finish)` smallest. Greedy list scheduling: every
miss starts on the link; misses move to the CPU cheapest first while a move shortens that maximum. Where the CPU
and the "device" are the same cores (a CPU-only run) nothing overlaps: a fetch costs its copy plus the compute
that follows it on the same cores, and a miss moves when the CPU alone is cheaper (it always is there: the copy is
the whole difference).

Decode (one token per expert) mostly lands on the CPU, prefill (tens or hundreds of tokens per expert) mostly on
the link, as the rates say for this machine and shape. What it ignores: that a fetched expert stays resident and
may hit later (a CPU-computed one does not enter the cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Placement:
    """`fetch_s`: seconds one expert takes over the link; `cpu_s(t)`: seconds the CPU takes for one expert at t
    tokens; `handoff_s`: fixed cost of using the CPU side in a layer call; `shared`: CPU side and device are the
    same cores (device compute of a fetched expert then costs `cpu_s` too)."""

    fetch_s: float
    cpu_s: Callable[[int], float]
    handoff_s: float = 0.0
    shared: bool = False

    def choose(self, misses: list[int], tokens, backlog_s: float = 0.0) -> list[int]:
        """The misses (expert ids) the CPU computes; `tokens[e]`: pairs routed to expert e this call; `backlog_s`:
        seconds of copies already queued on the link ahead of these."""
        cost = {e: self.cpu_s(int(tokens[e])) for e in misses}
        order = sorted(misses, key=lambda e: (cost[e], e))
        cpu: list[int] = []
        if self.shared:
            for e in order:
                extra = 0.0 if cpu else self.handoff_s
                if cost[e] + extra < self.fetch_s + cost[e]:
                    cpu.append(e)
            return cpu
        link_t = backlog_s + self.fetch_s * len(misses)
        cpu_t = 0.0
        for e in order:
            new_cpu = cpu_t + cost[e] + (0.0 if cpu else self.handoff_s)
            new_link = link_t - self.fetch_s
            if max(new_cpu, new_link) < max(cpu_t, link_t):
                cpu.append(e)
                cpu_t, link_t = new_cpu, new_link
        return cpu
