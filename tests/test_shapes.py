"""Named random-weight shapes (bench/shapes.py): each config builds, its model skeleton builds on the meta device
(no memory), and the expert geometry is the published checkpoint's."""

from __future__ import annotations

import pytest

from vismmoe.bench.shapes import SHAPES, get_shape
from vismmoe.engine.loading import skeleton
from vismmoe.families import get_family

# shape -> (MoE layers, experts, top-k, hidden, expert intermediate, decoder layers)
PUBLISHED = {
    "qwen3-vl-30b-a3b": (48, 128, 8, 2048, 768, 48),
    "qwen3-30b-a3b": (48, 128, 8, 2048, 768, 48),
    "internvl3.5-30b-a3b": (48, 128, 8, 2048, 768, 48),
    "qwen3.5-35b-a3b": (40, 256, 8, 2048, 512, 40),
    "deepseek-ocr2": (11, 64, 6, 1280, 896, 12),
    "gemma4-26b-a4b": (30, 128, 8, 2816, 704, 30),
    "ernie4.5-vl-28b-a3b": (54, 64, 6, 2560, 1536, 28),          # 27 layers x (text bank, vision bank of 512)
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shape_geometry_on_meta(name):
    fam_name, config = get_shape(name)
    family = get_family(fam_name)
    geo = family.geometry(config)
    moe, E, K, H, I, layers = PUBLISHED[name]
    assert (len(geo.moe_layers), geo.num_experts, geo.top_k, geo.hidden, geo.inter) == (moe, E, K, H, I)
    model = skeleton(family, config)
    assert len(family.decoder_layers(model)) == layers
    banks = family.expert_banks(config)
    for l in geo.moe_layers:
        experts = family.moe_block(model, l).experts
        bank = banks.get(family.expert_prefix(l))
        i = bank.inter if bank is not None and bank.inter is not None else I
        assert experts.gate_up_proj.device.type == "meta"
        assert tuple(experts.gate_up_proj.shape) == (E, 2 * i, H) and tuple(experts.down_proj.shape) == (E, H, i)
    if fam_name == "ernie4_5_vl_moe":                # vision banks 512 wide, a third of the text banks' slots
        assert sorted({b.inter for b in banks.values()}) == [512, 1536] and len(geo.prefill_only) == 27
    if fam_name == "qwen3_5_moe":                  # 3 of every 4 layers linear attention, layer 0 among them
        types = config.text_config.layer_types
        assert types.count("linear_attention") == 30 and not hasattr(family.decoder_layers(model)[0], "self_attn")
    if fam_name == "internvl":
        from vismmoe.families.internvl import tokens_per_tile
        assert tokens_per_tile(config) == 256
    if fam_name == "qwen3_moe":                    # Qwen/Qwen3-30B-A3B's config.json, text only
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.vocab_size,
                config.norm_topk_prob, config.max_position_embeddings) == (32, 4, 128, 151936, True, 40960)
        assert type(model).__name__ == "Qwen3MoeForCausalLM" and not hasattr(model.model, "visual")


def test_every_shape_has_a_known_family():
    for name, (fam, _) in SHAPES.items():
        assert get_family(fam).model_type == fam, name


@pytest.mark.parametrize("name", sorted(n for n in SHAPES if n.startswith("tiny-")))
def test_tiny_shapes_run_on_random_weights(name):
    """`vismmoe bench --shape` runs through random_engine and synthetic_inputs (synthetic_text_inputs for a
    text-only family): a tiny shape of every family answers a synthetic request on the CPU, the same tokens at 25% as with every expert resident."""
    import torch

    from vismmoe.bench.random_model import random_engine, synthetic_inputs, synthetic_text_inputs
    fam, config = get_shape(name)
    eng = random_engine(fam, config, device="cpu", dtype=torch.float32, expert_budget="100%")
    if get_family(fam).has_vision:
        inputs = synthetic_inputs(eng, 96)
        assert int(inputs["mm_token_type_ids"].sum()) > 0
    else:                                           # text-only shapes: `bench --shape --prompt-tokens`
        inputs = synthetic_text_inputs(eng, 40)
        assert inputs["input_ids"].shape == (1, 40) and not inputs["mm_token_type_ids"].any()
    want, _ = eng.generate_ids(inputs, 4, teacher_tokens=[7, 8, 9])
    got, stats = eng.fork(expert_budget="25%").generate_ids(inputs, 4, teacher_tokens=[7, 8, 9])
    assert got == want and stats["misses"] > 0


@pytest.mark.parametrize("name", sorted(n for n in SHAPES if n.startswith("tiny-")))
def test_tiny_shapes_run_the_fast_step(name):
    """What `vismmoe bench --shape` and bench/step_ceiling.py compare on the GPU (fast against eager decode, every
    expert resident), at a tiny size on the CPU: the fast step runs every family that no longer has a blocker and
    gives the eager step's tokens; a family still blocked says why (one line)."""
    import torch

    from vismmoe.bench.random_model import random_engine, synthetic_inputs, synthetic_text_inputs
    from vismmoe.step.fast_step import unsupported_reason
    fam, config = get_shape(name)
    eager = random_engine(fam, config, device="cpu", dtype=torch.float32, expert_budget="100%", decode="eager")
    why = unsupported_reason(eager)
    if get_family(fam).fast_step_blocker is not None:
        assert why is not None and "\n" not in why
        return
    assert why is None
    inputs = synthetic_inputs(eager, 96) if get_family(fam).has_vision else synthetic_text_inputs(eager, 40)
    want, _ = eager.generate_ids(inputs, 5, teacher_tokens=[7, 8, 9, 10])
    fast = eager.fork(decode="fast")
    got, _ = fast.generate_ids(inputs, 5, teacher_tokens=[7, 8, 9, 10])
    assert got == want and len(fast.fast_step().step_s) == 4


@pytest.mark.parametrize("name", ["tiny-internvl", "tiny-qwen3.5", "tiny-deepseek-ocr2", "tiny-gemma4",
                                  "tiny-ernie4.5-vl"])
def test_bench_shape_through_the_cli(name, tmp_path, capsys):
    """`vismmoe bench --shape` on each added family's tiny shape: systems side by side, one JSON line."""
    import json

    from vismmoe.cli.app import main
    code = main(["bench", "--shape", name, "--image-sides", "64", "--max-new-tokens", "3", "--link", "edge",
                 "--budgets", "25%", "--reps", "1", "--systems", "ondemand,vismmoe", "--out", str(tmp_path), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and len(res["rows"]) == 2 and "RANDOM" in res["title"]
