"""The split decode step (step/split_step.py): the fast step's misses computed on the CPU, or read over the link in
a launch of their own, between per-MoE-layer segments. A tolerance suite, apart from the exactness suite: the CPU
computes in float32 and the misses' rows join the residual stream after the layer's other terms, so logits are
close (not equal) and greedy tokens are the same. `--cpu-experts off` never splits."""

from __future__ import annotations

import pytest
import torch

from vismmoe import load
from vismmoe.cpu.placement import SplitRule
from vismmoe.step.split_step import SplitMisses

from .conftest import FAMILIES, MORE_FAMILIES, TEXT_FAMILIES, fast_step_logits

PROMPT = "What is in the picture?"
NEW = 8
TEACHER = list(range(100, 100 + NEW))     # teacher-forced: every step runs (no early EOS)
LOGIT_TOL = 1e-4                          # fp32 tiny models: summation order only


def _smallest(eng) -> str:
    """The smallest legal budget: one layer's top-k experts."""
    return str(eng.geometry.top_k * eng.layout.nbytes)


def _step_logits(eng, inputs) -> tuple[list[int], list[torch.Tensor], dict]:
    """Teacher-forced decode on the fast step: (tokens, each step's logits, stats)."""
    ids, logits, stats = fast_step_logits(eng, inputs, NEW, TEACHER)
    return ids[0], logits, stats


def _pair(d, budget, mode="on"):
    ref = load(d, decode="fast", expert_budget=budget)
    eng = load(d, decode="fast", expert_budget=budget, cpu_experts=mode)
    return ref, eng


@pytest.mark.parametrize("family", FAMILIES + ("qwen3_5_moe", "ernie4_5_vl_moe") + TEXT_FAMILIES)
def test_split_step_matches_fetch_only(family, tiny_dirs, image_file, tmp_path, monkeypatch):
    """--cpu-experts on, fast decode: every step splits and its misses are computed on the CPU. Tokens equal
    fetch-only's, every step's logits within LOGIT_TOL, at 25% and at the smallest legal budget; decode misses
    really were computed between segments, and none of them was copied into the cache."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs[family]
    image = None if family in TEXT_FAMILIES else image_file
    for budget in ("25%", None):
        ref, eng = _pair(d, budget or "25%")
        if budget is None:
            ref, eng = _pair(d, _smallest(ref))
        inputs = ref.prepare([image], [PROMPT])
        want, want_logits, want_stats = _step_logits(ref, inputs)
        split = eng.fast_step().split
        assert isinstance(split, SplitMisses)
        cpu_before = eng.runtime.cpu.experts
        got, got_logits, stats = _step_logits(eng, inputs)
        assert got == want, (family, budget)
        assert len(got_logits) == len(want_logits) == NEW - 1
        for a, b in zip(got_logits, want_logits):
            assert (a - b).abs().max().item() <= LOGIT_TOL, (family, budget)
        assert split.steps == NEW - 1 and split.cpu_experts > 0, (family, budget)
        assert eng.runtime.cpu.experts - cpu_before >= split.cpu_experts
        # mode on: no miss of the prefill or of a split step was fetched
        assert stats["misses"] == 0 and want_stats["misses"] > 0, (family, budget)


def test_split_step_in_a_batch(tiny_dirs, image_file, tmp_path, monkeypatch):
    """Three rows in a bucket of four (one row past `live`): each row's tokens are fetch-only's, at 25% and the
    smallest budget."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs["qwen3_vl_moe"]
    prompts = [PROMPT, "How many shapes are there?", "What color is it?"]
    for budget in ("25%", None):
        ref, eng = _pair(d, "25%")
        if budget is None:
            ref, eng = _pair(d, _smallest(ref))
        want = [g.token_ids for g in ref.generate_batch([image_file] * 3, prompts, NEW)]
        got = [g.token_ids for g in eng.generate_batch([image_file] * 3, prompts, NEW)]
        assert got == want and eng.fast_step().split.cpu_experts > 0


