"""Routing traces record what the routers chose, with modality, and survive a save/load round trip."""

from __future__ import annotations

import numpy as np
import torch

from vismmoe import load
from vismmoe.offload.trace import RoutingTrace


def test_trace_records_router_choices(tiny_dirs, image_file, tmp_path):
    d = tiny_dirs["glm4v_moe"]
    eng = load(d, trace=True, expert_budget="50%")
    gen = eng.generate(image_file, "What is in the picture?", max_new_tokens=4)
    steps = eng.trace.steps
    assert steps[0]["kind"] == "prefill" and all(s["kind"] == "decode" for s in steps[1:])
    assert len(steps) == len(gen.token_ids)      # prefill + one step per further token
    prefill = steps[0]
    assert int(prefill["modality"].sum()) == gen.stats["visual_tokens"]
    assert sorted(prefill["layers"]) == list(eng.geometry.moe_layers)
    idx, w = prefill["layers"][eng.geometry.moe_layers[0]]
    assert idx.shape == (len(prefill["modality"]), eng.geometry.top_k)
    assert idx.min() >= 0 and idx.max() < eng.geometry.num_experts
    # the recorded experts are what the router picks for the layer input (checked on the first MoE layer)
    layer = eng.geometry.moe_layers[0]
    seen = {}
    block = eng.family.moe_block(eng.model, layer)

    def hook(module, args, output):              # returns None: the router's output is left as it is
        seen["idx"] = output[2].clone()

    h = block.gate.register_forward_hook(hook)
    eng.generate(image_file, "What is in the picture?", max_new_tokens=1)
    h.remove()
    assert np.array_equal(seen["idx"].numpy().astype(np.int16), eng.trace.steps[-1]["layers"][layer][0])
    path = tmp_path / "trace.npz"
    eng.trace.save(str(path))
    back = RoutingTrace.load(str(path))
    assert len(back.steps) == len(eng.trace.steps)
    for a, b in zip(back.steps, eng.trace.steps):
        assert a["kind"] == b["kind"] and np.array_equal(a["modality"], b["modality"])
        for layer in b["layers"]:
            assert np.array_equal(a["layers"][layer][0], b["layers"][layer][0])
    assert torch.is_tensor(torch.from_numpy(back.steps[0]["layers"][layer][1]))


def _two_layer_trace(a: list, b: list, modality: list) -> RoutingTrace:
    tr = RoutingTrace()
    tr.begin_step("prefill", torch.tensor(modality, dtype=torch.int8))
    w = np.ones((len(a), len(a[0])), dtype=np.float16)
    tr.steps[-1]["layers"] = {0: (np.array(a, dtype=np.int16), w), 1: (np.array(b, dtype=np.int16), w)}
    return tr


def test_metrics_count_each_tokens_distinct_experts_once():
    """A row naming an expert twice (the pairs --visual-top-k dropped name the token's heaviest expert again) counts
    it once, and stability guesses as many experts as the token has: layer 0's expert predicts layer 1's exactly."""
    from vismmoe.offload.trace import layer_counts, stability
    tr = _two_layer_trace([[1, 1], [2, 2], [1, 1]], [[3, 3], [4, 4], [3, 3]], [1, 1, 1])
    assert layer_counts(tr, 5)[0].tolist() == [0, 2, 1, 0, 0]
    assert stability(tr, 5) == 1.0
    # untrimmed rows as before: two guesses each, both right
    tr = _two_layer_trace([[1, 2], [3, 4], [1, 2]], [[0, 1], [0, 2], [0, 1]], [1, 1, 1])
    assert layer_counts(tr, 5)[0].tolist() == [0, 2, 2, 1, 1]
    assert stability(tr, 5) == 1.0


def test_padding_rows_are_left_out():
    from vismmoe.offload.trace import layer_counts
    tr = _two_layer_trace([[1, 2], [3, 4]], [[1, 2], [3, 4]], [-1, 1])
    assert layer_counts(tr, 5)[0].tolist() == [0, 0, 0, 1, 1]
    assert layer_counts(tr, 5, modality=1)[0].tolist() == [0, 0, 0, 1, 1]
