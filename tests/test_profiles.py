"""Device profiles and the virtual device clock (profiles/): sources, roofline, emulated time, the memory cap."""

import json

import pytest

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.errors import UserError
from vismmoe.profiles import DeviceProfile, get_profile, names
from vismmoe.profiles.tables import TABLES

FIELDS = ("flops", "mem_Bps", "mem_bytes", "tier.Bps", "tier.latency_s", "efficiency", "op_s")


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_value_has_a_source(name):
    prof = get_profile(name)
    for field in FIELDS:
        assert prof.sources.get(field), f"{name}: no source for {field}"
    assert prof.peak("bfloat16") > 0 and prof.mem_Bps > 0 and prof.tier["Bps"] > 0


def test_unknown_profile_is_one_line_error(capsys):
    with pytest.raises(UserError, match="unknown device profile"):
        get_profile("toaster")
    assert "cpu-local" in names() and "phone" in names()


def _profile(**kw) -> DeviceProfile:
    base = dict(name="test", title="test device", flops={"float32": 1e9}, mem_Bps=1e9, mem_bytes=1 << 40,
                tier={"name": "slow", "Bps": 1e7, "latency_s": 1e-4}, efficiency={"experts": 0.5}, op_s=0.0)
    base.update(kw)
    return DeviceProfile(**base)


def test_roofline_is_the_bound_of_compute_and_memory():
    p = _profile()
    assert p.span_seconds("attention", 2e9, 1e6, 0, "float32") == pytest.approx(2.0)     # compute bound
    assert p.span_seconds("attention", 1e3, 3e9, 0, "float32") == pytest.approx(3.0)     # memory bound
    assert p.span_seconds("experts", 1e9, 0, 0, "float32") == pytest.approx(2.0)         # efficiency 0.5
    assert _profile(op_s=1e-3).span_seconds("other", 0, 0, 10, "float32") == pytest.approx(1e-2)
    with pytest.raises(UserError, match="no peak FLOP/s for bfloat16"):
        p.peak("bfloat16")


def test_prefill_values_apply_in_the_prefill_only():
    """A calibrated profile carries `class@prefill` values: they hold while the engine prefills, the class's own
    (then "other"'s) elsewhere."""
    p = _profile(efficiency={"attention": 1.0, "attention@prefill": 0.25, "other": 0.5},
                 op_s={"attention": 1e-3, "attention@prefill": 2e-3, "other": 5e-3})
    assert p.span_seconds("attention", 1e9, 0, 10, "float32", "prefill") == pytest.approx(4.0 + 0.02)
    assert p.span_seconds("attention", 1e9, 0, 10, "float32", "decode") == pytest.approx(1.0 + 0.01)
    assert p.span_seconds("attention", 1e9, 0, 10, "float32") == pytest.approx(1.0 + 0.01)
    assert p.span_seconds("router", 1e9, 0, 10, "float32", "prefill") == pytest.approx(2.0 + 0.05)


def _write(tmp_path, prof: DeviceProfile) -> str:
    path = tmp_path / f"{prof.name}.json"
    path.write_text(json.dumps(prof.to_json()))
    return str(path)


FAST = {"name": "fast", "Bps": 1e12, "latency_s": 0.0}


def test_a_span_inside_another_counts_to_the_outer_one():
    """The inner span's FLOPs, bytes and operators go to the outer span (they were dropped), the same counts as
    when the inner module is no span at all."""
    import torch
    from vismmoe.profiles.clock import DeviceClock

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = torch.nn.Linear(8, 16)
            self.inner = torch.nn.Linear(16, 32)

        def forward(self, x):
            return self.inner(self.pre(x).relu())

    model, x = Outer(), torch.randn(4, 8)

    def counts(spans):
        clock = DeviceClock(_profile(), dtype="float32", hidden=8, inter=8, expert_bytes=1, act_bytes=4)
        hooks = [h for module, kind in spans for h in (
            module.register_forward_pre_hook(lambda mod, args, kind=kind: clock.begin(kind)),
            module.register_forward_hook(lambda mod, args, out, kind=kind: clock.end(kind)))]
        with torch.no_grad(), clock.request():
            model(x)
        for h in hooks:
            h.remove()
        return clock.counts

    nested = counts([(model, "vision"), (model.inner, "attention")])
    assert "attention" not in nested
    assert nested["vision"] == counts([(model, "vision")])["vision"]
    assert nested["vision"][0] == 2 * 4 * (8 * 16 + 16 * 32)         # both matmuls' FLOPs, the inner one's too


