"""Validation of device profiles before use: predict a real machine from its profile on the virtual device clock
(profiles/clock.py), run the same requests for real on it, and compare time to first token, decode time per token
and end to end at 2 expert budgets x 2 image sizes.

    python -m vismmoe.bench.profiles --validate --profile cpu-local --out docs/results/profiles
    python -m vismmoe.bench.profiles --validate --device cuda --profile h100 --out docs/results/profiles

Calibration (held out from the grid): one request at its own image size (160 px) and prompt, at the full budget,
and the prefills of the same prompt with larger images (320 and 384 px; `--calibrate-sizes`; none may give a validated
size's request: the bundled model's processor caps images at 448 px' tokens). Their real seconds per
kernel class (HostTimer; on a GPU synchronised at span ends), with every expert resident, for the prefills and for
the whole request, against the roofline and operator count of what the class did in each phase (least squares),
give the class's efficiency and cost per dispatched operator (`_fit`), and the prefills alone the prefill's own
(`class@prefill`); the same request with no expert resident against with all, less what the emulated link already
charges, gives the cost per expert copy (`miss_s`, over every copy: misses and prefetches). The profile written
next to the results is the calibrated one. Then the grid: per cell a fork on the real clock and one on the
profile's clock, all warmed up, then `--reps` rounds in which every cell runs one request (decode teacher-forced
past EOS, exactly `--new-tokens` tokens), the order reversed every other round; medians compared. Writes JSON +
markdown; exit 1 when a cell is off by more than `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

from ..errors import UserError

PROMPTS = {"calibrate": "Describe the picture.", "grid": "What color is the shape?"}
METRICS = (("ttft_s", "TTFT ms"), ("tpot_s", "decode ms/token"), ("e2e_s", "end to end ms"))


def _image(size: int, seed: int):
    from PIL import Image
    rng = np.random.RandomState(seed)
    arr = (rng.rand(size // 8, size // 8, 3) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    return Image.fromarray(arr)


# decode steps are teacher-forced with this text and run past EOS: the bundled model answers in 2 tokens, and
# decode ms/token must rest on more than one step
TEACHER = ("The picture shows a red square on a blue field, with a small green circle to its left and a yellow "
           "triangle below it; the shapes do not touch and the background is plain.")


def _generate(eng, inputs, new_tokens: int) -> dict:
    """One request of exactly `new_tokens` tokens (teacher-forced with TEACHER, EOS ignored): its stats."""
    import torch
    teacher = (eng.tokenizer.encode(TEACHER) * (new_tokens // 8 + 1))[:new_tokens]

    def keep_going(state):
        state.done[:] = [False] * len(state.done)
    with torch.inference_mode(), eng._lock:
        _, stats = eng._generate_ids(inputs, new_tokens, teacher, on_step=keep_going)
    return stats


def _summary(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k, _ in METRICS}
    out.update(new_tokens=runs[0]["new_tokens"], visual_tokens=runs[0]["visual_tokens"],
               misses=runs[0]["misses"], time_source=runs[0]["time_source"])
    return out


def _turns(n: int, reps: int):
    """(round, index) over `reps` rounds of `n` runs taking turns, the order reversed every other round: a drift
    of the machine's speed falls on every run alike, not on the ones that happen to run first."""
    for r in range(reps):
        for i in (range(n) if r % 2 == 0 else reversed(range(n))):
            yield r, i


def _grid(cells: dict, reps: int, new_tokens: int) -> dict:
    """cells: name -> (engine, inputs). Each engine warmed up, then `reps` rounds in which every cell runs one cold
    request, the order reversed every other round (so a drift of the machine's speed during the grid falls on
    every cell alike, not on the cells that happen to run first): name -> medians."""
    for eng in {id(e): e for e, _ in cells.values()}.values():
        eng.warm_up(with_image=True)
    runs: dict = {name: [] for name in cells}
    names = list(cells)
    for _, i in _turns(len(names), reps):
        eng, inputs = cells[names[i]]
        eng.cache.clear()
        runs[names[i]].append(_generate(eng, inputs, new_tokens))
    return {name: _summary(v) for name, v in runs.items()}


