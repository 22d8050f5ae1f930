"""The fast step launched ahead (step/fast_step.py): after a clean step the next one is launched before the books
and the caller's handling of its tokens. Tokens and the cache's books are those of the steps launched one after
the other, for one request, a batch, teacher forcing and a running batch whose rows join and leave, down to the
smallest budget; a step launched ahead is dropped (its bucket put back) where an eviction came between, its input
is not the one asked for, or the batch changes; with landing on, a step that missed never launches the next ahead;
buckets with recurrent state never launch ahead. The tests switch it on (`step_ahead`)."""

import pytest
import torch

from vismmoe import load
from vismmoe.engine.request import GenerationRequest
from vismmoe.engine.running import RunningBatch

from .conftest import inline_copies

PROMPT = "What is in the picture?"
NEW = 10
BOOKS = ("hits", "misses", "bytes_moved")


def _engine(d, budget, ahead: bool, landing: bool = True):
    eng = inline_copies(load(d, decode="fast", expert_budget=budget))     # copies land at once: the books do not
    eng.fast_step().step_ahead = ahead                                    # depend on timing
    if not landing:
        eng.fast_step().land_slots = 0
    return eng


def _budgets(d):
    eng = load(d)
    return ["100%", "25%", str(eng.geometry.top_k * eng.layout.nbytes)]


def _books(gen) -> tuple:
    return tuple(gen.stats[k] for k in BOOKS)


