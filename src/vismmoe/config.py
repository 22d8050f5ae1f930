"""Knobs of a run, parsed and validated once.

Owns the byte-size grammar ("512MiB", "2GiB", "1.5GB", "123456", "25%"), the `name:knob=value,...` grammar of
policy and compressor specs, and the frozen `RuntimeConfig` that the engine is built from. Knows nothing about
models: a percentage is resolved against a total the caller supplies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

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


# ---- the options of a run, each declared once ------------------------------------------------------------------
# A field of `RuntimeConfig` carries its declaration in `field(metadata=...)` (made by `option`): help text, CLI flag,
# the commands that take it, choices, metavar, a registry to list in the help, the CLI's own default where it
# differs from the library's, the CLI value -> config value conversion, and a check of the value. The CLI flags,
# their help and their checks are generated from it (cli/args.py: `add_runtime_options`, `runtime_config`);
# the library, the bench systems and the random-weight engines build their configs through `runtime_options`.
# Adding an option is one `option(...)` field here (plus the code that reads it).

RUN = ("generate", "serve")                                  # the commands that run a model with every knob
JOBS = RUN + ("eval", "bench", "calibrate", "analyze")      # every command that loads a model
_UNSET = object()


def option(default, help: str, *, commands: tuple[str, ...] = RUN, flag: str | None = "", choices=None,
           metavar: str | None = None, type=None, names: str | None = None, cli_default=_UNSET, to_config=None,
           group: str | None = None, check=None, store_true: bool = False):
    """A `RuntimeConfig` field and its declaration. `flag` "" (default): --name-with-dashes; None: no CLI flag.
    `names`: the cli/args.py registry function whose names the help lists (`{names}` in `help`). `cli_default`:
    the CLI's default (the value argparse holds) when it differs from `default`. `to_config`: CLI value ->
    field value. `group`: options of one mutually exclusive group. `check(value)`: UserError for a bad value,
    run by `check_runtime` (choices are checked without one)."""
    return field(default=default, metadata=dict(
        help=help, commands=tuple(commands), flag=flag, choices=choices, metavar=metavar, type=type, names=names,
        cli_default=default if cli_default is _UNSET else cli_default, to_config=to_config, group=group,
        check=check, store_true=store_true))


def _registry_check(kind: str):
    def check(value):
        from .paths import input_file
        if kind == "policy":
            from .offload.policies import make_policy
            if split_spec(value)[0] == "belady":
                raise UserError("the belady policy needs a recorded trace to replay (it knows every future use): it "
                                "is a bound for trace replays (python -m vismmoe.bench.simulate), not a runtime "
                                "policy", "use --policy lru, lfu, lfru, predictive or none")
            make_policy(value)
        elif kind == "link":
            from .offload.links import get_link
            get_link(value)
        elif kind == "expert_format":
            if value not in (None, "auto"):
                from .formats import make_format
                make_format(value, 1024, 1024, None)    # its name and knobs (sizes are checked at load)
        elif kind == "prefetch":
            from .offload.predict import PREDICTORS
            if value not in PREDICTORS:
                raise UserError(f"unknown predictor {value!r}", f"use --prefetch one of {', '.join(PREDICTORS)}")
        elif kind == "compress":
            if value != "none":
                from .engine.compress import make_compressor
                make_compressor(value)
        elif kind == "device_profile":
            if value is not None:
                from .profiles import get_profile
                get_profile(value)
        elif kind == "calibration":
            if value is not None:
                input_file(value, "calibration file", "give the .npz that vismmoe calibrate wrote")
    return check


def _size_check(what: str, total: int | None = None):
    def check(value):
        if value is not None:
            parse_size(value, total=total, what=what)
    return check


def _keep_ratio_check(value):
    if not 0.0 < value <= 1.0:
        raise UserError(f"--keep-ratio {value} is out of range", "give a ratio in (0, 1], e.g. 0.33")


def _prefill_chunk_check(value):
    if value < 0:
        raise UserError(f"--prefill-chunk {value} is negative", "give a number of prompt positions, or 0 (off)")


def _visual_top_k_check(value):
    if value < 0:
        raise UserError(f"--visual-top-k {value} is negative", "give a number of experts below the model's top-k, "
                                                              "or 0 (off)")


def _lookahead_check(value):
    if not 1 <= value <= 8:
        raise UserError(f"--lookahead {value} is out of range", "use a depth from 1 to 8")


CHECK_WEIGHTS = ("sample", "full", "off")


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything `vismmoe.load` needs besides the model directory; each field is one declared option (see
    `option`)."""

    device: str = option("cpu", "cpu or cuda", commands=JOBS)
    dtype: str | None = option(None, "float32 | bfloat16 | float16 (default: float32 on cpu, the checkpoint's "
                                      "dtype on cuda)", commands=JOBS)
    expert_budget: str | None = option(
        None, "device bytes for experts, e.g. 512MiB, or a share of all experts, e.g. 25%% (default: every expert)",
        commands=RUN + ("eval",), metavar="SIZE", group="budget", check=_size_check("expert budget", 1 << 62))
    device_memory: str | None = option(
        None, "total device bytes; experts get what weights and the KV/activation reserve leave (default: not used)",
        metavar="SIZE", group="budget", check=_size_check("device memory"))
    reserve: str | None = option(
        None, "KV/activation reserve for --device-memory (default: estimated); only with --device-memory",
        metavar="SIZE", check=_size_check("reserve"))
    policy: str = option("lru", "cache eviction policy, one of {names} (default %(default)s: it measured best at a "
                                "budget; lru is the usual baseline)",
                         metavar="NAME", names="policies", cli_default="predictive", check=_registry_check("policy"))
    expert_tier: str = option("host", "where experts live off the device: host RAM or disk (read on demand)",
                              choices=("host", "disk"))
    trace: bool = option(False, "record the routing trace", flag=None)
    link: str = option("real", "host->device link, one of {names}", metavar="PROFILE", names="links",
                       check=_registry_check("link"))     # real | edge | mobile | GBps=N[,us=L] (emulated unless real)
    prefetch: str = option("none", "lookahead predictor for prefetch, one of {names} (default %(default)s: next "
                                   "layers' routers; none turns prefetch off)",
                           metavar="NAME", names="predictors", cli_default="gate", check=_registry_check("prefetch"))
    lookahead: int = option(2, "most MoE layers to prefetch ahead, 1 to 8 (default 2); the depth used adapts to how "
                               "long the expected misses take on the link, down to no prefetch when they hide under "
                               "compute; not with --prefetch none",
                            type=int, metavar="D", cli_default=None, check=_lookahead_check)
    fixed_lookahead: bool = option(False, "always prefetch --lookahead layers ahead; not with --prefetch none",
                                   store_true=True)
    calibration: str | None = option(
        None, "transition tables from `vismmoe calibrate`, read by --prefetch trace and blend only (default: the "
              "tables the checkpoint ships, if any)", metavar="FILE", check=_registry_check("calibration"))
    compress: str = option("none", "visual-token compressor before the decoder: none (default: every visual token, "
                                   "lossless) or one of {names}; needs --keep-ratio",
                           commands=RUN + ("eval", "calibrate"), metavar="NAME", names="compressors",
                           check=_registry_check("compress"))
    keep_ratio: float = option(1.0, "share of visual tokens the compressor keeps, in (0, 1]; only with --compress "
                                    "(default: none)",
                               commands=RUN + ("eval", "calibrate"), type=float, metavar="R", cli_default=None,
                               check=_keep_ratio_check)
    visual_top_k: int = option(
        0, "each visual token of a prompt keeps only its K heaviest routed experts (1 to the model's top-k - 1; the "
           "kept weights scaled to the sum of all): fewer distinct experts per layer, fewer expert bytes moved, at "
           "some accuracy (docs/affinity.md). Changes the model's outputs, as --compress does; text tokens and "
           "decode keep the model's top-k. 0 (default): off; bench: the K of vismmoe-vtopk (default 1)",
        commands=RUN + ("eval", "calibrate", "analyze", "bench"), type=int, metavar="K", check=_visual_top_k_check)
    prefill_chunk: int = option(
        0, "run a prompt longer than N positions through the decoder in chunks of N (the vision tower once, then "
           "the decoder chunk by chunk over one KV cache); serve: a newcomer's chunks interleave with the running "
           "rows' decode steps, so they wait one chunk at a time, not a whole prompt. 0 (default) prefills whole; "
           "see docs/serving.md", commands=RUN + ("eval", "bench"), type=int, metavar="N",
        check=_prefill_chunk_check)
    max_seq: int = option(4096, "longest prompt + generation the reserve estimate plans for", flag=None)
    decode: str = option("auto", "decode step: fast (static KV cache, compiled layers, one CUDA graph per token, "
                                 "misses read from host memory by the step), eager (transformers' forward per "
                                 "token), native (the CPU only: the fast step with the whole step in C, "
                                 "numerically equivalent to eager, Qwen3-MoE decoders; docs/cpu-experts.md), auto "
                                 "(default: fast on CUDA, eager on the CPU)",
                         commands=RUN + ("bench",), choices=("auto", "fast", "eager", "native"))
    compile: bool | None = option(None, "torch.compile the fast step's decoder layers (default auto: on CUDA only)",
                                  commands=RUN + ("bench",), choices=("auto", "on", "off"), cli_default="auto",
                                  to_config={"auto": None, "on": True, "off": False}.get)
    fuse_kernels: bool | None = option(
        None, "fewer, larger kernels in the fast step: sibling projections that read the same input (attention "
              "q/k/v, Qwen3.5's Gated-DeltaNet input projections, a dense MLP's or shared expert's gate/up) as one "
              "stacked matrix product, and a softmax top-k router's softmax, top-k and renormalisation as one kernel "
              "(default auto: on CUDA only). Equal to transformers' separate ops up to float rounding "
              "(docs/fast-step.md)", commands=RUN + ("bench",), choices=("auto", "on", "off"),
        cli_default="auto", to_config={"auto": None, "on": True, "off": False}.get)
    expert_format: str | None = option(
        None, "how routed experts are stored, cached and moved: auto (default: the checkpoint's own; dense for a "
              "bf16/fp16 checkpoint) or one of {names}, quantized while loading (round to nearest); knobs: "
              "int4:group=16|32|64|128,sym=0|1",
        commands=RUN + ("eval", "bench"), metavar="FORMAT", names="formats", cli_default="auto",
        to_config=lambda v: None if v == "auto" else v, check=_registry_check("expert_format"))
    check_weights: str = option("sample", "scan the weights for NaN/Inf at load and refuse the checkpoint if any "
                                          "(exit 2, naming the tensor): sample (default; small tensors whole, large "
                                          "ones sampled), full (every value), off",
                                choices=CHECK_WEIGHTS)
    cpu_experts: str = option(
        "off", "compute missing experts on the host's cores instead of fetching them: auto (each miss goes where a "
               "cost model over this machine's measured rates, cached, says it is done sooner; decode mostly on the "
               "CPU, prefill mostly fetched), on (every miss on the CPU), off (default: every miss fetched, bit-exact "
               "with every expert resident). CPU results differ from the device's only by summation order. On the fast "
               "decode step, a step with misses enough splits at each MoE layer so the host can compute them "
               "(docs/cpu-experts.md)", commands=RUN + ("eval", "bench"), choices=("off", "on", "auto"))
    device_profile: str | None = option(
        None, "emulate a device class: everything runs here, times come from the profile's virtual device clock "
              "(compute, memory, expert tier; docs/device-profiles.md); one of {names} or a profile .json (default: "
              "none, times measured)",
        commands=RUN + ("eval", "bench"), metavar="NAME", names="profiles", check=_registry_check("device_profile"))

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and f.metadata.get("to_config") is None and value not in choices:
                raise UserError(f"unknown {_CHOICE_NAMES.get(f.name, f.name.replace('_', ' '))} {value!r}",
                                f"use {flag_of(f)} {_or(choices)}")
        if self.expert_budget is not None and self.device_memory is not None:
            raise UserError("both --expert-budget and --device-memory given", "give one of them")
        if self.device_profile is not None and self.link != "real":
            raise UserError("--link and --device-profile both set the expert link (the profile's is its tier)",
                            "drop --link, or drop --device-profile")