def test_split_steps_in_a_running_batch_and_the_server_warm_up(tiny_dirs, image_file, tmp_path, monkeypatch):
    """Continuous batching on split steps: rows join and leave a running batch of 3 places (a bucket of 4) and each
    gives fetch-only's tokens alone; `warm_up` (what `vismmoe serve` runs on CUDA before serving) splits every
    step it takes, so each shape's split step is made before clients come, and leaves the rule as it was."""
    from vismmoe.serve.cli import warm_up
    from .test_continuous import _alone, _req, _specs, _staggered
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, decode="fast", expert_budget="25%")
    specs = [s for s in _specs(image_file) if "sampling" not in s[2]]
    alone = _alone(ref, specs)
    eng = load(d, decode="fast", expert_budget="25%", cpu_experts="on")
    reqs = [_req(s) for s in specs]
    _staggered(eng, reqs, [0, 1, 2, 4], capacity=3)
    assert [r.token_ids for r in reqs] == [r.token_ids for r in alone]
    assert eng.fast_step().split.cpu_experts > 0
    auto = load(d, decode="fast", expert_budget="25%", cpu_experts="auto")
    fs = auto.fast_step()
    split = fs.split
    runs = []
    run = fs.sg.run
    monkeypatch.setattr(fs.sg, "run", lambda *a, **k: runs.append(1) or run(*a, **k))
    warm_up(auto, 2, static=True, continuous=True)
    assert split.steps > 0 and runs and split.rule.always is False     # both kinds of step were made


def test_rows_left_in_a_shared_bucket_do_not_leak(tiny_dirs, image_file, tmp_path, monkeypatch):
    """A step that failed between two segments may leave rows in `Bucket.extra` (a bucket the model's engines
    share): the next split step starts from a clear one."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    ref, eng = _pair(tiny_dirs["qwen3_vl_moe"], "25%")
    inputs = ref.prepare([image_file], [PROMPT])
    want = _step_logits(ref, inputs)[0]
    assert _step_logits(eng, inputs)[0] == want
    with torch.inference_mode():
        for b in eng.fast_step().sg.buckets.values():
            b.extra.fill_(1e3)
    assert _step_logits(eng, inputs)[0] == want


def test_without_the_rows_the_logits_move(tiny_dirs, image_file, tmp_path, monkeypatch):
    """The tolerance test can fail: a split step that drops its CPU rows gives other logits."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    ref, eng = _pair(tiny_dirs["qwen3_vl_moe"], "25%")
    inputs = ref.prepare([image_file], [PROMPT])
    want = _step_logits(ref, inputs)[1]
    monkeypatch.setattr(SplitMisses, "_cpu", lambda self, *args: None)
    got = _step_logits(eng, inputs)[1]
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) > 100 * LOGIT_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_split_between_cpu_and_link(family, tiny_dirs, image_file, tmp_path, monkeypatch):
    """auto with a placement that sends every other miss to the link: the link's misses run in a launch of their
    own (over their host blobs) and are then copied into slots; the CPU's are not. Tokens and logits as
    fetch-only's, down to the smallest budget."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs[family]
    for budget in ("25%", None):
        ref, eng = _pair(d, "25%", "auto")
        if budget is None:
            ref, eng = _pair(d, _smallest(ref), "auto")
        split = eng.fast_step().split
        split.rule.always = True
        split.placement.choose = lambda misses, tokens, backlog_s=0.0: misses[::2]
        inputs = ref.prepare([image_file], [PROMPT])
        want, want_logits, _ = _step_logits(ref, inputs)
        got, got_logits, stats = _step_logits(eng, inputs)
        assert got == want
        for a, b in zip(got_logits, want_logits):
            assert (a - b).abs().max().item() <= LOGIT_TOL
        assert split.cpu_experts > 0 and split.link_experts > 0
        assert stats["misses"] > 0                      # the link's misses were claimed (and copied) after the step


def test_rule_splits_only_when_misses_pay_for_the_boundaries():
    rule = SplitRule(fetch_s=0.19e-3, cpu_s=lambda: 0.10e-3, boundaries=48)
    assert not rule.want()                                  # no misses seen yet
    for _ in range(4):
        rule.observe_step(40)
    assert rule.want()                                      # 40 misses x 0.12 ms saved > 48 x 40 us
    rule.observe_split(48 * 1e-3)                           # boundaries measured at 1 ms each: too dear
    assert not rule.want()
    for _ in range(400):                                    # no split since: the measurement fades to the prior
        rule.observe_step(40)
    assert rule.want()
    rule.observe_split(1e3)                                 # one absurd step counts as at most BOUNDARY_MAX_S
    assert rule.boundary_s <= SplitRule.BOUNDARY_MAX_S
    for _ in range(8):
        rule.observe_step(0)
    rule.boundary_s = 0.0
    assert not rule.want()                                  # misses gone
    slow_cpu = SplitRule(fetch_s=0.19e-3, cpu_s=lambda: 10e-3, boundaries=48, misses=40)
    assert slow_cpu.want() is False                         # a CPU far slower than the link saves little
    assert SplitRule(fetch_s=1, cpu_s=lambda: 1, boundaries=1, always=True).want()
    shared = SplitRule(fetch_s=0.19e-3, cpu_s=lambda: 0.01e-3, boundaries=1, misses=1000, shared=True)
    assert not shared.want()                                # a CPU device: nothing to gain (measured)
    shared.always = True
    assert shared.want()


def test_auto_stays_one_graph_without_misses(tiny_dirs, image_file, tmp_path, monkeypatch):
    """auto with every expert resident: no step splits (nothing to compute elsewhere), tokens exact."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, decode="fast")
    eng = load(d, decode="fast", cpu_experts="auto")
    inputs = ref.prepare([image_file], [PROMPT])
    assert _step_logits(eng, inputs)[0] == _step_logits(ref, inputs)[0]
    assert eng.fast_step().split.steps == 0


