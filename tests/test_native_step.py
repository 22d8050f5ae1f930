"""The native CPU decode step (`--decode native`, cpu/native/decoder.py): the fast step's books with the whole step in
C. A tolerance suite against the fast step's CPU body (transformers' modules, which tests/test_fast_step*.py tie to
the eager step): float32 in another summation order, so logits are close (LOGIT_TOL) and greedy tokens are the same.
Across budgets and policies it is exact: a slot and the host store hold the same bytes, read by the same code."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vismmoe import load
from vismmoe.cpu.native import compiler
from vismmoe.cpu.native import decoder as native_decoder
from vismmoe.engine.request import GenerationRequest
from vismmoe.errors import UserError

from .conftest import POLICIES, fast_step_logits

needs_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler")
pytestmark = needs_cc

NATIVE_FAMILIES = ("qwen3_vl_moe", "qwen3_moe", "internvl")
PROMPT = "What is in the picture?"
NEW = 8
TEACHER = list(range(100, 100 + NEW))     # teacher-forced: every step runs (no early EOS)
LOGIT_TOL = 1e-4                          # float32: summation order only (measured: about 1e-6 on these models)


def _image(family, image_file):
    return None if family == "qwen3_moe" else image_file


def _smallest(eng) -> str:
    return str(eng.geometry.top_k * eng.layout.nbytes)


def _step_logits(eng, inputs, teacher=TEACHER) -> tuple[list[list[int]], list[torch.Tensor], dict]:
    """Decode on the fast step's books (`fast` or `native`): (tokens per row, each step's logits, stats)."""
    return fast_step_logits(eng, inputs, NEW, teacher)


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_step_matches_the_fast_step(family, tiny_dirs, image_file, tmp_path, monkeypatch):
    """Every step's logits within LOGIT_TOL of the fast step's CPU body, teacher-forced; greedy tokens equal; a batch
    of two prompts of different lengths (left padding) the same."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs[family]
    image = _image(family, image_file)
    fast, nat = load(d, decode="fast", expert_budget="25%"), load(d, decode="native", expert_budget="25%")
    assert nat.fast_step().native is not None and fast.fast_step().native is None
    for images, prompts in (([image], [PROMPT]), ([image, image], [PROMPT, "How many shapes are there, and what "
                                                                         "colour is the largest one?"])):
        inputs = fast.prepare(images, prompts)
        want, want_logits, _ = _step_logits(fast, inputs)
        got, got_logits, _ = _step_logits(nat, inputs)
        assert got == want, family
        assert len(got_logits) == len(want_logits) == NEW - 1
        for a, b in zip(got_logits, want_logits):
            assert (a - b).abs().max().item() <= LOGIT_TOL, family
        greedy = [g.token_ids for g in nat.generate_batch(images, prompts, NEW)]
        assert greedy == [g.token_ids for g in fast.generate_batch(images, prompts, NEW)], family


