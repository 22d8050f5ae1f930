"""The policy replay agrees with the real runtime's counters, and Belady is never beaten."""

from __future__ import annotations

from vismmoe import load
from vismmoe.bench.simulate import layer_calls, policy_table, replay
from vismmoe.offload.trace import RoutingTrace


def test_replay_matches_runtime_counters(tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    for policy in ("lru", "lfu", "lfru", "predictive"):
        eng = load(d, expert_budget="30%", policy=policy)
        tr = RoutingTrace()
        eng.record_trace(tr)
        for prompt in ("What is in the picture?", "How many shapes are there?"):
            eng.generate(image_file, prompt, max_new_tokens=6)
        tot = eng.cache.counters.total()
        sim = replay(layer_calls([tr]), eng.cache.num_slots, policy, eng.geometry.moe_layers,
                     eng.geometry.num_experts)
        assert (sim["hits"], sim["misses"]) == (tot.hits, tot.misses), policy


def test_belady_is_an_upper_bound(tiny_dirs, image_file):
    eng = load(tiny_dirs["glm4v_moe"])
    tr = RoutingTrace()
    eng.record_trace(tr)
    for prompt in ("What is in the picture?", "Is there a red square?"):
        eng.generate(image_file, prompt, max_new_tokens=6)
    rows = policy_table([tr], eng.geometry.moe_layers, eng.geometry.num_experts, shares=(0.25, 0.5))
    for share in (0.25, 0.5):
        sub = {r["policy"]: r["hit_rate"] for r in rows if r["budget"] == share}
        assert all(sub["belady"] >= v - 1e-12 for v in sub.values())