def test_steps_launched_ahead_give_the_same_tokens_and_books(tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    used = 0
    for budget in _budgets(d):
        off, on = _engine(d, budget, False), _engine(d, budget, True)
        a, b = off.generate(image_file, PROMPT, max_new_tokens=NEW), on.generate(image_file, PROMPT, max_new_tokens=NEW)
        assert b.token_ids == a.token_ids and _books(b) == _books(a), budget
        assert b.stats["expert_bytes_peak"] <= b.stats["expert_budget_bytes"]
        inputs = off.prepare([image_file] * 2, [PROMPT, "How many shapes are there?"])
        teacher = list(range(100, 100 + NEW))
        assert on.generate_ids(inputs, NEW, teacher_tokens=teacher)[0] == \
            off.generate_ids(inputs, NEW, teacher_tokens=teacher)[0], budget
        assert on.generate_ids(inputs, NEW)[0] == off.generate_ids(inputs, NEW)[0], budget
        fs = on.fast_step()
        used += fs.ahead_used
        assert off.fast_step().ahead_used == off.fast_step().ahead_dropped == 0
        assert len(fs.step_s) == 3 * (NEW - 1)                  # every step booked once, the dropped ones never
    assert used > 0                                             # clean steps came, and launched the next ahead


def test_a_step_launched_ahead_is_dropped_after_an_eviction_or_another_input(tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    off, on = _engine(d, "100%", False), _engine(d, "100%", True)
    inputs = off.prepare([image_file], [PROMPT])
    want = off.generate_ids(inputs, NEW)[0]
    fs = on.fast_step()
    st = on.prefill(inputs, NEW)
    T = int(st.kv.bucket.pos)                                   # the prompt's positions
    while fs.ahead_used + fs.ahead_dropped == 0 and st.kv.inflight is None or st.kv.inflight.ahead is None:
        on.decode_one_token(st)                                 # until a clean step launched the next ahead
    key = next(iter(on.cache.slot_of))
    on.cache.evict(key)                                         # an eviction the step ahead did not see
    dropped = fs.ahead_dropped
    assert int(st.kv.bucket.pos) == T + st.steps + 1           # the step ahead has run (it is on the CPU)
    on.decode_one_token(st)
    assert fs.ahead_dropped == dropped + 1
    while st.kv.inflight.ahead is None:
        on.decode_one_token(st)
    on.decode_one_token(st, teacher_token=7)                    # not the input it was launched with
    assert fs.ahead_dropped == dropped + 2
    on.finish(st)
    steps = st.steps
    assert int(st.kv.bucket.pos) == T + steps                   # a step ahead dropped at the end is undone
    assert st.tokens[0][:steps] == want[0][:steps]              # the step before the forced token: as without
    # the forced step's output continues from token 7, as the step launched one after the other gives it
    ref = off.prefill(inputs, NEW)
    for i in range(steps):
        off.decode_one_token(ref, 7 if i == steps - 1 else None)
    off.finish(ref)
    assert st.tokens == ref.tokens


def test_rows_joining_and_leaving_drop_the_step_ahead_and_keep_their_tokens(tiny_dirs, image_file):
    """A running batch (capacity 4): each join and leave re-batches the rows, so a step launched ahead before it
    is dropped and the bucket put back; every row's tokens and the books are those without steps ahead; no step
    launched ahead is given landing candidates (it might be dropped after writing into a slot)."""
    d = tiny_dirs["qwen3_vl_moe"]
    specs = [(image_file, PROMPT, 9), (None, "How many shapes are there?", 3), (image_file, "Describe it.", 6),
             (None, "Is there a circle?", 12)]
    smallest = str(load(d).geometry.top_k * load(d).layout.nbytes)
    for budget, landing in (("100%", True), ("25%", True), (smallest, True), ("25%", False), (smallest, False)):
        runs = []
        for ahead in (False, True):
            eng = _engine(d, budget, ahead, landing)
            fs, offered = eng.fast_step(), []
            launch = fs._launch_ahead

            def recording(b, fl, teacher, launch=launch, fs=fs):
                launch(b, fl, teacher)
                offered.append(fl.ahead.land[0])
            fs._launch_ahead = recording
            rb = RunningBatch(eng, 4)
            reqs = [GenerationRequest.from_prompt(im, p, max_new_tokens=n) for im, p, n in specs]
            arrive, todo, steps = [0, 1, 2, 4], list(reqs), 0
            while todo or len(rb):
                while todo and arrive[0] <= steps:
                    arrive.pop(0)
                    rb.admit(todo.pop(0))
                if len(rb):
                    rb.step()
                steps += 1
            c = eng.cache.counters.total()
            runs.append(([r.token_ids for r in reqs], (c.hits, c.misses, c.bytes_moved), fs))
            assert not any(offered)
            assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes
        (want, books, _), (got, got_books, fs) = runs
        assert got == want and got_books == books, (budget, landing)
        assert [len(t) for t in got] == [9, 3, 6, 12]
        if budget == "100%" or not landing:     # without landing, a step that missed launches the next ahead too
            assert fs.ahead_used > 0 and fs.ahead_dropped > 0, (budget, landing)


def test_buckets_with_recurrent_state_and_the_disk_tier_never_launch_ahead(tiny_dirs, image_file):
    """A recurrent layer's state would need a copy per step to be put back; the disk tier re-runs a step from
    its own snapshot after the step: neither launches ahead, with the same tokens."""
    d = tiny_dirs["qwen3_5_moe"]
    off, on = _engine(d, "100%", False), _engine(d, "100%", True)
    assert on.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == \
        off.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    assert on.fast_step().ahead_used == on.fast_step().ahead_dropped == 0
    d = tiny_dirs["qwen3_vl_moe"]
    disk = load(d, decode="fast", expert_tier="disk")
    disk.fast_step().step_ahead = True
    assert disk.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == \
        _engine(d, "100%", False).generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    assert disk.fast_step().ahead_used == disk.fast_step().ahead_dropped == 0


@pytest.mark.gpu
def test_gpu_steps_launched_ahead_give_the_same_tokens(tiny_dirs, image_file):
    """CUDA graphs: tokens with and without steps launched ahead, one request and a
    running batch of rows joining and leaving, at every expert resident and the smallest budget."""
    d = tiny_dirs["qwen3_vl_moe"]
    smallest = str(load(d).geometry.top_k * load(d).layout.nbytes)
    for budget in ("100%", smallest):
        on = load(d, device="cuda", dtype="bfloat16", decode="fast", expert_budget=budget)
        on.fast_step().step_ahead = True
        got = on.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
        on.fast_step().step_ahead = False
        assert on.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == got, budget
        for ahead in (True, False):
            on.fast_step().step_ahead = ahead
            rb = RunningBatch(on, 4)
            reqs = [GenerationRequest.from_prompt(image_file, p, max_new_tokens=n)
                    for p, n in ((PROMPT, 9), ("Describe it.", 4), ("How many shapes are there?", 12))]
            rb.admit(reqs[0])
            rb.step()
            rb.admit(reqs[1])
            rb.admit(reqs[2])
            while len(rb):
                rb.step()
            if ahead:
                with_ahead = [r.token_ids for r in reqs]
        assert [r.token_ids for r in reqs] == with_ahead, budget
        torch.cuda.synchronize()
    assert on.fast_step().ahead_used > 0
