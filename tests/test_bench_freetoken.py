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
    assert (geo.layers, geo.experts, geo.expert_bytes) == (48, 128, 3 * 2048 * 768 * 2)
    assert geo.slots(0.25) == 1536 and geo.slots(1.0) == 48 * 128
    args = ft.parse_args(["--model", str(tmp_path), "--quick", "--vismmoe-args", "--policy lru"])
    assert (args.budgets, args.prompts, args.clients, args.reps) == ([0.25, 1.0], [2048], [1, 8], 2)
    args.cpu_experts_supported = True
    f = ft.command(ft.System("freetoken-hybrid", "freetoken", "hybrid"), args, geo, 0.25, 4000)
    assert f[f.index("--moe-cache-size") + 1] == "1536" and f[f.index("--moe-backend") + 1] == "hybrid"
    assert f[f.index("--port") + 1] == "4000" and f[f.index("--max-running-requests") + 1] == "8"
    v = ft.command(ft.System("vismmoe", "vismmoe", "fetch"), args, geo, 0.25, 4002)
    assert int(v[v.index("--expert-budget") + 1]) == 1536 * geo.expert_bytes      # the same bytes as the slots
    assert v[v.index("--cpu-experts") + 1] == "off" and v[-2:] == ["--policy", "lru"]
    a = ft.command(ft.System("vismmoe-cpu-auto", "vismmoe", "auto"), args, geo, 1.0, 4002)
    assert a[a.index("--expert-budget") + 1] == "100%" and a[a.index("--cpu-experts") + 1] == "auto"
    args.cpu_experts_supported = False
    assert "--cpu-experts" not in ft.command(ft.System("vismmoe", "vismmoe", "fetch"), args, geo, 0.25, 1)
    assert [s.name for s in ft.systems([], False)] == ["freetoken-offload", "freetoken-hybrid", "vismmoe"]
    assert [s.name for s in ft.systems([], True)][-1] == "vismmoe-cpu-auto"


def test_bad_arguments_are_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert ft.main(["--model", str(tmp_path / "nope")]) == 2
    assert ft.main(["--model", str(tmp_path), "--budgets", "0.25,1.5"]) == 2
    assert ft.main(["--model", str(tmp_path), "--clients", "one"]) == 2
    assert ft.main(["--model", str(tmp_path), "--systems", "vllm", "--device", "cpu"]) == 2    # no routed experts
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("error: ") for e in err)
    assert "no routed experts" in err[-1]


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
    assert ft._LIVE == []
    assert not _alive(int(child_pid.read_text()))        # the stand-in's child went with its process group
    assert "FAILED" in capsys.readouterr().out
