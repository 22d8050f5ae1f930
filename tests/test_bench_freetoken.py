"""bench/freetoken.py and its report, on the CPU: slots and byte budgets from a checkpoint's geometry, the servers'
commands, the table from a saved JSON (and its --check), and a whole run against `vismmoe serve` on a tiny
qwen3_moe checkpoint beside stand-ins for FreeToken's server (one that cannot start, one that serves and then
fails every request), whose processes must all be gone afterwards."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from vismmoe.bench import freetoken as ft
from vismmoe.bench import freetoken_plan as plan
from vismmoe.bench import server_proc
from vismmoe.bench import freetoken_report as rep

_CFG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
        "moe_intermediate_size": 768, "num_experts": 128, "num_hidden_layers": 48, "dtype": "bfloat16"}


def _fake_result() -> dict:
    def row(system, frac, clients, tpot, error=None):
        return {"system": system, "backend": "x", "budget": "all" if frac == 1 else f"{frac:.0%}", "budget_frac": frac,
                "slots": int(frac * 512), "expert_budget_bytes": 1, "prompt_target": 2048, "prompt_tokens": 2048,
                "clients": clients, "ttft_s": None if error else 0.25, "tpot_s": tpot, "e2e_s": None if error else 1.5,
                "tokens_per_s": None if error else 80.0, "device_bytes": None if error else 3 * 2**30,
                "reps": 0 if error else 2, "error": error}
    return {"meta": {"model": "qwen3-30b-a3b-L4", "device": "NVIDIA H100", "date": "2026-12-06", "command": "x"},
            "rows": [row("vismmoe", 0.25, 1, 0.0123), row("freetoken-offload", 0.25, 1, 0.0151),
                     row("freetoken-hybrid", 0.1, 1, None, "ValueError: moe_cache_size=51 is too small | x"),
                     row("vismmoe", 0.1, 1, 0.02)]}


def test_geometry_slots_and_commands(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_CFG))
    geo = ft.Geometry.of(str(tmp_path))
    assert (geo.layers, geo.experts, geo.expert_bytes, geo.top_k) == (48, 128, 3 * 2048 * 768 * 2, 8)
    assert geo.slots(0.25) == 1536 and geo.slots(1.0) == 48 * 128
    args = ft.parse_args(["--model", str(tmp_path), "--quick", "--vismmoe-args", "--policy lru"])
    assert (args.budgets, args.prompts, args.clients, args.reps) == ([0.25, 1.0], [2048], [1, 8], 2)
    args.cpu_experts_supported = True
    every = plan.systems([], True)
    by = {(t.frac, t.system.name): t for t in plan.turns(args, every, geo) if t.rep == 0}
    f = plan.command(by[(0.25, "freetoken-hybrid")], args, geo, 4000)
    assert f[f.index("--moe-cache-size") + 1] == "1536" and f[f.index("--moe-backend") + 1] == "hybrid"
    assert f[f.index("--port") + 1] == "4000" and f[f.index("--max-running-requests") + 1] == "8"
    assert plan.FREETOKEN_NO_OVERLAP not in f                  # 1536 slots >= 2 x 128: FreeToken's defaults hold
    v = plan.command(by[(0.25, "vismmoe")], args, geo, 4002)
    assert int(v[v.index("--expert-budget") + 1]) == 1536 * geo.expert_bytes      # the same bytes as the slots
    assert v[v.index("--cpu-experts") + 1] == "off" and v[-2:] == ["--policy", "lru"]
    a = plan.command(by[(0.25, "vismmoe-cpu-auto")], args, geo, 4002)
    assert a[a.index("--cpu-experts") + 1] == "auto"
    r = plan.command(by[(1.0, "vismmoe")], args, geo, 4002)
    assert r[r.index("--expert-budget") + 1] == "100%"
    assert "nothing misses" in by[(1.0, "vismmoe-cpu-auto")].skip     # all resident: auto has nothing to place
    args.cpu_experts_supported = False
    assert "--cpu-experts" not in plan.command(by[(0.25, "vismmoe")], args, geo, 1)
    assert [s.name for s in plan.systems([], False)] == ["freetoken-offload", "freetoken-hybrid", "vismmoe"]
    assert [s.name for s in every][-1] == "vismmoe-cpu-auto"


def test_freetoken_slot_rules_on_the_4_layer_30b_shape(tmp_path):
    """FreeToken 0.1.2 refuses fewer slots than one layer's experts and, with its default prefill overlap, fewer
    than two layers' (the cause of the H100 run's failed 25% start): the bench passes
    --disable-moe-prefill-overlap from one to two layers' worth, and does not start it below one."""
    (tmp_path / "config.json").write_text(json.dumps(dict(_CFG, num_hidden_layers=4)))
    geo = ft.Geometry.of(str(tmp_path))
    assert [geo.slots(b) for b in (0.1, 0.25, 0.5, 1.0)] == [51, 128, 256, 512]
    flags, why = plan.freetoken_cache(geo, 51)
    assert flags == [] and "51" in why and "128" in why
    assert plan.freetoken_cache(geo, 127)[1] is not None
    assert plan.freetoken_cache(geo, 128) == ([plan.FREETOKEN_NO_OVERLAP], None)
    assert plan.freetoken_cache(geo, 255) == ([plan.FREETOKEN_NO_OVERLAP], None)
    assert plan.freetoken_cache(geo, 256) == ([], None) and plan.freetoken_cache(geo, 512) == ([], None)
    args = ft.parse_args(["--model", str(tmp_path), "--reps", "1"])
    assert args.budgets == [0.25, 0.5, 0.1, 1.0] and args.prompts == [512, 2048] and args.clients == [1, 4, 8]
    args.cpu_experts_supported = True
    ts = plan.turns(args, plan.systems([], True), geo)
    assert len(ts) == 16 and [t.frac for t in ts[::4]] == [0.25, 0.5, 0.1, 1.0]       # the order given
    by = {(t.frac, t.system.name): t for t in ts}
    for backend in ("offload", "hybrid"):
        t25 = by[(0.25, f"freetoken-{backend}")]
        cmd = plan.command(t25, args, geo, 1)
        assert t25.skip is None and cmd[cmd.index("--moe-cache-size") + 1] == "128"
        assert plan.FREETOKEN_NO_OVERLAP in cmd
        assert plan.FREETOKEN_NO_OVERLAP not in plan.command(by[(0.5, f"freetoken-{backend}")], args, geo, 1)
        assert "refuses 51 slots" in by[(0.1, f"freetoken-{backend}")].skip
    assert by[(0.1, "vismmoe")].skip is None and by[(0.1, "vismmoe-cpu-auto")].skip is None
    assert plan.FREETOKEN_NO_OVERLAP not in plan.command(by[(0.25, "vismmoe")], args, geo, 1)
    assert sum(t.skip is None for t in ts) == 13


