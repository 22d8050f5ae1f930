"""Argument plumbing every `vismmoe` subcommand shares (no torch, no transformers: `--help` answers at once).

Owns the parser class (usage errors as one line, exit status 2), the help formatter (every option's default is
printed: taken from the option when its help does not already say it; registry-backed options list their names
only when their help is printed), the check that every text argument is valid UTF-8 without NUL characters (a
terminal or a script in another encoding hands Python undecodable bytes as lone surrogates, which failed deep in
the tokenizer), and small parsers of numbers and lists.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError


class Help(argparse.HelpFormatter):
    """Fills `{names}` in an option's help with `action.names()`, called only when that help is printed, and ends
    the help with the option's default when it does not mention one."""

    def _get_help_string(self, action):
        names = getattr(action, "names", None)
        text = action.help.replace("{names}", ", ".join(names())) if names else action.help
        default = action.default
        if ("default" not in text and action.option_strings and not action.required and action.nargs != 0
                and not any(default is x for x in (None, False, argparse.SUPPRESS))):     # 0 is a default to show
            text += f" (default {str(default).replace('%', '%%')})"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def error(self, message):                      # one line, exit 2 (argparse prints usage + error otherwise)
        sys.stderr.write(f"vismmoe: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def registry(action: argparse.Action, names) -> argparse.Action:
    """The help of `action` lists `names()` (a registry, read when the help is printed)."""
    action.names = names
    return action


def policies() -> list[str]:
    """The eviction policies a run can use (`belady` needs the future: trace replays only)."""
    from ..offload.policies import ONLINE_POLICIES
    return list(ONLINE_POLICIES)


def predictors() -> list[str]:
    from ..offload.predict import PREDICTORS
    return list(PREDICTORS)


def compressors() -> list[str]:
    """Each compressor with its knobs, e.g. `affinity[:lam=L,gamma=G]`."""
    from ..engine.compress import COMPRESSORS
    out = []
    for name, cls in COMPRESSORS.items():
        knobs = ",".join(f"{k}={k[0].upper()}" for k in getattr(cls, "knobs", {}))
        out.append(f"{name}[:{knobs}]" if knobs else name)
    return out


def links() -> list[str]:
    from ..offload.links import PROFILES
    return [p.label() if p.emulated else p.name for p in PROFILES.values()] + ["GBps=N[,us=L] (EMULATED)"]


def profiles() -> list[str]:
    from ..profiles import names
    return names()


def systems() -> list[str]:
    from ..bench.harness import SYSTEMS
    return list(SYSTEMS)


def shapes() -> list[str]:
    from ..bench.shapes import SHAPES
    return list(SHAPES)


def formats() -> list[str]:
    """The expert formats (formats/): how experts are stored, cached and moved."""
    from ..formats import names
    return names()


def quantized_formats() -> list[str]:
    """The expert formats `vismmoe quantize` and `make-shape --format` write: those whose blob holds more than the
    weights themselves (scales: `ExpertFormat.plain` false)."""
    import torch
    from ..formats import make_format, names
    return [n for n in names() if not make_format(n, 128, 128, torch.float32).plain]


def families() -> list[str]:
    from ..families import FAMILIES
    return sorted(FAMILIES)


# ---- the runtime options, generated from their declaration (config.RuntimeConfig) ---------------------------------
def add_runtime_options(p: argparse.ArgumentParser, command: str) -> None:
    """Every `RuntimeConfig` option that `command` takes, as declared: flag, help (its default appended by `Help`),
    choices, metavar, type, registry names; options of one `group` mutually exclusive."""
    from ..config import declared, flag_of as option_flag
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in declared(command):
        m = f.metadata
        target = p
        if m["group"] is not None:
            target = groups.get(m["group"]) or groups.setdefault(m["group"], p.add_mutually_exclusive_group())
        kw = dict(dest=f.name, help=m["help"])
        if m["store_true"]:
            kw["action"] = "store_true"
        else:
            kw["default"] = m["cli_default"]
            for key in ("choices", "metavar", "type"):
                if m[key] is not None:
                    kw[key] = list(m[key]) if key == "choices" else m[key]
        action = target.add_argument(option_flag(f), **kw)
        if m["names"] is not None:
            registry(action, globals()[m["names"]])


def runtime_config(args: argparse.Namespace, command: str, **fixed):
    """The checked `RuntimeConfig` of `command`'s arguments: each option it takes from `args` (converted as
    declared), `fixed` fields set by the command itself, the rest at their declared defaults. UserError for a
    bad value, or an option given where another makes it meaningless; before any model code is imported."""
    from ..config import declared, runtime_options
    taken = {f.name for f in declared(command)}
    given = lambda name: name in taken and getattr(args, name) is not None  # noqa: E731
    if "compress" in taken:
        if args.compress == "none" and given("keep_ratio"):
            raise UserError(f"--keep-ratio {args.keep_ratio:g} given without --compress, so nothing would use it",
                            "add --compress NAME (e.g. --compress affinity) or drop --keep-ratio")
        if args.compress != "none":
            from ..engine.compress import make_compressor
            make_compressor(args.compress)                  # a name, or name:knob=value[,knob=value]
            if not given("keep_ratio"):
                raise UserError(f"--compress {args.compress} given without --keep-ratio, so it would keep every "
                                "token", "add --keep-ratio R, the share of visual tokens to keep (e.g. 0.33)")
    if "prefetch" in taken:
        if args.prefetch == "none":
            for flag, name in (("--lookahead", "lookahead"), ("--fixed-lookahead", "fixed_lookahead"),
                               ("--calibration", "calibration")):
                if given(name) and getattr(args, name) is not False:
                    raise UserError(f"{flag} given with --prefetch none, so nothing would use it",
                                    "drop it, or choose a predictor: --prefetch gate, trace or blend")
        if given("calibration") and args.prefetch not in ("trace", "blend"):
            raise UserError(f"--calibration is read by --prefetch trace or blend only (--prefetch is "
                            f"{args.prefetch})", "add --prefetch trace or --prefetch blend, or drop --calibration")
    if "prefetch" in taken and args.prefetch in ("trace", "blend") and not given("calibration") and \
            "calibration" not in fixed:
        from ..checkpoints import shipped_calibration
        fixed["calibration"] = shipped_calibration(getattr(args, "model", None))     # what the checkpoint ships
    if given("reserve") and not given("device_memory"):
        raise UserError("--reserve given without --device-memory, so nothing would use it",
                        "add --device-memory SIZE, or drop --reserve")
    values = {}
    for f in declared(command):
        v = getattr(args, f.name)
        if v is None:
            continue                                        # not given, no CLI default: the declared default
        convert = f.metadata["to_config"]
        values[f.name] = convert(v) if convert is not None else v
    return runtime_options(**{**values, **fixed})     # the command's own values win


def flag_of(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _text_fault(v: str) -> str | None:
    """Why `v` is not usable text (lone surrogates: bytes Python could not decode; a NUL), or None."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(v[e.start])
        return "is not valid UTF-8 text" + (f" (byte 0x{c - 0xDC00:02x})" if 0xDC80 <= c <= 0xDCFF else "")
    return "contains a NUL character" if "\x00" in v else None


def check_text(raw: list[str]) -> None:
    """UserError for a command-line argument `raw` holds that is not valid UTF-8 (bytes Python could not decode
    arrive as lone surrogates) or holds a NUL character: every prompt, name and path as given, a value a later
    repeat of its option replaced included, before any of them is used. The error names the option the value
    belongs to (the nearest `--flag` before it, or its own `--flag=`)."""
    fix = {"is": "give text and paths in UTF-8 (check the terminal's or the script's encoding)",
           "contains": "remove it"}
    flag = None
    for i, v in enumerate(raw):
        own = v.split("=")[0] if v.startswith("--") else None
        why = _text_fault(v)
        if why is not None:
            raise UserError(f"{own or flag or f'argument {i + 1}'} {why}", fix[why.split()[0]])
        flag = own or flag


def at_least(value: int | None, least: int, flag: str, why: str = "") -> None:
    """A whole-number option below its least legal value (None: not given) is a user error."""
    if value is not None and value < least:
        raise UserError(f"{flag} {value} is too small", why or f"give at least {least}")


def seed_in_range(value: int, flag: str = "--seed") -> None:
    """A seed torch's generators take: 0 to 2**63 - 1 (as a request's sampling seed; a larger one overflowed in
    torch.manual_seed with a traceback, after the output folder was checked)."""
    if not 0 <= value < 2**63:
        raise UserError(f"{flag} {value} is out of range", "give a seed from 0 to 2**63 - 1")


def format_name(spec: str, flag: str, names: list[str]) -> None:
    """UserError naming `flag` for an expert format spec whose name is not among `names` (the formats this command
    writes or measures); its knobs are checked by formats.make_format."""
    name = spec.partition(":")[0].strip()
    if name not in names:
        raise UserError(f"{flag} {spec!r}: unknown expert format {name!r} here", f"use one of {', '.join(names)}")


def ratios(text: str, what: str) -> list[float]:
    """Comma-separated ratios, each in (0, 1]."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad {what} {text!r}", "give comma-separated numbers, e.g. 1,0.5,0.33") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise UserError(f"bad {what} {text!r}", "each ratio must be in (0, 1]")
    return vals


def compressor_list(text: str) -> list[str]:
    """"random,affinity:lam=2,gamma=1.5,pool" -> ["random", "affinity:lam=2,gamma=1.5", "pool"]: a piece with
    '=' and no ':' is one more knob of the compressor (or expert format: "int4:group=32,sym=0,fp8") before it."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out