def test_native_step_dense_layers_and_attention_biases(tmp_path, monkeypatch):
    """A decoder with a dense MLP layer among its MoE layers and biased attention projections (the branches the
    published shapes of these families do not use)."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path / "cache"))
    from vismmoe.tools.tiny import make_tiny
    d = make_tiny("qwen3_moe", str(tmp_path / "m"), layers=4, experts=8, top_k=2, dense_layers=[1],
                  attention_bias=True)
    fast, nat = load(d, decode="fast", expert_budget="25%"), load(d, decode="native", expert_budget="25%")
    assert len(nat.geometry.moe_layers) == 3
    for eng in (fast, nat):                 # transformers initialises biases to zeros: give them values
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in eng.model.model.layers:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    bias = getattr(layer.self_attn, proj).bias
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.5)
    inputs = fast.prepare([None], [PROMPT])
    want, want_logits, _ = _step_logits(fast, inputs)
    got, got_logits, _ = _step_logits(nat, inputs)
    assert got == want
    assert all((a - b).abs().max().item() <= LOGIT_TOL for a, b in zip(got_logits, want_logits))


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_step_is_exact_across_budgets_and_policies(family, tiny_dirs, image_file, monkeypatch):
    """The same logits, bit for bit, with every expert resident, at 25% and at the smallest legal budget (top-k
    slots), for every policy; the smallest budget really offloads and never exceeds its bytes; the address table
    the step reads (kept while the slot map does not change) is at every step the one its slot map gives."""
    from vismmoe.step.fast_step import FastStep
    run_native, checked = FastStep._run_native, []

    def checked_run(self, b, fl):
        run_native(self, b, fl)
        assert np.array_equal(self._native_addr[2], self._addresses(fl.used, self.host_addr))
        checked.append(1)
    monkeypatch.setattr(FastStep, "_run_native", checked_run)
    d = tiny_dirs[family]
    image = _image(family, image_file)
    ref = load(d, decode="native")
    inputs = ref.prepare([image], [PROMPT])
    want, want_logits, _ = _step_logits(ref, inputs)
    for budget in ("25%", _smallest(ref)):
        base = load(d, decode="native", expert_budget=budget)
        for policy in POLICIES:
            eng = base.fork(policy=policy)
            got, got_logits, stats = _step_logits(eng, inputs)
            assert got == want, (family, budget, policy)
            assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits)), (family, budget, policy)
    assert base.cache.num_slots == base.geometry.top_k
    assert stats["misses"] > base.cache.num_slots
    assert checked


@pytest.mark.parametrize("build", ["openmp", "pthreads"])
def test_native_step_threads_change_no_bit(build, bundled_engine, tmp_path, monkeypatch):
    """Each output row, attention pair and expert row is one thread's: every step run by one thread, then by teams
    of 2, 3 and 2 threads in turn (the helpers joining and sitting out pieces), gives the same bits (the bundled
    model: enough work for a team). Both teams decoder.c can run on: an OpenMP parallel region (the build's first
    choice) and, built without OpenMP, the library's own pthread pool."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    from vismmoe.cpu.native import build as build_library
    from vismmoe.data.scenes import balanced_subset
    eng = bundled_engine.fork(decode="native")
    nd = native_decoder.native_decoder(eng)
    if build == "pthreads":
        path = build_library(native_decoder.DECODER_SOURCE, str(tmp_path / "pthreads"),
                             flag_sets=(("-O3", "-march=native"), ("-O3",)))
        monkeypatch.setattr(nd, "lib", native_decoder._Lib(path))
        assert not nd.lib.lib.vm_info() & 1, "built without OpenMP"
    else:
        assert nd.lib.lib.vm_info() & 1, "the default build has OpenMP"
        assert nd.team.early == 0, "an OpenMP team judges every step alike (no early phase)"
    run, seen, teams = nd.run, [], iter([2, 3, 2] * NEW)
    monkeypatch.setattr(nd.team, "pick", lambda rows, threads: threads)      # exactly the count asked for
    before = torch.get_num_threads()

    def outputs(b):
        return (b.logits[:b.rows].clone(), b.out_host["route_w"].clone(), b.out_host["route_idx"].clone(),
                b.route_h.clone(), b.ids[:b.rows].clone())

    def several(b, addr):
        snap = b.snapshot()
        torch.set_num_threads(1)
        run(b, addr)
        want = outputs(b)
        for team in (next(teams), next(teams)):
            b.restore(snap)
            torch.set_num_threads(team)
            run(b, addr)
            seen.append(all(torch.equal(x, y) for x, y in zip(want, outputs(b))))
    monkeypatch.setattr(nd, "run", several)
    try:
        s = balanced_subset("test", 1)[0]
        req = GenerationRequest.from_prompt(s.image, s.question, max_new_tokens=NEW)
        req.ignore_eos = True                   # the answer ends after two tokens: keep stepping
        eng.generate_requests([req])
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 2 * (NEW - 1) and all(seen)


def test_team_size_takes_the_faster_choice_and_probes_the_other():
    """Steps with no pause between them (a fixed clock): each choice judged by its fastest recent step."""
    ts = native_decoder.TeamSize(clock=lambda: 0.0)
    for _ in range(ts.EARLY):               # the early steps of the first pause, judged apart (test below)
        ts.observe(1, ts.pick(1, 4), 0.001)
    assert ts.pick(1, 1) == 1                                   # one thread asked: nothing to choose
    explored = []
    for first_cold in (True, False, False):                     # both tried EXPLORE times, in turn
        for c in (4, 1):
            assert ts.pick(1, 4) == c
            explored.append(c)
            ts.observe(1, c, 0.050 if first_cold and c == 4 else {4: 0.001, 1: 0.002}[c])
    assert ts.pick(1, 4) == 4                  # a cold first step (50 ms) does not decide: the team's best is 1 ms
    for _ in range(ts.WINDOW):
        ts.observe(1, 4, 0.010)                                 # a busy machine: the team is slow now
    picks = [ts.pick(1, 4) for _ in range(2 * ts.PROBE)]
    assert picks.count(4) == 2 and picks.count(1) == 2 * ts.PROBE - 2      # the slower one retried now and then
    for _ in range(ts.WINDOW):
        ts.observe(1, 4, 0.001)                                 # the machine quiets down: the team comes back
    assert ts.pick(1, 4) == 4
    assert ts.pick(2, 4) == 4                                   # another batch size is explored on its own