def test_plan_estimates_and_the_time_budget(tmp_path):
    """The plan's estimates come from an earlier run's measured starts and cells where it has them; --budget-s
    marks the turns that would end after it."""
    (tmp_path / "config.json").write_text(json.dumps(dict(_CFG, num_hidden_layers=4)))
    geo = ft.Geometry.of(str(tmp_path))
    args = ft.parse_args(["--model", str(tmp_path), "--reps", "1", "--prompts", "2048", "--clients", "1,8",
                          "--budget-s", "100"])
    args.cpu_experts_supported = False
    guessed = plan.Timings()
    assert guessed.start_s("freetoken") == plan.START_GUESS_S["freetoken"] and not guessed.measured("freetoken")
    earlier = {"meta": {"requests_per_client": 2},
               "turns": [{"kind": "freetoken", "status": "done", "start_s": 20.0, "stop_s": 2.0},
                         {"kind": "freetoken", "status": "done", "start_s": 30.0, "stop_s": 4.0},
                         {"kind": "freetoken", "status": "failed", "start_s": None, "stop_s": 1.0},
                         {"kind": "vismmoe", "status": "done", "start_s": 10.0, "stop_s": 2.0}],
               "runs": [{"system": "vismmoe", "prompt_target": 2048, "clients": 8, "wall_s": 3.0},
                        {"system": "vismmoe", "prompt_target": 2048, "clients": 8, "wall_s": 5.0}]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    tm = plan.Timings.from_file(str(path))
    assert tm.start_s("freetoken") == 25.0 and tm.start_s("vismmoe") == 10.0 and tm.stop_s() == 2.0
    assert tm.cell_s("vismmoe", 2048, 8, 3, 128) == pytest.approx(3 * 2.0)      # 2 requests per 4 s -> 2 s each
    assert tm.cell_s("vismmoe", 512, 8, 3, 128) == pytest.approx(guessed.cell_s("vismmoe", 512, 8, 3, 128))
    ts = plan.turns(args, plan.systems([], False), geo)
    v25 = next(t for t in ts if t.system.name == "vismmoe" and t.frac == 0.25)
    assert tm.turn_s(v25, args) == pytest.approx(10.0 + 2.0 + 6.0 + tm.cell_s("vismmoe", 2048, 1, 3, 128))
    assert tm.turn_s(next(t for t in ts if t.skip), args) == 0.0
    text = plan.plan_text(ts, args, geo, tm)
    lines = text.splitlines()
    assert "freetoken start 25 s (measured)" in lines[0] and "--budget-s 100" in lines[0]
    assert lines[1].startswith("[1/12] rep 1, 25% (128 slots), freetoken-offload: about ")
    assert "with --disable-moe-prefill-overlap" in lines[1]
    assert sum("does not fit --budget-s 100" in ln for ln in lines) >= 1
    assert sum("skipped: FreeToken 0.1.2 refuses 51 slots" in ln for ln in lines) == 2
    assert "server commands" in text and "--moe-cache-size 128 --disable-moe-prefill-overlap" in text
    done = {ts[0].key}
    assert "measured already (--resume)" in plan.plan_text(ts, args, geo, tm, done).splitlines()[1]


def test_bad_arguments_are_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert ft.main(["--model", str(tmp_path / "nope")]) == 2
    assert ft.main(["--model", str(tmp_path), "--budgets", "0.25,1.5"]) == 2
    assert ft.main(["--model", str(tmp_path), "--clients", "one"]) == 2
    assert ft.main(["--model", str(tmp_path), "--budget-s", "0"]) == 2
    assert ft.main(["--model", str(tmp_path), "--timings", str(tmp_path / "none.json")]) == 2
    assert ft.main(["--model", str(tmp_path), "--systems", "vllm", "--device", "cpu"]) == 2    # no routed experts
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(_CFG))
    assert ft.main(["--model", str(good), "--resume", "--out", str(tmp_path / "empty")]) == 2  # nothing to resume
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all(e.startswith("error: ") for e in err)
    assert "--budget-s 0" in err[3] and "--timings" in err[4] and "no routed experts" in err[5]
    assert err[6].startswith("error: --resume: no readable")


