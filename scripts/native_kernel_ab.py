"""The native expert kernel built from another source (an earlier experts.c: `git show REV:src/vismmoe/cpu/native/
experts.c > OLD.c`) against this checkout's, side by side in one process, calls in turn: 4 experts x 1 token of the
bundled model's shape (H 256, I 128), bf16 blobs; medians of the calls in microseconds. Each kernel cycles through
its own 32 experts (neither reads blobs the other just brought into cache) and which one runs first alternates
from call to call. Giving this checkout's experts.c as OLD.c is the A/A check: its ratio says how far the method
itself leans.

    python scripts/native_kernel_ab.py OLD.c [--calls 4000] [--threads 1,2] [--spec bf16] [--hidden 256 --inter 128]
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

from vismmoe.cpu import native
from vismmoe.formats import make_format


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", help="the other experts.c")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--spec", default="bf16")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=128)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="vismmoe-kernel-ab-")
    shutil.copy(args.old, os.path.join(tmp, "experts.c"))
    libs = {"old": native.load(native.build(os.path.join(tmp, "experts.c"), tmp)),
            "this": native.load(native.build(native.SOURCE, os.path.join(tmp, "this")))}
    H, I = args.hidden, args.inter
    fmt = make_format(args.spec, H, I, torch.float32)
    lay = native.params(fmt)
    n = 32
    g = torch.Generator().manual_seed(0)
    gu, dn = torch.randn(n, 2 * I, H, generator=g) * 0.05, torch.randn(n, H, I, generator=g) * 0.05
    blobs = {k: fmt.quantize(gu, dn, torch.zeros(n, fmt.numel, dtype=fmt.pool_dtype)) for k in libs}
    x, w = torch.randn(4, H, generator=g), torch.rand(4, generator=g)
    y, scratch = torch.empty(4, H), torch.empty(libs["old"].scratch(lay, 4))
    res = {"spec": args.spec, "hidden": H, "inter": I, "calls": args.calls, "machine": f"CPU, {os.cpu_count()} cores",
           "old_source": native.source_hash(args.old), "this_source": native.source_hash(native.SOURCE), "us": {}}
    order = list(libs)
    for threads in [int(t) for t in args.threads.split(",")]:
        ts = {k: [] for k in libs}
        for it in range(args.calls):
            for k in (order if it % 2 == 0 else order[::-1]):
                sel = [blobs[k][(it * 4 + j) % n] for j in range(4)]
                t = time.perf_counter()
                libs[k].experts(lay, sel, [0, 1, 2, 3, 4], x, w, native.SILU, scratch, y, threads)
                ts[k].append(time.perf_counter() - t)
        res["us"][threads] = {k: statistics.median(v) * 1e6 for k, v in ts.items()}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
