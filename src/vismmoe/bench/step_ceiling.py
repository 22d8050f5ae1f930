"""The decode step against the hardware, on a real-size shape with random weights, all in ONE process:

    python -m vismmoe.bench.step_ceiling --shape qwen3-vl-30b-a3b --budget 25% --out DIR

    HBM roofline        bytes one decode token must read (non-expert decoder weights, lm_head, top-k experts of
                        every MoE layer) / HBM bandwidth measured here with a bf16 GEMV
    resident, fast      every expert preloaded, the fast step (static KV, compiled layers, one CUDA graph a token)
    resident, eager     the same pool, transformers' forward per token (the runtime's per-layer path)
    budget, fast/eager  cold cache at --budget on the real link, each policy in --policies, both decode paths;
                        the fast one with each predictor of --prefetch (none: no prefetch; gate, trace, blend:
                        prefetch in the prefill and lookahead in decode, step/decode_prefetch.py)
Requests: one image per side in --image-sides with 24 text tokens, --new-tokens teacher-forced random tokens
(random weights repeat one token under argmax). Systems run interleaved (A B C A B C), medians over --reps.
Also: the Belady decode bytes of the budget (from the resident run's routing), the decode kernel's block-size
sweep, compile + capture time, and whether every fast run gave the resident fast run's tokens.
Writes ceiling.json, bench.json (rows with ttft_s, tpot_s, e2e_s per system and side) and ceiling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from ..step import moe_kernel
from ..offload.trace import RoutingTrace
from .bound import access_groups, belady_misses, prefill_calls
from .offload_gpu import link_speed
from .random_model import random_engine, synthetic_inputs
from .shapes import get_shape


def hbm_gbps(device, reps: int = 20) -> float:
    """Bytes per second a bf16 GEMV reads (1 GiB of weights): the decode step's own access pattern."""
    w = torch.randn(16384, 32768, device=device, dtype=torch.bfloat16)
    x = torch.randn(1, 32768, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ w.T
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x @ w.T
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return w.numel() * w.element_size() / statistics.median(times) / 1e9


def step_bytes(eng) -> int:
    """Bytes a decode token reads at least: decoder weights except embeddings and routed experts, lm_head, and
    top-k experts per MoE layer a decode token reaches (ERNIE: its text banks; one embedding row and the KV are
    negligible)."""
    lm = eng.family.language_model(eng.model)
    n = sum(p.numel() * p.element_size() for name, p in lm.named_parameters() if "embed_tokens" not in name)
    head = eng.model.lm_head.weight
    n += head.numel() * head.element_size()
    return n + eng.geometry.top_k * len(eng.geometry.decode_layers) * eng.layout.nbytes


def graph_us(fn, reps: int) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph of `reps` calls (no launch overhead)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps * 1e3


@torch.inference_mode()
def profile_step(eng, inputs, teacher_tokens, path: str, tokens: int = 16) -> dict:
    """Kernel time per decode token by kernel name (torch profiler over the fast step's graph replays only, no
    prefill); the table to `path`."""
    from torch.profiler import ProfilerActivity, profile
    eng.generate_ids(inputs, 2 * tokens, teacher_tokens=teacher_tokens)    # a bucket with room for `tokens` more
    fs = eng.fast_step()
    T = inputs["input_ids"].shape[1]
    b = fs.sg.bucket(1, T + 2 * tokens)
    b.pos.fill_(T)
    b.mask[:, T:] = False
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fs.decode(b, tokens, teacher_tokens[:tokens])
        torch.cuda.synchronize()
    avg = prof.key_averages()
    with open(path, "w") as f:
        f.write(avg.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=80))
    dev = sum(getattr(e, "self_device_time_total", 0) for e in avg) / 1e3
    return {"device_ms_per_token": dev / tokens, "tokens": tokens}


