"""Lookahead in decode (step/decode_prefetch.py): the fast step's greedy tokens are the same with lookahead on
and off for every predictor and policy down to the smallest legal budget, prefetches really are issued between
replays and scored, the reserved room holds, and `--prefetch none` has no lookahead at all."""

from __future__ import annotations

import pytest

from vismmoe import load
from vismmoe.tools.calibrate import calibrate, default_samples

from .conftest import FAMILIES, POLICIES, quarter_and_smallest as _budgets

PROMPT = "What is in the picture?"
NEW = 10


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_lookahead_keeps_the_tokens(family, tiny_dirs, image_file):
    """Gate lookahead (fixed depth: always on) against no prefetch, every policy, 25% and top-k slots."""
    d = tiny_dirs[family]
    want = load(d, decode="eager").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    issued = 0
    for budget in _budgets(d):
        off = load(d, expert_budget=budget, decode="fast", prefetch="none")
        on = load(d, expert_budget=budget, decode="fast", prefetch="gate", lookahead=3, fixed_lookahead=True)
        for policy in POLICIES:
            a = off.fork(policy=policy).generate(image_file, PROMPT, max_new_tokens=NEW)
            eng = on.fork(policy=policy)
            b = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
            assert a.token_ids == b.token_ids == want, (family, budget, policy)
            st = b.stats
            assert st["expert_bytes_peak"] <= st["expert_budget_bytes"]
            la = eng.fast_step().lookahead
            assert la is not None and len(la.out) <= la.room
            assert la.hits + la.wasted <= la.issued
            if policy == "none":
                assert la.issued == 0
            issued += la.issued
            if budget == "25%" and policy != "none":
                assert la.issued > 0, (family, policy)
    assert issued > 0


def test_decode_lookahead_trace_and_blend(tiny_dirs, image_file, tmp_path):
    d = tiny_dirs["qwen3_vl_moe"]
    tables, _ = calibrate(load(d), default_samples(4), depth=3, max_new_tokens=3)
    path = str(tmp_path / "cal.npz")
    tables.save(path)
    want = load(d, decode="fast", expert_budget="25%").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    for prefetch in ("trace", "blend"):
        for policy in ("lru", "predictive"):
            eng = load(d, decode="fast", expert_budget="25%", prefetch=prefetch, calibration=path, policy=policy,
                       lookahead=2, fixed_lookahead=True)
            assert eng.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == want, (prefetch, policy)
            assert eng.fast_step().lookahead.issued > 0


def test_decode_lookahead_scores_its_guesses(tiny_dirs, image_file):
    """Every decode prefetch is accounted for: used by a step, evicted unused (wasted), or still waiting; the
    cache's counters include them."""
    eng = load(tiny_dirs["glm4v_moe"], decode="fast", expert_budget="25%", prefetch="gate", fixed_lookahead=True)
    st = eng.generate(image_file, PROMPT, max_new_tokens=NEW).stats
    la = eng.fast_step().lookahead
    assert la.issued > 0
    assert la.hits + la.wasted + len(la.out) >= la.issued - eng.cache.num_slots    # the rest: taken by misses
    assert st["prefetch_issued"] >= la.issued
    assert la.model.depth == la.model.max_depth                        # fixed lookahead: the whole depth


def test_prefetch_none_has_no_decode_lookahead(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"], decode="fast", expert_budget="25%", prefetch="none")
    st = eng.generate(image_file, PROMPT, max_new_tokens=NEW).stats
    assert eng.fast_step().lookahead is None and st["prefetch_issued"] == 0


def test_adaptive_decode_lookahead_stays_exact(tiny_dirs, image_file):
    """The adaptive depth (the cost model) may turn prefetch off; tokens are the same either way."""
    d = tiny_dirs["qwen3_vl_moe"]
    want = load(d, decode="fast", expert_budget="25%").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    eng = load(d, decode="fast", expert_budget="25%", prefetch="gate", link="edge")
    assert eng.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == want
    assert eng.fast_step().lookahead.model._phases      # the step was measured


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-internvl", "tiny-qwen3.5", "tiny-deepseek-ocr2",
                                  "tiny-ernie4.5-vl"])
def test_decode_lookahead_on_every_family_shape(name):
    """The path of bench/step_ceiling.py --prefetch none,gate at a tiny size on the CPU: random weights, a
    forked engine per predictor, teacher-forced decode; the same tokens with lookahead on and off."""
    import torch

    from vismmoe.bench.random_model import random_engine, synthetic_inputs, synthetic_text_inputs
    from vismmoe.bench.shapes import SHAPES, get_shape
    from vismmoe.families import get_family
    if name not in SHAPES:
        pytest.skip(f"no shape {name}")
    fam, config = get_shape(name)
    base = random_engine(fam, config, device="cpu", dtype=torch.float32, expert_budget="100%", decode="fast")
    inputs = synthetic_inputs(base, 96) if get_family(fam).has_vision else synthetic_text_inputs(base, 40)
    teacher = [7, 8, 9, 10, 11, 12]
    off = base.fork(expert_budget="25%", prefetch="none")
    on = base.fork(expert_budget="25%", prefetch="gate", fixed_lookahead=True)
    want, _ = off.generate_ids(inputs, 7, teacher_tokens=teacher)
    got, _ = on.generate_ids(inputs, 7, teacher_tokens=teacher)
    assert got == want
    assert on.fast_step().lookahead.issued > 0


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_decode_lookahead_keeps_the_tokens(family, tiny_dirs, image_file):
    """bf16, compiled step and graphs: lookahead on gives the tokens of lookahead off, every policy, 25% and
    top-k slots; prefetches land behind the replay (copy stream) and enter the address table only once landed."""
    d = tiny_dirs[family]
    for budget in _budgets(d):
        off = load(d, device="cuda", dtype="bfloat16", decode="fast", expert_budget=budget, prefetch="none")
        on = load(d, device="cuda", dtype="bfloat16", decode="fast", expert_budget=budget, prefetch="gate",
                  lookahead=3, fixed_lookahead=True)
        for policy in POLICIES:
            want = off.fork(policy=policy).generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
            eng = on.fork(policy=policy)
            gen = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
            assert gen.token_ids == want, (family, budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
            assert eng.fast_step().graphs
            if budget == "25%" and policy != "none":
                assert eng.fast_step().lookahead.issued > 0, (family, policy)
