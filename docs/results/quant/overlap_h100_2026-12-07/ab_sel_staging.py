"""A/B (commit 3b38226, reverted after it): the slot list of a quantized layer moved with a blocking torch.tensor (old) vs the pinned staging (new)."""
import json, os, statistics, torch
import vismmoe.step.grouped as grouped
import vismmoe.offload.runtime as rtmod
from vismmoe.bench.random_model import random_engine, synthetic_inputs
from vismmoe.bench.shapes import get_shape
OUT = os.environ.get("OUT", ".")
new_wb = grouped.window_banks
def old_wb(*a, to_device=None, **k):
    return new_wb(*a, **k)
fam, config = get_shape("qwen3-vl-30b-a3b", 24)
eng = random_engine(fam, config, device="cuda", expert_budget=str(int(0.25 * 24 * 128 * 9437184)), policy="predictive",
                    expert_format="int4", seed=0).fork(prefetch="gate")
inputs = synthetic_inputs(eng, 1024)
eng.generate_ids(inputs, 2)
r, toks = {}, set()
for rep in range(6):
    for mode in (("old", "new") if rep % 2 == 0 else ("new", "old")):
        rtmod.window_banks = old_wb if mode == "old" else new_wb
        eng.cache.clear(); torch.cuda.synchronize()
        tk, st = eng.generate_ids(inputs, 1)
        r.setdefault(mode, []).append(round(st["ttft_s"] * 1e3, 1)); toks.add(str(tk))
res = {m: statistics.median(v) for m, v in r.items()} | {"all": r, "same_tokens": len(toks) == 1}
print(json.dumps(res), flush=True)
json.dump(res, open(os.path.join(OUT, "ab_sel_staging.json"), "w"), indent=1)
