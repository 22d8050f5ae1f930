"""FreeToken's OpenAI server next to `vismmoe serve` on the same checkpoint, the same expert slots and the same
prompts, through the official `openai` client (docs/freetoken.md).

    checkpoint dir (a text `qwen3_moe` checkpoint, e.g. `vismmoe make-shape --shape qwen3-30b-a3b --layers 4`)
      -> the turns (bench/freetoken_plan.py): for each budget B, S = round(B x layers x experts) slots in both
         systems' one pool of slots
           freetoken-offload  python -m freetoken --moe-backend offload --moe-cache-size S [+ the flags FreeToken
                              0.1.2 needs for S: --disable-moe-prefill-overlap below 2 x experts slots; below one
                              layer's experts it refuses, and the rows say so without starting it]
           freetoken-hybrid   the same with --moe-backend hybrid (misses computed on the CPU or fetched)
           vismmoe            vismmoe serve --expert-budget S x expert bytes (fetch only: --cpu-experts off)
           vismmoe-cpu-auto   --cpu-experts auto (where `vismmoe serve --help` offers it; not at 100%, where
                              nothing misses)
      -> each turn starts the server (free ports, its own process group), and per cell (prompt P, C clients) warms
         it with one round and measures --requests rounds, then stops it before the next one starts; the order of
         the systems rotates each repetition
      -> a measured cell: C concurrent clients, each sending --requests streaming chat completions of a prompt of
         about P tokens (different words for every request: no prefix cache helps either side), --new-tokens new
         tokens, temperature 0, ignore_eos (random weights: every answer is exactly that long)
           TTFT     first streamed token (content or reasoning text) after the request left
           tpot     (end to end - TTFT) / (completion tokens - 1)
           e2e      the request's end to end time
           tokens/s completion tokens of all clients / wall time of the cell
         per repetition the median over requests; per row the median over repetitions
      -> device memory: nvidia-smi's memory.used on GPU 0 sampled while the server lives, minus the settled figure
         before it started; None without nvidia-smi
      -> freetoken.json (meta, rows, turns, runs; rewritten after every cell, so a run cut short keeps what it
         measured, and --resume runs only what is missing), freetoken.md and freetoken.png (freetoken_report.py)

Time: the plan (printed first; --plan prints only it) gives each turn's estimate from the starts and cells an
earlier run measured (--timings, default the JSON in --out) or guesses; --budget-s S starts no turn and measures no
cell that would end after S seconds, and says so in their rows. A server that cannot start gets its rows with the
reason (bench/server_proc.py: FreeToken's /health error, the exception in its log, or where a start timed out).
Every server is stopped at the end, on an error and on Ctrl-C / SIGTERM.

    python -m vismmoe.bench.freetoken --model DIR [--device cuda] [--quick] [--budget-s 540] [--resume] [--plan]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import UserError
from .freetoken_plan import MODEL_NAME, Geometry, Timings, Turn, command, plan_text, systems, turns
from .freetoken_report import markdown, plot
from .server_proc import Server, free_port, log_notes, stop_all

_WORDS = ("river stone light garden window paper silver morning engine harbor forest letter orange valley winter "
          "signal castle bridge market planet thunder candle mirror rocket meadow violin island desert copper "
          "lantern shadow summer anchor feather marble circle".split())
_KEEP_META = ("device", "layers", "experts", "expert_bytes", "new_tokens", "requests_per_client")   # --resume


def vismmoe_has_cpu_experts() -> bool:
    """Whether `vismmoe serve --help` offers --cpu-experts (the help text of this package's own parser: the
    servers run this same source)."""
    from ..cli.app import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "--cpu-experts" in sub.choices["serve"].format_help()


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


def run_cell(base_url: str, prompts: list[str], clients: int, requests: int, new_tokens: int, offset: int,
             timeout: float = 900.0):
    """C clients x `requests` requests each, a request failing after `timeout` s; (wall s, [Sample])."""
    from openai import OpenAI
    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout)

    def one(i: int) -> list[Sample]:
        return [one_request(client, prompts[(offset + i * requests + j) % len(prompts)], new_tokens)
                for j in range(requests)]
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(clients)
    try:
        results = list(pool.map(one, range(clients)))
    except BaseException:
        # Ctrl-C / SIGTERM or a failed request: do not wait here for the other clients' requests (the caller stops
        # the server, which ends them)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return time.perf_counter() - t0, [s for r in results for s in r]


# ---- rows ---------------------------------------------------------------------------------------------------

def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rows_of(plan: list[Turn], runs: list[dict], turn_log: list[dict], geo: Geometry, args) -> list[dict]:
    """One row per (budget, system, prompt, clients) of the plan: medians over repetitions of the per-repetition
    medians over requests, from `runs`; where nothing was measured, the reason (the turn's skip, its failure, or
    the time budget)."""
    rows, seen = [], set()
    for t in plan:
        if (t.frac, t.system.name) in seen:
            continue
        seen.add((t.frac, t.system.name))
        recs = [r for r in turn_log if r["budget_frac"] == t.frac and r["system"] == t.system.name]
        dev = max((r["device_bytes"] for r in recs if r.get("device_bytes") is not None), default=None)
        for p in args.prompts:
            for c in args.clients:
                mine = [r for r in runs if (r["system"], r["budget_frac"], r["prompt_target"], r["clients"])
                        == (t.system.name, t.frac, p, c)]
                per_rep = [[Sample(**s) for s in r["samples"]] for r in mine]
                err = None
                if not mine:
                    why = [r["error"] for r in recs if r.get("error")]
                    err = t.skip or (why[-1] if why else "not run")
                rows.append({
                    "system": t.system.name, "backend": t.system.backend,
                    "budget": "all" if t.frac >= 1.0 else f"{t.frac:.0%}", "budget_frac": t.frac,
                    "slots": t.slots, "slots_per_layer": round(t.slots / geo.layers, 2),
                    "expert_budget_bytes": t.slots * geo.expert_bytes,
                    "server_flags": t.flags,
                    "prompt_target": p,
                    "prompt_tokens": _round(_med([_med([s.prompt_tokens for s in ss]) for ss in per_rep])),
                    "clients": c,
                    "ttft_s": _med([statistics.median(s.ttft_s for s in ss) for ss in per_rep]),
                    "tpot_s": _med([_med([s.tpot_s for s in ss]) for ss in per_rep]),
                    "e2e_s": _med([statistics.median(s.e2e_s for s in ss) for ss in per_rep]),
                    "tokens_per_s": _med([sum(s.tokens for s in ss) / r["wall_s"] for ss, r in zip(per_rep, mine)]),
                    "device_bytes": dev, "reps": len(mine), "error": err})
    return rows


def _round(x):
    return None if x is None else round(x)


# ---- the run ------------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m vismmoe.bench.freetoken", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder both servers load (a text qwen3_moe model)")
    ap.add_argument("--device", default="cuda", help="vismmoe's --device (default cuda; FreeToken needs CUDA)")
    ap.add_argument("--budgets", default=None, help="shares of all experts as slots, 1 = all resident, run in this "
                                                    "order (default 0.25,0.5,0.1,1)")
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
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds the whole run may take: no turn starts and no cell is measured that would end "
                         "later (their rows say so; --resume runs them later). Default: no limit")
    ap.add_argument("--timings", default=None, help="a JSON of an earlier run whose measured starts and cells the "
                                                    "estimates use (default: --out's freetoken.json if there is one)")
    ap.add_argument("--resume", action="store_true", help="keep what --out's freetoken.json measured and run only "
                                                          "the turns and cells it lacks")
    ap.add_argument("--plan", action="store_true", help="only print the turns, their estimates and server commands")
    ap.add_argument("--out", default="docs/results/freetoken")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    defaults = (("0.25,1", "2048", "1,8", 2) if args.quick else ("0.25,0.5,0.1,1", "512,2048", "1,4,8", 3))
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
    if args.budget_s is not None and args.budget_s <= 0:
        raise UserError(f"--budget-s {args.budget_s:g}: must be a positive number of seconds", "e.g. --budget-s 540")
    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model} is not a folder", "give a checkpoint folder")
    if args.timings is not None and not os.path.isfile(args.timings):
        raise UserError(f"--timings {args.timings} is not a file", "give the freetoken.json of an earlier run")
    args.freetoken_cmd = shlex.split(args.freetoken_cmd)
    return args


def _env() -> dict:
    """The servers' environment: this package's source first on PYTHONPATH (the same code as this bench)."""
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _previous(path: str, meta: dict) -> dict:
    """--resume: the earlier result at `path` (UserError when missing or made with other settings)."""
    try:
        with open(path) as f:
            prev = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: no readable {path} ({e})", "run without --resume first") from None
    old = prev.get("meta", {})
    differ = [k for k in _KEEP_META if old.get(k) != meta[k]]
    if differ:
        raise UserError(f"--resume: {path} was measured with other settings ({', '.join(differ)})",
                        "give the same --model, --new-tokens and --requests on the same card, or another --out")
    return prev


class _Run:
    """The result being built: meta, the turns' log, the measured cells; written (atomically) after every cell."""

    def __init__(self, meta: dict, plan: list[Turn], geo: Geometry, args, prev: dict | None):
        self.meta, self.plan, self.geo, self.args = meta, plan, geo, args
        self.turn_log: list[dict] = list(prev.get("turns", [])) if prev else []
        self.runs: list[dict] = list(prev.get("runs", [])) if prev else []

    def done_cells(self, t: Turn) -> set:
        return {(r["prompt_target"], r["clients"]) for r in self.runs
                if (r["rep"], r["budget_frac"], r["system"]) == t.key}

    def failed(self, t: Turn) -> bool:
        return any(r["status"] == "failed" and (r["rep"], r["budget_frac"], r["system"]) == t.key
                   for r in self.turn_log)

    def result(self) -> dict:
        return {"meta": self.meta, "rows": rows_of(self.plan, self.runs, self.turn_log, self.geo, self.args),
                "turns": self.turn_log, "runs": self.runs}

    def write(self, with_plot: bool = False) -> dict:
        res = self.result()
        out = self.args.out
        os.makedirs(out, exist_ok=True)
        for name, text in (("freetoken.json", json.dumps(res, indent=1)), ("freetoken.md", markdown(res))):
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(out, name))
        if with_plot and any(r["tpot_s"] is not None for r in res["rows"]):
            plot(res, os.path.join(out, "freetoken.png"))
        return res


