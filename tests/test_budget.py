"""The expert budget is never exceeded: counted on the CPU, measured with the CUDA allocator on a GPU."""

from __future__ import annotations

import pytest
import torch

from vismmoe import load
from vismmoe.engine.budget import estimate_reserve
from vismmoe.families import get_family

from .conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["100%", "40%", "min"])
def test_resident_experts_never_exceed_budget(family, budget, tiny_dirs, image_file):
    d = tiny_dirs[family]
    probe = load(d)
    if budget == "min":
        budget = str(probe.geometry.top_k * probe.layout.nbytes)
    eng = load(d, expert_budget=budget)
    cache = eng.cache
    high = []
    orig = cache.claim

    def claim(key, pinned):                     # watch residency at every insertion
        slot = orig(key, pinned)
        high.append(len(cache.slot_of))
        return slot

    cache.claim = claim
    gen = eng.generate(image_file, "What is in the picture?", max_new_tokens=8)
    s = gen.stats
    assert high and max(high) <= cache.num_slots
    assert cache.pool.numel() * cache.pool.element_size() <= s["expert_budget_bytes"]
    assert s["expert_bytes_peak"] <= s["expert_budget_bytes"]
    # no expert weights anywhere in the model itself: the fused banks are empty placeholders
    fam = get_family(family)
    for layer in eng.geometry.moe_layers:
        ex = fam.moe_block(eng.model, layer).experts
        assert ex.gate_up_proj.numel() == 0 and ex.down_proj.numel() == 0


def test_device_memory_sizing(tiny_dirs):
    d = tiny_dirs["qwen3_vl_moe"]
    probe = load(d)
    reserve = 1_000_000
    total = probe.nonexpert_bytes + reserve + 5 * probe.layout.nbytes + 100
    eng = load(d, device_memory=str(total), reserve=str(reserve))
    assert eng.cache.num_slots == 5
    assert eng.nonexpert_bytes + reserve + eng.cache.budget_bytes <= total


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_allocator_peak_within_budget(family, tiny_dirs, image_file):
    """max_memory_allocated - non-expert weights stays within budget + the KV/activation reserve, and raising the
    budget raises the peak by no more than the larger pool."""
    d = tiny_dirs[family]
    peaks = {}
    for budget in ("min", "60%"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        probe = load(d)
        b = str(probe.geometry.top_k * probe.layout.nbytes) if budget == "min" else budget
        eng = load(d, device="cuda", dtype="bfloat16", expert_budget=b)
        eng.generate(image_file, "What is in the picture?", max_new_tokens=8)
        peak = torch.cuda.max_memory_allocated() - base
        reserve = estimate_reserve(eng.config, eng.geometry, 4096, eng.dtype, eng.device)
        assert peak - eng.nonexpert_bytes <= eng.budget_bytes + reserve
        peaks[budget] = (peak, eng.cache.budget_bytes)
        del eng
    (p1, pool1), (p2, pool2) = peaks["min"], peaks["60%"]
    assert p2 - p1 <= pool2 - pool1 + 2 * 1024**2


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_bf16_tokens_match_bf16_reference(family, tiny_dirs, image_file):
    fam = get_family(family)
    d = tiny_dirs[family]
    ref = fam.model_class.from_pretrained(d, experts_implementation="eager", dtype=torch.bfloat16).cuda().eval()
    for budget in ("100%", "25%", "min"):
        probe = load(d)
        b = str(probe.geometry.top_k * probe.layout.nbytes) if budget == "min" else budget
        eng = load(d, device="cuda", dtype="bfloat16", expert_budget=b)
        inputs = eng.prepare([image_file], ["What is in the picture?"])
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=sorted(eng.eos_ids),
                               pad_token_id=eng.tokenizer.pad_token_id)
        want = out[0, inputs["input_ids"].shape[1]:].tolist()
        got = eng.generate(image_file, "What is in the picture?", max_new_tokens=10).token_ids
        assert got == want[: len(got)] and len(got) >= min(len(want), 1)
