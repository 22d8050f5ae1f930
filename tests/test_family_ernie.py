"""ERNIE 4.5 VL MoE's two expert banks: a narrow (vision) expert in a wider slot computes what it computes alone;
the hub layout make-tiny writes (one per-expert list of 2E, transposed routers, one joint score bias); vision
experts serve the prompt's image tokens and leave the cache once the prompt is done; `moe_mm_token_type_ids`
reaches the model (without it the logits change: every token would go to the text experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors import safe_open

from vismmoe import load
from vismmoe.families.ernie4_5_vl_moe import VISION_GROUPS, bank_group, group_bank
from vismmoe.formats import DenseFormat

FAMILY = "ernie4_5_vl_moe"


def _expert(x, gate_up, down):
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down.T


def test_narrow_expert_in_a_wide_slot_computes_the_same():
    torch.manual_seed(0)
    H, I, i = 24, 12, 4
    layout = DenseFormat(H, I, torch.float32)
    gate_up, down, x = torch.randn(2 * i, H), torch.randn(H, i), torch.randn(5, H)
    blob = layout.pack(gate_up, down, torch.full((layout.numel,), float("nan")))
    wide_gu, wide_dn = layout.views(blob[None])
    assert torch.allclose(_expert(x, wide_gu[0], wide_dn[0]), _expert(x, gate_up, down), atol=1e-5)
    assert not torch.isnan(blob).any()


def test_bank_groups_round_trip():
    for layer in (0, 3, 47):
        for bank in ("text", "vision"):
            assert group_bank(bank_group(layer, bank)) == (layer, bank)
    assert bank_group(3, "vision") == VISION_GROUPS + 3


def test_make_tiny_writes_the_hub_layout(tiny_dirs):
    eng = load(tiny_dirs[FAMILY])
    tc = eng.config.text_config
    E, (I_text, I_vis), H = tc.moe_num_experts, tc.moe_intermediate_size, tc.hidden_size
    assert I_vis < I_text and eng.geometry.inter == I_text
    with safe_open(f"{tiny_dirs[FAMILY]}/model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert list(f.get_slice("model.layers.1.mlp.experts.0.gate_proj.weight").get_shape()) == [I_text, H]
        assert list(f.get_slice(f"model.layers.1.mlp.experts.{E}.gate_proj.weight").get_shape()) == [I_vis, H]
        assert list(f.get_slice("model.layers.1.mlp.gate.weight_1").get_shape()) == [H, E]         # transposed
        assert list(f.get_slice("model.layers.1.mlp.moe_statics.e_score_correction_bias").get_shape()) == [2, E]
    assert not any("text_moe" in k or "vision_moe" in k for k in keys)
    # the loaded routers are the stored ones, transposed, and each bank got its half of the score bias
    with safe_open(f"{tiny_dirs[FAMILY]}/model.safetensors", "pt") as f:
        vis_gate = f.get_tensor("model.layers.1.mlp.gate.weight_1")
        bias = f.get_tensor("model.layers.1.mlp.moe_statics.e_score_correction_bias")
    block = eng.model.model.language_model.layers[1].mlp
    assert torch.equal(block.vision_moe.gate.weight, vis_gate.t())
    assert torch.equal(block.text_moe.gate.moe_statics.e_score_correction_bias, bias[:1])
    assert torch.equal(block.vision_moe.gate.moe_statics.e_score_correction_bias, bias[1:])


def test_vision_experts_serve_the_prompt_then_leave(tiny_dirs, image_file):
    base = load(tiny_dirs[FAMILY])
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    eng = base.fork(expert_budget=smallest, prefetch="gate", fixed_lookahead=True)
    gen = eng.generate(image_file, "What is in the picture?", max_new_tokens=6)
    counters = eng.per_layer_counters()
    vision = [g for g in eng.geometry.moe_layers if g >= VISION_GROUPS]
    assert vision and set(vision) == set(eng.geometry.prefill_only)
    assert sum(counters[g]["misses"] for g in vision) > 0                   # image tokens used the vision bank
    assert not any(k[0] in vision for k in eng.cache.slot_of)               # and it left after the prefill
    assert gen.token_ids


def test_moe_token_types_reach_the_model(tiny_dirs, image_file):
    """Without `moe_mm_token_type_ids` every token goes to the text experts: other logits. The prepared inputs
    always carry it, marking image tokens and the image start/end tokens."""
    eng = load(tiny_dirs[FAMILY])
    inputs = eng.prepare([image_file], ["What is in the picture?"])
    moe = inputs["moe_mm_token_type_ids"]
    assert int(moe.sum()) == int(inputs["mm_token_type_ids"].sum()) + 2
    with torch.no_grad():
        with_types = eng.forward_logits(inputs)
        without = eng.forward_logits({k: v for k, v in inputs.items() if k != "moe_mm_token_type_ids"})
    assert not torch.allclose(with_types, without)


def test_trace_predictors_calibrate_per_bank_and_stay_lossless(tiny_dirs, image_file, tmp_path):
    """Transition tables pair layers that saw the same tokens (a bank's own chain; decode steps without vision
    banks still count), and the trace and blend predictors then prefetch without changing a token."""
    from vismmoe.tools.calibrate import calibrate, default_samples
    d = tiny_dirs[FAMILY]
    base = load(d)
    tables, rows = calibrate(base.fork(expert_budget="100%"), default_samples(3), depth=2)
    path = str(tmp_path / "cal.npz")
    tables.save(path)
    vis = [p for p, g in enumerate(base.geometry.moe_layers) if g >= VISION_GROUPS]
    assert tables.tables[1][vis[0]].sum() > 0                       # vision bank -> next vision bank counted
    want = base.generate(image_file, "What is in the picture?", max_new_tokens=6).token_ids
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for prefetch in ("trace", "blend"):
        eng = load(d, expert_budget=smallest, prefetch=prefetch, calibration=path, fixed_lookahead=True)
        assert eng.generate(image_file, "What is in the picture?", max_new_tokens=6).token_ids == want, prefetch
