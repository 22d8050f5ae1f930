"""FreeToken's OpenAI server next to `vismmoe serve` on the same checkpoint, the same expert slots and the same
prompts, through the official `openai` client (docs/freetoken.md).

    checkpoint dir (a text `qwen3_moe` checkpoint, e.g. `vismmoe make-shape --shape qwen3-30b-a3b --layers 8`)
      -> geometry from its config.json: layers x experts routed experts of 3 x hidden x moe_intermediate x dtype
         bytes each
      -> for each budget B (share of all experts; 1.0 = all resident): S = round(B x layers x experts) slots
           freetoken-offload  python -m freetoken --moe-backend offload --moe-cache-size S
           freetoken-hybrid   the same with --moe-backend hybrid (misses computed on the CPU or fetched)
           vismmoe            vismmoe serve --expert-budget S x expert bytes (fetch only: --cpu-experts off where
                              that option exists)
           vismmoe-cpu-auto   --cpu-experts auto, only where `vismmoe serve --help` offers it
      -> repetitions: for each budget, every system in turn, the order rotated each repetition (A B C, B C A, ...);
         each turn starts the server (free ports, its own process group), warms it (one round of each measured
         prompt length and client count), measures, and stops it before the next one starts
      -> a measured cell: C concurrent clients, each sending --requests streaming chat completions of a prompt of
         about P tokens (different words for every request: no prefix cache helps either side), --new-tokens new
         tokens, temperature 0, ignore_eos (random weights: every answer is exactly that long)
           TTFT     first streamed token (content or reasoning text) after the request left
           tpot     (end to end - TTFT) / (completion tokens - 1)
           e2e      the request's end to end time
           tokens/s completion tokens of all clients / wall time of the cell
         per repetition the median over requests; per row the median over repetitions
      -> device memory: nvidia-smi's memory.used on GPU 0 sampled while the server lives, minus the figure before
         it started (one server at a time: its processes and CUDA contexts included); None without nvidia-smi
      -> freetoken.json (meta, rows, every run; written after every server turn, so a cut-short run keeps what it
         measured), freetoken.md and freetoken.png (bench/freetoken_report.py)

A system that cannot run a configuration (FreeToken refuses fewer slots than experts per layer, for instance)
gets its rows with the error: the last line its stderr printed. Every server is stopped at the end, on an error
and on Ctrl-C / SIGTERM.

    python -m vismmoe.bench.freetoken --model DIR [--device cuda] [--quick] [--out docs/results/freetoken]
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import re
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import UserError
from .freetoken_report import markdown, plot
from .gpu_memory import PeakUsed, settled_used_mib

MODEL_NAME = "m"
_WORDS = ("river stone light garden window paper silver morning engine harbor forest letter orange valley winter "
          "signal castle bridge market planet thunder candle mirror rocket meadow violin island desert copper "
          "lantern shadow summer anchor feather marble circle".split())


# ---- servers ------------------------------------------------------------------------------------------------

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


def last_line(path: str) -> str:
    """What a log says went wrong: its last line naming an error (an exception's last line, `ValueError: ...`), else
    its last non-empty line that is not a warning ("" if none)."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read()[-20000:].splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if re.search(r"(Error|Exception)\b.*:", ln)]
    if errors:
        return errors[-1]
    plain = [ln for ln in lines if "warn" not in ln.lower()]
    return (plain or lines or [""])[-1]


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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float) -> str | None:
        """Start and wait until a one-token chat request answers; None when it serves, else why not (its stderr's last line,
        or the time it took)."""
        import httpx
        self.baseline_mib = settled_used_mib()
        self.sampler = PeakUsed().__enter__()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=self.env)
        _LIVE.append(self.proc)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                return f"exited with status {self.proc.returncode}: {last_line(self.log)}"
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
                        return None
                    if r.status_code != 503:
                        return f"a one-token request got HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.5)
        return f"not serving after {timeout:.0f} s: {last_line(self.log)}"

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
            return f"exited with status {self.proc.returncode}: {last_line(self.log)}"
        return None