def _fit(r: list[float], o: list[float], t: list[float], s_default: float) -> tuple[float, float]:
    """Class time t_i = a x roofline r_i + s x operators o_i over its phases (prefills of the held-out sizes,
    decode), a, s >= 0: (a, s) by least squares (exact for two phases). One phase (the vision tower runs in the
    prefill only, and of one size): s = `s_default`, a from the rest."""
    n = len(t)
    if n >= 2 and any(x > 0 for x in r) and any(x > 0 for x in o):
        srr = sum(x * x for x in r)
        soo = sum(x * x for x in o)
        sro = sum(x * y for x, y in zip(r, o))
        srt = sum(x * y for x, y in zip(r, t))
        sot = sum(x * y for x, y in zip(o, t))
        det = srr * soo - sro * sro
        if abs(det) > 1e-30 * max(srr * soo, 1e-300):
            a = (srt * soo - sot * sro) / det
            s_ = (srr * sot - sro * srt) / det
            if a >= 0 and s_ >= 0:
                return a, s_
        # the nearest non-negative fit: one of the two is 0 (least squares on the other)
        cands = []
        for a_only in (True, False):
            x = r if a_only else o
            v = sum(xi * ti for xi, ti in zip(x, t)) / max(sum(xi * xi for xi in x), 1e-300)
            err = sum((v * xi - ti) ** 2 for xi, ti in zip(x, t))
            cands.append((err, (v, 0.0) if a_only else (0.0, v)))
        return min(cands)[1]
    rest = max(t[0] - o[0] * s_default, 0.0)
    return (rest / r[0] if r[0] > 0 else 0.0), (s_default if r[0] > 0 else t[0] / max(o[0], 1))