def test_team_size_without_an_early_phase_judges_every_step_alike():
    """early=0 (a team on torch's OpenMP threads): pauses start no phase, every step is judged by the fastest of its
    last WINDOW, and the slower choice is probed every PROBE steps."""
    now = [0.0]
    ts = native_decoder.TeamSize(clock=lambda: now[0], early=0)
    for step in range(3 * ts.EXPLORE):
        now[0] += 1.0 if step % 3 == 0 else 0.001                # pauses (prefills) between the steps
        c = ts.pick(1, 2)
        assert ts.phase == 0
        ts.observe(1, c, {2: 0.001, 1: 0.002}[c] * (30 if step == 0 else 1))     # a cold first step
    picks = [ts.pick(1, 2) for _ in range(ts.PROBE)]
    assert picks.count(1) == 1 and picks.count(2) == ts.PROBE - 1 and ts.PROBE == 256
    assert set(ts.seen) == {(1, 0, 2), (1, 0, 1)}


def test_one_openmp_runtime_counts_the_runtimes_mapped(tmp_path, monkeypatch):
    """The team runs on torch's threads only where one OpenMP runtime is loaded; with two (another file name) the
    native decoder's team rule keeps the early phase; unreadable maps tell nothing."""
    line = "7f00-7f01 r-xp 0 08:01 1 {}\n"
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_text(line.format("/t/torch/lib/libgomp.so.1") * 2 + line.format("/t/libc.so.6"))
    two.write_text(line.format("/t/torch/lib/libgomp-a34b3233.so.1") + line.format("/usr/lib/libgomp.so.1"))
    assert native_decoder.one_openmp_runtime(str(one)) is True
    assert native_decoder.one_openmp_runtime(str(two)) is False
    assert native_decoder.one_openmp_runtime(str(tmp_path / "none")) is None
    eng = load(_tiny_qwen3(tmp_path), decode="native")
    assert native_decoder.native_decoder(eng).team.early == 0
    monkeypatch.setattr(native_decoder, "one_openmp_runtime", lambda: False)
    assert native_decoder.NativeDecoder(eng).team.early == native_decoder.TeamSize.EARLY


def _tiny_qwen3(tmp_path):
    from vismmoe.tools.tiny import make_tiny
    return make_tiny("qwen3_moe", str(tmp_path / "m"), layers=2, experts=4, top_k=2)


def test_team_size_judges_the_steps_after_a_pause_apart_by_their_mean():
    """After a pause (a prefill), a team's early steps that are usually fast but now and then wait milliseconds for a
    core lose to one thread's steady ones (by the mean); the steady steps after them keep the team (by the fastest);
    each phase keeps its own choice."""
    now = [0.0]
    ts = native_decoder.TeamSize(clock=lambda: now[0])
    team_early = [0.0010, 0.0100, 0.0011, 0.0012]        # mean 3.3 ms, fastest 1.0 ms
    picks = {"early": [], "steady": []}
    for request in range(40):
        now[0] += 1.0                                     # a prefill between requests: a pause
        for step in range(8):
            c = ts.pick(1, 2)
            phase = "early" if step < ts.EARLY else "steady"
            picks[phase].append(c)
            if phase == "early":
                took = team_early[(request + step) % 4] if c == 2 else 0.0016
            else:
                took = 0.0006 if c == 2 else 0.0015
            ts.observe(1, c, took)
            now[0] += 0.0001                              # books between steps: no pause
    late = lambda ph: picks[ph][len(picks[ph]) // 2:]
    assert late("early").count(1) >= (1 - 1.5 / ts.EARLY_PROBE) * len(late("early"))     # one thread after a pause
    assert late("steady").count(2) > 0.9 * len(late("steady"))      # the team once the machine is its own
    assert 2 in late("early")                                        # the team is still probed after pauses


def test_team_size_sees_no_pause_where_every_gap_is_long():
    """A model whose books take longer than PAUSE_S between every two steps: those gaps are its usual ones, not
    pauses, so its steps after the first few are judged as steady ones (by the fastest)."""
    now = [0.0]
    ts = native_decoder.TeamSize(clock=lambda: now[0])
    phases = []
    for step in range(40):
        ts.pick(1, 2)
        phases.append(ts.phase)
        ts.observe(1, 2, 0.001)
        now[0] += 0.005 if step != 30 else 0.5               # 5 ms books every step; one real pause
    assert phases[ts.EARLY + 1:31] == [ts.EARLY] * (30 - ts.EARLY)     # (the first gap has no usual one)
    assert phases[31:31 + ts.EARLY] == list(range(ts.EARLY))


def test_native_step_cpu_experts_read_misses_in_place(tiny_dirs, image_file):
    """--cpu-experts on: the native step computes a miss from its host blob (in place), so nothing is copied into a
    slot after a decode step and the misses are booked as CPU-computed; the tokens are fetch-only's."""
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, decode="native", expert_budget="25%")
    eng = load(d, decode="native", expert_budget="25%", cpu_experts="on")
    inputs = ref.prepare([image_file], [PROMPT])
    want, want_logits, want_stats = _step_logits(ref, inputs)
    before = eng.runtime.cpu.experts
    got, got_logits, stats = _step_logits(eng, inputs)
    assert got == want          # (the prefill's CPU experts sum in another order: logits close, not equal)
    assert all((a - b).abs().max().item() <= LOGIT_TOL for a, b in zip(got_logits, want_logits))
    assert eng.runtime.cpu.experts > before and want_stats["misses"] > 0 and stats["misses"] == 0
    assert eng.fast_step().split is None


