"""Continuous batching (engine/running.py, step/rows.py): requests that join a running batch at staggered times
and leave it when they finish give, row by row, what they give alone (greedy and seeded sampling, eager and fast
decode, down to the smallest budget); a finished row's place is freed at once; a row whose sampling fails leaves
and the others go on."""

import threading
import time

import pytest
import torch

from vismmoe import load
from vismmoe.engine.request import GenerationRequest
from vismmoe.engine.running import RunningBatch
from vismmoe.engine.sampling import NonFiniteLogits, SamplingParams
from vismmoe.step import rows as kvrows
from vismmoe.step.strategy import Prefilled

from .conftest import poison_sampling, quarter_and_smallest

PROMPTS = ["What is in the picture?", "How many shapes are there?", "Describe it.", "Is there a circle?"]
SEEDED = SamplingParams(temperature=1.0, top_k=20, seed=3)


def _specs(image):
    return [(image, PROMPTS[0], dict(max_new_tokens=9)),
            (None, PROMPTS[1], dict(max_new_tokens=3)),
            (image, PROMPTS[2], dict(max_new_tokens=6, sampling=SEEDED)),
            (None, PROMPTS[3], dict(max_new_tokens=1)),
            (image, PROMPTS[1], dict(max_new_tokens=5))]


def _req(spec):
    im, p, kw = spec
    return GenerationRequest.from_prompt(im, p, **kw)


def _alone(eng, specs) -> list[GenerationRequest]:
    """Each request of `specs` run alone on `eng`: what every row of a batch must give."""
    out = []
    for spec in specs:
        r = _req(spec)
        eng.generate_requests([r])
        out.append(r)
    return out


def _staggered(eng, reqs, arrive_after: list[int], capacity: int = 0) -> list[int]:
    """Request i joins after `arrive_after[i]` decode steps of the running batch (one admit between steps); runs
    until every row finished. Returns the number of running rows before each step."""
    rb, steps, sizes, pending = RunningBatch(eng, capacity), 0, [], list(zip(arrive_after, reqs))
    while pending or len(rb):
        if pending and pending[0][0] <= steps:
            rb.admit(pending.pop(0)[1])
        if len(rb):
            sizes.append(len(rb))
            rb.step()
            steps += 1
        elif pending:
            steps = max(steps, pending[0][0])
    return sizes


@pytest.mark.parametrize("family,decode", [("qwen3_vl_moe", "eager"), ("qwen3_vl_moe", "fast"),
                                           ("glm4v_moe", "eager"), ("qwen3_5_moe", "eager"),
                                           ("qwen3_5_moe", "fast"), ("qwen3_vl_moe", "native")])
def test_staggered_rows_match_each_row_alone(family, decode, tiny_dirs, image_file):
    d = tiny_dirs[family]
    base = load(d)
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for budget in ("100%", smallest):
        eng = load(d, decode=decode, expert_budget=budget)
        specs = _specs(image_file)
        alone = _alone(eng, specs)
        reqs = [_req(s) for s in specs]
        sizes = _staggered(eng, reqs, [0, 1, 1, 2, 4])
        for a, b in zip(alone, reqs):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert [len(r.token_ids) for r in reqs] == [9, 3, 6, 1, 5]     # random weights: no EOS this early
        assert max(sizes) >= 3 and sizes[0] == 1                        # rows joined a running batch
        assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes
        assert all(r.stats["new_tokens"] == len(r.token_ids) and r.stats["queue_s"] >= 0 for r in reqs)


def _bucket_shapes(eng) -> set:
    return {k for sg in eng.model.__dict__.get("_vismmoe_step_graphs", {}).values() for k in sg.buckets}


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_a_running_batch_keeps_one_step_shape(family, tiny_dirs, image_file):
    """With a capacity (a server's max batch) rows joining and leaving run in one bucket of that many rows (one
    captured graph on CUDA), the rows past the running ones read no expert, and each row still gives what it
    gives alone, down to the smallest budget."""
    d = tiny_dirs[family]
    base = load(d)
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for budget in ("100%", smallest):
        eng = load(d, decode="fast", expert_budget=budget)
        specs = _specs(image_file)
        alone = _alone(eng, specs)
        before = _bucket_shapes(eng)
        reqs = [_req(s) for s in specs]
        sizes = _staggered(eng, reqs, [0, 1, 1, 2, 4], capacity=5)
        for a, b in zip(alone, reqs):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert sorted(set(sizes)) == [1, 2, 3]                          # rows came and went
        new = _bucket_shapes(eng) - before
        assert {B for B, _ in new} <= {8} and len(new) <= 1, new         # one shape of 8 rows (5, rounded up)
        assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes


