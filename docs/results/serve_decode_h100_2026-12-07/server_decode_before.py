"""Where vismmoe's server decode goes at 25% on q30-L4 (FreeToken bench: 2.3 ms/token vs 1.0 resident): the
running batch in-process, capacity 1 vs 8, resident vs 25%, one 2048-token prompt, 128 new tokens."""
import json, os, statistics, subprocess, sys, time
import numpy as np, torch
from vismmoe import load
from vismmoe.engine.request import GenerationRequest
from vismmoe.engine.running import RunningBatch
from vismmoe.bench.freetoken import make_prompts
OUT = os.environ.get("OUT", ".")
d = "/tmp/q30-L4"
t0 = time.time()
if not os.path.exists(d + "/config.json"):
    subprocess.run([sys.executable, "-m", "vismmoe", "make-shape", "--shape", "qwen3-30b-a3b", "--layers", "4",
                    "--device", "cuda", "--out", d], check=True)
print("shape at", round(time.time() - t0), "s", flush=True)
prompts = make_prompts(d, 2048, 8)
base = load(d, device="cuda", expert_budget="100%", cpu_experts="off")
engines = {"all": base, "25%": base.fork(expert_budget="1207959552"),
           "25%pred": base.fork(expert_budget="1207959552", policy="predictive")}
print("loaded at", round(time.time() - t0), "s", flush=True)
res = {}
def run(eng, cap, prompt, n=128):
    fast = eng.fast_step()
    s0, g0 = (len(fast.step_s), len(fast.gap_s)) if fast is not None else (0, 0)
    rb = RunningBatch(eng, cap)
    req = GenerationRequest.from_prompt(None, prompt, max_new_tokens=n)
    t = time.perf_counter(); tf = None
    done = rb.admit(req)
    steps = 0
    while len(rb):
        rb.step(); steps += 1
        if tf is None and req.token_ids:
            tf = time.perf_counter()
    end = time.perf_counter()
    st = req.stats or {}
    out = {"tokens": len(req.token_ids), "steps": steps, "wall_ms_per_step": (end - t) * 1e3 / max(1, steps),
           "ttft_ms": st.get("ttft_s", 0) * 1e3, "decode_ms_tok": st.get("decode_s", 0) * 1e3 / max(1, len(req.token_ids) - 1),
           "misses": st.get("misses"), "hits": st.get("hits"), "stall_ms": st.get("stall_s", 0) * 1e3,
           "bytes_moved_MB": st.get("bytes_moved", 0) / 1e6}
    if fast is not None:
        ss, gg = fast.step_s[s0:], fast.gap_s[g0:]
        out["dev_ms_med"] = statistics.median(ss) * 1e3 if ss else None
        out["gap_ms_med"] = statistics.median(gg) * 1e3 if gg else None
        out["dev_ms_mean"] = sum(ss) * 1e3 / max(1, len(ss))
        out["gap_ms_mean"] = sum(gg) * 1e3 / max(1, len(gg))
        out["nsteps_fast"] = len(ss)
    return out, req.token_ids
toks = {}
for rep in range(3):
    for name, eng in engines.items():
        for cap in (1, 8):
            o, tk = run(eng, cap, prompts[rep])
            key = f"{name} cap{cap}"
            res.setdefault(key, []).append(o)
            toks.setdefault(rep, set()).add(str(tk))
            print(rep, key, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in o.items()}), flush=True)
print("same tokens per prompt:", {r: len(v) == 1 for r, v in toks.items()})
json.dump(res, open(os.path.join(OUT, "server_decode_diag.json"), "w"), indent=1)
