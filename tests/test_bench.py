"""`vismmoe bench --quick` on the default model: the harness runs and reports what the contract says (a smoke
test of the harness, not of speed)."""

from __future__ import annotations

import json
import os

import pytest

from vismmoe.cli.app import main


def test_bench_quick_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--limit", "3", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    keys = {"system", "link", "budget", "ttft_s", "tpot_s", "e2e_s", "hit_rate", "bytes_moved", "accuracy",
            "bound_s", "efficiency"}
    assert res["rows"] and all(keys <= r.keys() for r in res["rows"])
    assert all("emulated" in r["link"] for r in res["rows"])
    assert {r["system"] for r in res["rows"]} >= {"ondemand", "vismmoe"}
    assert "mobile/25%" in res["speedup"]
    lossless = [r for r in res["rows"] if r["system"] in ("ondemand", "lru-offload", "gate-prefetch")]
    assert len({r["accuracy"] for r in lossless}) == 1          # lossless systems answer identically
    # an efficiency is a bound over what was achieved, so at most 1: the compute term comes from resident runs
    # interleaved with the systems (their fastest), and where a busy machine still made the bound come out above a
    # measured time the row prints no efficiency and says why (1.29 was printed on a loaded machine)
    for r in res["rows"]:
        for eff, bound in (("efficiency", "bound_s"), ("efficiency_phased", "bound_phased_s")):
            if r[eff] is None:
                assert "machine's speed changed" in r[eff + "_note"], r
            else:
                assert 0 < r[eff] <= 1 and r[bound] <= r["e2e_s"], r
        assert len(r["e2e_runs_s"]) == 3                    # quick runs 3 repetitions: medians, and their spread
    # the phased bound only adds a causal term: never below the plain one
    assert all(r["bound_s"] <= r["bound_phased_s"] for r in res["rows"])
    assert all(len(v["runs"]) == 3 for v in res["speedup"].values())
    assert all(0 < r["belady_prefill_bytes"] <= r["belady_bytes"] for r in res["rows"])
    assert (out / "bench.md").exists() and (out / "latency_vs_budget.png").exists()


