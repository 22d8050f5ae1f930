"""Where a cold prefill's time goes at equal device memory (dense vs int4, 24 layers, 1024 px): stats of 3 cold
requests, then one with the timeline (per-layer compute spans and copies)."""
import json, os, statistics, torch, time
from vismmoe.bench.random_model import random_engine
from vismmoe.bench.shapes import get_shape
from vismmoe.bench.random_model import synthetic_inputs
OUT = os.environ.get("OUT", ".")
fam, config = get_shape("qwen3-vl-30b-a3b", 24)
probe = random_engine(fam, config, device="cuda", expert_budget="1%", expert_format="dense", seed=0)
nE = len(probe.geometry.moe_layers) * probe.geometry.num_experts
budget = int(0.25 * nE * probe.layout.nbytes)
del probe
res = {}
for f in ("dense", "int4"):
    eng = random_engine(fam, config, device="cuda", expert_budget=str(budget), policy="predictive", expert_format=f,
                        seed=0).fork(prefetch="gate")
    inputs = synthetic_inputs(eng, 1024)
    eng.generate_ids(inputs, 2)
    sts = []
    for r in range(3):
        eng.cache.clear()
        torch.cuda.synchronize()
        _, st = eng.generate_ids(inputs, 1)
        sts.append({k: v for k, v in st.items() if isinstance(v, (int, float)) or v is None})
    eng.cache.clear()
    eng.record_timeline()
    _, st = eng.generate_ids(inputs, 1)
    tl = eng.last_timeline
    pf = eng.runtime.prefetcher
    if pf is not None:
        print("prefetch phases:", {k: vars(v) for k, v in pf._phases.items()}, "depth", pf.depth, "max", pf.max_depth,
              flush=True)
    print(f, {k: (round(statistics.median(s[k] for s in sts), 4) if sts[0][k] is not None else None)
              for k in sts[0] if k in ("ttft_s", "stall_s", "link_busy_s", "overlap_fraction", "h2d_GBps",
                                       "bytes_moved", "prefetch_issued", "prefetch_hits", "hits", "misses")}, flush=True)
    print(tl.ascii(120), flush=True)
    rows = []
    prev = tl.vision[-1][1] if tl.vision else 0.0
    for layer, s, e in tl.compute:
        cps = [c for c in tl.copies if c[0] == layer]
        dem = [c for c in cps if c[4] == "demand"]
        pre = [c for c in cps if c[4] != "demand"]
        rows.append({"layer": layer, "start_ms": s * 1e3, "dur_ms": (e - s) * 1e3, "gap_ms": (s - prev) * 1e3,
                     "demand": len(dem), "prefetch": len(pre),
                     "demand_last_end_ms": max((c[3] for c in dem), default=0) * 1e3,
                     "prefetch_first_ms": min((c[2] for c in pre), default=0) * 1e3,
                     "prefetch_last_end_ms": max((c[3] for c in pre), default=0) * 1e3})
        prev = e
    for r in rows:
        print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    res[f] = {"stats": sts, "layers": rows, "vision": tl.vision, "span_ms": tl.span() * 1e3}
    eng.record_timeline(False)
    full = eng.fork(expert_budget="100%", policy="lru", prefetch="none")
    full.runtime.preload([(l, e) for l in full.geometry.moe_layers for e in range(full.geometry.num_experts)])
    full.generate_ids(inputs, 1)
    torch.cuda.synchronize()
    from torch.profiler import profile, ProfilerActivity
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, st = full.generate_ids(inputs, 1)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    dev = sum(k.self_device_time_total for k in ka if k.device_type.name == "CUDA") / 1e3
    print(f, "resident prefill wall", round(wall * 1e3, 1), "ms, ttft", round(st["ttft_s"] * 1e3, 1),
          "ms, device busy (sum of kernel times)", round(dev, 1), "ms", flush=True)
    print(ka.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60), flush=True)
    res[f]["resident"] = {"wall_ms": wall * 1e3, "device_ms": dev, "ttft_ms": st["ttft_s"] * 1e3}
    del full
    del eng
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "ttft_timeline_before.json"), "w"), indent=1)
