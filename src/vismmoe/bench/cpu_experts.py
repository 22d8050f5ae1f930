"""Fetch-only against CPU experts against every expert resident, on a random-weight shape, in ONE process:

    python -m vismmoe.bench.cpu_experts [--shape qwen3-30b-a3b-L4] [--layers N] [--policy P]
        [--budgets 5%,10%,25%] [--decode auto|eager]
        [--device cuda] [--reps 3] [--new-tokens 32] [--prompt-tokens 512 | --image-side 768] [--out FILE.json]

Systems per budget B (the same host store, non-expert weights and request; cold cache per request):
    fetch@B     --cpu-experts off: every miss is copied (or, on the fast step, read over the link by its kernel)
    auto@B      --cpu-experts auto: each miss computed on the CPU or fetched, as the cost model over this
                machine's cached rates says (cpu/placement.py); on the fast step, a step splits at each MoE layer
                when the split rule expects misses enough (step/split_step.py)
    on@B        --cpu-experts on (with --with-on): every miss on the CPU, every fast step split
    split@B     --cpu-experts auto with every fast step split (with --with-split): what splitting buys where the
                placement shares each layer's misses between CPU and link, whatever the split rule would say
then resident (every expert preloaded). Systems of one budget share one slot pool and run interleaved, repetition
by repetition; each row is the median over repetitions of TTFT and decode time per token, with misses, experts
the CPU computed, the CPU's busy time and the split steps. `--decode eager` puts the decode on eager layer calls.
The rates the placement used are printed and saved with the rows.
"""

from __future__ import annotations

import argparse
import gc
import sys
import statistics
import time

import torch

from ..config import runtime_options
from ..cpu.rates import rates_for
from ..errors import UserError
from ..families import get_family
from ..formats import make_format
from .output import emit
from .random_model import random_engine, synthetic_inputs, synthetic_text_inputs
from .shapes import get_shape


def _split_counts(eng) -> tuple[int, int, int]:
    """The fast step's split steps so far (step/split_step.py), and the misses they computed on the CPU and over
    the link."""
    sp = getattr(eng.fast_step(), "split", None)
    return (sp.steps, sp.cpu_experts, sp.link_experts) if sp is not None else (0, 0, 0)


def _run(eng, inputs, new_tokens: int) -> dict:
    if eng.cache.num_slots < len(eng.geometry.moe_layers) * eng.geometry.num_experts:
        eng.cache.clear()                   # cold per request; the resident row keeps its preloaded experts
    before = _split_counts(eng)
    _, st = eng.generate_ids(inputs, new_tokens)
    row = {k: st[k] for k in ("ttft_s", "tpot_s", "misses", "hits", "cpu_computed", "cpu_pairs", "cpu_busy_s")}
    row.update(zip(("split_steps", "split_cpu_experts", "split_link_experts"),
                   (a - b for a, b in zip(_split_counts(eng), before))))
    return row


def _rows(systems: dict, inputs, args) -> list[dict]:
    for eng in systems.values():                      # warm-up: kernels, allocations, graphs
        _run(eng, inputs, 2)
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(args.reps):
        for name, eng in systems.items():
            runs[name].append(_run(eng, inputs, args.new_tokens))
    rows = []
    for name, rs in runs.items():
        row = {"system": name}
        for k in rs[0]:
            row[k] = statistics.median(r[k] for r in rs)
        row["tpot_ms_per_rep"] = [r["tpot_s"] * 1e3 for r in rs]
        rows.append(row)
        print(f"{name:12s} ttft {row['ttft_s'] * 1e3:9.1f} ms  decode {row['tpot_s'] * 1e3:8.2f} ms/token  "
              f"misses {row['misses']:7.0f}  cpu experts {row['cpu_computed']:7.0f}  split steps "
              f"{row['split_steps']:4.0f}", flush=True)
    return rows


def main(argv=None) -> dict | int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b-L4")
    ap.add_argument("--layers", type=int, default=None, help="the shape's first N decoder layers only")
    ap.add_argument("--policy", default=None, help="cache policy of every system (default: the runtime's)")
    ap.add_argument("--budgets", default="5%,10%,25%")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode", default="auto", choices=["auto", "fast", "eager"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="text-only shapes: prompt length")
    ap.add_argument("--image-side", type=int, default=768, help="vision shapes: the image's side in pixels")
    ap.add_argument("--with-on", action="store_true", help="also run --cpu-experts on")
    ap.add_argument("--with-split", action="store_true", help="also run auto with every fast step split")
    ap.add_argument("--no-resident", action="store_true", help="skip the every-expert-resident row (memory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:                                    # a bad value: one line and exit 2, before anything is built
        if args.layers is not None and args.layers < 1:
            raise UserError(f"--layers {args.layers}", "give at least 1")
        if args.policy is not None:
            runtime_options(policy=args.policy)     # the runtime's own check of a policy
        fam, config = get_shape(args.shape, args.layers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t = time.perf_counter()
    geo = get_family(fam).geometry(config)
    least = geo.top_k * make_format("dense", geo.hidden, geo.inter, dtype).nbytes     # the smallest legal pool
    extra = {"policy": args.policy} if args.policy else {}
    base = random_engine(fam, config, device=args.device, dtype=dtype, expert_budget=str(least),
                         decode=args.decode, **extra)
    build_s = time.perf_counter() - t
    inputs = (synthetic_inputs(base, args.image_side) if base.family.has_vision
              else synthetic_text_inputs(base, args.prompt_tokens))
    rates = rates_for(dev, base.layout)
    res = {"shape": args.shape, "layers": args.layers, "policy": base.rc.policy,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "cpu": rates.machine, "decode": args.decode, "reps": args.reps, "new_tokens": args.new_tokens,
           "prompt_tokens": int(inputs["input_ids"].shape[1]), "expert_bytes": base.layout.nbytes,
           "build_s": build_s, "rates": {"link_gbps": rates.link_gbps, "handoff_s": rates.handoff_s,
                                         "cpu": rates.summary(base.layout)},
           "torch_threads": torch.get_num_threads(), "rows": []}
    print(f"{args.shape} on {res['device']}, expert {base.layout.nbytes / 2**20:.1f} MiB, link "
          f"{rates.link_gbps:.1f} GB/s; CPU per expert: " +
          ", ".join(f"{r['tokens']} tok {r['ms']:.2f} ms" for r in res["rates"]["cpu"]), flush=True)
    for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
        fetch = base.fork(expert_budget=budget)
        systems = {f"fetch@{budget}": fetch, f"auto@{budget}": fetch.fork(cpu_experts="auto", share_pool=True)}
        if args.with_on:
            systems[f"on@{budget}"] = fetch.fork(cpu_experts="on", share_pool=True)
        if args.with_split:
            systems[f"split@{budget}"] = split = fetch.fork(cpu_experts="auto", share_pool=True)
            sp = getattr(split.fast_step(), "split", None)
            if sp is not None:                  # (no split step: eager decode, the disk tier)
                sp.rule.always = True
        res["rows"] += [dict(r, budget=budget) for r in _rows(systems, inputs, args)]
        for eng in systems.values():
            if eng.runtime.cpu is not None:
                eng.runtime.cpu.close()
        del systems, fetch
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_resident:
        resident = base.fork(expert_budget="100%")
        resident.runtime.preload([(l, e) for l in resident.geometry.moe_layers
                                  for e in range(resident.geometry.num_experts)])
        res["rows"] += [dict(r, budget="100%") for r in _rows({"resident": resident}, inputs, args)]
    return emit(res, args.out)


if __name__ == "__main__":
    sys.exit(2 if main() == 2 else 0)
