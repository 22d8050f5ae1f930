"""The claim table (`python -m vismmoe.bench.claim`): its rows from bench results, and the command end to end."""

from __future__ import annotations

import json
import os

import pytest

from vismmoe.bench import claim


def _row(system, budget, e2e, acc=1.0):
    return {"system": system, "budget": budget, "e2e_s": e2e, "ttft_s": e2e / 2, "tpot_s": 0.01, "accuracy": acc,
            "stall_share": 0.1, "link_name": "real"}


def test_rows_compare_with_the_best_baseline_and_the_paper():
    runs = {
        "phone": {"rows": [_row("ondemand", "25%", 3.0), _row("lru-offload", "25%", 2.7), _row("vismmoe", "25%", 1.0,
                           0.985), _row("vismmoe-nocompress", "25%", 1.2, 0.99), _row("vismmoe-lru", "25%", 1.5),
                           _row("ondemand", "50%", 2.0), _row("vismmoe", "50%", 1.0, 0.97),
                           _row("vismmoe-nocompress", "50%", 1.1, 0.99)]},
        "orin-agx-64": {"rows": [_row("gate-prefetch", "25%", 1.5), _row("vismmoe", "25%", 1.0)]},
        "laptop-8g": {"rows": [_row("vismmoe", "25%", 1.0)]},          # no baseline: no row
    }
    rows = {(r["profile"], r["budget"]): r for r in claim.claim_rows(runs)}
    assert set(rows) == {("phone", "25%"), ("phone", "50%"), ("orin-agx-64", "25%")}
    r = rows[("phone", "25%")]
    assert r["best_baseline"] == "lru-offload" and r["speedup"] == pytest.approx(2.7)
    assert r["paper_speedup"] == 2.68 and r["accuracy_kept"] is True and r["meets_paper"] is True
    assert r["ablations_e2e_s"] == {"vismmoe-nocompress": 1.2, "vismmoe-lru": 1.5}
    r = rows[("phone", "50%")]                              # 2.0x: below 2.68; and 2 points under unpruned
    assert r["accuracy_kept"] is False and r["meets_paper"] is False
    r = rows[("orin-agx-64", "25%")]                        # 1.5x against the edge's 1.61x; no unpruned row
    assert r["device_class"] == "edge" and r["accuracy_kept"] is None and r["meets_paper"] is False
    md = claim.markdown(claim.claim_rows(runs), "t")
    assert "| phone (mobile) | 25% | vismmoe |" in md and "2.70x | 2.68x | yes |" in md


def test_each_of_our_systems_gets_its_row():
    """vismmoe-vtopk (fewer experts per visual token) is compared as vismmoe is, against the same best baseline and
    the same unpruned accuracy; the ablations belong to vismmoe's row."""
    runs = {"phone": {"rows": [_row("lru-offload", "25%", 2.7), _row("vismmoe", "25%", 1.0, 0.985),
                               _row("vismmoe-vtopk", "25%", 0.9, 0.95), _row("vismmoe-nocompress", "25%", 1.2, 0.99)]}}
    rows = {r["system"]: r for r in claim.claim_rows(runs)}
    assert set(rows) == {"vismmoe", "vismmoe-vtopk"}
    v = rows["vismmoe-vtopk"]
    assert v["speedup"] == pytest.approx(3.0) and v["best_baseline"] == "lru-offload"
    assert v["unpruned_accuracy"] == 0.99 and v["accuracy_kept"] is False and v["meets_paper"] is False
    assert v["ablations_e2e_s"] == {} and rows["vismmoe"]["ablations_e2e_s"] == {"vismmoe-nocompress": 1.2}
    assert "| phone (mobile) | 25% | vismmoe-vtopk | 900.0 |" in claim.markdown(claim.claim_rows(runs), "t")


def test_claim_command_end_to_end_and_bad_input(tiny_dirs, tmp_path, capsys):
    out = str(tmp_path / "c")
    code = claim.main(["--profiles", "phone", "--out", out, "--model", tiny_dirs["qwen3_vl_moe"], "--limit", "1",
                       "--reps", "1", "--max-new-tokens", "2", "--budgets", "50%",
                       "--systems", "ondemand,vismmoe,vismmoe-nocompress"])
    assert code == 0, capsys.readouterr().err
    res = json.loads(open(os.path.join(out, "claim.json")).read())
    assert [(r["profile"], r["budget"], r["best_baseline"]) for r in res["rows"]] == [("phone", "50%", "ondemand")]
    assert os.path.exists(os.path.join(out, "claim.png")) and os.path.exists(os.path.join(out, "phone", "bench.json"))
    assert "emulated" in res["title"]
    assert claim.main(["--profiles", "phone", "--out", out, "--model", tiny_dirs["qwen3_vl_moe"], "--limit", "1",
                       "--reps", "1", "--max-new-tokens", "2", "--budgets", "50%", "--systems", "ondemand,vismmoe",
                       "--json-out-of-place"]) == 2     # bench's own refusal: nothing of the first run is lost
    assert os.path.exists(os.path.join(out, "claim.json"))
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for argv, needle in ((["--out", str(mine)], "is a folder with other files in it"),
                         (["--out", tiny_dirs["qwen3_vl_moe"], "--model", tiny_dirs["qwen3_vl_moe"]], "--out"),
                         (["--out", str(mine / "notes.txt")], "is an existing file")):
        assert claim.main(["--profiles", "phone", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert (mine / "notes.txt").read_text() == "keep" and os.listdir(mine) == ["notes.txt"]
    for argv, needle in ((["--profiles", "nokia-3310"], "unknown nokia-3310"),
                         (["--profiles", "phone", "--link", "edge"], "--link is set by the claim bench"),
                         (["--profiles", "phone", "--json"], "--json is set by the claim bench")):
        assert claim.main([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_what_no_bench_can_mend_is_refused_before_the_first_bench(tmp_path, capsys, monkeypatch):
    """A profile file that cannot be read, two profiles sharing one bench folder, and --systems that give no claim
    row were found only after the benches before them had run (minutes each)."""
    import vismmoe.cli.app

    def no_bench(argv):
        raise AssertionError(f"a bench ran before the bad input was refused: {argv}")
    monkeypatch.setattr(vismmoe.cli.app, "main", no_bench)
    other = tmp_path / "elsewhere"
    for argv, needle in ((["--profiles", f"phone,{tmp_path / 'missing.json'}"], "missing.json"),
                         (["--profiles", "phone,phone"], "would write one bench folder"),
                         (["--profiles", f"phone,{other / 'phone.json'}"], "elsewhere"),
                         (["--profiles", "phone", "--systems", "vismmoe"], "gives no claim row"),
                         (["--profiles", "phone", "--systems=ondemand,lru-offload"], "gives no claim row"),
                         (["--profiles", ","], "names no profile")):
        assert claim.main([*argv, "--out", str(tmp_path / "c")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()