# ---- what runs ----------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    layers: int
    experts: int
    expert_bytes: int

    @classmethod
    def of(cls, model_dir: str) -> "Geometry":
        """From config.json (text_config if there is one); UserError when it is not a routed-expert model."""
        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {model_dir}: no readable config.json ({e})", "give a checkpoint folder") from None
        text = cfg.get("text_config") or cfg
        try:
            width = {"float32": 4}.get(text.get("dtype") or text.get("torch_dtype") or cfg.get("dtype")
                                       or cfg.get("torch_dtype") or "bfloat16", 2)
            return cls(int(text["num_hidden_layers"]), int(text["num_experts"]),
                       3 * int(text["hidden_size"]) * int(text["moe_intermediate_size"]) * width)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"--model {model_dir}: config.json names no routed experts (num_experts, "
                            "moe_intermediate_size)", "give a qwen3_moe checkpoint, e.g. from `vismmoe make-shape "
                            "--shape qwen3-30b-a3b`") from None

    def slots(self, frac: float) -> int:
        return max(1, round(frac * self.layers * self.experts))


@dataclass
class System:
    name: str
    kind: str                    # "freetoken" | "vismmoe"
    backend: str                 # FreeToken's --moe-backend; vismmoe: "fetch" or --cpu-experts's value


def vismmoe_has_cpu_experts() -> bool:
    """Whether `vismmoe serve --help` offers --cpu-experts (the help text of this package's own parser: the
    servers run this same source)."""
    from ..cli.app import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "--cpu-experts" in sub.choices["serve"].format_help()


def systems(want: list[str], cpu_experts: bool) -> list[System]:
    every = [System("freetoken-offload", "freetoken", "offload"), System("freetoken-hybrid", "freetoken", "hybrid"),
             System("vismmoe", "vismmoe", "fetch")]
    if cpu_experts:
        every.append(System("vismmoe-cpu-auto", "vismmoe", "auto"))
    chosen = [s for s in every if not want or s.name in want]
    unknown = set(want) - {s.name for s in every}
    if unknown:
        raise UserError(f"--systems: unknown {sorted(unknown)}", f"choose from {', '.join(s.name for s in every)}")
    return chosen


