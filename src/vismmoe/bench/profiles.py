"""Validation of device profiles before use: predict a real machine from its profile on the virtual device clock
(profiles/clock.py), run the same requests for real on it, and compare time to first token, decode time per token
and end to end at 2 expert budgets x 2 image sizes.

    python -m vismmoe.bench.profiles --validate --profile cpu-local --out docs/results/profiles
    python -m vismmoe.bench.profiles --validate --device cuda --profile h100 --out docs/results/profiles

Calibration (held out from the grid): one request at its own image size (160 px) and prompt, at the full budget.
Its real seconds per kernel class (HostTimer; on a GPU synchronised at span ends) less the profile's roofline
for what the class did give the class's cost per dispatched operator (`op_s`); the profile written next to the
results is the calibrated one. Then per grid cell: a fork on the real clock and a fork on the profile's clock,
each warmed up, `--reps` requests each, medians compared. Writes JSON + markdown; exit 1 when a cell is off by
more than `--tolerance`.
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


def _run(eng, size: int, prompt: str, reps: int, new_tokens: int) -> dict:
    inputs = eng.prepare([_image(size, 0)], [prompt])
    eng.warm_up(with_image=True)
    runs = []
    for _ in range(reps):
        eng.cache.clear()
        _, stats = eng.generate_ids(inputs, new_tokens)
        runs.append(stats)
    out = {k: statistics.median(r[k] for r in runs) for k, _ in METRICS}
    out.update(new_tokens=runs[0]["new_tokens"], visual_tokens=runs[0]["visual_tokens"],
               misses=runs[0]["misses"], time_source=runs[0]["time_source"])
    return out


def calibrate(base, profile, size: int, new_tokens: int, reps: int):
    """`profile` with per-class operator costs fitted on a held-out request (see the module docstring)."""
    from ..profiles.calibrate import HostTimer
    from ..profiles.clock import _install_hooks, attach_profile
    import torch
    real = base.fork(expert_budget="100%")
    sync = (lambda: torch.cuda.synchronize(real.device)) if real.device.type == "cuda" else None
    timer = HostTimer(profile, sync)
    real.clock = timer
    _install_hooks(real)
    inputs = real.prepare([_image(size, 1)], [PROMPTS["calibrate"]])
    real.warm_up(with_image=True)
    for _ in range(reps):
        timer.split.clear()
        real.cache.clear()
        real.generate_ids(inputs, new_tokens)
    measured = dict(timer.split)
    emu = base.fork(expert_budget="100%")
    clock = attach_profile(emu, profile)
    emu.clock = clock
    emu.cache.clear()
    clock.counts.clear()
    emu.generate_ids(inputs, new_tokens)
    op_s = {}
    for kind, (flops, nbytes, ops) in clock.counts.items():
        roof = replace(profile, op_s=0.0).span_seconds(kind, flops, nbytes, 0, clock.dtype)
        op_s[kind] = max(measured.get(kind, 0.0) - roof, 0.0) / max(ops, 1)
    how = (f"op_s per kernel class fitted on a held-out request ({size} px image, '{PROMPTS['calibrate']}', "
           f"{new_tokens} new tokens, full budget, last of {reps}): (measured class seconds - roofline) / operators")
    cal = replace(profile, op_s=op_s, calibration=how,
                  sources=dict(profile.sources, op_s=how + " by python -m vismmoe.bench.profiles"))
    return cal, {"measured_s": measured, "counts": {k: list(v) for k, v in clock.counts.items()}, "op_s": op_s}


def validate(args) -> dict:
    from .. import load
    from ..profiles import get_profile, save_profile
    base = load(args.model, device=args.device, dtype=args.dtype, policy=args.policy, prefetch=args.prefetch,
                decode="eager", check_weights="off")
    profile = get_profile(args.profile)
    cal, fit = calibrate(base, profile, 160, args.new_tokens, args.reps)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{cal.name}-{args.date}")
    save_profile(cal, stem + ".profile.json")
    rows = []
    for budget in args.budgets:
        for size in args.sizes:
            real = _run(base.fork(expert_budget=budget), size, PROMPTS["grid"], args.reps, args.new_tokens)
            pred = _run(base.fork(expert_budget=budget, device_profile=stem + ".profile.json"), size,
                        PROMPTS["grid"], args.reps, args.new_tokens)
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
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument("--out", default="docs/results/profiles")
    args = p.parse_args(argv)
    try:
        if not args.validate:
            raise UserError("nothing to do", "add --validate")
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
