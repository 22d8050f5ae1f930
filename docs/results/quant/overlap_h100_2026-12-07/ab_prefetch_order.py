"""A/B: prefetch issued before the layer's compute is queued (old) vs after (new): cold TTFT, int4 and dense."""
import json, os, statistics, torch
import vismmoe.offload.runtime as rtmod
from vismmoe.bench.random_model import random_engine, synthetic_inputs
from vismmoe.bench.shapes import get_shape
OUT = os.environ.get("OUT", ".")
cls = [v for v in vars(rtmod).values() if isinstance(v, type) and "forward" in vars(v) and "_make_resident" in vars(v)][0]
ns = dict(vars(rtmod))
exec(open(os.path.join(os.path.dirname(__file__), "old_forward.py")).read(), ns)
FW = {"before": ns["forward"], "after": cls.forward}
fam, config = get_shape("qwen3-vl-30b-a3b", 24)
probe = random_engine(fam, config, device="cuda", expert_budget="1%", expert_format="dense", seed=0)
nE = len(probe.geometry.moe_layers) * probe.geometry.num_experts
budget = int(0.25 * nE * probe.layout.nbytes)
del probe
def cold(eng, inputs, mode):
    cls.forward = FW[mode]
    eng.cache.clear(); torch.cuda.synchronize()
    toks, st = eng.generate_ids(inputs, 1)
    return st["ttft_s"] * 1e3, toks
res = {}
for f in ("int4", "dense"):
    base = random_engine(fam, config, device="cuda", expert_budget=str(budget), policy="predictive", expert_format=f, seed=0)
    inputs = synthetic_inputs(base, 1024)
    engs = {"none": base.fork(prefetch="none"), "adaptive": base.fork(prefetch="gate"),
            "fixed1": base.fork(prefetch="gate", fixed_lookahead=True, lookahead=1),
            "fixed2": base.fork(prefetch="gate", fixed_lookahead=True, lookahead=2)}
    for e in engs.values():
        e.generate_ids(inputs, 2)
    r, toks = {}, {}
    for rep in range(4 if f == "int4" else 2):
        for k in engs:
            for mode in (("before", "after") if rep % 2 == 0 else ("after", "before")):
                t, tk = cold(engs[k], inputs, mode)
                r.setdefault(f"{k}/{mode}", []).append(t)
                toks.setdefault(k, set()).add(str(tk))
    cls.forward = FW["after"]
    res[f] = {k: round(statistics.median(v), 1) for k, v in r.items()}
    res[f]["host_ms"] = {k: {b: round(v.host_s * 1e3, 3) for b, v in e.runtime.prefetcher._phases.items()}
                         for k, e in engs.items() if e.runtime.prefetcher is not None}
    res[f]["same_tokens"] = {k: len(v) == 1 for k, v in toks.items()}
    print(f, json.dumps(res[f]), flush=True)
    del engs, base
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "ab_prefetch_order.json"), "w"), indent=1)