def test_finished_and_cancelled_rows_leave_at_once(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="50%")
    rb = RunningBatch(eng)
    long, short, gone = (_req((image_file, PROMPTS[0], dict(max_new_tokens=20))),
                         _req((None, PROMPTS[1], dict(max_new_tokens=2))),
                         _req((None, PROMPTS[2], dict(max_new_tokens=20))))
    for r in (long, short, gone):
        assert rb.admit(r) == []
    assert len(rb) == 3
    assert rb.step() == [short] and len(rb) == 2                    # its token limit: it leaves this step
    gone.cancel()
    assert rb.step() == [gone] and gone.finish_reason == "cancelled" and len(rb) == 1
    assert rb.requests == [long]
    assert rb.admit(_req((None, PROMPTS[3], dict(max_new_tokens=1)))) != []    # done at its first token: never joins
    assert len(rb) == 1


def test_a_row_whose_sampling_fails_leaves_the_others_go_on(tiny_dirs, image_file, monkeypatch):
    eng = load(tiny_dirs["qwen3_vl_moe"])
    want = _req((image_file, PROMPTS[0], dict(max_new_tokens=6)))
    eng.generate_requests([want])
    poison_sampling(monkeypatch)
    good = _req((image_file, PROMPTS[0], dict(max_new_tokens=6)))
    bad = _req((None, PROMPTS[1], dict(max_new_tokens=6, sampling=SamplingParams(temperature=0.777))))
    bad_image = _req(("/no/such/image.png", PROMPTS[1], dict(max_new_tokens=6)))
    _staggered(eng, [good, bad, bad_image], [0, 2, 3])
    assert isinstance(bad.error, NonFiniteLogits) and bad.finish_reason == "error"
    assert bad_image.finish_reason == "error" and bad_image.error is not None
    assert good.error is None and good.token_ids == want.token_ids and good.text == want.text


def _layer(k):
    class L:
        keys = values = None
    layer = L()
    layer.keys, layer.values = k.clone(), -k.clone()
    return layer


def test_rows_select_and_concat_pad_and_trim():
    """Left padding on join, trimming of columns no row attends any more on leave; linear states by row."""
    class Cache:
        pass
    a, b = Cache(), Cache()
    ka = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)
    kb = 100 + torch.arange(1 * 1 * 5 * 2, dtype=torch.float).view(1, 1, 5, 2)
    a.layers, b.layers = [_layer(ka)], [_layer(kb)]
    lin_a, lin_b = type("S", (), {})(), type("S", (), {})()
    lin_a.conv_states, lin_b.conv_states = [torch.zeros(2, 4)], [torch.ones(1, 4)]
    a.layers.append(lin_a)
    b.layers.append(lin_b)
    pa = Prefilled(a, torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[0], [1]]), torch.tensor([7, 8]))
    pb = Prefilled(b, torch.ones(1, 5, dtype=torch.long), torch.tensor([[2]]), torch.tensor([9]))
    assert kvrows.blocker(a) is None
    p = kvrows.concat(pa, pb)
    assert p.mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert p.cache.layers[0].keys.shape == (3, 1, 5, 2) and p.cache.layers[1].conv_states[0].shape == (3, 4)
    assert torch.equal(p.cache.layers[0].keys[0, :, 2:], ka[0]) and not p.cache.layers[0].keys[:2, :, :2].any()
    assert p.first.tolist() == [7, 8, 9] and p.deltas.flatten().tolist() == [0, 1, 2]
    q = kvrows.select(p, [1, 0])                     # row 2 (the longest) leaves: two leading columns go
    assert q.mask.tolist() == [[1, 1, 1], [0, 1, 1]] and q.first.tolist() == [8, 7]
    assert torch.equal(q.cache.layers[0].keys[0], ka[1]) and torch.equal(q.cache.layers[0].values[1], -ka[0])
    assert q.cache.layers[1].conv_states[0].shape == (2, 4)


@pytest.mark.parametrize("family,decode", [("qwen3_vl_moe", "eager"), ("qwen3_vl_moe", "fast"),
                                           ("qwen3_5_moe", "fast"), ("qwen3_vl_moe", "native")])
def test_newcomers_admitted_together_match_each_alone(family, decode, tiny_dirs, image_file):
    """Newcomers prefilled as one batch (admit_group) join a running row: each row gives what it gives alone,
    one whose first token ends it finishes at once, down to the smallest budget."""
    d = tiny_dirs[family]
    smallest = quarter_and_smallest(d)[-1]
    for budget in ("100%", smallest):
        eng = load(d, decode=decode, expert_budget=budget)
        specs = _specs(image_file)
        alone = _alone(eng, specs)
        reqs = [_req(sp) for sp in specs]
        rb = RunningBatch(eng)
        rb.admit(reqs[0])
        rb.step()
        done = rb.admit_group(reqs[1:])
        assert done == [reqs[3]] and len(rb) == 4                  # max_new_tokens=1 ends at its first token
        while len(rb):
            rb.step()
        for a, b in zip(alone, reqs):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert max(r.stats["batch"] for r in reqs) == 4
        assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes


def test_admit_group_copies_shared_experts_once(tiny_dirs, image_file):
    """Under a budget, four newcomers prefilled together move fewer expert bytes than the same four admitted one
    after another (each prefill copies what its tokens route to; together, what they share crosses once)."""
    d = tiny_dirs["qwen3_vl_moe"]
    moved = {}
    for how in ("each", "group"):
        eng = load(d, expert_budget="25%")
        reqs = [_req((image_file, p, dict(max_new_tokens=2))) for p in PROMPTS]
        rb = RunningBatch(eng)
        before = eng.cache.counters.total().bytes_moved
        if how == "group":
            rb.admit_group(reqs)
        else:
            for r in reqs:
                rb.admit(r)
        moved[how] = eng.cache.counters.total().bytes_moved - before
        while len(rb):
            rb.step()
    assert moved["group"] < moved["each"]


def test_admit_group_falls_back_to_each_alone(tiny_dirs, image_file, monkeypatch):
    """A batched prefill that raises admits each newcomer alone: the one whose own prefill raises fails, the
    others run as they would alone."""
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="50%")
    specs = _specs(image_file)[:3]
    alone = _alone(eng, specs)
    bad = _req((None, "poison " * 7, dict(max_new_tokens=4)))
    eng.prepare_request(bad)
    prefill = eng.start_prefill

    def poisoned(inputs, *a, **kw):
        if inputs["input_ids"].shape[0] > 1 or inputs["input_ids"].shape[1] == bad.prompt_tokens:
            raise RuntimeError("the prefill failed")
        return prefill(inputs, *a, **kw)

    monkeypatch.setattr(eng, "start_prefill", poisoned)
    reqs = [_req(sp) for sp in specs]
    rb = RunningBatch(eng)
    done = rb.admit_group([reqs[0], bad, reqs[1], reqs[2]])
    assert bad in done and isinstance(bad.error, RuntimeError) and bad.finish_reason == "error"
    while len(rb):
        rb.step()
    for a, b in zip(alone, reqs):
        assert b.error is None and (b.token_ids, b.text) == (a.token_ids, a.text)


