"""(1) Which configurations give which tokens (resident vs 25%, bucket of 1 vs 8 rows, eager). (2) Kernel times of
one decode step, a lone row in the bucket of 1 vs 8 rows (resident)."""
import json, os, statistics, subprocess, sys, time
import torch
from vismmoe import load
from vismmoe.engine.request import GenerationRequest
from vismmoe.engine.running import RunningBatch
from vismmoe.bench.freetoken import make_prompts
OUT = os.environ.get("OUT", ".")
d = "/tmp/q30-L4"
if not os.path.exists(d + "/config.json"):
    subprocess.run([sys.executable, "-m", "vismmoe", "make-shape", "--shape", "qwen3-30b-a3b", "--layers", "4",
                    "--device", "cuda", "--out", d], check=True)
prompts = make_prompts(d, 2048, 2)
base = load(d, device="cuda", expert_budget="100%", cpu_experts="off")
engines = {"all": base, "25%": base.fork(expert_budget="1207959552"), "eager": base.fork(decode="eager")}
def run(eng, cap, prompt, n=64):
    rb = RunningBatch(eng, cap)
    req = GenerationRequest.from_prompt(None, prompt, max_new_tokens=n)
    rb.admit(req)
    while len(rb):
        rb.step()
    return req.token_ids
toks = {}
for name, eng in engines.items():
    for cap in ((1, 8) if name != "eager" else (1,)):
        for i, p in enumerate(prompts):
            toks[f"{name} cap{cap} p{i}"] = run(eng, cap, p)
# generate_ids-style reference: the engine alone (no running batch)
for i, p in enumerate(prompts):
    r = GenerationRequest.from_prompt(None, p, max_new_tokens=64)
    base.generate_requests([r]); toks[f"all alone p{i}"] = r.token_ids
    r = GenerationRequest.from_prompt(None, p, max_new_tokens=64)
    engines["25%"].generate_requests([r]); toks[f"25% alone p{i}"] = r.token_ids
for i in range(len(prompts)):
    keys = [k for k in toks if k.endswith(f"p{i}")]
    ref = toks[keys[0]]
    for k in keys:
        t = toks[k]
        div = next((j for j, (a, b) in enumerate(zip(ref, t)) if a != b), None)
        print(f"{k:18s} same as {keys[0]}: {t == ref} first diff {div}", flush=True)
json.dump(toks, open(os.path.join(OUT, "tokens.json"), "w"))
# decode device time per step, a lone row, bucket of 1 vs 8 (new kernels), resident and 25%
import statistics as stx
for name in ("all", "25%"):
    eng = engines[name]
    fast = eng.fast_step()
    for rep in range(2):
        for cap in ((1, 8) if rep == 0 else (8, 1)):
            s0 = len(fast.step_s)
            t = time.perf_counter()
            run(eng, cap, prompts[1], 128)
            wall = time.perf_counter() - t
            ss = fast.step_s[s0:]
            print(f"{name} cap{cap} rep{rep}: dev median {stx.median(ss)*1e3:.3f} ms, wall {wall*1e3:.0f} ms", flush=True)

# kernel profile
from torch.profiler import profile, ProfilerActivity
for cap in (8,):
    rb = RunningBatch(base, cap)
    req = GenerationRequest.from_prompt(None, prompts[0], max_new_tokens=200)
    rb.admit(req)
    for _ in range(10):
        rb.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            rb.step()
        torch.cuda.synchronize()
    tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(f"=== cap {cap}\n" + tab, flush=True)
    open(os.path.join(OUT, f"prof_cap{cap}.txt"), "w").write(tab)
    req.cancel()
    while len(rb):
        rb.step()
