"""Two variants of the native decode step's books side by side in one process, requests in turn: bundled model,
`--decode native`, bf16 experts, `--cpu-experts on`, 6 test requests x 32 new tokens (EOS ignored), cold cache per
request, the variants taking turns at going first; prints one JSON line (medians and means of the requests' decode
ms/token).

    python scripts/native_ab.py team [--budget 100%] [--reps 8] [--out FILE.json]
        TeamSize as the OpenMP team has it (every step judged alike by its fastest, the slower team probed every 256
        steps), as the pthread pool had it (the first 3 steps after a pause judged apart, probes every 32), and two
        threads always; the LRU policy, the variants taking turns at going first
    python scripts/native_ab.py policy [--budget 25%] [--reps 6] [--out FILE.json]
        the predictive policy told a step's layer calls in one go (`on_calls`, vectorised: the default) against
        call by call (on_layer and on_use per layer)
    python scripts/native_ab.py decoder --old DIR [--budget 25%] [--reps 8] [--out FILE.json]
        the step body built from this tree's decoder.c against one built from DIR/decoder.c (with the experts.c
        beside it: a copy of an older version); the LRU policy, one engine, each variant with its own TeamSize of
        the rule the native decoder runs with
"""

import argparse
import functools
import json
import os
import statistics

from vismmoe import load
from vismmoe.cpu.native import decoder as native_decoder
from vismmoe.data import balanced_subset
from vismmoe.engine.request import GenerationRequest
from vismmoe.offload.policies import _Base


class _Always:
    """A team rule that always asks for `n` threads (at most torch's count)."""

    def __init__(self, n: int):
        self.n, self.phase = n, 0

    def pick(self, rows: int, threads: int) -> int:
        return min(self.n, threads)

    def observe(self, rows: int, threads: int, seconds: float) -> None:
        pass


def _engine(budget: str, policy: str = "lru"):
    """The bundled model on the native step with bf16 experts computed in place (`--cpu-experts on`), no prefetch."""
    return load(None, decode="native", expert_budget=budget, expert_format="bf16", cpu_experts="on", policy=policy,
                prefetch="none")


def _team(budget: str) -> dict:
    eng = _engine(budget)
    nat = native_decoder.native_decoder(eng)
    before = native_decoder.TeamSize(early=3)
    before.PROBE = 32
    teams = {"early 0, probe 256 (now)": native_decoder.TeamSize(early=0), "early 3, probe 32": before,
             "2 threads always": _Always(2)}

    def use(team):                      # the team rule of this variant, on the one engine
        def run(req):
            nat.team = team
            eng.generate_requests([req])
        return run
    return {name: (eng, use(t)) for name, t in teams.items()}


def _decoder(budget: str, old: str) -> dict:
    from vismmoe.cpu.native import build
    eng = _engine(budget)
    nat = native_decoder.native_decoder(eng)
    libs = {"old": native_decoder._Lib(build(os.path.join(old, "decoder.c"))), "new": nat.lib}
    teams = {k: native_decoder.TeamSize(early=nat.team.early) for k in libs}     # the rule the decoder runs with

    def use(name):                      # this variant's library and its own team rule, on the one engine
        def run(req):
            nat.lib, nat.team = libs[name], teams[name]
            eng.generate_requests([req])
        return run
    return {name: (eng, use(name)) for name in libs}


def _policy(budget: str) -> dict:
    base = _engine(budget, "predictive")
    engines = {"call by call": base.fork(), "in one go": base.fork()}
    pol = engines["call by call"].cache.policy
    pol.on_calls = functools.partial(_Base.on_calls, pol)
    return {name: (eng, lambda req, eng=eng: eng.generate_requests([req])) for name, eng in engines.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("team", "policy", "decoder"))
    ap.add_argument("--old", default=None, help="decoder: the folder of the older decoder.c and experts.c")
    ap.add_argument("--budget", default=None, help="default: 100%% (team), 25%% (policy, decoder)")
    ap.add_argument("--reps", type=int, default=None, help="default: 8 (team, decoder), 6 (policy)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.what == "decoder" and not (args.old and os.path.isfile(os.path.join(args.old, "decoder.c"))):
        ap.error("decoder: --old DIR must hold the older decoder.c (and the experts.c it includes)")
    budget = args.budget or ("100%" if args.what == "team" else "25%")
    reps = args.reps or (6 if args.what == "policy" else 8)
    variants = _decoder(budget, args.old) if args.what == "decoder" else \
        (_team if args.what == "team" else _policy)(budget)
    samples = balanced_subset("test", 6)
    tpot = {k: [] for k in variants}
    load_before = list(os.getloadavg())
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:     # which goes first turns
            eng, run = variants[name]
            eng.eos_ids = set()             # decode past the bundled model's one- or two-token answers
            for s in samples:
                eng.cache.clear()
                req = GenerationRequest.from_prompt(s.image, s.question, max_new_tokens=32)
                req.ignore_eos = True
                run(req)
                tpot[name].append(req.stats["tpot_s"] * 1e3)
    res = {"compare": args.what, "budget": budget, "reps": reps, "requests": len(samples), "new_tokens": 32,
           "machine": f"CPU, {os.cpu_count()} cores", "load_before": load_before, "load_after": list(os.getloadavg()),
           "tpot_ms": {k: {"median": statistics.median(v), "mean": statistics.fmean(v), "n": len(v)}
                       for k, v in tpot.items()}}
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
