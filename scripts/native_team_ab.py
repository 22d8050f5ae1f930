"""The native decode step's team choice, side by side in one process: `TeamSize` judging the first steps after a
pause (a prefill) apart, by their mean (the default, EARLY = 3), against judging every step alike by its fastest
(EARLY = 0). Bundled model, bf16 experts, `--cpu-experts on`, 6 test requests x 32 new tokens (EOS ignored), cold
cache per request, the two choices in turn per repetition; prints one JSON line (medians and means of the
requests' decode ms/token).

    python scripts/native_team_ab.py [--budget 100%] [--reps 8] [--out FILE.json]
"""

import argparse
import json
import os
import statistics

from vismmoe import load
from vismmoe.cpu.native import decoder as native_decoder
from vismmoe.data import balanced_subset
from vismmoe.engine.request import GenerationRequest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="100%")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    eng = load(None, decode="native", expert_budget=args.budget, expert_format="bf16", cpu_experts="on",
               policy="lru", prefetch="none")
    eng.eos_ids = set()                 # decode past the bundled model's one- or two-token answers
    nat = native_decoder.native_decoder(eng)
    teams = {"EARLY=0": native_decoder.TeamSize(), "EARLY=3": native_decoder.TeamSize()}
    teams["EARLY=0"].EARLY = 0
    samples = balanced_subset("test", 6)
    tpot = {k: [] for k in teams}
    load_before = list(os.getloadavg())
    for _ in range(args.reps):
        for name, team in teams.items():
            nat.team = team
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