def run(args) -> dict | None:
    t_start = time.monotonic()                              # --budget-s counts from here
    env = _env()
    geo = Geometry.of(args.model)
    args.cpu_experts_supported = vismmoe_has_cpu_experts()
    chosen = systems([s for s in args.systems.split(",") if s], args.cpu_experts_supported)
    plan = turns(args, chosen, geo)
    out_json = os.path.join(args.out, "freetoken.json")
    meta = {"model": os.path.basename(os.path.normpath(args.model)), "model_dir": args.model,
            "device": _device_name(args), "date": datetime.date.today().isoformat(),
            "command": "python -m vismmoe.bench.freetoken " + shlex.join(args.argv),
            "layers": geo.layers, "experts": geo.experts, "expert_bytes": geo.expert_bytes, "top_k": geo.top_k,
            "new_tokens": args.new_tokens, "requests_per_client": args.requests, "reps": args.reps,
            "budget_s": args.budget_s, "freetoken_cmd": args.freetoken_cmd,
            "freetoken_version": _freetoken_version(), "freetoken_hybrid_profile": _benchbw_profile(),
            "cpu_experts_option": args.cpu_experts_supported, "systems": [s.name for s in chosen]}
    prev = _previous(out_json, meta) if args.resume else None
    if prev:                                                # the commands and dates of what it resumes
        old = prev.get("meta", {})
        meta["earlier"] = old.get("earlier", []) + [{k: old.get(k) for k in ("date", "command")}]
    timings = Timings.from_file(args.timings or out_json)
    state = _Run(meta, plan, geo, args, prev)
    done = {t.key for t in plan if state.failed(t)
            or state.done_cells(t) >= {(p, c) for p in args.prompts for c in args.clients}}
    print(plan_text(plan, args, geo, timings, done), flush=True)
    if args.plan:
        return None
    prompts = {p: make_prompts(args.model, p, 4 * max(args.clients) * args.requests) for p in args.prompts}
    logs = tempfile.mkdtemp(prefix="freetoken-bench-")
    print(f"server logs in {logs}", flush=True)

    def left() -> float | None:
        """Seconds of --budget-s left (None: no budget)."""
        return None if args.budget_s is None else args.budget_s - (time.monotonic() - t_start)
    todo = [t for t in plan if not t.skip and t.key not in done]
    state.write()
    for i, t in enumerate(todo):
        label = f"[{i + 1}/{len(todo)}] {t.label()}"
        cells = [(p, c) for p in args.prompts for c in args.clients if (p, c) not in state.done_cells(t)]
        need = (timings.start_s(t.system.kind) + timings.stop_s()
                + sum(timings.cell_s(t.system.name, p, c, args.requests + 1, args.new_tokens) for p, c in cells))
        if left() is not None and need > left():
            why = (f"not run: --budget-s {args.budget_s:.0f} ran out (about {max(0.0, left()):.0f} s left, this "
                   f"turn needs about {need:.0f} s); run again with --resume")
            state.turn_log.append(_record(t, "cut", why))
            print(f"{label}: {why}", flush=True)
            state.write()
            continue
        _turn(t, label, cells, args, geo, env, prompts, logs, state, timings, left)
        done_s = time.monotonic() - t_start
        rest = sum(timings.turn_s(u, args) for u in todo[i + 1:])
        print(f"{label}: done; {done_s / 60:.1f} min so far, about {rest / 60:.1f} min left", flush=True)
    return state.write(with_plot=True)