def test_the_engine_tells_the_clock_its_phase(tiny_dirs, image_file, tmp_path, monkeypatch):
    from vismmoe.profiles.clock import DeviceClock
    eng = load(tiny_dirs["qwen3_vl_moe"], device_profile=_write(tmp_path, _profile(name="fast", tier=FAST)))
    seen = []
    real = DeviceClock._advance
    monkeypatch.setattr(DeviceClock, "_advance", lambda self, kind, *a: (seen.append((kind, self.phase)),
                                                                          real(self, kind, *a))[1])
    eng.generate(image_file, "What is here?", max_new_tokens=3)
    assert ("vision", "prefill") in seen and ("attention", "prefill") in seen and ("attention", "decode") in seen
    assert all(phase == "prefill" for kind, phase in seen if kind == "vision")


def test_times_are_the_virtual_clocks(tiny_dirs, image_file, tmp_path):
    """Same tokens as a real run; times from the profile , and a device
    100x slower in compute takes longer than the fast one."""
    d = tiny_dirs["qwen3_vl_moe"]
    want = load(d).generate(image_file, "What is here?", max_new_tokens=4)
    fast = load(d, device_profile=_write(tmp_path, _profile(name="fast", flops={"float32": 1e12}, mem_Bps=1e11, tier=FAST)))
    slow = fast.fork(device_profile=_write(tmp_path, _profile(name="slow", flops={"float32": 1e10}, mem_Bps=1e9, tier=FAST)))
    runs = []
    for eng in (fast, fast, fast, slow):       # the first request also pays first-call work: compare the next two
        eng.cache.clear()
        runs.append(eng.generate(image_file, "What is here?", max_new_tokens=4))
    _, a, b, c = runs
    assert a.token_ids == want.token_ids == c.token_ids
    assert a.stats["time_source"] == "emulated for device profile fast"
    assert c.stats["e2e_s"] > a.stats["e2e_s"]
    assert set(a.stats["emulated_split_s"]) >= {"attention", "router", "experts", "vision", "lm_head"}
    assert want.stats["time_source"] == "measured"


def test_span_hooks_live_only_for_a_profiled_request(tiny_dirs, image_file, tmp_path):
    """A profiled fork's span hooks are on the shared model only during its own requests: a fork on the real clock
    (a validation's real side) runs without them (they cost it about 10% of a small request's time)."""
    d = tiny_dirs["qwen3_vl_moe"]
    real = load(d)
    emu = real.fork(device_profile=_write(tmp_path, _profile(name="fast", flops={"float32": 1e12}, mem_Bps=1e11,
                                                                tier=FAST)))
    seen = []
    head = real.model.get_output_embeddings()
    head.register_forward_hook(lambda mod, args, out: seen.append(len(mod._forward_hooks)))
    gen = emu.generate(image_file, "What is here?", max_new_tokens=2)
    assert gen.stats["time_source"] == "emulated for device profile fast" and min(seen) == 2   # ours + the span's
    seen.clear()
    real.generate(image_file, "What is here?", max_new_tokens=2)
    assert seen and max(seen) == 1
    assert all(not m._forward_pre_hooks for m in real.model.modules())


def test_copies_take_the_tiers_time_and_compute_waits(tiny_dirs, image_file, tmp_path):
    """At a small budget over a 10 MB/s tier every missed expert's bytes pass the virtual link; the request takes at
    least that long and the stall is counted."""
    prof = _profile(flops={"float32": 1e13}, mem_Bps=1e12, tier={"name": "slow", "Bps": 1e7, "latency_s": 0.0})
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="25%", device_profile=_write(tmp_path, prof))
    eng.cache.clear()
    g = eng.generate(image_file, "What is here?", max_new_tokens=3)
    link_s = g.stats["bytes_moved"] / 1e7
    assert g.stats["misses"] > 0 and g.stats["e2e_s"] >= link_s * 0.999
    assert g.stats["stall_s"] > 0.5 * link_s


