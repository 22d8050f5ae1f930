"""The CPU side's native kernel calls, side by side in one process: each expert of a layer call in a call of its own
(what a staged store, the disk tier, needs) against all of them in one call (host blobs), on a random-weight shape
with `--cpu-experts on`, repetitions interleaved, median decode ms/token of each.

    python scripts/cpu_experts_one_call.py SHAPE LAYERS BUDGET fast|eager [--device cpu|cuda] [--reps 5]

e.g. `python scripts/cpu_experts_one_call.py thin-48x128 16 5% fast` (host overhead per layer at the 30B routing
geometry) and `python scripts/cpu_experts_one_call.py qwen3-30b-a3b 2 5% eager` (the real expert size).
"""

import argparse
import json
import statistics
import sys

import torch

from vismmoe.bench.random_model import random_engine, synthetic_text_inputs
from vismmoe.bench.shapes import get_shape
from vismmoe.errors import UserError

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("shape")
ap.add_argument("layers", type=int)
ap.add_argument("budget")
ap.add_argument("decode", choices=["fast", "eager"])
ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--new-tokens", type=int, default=16)
args = ap.parse_args()
try:
    if args.layers < 1 or args.reps < 1 or args.new_tokens < 2:
        raise UserError("LAYERS and --reps must be at least 1, --new-tokens at least 2 (a decode step to time)",
                        "e.g. 16 --reps 5 --new-tokens 16")
    fam, config = get_shape(args.shape, args.layers)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    eng = random_engine(fam, config, device=args.device, dtype=dtype, expert_budget=args.budget,
                        decode=args.decode, cpu_experts="on")
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
inputs = synthetic_text_inputs(eng, 64)
cpu = eng.runtime.cpu
for staged in (True, False):                                # warm-up of both: the kernel, graphs, allocations
    cpu.staged = staged
    eng.generate_ids(inputs, 4)
runs: dict[str, list[float]] = {"a call per expert": [], "one call": []}
modes = (("a call per expert", True), ("one call", False))
for rep in range(args.reps):
    for name, staged in modes if rep % 2 == 0 else modes[::-1]:     # the order alternates
        cpu.staged = staged                                 # staged: the executor takes its blobs one at a time
        eng.cache.clear()
        _, st = eng.generate_ids(inputs, args.new_tokens)
        runs[name].append(st["tpot_s"] * 1e3)
med = {k: statistics.median(v) for k, v in runs.items()}
print(json.dumps({"shape": args.shape, "layers": args.layers, "budget": args.budget, "decode": args.decode,
                  "device": args.device, "torch_threads": torch.get_num_threads(), "ms_per_token": med,
                  "ratio": med["a call per expert"] / med["one call"], "runs": runs}))
