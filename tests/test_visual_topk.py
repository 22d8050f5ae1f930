"""`--visual-top-k K`: each visual token of a prompt keeps its K heaviest routed experts. The trim itself (kept
pairs, weights, dropped marks), the rows it touches in a real model (visual rows of the prefill only, in batches
with padding and after compression too), offloading still lossless under it, and its bad values refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.engine.visual_topk import VisualTopK
from vismmoe.errors import UserError
from vismmoe.offload.trace import RoutingTrace, routing_metrics
from vismmoe.step.loop import visual_rows

from .conftest import FAMILIES, TEXT_FAMILIES, quarter_and_smallest

PROMPT = "What is in the picture?"
LONGER = "Describe every object in the picture, its colour and where it is, in a few words each."


def test_the_trim_keeps_each_visual_rows_heaviest_pairs():
    index = torch.tensor([[3, 1, 7, 5], [0, 2, 4, 6], [6, 5, 4, 3], [1, 2, 3, 0]])
    weights = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2], [0.7, 0.1, 0.1, 0.1]])
    trim = VisualTopK(2)
    trim.begin_step("prefill", torch.tensor([1, 0, 1, -1], dtype=torch.int8))
    idx, w, dropped = trim.trim(index, weights)
    assert dropped.tolist() == [[True, False, True, False], [False] * 4, [False, True, False, True], [False] * 4]
    # text and padding rows as the router gave them
    assert torch.equal(idx[1], index[1]) and torch.equal(w[1], weights[1])
    assert torch.equal(idx[3], index[3]) and torch.equal(w[3], weights[3])
    # a dropped pair names its token's heaviest expert (needed anyway) with weight 0; the kept weights sum to the total
    assert idx[0].tolist() == [1, 1, 1, 5] and idx[2].tolist() == [6, 4, 4, 4]
    assert w[0].tolist() == pytest.approx([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7])
    assert w[2].tolist() == pytest.approx([0.25 / 0.55, 0.0, 0.3 / 0.55, 0.0])
    # bf16 weights stay bf16
    assert trim.trim(index, weights.bfloat16())[1].dtype == torch.bfloat16


def test_the_trim_leaves_decode_text_and_mismatched_steps_alone():
    index, weights = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    trim = VisualTopK(1)
    for kind, modality in (("decode", None), ("prefill", torch.zeros(2, dtype=torch.int8)), ("prefill", None)):
        trim.begin_step(kind, modality)
        got = trim.trim(index, weights)
        assert got[0] is index and got[1] is weights and got[2] is None
    trim.begin_step("prefill", torch.ones(3, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="announced 3 rows, the layer routes 2"):
        trim.trim(index, weights)
    with pytest.raises(ValueError):
        VisualTopK(0)


def test_visual_rows_mark_padding():
    visual = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    live = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert visual_rows(visual, live).tolist() == [-1, 1, 1, 0, 1, 1, 0, 0]


def _trace(eng, image, prompt):
    tr = RoutingTrace()
    eng.record_trace(tr)
    try:
        gen = eng.generate(image, prompt, max_new_tokens=4)
    finally:
        eng.record_trace(None)
    return gen, tr


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_rows_of_the_prefill_route_to_k_experts(family, tiny_dirs, big_image):
    base = load(tiny_dirs[family])
    _, full = _trace(base, big_image, PROMPT)
    _, cut = _trace(base.fork(visual_top_k=1), big_image, PROMPT)
    pre, pre_full = cut.steps[0], full.steps[0]
    visual = pre["modality"] == 1
    assert pre["kind"] == "prefill" and visual.any() and (~visual).any()
    first = min(pre["layers"])
    idx, w = pre["layers"][first]
    idx_full, w_full = pre_full["layers"][first]
    # the first MoE layer sees the same input either way: text rows routed alike, visual rows keep their heaviest
    assert np.array_equal(idx[~visual], idx_full[~visual])
    heaviest = np.take_along_axis(idx_full, np.argmax(w_full, axis=1)[:, None], axis=1)[:, 0]
    assert np.array_equal(idx[visual][:, 0], heaviest[visual]) and (idx[visual] == heaviest[visual][:, None]).all()
    for layer, (idx, w) in pre["layers"].items():
        assert all(len(set(row)) == 1 for row in idx[visual].tolist()), layer
        assert (w[visual].astype(np.float32) > 0).sum(axis=1).max() == 1
    E = base.geometry.num_experts
    assert routing_metrics(cut, E, 1)["working_set"] <= routing_metrics(full, E, 1)["working_set"]
    assert _trace(base.fork(visual_top_k=1), big_image, PROMPT)[0].stats["visual_top_k"] == 1
    assert base.fork(visual_top_k=1).generate(None, PROMPT, max_new_tokens=2).stats["visual_top_k"] == 0
    # decode steps keep the model's top-k
    assert all(len(set(row)) == 2 for s in cut.steps[1:] for idx, _ in s["layers"].values() for row in idx.tolist())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_offloading_stays_lossless_with_the_trim(family, policy, tiny_dirs, big_image):
    d = tiny_dirs[family]
    ref = load(d, visual_top_k=1).generate(big_image, PROMPT, max_new_tokens=6).token_ids
    for budget in quarter_and_smallest(d):
        eng = load(d, visual_top_k=1, expert_budget=budget, policy=policy, prefetch="gate")
        gen = eng.generate(big_image, PROMPT, max_new_tokens=6)
        assert gen.token_ids == ref, (budget, policy)
        assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]


@pytest.mark.parametrize("compress", ["none", "divprune"])
def test_each_row_of_a_padded_batch_gets_what_it_gets_alone(compress, tiny_dirs, big_image, image_file):
    opts = dict(visual_top_k=1, expert_budget="25%")
    if compress != "none":
        opts.update(compress=compress, keep_ratio=0.5)
    eng = load(tiny_dirs["qwen3_vl_moe"], **opts)
    alone = [eng.generate(img, p, max_new_tokens=5).token_ids for img, p in ((big_image, PROMPT),
                                                                            (image_file, LONGER))]
    both = eng.generate_batch([big_image, image_file], [PROMPT, LONGER], max_new_tokens=5)
    assert [g.token_ids for g in both] == alone


@pytest.mark.parametrize("argv,needle", [
    (["--visual-top-k", "2"], "--visual-top-k 2 is not below the model's top-k (2): give 1, or 0 (off)"),
    (["--visual-top-k", "-1"], "--visual-top-k -1 is negative"),
    (["--visual-top-k", "x"], "--visual-top-k"),
])
def test_bad_values_are_one_line_exit_2(argv, needle, tiny_dirs, capsys):
    model = tiny_dirs["qwen3_vl_moe"]
    capsys.readouterr()                 # the fixture's own output, when it makes the model first
    code = main(["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "1"] + argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and needle in err, err


def test_text_only_models_and_forks_refuse_it(tiny_dirs):
    with pytest.raises(UserError, match="text-only model"):
        load(tiny_dirs[TEXT_FAMILIES[0]], visual_top_k=1)
    eng = load(tiny_dirs["qwen3_vl_moe"])
    with pytest.raises(UserError, match=r"--visual-top-k 2 is not below the model's top-k \(2\)"):
        eng.fork(visual_top_k=2)


def test_switching_it_on_an_engine(tiny_dirs, big_image):
    """`set_compression` switches the trim with the compressor (what the bench's resident runs and analyze do):
    on, the prompt's logits of an engine loaded with it; off again, the plain engine's; None keeps it."""
    d = tiny_dirs["qwen3_vl_moe"]
    eng = load(d)
    inputs = eng.prepare([big_image], [PROMPT])
    plain = eng.forward_logits(inputs)
    trimmed = load(d, visual_top_k=1).forward_logits(inputs)
    assert not torch.equal(trimmed, plain)      # it changes this model's logits: the switch below is seen
    eng.set_compression("none", 1.0, 1)
    assert torch.equal(eng.forward_logits(inputs), trimmed)
    eng.set_compression("none", 1.0)
    assert eng.rc.visual_top_k == 1 and eng.step_observers.count(eng.runtime.trim) == 1
    eng.set_compression("none", 1.0, 0)
    assert eng.runtime.trim is None and torch.equal(eng.forward_logits(inputs), plain)


def test_cpu_experts_skip_the_dropped_pairs(tiny_dirs, big_image):
    """With --cpu-experts on, a dropped pair reaches the host as expert id E (none), so the host computes no pair
    for it; the tokens stay those of the trimmed model with every expert resident (CPU: same summation here)."""
    from vismmoe.cpu.hybrid import CpuSide
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, visual_top_k=1).generate(big_image, PROMPT, max_new_tokens=5).token_ids
    eng = load(d, visual_top_k=1, cpu_experts="on", expert_budget=quarter_and_smallest(d)[1])
    E, seen = eng.geometry.num_experts, []
    compute = CpuSide.compute

    def spy(self, pos, h, idx, *a, **k):
        seen.append(int((idx == E).sum()))
        return compute(self, pos, h, idx, *a, **k)
    CpuSide.compute = spy
    try:
        assert eng.generate(big_image, PROMPT, max_new_tokens=5).token_ids == ref
    finally:
        CpuSide.compute = compute
    assert seen and max(seen) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_offloading_stays_lossless_with_the_trim(family, tiny_dirs, big_image):
    """bf16 on the GPU, the fast decode step: the trimmed prefill (the runtime's layer calls, dropped pairs skipped)
    gives the tokens of the trimmed model with every expert resident, at every budget, within the budget."""
    d = tiny_dirs[family]
    base = load(d, device="cuda", dtype="bfloat16", visual_top_k=1)
    ref = base.generate(big_image, PROMPT, max_new_tokens=6).token_ids
    for budget in quarter_and_smallest(d):
        for policy in ("lru", "predictive"):
            gen = base.fork(expert_budget=budget, policy=policy, prefetch="gate").generate(big_image, PROMPT,
                                                                                           max_new_tokens=6)
            assert gen.token_ids == ref, (budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
