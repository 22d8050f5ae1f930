"""The predictive policy told a decode step's layer calls in one go (`on_calls`, vectorised: the default) against
call by call (on_layer and on_use per layer), side by side in one process: two forks of one engine, requests in
turn. Bundled model, `--decode native` (the step whose books run between steps on the CPU), bf16 experts,
`--cpu-experts on`, the predictive policy, 6 test requests x 32 new tokens (EOS ignored), cold cache per request;
prints one JSON line (medians and means of the requests' decode ms/token).

    python scripts/policy_calls_ab.py [--budget 25%] [--reps 6] [--out FILE.json]
"""

import argparse
import functools
import json
import os
import statistics

from vismmoe import load
from vismmoe.data import balanced_subset
from vismmoe.engine.request import GenerationRequest
from vismmoe.offload.policies import _Base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = load(None, decode="native", expert_budget=args.budget, expert_format="bf16", cpu_experts="on",
                policy="predictive", prefetch="none")
    engines = {"call by call": base.fork(), "in one go": base.fork()}
    pol = engines["call by call"].cache.policy
    pol.on_calls = functools.partial(_Base.on_calls, pol)
    samples = balanced_subset("test", 6)
    tpot = {k: [] for k in engines}
    load_before = list(os.getloadavg())
    for _ in range(args.reps):
        for name, eng in engines.items():
            eng.eos_ids = set()             # decode past the bundled model's one- or two-token answers
            for s in samples:
                eng.cache.clear()
                req = GenerationRequest.from_prompt(s.image, s.question, max_new_tokens=32)
                req.ignore_eos = True
                eng.generate_requests([req])
                tpot[name].append(req.stats["tpot_s"] * 1e3)
    res = {"budget": args.budget, "reps": args.reps, "requests": len(samples), "new_tokens": 32,
           "machine": f"CPU, {os.cpu_count()} cores", "load_before": load_before, "load_after": list(os.getloadavg()),
           "tpot_ms": {k: {"median": statistics.median(v), "mean": statistics.fmean(v), "n": len(v)}
                       for k, v in tpot.items()}}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
