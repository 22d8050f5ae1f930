"""Every form of routing the families use, offloaded losslessly with the gate predictor prefetching through the
family's own routers: softmax top-k (fused prediction where it is one linear map), sigmoid plus a score-correction
bias with group-limited top-k (GLM), softmax group-limited greedy top-k (DeepSeek), bias-corrected selection with
unbiased weights (ERNIE). Tiny checkpoints with random biases and several groups; tokens equal to transformers with
every expert resident at 25% and the smallest budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vismmoe import load
from vismmoe.step.decode import cut_at_eos
from vismmoe.families import get_family
from vismmoe.offload.predict import GatePredictor
from vismmoe.tools.tiny import make_tiny

PROMPT = "What is in the picture?"

# form -> (family, make_tiny overrides, fused prediction expected)
FORMS = {
    "softmax-topk": ("internvl", {}, True),
    "softmax-greedy": ("deepseek_ocr2", {}, True),
    "softmax-group-limited": ("deepseek_ocr2", {"topk_method": "group_limited_greedy", "n_group": 4,
                                                "topk_group": 2}, False),
    "sigmoid-bias-group-limited": ("glm4v_moe", {"n_group": 4, "topk_group": 2}, False),
    "bias-corrected-two-banks": ("ernie4_5_vl_moe", {}, False),
    "residual-router": ("gemma4", {}, False),
}


@pytest.fixture(scope="module")
def form_dirs(tmp_path_factory):
    class Dirs(dict):
        def __missing__(self, form):
            fam, over, _ = FORMS[form]
            self[form] = make_tiny(fam, str(tmp_path_factory.mktemp(form)), layers=4, experts=8, top_k=2, **over)
            return self[form]

    return Dirs()


@pytest.mark.parametrize("form", sorted(FORMS))
def test_routing_form_is_offloaded_losslessly(form, form_dirs, image_file):
    fam_name, _, fused = FORMS[form]
    d = form_dirs[form]
    family = get_family(fam_name)
    ref = family.model_class.from_pretrained(d, experts_implementation="eager").eval()
    base = load(d)
    inputs = base.prepare([image_file], [PROMPT])
    with torch.no_grad():
        gen = ref.generate(**family.model_inputs(inputs), max_new_tokens=8, do_sample=False,
                           eos_token_id=sorted(base.eos_ids), pad_token_id=base.tokenizer.pad_token_id)
    want = cut_at_eos(gen[0, inputs["input_ids"].shape[1]:].tolist(), base.eos_ids)
    assert (family.stacked_router_weight(base.model) is not None) == fused
    issued = 0
    for budget in ("25%", str(base.geometry.top_k * base.layout.nbytes)):
        eng = base.fork(expert_budget=budget, prefetch="gate", fixed_lookahead=True, policy="predictive")
        assert eng.generate(image_file, PROMPT, max_new_tokens=8).token_ids == want, (form, budget)
        issued += eng.cache.counters.total().prefetch_issued
    assert issued > 0


@pytest.mark.parametrize("form", ["softmax-topk", "softmax-greedy"])
def test_fused_prediction_equals_the_routers(form, form_dirs):
    """Where routers are the top-k of one linear map, one matmul over the stacked routers ahead predicts what
    calling each router does."""
    eng = load(form_dirs[form])
    geo, fam = eng.geometry, eng.family
    routers = {l: fam.router(eng.model, l) for l in geo.moe_layers}
    fused = GatePredictor(routers, geo.moe_layers, geo.num_experts, 2, stacked=fam.stacked_router_weight(eng.model),
                          top_k=geo.top_k)
    plain = GatePredictor(routers, geo.moe_layers, geo.num_experts, 2)
    hidden = torch.randn(29, geo.hidden, generator=torch.Generator().manual_seed(0))
    layer = geo.moe_layers[0]
    for pred in (fused, plain):
        pred.observe(layer, hidden, None, None)
    for depth in (1, 2):
        assert np.array_equal(fused.predict(layer, depth), plain.predict(layer, depth))


def test_random_biases_move_the_choice(form_dirs):
    """The tiny checkpoints' score-correction biases are not zero, so bias-corrected selection is exercised."""
    eng = load(form_dirs["sigmoid-bias-group-limited"])
    bias = eng.family.router(eng.model, eng.geometry.moe_layers[0]).e_score_correction_bias
    assert bias.abs().sum() > 0
