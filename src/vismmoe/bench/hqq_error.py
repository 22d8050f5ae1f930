"""Weight reconstruction error of int4 rounding rules on a checkpoint's routed experts (CPU):

    python -m vismmoe.bench.hqq_error [--model DIR] --out docs/results/quant/hqq_weights.json

Per spec: relative Frobenius error |W - deq(Q(W))| / |W| over every expert matrix, and the mean absolute error,
for round to nearest and `rounding=hqq` (formats/hqq.py), symmetric and asymmetric.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..formats import make_format

SPECS = ("int4:group=128,sym=1", "int4:group=128,sym=1,rounding=hqq",
         "int4:group=128,sym=0", "int4:group=128,sym=0,rounding=hqq")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from ..checkpoints import default_model
    from ..engine.core import load
    eng = load(args.model or default_model()[0], device="cpu")
    f0 = eng.layout
    experts = []
    for buf in eng.store.buffers:                       # dense blobs of every MoE layer
        gu, dn = f0.dequantize(buf)
        experts.append((gu.float(), dn.float()))
    res = {"model": args.model or "bundled", "date": "2026-12-06", "rows": []}
    for spec in SPECS:
        t = time.perf_counter()
        fmt = make_format(spec, f0.hidden, f0.inter, torch.float32)
        num = den = ab = n = 0.0
        for gu, dn in experts:
            blobs = fmt.quantize(gu, dn, torch.empty(gu.shape[0], fmt.numel, dtype=fmt.pool_dtype))
            g2, d2 = fmt.dequantize(blobs)
            for w, r in ((gu, g2), (dn, d2)):
                num += (r - w).pow(2).sum().item()
                den += w.pow(2).sum().item()
                ab += (r - w).abs().sum().item()
                n += w.numel()
        res["rows"].append({"spec": spec, "rel_fro_err": (num / den) ** 0.5, "mean_abs_err": ab / n,
                            "seconds": time.perf_counter() - t})
        print(res["rows"][-1], flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
