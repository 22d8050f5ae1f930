"""The prefill of the validation grid's prompt, timed per kernel class (HostTimer) at five image sizes on the
bundled model, every expert resident, warm cache, 9 interleaved repetitions (medians), beside each class's roofline
and operator count on the profile's clock (efficiency 1): which classes bend away from the calibration's straight
line (docs/device-profiles.md). Run from the repo root: python docs/results/profiles/class_scaling_cpu_2026-12-07.py
(writes class_scaling_cpu.json to $OUT or the current directory)."""
import os
import statistics, json
from dataclasses import replace
from vismmoe import load
from vismmoe.bench.profiles import _image, _generate, _turns, PROMPTS
from vismmoe.profiles import get_profile
from vismmoe.profiles.calibrate import HostTimer
from vismmoe.profiles.clock import attach_profile
base = load()
prof = get_profile("cpu-local")
sizes = [160, 224, 320, 384, 448]
inputs = {s: base.prepare([_image(s, s)], [PROMPTS["grid"]]) for s in sizes}
real = base.fork(expert_budget="100%")
timer = HostTimer(prof); real.clock = timer
real.warm_up(with_image=True)
for s in sizes: _generate(real, inputs[s], 1)
meas = {s: [] for s in sizes}; ttft = {s: [] for s in sizes}
for _, i in _turns(len(sizes), 9):
    s = sizes[i]
    timer.split.clear()
    st = _generate(real, inputs[s], 1)
    meas[s].append(dict(timer.split)); ttft[s].append(st["ttft_s"])
bare = replace(prof, efficiency={k: 1.0 for k in prof.efficiency} | {"other": 1.0}, op_s=0.0, miss_s=0.0)
emu = base.fork(expert_budget="100%"); clock = attach_profile(emu, bare); emu.clock = clock
counts = {}
for s in sizes:
    _generate(emu, inputs[s], 1); clock.counts.clear(); _generate(emu, inputs[s], 1)
    counts[s] = {k: list(v) for k, v in clock.counts.items()}
out = {}
for s in sizes:
    m = {k: statistics.median(d.get(k, 0) for d in meas[s]) for k in set().union(*meas[s])}
    out[s] = {"ttft_ms": round(statistics.median(ttft[s]) * 1e3, 1), "spans_ms": round(sum(m.values()) * 1e3, 1),
              "class_ms": {k: round(v * 1e3, 2) for k, v in sorted(m.items())},
              "roof_ms": {k: round(bare.span_seconds(k, c[0], c[1], 0, clock.dtype) * 1e3, 3) for k, c in counts[s].items()},
              "ops": {k: c[2] for k, c in counts[s].items()}}
    print(s, json.dumps(out[s]))
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "class_scaling_cpu.json"), "w"), indent=1)