@pytest.mark.parametrize("chunk", [0, 8])
def test_scheduler_rows_arriving_while_others_run_match_alone(tiny_dirs, image_file, monkeypatch, chunk):
    """Through the server's scheduler: requests submitted while others decode join them (never more than
    `max_batch` rows), each gives what it gives alone, streams its text, and a newcomer whose prefill raises fails
    alone (the running rows go on); whole prefills, and prefills in chunks between decode steps."""
    import threading

    from vismmoe.serve.scheduler import Scheduler
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="50%", prefill_chunk=chunk)
    specs = _specs(image_file)
    alone = _alone(eng, specs)
    prefill = eng.start_prefill

    def poisoned(inputs, *a, **kw):
        if inputs["input_ids"].shape[1] == poison_len:
            raise RuntimeError("the prefill failed")
        return prefill(inputs, *a, **kw)

    poison = _req((None, "poison " * 7, dict(max_new_tokens=4)))
    eng.prepare_request(poison)
    poison_len = poison.prompt_tokens
    monkeypatch.setattr(eng, "start_prefill", poisoned)
    sizes = []
    sched = Scheduler(eng, max_batch=2, on_batch=lambda rows: sizes.append(len(rows)))
    got, finished = {}, threading.Event()
    reqs = [_req(s) for s in specs]
    streamed = {i: [] for i in range(len(reqs))}
    for i, r in enumerate(reqs):
        r.on_text = streamed[i].append

    def done(req, error):
        got[id(req)] = error
        if len(got) == len(reqs) + 1:
            finished.set()

    sched.submit(reqs[0], done)                 # runs alone first; the rest arrive while it decodes
    while not reqs[0].token_ids:
        threading.Event().wait(0.01)
    for r in reqs[1:3] + [poison] + reqs[3:]:
        sched.submit(r, done)
    assert finished.wait(timeout=120)
    sched.close()
    assert isinstance(got[id(poison)], RuntimeError)
    for i, (a, b) in enumerate(zip(alone, reqs)):
        assert got[id(b)] is None and (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
        assert "".join(streamed[i]) == b.text
    assert max(sizes) == 2 and sched.batching == "continuous"
    # occupancy (bench.serve_load's rows per decode step): each step's running rows
    assert sched.steps == len(sizes) and sched.rows_stepped == sum(sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_gpu_staggered_rows_match_each_row_alone(family, tiny_dirs, image_file):
    """bf16 on the GPU, the fast step (graphs, compiled): rows joining and leaving a running batch give the tokens
    each gives alone, at every expert resident and at the smallest budget."""
    d = tiny_dirs[family]
    base = load(d, device="cuda", dtype="bfloat16")
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for budget in ("100%", smallest):
        eng = load(d, device="cuda", dtype="bfloat16", decode="auto", expert_budget=budget)
        specs = _specs(image_file)
        alone = _alone(eng, specs)
        reqs = [_req(s) for s in specs]
        _staggered(eng, reqs, [0, 1, 1, 2, 4])
        for a, b in zip(alone, reqs):
            assert b.token_ids == a.token_ids, (family, budget)
        assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes


def test_a_continuous_warm_up_makes_the_running_batch_shapes(tiny_dirs, image_file):
    """`warm_up(continuous=True)` (what `vismmoe serve` does before it serves on CUDA) makes the running batch's
    shape of max-batch rows at each warm-up KV length; rows that then come and go make no new shape."""
    from vismmoe.serve.cli import WARM_LENGTHS, warm_up
    eng = load(tiny_dirs["qwen3_vl_moe"], decode="fast", expert_budget="50%")
    warm_up(eng, 3, static=False, continuous=True)
    shapes = _bucket_shapes(eng)
    assert shapes == {(4, L) for L in WARM_LENGTHS}
    assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes
    reqs = [_req(s) for s in _specs(image_file)]
    _staggered(eng, reqs, [0, 1, 1, 2, 4], capacity=3)
    assert _bucket_shapes(eng) == shapes
    assert all(r.error is None for r in reqs)


def test_newcomers_wait_to_share_one_prefill(tiny_dirs, image_file, monkeypatch):
    """`admit_wait_s` (serve --admit-wait-ms): while a row runs, newcomers fewer than the free places wait for
    each other (the oldest at most that long) and are prefilled together; each still gives its tokens alone; a
    lone newcomer joins once it waited that long, while the running row goes on."""
    from vismmoe.serve.scheduler import Scheduler
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="50%")
    specs = [(None, PROMPTS[0], dict(max_new_tokens=1500, ignore_eos=True)),
             (image_file, PROMPTS[1], dict(max_new_tokens=3)), (None, PROMPTS[2], dict(max_new_tokens=4)),
             (image_file, PROMPTS[3], dict(max_new_tokens=2))]
    alone = _alone(eng, specs[1:])
    groups = []
    group, single = RunningBatch.admit_group, RunningBatch.admit
    monkeypatch.setattr(RunningBatch, "admit_group", lambda rb, rs: groups.append(len(rs)) or group(rb, rs))
    monkeypatch.setattr(RunningBatch, "admit", lambda rb, r: groups.append(1) or single(rb, r))
    sched = Scheduler(eng, max_batch=3, admit_wait_s=30.0)
    got, done_ev = {}, threading.Event()

    def done(req, error):
        got[id(req)] = error
        if len(got) == len(reqs):
            done_ev.set()

    reqs = [_req(s) for s in specs]
    sched.submit(reqs[0], done)
    while not reqs[0].token_ids:
        threading.Event().wait(0.01)
    sched.submit(reqs[1], done)                         # one of two free places: it waits for a second newcomer
    threading.Event().wait(0.3)
    assert not reqs[1].token_ids and reqs[0].token_ids and not reqs[0].finish_reason
    sched.submit(reqs[2], done)                         # two newcomers for two places: both join, together
    while not (reqs[1].finish_reason and reqs[2].finish_reason):
        threading.Event().wait(0.01)
    assert groups == [1, 2]
    sched.admit_wait_s = 0.2
    assert not reqs[0].finish_reason                    # the first row still runs
    reqs[3] = _req(specs[3])                            # made now: its wait counts from its arrival
    t0 = time.perf_counter()
    sched.submit(reqs[3], done)                         # alone: it joins once it waited 0.2 s
    while not reqs[3].finish_reason:
        threading.Event().wait(0.01)
    assert time.perf_counter() - t0 >= 0.2 and groups == [1, 2, 1] and not reqs[0].finish_reason
    reqs[0].cancel()
    assert done_ev.wait(timeout=120)
    sched.close()
    for a, b in zip(alone, reqs[1:]):
        assert got[id(b)] is None and (b.token_ids, b.text) == (a.token_ids, a.text)
