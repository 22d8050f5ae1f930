"""bench/server_proc.py on the CPU: what a server's start failure is reported as, from stand-ins for FreeToken's
server (tests/freetoken_standin.py) that hang, report an error on /health, or end by their own SIGTERM after
writing the log FreeToken 0.1.2 wrote when it refused 128 slots of 4 x 128 experts."""

from __future__ import annotations

import os
import sys
import time

import pytest

from vismmoe.bench import server_proc as sp

STANDIN = os.path.join(os.path.dirname(__file__), "freetoken_standin.py")
sys.path.insert(0, os.path.dirname(__file__))
import freetoken_standin  # noqa: E402

PREFILL = "AssertionError: Prefill overlap borrows two full expert-layer buffers"


def _server(tmp_path, mode: str) -> sp.Server:
    port = sp.free_port(2)
    return sp.Server("freetoken-offload", [sys.executable, STANDIN, mode, "--port", str(port)], port,
                     str(tmp_path / f"{mode}.log"))


def test_diagnose_names_the_error_not_the_last_warning():
    text = freetoken_standin.FAILED_LOG
    assert sp.diagnose(text).startswith(PREFILL) and "resource_tracker" not in sp.diagnose(text)
    assert "\x1b" not in sp.diagnose(text)
    # without FreeToken's supervisor line: the exception at the end of the traceback
    no_sup = "\n".join(ln for ln in text.splitlines() if "Backend supervisor" not in ln)
    assert sp.diagnose(no_sup).startswith(PREFILL)
    # no exception: the last logged ERROR line; nothing at all: the last meaningful line
    assert sp.diagnose("INFO start\n[x] ERROR    out of slots\nUserWarning: w\n  warnings.warn('w')\n") \
        == "[x] ERROR    out of slots"
    assert sp.diagnose("loading...\nstill loading\n/x.py:3: UserWarning: w\n  warnings.warn('w')\n") \
        == "still loading"
    assert sp.diagnose("") == "" and sp.diagnose("ValueError: moe_cache_size=51 is too small") \
        == "ValueError: moe_cache_size=51 is too small"
    # the last lines that say something: neither uvicorn's shutdown nor the warning after it
    assert sp.tail(text, 1) == ("[2026-12-06|11:58:41|initializer] ERROR    Backend worker is gone and cannot be "
                                "restarted; stopping the API server")
    assert sp.tail(text, 3).count(" / ") == 2 and "Backend supervisor: AssertionError" in sp.tail(text, 3)
    assert sp.exit_reason(-15, text) == f"ended by SIGTERM (status -15): {sp.diagnose(text)}"
    assert sp.exit_reason(1, "") == "exited with status 1"
    assert sp.health_state({"status": "loading", "phase": "expert_banks",
                            "progress": {"done_bytes": 1.93e9, "total_bytes": 4.83e9}}) \
        == "loading, phase expert_banks, 1.9 of 4.8 GB"
    assert sp.health_state({"status": "ok"}) == "ok" and sp.health_state(["x"]) == ""


def test_a_server_that_reports_its_error_on_health_is_failed_at_once(tmp_path):
    srv = _server(tmp_path, "health-error")
    t0 = time.monotonic()
    try:
        why = srv.start(timeout=60)
    finally:
        srv.stop()
    assert why == f"failed at start: {freetoken_standin.ASSERTION}"
    assert time.monotonic() - t0 < 20               # not the 60 s timeout, nor FreeToken's own 10 s to SIGTERM
    assert srv.proc.poll() is not None


def test_a_server_that_ends_by_its_own_sigterm_names_its_workers_error(tmp_path):
    srv = _server(tmp_path, "self-sigterm")
    try:
        why = srv.start(timeout=60)
    finally:
        srv.stop()
    assert why.startswith("ended by SIGTERM (status -15): " + PREFILL)
    assert "resource_tracker" not in why


def test_a_server_that_hangs_times_out_with_its_state_and_last_log_lines(tmp_path):
    srv = _server(tmp_path, "hang")
    try:
        why = srv.start(timeout=3)
    finally:
        srv.stop()
    assert why.startswith("not serving after 3 s (/health: loading, phase expert_banks, 1.9 of 4.8 GB)")
    assert "last log lines: Loading expert banks:" in why and "UserWarning" not in why
    assert srv.proc.poll() is not None and srv.proc not in sp._LIVE


@pytest.mark.parametrize("mode", ["serve"])
def test_a_serving_stand_in_is_ready(tmp_path, mode):
    srv = _server(tmp_path, mode)
    try:
        assert srv.start(timeout=60) is None and srv.start_s is not None and srv.start_s < 60
        assert srv.why_dead() is None
    finally:
        srv.stop()
    assert srv.why_dead() is not None