def calibrate(base, profile, size: int, new_tokens: int, reps: int, more_sizes: tuple[int, ...] = ()):
    """`profile` calibrated on a held-out request (see the module docstring): per kernel class a rate (efficiency:
    the share of the measured peak the class reaches at its real shapes) and a cost per operator, from the
    request's prefill and decode phases, and the prefills of the same prompt with images of `more_sizes` px (held
    out too): two prompt sizes, so a class whose time grows slower than its FLOPs (small matmuls run far below
    peak) gets a fixed cost and a marginal rate, not one rate that extrapolates linearly; then a cost per expert
    copy (`miss_s`) from the same request with every expert already resident and with none."""
    from ..profiles.calibrate import HostTimer
    from ..profiles.clock import attach_profile
    import torch
    inputs = base.prepare([_image(size, 1)], [PROMPTS["calibrate"]])
    more = [base.prepare([_image(side, 2 + i)], [PROMPTS["calibrate"]]) for i, side in enumerate(more_sizes)]
    real = base.fork(expert_budget="100%")
    sync = (lambda: torch.cuda.synchronize(real.device)) if real.device.type == "cuda" else None
    timer = HostTimer(profile, sync)
    real.clock = timer
    real.warm_up(with_image=True)

    def measured(runs: list[tuple]) -> list[tuple[dict, float, int]]:
        """`runs`: (inputs, tokens, cold) each. Per run, medians over `reps` of (seconds per class, end to end,
        expert copies: misses and prefetches alike, as the emulation charges `miss_s` for each). The runs take
        turns, the order reversed every other round, so a slow spell of the machine falls on all of them alike,
        not on one size's repetitions (one such spell made a 320 px prefill slower than the 384 px one). Cold: the
        cache emptied first; warm: every expert of the request resident first (refilled after a cold run)."""
        splits, e2e, copies = ([[] for _ in runs] for _ in range(3))
        filled = set()                  # warm runs whose experts are all resident (at the full budget: until a
        for _, i in _turns(len(runs), reps):    # cold run empties the cache)
            inp, tokens, cold = runs[i]
            if cold:
                real.cache.clear()
                filled.clear()
            elif i not in filled:
                _generate(real, inp, tokens)
                filled.add(i)
            timer.split.clear()
            st = _generate(real, inp, tokens)
            splits[i].append(dict(timer.split))
            e2e[i].append(st["e2e_s"])
            copies[i].append(round(st["bytes_moved"] / real.layout.nbytes))
        return [({k: statistics.median(sp.get(k, 0.0) for sp in sps) for k in set().union(*sps)},
                 statistics.median(e), c[-1]) for sps, e, c in zip(splits, e2e, copies)]

    prefills = measured([(inp, 1, False) for inp in [inputs] + more])
    prefill_m, more_m = prefills[0][0], [m for m, _, _ in prefills[1:]]
    (full_m, warm_e2e, warm_copies), (_, cold_e2e, cold_copies) = measured([(inputs, new_tokens, False),
                                                                           (inputs, new_tokens, True)])

    bare = replace(profile, efficiency={k: 1.0 for k in profile.efficiency} | {"other": 1.0}, op_s=0.0,
                   miss_s=0.0)
    emu = base.fork(expert_budget="100%")
    clock = attach_profile(emu, bare)
    emu.clock = clock

    def counted(tokens: int, inp=None) -> dict:
        inp = inputs if inp is None else inp
        _generate(emu, inp, tokens)                                      # fill the cache
        clock.counts.clear()
        _generate(emu, inp, tokens)
        return {k: list(v) for k, v in clock.counts.items()}
    prefill_c, full_c = counted(1), counted(new_tokens)
    more_c = [counted(1, inp) for inp in more]

    def roof(kind, c):
        return bare.span_seconds(kind, c[0], c[1], 0, clock.dtype)
    phases, prefills = {}, {}
    for kind, fc in full_c.items():
        pc = prefill_c.get(kind, [0, 0, 0])
        dc = [f - p for f, p in zip(fc, pc)]
        tp, tf = prefill_m.get(kind, 0.0), full_m.get(kind, 0.0)
        ph = [(roof(kind, pc), pc[2], tp)] if pc[2] else []
        for counts, secs in zip(more_c, more_m):
            p2 = counts.get(kind)
            if p2 is not None and p2[2]:
                ph.append((roof(kind, p2), p2[2], secs.get(kind, 0.0)))
        prefills[kind] = list(ph)
        if dc[2] > 0:
            ph.append((roof(kind, dc), dc[2], max(tf - tp, 0.0)))
        phases[kind] = ph
    two = {k: _fit(*zip(*ph), 0.0) for k, ph in phases.items() if len(ph) >= 2}
    s_default = statistics.median(s_ for _, s_ in two.values()) if two else 0.0
    fitted = {k: two.get(k) or _fit(*zip(*ph), s_default) for k, ph in phases.items() if ph}
    # the prefill's own fit where it has two sizes or more: its operators are few and large, the decode's many and
    # small, and one (rate, cost per operator) for both misjudged the prefill's growth with the image
    fitted.update({f"{k}@prefill": _fit(*zip(*ph), 0.0) for k, ph in prefills.items() if len(ph) >= 2})
    eff = {k: (1.0 / a if a > 0 else 1e6) for k, (a, _) in fitted.items()}
    op_s = {k: s_ for k, (_, s_) in fitted.items()}
    how = (f"efficiency and op_s per kernel class fitted on a held-out request ({size} px image, "
           f"'{PROMPTS['calibrate']}', {new_tokens} teacher-forced tokens, medians of {reps})"
           + (f" and the prefills of the same prompt with {', '.join(map(str, more_sizes))} px images"
              if more_sizes else "") +
           ": class seconds = roofline / efficiency + operators x op_s over its prefills and decode (least "
           "squares), and over its prefills alone for the prefill (class@prefill); miss_s = the same request's "
           "extra seconds with no expert resident over with all, less the "
           "link time, per copy")
    cal = replace(profile, efficiency=eff, op_s=op_s)
    # the cost per expert copy: the same request cold (every expert copied) against warm, real and emulated
    emu2 = base.fork(expert_budget="100%")
    emu_clock = attach_profile(emu2, cal)
    emu2.clock = emu_clock
    _generate(emu2, inputs, new_tokens)
    e_warm = _generate(emu2, inputs, new_tokens)
    emu2.cache.clear()
    e_cold = _generate(emu2, inputs, new_tokens)
    copies = max(cold_copies - warm_copies, 1)
    miss_s = max((cold_e2e - warm_e2e) - (e_cold["e2e_s"] - e_warm["e2e_s"]), 0.0) / copies
    cal = replace(cal, miss_s=miss_s, calibration=how,
                  sources=dict(profile.sources, op_s=how + " by python -m vismmoe.bench.profiles",
                               efficiency=how + " by python -m vismmoe.bench.profiles",
                               miss_s=how + " by python -m vismmoe.bench.profiles"))
    return cal, {"measured_prefill_s": prefill_m, "measured_full_s": full_m,
                 "counts_prefill": prefill_c, "counts_full": full_c, "measured_more_prefills_s": more_m,
                 "counts_more_prefills": more_c, "efficiency": eff, "op_s": op_s,
                 "miss_s": miss_s, "e2e_warm_s": warm_e2e, "e2e_cold_s": cold_e2e, "copies": copies,
                 "emulated_e2e_warm_s": e_warm["e2e_s"], "emulated_e2e_cold_s": e_cold["e2e_s"]}


