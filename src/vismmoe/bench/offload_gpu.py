"""GPU offload benchmark on a real-size shape with random weights, all systems in ONE process, interleaved.

    python -m vismmoe.bench.offload_gpu --shape qwen3-vl-30b-a3b --budget 25% --image-side 1024 --out DIR

Systems (same non-expert weights, same host expert store, same request):
  vismmoe-lru   our slot cache at `--budget`, LRU (the harness's `lru-offload` design, bench/harness.py SYSTEMS)
  ondemand      `--policy none` at the same budget: every expert loaded when needed, nothing kept (the harness's
                `ondemand`)
  resident      our runtime with every expert preloaded into its pool
  hf-resident   plain transformers, every expert on the device, grouped_mm (views of the resident pool)
  accelerate    transformers + accelerate dispatch_model, expert banks offloaded to CPU (bench/baselines)
Reported per system: prefill time (TTFT: vision tower + decoder over the image), time per decode token, bytes
moved, achieved host-to-device GB/s (bytes over copy-stream busy time), stall, hit rate; the link's own pinned
copy speed; the physical bound from a Belady cache over the recorded routing trace; the allocator check of the
budget. Writes results.json, results.md and latency.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ..config import format_size
from ..step.loop import greedy
from ..engine.budget import estimate_reserve
from ..offload.trace import RoutingTrace
from .bound import access_groups, belady_misses
from .harness import SYSTEMS, fork_system
from .random_model import random_engine, synthetic_inputs
from .shapes import get_shape


# our offloading systems here: label -> the harness's design (SYSTEMS). The labels are those of the saved results
# (docs/results/offload_gpu_*.json); "vismmoe-lru" is the harness's "lru-offload" (LRU, no prefetch, no compression)
ENGINE_SYSTEMS = {"vismmoe-lru": "lru-offload", "ondemand": "ondemand"}


def link_speed(device, nbytes: int, reps: int = 50) -> float:
    """Median host-to-device GB/s of one pinned copy of `nbytes` bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times) / 1e9


def run_engine(eng, inputs, new_tokens, cold: bool, teacher_tokens: list[int] | None = None):
    """(tokens of the first row, request stats) of one request on an engine; `cold` clears its cache first."""
    if cold:
        eng.cache.clear()
    rows, stats = eng.generate_ids(inputs, new_tokens, teacher_tokens=teacher_tokens)
    return rows[0], stats


