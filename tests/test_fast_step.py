"""The fast decode step (static KV, device-side slot map, misses read from host memory by the step itself, cache
filled after the step): the same greedy tokens as the eager decode and as itself with every expert resident,
for both families, every policy, budgets down to the smallest legal one; the budget is never exceeded; the
decode experts kernel against its torch reference (Triton's interpreter on the CPU, the GPU with -m gpu);
graph replay against the same step run eagerly on the GPU."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from vismmoe import load
from vismmoe.step.decode import cut_at_eos

from .conftest import FAMILIES, inline_copies

PROMPT = "What is in the picture?"
NEW = 10


def _budgets(d):
    eng = load(d)
    return ["100%", "25%", str(eng.geometry.top_k * eng.layout.nbytes)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_decode_matches_eager_decode(family, tiny_dirs, image_file):
    """Every policy, budgets from all experts to top-k slots: the fast step's tokens are the eager decode's
    (which test_exactness ties to transformers), the budget holds, and misses are read and then cached."""
    d = tiny_dirs[family]
    want = load(d, decode="eager").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    for budget in _budgets(d):
        base = load(d, expert_budget=budget, decode="fast")
        for policy in ("lru", "lfu", "lfru", "predictive", "none"):
            eng = base.fork(policy=policy)
            gen = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
            assert gen.token_ids == want, (family, budget, policy)
            st = gen.stats
            assert st["expert_bytes_peak"] <= st["expert_budget_bytes"]
            assert eng.fast_step() is not None and len(eng.fast_step().step_s) == NEW - 1
            if policy == "none":
                assert st["hits"] == 0
    assert base.cache.num_slots == base.geometry.top_k


def test_fast_decode_batch_and_teacher_forcing(tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    eager, fast = load(d, decode="eager", expert_budget="25%"), load(d, decode="fast", expert_budget="25%")
    prompts = [PROMPT, "How many shapes are there?"]
    assert [g.token_ids for g in fast.generate_batch([image_file] * 2, prompts, NEW)] == \
        [g.token_ids for g in eager.generate_batch([image_file] * 2, prompts, NEW)]
    inputs = fast.prepare([image_file], [PROMPT])
    teacher_tokens = list(range(100, 100 + NEW))
    forced = fast.generate_ids(inputs, NEW, teacher_tokens=teacher_tokens)[0]
    assert forced == eager.generate_ids(inputs, NEW, teacher_tokens=teacher_tokens)[0]


def test_fast_step_slot_map_follows_the_cache(tiny_dirs, image_file):
    """A slot is readable by the step only once its copy has landed; an evicted expert is read from the host."""
    eng = load(tiny_dirs["qwen3_vl_moe"], decode="fast", expert_budget="25%")
    fs = eng.fast_step()
    eng.generate(image_file, PROMPT, max_new_tokens=NEW)
    eng.runtime.transfer.wait(-1, [t for t in eng.cache.ticket if t is not None])
    fs._land()
    for slot, key in enumerate(eng.cache.owner):
        if key is not None:
            assert fs.slot_map[fs.layer_pos[key[0]], key[1]] == slot
    assert (fs.slot_map >= 0).sum() == len(eng.cache.slot_of)
    eng.cache.clear()
    assert (fs.slot_map < 0).all() and not fs.pending


def test_a_steps_misses_are_copied_together(tiny_dirs, image_file):
    """After a decode step its misses are claimed, then copied in ONE `load_slots` call (one visit to the copy
    stream: queueing each copy alone cost the host more than the copy's own call), each into the slot its expert
    holds then (a miss evicted again by a later claim of the same step is not copied); the tokens are those with
    every expert resident, down to the smallest legal budget."""
    d = tiny_dirs["qwen3_vl_moe"]
    want = load(d, decode="eager").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    for budget in _budgets(d)[1:]:
        eng = load(d, decode="fast", expert_budget=budget, policy="lru")
        fs, rt = eng.fast_step(), eng.runtime
        calls, claims = [], []
        orig_claim, orig_load = fs._claim, rt.load_slots

        def claim(fl, miss, behind=False):
            claims.append(len(calls))
            return orig_claim(fl, miss, behind)

        def load_slots(pairs, kind="demand"):
            calls.append(list(pairs))
            assert all(eng.cache.slot_of.get(key) == slot for key, slot in pairs)
            return orig_load(pairs, kind)
        fs._claim, rt.load_slots = claim, load_slots
        gen = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
        fs._claim, rt.load_slots = orig_claim, orig_load
        assert gen.token_ids == want, budget
        claims.append(len(calls))
        during = [b - a for a, b in zip(claims, claims[1:])]
        assert during and max(during) <= 1, budget      # at most one load_slots per claim (the step's misses)
        steps = calls[claims[0]:]                       # the decode steps' copies (the prefill's came before)
        assert any(len(c) > 1 for c in steps), budget    # some step copied several misses in one call


def test_fast_step_counts_the_routing(tiny_dirs, image_file):
    """Hits + misses of the decode steps are exactly the distinct experts each step's routing used."""
    from vismmoe.offload.trace import RoutingTrace
    eng = load(tiny_dirs["glm4v_moe"], decode="fast", expert_budget="25%")
    tr = RoutingTrace()
    eng.record_trace(tr)
    st = eng.generate(image_file, PROMPT, max_new_tokens=NEW).stats
    used = sum(len(np.unique(idx)) for s in tr.steps for idx, _ in s["layers"].values())
    assert st["hits"] + st["misses"] == used
    assert [s["kind"] for s in tr.steps].count("decode") == NEW - 1


def test_decode_mode_is_validated(tiny_dirs, monkeypatch):
    from vismmoe.errors import UserError
    with pytest.raises(UserError):
        load(tiny_dirs["qwen3_vl_moe"], decode="fastest")
    # `--decode fast` where the fast step cannot run: one line saying why; `auto` quietly decodes eagerly
    eng = load(tiny_dirs["qwen3_5_moe"], decode="fast")
    monkeypatch.setattr(type(eng.family), "fast_step_blocker", "its decode cache is not static")
    with pytest.raises(UserError, match="--decode fast cannot run here: qwen3_5_moe: its decode cache is not static"):
        eng.fast_step()
    assert load(tiny_dirs["qwen3_5_moe"], decode="auto").fast_step() is None


# the decode kernels against the torch reference, for every expert format: tests/test_expert_formats.py


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_fast_step_exact_across_budgets_and_graphs(family, tiny_dirs, image_file):
    """bf16 on the GPU: the captured, compiled step gives the tokens of itself with every expert resident at
    every budget and policy (misses read from host memory, the cache filled behind); graph replay gives the
    tokens of the same step run eagerly; the pool's bytes are checked against the CUDA allocator."""
    d = tiny_dirs[family]
    base = load(d, device="cuda", dtype="bfloat16", decode="fast")
    base.runtime.preload([(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)])
    want = base.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    fs = base.fast_step()
    assert fs.graphs and fs.compiled and any(b.graph is not None for b in fs.sg.buckets.values())
    plain = load(d, device="cuda", dtype="bfloat16", decode="fast", compile=False)
    plain.runtime.preload([(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)])
    plain.fast_step().graphs = False
    eager_tokens = plain.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    plain.fast_step().graphs = True
    assert plain.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == eager_tokens
    for budget in _budgets(d):
        for policy in ("lru", "predictive", "none"):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            eng = base.fork(expert_budget=budget, policy=policy)
            pool = torch.cuda.memory_allocated() - before
            assert pool <= eng.budget_bytes
            gen = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
            assert gen.token_ids == want, (family, budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
            assert _slots_hold_their_experts(eng), (family, budget, policy)     # landed misses included


@pytest.mark.parametrize("decode", ["eager", "fast"])
def test_prefill_and_decode_one_token_seam(decode, tiny_dirs, image_file):
    """The engine's seam, driven from outside one token at a time, gives `generate`'s tokens and books."""
    eng = load(tiny_dirs["qwen3_vl_moe"], decode=decode, expert_budget="25%")
    want = eng.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    eng.cache.clear()
    state = eng.prefill(eng.prepare([image_file], [PROMPT]), NEW)
    while state.steps < NEW - 1 and not state.finished:
        assert len(eng.decode_one_token(state)) == 1
    eng.finish(state)
    row = state.tokens[0]
    assert cut_at_eos(row, eng.eos_ids) == want
    assert (state.kv.inflight is None) if decode == "fast" else not hasattr(state.kv, "inflight")


def test_one_engine_from_two_threads_is_exact(tiny_dirs, image_file):
    """Concurrent calls on one engine (and its forks, which share the model) are served one after another: the
    tokens are those of sequential use (they used to differ at small budgets)."""
    import threading
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="10%", decode="fast")
    prompts = [PROMPT, "How many shapes are there?", "What color is it?"] * 2
    want = [eng.generate(image_file, p, max_new_tokens=NEW).token_ids for p in prompts]
    other = eng.fork(policy="lfu")
    got: dict = {}

    def worker(i, e):
        got[i] = e.generate(image_file, prompts[i], max_new_tokens=NEW).token_ids

    threads = [threading.Thread(target=worker, args=(i, eng if i % 2 else other)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == want


def test_prompt_beyond_the_context_is_refused(tiny_dirs, image_file):
    from vismmoe.errors import UserError
    eng = load(tiny_dirs["glm4v_moe"])
    limit = eng.family.text_config(eng.config).max_position_embeddings
    inputs = eng.prepare([image_file], [PROMPT])
    with pytest.raises(UserError, match="context of"):
        eng.generate_ids(inputs, limit)
    assert eng.generate_ids(inputs, 2)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompts(family, tiny_dirs, image_file, capsys):
    """A prompt without an image: transformers' own greedy tokens, on both decode steps and offloaded; in a batch
    beside an image prompt each row gets the tokens it gets alone."""
    from vismmoe.families import get_family
    d = tiny_dirs[family]
    eng = load(d, decode="fast", expert_budget="25%")
    inputs = eng.prepare([None], ["What is a cat?"])
    assert "pixel_values" not in inputs and int(inputs["mm_token_type_ids"].sum()) == 0
    ref = get_family(family).model_class.from_pretrained(d, experts_implementation="eager").eval()
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=sorted(eng.eos_ids),
                           pad_token_id=eng.tokenizer.pad_token_id)
    row = out[0, inputs["input_ids"].shape[1]:].tolist()
    want = cut_at_eos(row, eng.eos_ids)
    for e in (eng, load(d, decode="eager", compress="affinity", keep_ratio=0.5)):
        gen = e.generate(None, "What is a cat?", max_new_tokens=NEW)
        assert gen.token_ids == want and gen.stats["visual_tokens"] == 0
    alone = eng.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    mixed = eng.generate_batch([image_file, None], [PROMPT, "What is a cat?"], NEW)
    assert [g.token_ids for g in mixed] == [alone, want]
    from vismmoe.cli.app import main                        # the CLI without --image
    assert main(["generate", "--model", d, "--prompt", "What is a cat?", "--max-new-tokens", str(NEW), "--json"]) == 0
    import json
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == want


def test_fast_step_charges_an_emulated_link(tiny_dirs, image_file):
    """On an emulated link a decode miss read by the step waits for its bytes: the step sleeps until they would
    have arrived, and that wait is the request's stall; the link's busy time counts every byte booked."""
    d = tiny_dirs["qwen3_vl_moe"]
    smallest = str(load(d).geometry.top_k * load(d).layout.nbytes)
    fast = load(d, decode="fast", expert_budget=smallest, link="GBps=0.02")
    prefill_only = fast.generate(image_file, PROMPT, max_new_tokens=1).stats
    fast.cache.clear()
    st = fast.generate(image_file, PROMPT, max_new_tokens=NEW).stats
    decode_misses = st["misses"] - prefill_only["misses"]
    assert decode_misses > 0 and st["link_busy_s"] > 0
    # the decode steps' own waits: at least the link time of one miss per step that missed
    decode_stall = st["stall_s"] - prefill_only["stall_s"]
    assert decode_stall >= 0.5 * (st["expert_bytes"] / 0.02e9)
    assert st["e2e_s"] >= 0.9 * st["stall_s"]                       # the waits were real time of this request
    per_miss = st["expert_bytes"] / 0.02e9
    assert st["link_busy_s"] >= st["misses"] * per_miss * 0.99          # every miss's bytes were booked


def _slots_hold_their_experts(eng) -> bool:
    """Every resident expert's slot holds exactly its host blob (what a landed or copied miss must leave)."""
    fs, cache = eng.fast_step(), eng.cache
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    for (layer, e), slot in cache.slot_of.items():
        blob = eng.store.layer_blobs(eng.geometry.moe_layers.index(layer))[e]
        if not torch.equal(cache.pool[slot].cpu(), blob.cpu()):
            return False
    return fs is not None


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_decode_misses_land_in_place(family, tiny_dirs, image_file):
    """Landing (fast_step.py): a decode miss is written into a reserved slot as the step reads it and adopted
    there, with no second copy. The tokens are those with every expert resident (and without landing), every
    adopted slot holds its expert's blob, fewer bytes are copied than without landing, and the budget holds,
    down to the smallest legal budget."""
    d = tiny_dirs[family]
    want = load(d, decode="eager").generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    landed = 0
    for budget in _budgets(d)[1:]:
        for policy in ("lru", "predictive"):
            # copies land inline: when a copy lands decides what the next step misses, and so the bytes compared
            eng = inline_copies(load(d, expert_budget=budget, decode="fast", policy=policy))
            off = inline_copies(eng.fork())
            off.fast_step().land_slots = 0
            gen, ref = (e.generate(image_file, PROMPT, max_new_tokens=NEW) for e in (eng, off))
            assert gen.token_ids == ref.token_ids == want, (family, budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
            assert _slots_hold_their_experts(eng)
            n = eng.fast_step().landed
            landed += n
            if n:
                assert gen.stats["bytes_moved"] < ref.stats["bytes_moved"], (family, budget, policy)
    assert landed > 0


@pytest.mark.gpu
def test_gpu_engines_sharing_a_bucket_land_only_in_their_own_slots(tiny_dirs, image_file):
    """Forks of one model share its captured buckets (landing state included): an engine with landing off and
    one with it on, taking turns, each keep every slot holding its own expert and the resident tokens."""
    d = tiny_dirs["qwen3_vl_moe"]
    base = load(d, device="cuda", dtype="bfloat16", decode="fast")
    want = base.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    on = base.fork(expert_budget="25%")
    off = base.fork(expert_budget="25%")
    off.fast_step().land_slots = 0
    for _ in range(2):
        for eng in (on, off):
            assert eng.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == want
            assert _slots_hold_their_experts(on) and _slots_hold_their_experts(off)
    assert on.fast_step().landed > 0
