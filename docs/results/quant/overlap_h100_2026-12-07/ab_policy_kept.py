"""A/B: predictive policy's expected next uses recomputed per admission (old) vs kept (new): cold TTFT."""
import json, os, statistics, torch
import numpy as np
from vismmoe.offload.policies import PredictivePolicy
from vismmoe.bench.random_model import random_engine, synthetic_inputs
from vismmoe.bench.shapes import get_shape
OUT = os.environ.get("OUT", ".")
NEW = (PredictivePolicy.expected_next_use, PredictivePolicy._next_use)
OLD = (lambda self: self._expected(self._all_rows),
       lambda self, key: float(self._expected(np.array([self.pos[key[0]]]))[0, key[1]]))
fam, config = get_shape("qwen3-vl-30b-a3b", 24)
probe = random_engine(fam, config, device="cuda", expert_budget="1%", expert_format="dense", seed=0)
nE = len(probe.geometry.moe_layers) * probe.geometry.num_experts
budget = int(0.25 * nE * probe.layout.nbytes)
del probe
res = {}
for f in os.environ.get("FMTS", "dense,fp8,int4").split(","):
    eng = random_engine(fam, config, device="cuda", expert_budget=str(budget), policy="predictive", expert_format=f,
                        seed=0).fork(prefetch="gate")
    inputs = synthetic_inputs(eng, 1024)
    eng.generate_ids(inputs, 2)
    r, toks, host = {}, {}, {}
    for rep in range(int(os.environ.get("REPS", "4"))):
        for mode in (("old", "new") if rep % 2 == 0 else ("new", "old")):
            PredictivePolicy.expected_next_use, PredictivePolicy._next_use = OLD if mode == "old" else NEW
            eng.cache.clear(); torch.cuda.synchronize()
            tk, st = eng.generate_ids(inputs, 1)
            r.setdefault(mode, []).append(st["ttft_s"] * 1e3)
            toks.setdefault(mode, set()).add(str(tk))
            host.setdefault(mode, []).append({b: round(v.host_s * 1e3, 3) for b, v in eng.runtime.prefetcher._phases.items()})
    PredictivePolicy.expected_next_use, PredictivePolicy._next_use = NEW
    res[f] = {m: round(statistics.median(v), 1) for m, v in r.items()}
    res[f]["ttft_all"] = r
    res[f]["host_ms_last"] = {m: v[-1] for m, v in host.items()}
    res[f]["same_tokens"] = len(toks["old"] | toks["new"]) == 1
    print(f, json.dumps({k: v for k, v in res[f].items() if k != "ttft_all"}), flush=True)
    del eng
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "ab_policy_kept.json"), "w"), indent=1)
