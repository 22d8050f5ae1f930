"""A device profile's memory capacity as a limit on the run: non-expert weights, the KV/activation reserve and the
expert budget must fit it together (engine/budget.py resolve_budget asks here)."""

from __future__ import annotations

import torch

from ..config import format_size, parse_size
from ..errors import UserError
from . import get_profile


def cap_budget(rc, budget: int, all_bytes: int, layout, geo, nonexpert: int, config, dev) -> int:
    """The expert budget on `rc.device_profile`: `budget` when it fits the profile's memory next to the non-expert
    weights and the reserve (the KV cache for `rc.max_seq` and activations, or --reserve), the room left when no
    budget was asked for (every expert by default) and it does not; UserError when an asked-for budget or
    --device-memory exceeds the profile, or when not even one layer's top-k fits (bytes)."""
    from ..engine.budget import estimate_reserve
    prof = get_profile(rc.device_profile)
    cap = int(prof.mem_bytes)
    target = torch.device("cuda") if prof.async_launch else dev     # the reserve's library margin: the device's
    res = parse_size(rc.reserve, what="reserve") if rc.reserve else \
        estimate_reserve(config, geo, rc.max_seq, layout.dtype, target)
    room = cap - nonexpert - res
    least = geo.top_k * layout.nbytes
    where = (f"device profile {prof.name} has {format_size(cap)}: non-expert weights {format_size(nonexpert)} + "
             f"KV/activation reserve {format_size(res)} (max_seq {rc.max_seq})")
    if room < least:
        raise UserError(f"the model does not fit: {where} + {geo.top_k} experts of {format_size(layout.nbytes)}",
                        "choose a device profile with more memory, a smaller --expert-format, or a smaller reserve")
    if rc.device_memory is not None and parse_size(rc.device_memory, what="device memory") > cap:
        raise UserError(f"--device-memory {rc.device_memory} exceeds what {where.split(':')[0]}",
                        f"give at most --device-memory {format_size(cap)}, or drop it")
    if rc.expert_budget is not None and budget > room:
        raise UserError(f"--expert-budget {rc.expert_budget} ({format_size(budget)}) does not fit: {where} leave "
                        f"{format_size(room)} for experts", f"give at most --expert-budget {room // layout.nbytes * layout.nbytes}")
    return int(min(budget, room, all_bytes))
