"""CPU experts (vismmoe/cpu/): the executor against the formats' torch references, the placement model's choices,
the rates cache, and hybrid runs against fetch-only ones. A tolerance suite, apart from the exactness suite: CPU
results differ from the device path's only by summation order, so logits are close (not equal) and greedy tokens
are the same."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vismmoe import load
from vismmoe.cpu import rates as rates_mod
from vismmoe.cpu.executor import CpuExecutor
from vismmoe.cpu.placement import Placement
from vismmoe.errors import UserError
from vismmoe.formats import make_format
from vismmoe.step.grouped import experts_on_slots

from .conftest import FAMILIES

PROMPTS = ["What is in the picture?", "How many shapes are there?"]
NEW = 10
LOGIT_TOL = 1e-4        # fp32 tiny models: summation order only (measured max about 1e-6)


class _Gate:
    """What experts_on_slots needs of a transformers experts module: its gating."""

    @staticmethod
    def _apply_gate(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


def _blobs(spec, H, I, dtype, n, seed=0):
    fmt = make_format(spec, H, I, dtype)
    g = torch.Generator().manual_seed(seed)
    blobs = torch.empty(n, fmt.numel, dtype=fmt.pool_dtype)
    fmt.quantize(torch.randn(n, 2 * I, H, generator=g) * 0.05, torch.randn(n, H, I, generator=g) * 0.05, blobs)
    return fmt, blobs


@pytest.mark.parametrize("spec,dtype,tol", [("dense", torch.float32, 1e-5), ("dense", torch.bfloat16, 2e-2),
                                            ("fp8", torch.float32, 1e-5), ("int4", torch.float32, 1e-5),
                                            ("int4:group=64,sym=0", torch.float32, 1e-5)])
def test_executor_pairs_match_the_grouped_reference(spec, dtype, tol):
    """Every pair routed to the chosen experts, from blobs, equals the device path's grouped computation over the
    format's dequantized banks (up to summation order); other pairs are not returned."""
    H, I, E, T, K = 128, 256, 6, 5, 2
    fmt, blobs = _blobs(spec, H, I, dtype, E)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])           # [T, K]
    weights = torch.rand(T, K, generator=g)
    gu, dn = fmt.dequantize(blobs)
    want = experts_on_slots(_Gate, hidden, idx, weights.to(gu.dtype), gu, dn, None).float()  # [T*K, H]
    chosen = [0, 2, 3, 5]
    pick, rows = CpuExecutor(fmt).pairs(lambda e: blobs[e], hidden, idx.numpy(), weights, chosen)
    flat = idx.reshape(-1).numpy()
    assert sorted(pick.tolist()) == sorted(np.flatnonzero(np.isin(flat, chosen)).tolist())
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, want[pick], rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", ["fp8", "int4", "int4:group=32,sym=0"])
def test_executor_dequantizes_exactly_as_the_format(spec):
    fmt, blobs = _blobs(spec, 256, 128, torch.float32, 3)
    ex = CpuExecutor(fmt)
    for e in range(3):
        gu, dn = ex.weights(blobs[e])
        rgu, rdn = fmt.dequantize(blobs[e:e + 1])
        assert torch.equal(gu, rgu[0].float()) and torch.equal(dn, rdn[0].float())


def test_placement_decode_on_cpu_prefill_fetched():
    """The model decides from the rates: one token per expert is cheaper on the CPU than its copy, 200 tokens are
    not, and with both in one call the cheap ones go to the CPU."""
    pl = Placement(fetch_s=1e-3, cpu_s=lambda t: 0.4e-3 * t, handoff_s=1e-5)
    assert pl.choose([3, 5], {3: 1, 5: 1}) == [3, 5]
    assert pl.choose([3, 5], {3: 200, 5: 200}) == []
    assert pl.choose([1, 2, 3], {1: 200, 2: 1, 3: 300}) == [2]


def test_placement_balances_link_and_cpu():
    """Equal costs: about half of the misses each way (the later of the two finishes first that way), and a link
    queue ahead of them sends more to the CPU."""
    pl = Placement(fetch_s=1e-3, cpu_s=lambda t: 1e-3)
    tokens = {e: 1 for e in range(8)}
    assert len(pl.choose(list(range(8)), tokens)) == 4
    assert len(pl.choose(list(range(8)), tokens, backlog_s=4e-3)) == 6


