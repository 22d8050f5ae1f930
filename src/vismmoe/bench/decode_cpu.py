"""The decode paths side by side on the CPU (which one `--decode auto` should pick there), in ONE process:

    python -m vismmoe.bench.decode_cpu [--budget 25%] [--limit 6] [--reps 3] [--systems eager,fast,...]
        [--out FILE.json]

    eager          transformers' forward per token through the runtime (the default on the CPU)
    fast           the fast step without graphs: static KV, experts through the slot map (fast_step.py)
    fast+compile   the same with torch.compile'd decoder layers; its first request's time (the compile) is
                   reported apart, and depends on whether inductor's on-disk cache is warm
    eager+cpu      the eager step with --cpu-experts on: misses computed from the host store, not copied into
                   slots, by the kernel VISMMOE_CPU_KERNEL picks (not run unless named in --systems)
    eager+cpu-torch, eager+cpu-native
                   the same with the CPU expert kernel named (cpu/executor.py), to compare the two in one process
    fast+cpu, fast+compile+cpu
                   the fast step with --cpu-experts on: every step split, misses computed by the executor
                   between its MoE layers (step/split_step.py)
    native         --decode native: the fast step's books, the whole step in C (cpu/native/decoder.py)
    native+cpu     the same with --cpu-experts on: misses read in place from the host store, nothing copied
A system named `NAME@FORMAT` (`native@bf16`, `native+cpu@bf16`) runs NAME on an engine whose experts are stored in
expert format FORMAT (`--expert-format`; formats/), beside the default format's systems.
`--ignore-eos` makes every request produce --new-tokens tokens (the trained model's answers end after one or two,
so without it a request's decode is its first step, setup included).
Bundled model (trained routing), test scenes, every request on a cold cache, systems interleaved per repetition;
the median over requests of time per output token, then the median over repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from ..checkpoints import default_model
from ..data import balanced_subset
from ..engine.loading import load
from ..engine.request import GenerationRequest
from ..errors import UserError
from ..formats import make_format, names as format_names
from .output import emit

SYSTEMS = ("eager", "fast", "fast+compile", "eager+cpu", "eager+cpu-torch", "eager+cpu-native", "fast+cpu",
           "fast+compile+cpu", "native", "native+cpu")


def _with_kernel(eng, kernel: str):
    """`eng` (with CPU experts) computing them with the CPU expert kernel `kernel` (torch or native)."""
    from ..cpu.executor import CpuExecutor
    eng.runtime.cpu.executor = CpuExecutor(eng.runtime.cpu.layout, kernel=kernel)
    return eng


def _refuse(what: str):
    """A bad argument: one line on stderr, exit status 2, before any model is loaded."""
    sys.stderr.write(f"vismmoe: error: {what}\n")
    raise SystemExit(2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--systems", default="eager,fast,fast+compile", help="comma-separated, of " + ", ".join(SYSTEMS) +
                    "; NAME@FORMAT runs NAME with its experts stored in expert format FORMAT (native@bf16)")
    ap.add_argument("--ignore-eos", action="store_true", help="every request makes exactly --new-tokens tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = [x.strip() for x in args.systems.split(",") if x.strip()]
    model, routing = default_model()
    samples = balanced_subset("test", args.limit)
    bases: dict[str | None, object] = {}

    def base(fmt):                      # one eager engine per expert format; the systems are its forks
        if fmt not in bases:
            bases[fmt] = load(model, decode="eager", expert_budget=args.budget, expert_format=fmt)
        return bases[fmt]

    def make(name: str, fmt):
        kw = dict(expert_budget=args.budget, expert_format=fmt)
        return {"eager": lambda: base(fmt), "fast": lambda: base(fmt).fork(decode="fast"),
                "fast+compile": lambda: load(model, decode="fast", compile=True, **kw),
                "eager+cpu": lambda: base(fmt).fork(cpu_experts="on"),
                "eager+cpu-torch": lambda: _with_kernel(base(fmt).fork(cpu_experts="on"), "torch"),
                "eager+cpu-native": lambda: _with_kernel(base(fmt).fork(cpu_experts="on"), "native"),
                "fast+cpu": lambda: base(fmt).fork(decode="fast", cpu_experts="on"),
                "fast+compile+cpu": lambda: load(model, decode="fast", compile=True, cpu_experts="on", **kw),
                "native": lambda: base(fmt).fork(decode="native"),
                "native+cpu": lambda: base(fmt).fork(decode="native", cpu_experts="on")}.get(name)

    parsed = {n: (n.partition("@")[0], n.partition("@")[2] if "@" in n else None) for n in names}
    unknown = [n for n, (b, _) in parsed.items() if make(b, None) is None]
    if unknown or not names:
        _refuse(f"--systems: unknown {', '.join(unknown) or '(none given)'}; use some of "
                f"{', '.join(SYSTEMS)}, each optionally @FORMAT")
    for n, (_, fmt) in parsed.items():
        if fmt is not None:
            try:
                make_format(fmt or "?", 1024, 1024, None)       # its name and knobs (sizes are checked at load)
            except UserError as e:
                _refuse(f"--systems {n}: {e.what}; after @ name one of {', '.join(format_names())} (one knob at "
                        "most: commas separate systems)")
    engines = {name: make(*parsed[name])() for name in names}
    load_before = list(os.getloadavg())
    first_s = {}
    def run(eng, s):
        req = GenerationRequest.from_prompt(s.image, s.question, max_new_tokens=args.new_tokens)
        req.ignore_eos = args.ignore_eos
        eng.generate_requests([req])
        return req.stats["tpot_s"]

    for name, eng in engines.items():                       # warm-up; the compiled one compiles here
        t = time.perf_counter()
        run(eng, samples[0])
        first_s[name] = time.perf_counter() - t
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.reps):
        for name, eng in engines.items():
            tpot = []
            for s in samples:
                eng.cache.clear()
                tpot.append(run(eng, s))
            runs[name].append(statistics.median(tpot))
    res = {"model": model, "routing": routing, "machine": f"CPU, {os.cpu_count()} cores, torch threads "
           f"{torch.get_num_threads()}", "load_before": load_before, "load_after": list(os.getloadavg()),
           "budget": args.budget, "formats": {k: e.layout.spec() for k, e in engines.items()},
           "requests": args.limit, "reps": args.reps, "new_tokens": args.new_tokens,
           "ignore_eos": args.ignore_eos,
           "cpu_kernels": {k: e.runtime.cpu.executor.kernel_key for k, e in engines.items() if e.runtime.cpu},
           "first_request_s": first_s,
           "tpot_ms": {k: statistics.median(v) * 1e3 for k, v in runs.items()},
           "tpot_ms_per_rep": {k: [x * 1e3 for x in v] for k, v in runs.items()}}
    for k, v in res["tpot_ms"].items():
        print(f"{k:16s} {v:7.2f} ms/token   first request {first_s[k]:.1f} s")
    return emit(res, args.out)


if __name__ == "__main__":
    main()
