"""A/B on the CPU: the fast step's misses queued one copy at a time (old) or together (new), alternating in one
process; host seconds in FastStep._claim per decode step and decode ms/token."""
import json, os, statistics, subprocess, sys, textwrap, time
import numpy as np
import vismmoe.step.fast_step as fsm
from vismmoe import load
from vismmoe.engine.request import GenerationRequest
src = subprocess.run(["git", "show", "77e7a01:src/vismmoe/step/fast_step.py"], capture_output=True, text=True,
                     check=True).stdout
i = src.index("    def _claim(self"); j = src.index("    def settle(self", i)
ns = dict(vars(fsm))
exec(textwrap.dedent(src[i:j]), ns)
OLD, NEW = ns["_claim"], fsm.FastStep._claim
spent = {"t": 0.0}
def timed(f):
    def g(self, *a, **k):
        t = time.perf_counter()
        try:
            return f(self, *a, **k)
        finally:
            spent["t"] += time.perf_counter() - t
    return g
d = sys.argv[1]
budget = sys.argv[2]
eng = load(d, decode="fast", expert_budget=budget)
prompt = "hello there " * 40
def one(n=64):
    r = GenerationRequest.from_prompt(None, prompt, max_new_tokens=n, ignore_eos=True)
    eng.generate_requests([r])
    return r
one(8)
res, toks = {}, {}
for rep in range(int(os.environ.get("REPS", "8"))):
    for mode in (("old", "new") if rep % 2 == 0 else ("new", "old")):
        fsm.FastStep._claim = timed(OLD if mode == "old" else NEW)
        spent["t"] = 0.0
        r = one()
        steps = len(r.token_ids) - 1
        res.setdefault(mode, {"claim_us_per_step": [], "decode_ms_per_token": [], "misses": []})
        res[mode]["claim_us_per_step"].append(spent["t"] * 1e6 / steps)
        res[mode]["decode_ms_per_token"].append(r.stats["tpot_s"] * 1e3)
        res[mode]["misses"].append(r.stats["misses"])
        toks.setdefault(mode, set()).add(tuple(r.token_ids))
out = {m: {k: round(statistics.median(v), 2) for k, v in d_.items()} for m, d_ in res.items()}
out["same_tokens"] = toks["old"] == toks["new"] and len(toks["old"]) == 1
out["model"], out["budget"] = d, budget
print(json.dumps(out))
