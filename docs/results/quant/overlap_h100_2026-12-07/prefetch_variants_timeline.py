"""Cold int4 prefill: prefetch allowance x depth variants, medians + per-layer rows of one run each."""
import json, os, statistics, torch
from vismmoe.bench.random_model import random_engine, synthetic_inputs
from vismmoe.bench.shapes import get_shape
from vismmoe.offload.prefetch import Prefetcher
OUT = os.environ.get("OUT", ".")
fam, config = get_shape("qwen3-vl-30b-a3b", 24)
probe = random_engine(fam, config, device="cuda", expert_budget="1%", expert_format="dense", seed=0)
nE = len(probe.geometry.moe_layers) * probe.geometry.num_experts
budget = int(0.25 * nE * probe.layout.nbytes)
del probe
orig_allow = Prefetcher.allowance_bytes
MULT = [1.0]
def allow(self, nb, k):
    return int(orig_allow(self, nb, k) * MULT[0])
Prefetcher.allowance_bytes = allow
base = random_engine(fam, config, device="cuda", expert_budget=str(budget), policy="predictive", expert_format="int4", seed=0)
inputs = synthetic_inputs(base, 1024)
none = base.fork(prefetch="none")
gate = base.fork(prefetch="gate")
for e in (none, gate):
    e.generate_ids(inputs, 2)
pf = gate.runtime.prefetcher
variants = {"none": (none, None, None, 1), "adaptive": (gate, True, 2, 1), "adaptive_x3": (gate, True, 2, 3),
            "fixed1": (gate, False, 1, 1), "fixed1_x3": (gate, False, 1, 3), "fixed1_inf": (gate, False, 1, 100),
            "fixed2_x3": (gate, False, 2, 3)}
def run(name):
    eng, adaptive, depth, mult = variants[name]
    if adaptive is not None:
        pf.adaptive, pf.max_depth = adaptive, depth
    MULT[0] = mult
    eng.cache.clear(); torch.cuda.synchronize()
    _, st = eng.generate_ids(inputs, 1)
    return st
res = {}
for rep in range(3):
    for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
        st = run(name)
        res.setdefault(name, []).append({k: st.get(k) for k in ("ttft_s", "prefetch_issued", "prefetch_hits", "misses", "bytes_moved")})
summary = {k: {"ttft_ms": round(1e3 * statistics.median(r["ttft_s"] for r in v), 1),
               "issued": v[-1]["prefetch_issued"], "pf_hits": v[-1]["prefetch_hits"], "misses": v[-1]["misses"],
               "GB": round(v[-1]["bytes_moved"] / 1e9, 2)} for k, v in res.items()}
for k, v in summary.items():
    print(k, v, flush=True)
rows = {}
for name in ("none", "adaptive", "fixed1_x3", "fixed2_x3"):
    eng = variants[name][0]
    eng.record_timeline()
    run(name)
    tl = eng.last_timeline
    eng.record_timeline(False)
    out = []
    for layer, s, e in tl.compute:
        cps = [c for c in tl.copies if c[0] == layer]
        dem = [c for c in cps if c[4] == "demand"]; pre = [c for c in cps if c[4] != "demand"]
        out.append((layer, round(s * 1e3, 1), round((e - s) * 1e3, 1), len(dem), len(pre),
                    round(max((c[3] for c in dem), default=0) * 1e3, 1), round(min((c[2] for c in pre), default=0) * 1e3, 1),
                    round(max((c[3] for c in pre), default=0) * 1e3, 1)))
    rows[name] = {"vision": tl.vision, "layers": out}
    print(name, "vision", [(round(a*1e3,1), round(b*1e3,1)) for a, b in tl.vision][:3], flush=True)
    print(name, "layer,start,dur,demand,prefetch,demand_end,pf_first,pf_end:", out, flush=True)
json.dump({"summary": summary, "runs": res, "rows": rows}, open(os.path.join(OUT, "prefetch_variants_timeline.json"), "w"), indent=1)