def carried_calibration(profile, path: str):
    """(`profile` with the per-class efficiency, operator cost and per-copy cost of the calibrated profile saved at
    `path` by a validation on another machine, the record of where they came from): the other machine's kernel
    classes are assumed to reach the same share of peak here, and its host the same cost per operator and copy;
    the peaks, bandwidths, capacity and expert tier stay `profile`'s. UserError for a file that is not a calibrated
    profile."""
    from ..profiles import get_profile
    if not path.endswith(".json"):
        raise UserError(f"--calibrated-on {path} is not a profile file",
                        "give the .profile.json a --validate run wrote")
    other = get_profile(path)
    if "fitted" not in other.calibration or not other.efficiency:
        raise UserError(f"--calibrated-on {path} is not a calibrated profile",
                        "give a .profile.json written by a --validate run")
    how = (f"efficiency, op_s and miss_s carried from {other.name} calibrated on another machine ({path}: "
           f"{other.calibration}); peaks, bandwidths and the expert tier are {profile.name}'s")
    cal = replace(profile, efficiency=dict(other.efficiency), op_s=other.op_s, miss_s=other.miss_s,
                  calibration=how, sources=dict(profile.sources, efficiency=how, op_s=how, miss_s=how))
    return cal, {"carried_from": path, "efficiency": cal.efficiency, "op_s": cal.op_s, "miss_s": cal.miss_s}


def free_stem(stem: str) -> str:
    """`stem`, or `stem-run2`, `-run3`, ... : the first whose result files do not exist yet (a second run of the
    same day keeps the first one's files)."""
    n, out = 1, stem
    while any(os.path.exists(out + ext) for ext in (".json", ".md", ".profile.json")):
        n += 1
        out = f"{stem}-run{n}"
    return out


def validate(args) -> dict:
    from .. import load
    from ..profiles import get_profile, save_profile
    base = load(args.model, device=args.device, dtype=args.dtype, policy=args.policy, prefetch=args.prefetch,
                decode="eager", check_weights="off")
    profile = get_profile(args.profile)
    prepared = {side: base.prepare([_image(side, 0)], [PROMPTS["grid"]]) for side in args.calibrate_sizes + args.sizes}
    tokens = {side: int(inp["input_ids"].shape[-1]) for side, inp in prepared.items()}
    leak = sorted(c for c in args.calibrate_sizes if any(tokens[c] == tokens[g] for g in args.sizes))
    if leak:        # the processor resizes large images: two sides can give the same request
        raise UserError(f"--calibrate-sizes {leak} give as many image tokens as a validated size "
                        f"({', '.join(f'{k} px: {v}' for k, v in tokens.items())} prompt tokens)",
                        "calibrate on sizes held out from the validated ones, e.g. --calibrate-sizes 160 256 384")
    if args.calibrated_on is not None:      # another machine's fit, this profile's device: nothing fitted here
        cal, fit = carried_calibration(profile, args.calibrated_on)
    else:
        cal, fit = calibrate(base, profile, args.calibrate_sizes[0], args.new_tokens, args.reps,
                             tuple(args.calibrate_sizes[1:]))
    os.makedirs(args.out, exist_ok=True)
    stem = free_stem(os.path.join(args.out, f"{cal.name}-{args.date}"))
    save_profile(cal, stem + ".profile.json")
    inputs = {size: prepared[size] for size in args.sizes}                  # the requests counted above
    cells = {}
    for budget in args.budgets:
        real, pred = base.fork(expert_budget=budget), base.fork(expert_budget=budget,
                                                                 device_profile=stem + ".profile.json")
        for size in args.sizes:
            cells[(budget, size, "real")] = (real, inputs[size])
            cells[(budget, size, "predicted")] = (pred, inputs[size])
    measured = _grid(cells, args.reps, args.new_tokens)
    rows = []
    for budget in args.budgets:
        for size in args.sizes:
            real, pred = measured[(budget, size, "real")], measured[(budget, size, "predicted")]
            err = {k: pred[k] / real[k] - 1 if real[k] > 0 else None for k, _ in METRICS}
            rows.append({"budget": budget, "image_px": size, "real": real, "predicted": pred, "error": err})
            print(f"budget {budget} image {size}px: " + ", ".join(
                f"{label} {real[k] * 1e3:.1f} real / {pred[k] * 1e3:.1f} predicted ({err[k]:+.1%})"
                for k, label in METRICS), file=sys.stderr)
    worst = max(abs(e) for r in rows for e in r["error"].values() if e is not None)
    return {"date": args.date, "command": " ".join(["python -m vismmoe.bench.profiles"] + sys.argv[1:]),
            "device": str(base.device), "profile": cal.to_json(), "calibration": fit, "rows": rows,
            "worst_abs_error": worst, "tolerance": args.tolerance, "passed": worst <= args.tolerance,
            "stem": stem}


