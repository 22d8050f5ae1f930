"""Device profiles: what a run pretends to be (compute, memory and the expert tier of a device class).

A profile gives the peak FLOP/s per dtype, memory bandwidth and capacity, the expert tier's read rate and latency,
and per-kernel-class efficiencies (tables.py, each value with its public source). With `--device-profile NAME`
the engine keeps running everything for real (tokens and routing are real) while a virtual device clock
(clock.py) decides how long each span would have taken on the profile's device; the profile's tier is the link
the experts' copies are booked on (the `edge`/`mobile` links of offload/links.py are the link half alone).

Names: the tables' (`h100`, `h200`, `orin-agx-64`, `orin-nx-16`, `phone`, `laptop-8g`), `cpu-local` (this machine,
measured by a short calibration: calibrate.py), or a path to a profile JSON (what `vismmoe.bench.profiles` writes).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from .tables import ALIASES, TABLES

KERNEL_CLASSES = ("attention", "router", "experts", "vision", "lm_head", "other")


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Units: FLOP/s, bytes/s, bytes, seconds."""

    name: str
    title: str
    flops: dict                        # dtype name (float32, bfloat16, float16) -> peak dense FLOP/s
    mem_Bps: float                     # memory bandwidth
    mem_bytes: int                     # memory capacity (the device's; unified: shared with the host)
    tier: dict                         # expert tier: {"name", "Bps", "latency_s"}
    efficiency: dict                   # kernel class -> share of peak reached ("class@prefill": in the prefill)
    op_s: float | dict = 0.0           # fixed seconds per dispatched operator (or per kernel class, as above)
    async_launch: bool = False         # dispatch overlaps device work (GPU): span = max(roofline, ops x op_s)
    miss_s: float = 0.0                # compute time one expert copy costs besides the link (the CPU: handing it
                                       # to the copy thread, the memcpy competing for the cores, the bookkeeping)
    unified: bool = False
    sources: dict = field(default_factory=dict)
    calibration: str = ""

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` ("float32", "bfloat16", ...); UserError when the profile has none for it."""
        try:
            return float(self.flops[dtype])
        except KeyError:
            raise UserError(f"device profile {self.name} gives no peak FLOP/s for {dtype}",
                            f"run with --dtype {' or '.join(self.flops)}") from None

    def op_seconds(self, kind: str, phase: str | None = None) -> float:
        return float(_lookup(self.op_s, kind, phase, 0.0)) if isinstance(self.op_s, dict) else float(self.op_s)

    def span_seconds(self, kind: str, flops: float, nbytes: float, ops: int, dtype: str,
                     phase: str | None = None) -> float:
        """Roofline time of one span of kernel class `kind` that did `flops` FLOPs over `nbytes` bytes of memory
        traffic in `ops` operators: max(compute, memory) at the class's efficiency, plus (or, where dispatch runs
        ahead of the device, at least) the operators' fixed cost. `phase` ("prefill" | "decode" | None): values
        given for "kind@phase" (a calibration fits the prefill apart) take precedence over the class's."""
        eff = float(_lookup(self.efficiency, kind, phase, 1.0))
        roof = max(flops / self.peak(dtype), nbytes / self.mem_Bps) / max(eff, 1e-6)
        fixed = ops * self.op_seconds(kind, phase)
        return max(roof, fixed) if self.async_launch else roof + fixed

    def link(self):
        """The expert tier as an emulated link (offload/links.py)."""
        from ..offload.links import LinkProfile
        return LinkProfile(f"{self.name}:{self.tier.get('name', 'tier')}", self.tier["Bps"] / 1e9,
                           float(self.tier.get("latency_s", 0.0)))

    def label(self) -> str:
        return f"emulated for device profile {self.name}"

    def to_json(self) -> dict:
        return asdict(self)


def _lookup(values: dict, kind: str, phase: str | None, default: float) -> float:
    """values["kind@phase"], else values["kind"], else values["other"], else `default`."""
    if phase is not None and f"{kind}@{phase}" in values:
        return values[f"{kind}@{phase}"]
    return values.get(kind, values.get("other", default))


def names() -> list[str]:
    return sorted(TABLES) + ["cpu-local"]


def from_table(name: str, table: dict) -> DeviceProfile:
    return DeviceProfile(name=name, **{k: v for k, v in table.items()})


def get_profile(name: str) -> DeviceProfile:
    """The profile called `name` (a table, `cpu-local`, or a profile JSON file); UserError for an unknown one."""
    key = ALIASES.get(name, name)
    if key in TABLES:
        return from_table(key, TABLES[key])
    if key == "cpu-local":
        from .calibrate import cpu_local
        return cpu_local()
    if name.endswith(".json"):
        from ..paths import read_json
        if not os.path.isfile(name):
            raise UserError(f"device profile file not found: {name}", "give a profile name or an existing JSON file")
        data = read_json(name, f"device profile {name}", "write it with python -m vismmoe.bench.profiles")
        try:
            data = data.get("profile", data)
            return DeviceProfile(**data)
        except (TypeError, AttributeError) as e:
            raise UserError(f"device profile {name} is malformed ({e})",
                            "write it with python -m vismmoe.bench.profiles") from None
    raise UserError(f"unknown device profile {name!r}", f"use one of {', '.join(names())}, or a profile .json file")


def save_profile(profile: DeviceProfile, path: str) -> None:
    with open(path, "w") as f:
        json.dump(profile.to_json(), f, indent=1)
