"""Results tables in README.md and docs/*.md are regenerated from the saved bench JSON (vismmoe.bench.tables)
and cannot drift."""

from __future__ import annotations

import glob
import json
import os

import pytest

from vismmoe.bench.tables import main, regenerate, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every markdown file that may hold generated tables; a block's JSON path is relative to its file
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _row(system, link, budget, e2e, moved=3 * 2**20, emulated=True):
    return {"system": system, "link_name": link, "budget": budget,
            "link": f"{link} (emulated 3 GB/s, 50 us/transfer)" if emulated else link,
            "ttft_s": e2e / 2, "tpot_s": 0.0123, "e2e_s": e2e, "hit_rate": 0.5, "bytes_moved": moved,
            "stall_share": 0.1, "accuracy": None, "bound_s": e2e / 2, "efficiency": 0.5}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_results_tables_match_their_json(path):
    with open(path) as f:
        text = f.read()
    new, stale = regenerate(text, os.path.dirname(path))
    rel = os.path.relpath(path, ROOT)
    assert stale == [], f"run python -m vismmoe.bench.tables {rel}: {stale}"


def test_the_results_tables_are_there():
    counts = {}
    for path in DOCS:
        with open(path) as f:
            counts[os.path.relpath(path, ROOT)] = f.read().count("<!-- /bench -->")
    assert counts.get(os.path.join("docs", "benchmarks.md"), 0) >= 11, counts


def test_blocks_render_filter_and_mark_the_fastest(tmp_path):
    rows = [_row("lru-offload", "mobile", "25%", 2.5), _row("vismmoe", "mobile", "25%", 1.25),
            _row("vismmoe", "mobile", "50%", 0.5), _row("lru-offload", "real", "25%", 0.2, emulated=False)]
    res = {"rows": rows, "speedup": {"mobile/25%": {"speedup": 2.0, "best_baseline": "lru-offload"},
                                     "mobile/10%": {"speedup": 1.5, "best_baseline": "ondemand"}}}
    (tmp_path / "b.json").write_text(json.dumps(res))
    out = render("b.json budget=25% links=mobile cols=system,link,e2e,tpot,moved", str(tmp_path))
    lines = out.splitlines()
    assert lines[0] == "| system | link | e2e ms | ms/token | MiB moved |" and len(lines) == 4
    assert lines[2] == "| lru-offload | mobile (emulated) | 2500 | 12.3 | 3.0 |"
    assert lines[3] == "| **vismmoe** | mobile (emulated) | **1250** | 12.3 | 3.0 |"
    real = render("b.json links=real cols=system,link,moved", str(tmp_path))
    assert "| real |" in real and "MiB" in real
    assert render("b.json speedup", str(tmp_path)) == (
        "Speedup of `vismmoe` over the best baseline, end to end: "
        "mobile/10% 1.50x (vs ondemand), mobile/25% 2.00x (vs lru-offload).\n")
    with pytest.raises(ValueError):
        render("b.json cols=system,nope", str(tmp_path))
    with pytest.raises(ValueError):
        render("b.json budget=99%", str(tmp_path))


def test_cli_check_rewrite_and_errors(tmp_path, capsys):
    (tmp_path / "b.json").write_text(json.dumps({"rows": [_row("vismmoe", "edge", "25%", 0.1, moved=5 * 2**30)],
                                                 "speedup": {}}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench b.json cols=system,moved -->\nold table\n<!-- /bench -->\nafter\n")
    assert main([str(readme), "--check"]) == 1
    assert main([str(readme)]) == 0
    assert readme.read_text() == ("intro\n<!-- bench b.json cols=system,moved -->\n| system | GiB moved |\n|---|---|\n"
                                  "| vismmoe | 5.0 |\n<!-- /bench -->\nafter\n")
    assert main([str(readme), "--check"]) == 0
    readme.write_text("<!-- bench missing.json -->\nx\n<!-- /bench -->\n")
    capsys.readouterr()
    assert main([str(readme)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err


def test_a_device_profile_run_names_its_tier_not_real():
    """A --device-profile run's --link is `real`, which the profile's expert tier replaces: the tables and the
    speedup line name the tier."""
    from vismmoe.bench.harness import speedup_lines, speedups
    rows = [dict(_row(s, "real", "25%", e2e), link="phone:UFS 4.0 flash (emulated 4.2 GB/s, 50 us/transfer)",
                 e2e_runs_s=[e2e]) for s, e2e in (("lru-offload", 2.0), ("vismmoe", 1.0))]
    from vismmoe.bench.tables import markdown
    table = markdown(rows, "t")
    assert "| phone:UFS 4.0 flash (emulated) |" in table and "| real" not in table
    line = speedup_lines(speedups(rows), 1)[0]
    assert "on phone:UFS 4.0 flash (emulated), 25%: 2.00x" in line, line