def profile(fn, path: str) -> dict:
    """Run `fn` under the torch profiler; write the op table; return CPU vs CUDA busy time (ms)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    with open(path, "w") as f:
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=30))
        f.write("\n\n")
        f.write(avg.table(sort_by="self_device_time_total", row_limit=20))
    cpu = sum(e.self_cpu_time_total for e in avg) / 1e3
    dev = sum(getattr(e, "self_device_time_total", 0) for e in avg) / 1e3
    return {"cpu_ms": cpu, "device_ms": dev}


@torch.inference_mode()
def run_model(model, family, inputs, new_tokens, teacher_tokens: list[int] | None = None):
    """(tokens of the first row, timings) of one request on a plain transformers model (`decode.greedy`)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens, t_first, steps = greedy(model, family, inputs, new_tokens, set(), teacher_tokens=teacher_tokens)
    torch.cuda.synchronize()
    t_end = time.perf_counter()
    return tokens[0], {"ttft_s": t_first - t0, "tpot_s": (t_end - t_first) / max(steps, 1), "e2e_s": t_end - t0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-vl-30b-a3b")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--image-side", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--accel-reps", type=int, default=2)
    ap.add_argument("--accel-tokens", type=int, default=3, help="new tokens per accelerate run (about 8 s each)")
    ap.add_argument("--no-accelerate", action="store_true")
    ap.add_argument("--decode-inputs", default="random", choices=["random", "argmax"],
                    help="random: teacher-force random text tokens in decode so routing varies as on real text "
                         "(random weights repeat one token under argmax, which makes decode routing static)")
    ap.add_argument("--out", default="runs/offload_gpu")
    return ap.parse_args(argv)


def teacher_tokens_of(args) -> list[int] | None:
    """Teacher-forced decode inputs (random text tokens) for `--decode-inputs random`, else None (argmax)."""
    if args.decode_inputs != "random":
        return None
    g = torch.Generator().manual_seed(1234)
    return torch.randint(1000, 100000, (args.new_tokens + 1,), generator=g).tolist()


def _build(args, res: dict):
    """(the engine of our LRU system at `--budget`, the request's inputs): random weights of `--shape`; records
    build time, sizes, the link's pinned copy speed and the prompt's token counts in `res`."""
    dev = torch.device("cuda")
    t = time.perf_counter()
    fam_name, config = get_shape(args.shape)
    # random_engine's options beside the policy are the runtime's defaults, as in the lru-offload design
    eng = random_engine(fam_name, config, device="cuda", expert_budget=args.budget,
                        policy=SYSTEMS[ENGINE_SYSTEMS["vismmoe-lru"]].policy)
    res["build_s"] = time.perf_counter() - t
    res["expert_bytes"] = eng.layout.nbytes
    res["experts_total"] = len(eng.geometry.moe_layers) * eng.geometry.num_experts
    res["nonexpert_bytes"] = eng.nonexpert_bytes
    res["link_GBps_expert"] = link_speed(dev, eng.layout.nbytes)
    res["link_GBps_1GiB"] = link_speed(dev, 1 << 30, reps=10)
    inputs = synthetic_inputs(eng, args.image_side)
    res["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    res["visual_tokens"] = int(inputs["mm_token_type_ids"].sum())
    print(f"built in {res['build_s']:.0f}s; expert {format_size(eng.layout.nbytes)}, "
          f"{res['experts_total']} experts, link {res['link_GBps_expert']:.1f} GB/s per expert copy", flush=True)
    return eng, inputs


def _check_memory(eng, inputs, args, teacher_tokens, prompt_tokens: int) -> dict:
    """The allocator's check of the budget while only this engine's pool exists: peak allocated minus non-expert
    weights is within the expert budget plus the estimated KV/activation reserve."""
    dev = torch.device("cuda")
    run_engine(eng, inputs, 2, cold=True, teacher_tokens=teacher_tokens)                 # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_engine(eng, inputs, args.new_tokens, cold=True, teacher_tokens=teacher_tokens)
    peak = torch.cuda.max_memory_allocated()
    reserve = estimate_reserve(eng.config, eng.geometry, prompt_tokens + args.new_tokens, eng.dtype, dev)
    return {"peak_allocated": peak, "nonexpert_bytes": eng.nonexpert_bytes, "pool_bytes": eng.cache.budget_bytes,
            "budget_bytes": eng.budget_bytes, "activation_peak": peak - base, "reserve_estimate": reserve,
            "peak_minus_weights_le_budget_plus_reserve": peak - eng.nonexpert_bytes <= eng.budget_bytes + reserve}


def _systems(eng, args, res: dict) -> tuple[dict, dict]:
    """(our engines by name, transformers models by name): the offloading systems on `eng`'s pool, `resident`
    with every expert preloaded, hf-resident over its pool, and accelerate (its failure is recorded in `res`)."""
    from .baselines import accelerate_model, resident_model
    ondemand = SYSTEMS[ENGINE_SYSTEMS["ondemand"]]
    systems = {"vismmoe-lru": eng,                               # `_build` made it with its design's options
               "ondemand": fork_system(eng, ondemand, args.budget, "real", None, pool_of=eng)[0]}
    resident = eng.fork(expert_budget="100%")
    resident.runtime.preload([(l, e) for l in resident.geometry.moe_layers
                              for e in range(resident.geometry.num_experts)])
    systems["resident"] = resident
    models = {"hf-resident": resident_model(resident)}
    if not args.no_accelerate:
        try:
            models["accelerate"] = accelerate_model(eng)
        except Exception as e:                                   # recorded, not hidden
            res["accelerate_error"] = f"{type(e).__name__}: {e}"
            print("accelerate failed:", res["accelerate_error"], flush=True)
    return systems, models


def _profiles(systems: dict, models: dict, eng, inputs, out: str, teacher_tokens) -> dict:
    """CPU vs device busy time of 8-token requests: resident, hf-resident, and the offload runtime at the budget
    (cold cache: its host work per layer beside the resident runs); op tables under `out`."""
    resident = systems["resident"]
    return {
        "resident": profile(lambda: run_engine(resident, inputs, 8, cold=False, teacher_tokens=teacher_tokens),
                            os.path.join(out, "prof_resident.txt")),
        "hf-resident": profile(lambda: run_model(models["hf-resident"], eng.family, inputs, 8, teacher_tokens),
                               os.path.join(out, "prof_hf_resident.txt")),
        "offloaded": profile(lambda: run_engine(eng, inputs, 8, cold=True, teacher_tokens=teacher_tokens),
                             os.path.join(out, "prof_offloaded.txt")),
    }


def _measure(systems: dict, models: dict, family, inputs, args, teacher_tokens) -> tuple[dict, dict]:
    """(name -> stats per repetition, name -> first row's tokens): repetitions of every system in turn, our
    engines on a cold cache (resident keeps its preloaded pool), accelerate fewer times with fewer tokens."""
    runs: dict[str, list] = {k: [] for k in list(systems) + list(models)}
    tokens: dict[str, list] = {}
    for rep in range(args.reps):
        for name, e in systems.items():
            toks, st = run_engine(e, inputs, args.new_tokens, cold=name != "resident", teacher_tokens=teacher_tokens)
            runs[name].append(st)
            tokens.setdefault(name, toks)
            print(f"rep {rep} {name:12s} ttft {st['ttft_s']*1e3:8.1f} ms  tpot {st['tpot_s']*1e3:7.2f} ms  "
                  f"moved {format_size(st['bytes_moved'])}  GB/s {st['h2d_GBps'] or 0:.1f}", flush=True)
        for name, m in models.items():
            if name == "accelerate" and rep >= args.accel_reps:
                continue
            n = args.accel_tokens if name == "accelerate" else args.new_tokens
            toks, st = run_model(m, family, inputs, n, teacher_tokens)
            runs[name].append(st)
            tokens.setdefault(name, toks)
            print(f"rep {rep} {name:12s} ttft {st['ttft_s']*1e3:8.1f} ms  tpot {st['tpot_s']*1e3:7.2f} ms", flush=True)
    return runs, tokens


def _belady(resident, inputs, new_tokens: int, slots: int, teacher_tokens) -> dict:
    """Misses of a Belady cache of `slots` slots over the request's routing trace (recorded on `resident`; the same
    for every budget), in the prefill and in all."""
    trace = RoutingTrace()
    resident.record_trace(trace)
    run_engine(resident, inputs, new_tokens, cold=False, teacher_tokens=teacher_tokens)
    resident.record_trace(None)
    groups = access_groups(trace)
    prefill_groups = len(resident.geometry.moe_layers)
    return {"slots": slots, "prefill_misses": belady_misses(groups[:prefill_groups], slots),
            "total_misses": belady_misses(groups, slots)}


def _summarise(res: dict, runs: dict, tokens: dict, expert_bytes: int, new_tokens: int) -> None:
    """Into `res`: medians per system, the physical bound (compute of the faster resident system vs Belady loads
    over the link), efficiencies, token identity against `resident`, speedups of vismmoe-lru."""
    def med(name, key):
        vals = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    table = {}
    for name in runs:
        table[name] = {k: med(name, k) for k in ("ttft_s", "tpot_s", "e2e_s", "bytes_moved", "h2d_GBps", "stall_s",
                                                    "hit_rate", "copy_s")}
    link = res["link_GBps_expert"] * 1e9
    bel_prefill, bel_total = res["belady"]["prefill_misses"], res["belady"]["total_misses"]
    compute = {k: min(table[n][k] for n in ("resident", "hf-resident")) for k in ("ttft_s", "tpot_s")}
    decode_moves = (bel_total - bel_prefill) * expert_bytes / max(1, new_tokens - 1)
    res["bound"] = {
        "ttft_s": max(compute["ttft_s"], bel_prefill * expert_bytes / link),
        "tpot_s": max(compute["tpot_s"], decode_moves / link),
    }
    res["table"] = table
    same = [k for k in tokens if k != "accelerate"]
    res["tokens_identical"] = {k: tokens[k][: len(tokens["resident"])] == tokens["resident"] for k in same}
    for name in table:
        if name not in ("resident", "hf-resident"):
            table[name]["efficiency_ttft"] = res["bound"]["ttft_s"] / table[name]["ttft_s"]
            table[name]["efficiency_tpot"] = res["bound"]["tpot_s"] / table[name]["tpot_s"]
    if "accelerate" in table:
        a = table["accelerate"]
        res["speedup_vs_accelerate"] = {"ttft": a["ttft_s"] / table["vismmoe-lru"]["ttft_s"],
                                        "tpot": a["tpot_s"] / table["vismmoe-lru"]["tpot_s"]}
    res["speedup_vs_ondemand"] = {"ttft": table["ondemand"]["ttft_s"] / table["vismmoe-lru"]["ttft_s"],
                                  "tpot": table["ondemand"]["tpot_s"] / table["vismmoe-lru"]["tpot_s"]}


def main(argv=None):
    """build -> budget check -> systems -> profiles -> interleaved repetitions -> Belady bound -> results."""
    args = parse_args(argv)
    teacher_tokens = teacher_tokens_of(args)
    os.makedirs(args.out, exist_ok=True)
    res: dict = {"shape": args.shape, "routing": "random weights", "machine": torch.cuda.get_device_name(),
                 "link": "real (PCIe, pinned host memory)", "budget": args.budget, "image_side": args.image_side,
                 "new_tokens": args.new_tokens, "decode_inputs": args.decode_inputs}
    eng, inputs = _build(args, res)
    res["memory"] = _check_memory(eng, inputs, args, teacher_tokens, res["prompt_tokens"])
    print("memory", res["memory"], flush=True)
    systems, models = _systems(eng, args, res)
    for m in models.values():                                    # warm-up
        run_model(m, eng.family, inputs, 2, teacher_tokens)
    res["profile"] = _profiles(systems, models, eng, inputs, args.out, teacher_tokens)
    print("profile", res["profile"], flush=True)
    runs, tokens = _measure(systems, models, eng.family, inputs, args, teacher_tokens)
    res["belady"] = _belady(systems["resident"], inputs, args.new_tokens, eng.cache.num_slots, teacher_tokens)
    _summarise(res, runs, tokens, eng.layout.nbytes, args.new_tokens)
    _write(res, args.out)
    print(json.dumps(res))


def _write(res: dict, out: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"Shape {res['shape']} ({res['routing']}), {res['machine']}, link {res['link']} "
             f"({res['link_GBps_expert']:.1f} GB/s per pinned expert copy), expert budget {res['budget']}, one "
             f"{res['image_side']}x{res['image_side']} image ({res['visual_tokens']} visual tokens), "
             f"{res['new_tokens']} new tokens (decode inputs: {res['decode_inputs']}); medians.", "",
             "| system | prefill (TTFT) ms | decode ms/token | bytes moved | H2D GB/s | stall ms | hit rate | "
             "efficiency prefill / decode |", "|---|---|---|---|---|---|---|---|"]
    def fmt(v, scale=1e3):
        return "-" if v is None else f"{v * scale:.1f}"

    for name, r in res["table"].items():
        eff = f"{r['efficiency_ttft']:.2f} / {r['efficiency_tpot']:.2f}" if "efficiency_ttft" in r else "-"
        moved = "-" if r["bytes_moved"] is None else format_size(r["bytes_moved"])
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
        lines.append(f"| {name} | {fmt(r['ttft_s'])} | {fmt(r['tpot_s'])} | {moved} | {fmt(r['h2d_GBps'], 1)} | "
                     f"{fmt(r['stall_s'])} | {hit} | {eff} |")
    b = res["bound"]
    lines.append(f"| bound | {b['ttft_s']*1e3:.1f} | {b['tpot_s']*1e3:.1f} | Belady {res['belady']['total_misses']} "
                 f"loads | | | | |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(res["table"])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, title in ((axes[0], "ttft_s", "prefill (TTFT), s"), (axes[1], "tpot_s", "decode, s/token")):
            vals = [res["table"][n][key] or 0 for n in names]
            ax.bar(names, vals, color=["C0", "C1", "C2", "C3"][: len(names)])
            ax.axhline(res["bound"][key], color="k", ls="--", label="physical bound")
            ax.set_yscale("log")
            ax.set_title(title)
            ax.legend()
        fig.suptitle(f"{res['shape']} (random weights), {res['machine']}, budget {res['budget']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "latency.png"), dpi=110)
    except Exception as e:  # a missing plot never hides the numbers
        print("plot failed:", e)


if __name__ == "__main__":
    main()
