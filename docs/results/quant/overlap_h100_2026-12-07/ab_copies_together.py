"""A/B: copies queued one by one (as before) vs together (copy_in_many, runs merged): cold TTFT, int4 and dense."""
import json, os, statistics, time, torch
from vismmoe.bench.random_model import random_engine, synthetic_inputs
from vismmoe.bench.shapes import get_shape
from vismmoe.offload.transfer import TransferEngine
OUT = os.environ.get("OUT", ".")
fam, config = get_shape("qwen3-vl-30b-a3b", 24)
probe = random_engine(fam, config, device="cuda", expert_budget="1%", expert_format="dense", seed=0)
nE = len(probe.geometry.moe_layers) * probe.geometry.num_experts
budget = int(0.25 * nE * probe.layout.nbytes)
del probe
orig = TransferEngine.copy_in_many
def one_by_one(self, pool, items, kind="demand"):
    return [orig(self, pool, [it], kind)[0] for it in items]
def cold(eng, inputs, mode):
    TransferEngine.copy_in_many = orig if mode == "together" else one_by_one
    eng.cache.clear(); torch.cuda.synchronize()
    toks, st = eng.generate_ids(inputs, 1)
    return st["ttft_s"] * 1e3, toks
res = {}
for f in ("int4", "dense"):
    base = random_engine(fam, config, device="cuda", expert_budget=str(budget), policy="predictive", expert_format=f, seed=0)
    inputs = synthetic_inputs(base, 1024)
    engs = {"none": base.fork(prefetch="none"), "adaptive": base.fork(prefetch="gate"),
            "fixed1": base.fork(prefetch="gate", fixed_lookahead=True, lookahead=1)}
    for e in engs.values():
        e.generate_ids(inputs, 2)
    r = {}
    toks = {}
    for rep in range(4 if f == 'int4' else 2):
        for k in engs:
            for mode in (("one_by_one", "together") if rep % 2 == 0 else ("together", "one_by_one")):
                t, tk = cold(engs[k], inputs, mode)
                r.setdefault(f"{k}/{mode}", []).append(t)
                toks.setdefault(k, set()).add(str(tk))
    TransferEngine.copy_in_many = orig
    res[f] = {k: round(statistics.median(v), 1) for k, v in r.items()}
    res[f]["host_s"] = {k: {b: round(v.host_s * 1e3, 3) for b, v in e.runtime.prefetcher._phases.items()}
                        for k, e in engs.items() if e.runtime.prefetcher is not None}
    res[f]["same_tokens"] = {k: len(v) == 1 for k, v in toks.items()}
    print(f, json.dumps(res[f]), flush=True)
    del engs, base
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "ab_copies_together.json"), "w"), indent=1)
