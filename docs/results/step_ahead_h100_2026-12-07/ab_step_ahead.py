"""A/B of the decode step launched ahead (step/fast_step.py `step_ahead`): on and off taking turns in one process.
Qwen3-30B-A3B shape cut to 4 layers (`make-shape`, random weights), one 2048-token prompt and 128 new tokens per
request, a lone row in the running batch's bucket of 8 (the server's `--max-batch 8`) and a request of
`generate` (bucket of 1), every expert resident and 25% of the experts (there also with landing off: a step that
missed then launches the next ahead too); decode ms/token (the request's TPOT), the
device time of a step and the host gap between steps (medians), the steps used and dropped ahead, and whether the
tokens match. MODEL / DEVICE / PROMPT / ROUNDS env override (a CPU dry run)."""
import json, os, statistics, subprocess, sys
from vismmoe import load
from vismmoe.engine.request import GenerationRequest
from vismmoe.engine.running import RunningBatch
from vismmoe.bench.freetoken import make_prompts
OUT = os.environ.get("OUT", ".")
d = os.environ.get("MODEL", "/tmp/q30-L4")
DEV = os.environ.get("DEVICE", "cuda")
if not os.path.exists(d + "/config.json"):
    subprocess.run([sys.executable, "-m", "vismmoe", "make-shape", "--shape", "qwen3-30b-a3b", "--layers", "4",
                    "--device", "cuda", "--out", d], check=True)
prompts = make_prompts(d, int(os.environ.get("PROMPT", "2048")), 4)
res, toks = {}, {}
for budget in ("100%", "25%"):
    eng = load(d, device=DEV, decode="fast", expert_budget=budget, cpu_experts="off")
    fast = eng.fast_step()
    default, land = fast.step_ahead, fast.land_slots
    modes = ["off", "on"] + (["off noland", "on noland"] if budget != "100%" else [])

    def run(prompt, how, n=128):
        req = GenerationRequest.from_prompt(None, prompt, max_new_tokens=n)
        s0, g0 = len(fast.step_s), len(fast.gap_s)
        if how == "bucket8":
            rb = RunningBatch(eng, 8)
            rb.admit(req)
            while len(rb):
                rb.step()
        else:
            eng.generate_requests([req])
        return req, fast.step_s[s0:], fast.gap_s[g0:]
    for how in ("bucket8", "generate"):
        run(prompts[0], how, 16)                            # compile and capture
    for rep in range(int(os.environ.get("ROUNDS", "6"))):
        for mode in (modes if rep % 2 == 0 else modes[::-1]):
            fast.step_ahead = mode.startswith("on")
            fast.land_slots = 0 if mode.endswith("noland") else land
            for how in ("bucket8", "generate"):
                if budget != "100%":
                    eng.cache.clear()
                u0, d0 = fast.ahead_used, fast.ahead_dropped
                req, ss, gg = run(prompts[1 + rep % 3], how)
                r = res.setdefault(f"{budget} {how} ahead {mode}", {"tpot_ms": [], "step_ms": [], "gap_ms": [],
                                                                     "used": [], "dropped": []})
                r["tpot_ms"].append(req.stats["tpot_s"] * 1e3)
                r["step_ms"].append(statistics.median(ss) * 1e3)
                r["gap_ms"].append(statistics.median(gg) * 1e3 if gg else 0.0)
                r["used"].append(fast.ahead_used - u0)
                r["dropped"].append(fast.ahead_dropped - d0)
                toks.setdefault((budget, how, rep % 3), {}).setdefault(mode, set()).add(tuple(req.token_ids))
    fast.step_ahead, fast.land_slots = default, land
    del eng, fast
summ = {k: {m: round(statistics.median(v), 3) for m, v in r.items()} for k, r in res.items()}
summ["same_tokens"] = all(len(set().union(*v.values())) == 1 for v in toks.values())
summ["step_ahead_default"] = default
print(json.dumps(summ, indent=1), flush=True)
json.dump({"summary": summ, "all": res}, open(os.path.join(OUT, "ab_step_ahead.json"), "w"), indent=1)
