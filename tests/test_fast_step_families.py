"""The fast decode step for the families beyond the two every runtime test covers (conftest.MORE_FAMILIES): the
greedy tokens of the eager step (which tests/test_family_exactness.py ties to transformers) for every policy, at
100%, 25% and the smallest legal budget (top-k slots); a batch of two and a compressed prompt (rope deltas that are
not zero) as the eager step gives them; `--decode auto` would take the fast step on CUDA (no reason to refuse
it); the same on the GPU (bf16, compiled, graphs) under -m gpu."""

from __future__ import annotations

import pytest

from vismmoe import load
from vismmoe.families import get_family
from vismmoe.step.fast_step import unsupported_reason

# the families of conftest.MORE_FAMILIES the fast step runs (the rest say why not: test_family_exactness.py)
FAST_FAMILIES = ("internvl", "deepseek_ocr2", "ernie4_5_vl_moe", "qwen3_5_moe", "gemma4")
PROMPTS = ["What is in the picture?", "How many shapes are there?"]
NEW = 10


def _image(family, image_file):
    return image_file if get_family(family).has_vision else None


def _budgets(eng) -> list[str]:
    return ["100%", "25%", str(eng.geometry.top_k * eng.layout.nbytes)]   # the last: exactly top-k slots


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_step_matches_the_eager_step(family, tiny_dirs, image_file):
    d = tiny_dirs[family]
    image = _image(family, image_file)
    eager = load(d, decode="eager")
    want = eager.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids
    assert unsupported_reason(eager) is None
    misses = 0
    for budget in _budgets(eager):
        base = load(d, expert_budget=budget, decode="fast")
        for policy in ("lru", "lfu", "lfru", "predictive", "none"):
            eng = base.fork(policy=policy)
            gen = eng.generate(image, PROMPTS[0], max_new_tokens=NEW)
            assert gen.token_ids == want, (family, budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
            assert eng.fast_step() is not None and len(eng.fast_step().step_s) == len(want) - 1
            misses = eng.cache.counters.total().misses
    assert base.cache.num_slots == base.geometry.top_k
    assert misses > base.cache.num_slots                                   # the smallest budget really offloads


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_step_batch_and_compressed_prompt(family, tiny_dirs, image_file, big_image):
    d = tiny_dirs[family]
    image = _image(family, image_file)
    eager, fast = load(d, decode="eager", expert_budget="25%"), load(d, decode="fast", expert_budget="25%")
    assert [g.token_ids for g in fast.generate_batch([image, image], PROMPTS, NEW)] == \
        [g.token_ids for g in eager.generate_batch([image, image], PROMPTS, NEW)]
    if not get_family(family).has_vision:
        return
    want = eager.fork(compress="affinity", keep_ratio=0.3).generate(big_image, PROMPTS[0], max_new_tokens=NEW)
    got = fast.fork(compress="affinity", keep_ratio=0.3).generate(big_image, PROMPTS[0], max_new_tokens=NEW)
    assert want.stats["visual_tokens_kept"] < want.stats["visual_tokens"]
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_fast_step_counts_the_routing(family, tiny_dirs, image_file):
    """Hits + misses are exactly the distinct experts each step's routing used; decode steps book only the groups
    a decode token reaches (ERNIE: its text banks, never the prefill-only vision banks)."""
    from vismmoe.offload.trace import RoutingTrace
    eng = load(tiny_dirs[family], decode="fast", expert_budget="25%")
    tr = RoutingTrace()
    eng.record_trace(tr)
    st = eng.generate(_image(family, image_file), PROMPTS[0], max_new_tokens=NEW).stats
    used = sum(len(set(idx.flatten().tolist())) for s in tr.steps for idx, _ in s["layers"].values())
    assert st["hits"] + st["misses"] == used
    decode = [s for s in tr.steps if s["kind"] == "decode"]
    assert len(decode) == NEW - 1
    geo = eng.geometry
    assert all(set(s["layers"]) == set(geo.moe_layers) - set(geo.prefill_only) for s in decode)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_gpu_fast_step_families(family, tiny_dirs, image_file):
    """bf16 on the GPU: `--decode auto` takes the fast step; the captured, compiled step gives the tokens of
    itself with every expert resident at every budget and policy, and graph replay those of the same step run
    eagerly."""
    from vismmoe.families import get_family
    why = get_family(family).fast_step_cuda_blocker
    if why is not None:
        pytest.skip(f"{family} decodes eagerly on CUDA: {why}")
    d = tiny_dirs[family]
    image = _image(family, image_file)
    base = load(d, device="cuda", dtype="bfloat16")
    every = [(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)]
    base.runtime.preload(every)
    want = base.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids
    fs = base.fast_step()
    assert fs is not None and fs.graphs and any(b.graph is not None for b in fs.sg.buckets.values())
    plain = load(d, device="cuda", dtype="bfloat16", decode="fast", compile=False)
    plain.runtime.preload(every)
    plain.fast_step().graphs = False
    eager_tokens = plain.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids
    plain.fast_step().graphs = True
    assert plain.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids == eager_tokens
    for budget in _budgets(base):
        for policy in ("lru", "lfu", "lfru", "predictive"):
            eng = base.fork(expert_budget=budget, policy=policy)
            gen = eng.generate(image, PROMPTS[0], max_new_tokens=NEW)
            assert gen.token_ids == want, (family, budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_gpu_capture_leaves_the_decode_state(family, tiny_dirs, image_file):
    """The run that compiles and captures a bucket's step (two warm-up steps first) gives the tokens of a later
    run that only replays: the warm-ups leave no trace in the decode state (Qwen3.5's recurrent state is
    updated in place: graphs.Bucket.snapshot)."""
    d = tiny_dirs[family]
    image = _image(family, image_file)
    eng = load(d, device="cuda", dtype="bfloat16", decode="fast", compile=False)
    first = eng.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids      # captures
    assert eng.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids == first


def test_gemma4_sampled_tokens_read_the_soft_capped_logits(tiny_dirs, image_file):
    """Sampling reads the step's logits (argmax alone would not see the soft cap, a monotone map): a seeded
    sampled request decodes on the fast step as on the eager step. The tiny model's logits are below 1 (at a cap of
    30 they stay in tanh's linear part): the cap is lowered to 0.2 and the temperature to 0.05 so the cap shows."""
    from vismmoe.engine.request import GenerationRequest
    from vismmoe.engine.sampling import SamplingParams
    d = tiny_dirs["gemma4"]
    got = {}
    for decode in ("eager", "fast"):
        r = GenerationRequest.from_prompt(image_file, PROMPTS[0], max_new_tokens=NEW,
                                          sampling=SamplingParams(temperature=0.05, seed=3))
        eng = load(d, decode=decode, expert_budget="25%")
        eng.model.config.get_text_config().final_logit_softcapping = 0.2
        eng.generate_requests([r])
        got[decode] = r.token_ids
    assert got["fast"] == got["eager"]


def test_fast_step_refuses_experts_whose_activation_the_kernels_would_not_compute(tiny_dirs, monkeypatch):
    """The kernels compute the family's `expert_activation`; an experts module with another activation (Gemma 4's
    GELU-tanh module said to be SiLU) is refused, not decoded with the wrong one."""
    from vismmoe.families.gemma4 import Gemma4Family
    eng = load(tiny_dirs["gemma4"], decode="eager")
    assert unsupported_reason(eng) is None
    monkeypatch.setattr(Gemma4Family, "expert_activation", lambda self, config: "silu")
    assert "GELU" in unsupported_reason(eng)