def markdown(res: dict) -> str:
    lines = [f"# Device profile validation: {res['profile']['name']} on {res['device']} ({res['date']})", "",
             f"Command: `{res['command']}`", "",
             "Predicted = the same requests on the profile's virtual device clock (everything runs; time emulated); "
             "real = measured on this machine. Medians of the repetitions; error = predicted / real - 1.", "",
             "| budget | image | visual tokens | new tokens | " +
             " | ".join(f"{lab} real | predicted | error" for _, lab in METRICS) + " |",
             "|---" * (4 + 3 * len(METRICS)) + "|"]
    for r in res["rows"]:
        cells = [r["budget"], f"{r['image_px']} px", str(r["real"]["visual_tokens"]), str(r["real"]["new_tokens"])]
        for k, _ in METRICS:
            cells += [f"{r['real'][k] * 1e3:.1f}", f"{r['predicted'][k] * 1e3:.1f}", f"{r['error'][k]:+.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Worst |error|: {res['worst_abs_error']:.1%} (target at most {res['tolerance']:.0%}): "
              f"{'within' if res['passed'] else 'NOT within'} the target.", "",
              f"Calibration: {res['profile']['calibration']}.", ""]
    return "\n".join(lines)


def check_grid_args(args) -> None:
    """UserError for a value the run reached only after the model was loaded and calibrated (minutes): a budget
    that is no size, fewer than one repetition or new token (a traceback from an empty median), a tolerance that
    is not a positive share, a --date that is no file name piece (it named a path outside --out), an --out that
    cannot be a folder (a traceback when the results were written)."""
    from ..cli.args import at_least
    from ..config import parse_size
    from ..paths import output_dir
    for b in args.budgets:
        parse_size(b, total=1 << 62, what="--budgets entry")
    at_least(args.reps, 1, "--reps")
    at_least(args.new_tokens, 1, "--new-tokens")
    if not 0 < args.tolerance < float("inf"):
        raise UserError(f"--tolerance {args.tolerance} is not a positive share", "give e.g. --tolerance 0.15")
    if not args.date or os.sep in args.date or (os.altsep and os.altsep in args.date) or args.date in (".", ".."):
        raise UserError(f"--date {args.date!r} is not part of a file name", "give a date such as 2026-12-08")
    output_dir(args.out, "--out", force=True, inputs={"--model": args.model, "--calibrated-on": args.calibrated_on})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vismmoe.bench.profiles", description=__doc__.splitlines()[0])
    p.add_argument("--validate", action="store_true", help="predict, run for real, compare")
    p.add_argument("--profile", default="cpu-local", help="profile to validate (default cpu-local)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--policy", default="lru")
    p.add_argument("--prefetch", default="none")
    p.add_argument("--budgets", nargs="+", default=["25%", "100%"])
    p.add_argument("--sizes", nargs="+", type=int, default=[224, 448])
    p.add_argument("--calibrate-sizes", nargs="+", type=int, default=None,
                   help="image sides of the held-out calibration request and of more prefills (at most six in "
                        "all; none may give as many image tokens as a size of --sizes; default 160 320 384)")
    p.add_argument("--calibrated-on", default=None, metavar="FILE",
                   help="predict with the efficiencies and costs another machine's validation fitted (its "
                        ".profile.json) on --profile's peaks and rates, instead of calibrating here: one real "
                        "machine predicted from another (e.g. the H100 from the H200's fit)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument("--out", default="docs/results/profiles")
    args = p.parse_args(argv)
    try:
        if not args.validate:
            raise UserError("nothing to do", "add --validate")
        if args.calibrated_on is not None and args.calibrate_sizes is not None:
            raise UserError("--calibrate-sizes and --calibrated-on: with another machine's fit nothing is "
                            "calibrated here", "give one of them")
        if args.calibrate_sizes is None:
            args.calibrate_sizes = [] if args.calibrated_on is not None else [160, 320, 384]
        if not (1 if args.calibrated_on is None else 0) <= len(args.calibrate_sizes) <= 6 or \
                min(args.calibrate_sizes + args.sizes) < 32:
            raise UserError(f"--calibrate-sizes {args.calibrate_sizes} / --sizes {args.sizes}: image sides must be "
                            "at least 32 px, one to six calibration sizes",
                            "e.g. --calibrate-sizes 160 256 320 384 416")
        if set(args.calibrate_sizes) & set(args.sizes):
            raise UserError(f"--calibrate-sizes {args.calibrate_sizes} overlap --sizes {args.sizes}",
                            "calibrate on sizes held out from the validated ones")
        check_grid_args(args)
        res = validate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = res.pop("stem")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
