"""Per-layer plan: in which order the experts a layer needs are made resident and computed.

Policy-free. Hits are computed in the first wave together with as many misses as free room allows; when a
layer needs more distinct experts than the cache has slots (a long prefill), the remaining misses stream through
the slots in further waves of at most `capacity` experts each, so a working set larger than the budget still runs.
"""

from __future__ import annotations


def plan_waves(needed: list[int], resident: set[int], capacity: int) -> list[list[int]]:
    """Split `needed` experts into waves of at most `capacity`; resident ones go first."""
    if capacity < 1:
        raise ValueError("capacity must be at least one slot")
    hits = [e for e in needed if e in resident]
    misses = [e for e in needed if e not in resident]
    room = capacity - len(hits)
    waves = [hits + misses[:room]] if hits or room > 0 else []
    rest = misses[max(room, 0):]
    waves += [rest[i:i + capacity] for i in range(0, len(rest), capacity)]
    return [w for w in waves if w]