def test_placement_corrects_rates_by_what_jobs_took():
    """Jobs that take 3x their calibrated time in the running process move the balance back to the link: the
    in-place CPU rate, not the idle calibration, decides; a faster CPU moves it the other way."""
    pl = Placement(fetch_s=1e-3, cpu_s=lambda t: 1e-3)
    tokens = {e: 1 for e in range(8)}
    before = len(pl.choose(list(range(8)), tokens))
    for _ in range(30):
        pl.observe(pl.predict([0, 1], tokens), 3 * pl.predict([0, 1], tokens))
    assert 2.9 < pl.scale < 3.0
    assert len(pl.choose(list(range(8)), tokens)) == 2 < before
    for _ in range(60):
        pl.observe(1.0, 0.5)
    assert pl.scale == pytest.approx(0.5, abs=0.01) and len(pl.choose(list(range(8)), tokens)) > before
    pl.observe(0.0, 1.0)                                        # nothing predicted: nothing learned
    assert pl.scale == pytest.approx(0.5, abs=0.01)


def test_placement_on_shared_cores_computes_every_miss():
    """A CPU-only run: a fetch is a copy plus the same compute on the same cores, so the CPU takes every miss."""
    pl = Placement(fetch_s=1e-4, cpu_s=lambda t: 1e-3 * t, shared=True)
    assert pl.choose([0, 1, 2], {0: 1, 1: 50, 2: 500}) == [0, 1, 2]