def command(sysm: System, args, geo: Geometry, frac: float, port: int) -> list[str]:
    slots = geo.slots(frac)
    if sysm.kind == "freetoken":
        kv = max(args.clients) * (max(args.prompts) + args.new_tokens + 256)
        kv = -(-kv // 256) * 256
        return [*args.freetoken_cmd, "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", MODEL_NAME, "--moe-backend", sysm.backend, "--moe-cache-size", str(slots),
                "--max-running-requests", str(max(args.clients)), "--cuda-graph-max-bs", str(max(args.clients)),
                "--num-tokens", str(kv), "--reasoning-parser", "off", "--sampling-defaults", "none",
                *shlex.split(args.freetoken_args)]
    budget = "100%" if frac >= 1.0 else str(slots * geo.expert_bytes)
    cmd = [sys.executable, "-m", "vismmoe", "serve", "--model", args.model, "--device", args.device,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
           "--max-batch", str(max(args.clients)), "--max-queue", str(4 * max(args.clients)),
           "--expert-budget", budget]
    if args.cpu_experts_supported:
        cmd += ["--cpu-experts", "off" if sysm.backend == "fetch" else sysm.backend]
    return cmd + shlex.split(args.vismmoe_args)


# ---- prompts and clients ------------------------------------------------------------------------------------

def make_prompts(model_dir: str, target: int, n: int, seed: int = 0) -> list[str]:
    """`n` different texts (seeded words) that make chat prompts of about `target` tokens of the checkpoint's
    tokenizer, its chat template included."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        text = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
        frame = len(tok(text, add_special_tokens=False)["input_ids"])
    except Exception:            # no chat template: the servers then send the text alone
        frame = 0
    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + target * 1009 + i)
        words = " ".join(rng.choice(_WORDS) for _ in range(target + 16))
        ids = tok(words, add_special_tokens=False)["input_ids"][:max(1, target - frame)]
        out.append(tok.decode(ids))
    return out


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    tokens: int
    prompt_tokens: int | None

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else None


def one_request(client, prompt: str, new_tokens: int) -> Sample:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    ttft, chunks, usage = None, 0, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices or ():
            d = c.delta
            if d is not None and (d.content or getattr(d, "reasoning_content", None)):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    tokens = usage.completion_tokens if usage is not None and usage.completion_tokens else chunks
    return Sample(ttft if ttft is not None else e2e, e2e, tokens, usage.prompt_tokens if usage is not None else None)


def run_cell(base_url: str, prompts: list[str], clients: int, requests: int, new_tokens: int, offset: int):
    """C clients x `requests` requests each; (wall s, [Sample])."""
    from openai import OpenAI
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=900)

    def one(i: int) -> list[Sample]:
        return [one_request(client, prompts[(offset + i * requests + j) % len(prompts)], new_tokens)
                for j in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    return time.perf_counter() - t0, [s for r in results for s in r]


@dataclass
class Cell:
    """What one (system, budget, prompt, clients) measured in each repetition."""

    ttft: list = field(default_factory=list)
    tpot: list = field(default_factory=list)
    e2e: list = field(default_factory=list)
    tps: list = field(default_factory=list)
    prompt_tokens: list = field(default_factory=list)
    device_bytes: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rows_of(cells: dict, geo: Geometry) -> list[dict]:
    rows = []
    for (name, backend, frac, prompt, clients), c in cells.items():
        rows.append({
            "system": name, "backend": backend, "budget": "all" if frac >= 1.0 else f"{frac:.0%}",
            "budget_frac": frac, "slots": geo.slots(frac), "expert_budget_bytes": geo.slots(frac) * geo.expert_bytes,
            "prompt_target": prompt, "prompt_tokens": round(_med(c.prompt_tokens)) if _med(c.prompt_tokens) else None,
            "clients": clients, "ttft_s": _med(c.ttft), "tpot_s": _med(c.tpot), "e2e_s": _med(c.e2e),
            "tokens_per_s": _med(c.tps), "device_bytes": max((b for b in c.device_bytes if b is not None), default=None),
            "reps": len(c.e2e), "error": c.errors[-1] if c.errors and not c.e2e else None})
    return rows


# ---- the run ------------------------------------------------------------------------------------------------

def estimate_s(n_turns: int, cells_per_turn: int, args) -> float:
    """A rough guess, printed before the run: a server start and warm-up ~--start-guess s, a request ~0.5 s of
    prefill plus 20 ms per new token, each cell twice (warm-up and measurement)."""
    req = 0.5 + 0.02 * args.new_tokens
    per_cell = 2 * args.requests * req
    return n_turns * (args.start_guess + cells_per_turn * per_cell)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m vismmoe.bench.freetoken", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder both servers load (a text qwen3_moe model)")
    ap.add_argument("--device", default="cuda", help="vismmoe's --device (default cuda; FreeToken needs CUDA)")
    ap.add_argument("--budgets", default=None, help="shares of all experts as slots, 1 = all resident "
                                                    "(default 0.1,0.25,0.5,1)")
    ap.add_argument("--prompts", default=None, help="prompt lengths in tokens (default 512,2048)")
    ap.add_argument("--clients", default=None, help="concurrent client counts (default 1,4,8)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=2, help="requests per client per cell")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="one prompt length (2048), budgets 25%% and all, 1 and 8 clients, 2 repetitions (each "
                         "unless given explicitly)")
    ap.add_argument("--systems", default="", help="comma-separated subset of freetoken-offload, freetoken-hybrid, "
                                                  "vismmoe, vismmoe-cpu-auto (default: all that exist)")
    ap.add_argument("--freetoken-cmd", default=os.environ.get("VISMMOE_FREETOKEN_CMD", f"{sys.executable} -m freetoken"),
                    help="how to start FreeToken's server (default: $VISMMOE_FREETOKEN_CMD, else python -m freetoken)")
    ap.add_argument("--freetoken-args", default="", help="more arguments for FreeToken's server")
    ap.add_argument("--vismmoe-args", default="", help="more arguments for vismmoe serve")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to serve")
    ap.add_argument("--start-guess", type=float, default=60.0, help="seconds a start + warm-up takes, for the estimate")
    ap.add_argument("--plan", action="store_true", help="only print the turns' server commands and the estimate")
    ap.add_argument("--out", default="docs/results/freetoken")
    args = ap.parse_args(argv)
    defaults = (("0.25,1", "2048", "1,8", 2) if args.quick else ("0.1,0.25,0.5,1", "512,2048", "1,4,8", 3))
    for name, value in zip(("budgets", "prompts", "clients", "reps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.budgets = [float(x) for x in args.budgets.split(",")]
        args.prompts = [int(x) for x in args.prompts.split(",")]
        args.clients = [int(x) for x in args.clients.split(",")]
    except ValueError:
        raise UserError("--budgets, --prompts and --clients take comma-separated numbers",
                        "e.g. --budgets 0.1,0.25 --prompts 512 --clients 1,8") from None
    if not all(0 < b <= 1 for b in args.budgets):
        raise UserError(f"--budgets {args.budgets}: each share must be in (0, 1]", "e.g. 0.1,0.25,0.5,1")
    if min(args.prompts) < 32 or min(args.clients) < 1 or args.new_tokens < 2 or args.requests < 1 or args.reps < 1:
        raise UserError("prompts of at least 32 tokens, at least 1 client, 2 new tokens, 1 request and 1 repetition",
                        "give larger values")
    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model} is not a folder", "give a checkpoint folder")
    args.freetoken_cmd = shlex.split(args.freetoken_cmd)
    return args


def _env() -> dict:
    """The servers' environment: this package's source first on PYTHONPATH (the same code as this bench)."""
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run(args) -> dict | None:
    env = _env()
    geo = Geometry.of(args.model)
    args.cpu_experts_supported = vismmoe_has_cpu_experts()
    chosen = systems([s for s in args.systems.split(",") if s], args.cpu_experts_supported)
    cells_per_turn = len(args.prompts) * len(args.clients)
    turns = [(rep, frac, sysm) for rep in range(args.reps) for frac in args.budgets
             for sysm in chosen[rep % len(chosen):] + chosen[:rep % len(chosen)]]
    est = estimate_s(len(turns), cells_per_turn, args)
    print(f"{len(turns)} server turns ({len(chosen)} systems x {len(args.budgets)} budgets x {args.reps} reps), "
          f"{cells_per_turn} cells each; estimate about {est / 60:.0f} min", flush=True)
    if args.plan:
        for frac in args.budgets:
            for sysm in chosen:
                print(f"{frac:.0%} {sysm.name}: {shlex.join(command(sysm, args, geo, frac, 0))}")
        return None
    prompts = {p: make_prompts(args.model, p, 4 * max(args.clients) * args.requests) for p in args.prompts}
    os.makedirs(args.out, exist_ok=True)
    logs = tempfile.mkdtemp(prefix="freetoken-bench-")
    print(f"server logs in {logs}", flush=True)
    date = datetime.date.today().isoformat()
    meta = {"model": os.path.basename(os.path.normpath(args.model)), "model_dir": args.model, "device": _device_name(args),
            "date": date, "command": "python -m vismmoe.bench.freetoken " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "layers": geo.layers, "experts": geo.experts, "expert_bytes": geo.expert_bytes,
            "new_tokens": args.new_tokens, "requests_per_client": args.requests, "reps": args.reps,
            "freetoken_cmd": args.freetoken_cmd, "freetoken_version": _freetoken_version(env),
            "cpu_experts_option": args.cpu_experts_supported,
            "systems": [s.name for s in chosen]}
    cells: dict = {}
    runs: list = []
    t_start = time.monotonic()
    for i, (rep, frac, sysm) in enumerate(turns):
        port = free_port(2)
        srv = Server(sysm.name, command(sysm, args, geo, frac, port), port,
                     os.path.join(logs, f"{sysm.name}-{frac:g}-rep{rep}.log"), env)
        label = f"[{i + 1}/{len(turns)}] rep {rep + 1}, {frac:.0%} slots ({geo.slots(frac)}), {sysm.name}"
        print(f"{label}: starting", flush=True)
        keys = [(sysm.name, sysm.backend, frac, p, c) for p in args.prompts for c in args.clients]
        for k in keys:
            cells.setdefault(k, Cell())
        t0 = time.monotonic()
        why = srv.start(args.start_timeout)
        try:
            if why is None:
                print(f"{label}: serving after {time.monotonic() - t0:.0f} s; warming up", flush=True)
                for p in args.prompts:
                    for c in args.clients:
                        run_cell(srv.base_url, prompts[p], c, 1, args.new_tokens, offset=len(prompts[p]) // 2)
                for k in keys:
                    _, _, _, p, c = k
                    wall, samples = run_cell(srv.base_url, prompts[p], c, args.requests, args.new_tokens,
                                             offset=(rep * 7) % len(prompts[p]))
                    cell = cells[k]
                    cell.ttft.append(statistics.median(s.ttft_s for s in samples))
                    cell.tpot.append(_med([s.tpot_s for s in samples]))
                    cell.e2e.append(statistics.median(s.e2e_s for s in samples))
                    cell.tps.append(sum(s.tokens for s in samples) / wall)
                    cell.prompt_tokens.append(_med([s.prompt_tokens for s in samples]))
                    runs.append({"system": sysm.name, "budget_frac": frac, "prompt_target": p, "clients": c,
                                 "rep": rep, "wall_s": wall, "samples": [s.__dict__ for s in samples]})
                    tp = cell.tpot[-1]
                    print(f"{label}: prompt {p}, {c} clients: TTFT {cell.ttft[-1] * 1e3:.0f} ms, "
                          f"{'-' if tp is None else f'{tp * 1e3:.1f}'} ms/token, {cell.tps[-1]:.1f} tokens/s",
                          flush=True)
        except Exception as e:       # a request failed: the row says why, the run goes on
            why = srv.why_dead() or f"{type(e).__name__}: {e}".splitlines()[0][:300]
        finally:
            dev = srv.stop()
        for k in keys:
            cells[k].device_bytes.append(dev)
            if why is not None:
                cells[k].errors.append(why)
        if why is not None:
            print(f"{label}: FAILED: {why}", flush=True)
        result = {"meta": meta, "rows": rows_of(cells, geo), "runs": runs}
        write(result, args.out)
        done = time.monotonic() - t_start
        print(f"{label}: done; {done / 60:.1f} min so far, about {done / (i + 1) * (len(turns) - i - 1) / 60:.1f} "
              "min left", flush=True)
    result = {"meta": meta, "rows": rows_of(cells, geo), "runs": runs}
    write(result, args.out, with_plot=True)
    return result


def write(result: dict, out: str, with_plot: bool = False) -> None:
    with open(os.path.join(out, "freetoken.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "freetoken.md"), "w") as f:
        f.write(markdown(result))
    if with_plot:
        plot(result, os.path.join(out, "freetoken.png"))


def _device_name(args) -> str:
    if not args.device.startswith("cuda"):
        return "CPU"
    try:
        out = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out or "CUDA"
    except (OSError, subprocess.SubprocessError):
        return "CUDA"


def _freetoken_version(env) -> str | None:
    try:
        from importlib.metadata import version
        return version("freetoken")
    except Exception:
        return None


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    old = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        res = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: servers stopped; what was measured is in " + os.path.join(args.out, "freetoken.json"),
              file=sys.stderr)
        return 130
    finally:
        stop_all()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if res is not None:
        print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