def test_prefetch_cost_model_reads_the_profiles_rates(tiny_dirs, tmp_path):
    prof = _profile(tier={"name": "slow", "Bps": 2e7, "latency_s": 3e-5})
    eng = load(tiny_dirs["qwen3_vl_moe"], prefetch="gate", device_profile=_write(tmp_path, prof))
    assert eng.runtime.prefetcher.link_gbps == pytest.approx(0.02)
    assert eng.runtime.prefetcher.now == eng.clock.now


def test_memory_caps_the_budget(tiny_dirs, tmp_path):
    d = tiny_dirs["qwen3_vl_moe"]
    with pytest.raises(UserError, match="the model does not fit"):
        load(d, device_profile=_write(tmp_path, _profile(name="tiny", mem_bytes=1 << 20)))
    roomy = load(d, device_profile=_write(tmp_path, _profile(name="roomy")))
    import torch
    from vismmoe.engine.budget import estimate_reserve
    reserve = estimate_reserve(roomy.config, roomy.geometry, 256, roomy.layout.dtype, torch.device("cpu"))
    small = roomy.nonexpert_bytes + reserve + roomy.geometry.top_k * roomy.layout.nbytes * 2
    path = _write(tmp_path, _profile(name="small", mem_bytes=small))
    capped = load(d, device_profile=path, max_seq=256)
    assert capped.budget_bytes < roomy.budget_bytes
    with pytest.raises(UserError, match="does not fit"):
        load(d, device_profile=path, max_seq=256, expert_budget="100%")


def test_cli_refuses_bad_profile_and_link_together(tiny_dirs, image_file, capsys):
    d = tiny_dirs["qwen3_vl_moe"]
    assert main(["generate", "--model", d, "--image", image_file, "--prompt", "x", "--device-profile", "nope"]) == 2
    assert "unknown device profile" in capsys.readouterr().err
    assert main(["generate", "--model", d, "--image", image_file, "--prompt", "x", "--device-profile", "phone",
                 "--link", "edge"]) == 2
    assert "--device-profile" in capsys.readouterr().err


def test_generate_reports_emulated_times(tiny_dirs, image_file, capsys):
    code = main(["generate", "--model", tiny_dirs["qwen3_vl_moe"], "--image", image_file, "--prompt", "What is here?",
                 "--max-new-tokens", "2", "--device-profile", "orin-nx-16", "--json"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    assert stats["time_source"] == "emulated for device profile orin-nx-16"
    assert "orin-nx-16" in stats["link"]


def test_emulated_times_do_not_depend_on_the_real_copy_thread(tiny_dirs, image_file, tmp_path, monkeypatch):
    """The device clock alone decides when a copy lands: a real copy thread that is slow in one run and fast in the
    other (a loaded machine) leaves the emulated schedule, and so every emulated time, identical."""
    import time as _time
    prof = _profile(flops={"float32": 1e10}, mem_Bps=1e10, op_s=1e-4,
                    tier={"name": "slow", "Bps": 1e6, "latency_s": 1e-3})
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="25%", device_profile=_write(tmp_path, prof))
    transfer = eng.runtime.transfer
    real_copy = transfer._cpu_copy
    inputs = eng.prepare([image_file], ["What is here?"])
    runs = []
    for delay in (0.0, 0.02, 0.0):
        def copy(*a, delay=delay, **kw):
            _time.sleep(delay)
            return real_copy(*a, **kw)
        monkeypatch.setattr(transfer, "_cpu_copy", copy)
        eng.cache.clear()
        runs.append(eng.generate_ids(inputs, 4))      # (generate adds the host's image preprocessing time)
    keys = ("ttft_s", "tpot_s", "e2e_s", "stall_s", "misses")
    first = {k: runs[0][1][k] for k in keys}
    assert first["stall_s"] > 0
    for ids, stats in runs[1:]:
        assert ids == runs[0][0]
        assert {k: stats[k] for k in keys} == pytest.approx(first, rel=1e-9, abs=1e-12)


def test_each_expert_copy_costs_the_profiles_miss_s(tiny_dirs, image_file, tmp_path):
    """`miss_s` (the CPU's host work per copy) is charged on the compute timeline once per copy, class "copy"."""
    tier = {"name": "fast", "Bps": 1e15, "latency_s": 0.0}
    free = _write(tmp_path, _profile(name="free", flops={"float32": 1e10}, mem_Bps=1e10, tier=tier))
    costly = _write(tmp_path, _profile(name="costly", flops={"float32": 1e10}, mem_Bps=1e10, tier=tier, miss_s=1e-3))
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="25%", device_profile=free)
    inputs = eng.prepare([image_file], ["What is here?"])
    stats = {}
    for name, path in (("free", free), ("costly", costly)):
        fork = eng.fork(device_profile=path)
        fork.cache.clear()
        stats[name] = fork.generate_ids(inputs, 4)[1]
    assert stats["free"]["misses"] == stats["costly"]["misses"] > 0
    assert stats["costly"]["e2e_s"] - stats["free"]["e2e_s"] == pytest.approx(stats["costly"]["misses"] * 1e-3,
                                                                              rel=1e-6)
    assert stats["costly"]["emulated_split_s"]["copy"] == pytest.approx(stats["costly"]["misses"] * 1e-3)
    assert "copy" not in stats["free"]["emulated_split_s"]