def test_rates_measured_once_and_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    fmt = make_format("dense", 64, 32, torch.float32)
    r = rates_mod.rates_for(torch.device("cpu"), fmt)
    files = [f for f in os.listdir(tmp_path) if f != "native"]       # native/: the CPU expert kernel's build
    assert len(files) == 1 and files[0].startswith("rates-")
    with open(tmp_path / files[0]) as f:
        saved = json.load(f)
    assert saved["machine"] == rates_mod.machine("cpu") and rates_mod.shape_key(fmt) in saved["cpu"]
    assert len(saved["cpu"][rates_mod.shape_key(fmt)]) == len(rates_mod.TOKENS) and r.link_gbps > 0

    def fail(*a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(rates_mod, "measure_cpu", fail)
    monkeypatch.setattr(rates_mod, "measure_link", fail)
    again = rates_mod.rates_for(torch.device("cpu"), fmt)
    assert again.cpu == r.cpu
    assert again.cpu_s(fmt, 1) == pytest.approx(r.cpu[rates_mod.shape_key(fmt)][0])
    assert again.cpu_s(fmt, 128) == pytest.approx(2 * r.cpu[rates_mod.shape_key(fmt)][-1])
    # another machine (say, a GPU named in the key) has a file of its own: nothing of this one is used
    other = dict(rates_mod.machine("cpu"), gpu="another card")
    assert rates_mod.load(other) is None


def test_unknown_mode_is_a_user_error():
    from vismmoe.config import RuntimeConfig
    with pytest.raises(UserError, match="--cpu-experts"):
        RuntimeConfig(cpu_experts="sometimes")


def test_cli_refuses_a_bad_mode(capsys):
    from vismmoe.cli.app import main
    assert main(["generate", "--cpu-experts", "sometimes", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cpu-experts" in err[0]


def _top2_margin(logits: torch.Tensor) -> float:
    top = logits.topk(2).values
    return float(top[0] - top[1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_hybrid_matches_fetch_only_within_tolerance(family, mode, tiny_dirs, image_file, tmp_path, monkeypatch):
    """Greedy tokens identical to fetch-only on the exactness prompts, prefill logits within LOGIT_TOL, and the
    CPU really computed experts (a CPU device shares its cores: auto places every miss there)."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs[family]
    ref = load(d, expert_budget="25%")
    eng = load(d, expert_budget="25%", cpu_experts=mode)
    assert ref.runtime.cpu is None and eng.runtime.cpu is not None
    inputs = ref.prepare([image_file], [PROMPTS[0]])
    want = ref.forward_logits(inputs)
    got = eng.forward_logits(inputs)
    assert (got - want).abs().max().item() <= LOGIT_TOL
    for prompt in PROMPTS:
        a = ref.generate(image_file, prompt, max_new_tokens=NEW)
        ref.cache.clear()
        b = eng.generate(image_file, prompt, max_new_tokens=NEW)
        if a.token_ids != b.token_ids:
            i = next(i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y)
            full = ref.forward_logits(ref.prepare([image_file], [prompt]))
            pytest.fail(f"{family} {mode}: token {i} differs; top-2 margin of the prefill's last logits "
                        f"{_top2_margin(full[0, -1]):.3g}")
        assert b.stats["cpu_computed"] > 0 and b.stats["cpu_experts"] == mode
        assert b.stats["misses"] == 0           # a CPU device: every miss was computed in place, none copied


def test_hybrid_on_the_disk_tier(tiny_dirs, image_file, tmp_path, monkeypatch):
    """Blobs read from the checkpoint files into the staging ring are computed and given back (a ring that ran
    dry would hang the next read)."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, expert_budget="25%").generate(image_file, PROMPTS[0], max_new_tokens=NEW)
    eng = load(d, expert_budget="25%", expert_tier="disk", cpu_experts="on")
    for _ in range(2):
        got = eng.generate(image_file, PROMPTS[0], max_new_tokens=NEW)
        assert got.token_ids == ref.token_ids
    assert eng.store.bytes_read > 0 and len(eng.store._free) == eng.store.ring.shape[0]


def test_the_stats_table_shows_the_cpus_experts(tiny_dirs, image_file, tmp_path, monkeypatch):
    """`vismmoe generate`'s table has a row of experts computed on the CPU where CPU experts are on, none where
    they are off."""
    from rich.console import Console
    from vismmoe.report import stats_table
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs["qwen3_vl_moe"]

    def text(stats):
        con = Console(record=True, width=120)
        con.print(stats_table(stats))
        return con.export_text()
    on = load(d, expert_budget="25%", cpu_experts="on").generate(image_file, PROMPTS[0], max_new_tokens=3).stats
    off = load(d, expert_budget="25%").generate(image_file, PROMPTS[0], max_new_tokens=3).stats
    assert "experts computed on the CPU" in text(on) and f"{on['cpu_computed']} (" in text(on)
    assert "on the CPU" not in text(off)


def test_off_keeps_the_runtime_path(tiny_dirs):
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="25%")
    assert eng.rc.cpu_experts == "off" and eng.runtime.cpu is None


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,decode", [("on", "eager"), ("on", "fast"), ("auto", "eager")])
def test_hybrid_on_cuda_matches_fetch_only(family, mode, decode, tiny_dirs, image_file, tmp_path, monkeypatch):
    """On a GPU the CPU side runs on its worker thread while the device computes hits and fetched misses: greedy
    tokens equal to fetch-only, prefill logits close (bf16: the tolerance of two bf16 summation orders), and with
    `on` the CPU computed experts (in the prefill, and in the decode when it is eager). The rates are measured
    into a fresh cache folder."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs[family]
    ref = load(d, device="cuda", expert_budget="25%", decode=decode)
    eng = load(d, device="cuda", expert_budget="25%", decode=decode, cpu_experts=mode)
    inputs = ref.prepare([image_file], [PROMPTS[0]])
    want, got = ref.forward_logits(inputs).float(), eng.forward_logits(inputs).float()
    assert (got - want).abs().max().item() <= 5e-2 * max(1.0, want.abs().max().item())
    for prompt in PROMPTS:
        ref.cache.clear()
        eng.cache.clear()
        a = ref.generate(image_file, prompt, max_new_tokens=NEW)
        b = eng.generate(image_file, prompt, max_new_tokens=NEW)
        if a.token_ids != b.token_ids:
            i = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
            pytest.fail(f"{family} {mode} {decode}: token {i} differs ({a.token_ids} vs {b.token_ids})")
        if mode == "on":
            assert b.stats["cpu_computed"] > 0
    assert list(tmp_path.glob("rates-*.json")) or mode == "on"


@pytest.mark.parametrize("argv,says", [(["--model", "0"], "model directory not found"), (["--formats", ","], "--formats"),
                                       (["--formats", "nope"], "nope"), (["--shape", "nope"], "nope"),
                                       (["--dtype", "int8"], "--dtype")])
def test_calibrate_rates_refuses_bad_input(argv, says, capsys, monkeypatch, tmp_path):
    """One line, exit 2, nothing measured (and never a look-up on the hub for a --model that is no folder)."""
    from vismmoe.cli.app import main
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(rates_mod, "calibrate", lambda *a, **k: pytest.fail("measured"))
    assert main(["calibrate-rates", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_bench_rows(tmp_path, monkeypatch):
    """`python -m vismmoe.bench.cpu_experts` on a tiny shape: one row per system and budget, saved as JSON, the
    CPU rows with experts computed on the CPU and none copied."""
    from vismmoe.bench import cpu_experts
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    out = tmp_path / "r.json"
    res = cpu_experts.main(["--shape", "tiny-qwen3", "--device", "cpu", "--budgets", "25%", "--reps", "1",
                            "--new-tokens", "3", "--image-side", "64", "--with-on", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == res["rows"]
    rows = {r["system"]: r for r in res["rows"]}
    assert set(rows) == {"fetch@25%", "auto@25%", "on@25%", "resident"}
    assert rows["fetch@25%"]["cpu_computed"] == 0 and rows["fetch@25%"]["misses"] > 0
    assert rows["on@25%"]["cpu_computed"] > 0 and rows["on@25%"]["misses"] == 0
    assert rows["resident"]["misses"] == 0


@pytest.mark.parametrize("argv,says", [(["--layers", "0"], "--layers"), (["--policy", "nope"], "nope"),
                                       (["--shape", "nope"], "nope")])
def test_bench_refuses_bad_input(argv, says, capsys):
    """One line naming the bad value, exit 2, before anything is built."""
    from vismmoe.bench import cpu_experts
    assert cpu_experts.main(["--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]


def test_worker_thread_path_on_the_cpu(tiny_dirs, image_file, tmp_path, monkeypatch):
    """The CUDA path's worker thread (the CPU part runs beside the device path, in a thread of its own with its own
    grad mode), exercised on the CPU: the same tokens as the inline path."""
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs["qwen3_vl_moe"]
    inline = load(d, expert_budget="25%", cpu_experts="on")
    want = inline.generate(image_file, PROMPTS[0], max_new_tokens=NEW)
    threaded = load(d, expert_budget="25%", cpu_experts="on")
    threaded.runtime.cpu.worker = ThreadPoolExecutor(1)
    got = threaded.generate(image_file, PROMPTS[0], max_new_tokens=NEW)
    threaded.runtime.cpu.close()
    assert got.token_ids == want.token_ids and got.stats["cpu_computed"] == want.stats["cpu_computed"] > 0


def test_bench_split_row_splits_every_step(tmp_path, monkeypatch):
    """--with-split on the fast step: its row splits every decode step (the rule overridden), the others as
    their rule says."""
    from vismmoe.bench import cpu_experts
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    res = cpu_experts.main(["--shape", "tiny-qwen3", "--device", "cpu", "--budgets", "25%", "--reps", "1",
                            "--new-tokens", "4", "--image-side", "64", "--decode", "fast", "--with-split",
                            "--no-resident"])
    rows = {r["system"]: r for r in res["rows"]}
    assert set(rows) == {"fetch@25%", "auto@25%", "split@25%"}
    assert rows["split@25%"]["split_steps"] == 3 and rows["split@25%"]["split_cpu_experts"] > 0
    assert rows["auto@25%"]["split_steps"] == 0 and rows["fetch@25%"]["split_steps"] == 0


@pytest.mark.parametrize("decode", ["eager", "fast"])
def test_cpu_computed_misses_are_copied_in_behind(decode, tiny_dirs, image_file, tmp_path, monkeypatch):
    """`copy_behind` (a CUDA device's default; forced here on the CPU): misses the CPU computed are claimed and
    copied into slots after their layer call (eager) or step (fast, split), not waited for and not counted as
    misses. The cache learns the working set, so later calls hit and the CPU computes fewer experts than without;
    tokens stay fetch-only's, down to the smallest budget, and the budget holds."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, expert_budget="25%", decode=decode)
    smallest = str(ref.geometry.top_k * ref.layout.nbytes)
    for budget in ("25%", smallest):
        ref = load(d, expert_budget=budget, decode=decode)
        want = ref.generate(image_file, PROMPTS[0], max_new_tokens=NEW)
        runs = {}
        for behind in (False, True):
            eng = load(d, expert_budget=budget, decode=decode, cpu_experts="on")
            eng.runtime.cpu.copy_behind = behind
            from vismmoe.cpu.hybrid import BEHIND_MAX_TOKENS
            assert eng.runtime.cpu.copies_behind(BEHIND_MAX_TOKENS) == behind
            assert not eng.runtime.cpu.copies_behind(BEHIND_MAX_TOKENS + 1)    # a prefill's link is busy
            got = eng.generate(image_file, PROMPTS[0], max_new_tokens=NEW)
            assert got.token_ids == want.token_ids, (decode, budget, behind)
            assert got.stats["misses"] == 0 and got.stats["expert_bytes_peak"] <= got.stats["expert_budget_bytes"]
            runs[behind] = got.stats
        assert runs[False]["hits"] == 0                 # nothing ever entered the cache
        if budget == "25%":
            assert runs[True]["hits"] > 0, decode
            assert runs[True]["cpu_computed"] < runs[False]["cpu_computed"], decode