def test_bundled_model_native_step(bundled_engine, tmp_path, monkeypatch):
    """The bundled model (bf16 weights read as float32: its matrices go to the step in bf16, the same values):
    the eager step's answers, logits close."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    from vismmoe.data.scenes import balanced_subset
    nat = bundled_engine.fork(decode="native")
    assert native_decoder.native_decoder(nat).wdtype == torch.bfloat16
    fast = bundled_engine.fork(decode="fast")
    for s in balanced_subset("test", 3):
        inputs = fast.prepare([s.image], [s.question])
        want, want_logits, _ = _step_logits(fast, inputs)
        got, got_logits, _ = _step_logits(nat, inputs)
        assert got == want
        for a, b in zip(got_logits, want_logits):
            assert (a - b).abs().max().item() <= 1e-3          # logits of about +-20: float32 summation order
        assert nat.generate(s.image, s.question).text == bundled_engine.generate(s.image, s.question).text


def test_native_step_refusals(tiny_dirs, monkeypatch):
    """Where it cannot run, `--decode native` is one clear error naming why; the step refuses a missing blob."""
    with pytest.raises(UserError, match="--decode native cannot run here: .*final norm"):
        load(tiny_dirs["glm4v_moe"], decode="native").fast_step()
    with pytest.raises(UserError, match="soft caps, sliding windows"):
        load(tiny_dirs["gemma4"], decode="native").fast_step()
    eng = load(tiny_dirs["qwen3_moe"])
    cuda = SimpleNamespace(**{k: getattr(eng, k) for k in ("family", "model", "store", "layout")},
                           device=torch.device("cuda"), dtype=torch.bfloat16)
    assert "runs on the CPU" in native_decoder.unsupported_reason(cuda)
    bf16 = SimpleNamespace(**dict(vars(cuda), device=torch.device("cpu")))
    assert "float32" in native_decoder.unsupported_reason(bf16)
    monkeypatch.setattr(native_decoder, "decoder_library", lambda: None)
    monkeypatch.setattr(native_decoder, "failure", lambda: "no C compiler found (set CC, or install gcc)")
    with pytest.raises(UserError, match="cannot be built .*no C compiler"):
        load(tiny_dirs["qwen3_moe"], decode="native").fast_step()


def test_native_step_refuses_an_unreadable_expert(tiny_dirs, image_file, monkeypatch):
    """An address table with no blob for a routed expert: the library refuses the step (RuntimeError), it does not
    read address 0."""
    base = load(tiny_dirs["qwen3_moe"])
    eng = load(tiny_dirs["qwen3_moe"], decode="native", expert_budget=_smallest(base))
    fs = eng.fast_step()
    fs.host_addr[:] = 0                   # the smallest budget: decode steps route to experts without a slot
    seen = {}
    run = fs.native.run

    def watched(b, addr):
        seen["before"] = (int(b.pos), b.ids.clone())
        try:
            run(b, addr)
        finally:
            seen["after"] = (int(b.pos), b.ids.clone())
    monkeypatch.setattr(fs.native, "run", watched)          # (the decoder is the model's: undone after the test)
    with pytest.raises(RuntimeError, match="refused"):
        eng.generate(None, PROMPT, max_new_tokens=4)
    assert seen["before"][0] == seen["after"][0] and torch.equal(seen["before"][1], seen["after"][1])


def test_cli_decode_native_refused_in_one_line(tiny_dirs):
    """The CLI: one line, exit status 2, for a model the native step does not compute."""
    out = subprocess.run([sys.executable, "-m", "vismmoe", "generate", "--model", tiny_dirs["glm4v_moe"],
                          "--decode", "native", "--prompt", "hi", "--max-new-tokens", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--decode native cannot run here" in lines[0], out.stderr
