"""What `python -m vismmoe.bench.freetoken` starts, in which order, with which flags, and how long it should take.
Pure: no process, no GPU (tests/test_bench_freetoken.py checks it on the CPU).

    checkpoint geometry (config.json): layers x experts routed experts of 3 x hidden x moe_intermediate x dtype
      bytes, top-k
      -> a budget B (share of all routed experts) is S = round(B x layers x experts) expert slots on the device,
         one pool for all layers in both systems (FreeToken's OffloadMoeCache is one unified pool of
         `--moe-cache-size` slots; vismmoe's slot cache is one pool of `--expert-budget` bytes)
      -> FreeToken 0.1.2's own rules for S (read from its wheel; docs/freetoken.md has the evidence):
           S <  experts        refused at start (engine.py `_require_offload_cache_size`): the bench does not
                               start it and says so in the rows
           S <  2 x experts    refused at start by its default prefill overlap, which borrows two whole layers of
                               slots (offload_cache.py `__post_init__` asserts cache_size >= 2 x num_experts);
                               runs with --disable-moe-prefill-overlap (prefill copies each layer into the first
                               `experts` slots, no copy/compute overlap), which the bench then passes
           otherwise           runs as given
      -> the turns: repetitions x budgets (in the order given) x systems (order rotated each repetition); a turn
         that cannot run, or adds nothing (--cpu-experts auto with every expert resident has no miss to place),
         is recorded with its reason instead of being started
      -> each turn's time: a server start + per cell (prompt, clients) one warm-up round and --requests measured
         rounds + a stop; starts and cells measured by an earlier run (its JSON) where there is one, else the
         guesses below
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field

from ..errors import UserError

MODEL_NAME = "m"
FREETOKEN_NO_OVERLAP = "--disable-moe-prefill-overlap"

# Seconds from a server's launch until it answers a one-token request, until a run has measured them (FreeToken:
# three spawned processes importing torch, the expert banks read and pinned, CUDA graphs for each batch size;
# vismmoe: the checkpoint into the host store, the fast step's compile and capture). Deliberately high.
START_GUESS_S = {"freetoken": 60.0, "vismmoe": 40.0}
STOP_GUESS_S = 5.0          # SIGTERM, the processes gone, the GPU's used memory settled


@dataclass
class Geometry:
    """A checkpoint's routed experts: `layers` MoE layers x `experts`, `expert_bytes` each (gate, up, down),
    `top_k` per token."""

    layers: int
    experts: int
    expert_bytes: int
    top_k: int = 8

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
            experts = text.get("num_experts") or text["num_local_experts"]     # transformers 5 writes the latter
            return cls(int(text["num_hidden_layers"]), int(experts),
                       3 * int(text["hidden_size"]) * int(text["moe_intermediate_size"]) * width,
                       int(text.get("num_experts_per_tok") or 8))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"--model {model_dir}: config.json names no routed experts (num_experts, "
                            "moe_intermediate_size)", "give a qwen3_moe checkpoint, e.g. from `vismmoe make-shape "
                            "--shape qwen3-30b-a3b`") from None

    @property
    def total(self) -> int:
        return self.layers * self.experts

    def slots(self, frac: float) -> int:
        """Expert slots on the device at budget `frac` (share of all routed experts), both systems."""
        return max(1, round(frac * self.total))


def freetoken_cache(geo: Geometry, slots: int) -> tuple[list[str], str | None]:
    """FreeToken 0.1.2's terms for `--moe-cache-size slots`: (the flags it then needs, None) or ([], why it
    refuses at start)."""
    if slots < geo.experts:
        return [], (f"FreeToken 0.1.2 refuses {slots} slots at start: its slot cache needs at least one layer's "
                    f"experts ({geo.experts}; engine.py _require_offload_cache_size: 'moe_cache_size={slots} is too "
                    f"small'); not started")
    if slots < 2 * geo.experts:
        return [FREETOKEN_NO_OVERLAP], None
    return [], None


@dataclass
class System:
    name: str
    kind: str                    # "freetoken" | "vismmoe"
    backend: str                 # FreeToken's --moe-backend; vismmoe: "fetch" or --cpu-experts's value


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


@dataclass
class Turn:
    """One server's life: started at one budget, every (prompt, clients) cell measured, stopped. `skip`: why it is
    not started (then it has no command)."""

    rep: int
    frac: float
    system: System
    slots: int
    flags: list[str] = field(default_factory=list)       # what the slot count makes the server need
    skip: str | None = None

    @property
    def key(self) -> tuple:
        return (self.rep, self.frac, self.system.name)

    def label(self) -> str:
        return f"rep {self.rep + 1}, {'all' if self.frac >= 1 else f'{self.frac:.0%}'} ({self.slots} slots), " \
               f"{self.system.name}"


def turns(args, chosen: list[System], geo: Geometry) -> list[Turn]:
    """Every turn of the run, in order: repetitions, then budgets as given, then systems rotated per repetition."""
    out = []
    for rep in range(args.reps):
        for frac in args.budgets:
            for sysm in chosen[rep % len(chosen):] + chosen[:rep % len(chosen)]:
                s = geo.slots(frac)
                t = Turn(rep, frac, sysm, s)
                if sysm.kind == "freetoken":
                    t.flags, t.skip = freetoken_cache(geo, s)
                elif s < geo.top_k:
                    t.skip = (f"vismmoe needs at least top-k = {geo.top_k} slots (one token's experts of a layer); "
                              f"{s} given")
                elif sysm.backend != "fetch" and frac >= 1.0:
                    t.skip = (f"every expert resident: nothing misses, so --cpu-experts {sysm.backend} runs as "
                              "vismmoe (fetch only) does; not started")
                out.append(t)
    return out


def command(turn: Turn, args, geo: Geometry, port: int) -> list[str]:
    """The server command of a turn (FreeToken's or `vismmoe serve`), on loopback `port`."""
    sysm, frac = turn.system, turn.frac
    if sysm.kind == "freetoken":
        kv = max(args.clients) * (max(args.prompts) + args.new_tokens + 256)
        kv = -(-kv // 256) * 256
        return [*args.freetoken_cmd, "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", MODEL_NAME, "--moe-backend", sysm.backend, "--moe-cache-size", str(turn.slots),
                *turn.flags,
                "--max-running-requests", str(max(args.clients)), "--cuda-graph-max-bs", str(max(args.clients)),
                "--num-tokens", str(kv), "--reasoning-parser", "off", "--sampling-defaults", "none",
                *shlex.split(args.freetoken_args)]
    budget = "100%" if frac >= 1.0 else str(turn.slots * geo.expert_bytes)
    cmd = [sys.executable, "-m", "vismmoe", "serve", "--model", args.model, "--device", args.device,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME,
           "--max-batch", str(max(args.clients)), "--max-queue", str(4 * max(args.clients)),
           "--expert-budget", budget]
    if args.cpu_experts_supported:
        cmd += ["--cpu-experts", "off" if sysm.backend == "fetch" else sysm.backend]
    return cmd + [*turn.flags, *shlex.split(args.vismmoe_args)]


# ---- time ---------------------------------------------------------------------------------------------------

class Timings:
    """Seconds a turn's parts take: measured ones from earlier results (their `turns` and `runs`), else guesses.

    start_s(kind)              launch until serving (median of the measured starts of that server kind)
    cell_s(system, P, C, n)    one cell of n requests per client (the median measured wall per request round of
                               that system, prompt and clients; else the model below)
    stop_s()                   stop and memory settle
    """

    def __init__(self, start_guess: dict | None = None):
        self.starts: dict[str, list[float]] = {}
        self.stops: list[float] = []
        self.rounds: dict[tuple, list[float]] = {}       # (system, prompt, clients) -> wall s per request round
        self.guess = dict(START_GUESS_S, **(start_guess or {}))

    def add_result(self, res: dict) -> "Timings":
        per = max(1, int(res.get("meta", {}).get("requests_per_client") or 1))
        for r in res.get("runs", ()):
            if r.get("wall_s") is not None and not r.get("warm"):
                self.rounds.setdefault((r["system"], r["prompt_target"], r["clients"]), []).append(r["wall_s"] / per)
        for t in res.get("turns", ()):
            if t.get("start_s") is not None and t.get("status") in ("done", "partial"):
                self.starts.setdefault(t["kind"], []).append(t["start_s"])
            if t.get("stop_s") is not None:
                self.stops.append(t["stop_s"])
        return self

    @classmethod
    def from_file(cls, path: str | None, start_guess: dict | None = None) -> "Timings":
        t = cls(start_guess)
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    t.add_result(json.load(f))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return t

    def start_s(self, kind: str) -> float:
        xs = self.starts.get(kind)
        return statistics.median(xs) if xs else self.guess[kind]

    def stop_s(self) -> float:
        return statistics.median(self.stops) if self.stops else STOP_GUESS_S

    def measured(self, kind: str) -> bool:
        return bool(self.starts.get(kind))

    def cell_s(self, system: str, prompt: int, clients: int, requests: int, new_tokens: int) -> float:
        xs = self.rounds.get((system, prompt, clients))
        if xs:
            per = statistics.median(xs)
        else:
            # a request round: C prefills of P tokens (about 40k tokens/s, one after another), then new_tokens steps
            # of 3 ms + 0.6 ms per client (the H100 run measured 1-2.7 ms at 1 client, 2.1-7 ms at 8)
            per = 0.1 + clients * prompt / 40000 + new_tokens * (0.003 + 0.0006 * clients)
        return per * requests

    def turn_s(self, turn: Turn, args) -> float:
        """The whole turn: start, a warm-up round and `--requests` rounds per cell, stop. 0 for a skipped turn."""
        if turn.skip:
            return 0.0
        cells = sum(self.cell_s(turn.system.name, p, c, args.requests + 1, args.new_tokens)
                    for p in args.prompts for c in args.clients)
        return self.start_s(turn.system.kind) + cells + self.stop_s()


def plan_text(plan: list[Turn], args, geo: Geometry, timings: Timings, done: set | None = None) -> str:
    """What the run will do: each turn with its estimate and the time it ends at, the turns `--budget-s` would cut,
    the skipped ones with their reason; then each turn's server command."""
    done = done or set()
    lines, at, total, cut = [], 0.0, 0.0, 0
    for i, t in enumerate(plan):
        head = f"[{i + 1}/{len(plan)}] {t.label()}"
        if t.key in done:
            lines.append(f"{head}: measured already (--resume)")
            continue
        if t.skip:
            lines.append(f"{head}: skipped: {t.skip}")
            continue
        s = timings.turn_s(t, args)
        total += s
        if args.budget_s is not None and at + s > args.budget_s:
            cut += 1
            lines.append(f"{head}: about {s:.0f} s: does not fit --budget-s {args.budget_s:.0f} (left for --resume)")
            continue
        at += s
        extra = f" (with {' '.join(t.flags)})" if t.flags else ""
        lines.append(f"{head}: about {s:.0f} s, done at about {at / 60:.1f} min{extra}")
    src = ", ".join(f"{k} start {timings.start_s(k):.0f} s ({'measured' if timings.measured(k) else 'guessed'})"
                    for k in ("freetoken", "vismmoe"))
    n = sum(1 for t in plan if not t.skip and t.key not in done)
    head = (f"{n} server turns to run ({len(args.budgets)} budgets x {len({t.system.name for t in plan})} systems x "
            f"{args.reps} reps, less those not started or measured already; {len(args.prompts) * len(args.clients)} "
            f"cells each): about {total / 60:.1f} min ({src})")
    if args.budget_s is not None:
        head += (f"; --budget-s {args.budget_s:.0f}: {n - cut} fit (about {at / 60:.1f} min), {cut} left for "
                 "--resume")
    cmds = [f"{t.label()}: {shlex.join(command(t, args, geo, 0))}" for t in plan
            if t.rep == 0 and not t.skip]
    return "\n".join([head, *lines, "", "server commands (port 0 stands for a free port):", *cmds])
