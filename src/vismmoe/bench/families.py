"""Every family's published shape on the fast decode step against its eager step and the HBM roofline:

    python -m vismmoe.bench.families --layers 8 --out DIR

For each shape in --shapes (default: one published shape per family; several: each in a process of its own, so one
shape's device memory never limits the next), random weights, cut to --layers decoder layers (--layers 999: all of them;
the per-layer step is what is compared; the roofline counts the same layers): every expert resident, one request (a
--side px image and 24 text tokens; text-only families: --prompt-tokens random ids), --new-tokens teacher-forced random
tokens, decode ms/token of the fast step (static KV, compiled layers, one CUDA graph a token) and of the eager step
(transformers' forward per token) on the same slot pool, interleaved, medians over --reps; the roofline is the bytes one
decode token must read (bench/step_ceiling.step_bytes) over the HBM bandwidth measured here with a bf16 GEMV. A family
the fast step refuses gets a row saying why. --unfused also times the fast step without its fused kernels
(`--fuse-kernels off`: projections separate, transformers' router tail; the fast row fuses them,
step/fused_proj.py and router_topk.py) in the same turns on the same pool. Writes
families.json and families.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .kernel_profile import kernel_times
from .random_model import random_engine, synthetic_inputs, synthetic_text_inputs
from .shapes import get_shape
from .step_ceiling import hbm_gbps, step_bytes

SHAPES = ("qwen3-vl-30b-a3b", "qwen3-30b-a3b", "qwen3.5-35b-a3b", "internvl3.5-30b-a3b", "deepseek-ocr2",
          "gemma4-26b-a4b", "ernie4.5-vl-28b-a3b")


def _one(shape: str, layers: int, side: int, prompt_tokens: int, new_tokens: int, reps: int, hbm: float,
         say, kernels: int = 0, unfused: bool = False) -> dict:
    from ..step.fast_step import unsupported_reason
    from ..families import get_family
    fam, config = get_shape(shape, layers)
    tc = get_family(fam).text_config(config)
    t0 = time.perf_counter()
    base = random_engine(fam, config, device="cuda", expert_budget="100%", policy="lru", decode="fast")
    row = {"shape": shape, "family": fam, "layers": tc.num_hidden_layers,
           "moe_layers": len(base.geometry.moe_layers), "build_s": time.perf_counter() - t0}
    why = unsupported_reason(base)
    row["step_bytes"] = step_bytes(base)
    row["hbm_GBps"] = hbm                               # measured in this process (a GEMV over 1 GiB)
    row["roofline_ms"] = row["step_bytes"] / (hbm * 1e9) * 1e3
    keys = [(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)]
    base.runtime.preload(keys)
    eager = base.fork(decode="eager", share_pool=True)
    eager.runtime.preload(keys)
    systems = {"eager": eager} if why else {"fast": base, "eager": eager}
    if unfused and not why:
        systems["fast_unfused"] = base.fork(fuse_kernels=False, share_pool=True)
        systems["fast_unfused"].runtime.preload(keys)     # its own books of the shared pool: the same slots
    if why:
        row["fast_refused"] = why
    inputs = (synthetic_inputs(base, side) if base.family.has_vision else synthetic_text_inputs(base, prompt_tokens))
    g = torch.Generator().manual_seed(1234)
    vocab = min(100000, base.family.text_config(base.config).vocab_size)
    teacher = torch.randint(min(1000, vocab // 4), vocab, (new_tokens + 1,), generator=g).tolist()
    toks = {}
    for name, eng in systems.items():                 # warm-up: compile + capture, allocations
        t = time.perf_counter()
        eng.generate_ids(inputs, new_tokens, teacher_tokens=teacher)
        row[f"{name}_warmup_s"] = time.perf_counter() - t
    tpot: dict = {n: [] for n in systems}
    for _ in range(reps):
        for name, eng in systems.items():
            out, st = eng.generate_ids(inputs, new_tokens, teacher_tokens=teacher)
            tpot[name].append(st["tpot_s"])
            toks.setdefault(name, out[0])
    for name in systems:
        row[f"{name}_tpot_ms"] = statistics.median(tpot[name]) * 1e3
    if "fast" in systems:
        row["fast_over_eager"] = row["eager_tpot_ms"] / row["fast_tpot_ms"]
        row["fast_over_roofline"] = row["fast_tpot_ms"] / row["roofline_ms"]
        row["same_tokens"] = toks["fast"] == toks["eager"]
        if "fast_unfused" in systems:
            row["fused_speedup"] = row["fast_unfused_tpot_ms"] / row["fast_tpot_ms"]
            row["same_tokens_unfused"] = toks["fast"] == toks["fast_unfused"]
        if kernels:                                   # where the fast step's device time goes, kernel by kernel
            ks = kernel_times(base, inputs, teacher, max(1, min(16, new_tokens // 2)))
            row["kernel_us_per_token"] = sum(k["us"] for k in ks)
            row["kernel_launches_per_token"] = sum(k["calls"] for k in ks)
            row["kernels"] = ks[:kernels]
    say(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    return row


def _in_child(shape: str, args) -> dict:
    """One shape measured in a process of its own: its row (with the HBM rate that process measured). In one process
    the next full-size shape ran out of device memory with the previous one's 61 GiB still allocated (gc, emptying
    torch's cache and resetting torch.compile's did not give it back), and a process gives everything back. A
    child that ends with a non-zero status has it in its row (`child_status`); one that wrote no row gets an error
    row (its folder's result is removed first, so an earlier run's row is never read back)."""
    sub = os.path.join(args.out, "shapes", shape)
    result = os.path.join(sub, "families.json")
    if os.path.exists(result):
        os.remove(result)
    cmd = [sys.executable, "-m", "vismmoe.bench.families", "--shapes", shape, "--layers", str(args.layers),
           "--side", str(args.side), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--reps", str(args.reps), "--kernels", str(args.kernels), "--out", sub] + \
        (["--unfused"] if args.unfused else [])
    rc = subprocess.run(cmd).returncode
    try:
        with open(result) as f:
            row = json.load(f)["rows"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return _error_row(shape, f"its process ended with status {rc} and wrote no result")
    return dict(row, child_status=rc) if rc else row


def _error_row(shape: str, error: str) -> dict:
    """The row of a shape that gave no measurement."""
    return {"shape": shape, "family": get_shape(shape)[0], "error": error}


def _table(res: dict) -> str:
    lines = [f"Fast vs eager decode, every expert resident ({res['machine']}, random weights, {res['layers']} "
             f"decoder layers of each shape, {res['new_tokens']} teacher-forced tokens, median of {res['reps']}), "
             f"{res['date']}", "", f"Command: `{res['command']}`", "",
             "| shape | family | eager ms/token | fast ms/token | fast / eager speedup | HBM GB/s | roofline ms "
             "| fast / roofline | unfused ms/token | fused speedup | same tokens | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f = lambda k, d=2: "" if r.get(k) is None else f"{r[k]:.{d}f}"  # noqa: E731
        lines.append(f"| {r['shape']} | {r['family']} | {f('eager_tpot_ms')} | {f('fast_tpot_ms')} | "
                     f"{f('fast_over_eager', 1)} | {f('hbm_GBps', 0)} | {f('roofline_ms', 3)} | "
                     f"{f('fast_over_roofline', 2)} | {f('fast_unfused_tpot_ms')} | {f('fused_speedup', 3)} | "
                     f"{r.get('same_tokens', '')} | {r.get('fast_refused', r.get('error', ''))} |")
    for r in res["rows"]:
        if r.get("kernels"):
            lines += ["", f"{r['shape']}: the fast step's kernels, {r['kernel_us_per_token']:.0f} us and "
                      f"{r['kernel_launches_per_token']:.0f} launches a token on the device (torch profiler)", "",
                      "| kernel | launches / token | us / token |", "|---|---|---|"]
            lines += [f"| `{k['kernel'][:90]}` | {k['calls']:.1f} | {k['us']:.1f} |" for k in r["kernels"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vismmoe.bench.families", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of each shape (default 8)")
    ap.add_argument("--side", type=int, default=448, help="image side in px (vision families)")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of text-only families")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kernels", type=int, default=0, metavar="N",
                    help="also profile each fast step kernel by kernel and keep its N slowest kernels (0: off)")
    ap.add_argument("--unfused", action="store_true",
                    help="also time the fast step without its fused kernels (--fuse-kernels off), interleaved")
    ap.add_argument("--out", default="runs/families")
    args = ap.parse_args(argv)
    if args.kernels < 0:
        print(f"error: --kernels {args.kernels}: give a count of kernels to keep, 0 or more", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    os.makedirs(args.out, exist_ok=True)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    shapes = args.shapes.split(",")
    hbm = hbm_gbps(torch.device("cuda")) if len(shapes) == 1 else None     # several: each child measures its own
    res = {"machine": torch.cuda.get_device_name(), "routing": "random weights", "layers": args.layers,
           "new_tokens": args.new_tokens, "reps": args.reps, "side": args.side,
           "date": time.strftime("%Y-%m-%d"), "rows": [],
           "command": "python -m vismmoe.bench.families " + " ".join(argv if argv is not None else sys.argv[1:])}
    if hbm is not None:
        say(f"HBM {hbm:.0f} GB/s")
    for shape in shapes:
        if len(shapes) > 1:             # one process a shape
            res["rows"].append(_in_child(shape, args))
        else:
            try:
                res["rows"].append(_one(shape, args.layers, args.side, args.prompt_tokens, args.new_tokens,
                                        args.reps, hbm, say, args.kernels, args.unfused))
            except Exception as e:      # reported in the row (and by the parent, when this is a child)
                say(f"{shape}: {type(e).__name__}: {e}")
                res["rows"].append(_error_row(shape, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        with open(os.path.join(args.out, "families.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, "families.md"), "w") as f:
            f.write(_table(res))
    say(_table(res))


if __name__ == "__main__":
    sys.exit(main())
