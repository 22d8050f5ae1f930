"""The CPU expert kernels side by side: seconds per expert, torch against native, per format and token count.

    python -m vismmoe.bench.cpu_kernels --out DIR [--shapes qwen3-30b-a3b,bundled]
        [--formats dense,dense@bfloat16,fp8,int4] [--tokens 1,2,4,8] [--reps 7] [--budget-mib 96] [--group 8]

For each (shape, format): random experts, about --budget-mib of blobs in all (so the weights come from memory, not
from the caches, as misses do; at least 2 experts), one executor per kernel (cpu/executor.py, `kernel=torch` and
`kernel=native`). A timing is one pass over every expert at t tokens (routing weights applied); the two kernels
alternate, repetition by repetition (interleaved, so both see the same machine state), and each row reports the
median seconds per expert, GB/s of expert bytes, native's speed-up, and the largest difference between the two
outputs relative to the largest output. A third timing, interleaved with them, hands the native kernel --group
experts at once (`CpuExecutor.pairs`: one call for a layer call's experts, every token routed to each of them,
as a decode step's top-k) against one call an expert (`native_group_ms`, `group_speedup`).

Shapes: a name of bench/shapes.py (its family's expert geometry) or `bundled` (the bundled model's). Formats: an
expert format spec (`int4:group=64,sym=0`), `@dtype` for the activation dtype (dense experts are stored in it;
default float32). Writes DIR/cpu_kernels.json (rows, machine, native build, load average before and after) and
DIR/cpu_kernels.md (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from ..errors import UserError

FILES = ("cpu_kernels.json", "cpu_kernels.md")


def _geometry(shape: str) -> tuple[int, int]:
    """(hidden, expert intermediate) of a named shape or of the bundled model."""
    from ..families import get_family
    if shape == "bundled":
        from transformers import AutoConfig

        from ..checkpoints import default_model
        config = AutoConfig.from_pretrained(default_model()[0])
        fam = config.model_type
    else:
        from .shapes import get_shape
        fam, config = get_shape(shape)
    geo = get_family(fam).geometry(config)
    return geo.hidden, geo.inter


def _layout(item: str, H: int, I: int):
    from ..formats import make_format
    spec, _, dtype = item.partition("@")
    dt = getattr(torch, dtype or "float32", None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise UserError(f"--formats {item}: {dtype!r} is not a float dtype", "write e.g. dense@bfloat16")
    return make_format(spec, H, I, dt)


def _blobs(layout, budget: int) -> torch.Tensor:
    from ..cpu.rates import random_blobs
    return random_blobs(layout, max(2, min(256, budget // layout.nbytes)))


def measure(layout, tokens: list[int], reps: int, budget: int, group: int = 8) -> list[dict]:
    """Rows of one layout: per token count, both kernels' median seconds per expert, and the native kernel's with
    `group` experts a call (interleaved)."""
    from ..cpu.executor import CpuExecutor
    blobs = _blobs(layout, budget)
    n = blobs.shape[0]
    group = min(group, n)
    chunks = [list(range(i, min(i + group, n))) for i in range(0, n, group)]
    execs = {"torch": CpuExecutor(layout, kernel="torch"), "native": CpuExecutor(layout, kernel="native")}
    if execs["native"].native is None:
        raise UserError("the native CPU expert kernel could not be built here", "install a C compiler (gcc)")
    g = torch.Generator().manual_seed(1)
    rows = []
    for t in tokens:
        x = torch.randn(t, layout.hidden, generator=g).to(layout.dtype)
        w = torch.rand(t, generator=g)
        nat = execs["native"]

        def grouped():
            for ch in chunks:                               # every token routed to each expert of the chunk
                idx = np.tile(np.arange(len(ch)), (t, 1))
                nat.pairs(lambda e: blobs[ch[e]], x, idx, w[:, None].expand(t, len(ch)), list(range(len(ch))))
        outs = {k: ex.expert(blobs[0], x, w) for k, ex in execs.items()}       # warm-up, and the outputs
        grouped()
        times: dict[str, list[float]] = {k: [] for k in (*execs, "group")}
        for _ in range(reps):
            for k, ex in execs.items():
                t0 = time.perf_counter()
                for i in range(n):
                    ex.expert(blobs[i], x, w)
                times[k].append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            grouped()
            times["group"].append((time.perf_counter() - t0) / n)
        s = {k: statistics.median(v) for k, v in times.items()}
        diff = ((outs["native"] - outs["torch"]).abs().max() / outs["torch"].abs().max().clamp_min(1e-30)).item()
        rows.append({"tokens": t, "experts": n, "expert_bytes": layout.nbytes,
                     "torch_ms": s["torch"] * 1e3, "native_ms": s["native"] * 1e3,
                     "torch_gbps": layout.nbytes / s["torch"] / 1e9, "native_gbps": layout.nbytes / s["native"] / 1e9,
                     "speedup": s["torch"] / s["native"], "max_rel_diff": diff,
                     "group": group, "native_group_ms": s["group"] * 1e3,
                     "native_group_gbps": layout.nbytes / s["group"] / 1e9, "group_speedup": s["native"] / s["group"],
                     "torch_ms_per_rep": [x * 1e3 for x in times["torch"]],
                     "native_ms_per_rep": [x * 1e3 for x in times["native"]]})
    return rows


def _machine() -> dict:
    from ..cpu import native
    from ..cpu.rates import _cpu_model
    lib = native.kernel()
    cc = native.compiler()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(),
            "native": None if lib is None else {"library": lib.path, "source": lib.source, **lib.info,
                                                "compiler": native._compiler_version(cc) if cc else None}}


def table(res: dict) -> str:
    lines = ["| shape | format | tokens | torch ms | native ms | native GB/s | speed-up | native ms, group a call | "
             "group GB/s | group speed-up | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} ({r['hidden']}x{r['inter']}) | {r['format']} | {r['tokens']} | "
                     f"{r['torch_ms']:.3f} | {r['native_ms']:.3f} | {r['native_gbps']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['native_group_ms']:.3f} ({r['group']}) | "
                     f"{r['native_group_gbps']:.1f} | {r['group_speedup']:.2f}x | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def _main(args) -> int:
    from ..paths import output_dir
    output_dir(args.out, "--out", owned=FILES)
    try:
        tokens = [int(x) for x in args.tokens.split(",") if x.strip()]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        raise UserError(f"--tokens {args.tokens!r}: give comma-separated token counts of at least 1", "e.g. 1,2,4,8")
    if args.reps < 1 or args.budget_mib < 1 or args.group < 1:
        raise UserError("--reps, --budget-mib and --group must be at least 1", "e.g. --reps 7 --budget-mib 96 --group 8")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not shapes or not formats:
        raise UserError("--shapes and --formats name at least one each", "e.g. --shapes bundled --formats dense")
    plan = []
    for shape in shapes:
        H, I = _geometry(shape)
        plan += [(shape, H, I, item, _layout(item, H, I)) for item in formats]      # every refusal before work
    res = {"command": args.command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": _machine(),
           "load_before": list(os.getloadavg()), "reps": args.reps, "rows": []}
    for shape, H, I, item, layout in plan:
        for row in measure(layout, tokens, args.reps, args.budget_mib << 20, args.group):
            res["rows"].append({"shape": shape, "hidden": H, "inter": I, "format": item, **row})
            r = res["rows"][-1]
            print(f"{shape} {item} t={r['tokens']}: torch {r['torch_ms']:.3f} ms, native {r['native_ms']:.3f} ms "
                  f"({r['speedup']:.2f}x), native {r['group']} a call {r['native_group_ms']:.3f} ms "
                  f"({r['group_speedup']:.2f}x)", flush=True)
    res["load_after"] = list(os.getloadavg())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, FILES[0]), "w") as f:
        json.dump(res, f, indent=1)
    md = table(res)
    with open(os.path.join(args.out, FILES[1]), "w") as f:
        f.write(f"{res['date']}, {res['machine']['cpu']}, {res['machine']['cores']} cores, torch "
                f"{res['machine']['torch_threads']} threads, load average {res['load_before'][0]:.1f} before / "
                f"{res['load_after'][0]:.1f} after\n\n    {args.command}\n\n{md}\n")
    print(md)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vismmoe.bench.cpu_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="DIR", help="folder for cpu_kernels.json and cpu_kernels.md")
    p.add_argument("--shapes", default="qwen3-30b-a3b,bundled", help="comma-separated: bench shapes or 'bundled'")
    p.add_argument("--formats", default="dense,dense@bfloat16,fp8,int4",
                   help="comma-separated expert format specs, each with an optional @dtype (default float32)")
    p.add_argument("--tokens", default="1,2,4,8", help="comma-separated tokens per expert")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--budget-mib", type=int, default=96, help="MiB of expert blobs each timing passes over")
    p.add_argument("--group", type=int, default=8, help="experts per native call in the grouped timing (top-k)")
    args = p.parse_args(argv)
    args.command = "python -m vismmoe.bench.cpu_kernels " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        return _main(args)
    except UserError as e:
        sys.stderr.write(f"vismmoe: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
