"""The bound of a saved bench run, recomputed from its routing traces for runs measured with warm requests.

Before commit d999dd8 the harness cleared the cache once per system run, so every request after the first began
with what the one before it left, while the bound charged each request a cold cache (too many bytes, hence
efficiencies above 1). Such a run measured a stream: this replays Belady over the requests as one stream, cold
once, and writes the run again with `bound_s` and `efficiency` from it (`bound_basis` says so; the phased bound,
which needs each request cold, is dropped). Expert bytes come from the run itself (its cold Belady bytes over the
cold misses of the same traces).

    python -m vismmoe.bench.rebound RUN/bench.json --traces DIR [--out RUN/bench_stream_bound.json]

DIR holds `vismmoe bench --save-traces` files of the same requests (trace_<compress>_<keep>_<i>.npz).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from ..offload.links import get_link
from ..offload.trace import RoutingTrace
from .bound import access_groups, belady_misses
from .harness import parse_pruning_label, trace_stem

BASIS = "Belady over the run's requests as one stream, cold once (recomputed from traces: bench/rebound.py)"


def _groups(directory: str, compress: str) -> tuple[list, int]:
    """(access groups per saved request of this pruning setting (`harness.pruning_label`), layers x experts they
    span)."""
    stem = trace_stem(*parse_pruning_label(compress))
    files = sorted(glob.glob(os.path.join(directory, stem + "[0-9]*.npz")),
                   key=lambda f: int(os.path.basename(f)[len(stem):-4]))          # by request index
    if not files:
        raise FileNotFoundError(f"no traces {stem}*.npz in {directory}")
    groups = [access_groups(RoutingTrace.load(f)) for f in files]
    keys = {k for g in groups for call in g for k in call}
    return groups, len({k[0] for k in keys}) * (1 + max(k[1] for k in keys))


def rebound(res: dict, directory: str, device_type: str = "cuda") -> dict:
    rows, memo = [], {}
    for r in res["rows"]:
        if r["compress"] not in memo:
            memo[r["compress"]] = _groups(directory, r["compress"])
        groups, total = memo[r["compress"]]
        slots = int(total * float(r["budget"].rstrip("%")) / 100)
        cold = sum(belady_misses(g, slots) for g in groups)
        # bytes per expert from the run's own cold Belady bytes (accelerate's row has none in older runs: a
        # row of the same setting and budget stands in)
        ref = r if r.get("belady_bytes") else next(x for x in res["rows"] if x.get("belady_bytes") and
                                                   (x["compress"], x["budget"]) == (r["compress"], r["budget"]))
        nbytes = ref["belady_bytes"] * len(groups) / cold
        stream = belady_misses([call for g in groups for call in g], slots) * nbytes / len(groups)
        # the link the row ran on (a device profile's tier where its --link was `real`); older runs: by name
        gbps = r.get("link_gbps") or get_link(r["link_name"]).rate_gbps(device_type)
        bound = max(r["compute_s"], stream / (gbps * 1e9))
        row = {k: v for k, v in r.items() if k not in ("bound_phased_s", "efficiency_phased")}
        rows.append(dict(row, bound_s=bound, efficiency=bound / r["e2e_s"], belady_bytes=stream, bound_basis=BASIS))
    return dict(res, rows=rows, bound_basis=BASIS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vismmoe.bench.rebound", description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json")
    ap.add_argument("--traces", required=True, metavar="DIR")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with open(args.bench_json) as f:
        res = rebound(json.load(f), args.traces)
    out = args.out or os.path.join(os.path.dirname(args.bench_json), "bench_stream_bound.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    for r in res["rows"]:
        print(f"{r['system']:20s} {r['link_name']:7s} {r['budget']:4s} bound {r['bound_s'] * 1e3:8.0f} ms  "
              f"efficiency {r['efficiency']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