def test_off_and_not_additive_families_never_split(tiny_dirs, image_file, tmp_path, monkeypatch):
    """--cpu-experts off keeps the one-graph step; Gemma 4 (a norm after the experts' output) keeps it too, with
    its misses read over the link, and its tokens are fetch-only's."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    assert load(tiny_dirs["qwen3_vl_moe"], decode="fast", expert_budget="25%").fast_step().split is None
    assert "gemma4" in MORE_FAMILIES
    d = tiny_dirs["gemma4"]
    ref, eng = _pair(d, "25%")
    assert eng.fast_step().split is None and eng.runtime.cpu is not None
    inputs = ref.prepare([image_file], [PROMPT])
    assert _step_logits(eng, inputs)[0] == _step_logits(ref, inputs)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["on", "mixed"])
def test_gpu_split_step_matches_fetch_only(family, mode, tiny_dirs, image_file, tmp_path, monkeypatch):
    """On CUDA: the split step's segment graphs, the address-0 kernels, the link's own launch (mixed) and the CPU
    rows copied in: logits within bf16 tolerance of fetch-only's and the same tokens but where the reference's top
    two are closer than that, down to the smallest budget; the budget holds; the misses the CPU computed are copied into slots behind the step, so the cache learns (`on`:
    hits, though no step waited on the link)."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs[family]
    for budget in ("25%", None):
        kw = dict(device="cuda", decode="fast")
        ref = load(d, expert_budget="25%", **kw)
        if budget is None:
            ref = load(d, expert_budget=_smallest(ref), **kw)
        eng = load(d, expert_budget=str(ref.budget_bytes), cpu_experts="on" if mode == "on" else "auto", **kw)
        split = eng.fast_step().split
        if mode == "mixed":
            split.rule.always = True
            split.placement.choose = lambda misses, tokens, backlog_s=0.0: misses[::2]
        inputs = ref.prepare([image_file], [PROMPT])
        want, want_logits, _ = _step_logits(ref, inputs)
        got, got_logits, got_stats = _step_logits(eng, inputs)
        assert got[0] == want[0], (family, mode, budget)
        if mode == "on":        # the CPU's misses are copied in behind the steps: later steps hit them
            assert got_stats["misses"] == 0 and got_stats["hits"] > 0, (family, budget, got_stats["hits"])
        for i, (a, b) in enumerate(zip(got_logits, want_logits)):   # teacher-forced: a step's token is its argmax
            tol = 5e-2 * max(1.0, b.abs().max().item())
            assert (a - b).abs().max().item() <= tol, (family, mode, budget, i)
            # bf16 against the CPU's float32: a token may differ only where the reference's top two are closer than
            # the tolerance (the numerics allow either), never where it was clear
            if got[i + 1] != want[i + 1]:
                top2 = b.reshape(-1).topk(2).values
                assert (top2[0] - top2[1]).item() <= 2 * tol, (family, mode, budget, i, (top2[0] - top2[1]).item())
        assert split.steps == NEW - 1 and split.cpu_experts > 0
        if mode == "mixed":
            assert split.link_experts > 0
            assert split.link_launch_s > 0 and split.placement.fetch_s == split.link_launch_s   # measured, used
        assert eng.cache.pool.numel() * eng.cache.pool.element_size() <= eng.budget_bytes


