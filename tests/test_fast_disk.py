"""The disk tier on the fast decode step (step/fast_disk.py): a step that routed to an expert in neither a slot nor
host memory is re-run after staging it through the store's ring. Greedy tokens equal the host tier's and those
with every expert resident, for every policy, budgets down to the smallest legal one; the budget holds; the ring
is given back; Qwen3.5 (in-place decode state) is refused in one line."""

from __future__ import annotations

import pytest
import torch

from vismmoe import load

from .conftest import POLICIES, quarter_and_smallest as _budgets

PROMPT = "What is in the picture?"
NEW = 10


def _ring_free(eng):
    st = eng.store
    return len(st._free) == st.ring.shape[0]


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm4v_moe"])
def test_fast_disk_tokens_equal_host_and_resident(family, tiny_dirs, image_file):
    d = tiny_dirs[family]
    want = load(d, decode="fast").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids    # every expert
    reruns = 0
    for budget in _budgets(d):
        host = load(d, expert_budget=budget, decode="fast")
        base = load(d, expert_budget=budget, decode="fast", expert_tier="disk")
        assert base.store.tier == "disk"
        for policy in POLICIES:
            h = host.fork(policy=policy).generate(image_file, PROMPT, max_new_tokens=NEW)
            eng = base.fork(policy=policy)
            gen = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
            assert gen.token_ids == want == h.token_ids, (family, budget, policy)
            st = gen.stats
            assert st["expert_bytes_peak"] <= st["expert_budget_bytes"]
            fs = eng.fast_step()
            assert fs.disk is not None and len(fs.step_s) == NEW - 1
            eng.runtime.transfer.drain()
            for t in eng.cache.ticket:
                if t is not None and t.future is not None:
                    t.future.result()
            assert _ring_free(eng), (family, budget, policy)
            # misses are booked as on the host tier (the staged experts were read over the link)
            assert st["hits"] + st["misses"] == h.stats["hits"] + h.stats["misses"]
            reruns += fs.disk.reruns
    assert reruns > 0               # the re-run path ran (a cold decode misses at these budgets)


@pytest.mark.parametrize("family", ["internvl", "deepseek_ocr2", "ernie4_5_vl_moe", "qwen3_5_moe", "gemma4"])
def test_fast_disk_other_families(family, tiny_dirs, image_file):
    """Qwen3.5's Gated-DeltaNet layers update their recurrent state in place: a re-run starts from the state the
    snapshot kept (graphs.Bucket.snapshot), else its tokens drift."""
    d = tiny_dirs[family]
    smallest = _budgets(d)[-1]
    want = load(d, expert_budget=smallest, decode="fast").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    eng = load(d, expert_budget=smallest, decode="fast", expert_tier="disk")
    assert eng.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == want
    assert eng.fast_step().disk.reruns > 0


def test_fast_disk_batch_and_teacher_forcing(tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    smallest = _budgets(d)[-1]
    host = load(d, decode="fast", expert_budget=smallest)
    disk = load(d, decode="fast", expert_budget=smallest, expert_tier="disk")
    prompts = [PROMPT, "How many shapes are there?"]
    assert [g.token_ids for g in disk.generate_batch([image_file] * 2, prompts, NEW)] == \
        [g.token_ids for g in host.generate_batch([image_file] * 2, prompts, NEW)]
    inputs = disk.prepare([image_file], [PROMPT])
    teacher = list(range(100, 100 + NEW))
    assert disk.generate_ids(inputs, NEW, teacher_tokens=teacher)[0] == \
        host.generate_ids(inputs, NEW, teacher_tokens=teacher)[0]


def test_fast_disk_under_ring_pressure_with_lookahead(tiny_dirs, image_file, monkeypatch):
    """A staging ring of 2 slots, decode lookahead (gate) adding reads, a batch of two: tokens equal the host
    tier's, the staging blobs stay within two steps' worth, every ring slot comes back."""
    import time
    from vismmoe.offload import store as store_mod
    real = store_mod.DiskStore.__init__
    monkeypatch.setattr(store_mod.DiskStore, "__init__", lambda self, *a, **k: real(self, *a, **{**k, "staging": 2}))
    d = tiny_dirs["glm4v_moe"]
    smallest = _budgets(d)[-1]
    kw = dict(decode="fast", expert_budget=smallest, prefetch="gate", fixed_lookahead=True)
    host, disk = load(d, **kw), load(d, expert_tier="disk", **kw)
    prompts = [PROMPT, "How many shapes are there?"]
    assert [g.token_ids for g in disk.generate_batch([image_file] * 2, prompts, NEW)] == \
        [g.token_ids for g in host.generate_batch([image_file] * 2, prompts, NEW)]
    dm = disk.fast_step().disk
    assert dm.reruns > 0 and 0 < len(dm.blobs) <= 2 * dm.L * 2 * dm.K
    deadline = time.time() + 5                  # prefetches may still be copying
    while not _ring_free(disk) and time.time() < deadline:
        time.sleep(0.01)
    assert _ring_free(disk)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm4v_moe"])
def test_gpu_fast_disk_tokens_equal_host(family, tiny_dirs, image_file):
    """bf16, graphs: the disk tier's fast step (staged experts read by the kernel from pinned blobs, the graph
    replayed again) gives the host tier's tokens at every policy down to the smallest budget."""
    d = tiny_dirs[family]
    for budget in _budgets(d):
        host = load(d, device="cuda", dtype="bfloat16", expert_budget=budget, decode="fast")
        disk = load(d, device="cuda", dtype="bfloat16", expert_budget=budget, decode="fast", expert_tier="disk")
        for policy in ("lru", "predictive", "none"):
            want = host.fork(policy=policy).generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
            eng = disk.fork(policy=policy)
            gen = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
            assert gen.token_ids == want, (family, budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
            assert eng.fast_step().graphs
            eng.runtime.transfer.drain()
            torch.cuda.synchronize()
