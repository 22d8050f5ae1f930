"""A benchmarked OpenAI server as a child process: started in its own process group on a free loopback port, probed
until it serves, diagnosed when it does not, and stopped with everything it spawned.

    Server(system, argv, port, log).start(timeout) -> None when a one-token chat request answers, else why not:
      - it exited:        "exited with status N" (or "ended by SIGTERM (status -15)": FreeToken stops itself so
                          when its engine worker died) + the error its log names
      - /health said so:  "failed at start: <its message>" (FreeToken's /health answers {"status": "error",
                          "message": <the exception its engine worker died of>}, ten seconds before FreeToken
                          stops itself with SIGTERM)
      - the clock ran out: "not serving after T s (/health: loading, phase ..., x of y GB); last log lines: ..."
    diagnose(log text) -> the line that says what went wrong (see its docstring)
    stop(proc) / stop_all(): SIGTERM to the group, SIGKILL after a grace period, the group's leftovers killed

Device memory: nvidia-smi's used memory of GPU 0 sampled while the server lives, minus the figure before it started
(read once the previous server's memory has been handed back); None without nvidia-smi.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from .gpu_memory import PeakUsed, settled_used_mib

_LIVE: list[subprocess.Popen] = []


def free_port(span: int = 2) -> int:
    """A loopback port p with p .. p+span-1 all free now (FreeToken also listens on its port + 1)."""
    rng = random.Random()
    for _ in range(200):
        p = rng.randrange(20000, 60000)
        socks = []
        try:
            for q in range(p, p + span):
                s = socket.socket()
                s.bind(("127.0.0.1", q))
                socks.append(s)
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free loopback port found")


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace` s; waits until it is gone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    try:                                    # children left in the group (FreeToken's workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc in _LIVE:
        _LIVE.remove(proc)


def stop_all() -> None:
    for proc in list(_LIVE):
        stop(proc, grace=5.0)


atexit.register(stop_all)


# ---- what a log says ----------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Lines that never say what went wrong: warnings and the source line Python prints under them (a leaked semaphore
# of multiprocessing's resource_tracker ends every log of a process killed by a signal), traceback frames,
# uvicorn's shutdown chatter.
_NOISE = re.compile(r"resource_tracker|warnings\.warn\(|\bwarn\(|\w*Warning\b|\bWARNING\b|^Traceback \(most recent"
                    r"|^File \"|^[\^~\s]+$|^INFO:\s+(Shutting down|Waiting for|Finished server process"
                    r"|Application shutdown)")
_SUPERVISOR = re.compile(r"Backend supervisor: (.+)")          # FreeToken's front end naming its worker's failure
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")
_LOGGED_ERROR = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b")


def log_lines(text: str) -> list[str]:
    """Non-empty lines, colour codes dropped; of a progress bar redrawn with carriage returns, its last state."""
    out = []
    for ln in _ANSI.sub("", text).split("\n"):
        ln = next((part.strip() for part in reversed(ln.split("\r")) if part.strip()), "")
        if ln:
            out.append(ln)
    return out


def meaningful(lines: list[str]) -> list[str]:
    return [ln for ln in lines if not _NOISE.search(ln)]


def diagnose(text: str) -> str:
    """The line of a server log that says what went wrong, in this order: FreeToken's "Backend supervisor: <reason>"
    (the exception its engine worker died of), else the last exception line (`ValueError: ...`), else the last
    logged ERROR/CRITICAL line, else the last meaningful line; warnings, traceback frames and progress bars are
    never it. "" for an empty log."""
    lines = log_lines(text)
    for pattern in (_SUPERVISOR, _EXCEPTION, _LOGGED_ERROR):
        hits = [ln for ln in meaningful(lines) if pattern.search(ln)]
        if hits:
            m = _SUPERVISOR.search(hits[-1])
            return _clip(m.group(1) if m else hits[-1])
    rest = meaningful(lines)
    return _clip(rest[-1]) if rest else ""


def tail(text: str, n: int = 3) -> str:
    """The last `n` meaningful lines of a log, joined with " / "."""
    return " / ".join(_clip(ln, 160) for ln in meaningful(log_lines(text))[-n:])


def _clip(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 40000))
            return f.read()
    except OSError:
        return ""


def exit_reason(returncode: int, log_text: str) -> str:
    how = f"exited with status {returncode}"
    if returncode < 0:
        try:
            how = f"ended by {signal.Signals(-returncode).name} (status {returncode})"
        except ValueError:
            pass
    why = diagnose(log_text)
    return f"{how}: {why}" if why else how


def health_state(doc) -> str:
    """A /health answer in a few words: its status, and where FreeToken says it is loading, the phase and bytes."""
    if not isinstance(doc, dict) or "status" not in doc:
        return ""
    out = str(doc["status"])
    if doc.get("phase"):
        out += f", phase {doc['phase']}"
    prog = doc.get("progress") or {}
    if isinstance(prog, dict) and prog.get("total_bytes"):
        out += f", {prog.get('done_bytes', 0) / 1e9:.1f} of {prog['total_bytes'] / 1e9:.1f} GB"
    return out


# ---- the server ---------------------------------------------------------------------------------------------

@dataclass
class Server:
    """One server process: its command, port, log, and the device memory it held."""

    system: str
    argv: list[str]
    port: int
    log: str
    env: dict | None = None
    proc: subprocess.Popen | None = None
    baseline_mib: float | None = None
    sampler: PeakUsed | None = None
    start_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float, poll: float = 0.5) -> str | None:
        """Start and wait until a one-token chat request answers; None when it serves (`start_s` then says how long
        it took), else why not (see the module docstring)."""
        import httpx
        self.baseline_mib = settled_used_mib()
        self.sampler = PeakUsed().__enter__()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.env)
        _LIVE.append(self.proc)
        t0 = time.monotonic()
        health = ""
        root = f"http://127.0.0.1:{self.port}"
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                time.sleep(0.2)             # the last lines of its children
                return exit_reason(self.proc.returncode, _read(self.log))
            try:
                h = httpx.get(root + "/health", timeout=2)
                doc = h.json() if h.headers.get("content-type", "").startswith("application/json") else None
                health = health_state(doc) or health
                if isinstance(doc, dict) and doc.get("status") == "error":
                    return f"failed at start: {_clip(str(doc.get('message') or doc))}"
            except (httpx.HTTPError, ValueError):
                pass
            try:
                # ready = a one-token chat request answers; /v1/models can answer while the weights still load
                # (FreeToken answers 503 "model is still loading" then)
                models = httpx.get(self.base_url + "/models", timeout=2)
                if models.status_code == 200:
                    name = models.json()["data"][0]["id"]
                    r = httpx.post(self.base_url + "/chat/completions", timeout=60,
                                   json={"model": name, "max_tokens": 1,
                                         "messages": [{"role": "user", "content": "hi"}]})
                    if r.status_code == 200:
                        self.start_s = time.monotonic() - t0
                        return None
                    if r.status_code != 503:
                        return f"a one-token request got HTTP {r.status_code}: {_clip(r.text, 200)}"
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            time.sleep(poll)
        text = _read(self.log)
        where = f" (/health: {health})" if health else ""
        err = diagnose(text)
        last = tail(text)
        msg = f"not serving after {timeout:.0f} s{where}"
        if err and err not in last:
            msg += f"; error in its log: {err}"
        return msg + (f"; last log lines: {last}" if last else "; its log is empty")

    def stop(self) -> int | None:
        """Stop it; the device bytes it held at most (None without nvidia-smi)."""
        if self.proc is not None:
            stop(self.proc)
        if self.sampler is not None:
            self.sampler.__exit__(None, None, None)
        if self.sampler is None or self.sampler.peak_mib is None or self.baseline_mib is None:
            return None
        return int(max(0.0, self.sampler.peak_mib - self.baseline_mib) * 2**20)

    def why_dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return exit_reason(self.proc.returncode, _read(self.log))
        return None


_NOTE = re.compile(r"Resolved config:|--moe-hybrid-max-fetch|prefill overlap|--moe-cache-auto resolved|"
                   r"MoE cache \d+/\d+")


def log_notes(path: str, n: int = 6) -> list[str]:
    """The lines of a server log that say how it resolved its configuration (FreeToken: the MoE backend, the
    hybrid backend's fetch share, prefill overlap, the cache's slots), at most `n`."""
    return [_clip(ln, 240) for ln in log_lines(_read(path)) if _NOTE.search(ln)][:n]