def test_rule_measures_what_a_miss_costs_the_one_graph_step():
    """fetch_s starts at the link's figure and becomes the slope of one-graph steps' device time over their misses
    (the kernels' reads over the link), within [1/2, 4] times the link's figure; split steps and steps that are not
    measurements (None) leave it alone."""
    link = 0.175e-3
    rule = SplitRule(fetch_s=link, cpu_s=lambda: 0.3e-3, boundaries=16)
    for i in range(SplitRule.FIT_STEPS - 1):
        rule.observe_step(40 + 10 * (i % 3), dev_s=2.6e-3 + (40 + 10 * (i % 3)) * 0.28e-3)
    assert rule.fetch_s == link and rule.clean_s() is None  # too few steps yet
    rule.observe_step(60, split=True, dev_s=1.0)            # a split step is no point of the fit
    rule.observe_step(60, dev_s=None)                       # nor is a step that captured graphs
    for i in range(40):
        m = 40 + 10 * (i % 3)
        rule.observe_step(m, dev_s=2.6e-3 + m * 0.28e-3)
    assert rule.fetch_s == pytest.approx(0.28e-3, rel=0.02)
    assert rule.clean_s() == pytest.approx(2.6e-3, rel=0.05)  # the intercept: boundaries measured against it
    assert rule.clean_s(rows=4) is None                     # the fit is of one-row steps
    slow = SplitRule(fetch_s=link, cpu_s=lambda: 0.3e-3, boundaries=16)
    for i in range(40):
        m = 40 + 10 * (i % 3)
        slow.observe_step(m, dev_s=m * 10e-3)
    assert slow.fetch_s == 4 * link                         # bounded
    assert slow.clean_s() is None                           # a clamped slope's line is not the fit: no intercept
    flat = SplitRule(fetch_s=link, cpu_s=lambda: 0.3e-3, boundaries=16)
    for _ in range(40):
        flat.observe_step(50, dev_s=20e-3)                  # misses never vary: no slope to read
    assert flat.fetch_s == link
    # what the fit changes: 50 misses a step at 0.28 ms each pay for splitting where 0.175 ms did not
    a = SplitRule(fetch_s=link, cpu_s=lambda: 0.6e-3, boundaries=16, misses=50)
    b = SplitRule(fetch_s=0.28e-3, cpu_s=lambda: 0.6e-3, boundaries=16, misses=50)
    assert not a.want() and b.want()


def test_split_step_corrects_its_own_cpu_rate(tiny_dirs, image_file, tmp_path, monkeypatch):
    """The split step's placement is its own: the eager layer calls' correction (their CPU jobs run beside the
    device path) does not change it, and the split step's CPU jobs correct only it."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    ref, eng = _pair(tiny_dirs["qwen3_vl_moe"], "25%", mode="auto")
    split = eng.fast_step().split
    eager = eng.runtime.cpu.placement
    assert split.placement is not eager and split.placement.scale == 1.0
    eager.observe(1.0, 3.0)
    assert split.placement.scale == 1.0 and eager.scale > 1.0
    split.rule.always = True
    before = eager.scale
    inputs = ref.prepare([image_file], [PROMPT])
    assert _step_logits(eng, inputs)[0] == _step_logits(ref, inputs)[0]
    if split.cpu_experts:
        assert split.placement.scale != 1.0
    assert split.steps == NEW - 1
    assert eager.scale != before or eng.runtime.cpu.experts > split.cpu_experts   # the prefill's jobs: the eager one


def test_rule_fits_each_bucket_apart_and_not_under_an_emulated_link(tiny_dirs, tmp_path, monkeypatch):
    """A clean step's time grows with the bucket's rows: the fit starts again when they change. Under an emulated
    link the split step fits nothing and prices nothing by events (the step sleeps the emulated cost outside
    its device time)."""
    link = 0.175e-3
    rule = SplitRule(fetch_s=link, cpu_s=lambda: 0.3e-3, boundaries=16)
    for i in range(40):
        m = 40 + 10 * (i % 3)
        rule.observe_step(m, dev_s=2.6e-3 + m * 0.28e-3, rows=1)
    assert rule.fetch_s == pytest.approx(0.28e-3, rel=0.02)
    rule.observe_step(50, dev_s=9e-3, rows=8)               # another bucket: a new fit, too few points yet
    assert rule._fit[0] == 1 and rule.fetch_s == pytest.approx(0.28e-3, rel=0.02)
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    eng = load(tiny_dirs["qwen3_vl_moe"], decode="fast", expert_budget="25%", cpu_experts="auto", link="edge")
    split = eng.fast_step().split
    assert split.emulated
    before = split.placement.fetch_s
    split.rule.observe_step = lambda *a, **k: pytest.fail("fitted under an emulated link") if a[2] is not None \
        else None

    class _Fl:
        cpu_pairs, captured = None, False
    split.after(_Fl(), 1e-3, None, 10, 1)
    assert split.placement.fetch_s == before