def _record(t: Turn, status: str, error: str | None = None, **kw) -> dict:
    return {"rep": t.rep, "budget_frac": t.frac, "system": t.system.name, "kind": t.system.kind, "slots": t.slots,
            "flags": t.flags, "status": status, "error": error, **kw}


def _turn(t: Turn, label: str, cells: list, args, geo, env, prompts, logs, state: _Run, timings: Timings, left):
    """Start the turn's server, warm and measure each missing cell (while the time budget lasts), stop it; its
    record goes to the turns' log, its cells to the runs."""
    port = free_port(2)
    srv = Server(t.system.name, command(t, args, geo, port), port,
                 os.path.join(logs, f"{t.system.name}-{t.frac:g}-rep{t.rep}.log"), env)
    print(f"{label}: starting", flush=True)
    why, status, measured = None, "interrupted", 0
    limit, by_budget = args.start_timeout, False
    if left() is not None and left() - timings.stop_s() < limit:          # a start may not outlast --budget-s
        limit, by_budget = max(1.0, left() - timings.stop_s()), True
    try:
        why = srv.start(limit)
        if why is None:
            print(f"{label}: serving after {srv.start_s:.0f} s", flush=True)
            for p, c in cells:
                est = timings.cell_s(t.system.name, p, c, args.requests + 1, args.new_tokens) + timings.stop_s()
                if left() is not None and est > left():
                    why = (f"not measured: --budget-s {args.budget_s:.0f} ran out in this server's turn; run again "
                           "with --resume")
                    break
                wait = 900.0 if left() is None else max(30.0, left())
                run_cell(srv.base_url, prompts[p], c, 1, args.new_tokens, offset=len(prompts[p]) // 2,   # warm-up
                         timeout=wait)
                wall, samples = run_cell(srv.base_url, prompts[p], c, args.requests, args.new_tokens,
                                         offset=(t.rep * 7) % len(prompts[p]), timeout=wait)
                state.runs.append({"system": t.system.name, "budget_frac": t.frac, "prompt_target": p, "clients": c,
                                   "rep": t.rep, "wall_s": wall, "samples": [s.__dict__ for s in samples]})
                timings.rounds.setdefault((t.system.name, p, c), []).append(wall / args.requests)
                measured += 1
                state.write()
                tp = _med([s.tpot_s for s in samples])
                print(f"{label}: prompt {p}, {c} clients: TTFT {statistics.median(s.ttft_s for s in samples) * 1e3:.0f}"
                      f" ms, {'-' if tp is None else f'{tp * 1e3:.1f}'} ms/token, "
                      f"{sum(s.tokens for s in samples) / wall:.1f} tokens/s", flush=True)
            status = "partial" if why else "done"
        elif by_budget and why.startswith("not serving after"):
            status, why = "cut", f"not run: --budget-s {args.budget_s:.0f} ran out while it started ({why})"
        else:
            status = "failed"
    except Exception as e:       # a request failed: the rows say why, the run goes on
        why, status = srv.why_dead() or f"{type(e).__name__}: {e}".splitlines()[0][:300], "failed"
    finally:
        t0 = time.monotonic()
        dev = srv.stop()
        stop_s = time.monotonic() - t0
        notes = log_notes(srv.log)
        state.turn_log.append(_record(t, status, why, start_s=srv.start_s, stop_s=stop_s, cells=measured,
                                      device_bytes=dev, notes=notes))
        state.write()
    if srv.start_s is not None:
        timings.starts.setdefault(t.system.kind, []).append(srv.start_s)
    timings.stops.append(stop_s)
    if status in ("failed", "cut"):
        print(f"{label}: {'FAILED' if status == 'failed' else 'CUT'}: {why}", flush=True)


def _device_name(args) -> str:
    if not args.device.startswith("cuda"):
        return "CPU"
    try:
        out = subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out or "CUDA"
    except (OSError, subprocess.SubprocessError):
        return "CUDA"


def _freetoken_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("freetoken")
    except Exception:
        return None


def _benchbw_profile() -> str | None:
    """FreeToken's `ft bench bw` profile, which its hybrid backend's fetch share comes from (without one it fetches
    one miss per layer and step and computes the rest on the CPU): the file, or None."""
    path = os.environ.get("FREETOKEN_BENCHBW_PATH") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "freetoken", "benchbw.json")
    return path if os.path.exists(path) else None


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
        print("interrupted: servers stopped; what was measured is in " + os.path.join(args.out, "freetoken.json") +
              " (--resume runs the rest)", file=sys.stderr)
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