def test_bench_shape_path(tmp_path, capsys):
    code = main(["bench", "--shape", "tiny-qwen3", "--image-sides", "64", "--max-new-tokens", "4", "--link", "edge",
                 "--budgets", "25%", "--reps", "2", "--systems", "ondemand,vismmoe-nocompress,vismmoe", "--out",
                 str(tmp_path), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and len(res["rows"]) == 3            # reps 2: medians over runs without accuracy
    assert all(r["accuracy"] is None for r in res["rows"])            # random weights: nothing to score
    assert "RANDOM" in res["title"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert "partial" not in saved and len(saved["rows"]) == 3


def test_bench_saves_finished_groups_as_it_goes(tmp_path, monkeypatch):
    """A run cut short by a time limit keeps what it finished: after each (link, budget) group the rows so far
    are on disk, marked partial."""
    from vismmoe.bench import harness

    seen = []
    real = harness.bench_systems

    def spy(*a, on_rows=None, **k):
        def record(rows):
            on_rows(rows)
            seen.append(json.loads((tmp_path / "bench.json").read_text()))
        return real(*a, on_rows=record, **k)

    monkeypatch.setattr(harness, "bench_systems", spy)
    code = main(["bench", "--shape", "tiny-qwen3", "--image-sides", "64", "--max-new-tokens", "2", "--link", "edge",
                 "--link", "mobile", "--budgets", "25%", "--reps", "1", "--systems", "ondemand", "--out",
                 str(tmp_path)])
    assert code == 0
    assert [len(s["rows"]) for s in seen] == [1, 2] and all(s["partial"] for s in seen)
    assert "partial" not in json.loads((tmp_path / "bench.json").read_text())


def test_accelerate_banks_are_each_layers_own(tiny_dirs):
    """The accelerate baseline gets each layer's real experts (its answers are the model's and are scored);
    only a model too large to hold twice shares one bank pair, and then says it is not exact."""
    import torch

    from vismmoe import load
    from vismmoe.bench.baselines import expert_banks
    eng = load(tiny_dirs["qwen3_vl_moe"])
    banks, exact = expert_banks(eng)
    assert exact and len(banks) == len(eng.geometry.moe_layers)
    for pos, (gate_up, down) in enumerate(banks):
        gu, dn = eng.layout.views(eng.store.buffers[pos])
        assert torch.equal(gate_up, gu) and torch.equal(down, dn)
    assert not torch.equal(banks[0][0], banks[1][0])
    shared, exact = expert_banks(eng, share=True)
    assert not exact and all(b is shared[0] for b in shared)


def test_each_request_starts_cold(tmp_path, capsys):
    """The bound charges every request a cold cache, so the measurement gives each one a cold cache too: two
    identical requests move as many bytes each as one does alone, even with room for every expert."""
    moved = []
    for sides in ("64", "64,64"):
        code = main(["bench", "--shape", "tiny-qwen3", "--image-sides", sides, "--max-new-tokens", "2", "--link",
                     "edge", "--budgets", "100%", "--reps", "1", "--systems", "lru-offload", "--out",
                     str(tmp_path / sides.replace(",", "_")), "--json"])
        assert code == 0
        moved.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]["bytes_moved"])
    assert moved[0] > 0 and moved[1] == moved[0]


def test_rebound_replays_the_stream(tmp_path, capsys):
    """bench/rebound.py: from saved traces, Belady over the requests as one stream never needs more bytes than
    Belady charging each request cold, and the bound keeps its compute term."""
    from vismmoe.bench.rebound import rebound

    code = main(["bench", "--shape", "tiny-qwen3", "--image-sides", "64,96", "--max-new-tokens", "2", "--link", "edge",
                 "--budgets", "25%", "--reps", "1", "--systems", "lru-offload,vismmoe-noprefetch", "--out",
                 str(tmp_path), "--save-traces", str(tmp_path / "traces"), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = rebound(res, str(tmp_path / "traces"), device_type="cpu")
    for old, new in zip(res["rows"], out["rows"]):
        assert 0 < new["belady_bytes"] <= old["belady_bytes"]
        assert new["bound_s"] >= new["compute_s"] and "bound_phased_s" not in new


def test_shape_moe_infinity_learns_tables_from_earlier_requests(tmp_path, capsys):
    """A random-weight shape has no calibration file: moe-infinity's transition tables come from the routing of
    earlier requests (other images and tokens), so it runs its own trace prefetch rather than falling back."""
    code = main(["bench", "--shape", "tiny-qwen3", "--image-sides", "64", "--max-new-tokens", "3", "--link", "edge",
                 "--budgets", "25%", "--reps", "1", "--systems", "lru-offload,moe-infinity", "--out", str(tmp_path),
                 "--json"])
    assert code == 0
    rows = {r["system"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["moe-infinity"]["prefetch"] == "trace" and rows["lru-offload"]["prefetch"] == "none"
    assert (tmp_path / "calibration.npz").exists()


def test_compute_term_runs_are_interleaved_with_the_systems(tmp_path, monkeypatch):
    """Each repetition runs every system, then the resident passes (A B R A B R ...): the bound's compute term is
    measured over the same stretch of time as the systems, not in one separate run."""
    from vismmoe.bench import harness
    order = []
    real_sys, real_res = harness._run_requests, harness._resident_run
    monkeypatch.setattr(harness, "_run_requests", lambda eng, *a: order.append("S") or real_sys(eng, *a))
    monkeypatch.setattr(harness, "_resident_run", lambda b, key: order.append("R") or real_res(b, key))
    code = main(["bench", "--shape", "tiny-qwen3", "--image-sides", "64", "--max-new-tokens", "2", "--link", "edge",
                 "--budgets", "25%", "--reps", "3", "--systems", "ondemand,lru-offload", "--out", str(tmp_path)])
    assert code == 0
    assert "".join(order) == "SSR" * 3


def test_efficiency_above_one_is_refused_and_speedups_say_their_noise():
    from vismmoe.bench.harness import _efficiency, speedup_lines
    row = {"e2e_s": 0.100, "bound_s": 0.129}
    assert _efficiency(row, "bound_s", "efficiency") is None and "129.0 ms" in row["efficiency_note"]
    row = {"e2e_s": 0.100, "bound_s": 0.080}
    assert _efficiency(row, "bound_s", "efficiency") == pytest.approx(0.8) and "efficiency_note" not in row
    one = speedup_lines({"mobile/25%": {"speedup": 1.23, "best_baseline": "ondemand", "runs": [1.23]}}, 1)
    assert "noise is not measured" in one[0]
    spread = speedup_lines({"mobile/25%": {"speedup": 1.02, "best_baseline": "ondemand",
                                           "runs": [0.92, 1.02, 1.23]}}, 3)
    assert "each 0.92x to 1.23x; within run-to-run noise" in spread[0]


@pytest.mark.parametrize("module,argv", [
    ("serve_load", ["--admit-waits", "x"]), ("serve_load", ["--admit-waits", "-5"]),
    ("serve_load", ["--admit-waits", "0,nan"]), ("serve_load", ["--admit-waits", ""]),
    ("step_ceiling", ["--landing", "maybe"]), ("step_ceiling", ["--landing", "on,of"]),
    ("families", ["--kernels", "-1"])])
def test_bench_option_values_are_checked(module, argv, tmp_path, capsys):
    """The benches' comparison options (serve_load --admit-waits, step_ceiling --landing, families --kernels): a bad
    value is one line and exit 2, before anything is loaded or written."""
    import importlib
    mod = importlib.import_module(f"vismmoe.bench.{module}")
    out = tmp_path / "out"
    assert mod.main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and not out.exists()


def test_families_bench_runs_a_shape_in_a_process_of_its_own(tmp_path, monkeypatch, capsys):
    """bench.families with several shapes measures each in a child process (a shape's device memory is given back
    whole before the next), writes both files with every row, keeps a row for a child that wrote none, marks one
    that ended badly, and never reads back an earlier run's row."""
    import os
    import subprocess

    from vismmoe.bench import families
    seen = []

    def fake_run(cmd, *a, **k):         # the child: a row for the shape it was given, or nothing at all
        seen.append(cmd)
        shape, out = cmd[cmd.index("--shapes") + 1], cmd[cmd.index("--out") + 1]
        if shape in ("tiny-qwen3", "tiny-internvl"):
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "families.json"), "w") as f:
                json.dump({"rows": [{"shape": shape, "family": "x", "fast_tpot_ms": 1.0, "hbm_GBps": 1000.0}]}, f)
        return subprocess.CompletedProcess(cmd, 0 if shape == "tiny-qwen3" else 1)
    monkeypatch.setattr(families.subprocess, "run", fake_run)
    monkeypatch.setattr(families.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(families.torch.cuda, "get_device_name", lambda: "a card")
    stale = tmp_path / "shapes" / "tiny-gemma4"
    stale.mkdir(parents=True)
    (stale / "families.json").write_text(json.dumps({"rows": [{"shape": "tiny-gemma4", "old": True}]}))
    assert families.main(["--shapes", "tiny-qwen3,tiny-internvl,tiny-gemma4", "--layers", "999",
                          "--out", str(tmp_path)]) is None
    rows = json.loads((tmp_path / "families.json").read_text())["rows"]
    assert [r["shape"] for r in rows] == ["tiny-qwen3", "tiny-internvl", "tiny-gemma4"]
    assert rows[0] == {"shape": "tiny-qwen3", "family": "x", "fast_tpot_ms": 1.0, "hbm_GBps": 1000.0}
    assert rows[1]["child_status"] == 1
    assert "old" not in rows[2] and "status 1 and wrote no result" in rows[2]["error"]
    assert "| tiny-qwen3 | x |" in (tmp_path / "families.md").read_text()
    assert all(c[1:3] == ["-m", "vismmoe.bench.families"] and c[c.index("--layers") + 1] == "999" for c in seen)


def test_visual_top_k_system_has_its_own_bound_and_traces(tiny_dirs, tmp_path, capsys):
    """vismmoe-vtopk (vismmoe with --visual-top-k) is its own pruning setting: its row is labelled with it, its
    Belady bytes come from its own trimmed stream (never more than vismmoe's, whose visual tokens route wider), and
    rebound.py finds its saved traces beside vismmoe's."""
    from vismmoe.bench.harness import VISMMOE_VISUAL_TOP_K
    from vismmoe.bench.rebound import rebound

    code = main(["bench", "--model", tiny_dirs["qwen3_vl_moe"], "--limit", "2", "--max-new-tokens", "2", "--link",
                 "edge", "--budgets", "25%", "--reps", "1", "--systems", "vismmoe,vismmoe-vtopk", "--out",
                 str(tmp_path), "--save-traces", str(tmp_path / "traces"), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["system"]: r for r in res["rows"]}
    assert rows["vismmoe-vtopk"]["compress"] == rows["vismmoe"]["compress"] + f"+visual-top-{VISMMOE_VISUAL_TOP_K}"
    assert rows["vismmoe-vtopk"]["belady_bytes"] <= rows["vismmoe"]["belady_bytes"]
    names = os.listdir(tmp_path / "traces")
    assert any(f"_v{VISMMOE_VISUAL_TOP_K}_" in n for n in names) and any("_v" not in n for n in names)
    out = rebound(res, str(tmp_path / "traces"), device_type="cpu")
    assert [r["system"] for r in out["rows"]] == [r["system"] for r in res["rows"]]


def test_bench_visual_top_k_sets_the_systems_k(tmp_path, capsys):
    """`bench --visual-top-k K` is the K of vismmoe-vtopk (a top-8 model chooses its own), on a random-weight shape
    too; refused where no system trims visual tokens, or at the model's top-k."""
    code = main(["bench", "--shape", "tiny-qwen3", "--image-sides", "64", "--max-new-tokens", "2", "--link", "edge",
                 "--budgets", "50%", "--reps", "1", "--systems", "lru-offload,vismmoe-vtopk", "--visual-top-k", "1",
                 "--out", str(tmp_path / "a"), "--json"])
    assert code == 0
    rows = {r["system"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["vismmoe-vtopk"]["compress"].endswith("+visual-top-1") and rows["lru-offload"]["compress"] == "none@1"
    for argv, needle in ((["--systems", "vismmoe", "--visual-top-k", "1"], "and --systems runs none"),
                         (["--shape", "tiny-qwen3", "--systems", "vismmoe-vtopk", "--visual-top-k", "9"],
                          "is not below the model's top-k")):
        assert main(["bench", *argv, "--out", str(tmp_path / "b"), "--limit", "1", "--reps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_rebound_uses_the_rate_of_the_link_a_row_ran_on(tiny_dirs, tmp_path, capsys):
    """A --device-profile run's --link is `real`; its rows carry the profile tier's rate, which the rebound's bound
    divides by (the real link's rate made the rebound bound of a phone run far too small)."""
    from vismmoe.bench.rebound import rebound

    code = main(["bench", "--model", tiny_dirs["qwen3_vl_moe"], "--limit", "1", "--max-new-tokens", "2",
                 "--device-profile", "phone", "--budgets", "25%", "--reps", "1", "--systems", "lru-offload",
                 "--out", str(tmp_path), "--save-traces", str(tmp_path / "traces"), "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = res["rows"][0]
    assert row["link_name"] == "real" and row["link_gbps"] == pytest.approx(4.2, rel=0.05)
    out = rebound(res, str(tmp_path / "traces"), device_type="cpu")["rows"][0]
    assert out["bound_s"] >= out["belady_bytes"] / (row["link_gbps"] * 1e9) - 1e-12
