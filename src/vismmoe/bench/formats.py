"""Expert formats side by side on a real-size shape (random weights), in ONE process on one GPU:

    python -m vismmoe.bench.formats --shape qwen3-vl-30b-a3b --layers 24 --image-side 1024 --out DIR

Per format (dense bf16, fp8, int4 g128):
  resident   every expert in the pool: decode ms/token (fast step), and the expert kernels' own device time per
             token from the torch profiler (`_gate_up_kernel` + `_down_kernel`)
  budget     the SAME device bytes for experts in every format: `--bf16-share` (default 25%) of the bf16 experts'
             bytes, so a quantized format holds more experts; cold cache per request, real link; TTFT, decode
             ms/token, end to end, bytes moved; interleaved over formats, medians of `--reps`
  bound      the hardware's lower bound at that budget: prefill >= Belady prefill bytes / link; each decode token
             >= max(bytes a token reads / HBM bandwidth, Belady decode bytes / link), from the resident run's
             routing; efficiency = bound / measured (<= 1)
`--sweep` times each format's decode kernels over the same grid of tiles first and runs with the fastest, so every
format is tuned alike on the card at hand. `--kernels v1,v3` runs each quantized format once per named variant of its
decode kernels (`fmt:kernels=v1`, `fmt:kernels=v3`), interleaved in the same reps:

    python -m vismmoe.bench.formats --layers 24 --reps 3 --sweep --kernels v1,v3 --out DIR

Decode is teacher-forced with the same random tokens in every format (the routing of each format's own weights).
Writes formats.json, formats.md and formats.png under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from ..offload.trace import RoutingTrace
from .bound import access_groups, belady_misses, prefill_calls
from .kernel_profile import kernel_times
from .offload_gpu import link_speed
from .random_model import random_engine, synthetic_inputs
from .shapes import get_shape
from .step_ceiling import hbm_gbps, kernel_sweep, step_bytes

KERNELS = ("_gate_up_kernel", "_down_kernel")


def expert_kernel_ms(eng, inputs, teacher, tokens: int = 16) -> tuple[float, float]:
    """(expert kernels' device ms per token, all kernels' device ms per token) over `tokens` fast decode steps."""
    rows = kernel_times(eng, inputs, teacher, tokens)
    ex = sum(r["us"] for r in rows if any(k in r["kernel"] for k in KERNELS))
    return ex / 1e3, sum(r["us"] for r in rows) / 1e3


def belady(eng, inputs, teacher, new: int, slots: int) -> dict:
    tr = RoutingTrace()
    eng.record_trace(tr)
    eng.generate_ids(inputs, new, teacher_tokens=teacher)
    eng.record_trace(None)
    groups = access_groups(tr)
    npre = prefill_calls(tr)
    pre = belady_misses(groups[:npre], slots)
    tot = belady_misses(groups, slots)
    nb = eng.layout.nbytes
    return {"prefill_bytes": pre * nb, "decode_bytes_per_token": (tot - pre) * nb / max(1, new - 1)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-vl-30b-a3b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--formats", default="dense,fp8,int4")
    ap.add_argument("--bf16-share", default="25%", help="device bytes for experts, as a share of the bf16 experts")
    ap.add_argument("--policy", default="predictive")
    ap.add_argument("--image-side", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="runs/formats")
    ap.add_argument("--kernels", default="default",
                    help="decode kernel variants of the quantized formats, comma-separated: default (each format's "
                         "own) or v1, v3")
    ap.add_argument("--sweep", action="store_true",
                    help="time each format's decode kernels over a grid of tiles first, and use the fastest")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    fam, config = get_shape(args.shape, args.layers or None)
    from ..families import get_family
    tc = get_family(fam).text_config(config)
    dev = torch.device("cuda")
    formats = []
    for f in args.formats.split(","):
        for k in (args.kernels.split(",") if f != "dense" else ["default"]):
            formats.append(f if f == "dense" or k == "default" else f"{f}{',' if ':' in f else ':'}kernels={k}")
    res = {"shape": args.shape, "layers": tc.num_hidden_layers, "routing": "random weights",
           "machine": torch.cuda.get_device_name(), "link": "real (PCIe, pinned host memory)",
           "image_side": args.image_side, "new_tokens": args.new_tokens, "policy": args.policy,
           "decode_inputs": "teacher-forced random text tokens", "reps": args.reps}
    g = torch.Generator().manual_seed(1234)
    teacher = torch.randint(1000, 100000, (args.new_tokens + 1,), generator=g).tolist()
    engines, per = {}, {}
    budget_bytes = None
    for f in formats:
        t = time.perf_counter()
        if budget_bytes is None:                # the first format must be dense: its share sets the bytes
            assert f == "dense", "--formats must start with dense"
            probe = random_engine(fam, config, device="cuda", expert_budget="1%", expert_format=f, seed=0)
            nE = len(probe.geometry.moe_layers) * probe.geometry.num_experts
            budget_bytes = int(float(args.bf16_share.rstrip("%")) / 100 * nE * probe.layout.nbytes)
            res["budget_bytes"] = budget_bytes
            res["hbm_GBps"] = hbm_gbps(dev)
            res["link_GBps"] = link_speed(dev, probe.layout.nbytes)
            small = probe.fork(expert_budget=str(budget_bytes), policy=args.policy, prefetch="gate")
            del probe
        else:
            small = random_engine(fam, config, device="cuda", expert_budget=str(budget_bytes), policy=args.policy,
                                  expert_format=f, seed=0).fork(prefetch="gate")
        nE = len(small.geometry.moe_layers) * small.geometry.num_experts
        inputs = synthetic_inputs(small, args.image_side)
        eng = small.fork(expert_budget="100%", policy="lru", prefetch="none")     # every expert resident
        eng.runtime.preload([(l, e) for l in eng.geometry.moe_layers for e in range(eng.geometry.num_experts)])
        sweep = kernel_sweep(eng, rows_up=(4, 8, 16), cols=(512, 1024), rows_down=(8, 16, 32),
                             cols_down=(256, 512, 1024)) if args.sweep else None
        eng.generate_ids(inputs, args.new_tokens, teacher_tokens=teacher)            # compile + capture
        rs = [eng.generate_ids(inputs, args.new_tokens, teacher_tokens=teacher)[1] for _ in range(args.reps)]
        ex_ms, all_ms = expert_kernel_ms(eng, inputs, teacher)
        bel = belady(eng, inputs, teacher, args.new_tokens, small.cache.num_slots)
        per[f] = {"expert_bytes": eng.layout.nbytes, "format": eng.layout.spec(), "experts_total": nE,
                  "slots_at_budget": small.cache.num_slots, "resident_tpot_ms":
                  statistics.median(r["tpot_s"] for r in rs) * 1e3, "resident_ttft_ms":
                  statistics.median(r["ttft_s"] for r in rs) * 1e3, "expert_kernels_ms_per_token": ex_ms,
                  "all_kernels_ms_per_token": all_ms, "step_bytes": step_bytes(eng), "belady": bel,
                  "build_s": time.perf_counter() - t,
                  "kernel_sweep": {k: v for k, v in sweep.items() if k != "us"} if sweep else None,
                  "kernel_sweep_us": sweep["us"] if sweep else None}
        say(f"{f}: expert {eng.layout.nbytes / 2**20:.2f} MiB, {small.cache.num_slots} slots at the budget, "
            f"resident {per[f]['resident_tpot_ms']:.2f} ms/token, expert kernels {ex_ms:.3f} ms/token")
        del eng, rs                             # the resident pool goes; the budget engine keeps its own
        gc.collect()
        torch.cuda.empty_cache()
        small.generate_ids(inputs, args.new_tokens, teacher_tokens=teacher)          # warm
        engines[f] = (small, inputs)
    rows = {f: [] for f in formats}
    for rep in range(args.reps):
        for f in formats:
            eng, inputs = engines[f]
            eng.cache.clear()
            _, st = eng.generate_ids(inputs, args.new_tokens, teacher_tokens=teacher)
            rows[f].append(st)
            say(f"rep {rep} {f:6s} ttft {st['ttft_s'] * 1e3:8.1f} ms  tpot {st['tpot_s'] * 1e3:6.2f} ms  "
                f"e2e {st['e2e_s'] * 1e3:8.1f} ms  moved {st['bytes_moved'] / 2**30:.2f} GiB")
    link, hbm = res["link_GBps"] * 1e9, res["hbm_GBps"] * 1e9
    table = []
    for f in formats:
        med = lambda k: statistics.median(r[k] for r in rows[f])  # noqa: E731
        p = per[f]
        bound_ttft = p["belady"]["prefill_bytes"] / link
        bound_tpot = max(p["step_bytes"] / hbm, p["belady"]["decode_bytes_per_token"] / link)
        bound_e2e = bound_ttft + (args.new_tokens - 1) * bound_tpot
        row = {"format": f, **p, "ttft_s": med("ttft_s"), "tpot_s": med("tpot_s"), "e2e_s": med("e2e_s"),
               "bytes_moved": med("bytes_moved"), "bound_ttft_s": bound_ttft, "bound_tpot_s": bound_tpot,
               "bound_e2e_s": bound_e2e}
        row["efficiency_e2e"] = bound_e2e / row["e2e_s"]
        table.append(row)
    base = table[0]
    for row in table:
        row["e2e_speedup_vs_dense"] = base["e2e_s"] / row["e2e_s"]
        row["expert_kernel_speedup_vs_dense"] = base["expert_kernels_ms_per_token"] / row["expert_kernels_ms_per_token"]
        row["resident_tpot_vs_dense"] = row["resident_tpot_ms"] / base["resident_tpot_ms"]
    res["rows"] = table
    res["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "formats.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    _write_md(res, os.path.join(args.out, "formats.md"))
    _plot(res, os.path.join(args.out, "formats.png"))
    say(open(os.path.join(args.out, "formats.md")).read())


def _write_md(res: dict, path: str) -> None:
    lines = [f"{res['shape']} ({res['layers']} layers), {res['routing']}, {res['machine']}, {res['link']}; "
             f"{res['image_side']} px image, {res['new_tokens']} new tokens ({res['decode_inputs']}); expert "
             f"bytes on the device {res['budget_bytes'] / 2**30:.2f} GiB in every format (25% of bf16), policy "
             f"{res['policy']} + gate prefetch, cold cache, medians of {res['reps']}", "",
             "| format | expert MiB | slots | resident ms/token | expert kernels ms/token | TTFT ms | decode ms/token "
             "| e2e ms | e2e vs bf16 | bound e2e ms | efficiency |", "|" + "---|" * 11]
    for r in res["rows"]:
        lines.append(f"| {r['format']} | {r['expert_bytes'] / 2**20:.2f} | {r['slots_at_budget']} | "
                     f"{r['resident_tpot_ms']:.2f} | {r['expert_kernels_ms_per_token']:.3f} | {r['ttft_s'] * 1e3:.0f} | "
                     f"{r['tpot_s'] * 1e3:.2f} | {r['e2e_s'] * 1e3:.0f} | {r['e2e_speedup_vs_dense']:.2f}x | "
                     f"{r['bound_e2e_s'] * 1e3:.0f} | {r['efficiency_e2e']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["format"] for r in res["rows"]]
    ttft = [r["ttft_s"] * 1e3 for r in res["rows"]]
    dec = [(r["e2e_s"] - r["ttft_s"]) * 1e3 for r in res["rows"]]
    ax.barh(names, ttft, label="TTFT (prefill)")
    ax.barh(names, dec, left=ttft, label="decode")
    for i, r in enumerate(res["rows"]):
        ax.plot([r["bound_e2e_s"] * 1e3] * 2, [i - 0.4, i + 0.4], "k--")
    ax.set_xlabel("end to end, ms (dashed: hardware bound)")
    ax.set_title(f"{res['shape']} {res['layers']} layers, equal expert memory, {res['machine']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