_CHOICE_NAMES = {"decode": "decode mode", "check_weights": "weight check"}


def _or(choices) -> str:
    return " or ".join(choices) if len(choices) > 2 else f"{choices[0]} or {choices[1]}"


def flag_of(f) -> str:
    """The CLI flag of a declared field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def declared(command: str | None = None) -> list:
    """The declared options (dataclass fields of `RuntimeConfig`), those with a CLI flag that `command` takes
    when given."""
    return [f for f in fields(RuntimeConfig)
            if command is None or (f.metadata.get("flag") is not None and command in f.metadata["commands"])]


def runtime_options(base: RuntimeConfig | None = None, **values) -> RuntimeConfig:
    """A checked `RuntimeConfig`: `base` (default: the declared defaults) with `values` replacing fields, e.g.
    `runtime_options(expert_budget="25%", policy="lfu")`. UserError for an unknown option or a bad value."""
    try:
        rc = replace(base, **values) if base is not None else RuntimeConfig(**values)
    except TypeError as e:
        raise UserError(f"unknown option: {e}", "see vismmoe.config.RuntimeConfig for the options") from None
    check_runtime(rc)
    return rc


# checked after the options that only make sense together (a more helpful message first)
_CHECKED_LATE = ("keep_ratio", "lookahead", "calibration", "expert_budget", "device_memory", "reserve")


def check_runtime(rc: RuntimeConfig) -> None:
    """Every knob of `rc` that names something (policy, link, predictor, compressor, file) or has a range or a
    grammar (sizes), checked before any weight is read or any model code is imported: each declared option's own
    check, then the options that only make sense together. One-line UserErrors. Imports the registries only
    (torch, never transformers)."""
    import os
    for f in fields(rc):
        check = f.metadata.get("check")
        if check is not None and f.name not in _CHECKED_LATE:
            check(getattr(rc, f.name))
    if rc.compress == "none" and rc.keep_ratio != 1.0:
        raise UserError(f"keep ratio {rc.keep_ratio} given without a compressor (it would be ignored)",
                        "add --compress NAME (e.g. affinity), or drop --keep-ratio")
    for name in _CHECKED_LATE[:2]:
        fields_by_name()[name].metadata["check"](getattr(rc, name))
    if rc.prefetch in ("trace", "blend") and not (rc.calibration and os.path.exists(rc.calibration)):
        raise UserError(f"--prefetch {rc.prefetch} needs a calibration file" +
                        (f" ({rc.calibration} not found)" if rc.calibration else ""),
                        "make one with: vismmoe calibrate --model DIR --out FILE, then pass --calibration FILE")
    for name in _CHECKED_LATE[2:]:
        fields_by_name()[name].metadata["check"](getattr(rc, name))


def fields_by_name() -> dict:
    return {f.name: f for f in fields(RuntimeConfig)}
