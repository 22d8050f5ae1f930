"""Replay routing traces through eviction policies without moving any weights: hit rates per policy and budget.

The replay mirrors the runtime's bookkeeping exactly (schedule.plan_waves for calls that need more experts than
slots, the cache's claim/touch/evict order, on_layer before every layer call) but without data, so a policy's
hit rate over a long stream of requests costs milliseconds. Predictor hints are not replayed (the predictive
policy runs on its frequency estimates alone here).
"""

from __future__ import annotations

from ..offload.policies import make_policy
from ..offload.schedule import plan_waves
from ..offload.trace import RoutingTrace
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
    routing over N test requests in a row, replay it through every policy at 10/25/50%, print the table.
    `--traces F [F ...]`: replay saved routing traces instead (`vismmoe bench --save-traces`), as one stream in the
    order given, with Belady's misses for the same stream."""
    import argparse
    import json

    from .bound import access_groups, belady_misses
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--compress", default="none")
    ap.add_argument("--keep-ratio", type=float, default=1.0)
    ap.add_argument("--traces", nargs="+", default=None, metavar="NPZ")
    ap.add_argument("--num-experts", type=int, default=None, help="with --traces (default: the largest seen + 1)")
    ap.add_argument("--policies", default="lru,lfu,lfru,predictive:short=0,predictive")
    args = ap.parse_args(argv)
    policies = tuple(args.policies.split(","))
    if args.traces:
        traces = [RoutingTrace.load(f) for f in args.traces]
        calls = layer_calls(traces)
        moe_layers = sorted({l for l, _ in calls})
        num_experts = args.num_experts or 1 + max(max(es) for _, es in calls)
        groups = [g for tr in traces for g in access_groups(tr)]
        rows = policy_table(traces, moe_layers, num_experts, policies=policies)
        for share in sorted({r["budget"] for r in rows}):
            cap = max(1, int(len(moe_layers) * num_experts * share))
            rows.append({"policy": "belady", "capacity": cap, "misses": belady_misses(groups, cap), "budget": share})
    else:
        from ..data import balanced_subset
        from ..checkpoints import default_model
        from ..engine.loading import load
        eng = load(args.model or default_model()[0], compress=args.compress, keep_ratio=args.keep_ratio)
        tr = RoutingTrace()
        eng.record_trace(tr)
        for s in balanced_subset("test", args.limit):
            eng.generate(s.image, s.question, max_new_tokens=4)
        rows = policy_table([tr], eng.geometry.moe_layers, eng.geometry.num_experts, policies=policies + ("belady",))
    for r in sorted(rows, key=lambda r: r["budget"]):
        rate = f"hit rate {r['hit_rate']:.3f}" if "hit_rate" in r else ""
        print(f"{r['budget']:.0%} {r['policy']:19s} misses {r['misses']:7d} {rate}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