def test_calibration_fit_recovers_rate_and_operator_cost():
    """Class seconds = a x roofline + s x operators over the prefill and the decode: both recovered; one phase
    takes the given operator cost; never negative."""
    from vismmoe.bench.profiles import _fit
    a, s = _fit([0.1, 0.001], [100, 400], [0.1 * 2 + 100 * 3e-5, 0.001 * 2 + 400 * 3e-5], 0.0)
    assert a == pytest.approx(2.0) and s == pytest.approx(3e-5)
    a, s = _fit([0.2], [50], [0.2 * 0.5 + 50 * 1e-5], 1e-5)
    assert a == pytest.approx(0.5) and s == 1e-5
    a, s = _fit([0.1, 0.001], [100, 400], [0.01, 0.5], 0.0)       # inconsistent phases: a non-negative fit
    assert a >= 0 and s >= 0
    # two prefill sizes and the decode (least squares): the vision tower's fixed cost and marginal rate, which one
    # size alone would fold into one rate that extrapolates linearly in FLOPs
    r, o = [0.1, 0.5, 0.002], [300, 300, 60]
    a, s = _fit(r, o, [2 * x + 1e-4 * y for x, y in zip(r, o)], 0.0)
    assert a == pytest.approx(2.0) and s == pytest.approx(1e-4)
    a1, _ = _fit(r[:1], o[:1], [2 * r[0] + 1e-4 * o[0]], 0.0)      # one size, no operator cost known
    assert 2 * r[1] + 1e-4 * o[1] < a1 * r[1]                      # over-predicts the larger size


def test_validation_decodes_past_eos(tiny_dirs, image_file):
    """The validation's requests run exactly the asked number of tokens (teacher-forced, EOS ignored), so decode
    ms/token rests on many steps."""
    from vismmoe.bench.profiles import _generate
    eng = load(tiny_dirs["qwen3_vl_moe"])
    eng.eos_ids = set(range(eng.config.text_config.vocab_size if hasattr(eng.config, "text_config") else 1000))
    stats = _generate(eng, eng.prepare([image_file], ["What is here?"]), 6)
    assert stats["new_tokens"] == 6


@pytest.mark.parametrize("argv,says", [(["--calibrate-sizes", "0"], "at least 32 px"),
                                       (["--calibrate-sizes", *"128 160 256 320 384 416 432".split()], "one to six"),
                                       (["--calibrate-sizes", "224"], "overlap --sizes"),
                                       (["--sizes", "16"], "at least 32 px")])
def test_validation_refuses_bad_sizes(argv, says, capsys, tmp_path):
    """Calibration and validation image sides: one line, exit 2, before any model is loaded or file written."""
    from vismmoe.bench.profiles import main
    assert main(["--validate", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,says", [(["--budgets", "25%", "lots"], "bad --budgets entry 'lots'"),
                                       (["--reps", "0"], "--reps 0 is too small"),
                                       (["--new-tokens", "0"], "--new-tokens 0 is too small"),
                                       (["--tolerance", "-0.1"], "--tolerance -0.1 is not a positive share"),
                                       (["--tolerance", "nan"], "--tolerance nan"),
                                       (["--date", "../elsewhere"], "is not part of a file name")])