def test_table_from_a_saved_json_and_its_check(tmp_path, capsys):
    res = _fake_result()
    md = rep.markdown(res)
    lines = md.splitlines()
    assert lines[0] == "FreeToken and vismmoe on qwen3-30b-a3b-L4 (NVIDIA H100), 2026-12-06"
    body = [ln for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    # ordered by budget, then system; in each group the fastest decode in bold; an error row says why, escaped
    assert [ln.split(" | ")[4] for ln in body] == ["freetoken-hybrid", "vismmoe", "freetoken-offload", "**vismmoe**"]
    assert "| 25% | 128 | 2048 | 1 | **vismmoe** | 250.0 | **12.3** | 1500.0 | 80.0 | 3072 |  |" in lines
    assert body[0].endswith("| ValueError: moe_cache_size=51 is too small / x |")
    assert all(ln.count("|") == lines[4].count("|") for ln in body)
    path = tmp_path / "freetoken.json"
    path.write_text(json.dumps(res))
    assert rep.main([str(path), "--check"]) == 1                      # no markdown yet: stale
    assert rep.main([str(path)]) == 0
    assert (tmp_path / "freetoken.md").read_text() == md
    assert rep.main([str(path), "--check"]) == 0
    res["rows"][0]["tpot_s"] = 0.0099
    path.write_text(json.dumps(res))
    assert rep.main([str(path), "--check"]) == 1
    assert rep.main([str(tmp_path / "missing.json")]) == 2
    rep.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


# A stand-in for FreeToken's server: takes its flags, answers /v1/models, starts a child process (FreeToken runs its
# scheduler in children), and fails every chat completion with HTTP 500.
_FAKE = textwrap.dedent('''
    import json, subprocess, sys, http.server
    port = int(sys.argv[sys.argv.index("--port") + 1])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code); self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data))); self.end_headers(); self.wfile.write(data)
        def do_GET(self): self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self._send(500, {"error": {"message": "expert bank exploded", "type": "server_error"}})
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                            # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_run_against_vismmoe_serve_and_failing_stand_ins(tmp_path, capsys):
    from vismmoe.bench.make_shape import make_shape
    model = make_shape("tiny-qwen3-moe", str(tmp_path / "m"), layers=2, device="cpu")["dir"]
    fake = tmp_path / "fake_freetoken.py"
    fake.write_text(_FAKE)
    child_pid = tmp_path / "child.pid"
    out = tmp_path / "out"
    # freetoken-offload: the stand-in that serves and then fails; freetoken-hybrid: one that cannot start
    cmd = f"{sys.executable} {fake} {child_pid}"
    failing = f"{sys.executable} -c \"import sys; print('loading...'); sys.exit('RuntimeError: no CUDA device')\""
    t0 = time.monotonic()
    for systems, freetoken_cmd in (("vismmoe,freetoken-offload", cmd), ("freetoken-hybrid", failing)):
        assert ft.main(["--model", model, "--device", "cpu", "--systems", systems, "--freetoken-cmd", freetoken_cmd,
                        "--budgets", "0.5", "--prompts", "40", "--clients", "1,2", "--new-tokens", "4",
                        "--requests", "1", "--reps", "1", "--start-timeout", "120",
                        "--out", str(out / systems.split(",")[0])]) == 0
    assert time.monotonic() - t0 < 120
    res = json.loads((out / "vismmoe" / "freetoken.json").read_text())
    rows = {(r["system"], r["clients"]): r for r in res["rows"]}
    assert set(rows) == {("vismmoe", 1), ("vismmoe", 2), ("freetoken-offload", 1), ("freetoken-offload", 2)}
    for c in (1, 2):
        v = rows[("vismmoe", c)]
        assert v["error"] is None and v["prompt_tokens"] == 40 and v["reps"] == 1
        assert 0 < v["ttft_s"] <= v["e2e_s"] and v["tpot_s"] > 0 and v["tokens_per_s"] > 0
        assert v["slots"] == 16 and v["expert_budget_bytes"] == 16 * 3 * 64 * 48 * 2
        f = rows[("freetoken-offload", c)]
        assert f["ttft_s"] is None and "HTTP 500" in f["error"] and "expert bank exploded" in f["error"]
    assert [r["samples"][0]["tokens"] for r in res["runs"]] == [4, 4]       # ignore_eos: every answer is 4 long
    assert res["meta"]["layers"] == 2 and res["meta"]["cpu_experts_option"] in (True, False)
    assert (out / "vismmoe" / "freetoken.png").stat().st_size > 1000
    assert rep.main([str(out / "vismmoe" / "freetoken.json"), "--check"]) == 0
    bad = json.loads((out / "freetoken-hybrid" / "freetoken.json").read_text())["rows"]
    assert [r["error"] for r in bad] == ["exited with status 1: RuntimeError: no CUDA device"] * 2
    assert server_proc._LIVE == []
    assert not _alive(int(child_pid.read_text()))        # the stand-in's child went with its process group
    assert "FAILED" in capsys.readouterr().out


STANDIN = os.path.join(os.path.dirname(__file__), "freetoken_standin.py")


def test_time_budget_cuts_turns_and_resume_runs_only_what_is_missing(tmp_path, tiny_dirs, monkeypatch, capsys):
    """With stand-ins for FreeToken's server: turns whose estimate does not fit --budget-s are not started and their
    rows say so; FreeToken is not started where it would refuse the slots; --resume runs the cut turns, then only a
    missing cell, then nothing; the JSON is complete after every step."""
    model = tiny_dirs["qwen3_moe"]                                  # 4 layers x 8 experts, top-2
    argv_log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("STANDIN_ARGV", str(argv_log))
    out = tmp_path / "out"
    earlier = tmp_path / "earlier.json"                             # FreeToken starts took 50 s in an earlier run
    earlier.write_text(json.dumps({"turns": [{"kind": "freetoken", "status": "done", "start_s": 50.0,
                                              "stop_s": 1.0}]}))
    base = ["--model", model, "--device", "cpu", "--systems", "freetoken-offload,freetoken-hybrid",
            "--freetoken-cmd", f"{sys.executable} {STANDIN} serve", "--budgets", "0.25,0.1", "--prompts", "40",
            "--clients", "1,2", "--new-tokens", "4", "--requests", "1", "--reps", "1", "--out", str(out)]

    def rows():
        res = json.loads((out / "freetoken.json").read_text())
        return res, {(r["system"], r["budget"], r["clients"]): r for r in res["rows"]}

    def started() -> list[list[str]]:
        return [json.loads(ln) for ln in argv_log.read_text().splitlines()] if argv_log.exists() else []

    assert ft.main(base + ["--budget-s", "20", "--timings", str(earlier)]) == 0
    res, by = rows()
    assert started() == [] and len(by) == 8
    for s in ("freetoken-offload", "freetoken-hybrid"):
        for c in (1, 2):
            assert by[(s, "25%", c)]["error"].startswith("not run: --budget-s 20 ran out")
            assert by[(s, "25%", c)]["slots"] == 8 and by[(s, "25%", c)]["server_flags"] == [plan.FREETOKEN_NO_OVERLAP]
            assert by[(s, "10%", c)]["error"].startswith("FreeToken 0.1.2 refuses 3 slots")
    assert [t["status"] for t in res["turns"]] == ["cut", "cut"]

    assert ft.main(base + ["--resume"]) == 0
    res, by = rows()
    assert len(started()) == 2 and all("--moe-cache-size" in a and plan.FREETOKEN_NO_OVERLAP in a for a in started())
    for s in ("freetoken-offload", "freetoken-hybrid"):
        for c in (1, 2):
            r = by[(s, "25%", c)]
            assert r["error"] is None and r["reps"] == 1 and r["tpot_s"] > 0 and r["tokens_per_s"] > 0
    assert len(res["runs"]) == 4 and [t["status"] for t in res["turns"]][-2:] == ["done", "done"]
    assert all(t["start_s"] is not None for t in res["turns"][-2:])

    # a run cut short after three cells (what a kill leaves): --resume measures the fourth only
    res["runs"] = [r for r in res["runs"] if not (r["system"] == "freetoken-hybrid" and r["clients"] == 2)]
    (out / "freetoken.json").write_text(json.dumps(res))
    assert ft.main(base + ["--resume"]) == 0
    res, by = rows()
    assert len(started()) == 3 and len(res["runs"]) == 4 and res["turns"][-1]["cells"] == 1
    assert [e["command"].count("--resume") for e in res["meta"]["earlier"]] == [0, 1]    # what it resumed
    assert by[("freetoken-hybrid", "25%", 2)]["error"] is None

    capsys.readouterr()
    assert ft.main(base + ["--resume"]) == 0                        # nothing left to measure
    assert len(started()) == 3 and "measured already (--resume)" in capsys.readouterr().out
    assert ft.main(base + ["--resume", "--new-tokens", "8"]) == 2  # other settings: refused, one line
    assert "--resume" in capsys.readouterr().err
    assert server_proc._LIVE == []
