"""A/B on the CPU: the slot cache takes an adopted slot off its free list with list.remove (old: scans from the
start) or from the end (new), alternating in one process. thin-48x128 (the 30B routing geometry at a tiny width,
random weights), every expert budget given, 64 teacher-forced decode tokens: the host seconds a decode step spends
in the fast step's books after the step (`FastStep._finish`, which the device waits for), and the tokens."""
import json, os, random, statistics, sys, time
import vismmoe.offload.cache as cm
import vismmoe.step.fast_step as fsm
from vismmoe.bench.random_model import random_engine, synthetic_inputs
from vismmoe.bench.shapes import get_shape


def old_unfree(self, slot):
    self._free.remove(slot)


cls = cm.ExpertCache
NEW = cls._unfree
spent = {"t": 0.0}
orig = fsm.FastStep._finish


def timed(self, *a, **k):
    t = time.perf_counter()
    try:
        return orig(self, *a, **k)
    finally:
        spent["t"] += time.perf_counter() - t


fsm.FastStep._finish = timed
fam, cfg = get_shape("thin-48x128")
budget = sys.argv[1] if len(sys.argv) > 1 else "100%"
base = random_engine(fam, cfg, device="cpu", dtype="float32", expert_budget=budget, decode="fast", seed=0)
inputs = synthetic_inputs(base, 160)
rng = random.Random(0)
teacher = [rng.randrange(10, 500) for _ in range(64)]
base.generate_ids(inputs, 4)
res, toks = {}, {}
for rep in range(int(os.environ.get("REPS", "6"))):
    for mode in (("old", "new") if rep % 2 == 0 else ("new", "old")):
        cls._unfree = old_unfree if mode == "old" else NEW
        base.cache.clear()
        spent["t"] = 0.0
        tk, st = base.generate_ids(inputs, 64, teacher_tokens=teacher)
        res.setdefault(mode, []).append(spent["t"] * 1e6 / 63)
        toks.setdefault(mode, set()).add(str(tk))
out = {m: round(statistics.median(v), 1) for m, v in res.items()}
out = {"finish_us_per_step_median": out, "all": res, "same_tokens": len(toks["old"] | toks["new"]) == 1,
       "budget": budget, "shape": "thin-48x128", "reps": len(res["old"])}
print(json.dumps(out))
