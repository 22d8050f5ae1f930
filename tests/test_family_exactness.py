"""Lossless offloading for the families beyond the two every runtime test covers (conftest.MORE_FAMILIES, and the
text-only conftest.TEXT_FAMILIES on text prompts): the greedy tokens of transformers with every expert resident
(eager experts) at 100%, 25% and the smallest legal budget (one layer's top-k), for every policy, with the gate predictor prefetching through the family's own
routers; the disk tier; a batch of two; logits within 1e-5 and bit-identical across budgets; the checkpoint in
both layouts (hub, as make-tiny writes it, and transformers' fused one); the fast step refused in one line where it
cannot run."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from vismmoe import UserError, load
from vismmoe.step.decode import cut_at_eos
from vismmoe.families import get_family

from .conftest import MORE_FAMILIES, TEXT_FAMILIES

PROMPTS = ["What is in the picture?", "How many shapes are there?"]
NEW = 10
EXACT_FAMILIES = MORE_FAMILIES + TEXT_FAMILIES


def _image(family: str, image_file: str) -> str | None:
    """The test image, or None (a text prompt) for a text-only family."""
    return image_file if get_family(family).has_vision else None


@pytest.fixture
def image(family, image_file) -> str | None:
    return _image(family, image_file)


class _References(dict):
    """family -> (reference tokens per prompt, reference logits of PROMPTS[0]), computed on first use."""

    def __init__(self, dirs, image):
        super().__init__()
        self.dirs, self.image = dirs, image

    def __missing__(self, fam):
        d = self.dirs[fam]
        family = get_family(fam)
        ref = family.model_class.from_pretrained(d, experts_implementation="eager").eval()
        eng = load(d)                      # only for its input preparation and EOS ids
        toks, logits = [], None
        for prompt in PROMPTS:
            inputs = family.model_inputs(eng.prepare([_image(fam, self.image)], [prompt]))
            with torch.no_grad():
                gen = ref.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                                   eos_token_id=sorted(eng.eos_ids), pad_token_id=eng.tokenizer.pad_token_id)
                if logits is None:
                    logits = ref(**inputs).logits
            toks.append(cut_at_eos(gen[0, inputs["input_ids"].shape[1]:].tolist(), eng.eos_ids))
        self[fam] = (toks, logits)
        return self[fam]


@pytest.fixture(scope="module")
def references(tiny_dirs, image_file):
    return _References(tiny_dirs, image_file)


def _budgets(eng) -> list[str]:
    return ["100%", "25%", str(eng.geometry.top_k * eng.layout.nbytes)]   # the last: exactly top-k slots


@pytest.mark.parametrize("family", EXACT_FAMILIES)
@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "predictive", "none"])
def test_tokens_and_logits_match_reference(family, policy, tiny_dirs, image, references):
    ref_tokens, ref_logits = references[family]
    d = tiny_dirs[family]
    seen, issued = [], 0
    for budget in _budgets(load(d)):
        eng = load(d, expert_budget=budget, policy=policy, prefetch="gate", fixed_lookahead=True)
        for i, prompt in enumerate(PROMPTS):
            gen = eng.generate(image, prompt, max_new_tokens=NEW)
            assert gen.token_ids == ref_tokens[i], f"{family} {policy} budget {budget} prompt {i}"
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
        logits = eng.forward_logits(eng.prepare([image], [PROMPTS[0]]))
        assert (logits - ref_logits).abs().max().item() <= 1e-5
        seen.append(logits)
        issued += eng.cache.counters.total().prefetch_issued
    assert eng.cache.num_slots == eng.geometry.top_k
    assert eng.cache.counters.total().misses > eng.cache.num_slots      # the smallest budget really offloads
    assert issued > 0                                                   # and the predictor really prefetched
    for other in seen[1:]:
        assert torch.equal(other, seen[0])


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_disk_tier_matches_reference(family, tiny_dirs, image, references):
    eng = load(tiny_dirs[family], expert_budget="25%", expert_tier="disk", prefetch="gate", fixed_lookahead=True)
    assert eng.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids == references[family][0][0]
    assert eng.store.bytes_read > 0


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_batch_of_two_matches_single(family, tiny_dirs, image, references):
    eng = load(tiny_dirs[family], expert_budget="25%")
    gens = eng.generate_batch([image, image], PROMPTS, max_new_tokens=NEW)
    assert [g.token_ids for g in gens] == references[family][0]


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_text_only_prompt_matches_reference(family, tiny_dirs):
    d = tiny_dirs[family]
    ref = get_family(family).model_class.from_pretrained(d, experts_implementation="eager").eval()
    eng = load(d, expert_budget="25%")
    inputs = eng.prepare([None], [PROMPTS[0]])
    with torch.no_grad():
        gen = ref.generate(**eng.family.model_inputs(inputs), max_new_tokens=NEW, do_sample=False,
                           eos_token_id=sorted(eng.eos_ids), pad_token_id=eng.tokenizer.pad_token_id)
    want = cut_at_eos(gen[0, inputs["input_ids"].shape[1]:].tolist(), eng.eos_ids)
    assert eng.generate(None, PROMPTS[0], max_new_tokens=NEW).token_ids == want


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_fused_layout_gives_the_same_tokens(family, tiny_dirs, image, references, tmp_path):
    """make-tiny writes the hub layout; the same weights saved in transformers' own layout (fused banks, the
    model's parameter names) give the same tokens."""
    src = tiny_dirs[family]
    model = get_family(family).model_class.from_pretrained(src)
    model.save_pretrained(tmp_path, save_original_format=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        if os.path.exists(f"{src}/{name}"):               # a text-only family has no preprocessor_config.json
            (tmp_path / name).write_bytes(open(f"{src}/{name}", "rb").read())
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    gen = load(str(tmp_path), expert_budget="25%").generate(image, PROMPTS[0], max_new_tokens=NEW)
    assert gen.token_ids == references[family][0][0]


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_fast_step_refusal_is_one_line(family, tiny_dirs, image):
    """Where the fast decode step cannot run, `--decode fast` says why and `auto` decodes on the eager step."""
    fam = get_family(family)
    if fam.fast_step_blocker is None:
        pytest.skip("the fast step runs this family")
    with pytest.raises(UserError, match="cannot run here"):
        load(tiny_dirs[family], decode="fast").generate(image, PROMPTS[0], max_new_tokens=3)
    eng = load(tiny_dirs[family], decode="auto")
    assert eng.generate(image, PROMPTS[0], max_new_tokens=3).token_ids and eng.fast_step() is None


@pytest.mark.gpu
@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_gpu_tokens_equal_across_budgets(family, tiny_dirs, image):
    """On the GPU (bf16): every expert resident, 25% and the smallest budget, every policy with prefetch, give the
    same tokens; the peak never exceeds the budget."""
    d = tiny_dirs[family]
    base = load(d, device="cuda", dtype="bfloat16")
    want = base.generate(image, PROMPTS[0], max_new_tokens=NEW).token_ids
    for budget in _budgets(base)[1:]:
        for policy in ("lru", "lfu", "lfru", "predictive", "none"):
            eng = base.fork(expert_budget=budget, policy=policy, prefetch="gate")
            gen = eng.generate(image, PROMPTS[0], max_new_tokens=NEW)
            assert gen.token_ids == want, (family, budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