def test_validation_refuses_bad_grid_values_before_the_model_loads(argv, says, capsys, tmp_path, monkeypatch):
    """These were reached after the model was loaded and calibrated (minutes): a budget fork, an empty median's
    traceback, a --date that wrote outside --out. One line, exit 2, no model read, nothing written."""
    import vismmoe.bench.profiles as profiles

    def no_validate(args):
        raise AssertionError("validation started before the bad value was refused")
    monkeypatch.setattr(profiles, "validate", no_validate)
    assert profiles.main(["--validate", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("keep")
    assert profiles.main(["--validate", "--out", str(tmp_path / "file")]) == 2
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep"


def test_validation_refuses_a_calibration_size_that_is_a_validated_request(capsys, tmp_path):
    """The bundled model's processor caps images at 448 px' tokens: a 640 px calibration would calibrate on the
    448 px cell's request. One line, exit 2, nothing written."""
    from vismmoe.bench.profiles import main
    assert main(["--validate", "--out", str(tmp_path / "out"), "--calibrate-sizes", "160", "640"]) == 2
    err = capsys.readouterr().err
    assert "[640]" in err and "image tokens" in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_second_validation_of_the_day_keeps_the_first_results(tmp_path):
    """bench.profiles writes `<profile>-<date>` once, then `-run2`, `-run3`, ... (it overwrote the first)."""
    from vismmoe.bench.profiles import free_stem
    stem = str(tmp_path / "cpu-local-2026-12-06")
    assert free_stem(stem) == stem
    (tmp_path / "cpu-local-2026-12-06.json").write_text("{}")
    assert free_stem(stem) == stem + "-run2"
    (tmp_path / "cpu-local-2026-12-06-run2.profile.json").write_text("{}")
    assert free_stem(stem) == stem + "-run3"


def test_one_machine_predicted_from_another_machines_fit(tiny_dirs, capsys, tmp_path):
    """--calibrated-on FILE: the efficiencies and costs a validation fitted elsewhere, on this --profile's peaks
    and rates, with no calibration here (how the H100 is predicted from the H200's fit): the profile used carries
    them and says where they came from."""
    import glob
    import json
    from dataclasses import replace as dc_replace
    from vismmoe.bench.profiles import main
    from vismmoe.profiles import get_profile, save_profile
    small = ["--validate", "--model", tiny_dirs["qwen3_vl_moe"], "--reps", "1", "--new-tokens", "2",
             "--budgets", "100%", "--sizes", "224"]
    main([*small, "--calibrate-sizes", "64", "160", "--out", str(tmp_path / "a")])
    fitted = glob.glob(str(tmp_path / "a" / "*.profile.json"))[0]
    capsys.readouterr()
    main([*small, "--profile", "orin-agx-64", "--calibrated-on", fitted, "--out", str(tmp_path / "b")])
    res = json.loads(open(glob.glob(str(tmp_path / "b" / "orin-agx-64-*[0-9].json"))[0]).read())
    other, used, orin = get_profile(fitted), res["profile"], get_profile("orin-agx-64")
    assert used["efficiency"] == other.efficiency and used["op_s"] == other.op_s and used["miss_s"] == other.miss_s
    assert used["flops"] == orin.flops and used["mem_Bps"] == orin.mem_Bps and used["tier"] == orin.tier
    assert res["calibration"]["carried_from"] == fitted and "carried from" in used["calibration"]
    capsys.readouterr()
    table = str(tmp_path / "table.profile.json")
    save_profile(dc_replace(orin, calibration=""), table)
    for argv, says in ((["--calibrated-on", fitted, "--calibrate-sizes", "160"], "give one of them"),
                       (["--calibrated-on", str(tmp_path / "a")], "is not a profile file"),
                       (["--calibrated-on", table], "is not a calibrated profile")):
        assert main([*small, *argv, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
