"""Knobs of a run, parsed and validated once.

Owns the byte-size grammar ("512MiB", "2GiB", "1.5GB", "123456", "25%"), the `name:knob=value,...` grammar of
policy and compressor specs, and the frozen `RuntimeConfig` that the engine is built from. Knows nothing about
models: a percentage is resolved against a total the caller supplies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float, total: int | None = None, what: str = "size") -> int:
    """Bytes from '512MiB', '2GB', '1e9'-free plain integers, or 'P%' of `total`."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip()
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            raise UserError(f"bad {what} {text!r}", "give bytes like 512MiB or 2GB, or a percentage like 25%") from None
        if total is None:
            raise UserError(f"{what} {text!r} is a percentage but nothing to take it of", "give bytes like 512MiB")
        if not 0 < pct <= 100:
            raise UserError(f"bad {what} {text!r}", "a percentage must be in (0, 100]")
        return int(total * pct / 100.0)
    m = _SIZE.match(s)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"bad {what} {text!r}", "give bytes like 512MiB, 2GiB or 1.5GB, or a percentage like 25%")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def split_spec(spec: str) -> tuple[str, list[tuple[str, str, str]]]:
    """'name:knob=value,knob2=value2' -> (name, [(knob, value, 'knob=value'), ...]); the caller checks the knobs."""
    name, _, knobs = spec.partition(":")
    items = []
    for item in filter(None, knobs.split(",")):
        key, _, value = item.partition("=")
        items.append((key.strip(), value.strip(), item))
    return name, items


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}B"


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything `vismmoe.load` needs besides the model directory."""

    device: str = "cpu"
    dtype: str | None = None            # None: the checkpoint's dtype on cuda, float32 on cpu
    expert_budget: str | None = None    # bytes or "P%" of all expert bytes; None with no device_memory: all experts
    device_memory: str | None = None    # total device bytes; experts get what weights + reserve leave
    reserve: str | None = None          # KV/activation reserve for device_memory sizing; None: estimated
    policy: str = "lru"
    expert_tier: str = "host"           # host (RAM, pinned on cuda) | disk (read on demand)
    trace: bool = False
    link: str = "real"                  # real | edge | mobile | GBps=N[,us=L] (emulated unless real)
    prefetch: str = "none"              # none | gate | trace | blend
    lookahead: int = 2                  # prefetch depth in MoE layers (the most, when adaptive)
    fixed_lookahead: bool = False       # always prefetch `lookahead` layers ahead (published designs do)
    calibration: str | None = None      # transition tables for trace/blend (vismmoe calibrate)
    compress: str = "none"              # visual-token compressor (compress.py) or none
    keep_ratio: float = 1.0             # share of visual tokens kept when compressing
    max_seq: int = 4096                 # longest prompt + generation the reserve estimate plans for
    decode: str = "auto"                # fast (static KV, compiled layers, one CUDA graph per step) | eager | auto
    compile: bool | None = None         # torch.compile the decoder layers of the fast step; None: on CUDA only
    expert_format: str | None = None    # dense | fp8 | int4[:group=G,sym=S]; None/auto: the checkpoint's own
    check_weights: str = "sample"       # NaN/Inf scan of the weights at load: full | sample | off (weights_check.py)
    cpu_experts: str = "off"            # misses computed on the host's cores: off | on | auto (cpu/placement.py)

    def __post_init__(self):
        if self.expert_tier not in ("host", "disk"):
            raise UserError(f"unknown expert tier {self.expert_tier!r}", "use --expert-tier host or disk")
        if self.decode not in ("auto", "fast", "eager"):
            raise UserError(f"unknown decode mode {self.decode!r}", "use --decode auto, fast or eager")
        if self.expert_budget is not None and self.device_memory is not None:
            raise UserError("both --expert-budget and --device-memory given", "give one of them")
        if self.cpu_experts not in ("off", "on", "auto"):
            raise UserError(f"unknown --cpu-experts mode {self.cpu_experts!r}", "use --cpu-experts off, on or auto")
        if self.check_weights not in CHECK_WEIGHTS:
            raise UserError(f"unknown weight check {self.check_weights!r}",
                            f"use --check-weights {' or '.join(CHECK_WEIGHTS)}")


CHECK_WEIGHTS = ("sample", "full", "off")


def check_runtime(rc: RuntimeConfig) -> None:
    """Every knob of `rc` that names something (policy, link, predictor, compressor, file) or has a range or a
    grammar (sizes), checked before any weight is read or any model code is imported: one-line UserErrors. Imports
    the registries only (torch, never transformers)."""
    import os

    from .engine.compress import make_compressor
    from .offload.links import get_link
    from .paths import input_file
    from .offload.policies import make_policy
    from .offload.predict import PREDICTORS
    if split_spec(rc.policy)[0] == "belady":
        raise UserError("the belady policy needs a recorded trace to replay (it knows every future use): it is a "
                        "bound for trace replays (python -m vismmoe.bench.simulate), not a runtime policy",
                        "use --policy lru, lfu, lfru, predictive or none")
    make_policy(rc.policy)
    get_link(rc.link)
    if rc.expert_format not in (None, "auto"):
        from .formats import make_format
        make_format(rc.expert_format, 1024, 1024, None)     # its name and knobs (sizes are checked at load)
    if rc.prefetch not in PREDICTORS:
        raise UserError(f"unknown predictor {rc.prefetch!r}", f"use --prefetch one of {', '.join(PREDICTORS)}")
    if rc.compress != "none":
        make_compressor(rc.compress)
    elif rc.keep_ratio != 1.0:
        raise UserError(f"keep ratio {rc.keep_ratio} given without a compressor (it would be ignored)",
                        "add --compress NAME (e.g. affinity), or drop --keep-ratio")
    if not 0.0 < rc.keep_ratio <= 1.0:
        raise UserError(f"--keep-ratio {rc.keep_ratio} is out of range", "give a ratio in (0, 1], e.g. 0.33")
    if not 1 <= rc.lookahead <= 8:
        raise UserError(f"--lookahead {rc.lookahead} is out of range", "use a depth from 1 to 8")
    if rc.prefetch in ("trace", "blend") and not (rc.calibration and os.path.exists(rc.calibration)):
        raise UserError(f"--prefetch {rc.prefetch} needs a calibration file" +
                        (f" ({rc.calibration} not found)" if rc.calibration else ""),
                        "make one with: vismmoe calibrate --model DIR --out FILE, then pass --calibration FILE")
    if rc.calibration is not None:
        input_file(rc.calibration, "calibration file", "give the .npz that vismmoe calibrate wrote")
    if rc.expert_budget is not None:
        parse_size(rc.expert_budget, total=1 << 62, what="expert budget")
    if rc.device_memory is not None:
        parse_size(rc.device_memory, what="device memory")
    if rc.reserve is not None:
        parse_size(rc.reserve, what="reserve")
