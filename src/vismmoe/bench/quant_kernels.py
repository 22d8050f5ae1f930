"""The decode expert kernels of each format and kernel variant side by side, in ONE process on one GPU:

    python -m vismmoe.bench.quant_kernels --out DIR

One token, top-k experts of a pool of `--experts` quantized random experts (more bytes than the L2 holds), each
pass replayed from a CUDA graph (step_ceiling.graph_us). Per (format, variant): a sweep over a grid of tiles, the
fastest kept; then `--reps` rounds that time every (format, variant) at its best tile in turn (interleaved), the
median reported, with GB/s of the blob bytes each pass reads and the error against the torch reference.
Writes quant_kernels.json and quant_kernels.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from ..formats import make_format
from ..step import moe_kernel
from .step_ceiling import graph_us

GRID_UP = [{"BLOCK_I": r, "BLOCK_H": c, "num_warps": w, "num_stages": s}
           for r in (4, 8, 16, 32) for c in (256, 512, 1024) for w in (4, 8) for s in (2, 4)]
GRID_DOWN = [{"BLOCK_O": r, "BLOCK_K": c, "num_warps": w, "num_stages": s}
             for r in (8, 16, 32, 64) for c in (256, 512, 1024) for w in (4, 8) for s in (2, 4)]


def _case(spec: str, H: int, I: int, E: int, K: int, dev, seed: int = 0):
    fmt = make_format(spec, H, I, torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(seed)
    pool = torch.empty(E, fmt.numel, dtype=fmt.pool_dtype, device=dev)
    for e0 in range(0, E, 16):
        n = min(16, E - e0)
        gu = torch.randn(n, 2 * I, H, device=dev, generator=g) * 0.02
        dn = torch.randn(n, H, I, device=dev, generator=g) * 0.02
        fmt.quantize(gu.to(torch.bfloat16), dn.to(torch.bfloat16), pool[e0:e0 + n])
    addr = torch.tensor([pool.data_ptr() + e * fmt.nbytes for e in range(E)], dtype=torch.int64, device=dev)
    return fmt, pool, addr


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--specs", default=",".join(["dense"] + [f"{f}:kernels={v}" for f in ("fp8", "int4")
                                                             for v in ("v1", "v3")]))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--graph-reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="a smaller tile grid")
    ap.add_argument("--out", default="runs/quant_kernels")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    H, I, E, K = args.hidden, args.inter, args.experts, args.top_k
    up_grid = [b for b in GRID_UP if not args.quick or (b["num_warps"] == 4 and b["num_stages"] == 2)]
    dn_grid = [b for b in GRID_DOWN if not args.quick or (b["num_warps"] == 4 and b["num_stages"] == 2)]
    x = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    topk = torch.randperm(E, device=dev)[:K].view(1, K)
    w = torch.rand(1, K, device=dev, dtype=torch.bfloat16)
    ri, rw = torch.empty(K, dtype=torch.long, device=dev), torch.empty(K, device=dev)
    hx = torch.randn(K, I, device=dev, dtype=torch.bfloat16)
    y = torch.empty(K, H, device=dev)
    res = {"machine": torch.cuda.get_device_name(), "hidden": H, "inter": I, "experts": E, "top_k": K,
           "rows": []}
    cases = {}
    for spec in args.specs.split(","):
        fmt, pool, addr = _case(spec, H, I, E, K, dev)
        f = None if fmt.name == "dense" else fmt
        best = {}
        for name, grid, run in (
                ("gate_up", up_grid, lambda b: moe_kernel.gate_up_pass(x, topk, w, addr, hx, ri, rw, b, f)),
                ("down", dn_grid, lambda b: moe_kernel.down_pass(hx, topk, w, addr, y, b, f))):
            for b in grid:
                if f is not None and f.kernel == 1 and 128 % b.get("BLOCK_I", b.get("BLOCK_O")):
                    continue
                try:
                    us = graph_us(lambda: run(b), args.graph_reps)
                except Exception as exc:            # a tile the compiler refuses (resources): skip it
                    print(f"{spec} {name} {b}: {type(exc).__name__}", flush=True)
                    continue
                if us < best.get(name, (1e9,))[0]:
                    best[name] = (us, b)
        # the error of this variant against the torch reference, on the GPU
        ref = moe_kernel.decode_experts_reference(x, topk, w, *fmt.dequantize(pool[topk.view(-1)]))
        out = moe_kernel.decode_experts_triton(x, topk, w, addr, ri, rw, I, best["gate_up"][1], best["down"][1],
                                               fmt=f)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        cases[spec] = (fmt, f, pool, addr, best, err)
        print(f"{spec}: best gate_up {best['gate_up']}, down {best['down']}, rel err {err:.2e}", flush=True)
    times = {s: {"gate_up": [], "down": []} for s in cases}
    for _ in range(args.reps):                      # interleaved over specs
        for spec, (fmt, f, pool, addr, best, err) in cases.items():
            times[spec]["gate_up"].append(graph_us(lambda: moe_kernel.gate_up_pass(
                x, topk, w, addr, hx, ri, rw, best["gate_up"][1], f), args.graph_reps))
            times[spec]["down"].append(graph_us(lambda: moe_kernel.down_pass(
                hx, topk, w, addr, y, best["down"][1], f), args.graph_reps))
    base = None
    for spec, (fmt, f, pool, addr, best, err) in cases.items():
        up, dn = statistics.median(times[spec]["gate_up"]), statistics.median(times[spec]["down"])
        row = {"spec": spec, "variant": moe_kernel.kernel_id(f), "blob_bytes": fmt.nbytes, "gate_up_us": up,
               "down_us": dn, "total_us": up + dn, "gate_up_GBps": K * fmt.nbytes * 2 / 3 / up / 1e3,
               "down_GBps": K * fmt.nbytes / 3 / dn / 1e3, "rel_err_vs_reference": err,
               "gate_up_blocks": best["gate_up"][1], "down_blocks": best["down"][1]}
        base = base or row
        row["speedup_vs_first"] = base["total_us"] / row["total_us"]
        res["rows"].append(row)
    with open(os.path.join(args.out, "quant_kernels.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    lines = [f"{res['machine']}; H {H}, I {I}, one token, top-{K} of {E} experts, CUDA-graph replay, medians of "
             f"{args.reps} interleaved rounds", "",
             "| spec | FMT | gate_up us | down us | both us | vs first | gate_up GB/s | down GB/s | rel err | tiles |",
             "|" + "---|" * 10]
    for r in res["rows"]:
        lines.append(f"| {r['spec']} | {r['variant']} | {r['gate_up_us']:.1f} | {r['down_us']:.1f} | "
                     f"{r['total_us']:.1f} | {r['speedup_vs_first']:.2f}x | {r['gate_up_GBps']:.0f} | "
                     f"{r['down_GBps']:.0f} | {r['rel_err_vs_reference']:.1e} | {r['gate_up_blocks']} "
                     f"{r['down_blocks']} |")
    with open(os.path.join(args.out, "quant_kernels.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
