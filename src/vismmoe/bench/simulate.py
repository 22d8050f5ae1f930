"""Replay routing traces through eviction policies without moving any weights: hit rates per policy and budget.

The replay mirrors the runtime's bookkeeping exactly (schedule.plan_waves for calls that need more experts than
slots, the cache's claim/touch/evict order, on_layer before every layer call) but without data, so a policy's
hit rate over a long stream of requests costs milliseconds. Predictor hints are not replayed (the predictive
policy runs on its frequency estimates alone here).
"""

from __future__ import annotations

from ..policies import make_policy
from ..schedule import plan_waves
from ..trace import RoutingTrace
from .bound import layer_calls


def replay(calls: list[tuple[int, set[int]]], capacity: int, policy: str, moe_layers, num_experts: int) -> dict:
    future = [{(l, e) for e in es} for l, es in calls]
    pol = make_policy(policy, moe_layers=moe_layers, num_experts=num_experts, future=future)
    resident: set = set()
    hits = misses = 0
    for layer, experts in calls:
        pol.on_layer(layer)
        res = {e for e in experts if (layer, e) in resident}
        for wave in plan_waves(sorted(experts), res, capacity):
            pinned = {(layer, e) for e in wave}
            for e in wave:
                key = (layer, e)
                if key in resident:
                    hits += 1
                    pol.on_use(key)
                    continue
                misses += 1
                if len(resident) >= capacity:
                    victim = pol.choose_victim(pinned)
                    resident.discard(victim)
                    pol.on_evict(victim)
                resident.add(key)
                pol.on_insert(key)
                pol.on_use(key)
        if not pol.retain:
            for e in experts:
                if (layer, e) in resident:
                    resident.discard((layer, e))
                    pol.on_evict((layer, e))
    return {"policy": policy, "capacity": capacity, "hits": hits, "misses": misses,
            "hit_rate": hits / max(1, hits + misses)}


def policy_table(traces, moe_layers, num_experts, shares=(0.10, 0.25, 0.50),
                 policies=("lru", "lfu", "lfru", "predictive", "belady")) -> list[dict]:
    calls = layer_calls(traces)
    total = len(moe_layers) * num_experts
    rows = []
    for share in shares:
        cap = max(1, int(total * share))
        for p in policies:
            rows.append(dict(replay(calls, cap, p, moe_layers, num_experts), budget=share))
    return rows


def main(argv=None) -> None:
    """`python -m vismmoe.bench.simulate [--model DIR] [--limit N] [--compress NAME --keep-ratio R]`: record
    routing over N test requests in a row, replay it through every policy at 10/25/50%, print the table."""
    import argparse
    import json

    from ..data import balanced_subset
    from ..demo import default_model
    from ..engine import load
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--compress", default="none")
    ap.add_argument("--keep-ratio", type=float, default=1.0)
    args = ap.parse_args(argv)
    eng = load(args.model or default_model()[0], compress=args.compress, keep_ratio=args.keep_ratio)
    tr = RoutingTrace()
    eng.record_trace(tr)
    for s in balanced_subset("test", args.limit):
        eng.generate(s.image, s.question, max_new_tokens=4)
    rows = policy_table([tr], eng.geometry.moe_layers, eng.geometry.num_experts)
    for r in rows:
        print(f"{r['budget']:.0%} {r['policy']:11s} hit rate {r['hit_rate']:.3f}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