def kernel_sweep(eng, reps: int = 50, rows_up=(2, 4, 8), cols=(512, 1024), rows_down=(4, 8, 16, 32),
                 cols_down=(256, 512)) -> dict:
    """Time each pass of the decode experts kernel (one token, top-k resident experts of the engine's expert
    format, from a CUDA graph) over a grid of block sizes; keep the fastest of each (for that format) for the rest
    of the run."""
    dev, geo = eng.device, eng.geometry
    H, I, K = geo.hidden, geo.inter, geo.top_k
    fmt = None if eng.layout.name == "dense" else eng.layout
    pool = eng.cache.pool
    addr = torch.tensor([pool.data_ptr() + s * eng.layout.nbytes for s in range(geo.num_experts)],
                        dtype=torch.int64, device=dev)
    x = torch.randn(1, H, device=dev, dtype=eng.dtype)
    topk = torch.randperm(geo.num_experts, device=dev)[:K].view(1, K)
    w = torch.rand(1, K, device=dev, dtype=eng.dtype)
    ri, rw = torch.empty(K, dtype=torch.long, device=dev), torch.empty(K, device=dev)
    h = torch.randn(K, I, device=dev, dtype=eng.dtype)
    y = torch.empty(K, H, device=dev)
    out = {"gate_up": {}, "down": {}}
    best = {}
    for r in rows_up:
        for c in cols:
            for stages in (2, 4):
                b = {"BLOCK_I": r, "BLOCK_H": c, "num_warps": 4, "num_stages": stages}
                us = graph_us(lambda: moe_kernel.gate_up_pass(x, topk, w, addr, h, ri, rw, b, fmt), reps)
                out["gate_up"][str(b)] = us
                if us < best.get("gate_up", (1e9,))[0]:
                    best["gate_up"] = (us, b)
    for r in rows_down:
        for c in cols_down:
            for stages in (2, 4):
                b = {"BLOCK_O": r, "BLOCK_K": c, "num_warps": 4, "num_stages": stages}
                us = graph_us(lambda: moe_kernel.down_pass(h, topk, w, addr, y, b, fmt), reps)
                out["down"][str(b)] = us
                if us < best.get("down", (1e9,))[0]:
                    best["down"] = (us, b)
    up, down = moe_kernel.BLOCKS[moe_kernel.kernel_id(fmt)]     # the variant the format's kernels knob picks
    up.update(best["gate_up"][1])
    down.update(best["down"][1])
    nb = K * eng.layout.nbytes
    return {"us": out, "gate_up": best["gate_up"], "down": best["down"],
            "gate_up_GBps": nb * 2 / 3 / (best["gate_up"][0] / 1e6) / 1e9,
            "down_GBps": nb / 3 / (best["down"][0] / 1e6) / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-vl-30b-a3b")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the shape (default: all; the 30B shape's 48 resident plus a budgeted pool "
                         "do not fit an 80 GB card)")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default="lru,predictive")
    ap.add_argument("--prefetch", default="none",
                    help="predictors of the budgeted fast systems, comma-separated (e.g. none,gate)")
    ap.add_argument("--calibration", default=None, help="transition tables for --prefetch trace/blend")
    ap.add_argument("--landing", default="on",
                    help="decode misses landed in place (on) or copied after the step (off), comma-separated to "
                         "compare both (fast_step.py)")
    ap.add_argument("--image-sides", default="448,1024")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-eager-budget", action="store_true", help="skip the eager path at the budget")
    ap.add_argument("--out", default="runs/step_ceiling")
    args = ap.parse_args(argv)
    if not set(args.landing.split(",")) <= {"on", "off"}:
        print(f"error: --landing {args.landing!r}: give on, off or on,off", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    fam, config = get_shape(args.shape, args.layers or None)
    base = random_engine(fam, config, device="cuda", expert_budget="100%", policy="lru")
    base.progress = say
    res = {"shape": args.shape, "layers": args.layers or "all", "routing": "random weights", "machine": torch.cuda.get_device_name(),
           "link": "real (PCIe, pinned host memory)", "budget": args.budget, "new_tokens": args.new_tokens,
           "prefetch": args.prefetch, "landing": args.landing,
           "decode_inputs": "teacher-forced random text tokens", "build_s": time.perf_counter() - t0}
    res["hbm_GBps"] = hbm_gbps(dev)
    res["link_GBps"] = link_speed(dev, base.layout.nbytes)
    res["step_bytes"] = step_bytes(base)
    res["roofline_ms"] = res["step_bytes"] / (res["hbm_GBps"] * 1e9) * 1e3
    say(f"HBM {res['hbm_GBps']:.0f} GB/s, link {res['link_GBps']:.1f} GB/s, {res['step_bytes'] / 1e9:.2f} GB per "
        f"token -> roofline {res['roofline_ms']:.2f} ms")

    keys = [(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)]
    base.runtime.preload(keys)
    res["kernel_sweep"] = kernel_sweep(base)
    say("kernel", {k: v for k, v in res["kernel_sweep"].items() if k != "us"})

    # the eager resident engine shares the pool; preloading the same keys in the same order fills the same slots
    eager = base.fork(decode="eager", share_pool=True)
    eager.runtime.preload(keys)
    systems = {"resident-fast": base, "resident-eager": eager}
    policies = args.policies.split(",")
    prefetches = args.prefetch.split(",")
    budgeted = {}                                   # (policy, predictor) -> system name
    for land in args.landing.split(","):
        for pol in policies:
            for pf in prefetches:
                k = (pol if pf == "none" else f"{pol}+{pf}") + ("" if land == "on" else "-noland")
                name = budgeted[(pol, pf) if land == "on" else (pol, pf + "-noland")] = f"{k}-fast"
                systems[name] = base.fork(expert_budget=args.budget, policy=pol, prefetch=pf,
                                          calibration=args.calibration if pf in ("trace", "blend") else None)
                if land == "off":
                    systems[name].fast_step().land_slots = 0
    first_budget_name = next(iter(budgeted.values()))
    first_budget = systems[first_budget_name]
    if not args.no_eager_budget:
        systems[f"{policies[0]}-eager"] = first_budget.fork(decode="eager", share_pool=True)
    resident = {"resident-fast", "resident-eager"}

    g = torch.Generator().manual_seed(1234)
    teacher_tokens = torch.randint(1000, 100000, (args.new_tokens + 1,), generator=g).tolist()
    sides = [int(s) for s in args.image_sides.split(",")]
    reqs = {s: synthetic_inputs(base, s) for s in sides}

    def run(name, eng, side, n=None):
        if name not in resident:
            eng.cache.clear()
        _, st = eng.generate_ids(reqs[side], n or args.new_tokens, teacher_tokens=teacher_tokens)
        return st

    # warm-up: compile + capture per bucket (timed), kernels, allocations
    for side in sides:
        for name, eng in systems.items():
            t = time.perf_counter()
            run(name, eng, side)
            say(f"warm-up {name} {side}px {time.perf_counter() - t:.1f} s")
    res["compile_capture_s"] = base.fast_step().sg.capture_s      # every bucket, shared by every engine

    rows: dict = {}
    tokens: dict = {}
    for rep in range(args.reps):
        for side in sides:
            for name, eng in systems.items():
                if name not in resident:
                    eng.cache.clear()
                toks, st = eng.generate_ids(reqs[side], args.new_tokens, teacher_tokens=teacher_tokens)
                fs = getattr(eng, "_fast", None)
                if fs is not None:          # device time of the step itself (CUDA events around each replay)
                    st["step_device_s"] = statistics.median(fs.step_s[-(st["new_tokens"] - 1):])
                    st["host_gap_s"] = statistics.median(fs.gap_s[-(st["new_tokens"] - 2):])
                    st["landed"] = fs.landed            # decode misses landed in place so far (every request)
                    st["steps_ms"] = [round(s * 1e3, 3) for s in fs.step_s[-(st["new_tokens"] - 1):]]
                    st["gaps_ms"] = [round(s * 1e3, 3) for s in fs.gap_s[-(st["new_tokens"] - 2):]]
                    if fs.lookahead is not None:     # decode prefetches so far (this engine, every request)
                        st["lookahead"] = {"issued": fs.lookahead.issued, "hits": fs.lookahead.hits,
                                           "wasted": fs.lookahead.wasted, "depth": fs.lookahead.model.depth}
                rows.setdefault((name, side), []).append(st)
                tokens.setdefault((name, side), toks[0])
                say(f"rep {rep} {side}px {name:16s} ttft {st['ttft_s'] * 1e3:8.1f} ms  tpot "
                    f"{st['tpot_s'] * 1e3:7.2f} ms (step {st.get('step_device_s', 0) * 1e3:5.2f}, gap "
                    f"{st.get('host_gap_s', 0) * 1e3:5.2f})  e2e {st['e2e_s'] * 1e3:8.1f} ms  misses {st['misses']}  "
                    f"moved {st['bytes_moved'] / 2**30:.2f} GiB")

    res["profile_resident_fast"] = profile_step(base, reqs[sides[0]], teacher_tokens,
                                                os.path.join(args.out, "prof_fast.txt"))

    # Belady bytes at the budget over the resident run's routing (decode: after the prefill's layer calls)
    slots = first_budget.cache.num_slots
    nb = base.layout.nbytes
    res["belady"] = {}
    for side in sides:
        tr = RoutingTrace()
        base.record_trace(tr)
        base.generate_ids(reqs[side], args.new_tokens, teacher_tokens=teacher_tokens)
        base.record_trace(None)
        groups = access_groups(tr)
        npre = prefill_calls(tr)
        pre = belady_misses(groups[:npre], slots)
        tot = belady_misses(groups, slots)
        res["belady"][side] = {"slots": slots, "prefill_bytes": pre * nb,
                               "decode_bytes_per_token": (tot - pre) * nb / max(1, args.new_tokens - 1)}

    def med(name, side, key):
        return statistics.median(r[key] for r in rows[(name, side)])

    table = []
    for (name, side) in rows:
        table.append({"system": name, "image_side": side, "ttft_s": med(name, side, "ttft_s"),
                      "tpot_s": med(name, side, "tpot_s"), "e2e_s": med(name, side, "e2e_s"),
                      "misses": med(name, side, "misses"),
                      "step_device_s": med(name, side, "step_device_s") if "step_device_s" in rows[(name, side)][0]
                      else None,
                      "host_gap_s": med(name, side, "host_gap_s") if "host_gap_s" in rows[(name, side)][0] else None,
                      "bytes_moved": med(name, side, "bytes_moved"),
                      "tokens_equal_resident_fast": tokens[(name, side)] == tokens[("resident-fast", side)]})
    res["rows"] = table
    # each request's own times (step and gap per token among them): what the medians above hide
    res["requests"] = {f"{name} {side}px": [{k: v for k, v in st.items() if k in ("ttft_s", "tpot_s", "e2e_s", "misses",
                                                                            "steps_ms", "gaps_ms", "landed")}
                                            for st in sts] for (name, side), sts in rows.items()}
    pol = policies[0]
    link = res["link_GBps"] * 1e9
    res["targets"] = {}
    for side in sides:
        rf = med("resident-fast", side, "tpot_s")
        bel = res["belady"][side]
        t = {"resident_tpot_ms": rf * 1e3, "eager_resident_tpot_ms": med("resident-eager", side, "tpot_s") * 1e3,
             "decode_bound_ms": (rf + bel["decode_bytes_per_token"] / link) * 1e3,
             "ttft_bound_ms": max(med("resident-fast", side, "ttft_s"), bel["prefill_bytes"] / link) * 1e3}
        for (p, pf), name in budgeted.items():
            k = name[:-len("-fast")]
            t[f"{k}_tpot_ms"] = med(name, side, "tpot_s") * 1e3
            t[f"{k}_ttft_ms"] = med(name, side, "ttft_s") * 1e3
            t[f"{k}_decode_vs_bound"] = t[f"{k}_tpot_ms"] / t["decode_bound_ms"]
            t[f"{k}_ttft_vs_bound"] = t[f"{k}_ttft_ms"] / t["ttft_bound_ms"]
        if (f"{pol}-eager", side) in rows:
            t["eager_budget_e2e_over_fast"] = med(f"{pol}-eager", side, "e2e_s") / med(first_budget_name, side,
                                                                                        "e2e_s")
            t["eager_budget_tpot_ms"] = med(f"{pol}-eager", side, "tpot_s") * 1e3
        res["targets"][side] = t
    big = max(sides)
    tg = res["targets"][big]
    k0 = first_budget_name[:-len("-fast")]
    res["ceiling"] = {"roofline_ms": res["roofline_ms"], "resident_tpot_ms": tg["resident_tpot_ms"],
                      "eager_resident_tpot_ms": tg["eager_resident_tpot_ms"],
                      "budget25_real_tpot_ms": tg[f"{k0}_tpot_ms"], "image_side": big, "policy": k0}
    res["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "ceiling.json"), "w") as f:
        json.dump(res["ceiling"] | {"shape": res["shape"], "machine": res["machine"]}, f, indent=1)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    say(json.dumps(res["targets"], indent=1))
    say(json.dumps(res["ceiling"]))


if __name__ == "__main__":
    sys.exit(main())
