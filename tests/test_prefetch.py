"""Lookahead prefetch is lossless for every predictor and policy, its statistics are consistent, and the
calibration/predictor-quality pipeline works end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vismmoe import load
from vismmoe.tools.calibrate import calibrate, default_samples
from vismmoe.cli.app import main
from vismmoe.offload.predict import TransitionTables

from .conftest import FAMILIES


@pytest.fixture(scope="module")
def calibrations(tiny_dirs, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("cal")
    for fam in FAMILIES:
        eng = load(tiny_dirs[fam])
        tables, rows = calibrate(eng, default_samples(6), depth=3, max_new_tokens=3)
        path = str(root / f"{fam}.npz")
        tables.save(path)
        out[fam] = (path, rows)
    return out


@pytest.fixture(scope="module")
def reference(tiny_dirs, image_file):
    return {f: load(tiny_dirs[f]).generate(image_file, "What is in the picture?", max_new_tokens=8).token_ids
            for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefetch", ["gate", "trace", "blend"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "predictive"])
@pytest.mark.parametrize("decode", ["eager", "fast"])
def test_prefetch_is_lossless(family, prefetch, policy, decode, tiny_dirs, image_file, calibrations, reference):
    """Every predictor and policy, on the eager decode and on the fast step (where prefetch acts in the prefill
    and a decode miss is read by the step and then copied in: counted once as a miss, moved twice)."""
    probe = load(tiny_dirs[family])
    for budget in ("40%", str(probe.geometry.top_k * probe.layout.nbytes)):
        eng = load(tiny_dirs[family], expert_budget=budget, policy=policy, prefetch=prefetch, lookahead=2,
                   fixed_lookahead=True, calibration=calibrations[family][0], decode=decode)
        gen = eng.generate(image_file, "What is in the picture?", max_new_tokens=8)
        assert gen.token_ids == reference[family], (family, prefetch, policy, budget)
        s = gen.stats
        assert s["expert_bytes_peak"] <= s["expert_budget_bytes"]
        assert s["prefetch_hits"] <= s["prefetch_issued"]
        least = (s["misses"] + s["prefetch_issued"]) * s["expert_bytes"]
        assert s["bytes_moved"] == least if decode == "eager" else least <= s["bytes_moved"] <= 2 * least


def test_prefetch_reduces_misses_and_reports_quality(tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    base = load(d, expert_budget="40%").generate(image_file, "What is in the picture?", max_new_tokens=8).stats
    pf = load(d, expert_budget="40%", prefetch="gate", fixed_lookahead=True).generate(
        image_file, "What is in the picture?", max_new_tokens=8).stats
    assert pf["prefetch_issued"] > 0 and pf["prefetch_hits"] > 0
    assert pf["misses"] < base["misses"]
    assert 0 < pf["prefetch_precision"] <= 1 and 0 < pf["prefetch_recall"] <= 1
    assert pf["wasted_bytes"] <= pf["prefetch_issued"] * pf["expert_bytes"]
    assert pf["overlap_fraction"] is None or 0 <= pf["overlap_fraction"] <= 1


def test_calibration_file_and_rows(calibrations, tiny_dirs):
    path, rows = calibrations["glm4v_moe"]
    t = TransitionTables.load(path)
    eng = load(tiny_dirs["glm4v_moe"])
    L, E = len(eng.geometry.moe_layers), eng.geometry.num_experts
    assert t.tables[1].shape == (L, E, E) and t.alpha.shape == (3, L)
    assert np.all((t.alpha >= 0) & (t.alpha <= 1))
    # row p of the depth-1 table: P(j at next layer | i here) -> each row sums to top-k where i was seen
    sums = t.tables[1][:-1].sum(-1)
    assert np.all((np.isclose(sums, eng.geometry.top_k)) | (sums == 0))
    kinds = {(r["predictor"], r["kind"], r["depth"]) for r in rows}
    assert ("blend", "decode", 1) in kinds and ("gate", "prefill", 1) in kinds
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in rows)


def test_prefetch_cli_errors_and_json(tiny_dirs, image_file, capsys, tmp_path):
    m = tiny_dirs["qwen3_vl_moe"]
    for extra, needle in ((["--prefetch", "oracle"], "unknown predictor"),
                          (["--prefetch", "trace"], "needs a calibration file"),
                          (["--prefetch", "blend", "--calibration", str(tmp_path / "none.npz")], "not found"),
                          (["--lookahead", "0"], "out of range"),
                          (["--policy", "belady"], "recorded trace")):
        code = main(["generate", "--model", m, "--image", image_file, "--prompt", "hi"] + extra)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, (extra, err)
    code = main(["generate", "--model", m, "--image", image_file, "--prompt", "hi", "--max-new-tokens", "4",
                 "--expert-budget", "40%", "--prefetch", "gate", "--link", "edge", "--json"])
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert code == 0
    for key in ("prefetch_precision", "prefetch_recall", "overlap_fraction", "wasted_bytes"):
        assert key in s
    assert "emulated" in s["link"]


def test_calibrate_cli(tiny_dirs, capsys, tmp_path):
    out = tmp_path / "cal.npz"
    code = main(["calibrate", "--model", tiny_dirs["glm4v_moe"], "--out", str(out), "--limit", "3", "--json"])
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out.exists() and obj["rows"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_predictor_policy_matrix_is_lossless(family, tiny_dirs, image_file, calibrations):
    """On the GPU (bf16, copy stream, events): every predictor x policy pair at 40% and at the smallest legal
    budget gives the tokens of the same engine with every expert resident; the emulated link, the disk tier and
    timeline recording change timing only; the allocator-visible pool never grows past the budget."""
    import torch
    d = tiny_dirs[family]
    q = "What is in the picture?"
    base = load(d, device="cuda", dtype="bfloat16", calibration=calibrations[family][0])
    want = base.generate(image_file, q, max_new_tokens=8).token_ids
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for prefetch in ("none", "gate", "trace", "blend"):
        for policy in ("lru", "lfu", "lfru", "predictive", "none"):
            for budget in ("40%", smallest):
                eng = base.fork(expert_budget=budget, policy=policy, prefetch=prefetch, lookahead=2,
                                fixed_lookahead=True)
                gen = eng.generate(image_file, q, max_new_tokens=8)
                assert gen.token_ids == want, (family, prefetch, policy, budget)
                s = gen.stats
                assert s["expert_bytes_peak"] <= s["expert_budget_bytes"]
                assert eng.cache.pool.numel() * eng.cache.pool.element_size() <= s["expert_budget_bytes"]
                del eng
    edge = base.fork(expert_budget=smallest, policy="predictive", prefetch="blend", link="edge")
    edge.record_timeline()
    gen = edge.generate(image_file, q, max_new_tokens=8)
    assert gen.token_ids == want and gen.stats["stall_s"] >= 0
    assert edge.last_timeline is not None
    disk = load(d, device="cuda", dtype="bfloat16", expert_budget=smallest, expert_tier="disk", prefetch="gate")
    assert disk.generate(image_file, q, max_new_tokens=8).token_ids == want
    torch.cuda.synchronize()


def test_lookahead_adapts_to_the_link(tiny_dirs, image_file):
    """Adaptive depth end to end: where one layer's copies take far less than a layer's compute (the CPU's own
    memory, experts of a few KiB) prefetch switches off; on a very slow emulated link the copies take several layer
    times (lead > 2; the layer time includes attention, whose threads wake slowly after a sleep, so the margin is
    wide for slow CI machines: 0.069 s of copies against layers of 1-8 ms) and the depth is what the cost model
    says for the measured phase. Tokens stay those of the reference either way; a fixed lookahead always runs its
    full depth."""
    d = tiny_dirs["qwen3_vl_moe"]
    q = "What is in the picture?"
    want = load(d).generate(image_file, q, max_new_tokens=6).token_ids
    fast = load(d, expert_budget="40%", prefetch="gate", lookahead=3)
    gen = fast.generate(image_file, q, max_new_tokens=6)
    pf = fast.runtime.prefetcher
    assert gen.token_ids == want and pf.lead() - pf._phase.resident < pf.STALL_MIN and pf.depth == 0
    slow = load(d, expert_budget="40%", prefetch="gate", lookahead=3, link="GBps=0.0005")
    gen = slow.generate(image_file, q, max_new_tokens=6)
    pf = slow.runtime.prefetcher
    assert gen.token_ids == want and pf.lead() > 2 and pf.depth == pf._choose_depth()
    fixed = load(d, expert_budget="40%", prefetch="gate", lookahead=3, fixed_lookahead=True, link="GBps=0.01")
    gen = fixed.generate(image_file, q, max_new_tokens=6)
    assert gen.token_ids == want and fixed.runtime.prefetcher.depth == 3 and gen.stats["prefetch_issued"] > 0


def test_prefetch_cost_model():
    """The adaptive depth's cost model on synthetic phases (L compute, M copies, resident share, precision q):
    prefetch runs only where it saves more than STALL_MIN of a layer."""
    from vismmoe.offload.prefetch import Prefetcher, _TokenBucket

    pf = Prefetcher(predictor=None, depth=3)

    def depth(L, M, resident, q):
        pf._phase = _TokenBucket(layer_s=L, miss_s=M, resident=resident, q=q)
        return pf._choose_depth()

    assert depth(L=2.0, M=0.2, resident=0.9, q=0.9) == 0      # fast link: hits-first already hides the copies
    assert depth(L=2.0, M=1.0, resident=0.0, q=0.9) == 1      # copies fit under one layer, nothing hides them
    assert depth(L=1.0, M=2.5, resident=0.0, q=1.0) == 3      # slow link, exact predictor: run ahead of it
    assert depth(L=1.0, M=2.5, resident=0.0, q=0.6) == 0      # slow link, wrong guesses cost more than they hide
    assert depth(L=1.0, M=60.0, resident=0.3, q=0.9) == 0     # saturated link (prefill): only waste to add
    assert pf.saving() < 0
    # bursty misses (decode on a slow link): one call in four waits for a whole expert (C = 3 layer times), the
    # rest miss nothing. The average call's copies (M = 0.75) hide under its hits (resident 0.97), but the average
    # stall does not: measured per call, the model prefetches, deep enough for one copy (ceil(C / L) = 3)
    pf.copy_s = 3.0
    pf._phase = _TokenBucket(layer_s=1.0, q=0.85)
    for i in range(40):
        miss = 1 if i % 4 == 0 else 0
        pf.note(layer=7, needed=list(range(8)), not_resident=miss, pf_hits=0)
    ph = pf._phase
    assert ph.miss_s - min(ph.miss_s, ph.resident * ph.layer_s) < 0.05 < 0.2 < ph.stall_s
    assert pf.saving() > pf.STALL_MIN and pf._choose_depth() == 3
    pf._phase.stall_s = None                                  # the average call's stall instead: no prefetch
    assert pf._choose_depth() == 0
    pf.copy_s = 0.0
    pf._phase = None                                          # nothing measured yet: measure first
    assert pf._choose_depth() == 0
    ph = _TokenBucket(layer_s=1.0, miss_s=60.0, resident=0.3, q=0.8)
    pf._phase, pf.depth = ph, 0
    for _ in range(20):                      # off: shadow guesses (half of each was needed) keep q measured
        pf._shadow_for[5] = {1, 2, 3, 4}
        pf.note(layer=5, needed=[1, 2, 9], not_resident=3, pf_hits=0)
    assert abs(ph.q - 0.5) < 0.01
    pf.note(layer=5, needed=[1, 2, 9], not_resident=3, pf_hits=0)     # no guess for this call: q unchanged
    assert abs(ph.q - 0.5) < 0.01


def test_prefetch_off_still_measures_precision(tiny_dirs, image_file):
    """With prefetch switched off by the cost model, shadow guesses still score the predictor, so each phase's
    precision is measured, not left at its prior; nothing is copied for them. (The cost model is held off by an
    unreachable threshold: which way it decides on a slow emulated link depends on how fast this machine computes,
    and under load it chose to prefetch.)"""
    d = tiny_dirs["qwen3_vl_moe"]
    eng = load(d, expert_budget="40%", prefetch="gate", lookahead=3, link="GBps=0.002")
    pf = eng.runtime.prefetcher
    pf.SHADOW_EVERY, pf.STALL_MIN = 2, float("inf")
    gen = eng.generate(image_file, "What is in the picture?", max_new_tokens=6)
    assert pf.depth == 0 and gen.stats["prefetch_issued"] == 0
    assert any(abs(ph.q - 0.8) > 1e-6 for ph in pf._phases.values())


def test_fused_gate_prediction_equals_per_router_prediction(tiny_dirs):
    """The gate predictor's fused path (one matmul over the stacked routers of the layers ahead, top-k of the
    logits) predicts exactly what calling each router does (top-k of its softmax); GLM routers are not fused."""
    import torch

    from vismmoe.offload.predict import GatePredictor
    eng = load(tiny_dirs["qwen3_vl_moe"])
    geo, fam = eng.geometry, eng.family
    routers = {l: fam.moe_block(eng.model, l).gate for l in geo.moe_layers}
    fused = GatePredictor(routers, geo.moe_layers, geo.num_experts, 3, stacked=fam.stacked_router_weight(eng.model),
                          top_k=geo.top_k)
    plain = GatePredictor(routers, geo.moe_layers, geo.num_experts, 3)
    hidden = torch.randn(37, geo.hidden, generator=torch.Generator().manual_seed(0))
    layer = geo.moe_layers[0]
    for pred in (fused, plain):
        pred.observe(layer, hidden, None, None)
    for d in (1, 2, 3):
        assert np.array_equal(fused.predict(layer, d), plain.predict(layer, d))
    assert fused.predict(layer, 1).sum() > geo.top_k
    assert load(tiny_dirs["glm4v_moe"]).family.stacked_router_weight(load(tiny_dirs["glm4v_moe"]).model) is None


@pytest.mark.parametrize("profile", [None, "cpu-local"])
def test_prefetch_goes_before_compute_that_is_not_only_queued(tiny_dirs, image_file, monkeypatch, profile):
    """On a GPU a layer's prefetch is issued once its compute is queued (the host's work overlaps it); where the
    compute runs on the host (the CPU) or is charged to a device profile's clock, the prefetch must come first, or
    its copies would start (or be booked) only after the compute."""
    from vismmoe.offload.runtime import OffloadRuntime
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="40%", prefetch="gate", fixed_lookahead=True,
               device_profile=profile)
    order = []
    real_compute = OffloadRuntime._compute
    monkeypatch.setattr(OffloadRuntime, "_compute",
                        lambda self, *a, **k: (order.append("c"), real_compute(self, *a, **k))[1])
    real_issue = type(eng.runtime.prefetcher).issue
    monkeypatch.setattr(type(eng.runtime.prefetcher), "issue",
                        lambda self, *a, **k: (order.append("p"), real_issue(self, *a, **k))[1])
    eng.generate(image_file, "What is here?", max_new_tokens=2)
    assert eng.runtime.clock is not None if profile else eng.runtime.clock is None
    assert "p" in order and all(order[i + 1] == "c" for i, x in enumerate(order) if x == "p")
