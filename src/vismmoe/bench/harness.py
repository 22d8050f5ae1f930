"""`vismmoe bench`: offloading systems side by side on the same requests, in one process, interleaved.

    model (trained default, or a named random-weight shape) -> one engine, forked per system (same weights,
    same host store; each system its own cache, policy, predictor, compressor, link profile)
    for each link, for each budget: warm-up, then repetitions of [system A, system B, ...] in turn (A B C A B C)
    -> medians per system: TTFT, time per output token, end to end, hit rate, bytes moved, stall share, accuracy
    -> physical bound per row: max(compute with every expert resident, Belady bytes / link bandwidth); and the
       phased bound, which adds causality (decode starts after the prefill's compute and its own least bytes)
    -> table (markdown), PNG plots (latency vs budget, time breakdown), JSON with rows and speedups

Systems (all inside this harness, so they share every line of code that is not the design being compared):
  ondemand        load each needed expert when asked, keep nothing (policy none)
  lru-offload     slot cache with LRU eviction, hits computed first (the mixtral-offloading design; ours is one
                  global LRU over all layers where mixtral-offloading keeps a fixed LRU per layer)
  moe-infinity    activation-aware cache (frequency, LFU) with trace-matching prefetch (transition tables from
                  earlier requests: `--calibration FILE`, or on a random-weight shape the routing of as many
                  other requests of the same sides), after MoE-Infinity's published design
  gate-prefetch   next-layers gate prediction + LRU (AdapMoE / DAOP / pre-gating designs)
  vismmoe         affinity compression (affinity:gamma=2, keep 0.4) + link-adaptive lookahead prefetch
                  (gate) + predictive (cycle-aware) eviction; ablations vismmoe-nocompress, vismmoe-noprefetch,
                  vismmoe-lru switch one part off each; vismmoe-noadmit is vismmoe-nocompress with prefetches
                  allowed to displace experts needed sooner (prefetch admission off); vismmoe-fixed is
                  vismmoe-nocompress with a fixed lookahead instead of the link-adaptive one; vismmoe-longmem is
                  vismmoe whose predictive policy keeps only the long memory of expert frequencies
  vismmoe-vtopk   vismmoe with each visual token on its heaviest routed expert alone (--visual-top-k 1): fewer
                  distinct experts per prefill layer, at the accuracy the rows show
  accelerate      (GPU, real link only) transformers + accelerate device_map with expert banks on the CPU
llama.cpp is compared apart (bench/llama_cpp.py): it is another process per request, reading GGUF files exported
from the same checkpoint, so it has no place in this harness's shared engine and routing traces.
Emulated links (edge, mobile) are labelled as emulated in every row that uses them.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field

from ..config import fields_by_name
from ..tools.evaluate import normalize
from ..offload.links import PROFILES
from ..offload.trace import RoutingTrace
from .bound import access_groups, belady_misses, phased, prefill_calls
from .tables import link_name, markdown


# the RuntimeConfig options in which systems differ; a system leaves the others at their declared defaults
SYSTEM_KNOBS = ("policy", "prefetch", "compress", "keep_ratio", "visual_top_k", "fixed_lookahead")


@dataclass(frozen=True)
class System:
    """A named configuration: `options` are RuntimeConfig fields (config.runtime_options checks them, as every
    run's), read as attributes (`sys.policy`); a knob it does not set is at its declared default. Published
    prefetchers always look ahead (fixed_lookahead); ours adapts to the link."""

    name: str
    options: dict = field(default_factory=dict)
    lossless: bool = True

    def __getattr__(self, name: str):
        if name not in SYSTEM_KNOBS:
            raise AttributeError(name)
        return self.options.get(name, fields_by_name()[name].default)

    def knobs(self) -> dict:
        """Every knob of `SYSTEM_KNOBS`: the system's value or the declared default."""
        return {k: getattr(self, k) for k in SYSTEM_KNOBS}


# chosen on the validation split (1200 questions) as the fewest visual tokens within 1 point of unpruned:
# unpruned 0.994; gamma=1.5 at 0.33 0.981, at 0.4 0.988; gamma=2 at 0.33 0.983, at 0.4 0.989 (docs/default-model.md)
VISMMOE_COMPRESS, VISMMOE_KEEP = "affinity:gamma=2", 0.4
PRUNED = dict(compress=VISMMOE_COMPRESS, keep_ratio=VISMMOE_KEEP)
# chosen on the validation split the same way, with that compressor: each visual token's heaviest expert alone
# (--visual-top-k 1) answers 0.987 (unpruned 0.994, the compressor alone 0.989; docs/affinity.md)
VISMMOE_VISUAL_TOP_K = 1

SYSTEMS = {
    "ondemand": System("ondemand", dict(policy="none")),
    "lru-offload": System("lru-offload", dict(policy="lru")),
    "moe-infinity": System("moe-infinity", dict(policy="lfu", prefetch="trace", fixed_lookahead=True)),
    "gate-prefetch": System("gate-prefetch", dict(policy="lru", prefetch="gate", fixed_lookahead=True)),
    "vismmoe": System("vismmoe", dict(policy="predictive", prefetch="gate", **PRUNED), lossless=False),
    "vismmoe-vtopk": System("vismmoe-vtopk", dict(policy="predictive", prefetch="gate", **PRUNED,
                                                  visual_top_k=VISMMOE_VISUAL_TOP_K), lossless=False),
    "vismmoe-nocompress": System("vismmoe-nocompress", dict(policy="predictive", prefetch="gate")),
    "vismmoe-noprefetch": System("vismmoe-noprefetch", dict(policy="predictive", **PRUNED), lossless=False),
    "vismmoe-lru": System("vismmoe-lru", dict(policy="lru", prefetch="gate", **PRUNED), lossless=False),
    "vismmoe-noadmit": System("vismmoe-noadmit", dict(policy="predictive:admit=0", prefetch="gate")),
    "vismmoe-fixed": System("vismmoe-fixed", dict(policy="predictive", prefetch="gate", fixed_lookahead=True)),
    "vismmoe-longmem": System("vismmoe-longmem", dict(policy="predictive:short=0", prefetch="gate", **PRUNED),
                              lossless=False),
    "accelerate": System("accelerate"),
}
BASELINES = ("ondemand", "lru-offload", "moe-infinity", "gate-prefetch", "accelerate")


@dataclass
class Request:
    """One benchmark request: a VQA sample (trained model; accuracy is scored) or prepared inputs with
    teacher-forced decode tokens (random-weight shapes; no accuracy)."""

    image: object = None
    question: str | None = None
    answer: str | None = None
    inputs: dict | None = None
    teacher_tokens: list[int] | None = None


def requests_from_samples(samples):
    """A request per VQA sample, made when it is read (the samples may be a data.LazySeq: memory stays flat)."""
    from ..data.scenes import LazySeq

    def request(i: int) -> Request:
        s = samples[i]
        return Request(image=s.image, question=s.question, answer=s.answer)
    return LazySeq(len(samples), request)


def run_request(eng, req: Request, max_new_tokens: int) -> tuple[dict, bool | None]:
    """(stats, answered correctly or None) of one request."""
    if req.inputs is not None:
        _, st = eng.generate_ids(req.inputs, max_new_tokens, teacher_tokens=req.teacher_tokens)
        return st, None
    gen = eng.generate(req.image, req.question, max_new_tokens=max_new_tokens)
    return gen.stats, normalize(gen.text) == normalize(req.answer)


def fork_system(base, sys: System, budget: str, link: str, calibration: str | None, pool_of=None):
    """(engine running `sys` at `budget` on `link`, the prefetcher it got): a fork of `base` (on the device pool of
    `pool_of` when given). moe-infinity without transition tables falls back to gate prefetch."""
    prefetch = sys.prefetch
    if prefetch == "trace" and calibration is None:
        prefetch = "gate"                   # no tables: fall back (noted in the row)
    compress, keep, vtopk = _key(sys, base)
    knobs = dict(sys.knobs(), prefetch=prefetch, compress=compress, keep_ratio=keep, visual_top_k=vtopk)
    eng = (pool_of or base).fork(expert_budget=budget, link=link, calibration=calibration,
                                 share_pool=pool_of is not None, **knobs)
    return eng, prefetch


def _run_requests(eng, samples, max_new_tokens: int) -> dict:
    """Run `samples` one request at a time, each on a cold cache (as the bound assumes); sums and accuracy. The
    policy keeps what it learned from earlier requests (frequencies, scores): that is its state, not the cache's."""
    t = {"ttft_s": 0.0, "decode_s": 0.0, "steps": 0, "e2e_s": 0.0, "hits": 0, "misses": 0, "bytes_moved": 0,
         "stall_s": 0.0, "link_busy_s": 0.0, "prefetch_issued": 0, "prefetch_hits": 0}
    right = []
    for s in samples:
        eng.cache.clear()
        st, ok = run_request(eng, s, max_new_tokens)
        t["ttft_s"] += st["ttft_s"]
        t["e2e_s"] += st["e2e_s"]
        t["decode_s"] += st["e2e_s"] - st["ttft_s"]
        t["steps"] += st["new_tokens"] - 1
        for k in ("hits", "misses", "bytes_moved", "stall_s", "link_busy_s", "prefetch_issued", "prefetch_hits"):
            t[k] += st[k] or 0
        right.append(ok)
    n = len(samples)
    accuracy = None if any(r is None for r in right) else sum(right) / n
    return {"ttft_s": t["ttft_s"] / n, "tpot_s": t["decode_s"] / max(1, t["steps"]), "e2e_s": t["e2e_s"] / n,
            "hit_rate": t["hits"] / max(1, t["hits"] + t["misses"]), "bytes_moved": t["bytes_moved"] / n,
            "stall_share": t["stall_s"] / max(t["e2e_s"], 1e-9), "accuracy": accuracy,
            "prefetch_issued": t["prefetch_issued"] / n, "prefetch_hits": t["prefetch_hits"] / n}


@dataclass
class _Bench:
    """What every (link, budget) group of one `bench_systems` call shares: the requests, the base engine, and a
    fork of it with every expert resident, which gives the bounds their compute terms and routing traces."""

    base: object
    resident: object
    samples: list
    reps: int
    max_new_tokens: int
    save_traces: str | None
    # pruning setting (`_key`) -> [(seconds per request, of which prefill)], one entry per resident run
    compute: dict = field(default_factory=dict)


def _key(sys: System, base) -> tuple[str, float, int]:
    """The pruning setting `sys` runs with on `base`'s model: (compressor, keep ratio, visual top-k), as
    `Engine.set_compression` takes it. A text-only model has no visual tokens to prune (noted in the row);
    `bench --visual-top-k K` (the base engine's option) is the K of the systems that trim visual tokens."""
    if not base.family.has_vision:
        return "none", 1.0, 0
    vtopk = (base.rc.visual_top_k or sys.visual_top_k) if sys.visual_top_k else 0
    return sys.compress, sys.keep_ratio, vtopk


def _rc_key(rc) -> tuple[str, float, int]:
    return rc.compress, rc.keep_ratio, rc.visual_top_k


def _resident_warm_up(b: _Bench, key: tuple[str, float, int]) -> None:
    """One untimed resident request at pruning setting `key` (first-call costs stay out of the bound)."""
    b.resident.set_compression(*key)
    run_request(b.resident, b.samples[0], 2)


def _resident_run(b: _Bench, key: tuple[str, float, int]) -> None:
    """One timed pass of every request with every expert resident (no transfers) at pruning setting `key`,
    recorded in `b.compute`: the bound's compute terms. Run interleaved with the systems' repetitions, so a
    machine that slows down or speeds up over the run does so for both."""
    b.resident.set_compression(*key)
    total = prefill = 0.0
    for s in b.samples:                     # each request's own times, as the systems' rows count them
        st = run_request(b.resident, s, b.max_new_tokens)[0]
        total, prefill = total + st["e2e_s"], prefill + st["ttft_s"]
    n = len(b.samples)
    b.compute.setdefault(key, []).append((total / n, prefill / n))


def _compute_s(b: _Bench, sys: System) -> tuple[float, float]:
    """(seconds per request, of which prefill) with every expert resident: the fastest of the resident runs
    interleaved with the systems so far (a bound, not a typical time), for this system's pruning setting
    (pruned prompts compute less)."""
    key = _key(sys, b.base)
    if key not in b.compute:                    # a setting no group measured (a stand-in's): measure it now
        _resident_warm_up(b, key)
        for _ in range(max(b.reps, 2)):
            _resident_run(b, key)
    return min(b.compute[key])


def _fork_systems(base, systems: list[str], budget: str, link: str, calibration: str | None) -> dict:
    """name -> (engine, prefetcher) of each of our systems at `budget` on `link`, all on one device pool (they run
    one after another, each request cold); accelerate is measured apart."""
    engines, first = {}, None
    for name in systems:
        if name == "accelerate":
            continue
        engines[name] = fork_system(base, SYSTEMS[name], budget, link, calibration, pool_of=first)
        first = first or engines[name][0]
    return engines


def _measure(engines: dict, samples, reps: int, max_new_tokens: int, progress=None, b: _Bench | None = None,
             keys: list[tuple[str, float, int]] = ()) -> dict[str, list[dict]]:
    """name -> one `_run_requests` result per repetition, the systems interleaved (A B C A B C), after a warm-up;
    with `b`, each repetition also runs every request with every expert resident at each pruning setting of
    `keys` (A B C R A B C R), which gives the bound its compute term from the same stretch of time."""
    for eng, _ in engines.values():
        # warm-up (kernels, allocations, the prefetcher's first phase) on the machine's own link: an
        # emulated link's waits would only add device minutes (a 30B prefill waits 9 s on `mobile`)
        eng.cache.clear()
        with eng.runtime.transfer.unthrottled():
            run_request(eng, samples[0], 2)
    if b is not None:
        for key in keys:
            if key not in b.compute:
                _resident_warm_up(b, key)
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(reps):
        for name, (eng, _) in engines.items():
            runs[name].append(_run_requests(eng, samples, max_new_tokens))
            if progress:
                progress()
        if b is not None:
            for key in keys:
                _resident_run(b, key)
    return runs


def _accelerate_runs(base, samples, reps: int, max_new_tokens: int) -> list[dict]:
    """accelerate's repetitions on these requests. It moves every expert bank per forward (seconds per token on a
    30B shape): its requests decode at most ACCEL_TOKENS tokens; its end-to-end is scaled to the others' token
    count. It keeps no expert cache, so the budget changes nothing: measured once, reused at every budget."""
    key = (id(samples), max_new_tokens)
    if key not in _ACCEL:
        _ACCEL[key] = [_run_accelerate(base, samples, min(max_new_tokens, ACCEL_TOKENS), max_new_tokens)
                       for _ in range(max(1, reps // 2))]
    return _ACCEL[key]


def _row(b: _Bench, name: str, eng, prefetch: str, runs: list[dict], link: str, budget: str, stand_in) -> dict:
    """One system's row of a (link, budget) group: medians over `runs`, the physical bound, efficiencies.

    Belady bytes for the bound: the trace of the unpruned request stream (lossless systems) and of the pruned one
    (compressing systems) differ; each row uses its own system's trace. accelerate (`eng` None) is bounded on the
    lossless stream, traced for `stand_in` (one of our engines of the group)."""
    row = _medians(runs)
    if eng is None:                                     # accelerate: the lossless stream, real link
        eng, sys = stand_in, SYSTEMS["lru-offload"]
        gbps, meta = PROFILES["real"].rate_gbps(b.base.device.type), dict(
            link="real", prefetch="none", policy="accelerate (whole bank per forward; any budget)",
            compress="none@1")
    else:
        sys, gbps = SYSTEMS[name], eng.runtime.transfer.link.rate_gbps(eng.device.type)
        meta = dict(link=eng.runtime.transfer.link.label(), prefetch=prefetch, policy=sys.policy,
                    compress=pruning_label(*_rc_key(eng.rc)))
    bound_bytes, prefill_bytes = _belady_bytes(eng, b.resident, b.samples, b.max_new_tokens, b.save_traces)
    cs, cp = _compute_s(b, sys)
    row["bound_s"] = max(cs, bound_bytes / (gbps * 1e9))
    row["bound_phased_s"] = phased(cs, cp, bound_bytes, prefill_bytes, gbps)
    row["e2e_runs_s"] = [r["e2e_s"] for r in runs]
    for k, bound in (("efficiency", "bound_s"), ("efficiency_phased", "bound_phased_s")):
        row[k] = _efficiency(row, bound, k)
    return dict(row, system=name, link_name=link, budget=budget, compute_s=cs, prefill_compute_s=cp,
                belady_bytes=bound_bytes, belady_prefill_bytes=prefill_bytes, link_gbps=gbps, **meta)


def _efficiency(row: dict, bound: str, key: str) -> float | None:
    """bound / measured end to end, in (0, 1]. A bound above the measured time is not a lower bound: the machine
    ran the resident passes slower than the system's own (another process took the cores). That is refused, not
    printed: None, and `row[key + "_note"]` says why."""
    if not row["e2e_s"]:
        return None
    eff = row[bound] / row["e2e_s"]
    if eff <= 1.0:
        return eff
    row[key + "_note"] = (f"no {key.replace('_', ' ')}: the bound ({row[bound] * 1e3:.1f} ms) came out above the "
                          f"measured {row['e2e_s'] * 1e3:.1f} ms, so this machine's speed changed between runs (other "
                          "work on its cores); rerun with more --reps on an idle machine")
    return None


def bench_systems(base, samples, systems: list[str], links: list[str], budgets: list[str], reps: int,
                  max_new_tokens: int, calibration: str | None, progress=None, on_rows=None,
                  save_traces: str | None = None, calibrate_on: list[Request] | None = None,
                  tables_path: str | None = None) -> list[dict]:
    """Rows per (system, link, budget) of any model or random-weight shape; `on_rows(rows so far)` after each
    (link, budget) group completes. `calibrate_on`: earlier requests (not the measured ones) whose routing gives
    moe-infinity its transition tables when no `calibration` file is given (random-weight shapes), saved to
    `tables_path`."""
    rows = []
    resident = base.fork(expert_budget="100%", prefetch="none")      # one full pool, reused for every bound
    if calibration is None and calibrate_on and "moe-infinity" in systems:
        calibration = trace_tables(resident, calibrate_on, max_new_tokens, tables_path)
    b = _Bench(base, resident, samples, reps, max_new_tokens, save_traces)
    for link in links:
        for budget in budgets:
            engines = _fork_systems(base, systems, budget, link, calibration)
            keys = list(dict.fromkeys(_key(SYSTEMS[n if n != "accelerate" else "lru-offload"], base)
                                      for n in systems))
            runs = _measure(engines, samples, reps, max_new_tokens, progress, b, keys)
            if "accelerate" in systems and link == "real" and base.device.type == "cuda":
                engines["accelerate"] = (None, "none")
                runs["accelerate"] = _accelerate_runs(base, samples, reps, max_new_tokens)
            stand_in = next((eng for eng, _ in engines.values() if eng is not None), None)
            for name, (eng, prefetch) in engines.items():
                rows.append(_row(b, name, eng, prefetch, runs[name], link, budget, stand_in))
            if on_rows:
                on_rows(rows)
    return rows


def trace_tables(probe, requests: list[Request], max_new_tokens: int, path: str) -> str:
    """Transition tables (predict.TransitionTables) from the routing of `requests` served on `probe` (every expert
    resident, no compression), saved to `path`: what moe-infinity learns from earlier requests."""
    from ..offload.predict import TransitionTables
    probe.set_compression("none", 1.0, 0)
    traces = [_traced(probe, req, max_new_tokens) for req in requests]
    TransitionTables.from_traces(traces, probe.geometry.moe_layers, probe.geometry.num_experts).save(path)
    return path


def _traced(probe, req: Request, max_new_tokens: int) -> RoutingTrace:
    """The routing trace of one request served on `probe`."""
    tr = RoutingTrace()
    probe.record_trace(tr)
    run_request(probe, req, max_new_tokens)
    probe.record_trace(None)
    return tr


def pruning_label(compress: str, keep_ratio: float, visual_top_k: int = 0) -> str:
    """A pruning setting as the rows name it: `affinity:gamma=2@0.4`, `none@1+visual-top-2`."""
    return f"{compress}@{keep_ratio:g}" + (f"+visual-top-{visual_top_k}" if visual_top_k else "")


def parse_pruning_label(label: str) -> tuple[str, float, int]:
    """`pruning_label`'s inverse: (compressor, keep ratio, visual top-k)."""
    label, _, vt = label.partition("+visual-top-")
    name, _, keep = label.rpartition("@")
    return name, float(keep), int(vt or 0)


def trace_stem(compress: str, keep_ratio: float, visual_top_k: int = 0) -> str:
    """Saved traces of one pruning setting are `<stem><request index>.npz` (`--save-traces`, rebound.py)."""
    vt = f"v{visual_top_k}_" if visual_top_k else ""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"trace_{compress}_{keep_ratio:g}_{vt}")


def _medians(runs: list[dict]) -> dict:
    """Per key, the median over repetitions; None where no repetition measured it (accuracy on random weights)."""
    vals = {k: [r[k] for r in runs if r[k] is not None] for k in runs[0]}
    return {k: statistics.median(v) if v else None for k, v in vals.items()}


_ACCEL: dict = {}
ACCEL_TOKENS = 4


def _run_accelerate(base, samples, max_new_tokens: int, scale_to: int) -> dict:
    """transformers + accelerate with expert banks on the CPU (bench/baselines.py), same requests, greedy.
    End to end is reported as TTFT + (scale_to - 1) x time per token, so rows compare like for like."""
    import torch

    from ..step.decode import cut_at_eos
    from ..step.loop import greedy
    from .baselines import accelerate_model
    if "model" not in _ACCEL:
        _ACCEL["model"] = accelerate_model(base)
    model = _ACCEL["model"]
    bank = len(base.geometry.moe_layers) * base.geometry.num_experts * base.layout.nbytes
    ttft = e2e = decode = 0.0
    steps = 0
    right = []
    for req in samples:
        inputs = req.inputs if req.inputs is not None else base.prepare([req.image], [req.question])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            toks, t_first, n = greedy(model, base.family, inputs, max_new_tokens, base.eos_ids,
                                      teacher_tokens=req.teacher_tokens)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        ttft += t_first - t0
        e2e += t1 - t0
        decode += t1 - t_first
        steps += n
        if req.answer is not None and getattr(model, "vismmoe_exact", True):
            text = base.tokenizer.decode(cut_at_eos(toks[0], base.eos_ids, keep_eos=False), skip_special_tokens=True)
            right.append(normalize(text) == normalize(req.answer))
        else:
            right.append(None)
    k = len(samples)
    tpot = decode / max(1, steps)
    return {"ttft_s": ttft / k, "tpot_s": tpot, "e2e_s": ttft / k + (scale_to - 1) * tpot, "hit_rate": None,
            "bytes_moved": bank * scale_to, "stall_share": None,
            "accuracy": None if any(r is None for r in right) else sum(right) / k,
            "prefetch_issued": 0, "prefetch_hits": 0}


_BELADY: dict = {}
_GROUPS: dict = {}


def _belady_bytes(eng, probe, samples, max_new_tokens: int, save_dir: str | None = None) -> tuple[float, float]:
    """(bytes per request, of which in the prefill) that an optimal (Belady) cache of this engine's size must move
    for this system's request stream (each request starts cold, as in the measurement), traced on `probe` (every
    expert resident). The traces are kept per pruning setting (one traced run serves every budget); bytes per
    (setting, slots). `save_dir`: the traces are also saved there, one .npz per setting and request."""
    trace_key = (id(samples), *_rc_key(eng.rc), max_new_tokens)
    key = trace_key + (eng.cache.num_slots,)
    if key in _BELADY:
        return _BELADY[key]
    if trace_key not in _GROUPS:
        probe.set_compression(*_rc_key(eng.rc))
        groups = []
        for i, s in enumerate(samples):
            tr = _traced(probe, s, max_new_tokens)
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
                tr.save(os.path.join(save_dir, f"{trace_stem(*_rc_key(eng.rc))}{i}.npz"))
            groups.append((access_groups(tr), prefill_calls(tr)))
        _GROUPS[trace_key] = groups
    slots, per = eng.cache.num_slots, eng.layout.nbytes / len(samples)
    _BELADY[key] = (sum(belady_misses(g, slots) for g, _ in _GROUPS[trace_key]) * per,
                    sum(belady_misses(g[:n], slots) for g, n in _GROUPS[trace_key]) * per)
    return _BELADY[key]


def speedups(rows: list[dict]) -> dict:
    """link/budget -> vismmoe's end-to-end speedup over the best baseline on that link and budget (medians), with
    `runs`: the speedup of each repetition (the spread says how much of it is run-to-run noise)."""
    out = {}
    for key in {(r["link_name"], r["budget"]) for r in rows}:
        sub = [r for r in rows if (r["link_name"], r["budget"]) == key]
        ours = next((r for r in sub if r["system"] == "vismmoe"), None)
        base = [r for r in sub if r["system"] in BASELINES]
        if ours and base:
            best = min(base, key=lambda r: r["e2e_s"])
            per_rep = [a / o for a, o in zip(best.get("e2e_runs_s", []), ours.get("e2e_runs_s", [])) if o]
            out[f"{key[0]}/{key[1]}"] = {"speedup": best["e2e_s"] / ours["e2e_s"], "best_baseline": best["system"],
                                         "runs": per_rep, "link": link_name(ours)}
    return out


def speedup_lines(speedup: dict, reps: int) -> list[str]:
    """One line per link/budget: the median speedup, the spread over repetitions, and what that spread allows
    one to say (one repetition has no measured noise; a spread across 1.0 is not a difference)."""
    lines = []
    for k, v in sorted(speedup.items()):
        where = f"{v['link']}, {k.rpartition('/')[2]}" if "link" in v else k
        line = f"speedup of vismmoe over the best baseline ({v['best_baseline']}) on {where}: {v['speedup']:.2f}x"
        runs = v.get("runs") or []
        if len(runs) < 2:
            line += f" (from {reps} repetition: its noise is not measured; use --reps 3 or more)"
        else:
            lo, hi = min(runs), max(runs)
            line += f" (median of {len(runs)} repetitions, each {lo:.2f}x to {hi:.2f}x"
            line += "; within run-to-run noise)" if lo <= 1.0 <= hi else ")"
        lines.append(line)
    return lines


def plots(rows: list[dict], out_dir: str, title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    links = sorted({r["link_name"] for r in rows})
    fig, axes = plt.subplots(1, len(links), figsize=(5.5 * len(links), 4), squeeze=False)
    for ax, link in zip(axes[0], links):
        sub = [r for r in rows if r["link_name"] == link]
        budgets = sorted({r["budget"] for r in sub}, key=lambda b: float(b.rstrip("%")))
        for name in dict.fromkeys(r["system"] for r in sub):
            ys = [next((r["e2e_s"] * 1e3 for r in sub if r["system"] == name and r["budget"] == b), None)
                  for b in budgets]
            ax.plot(budgets, ys, marker="o", label=name)
        ax.set_title(f"link {sub[0]['link']}", fontsize=8)
        ax.set_xlabel("expert budget")
        e2e = [r["e2e_s"] for r in sub if r["e2e_s"]]
        if e2e and max(e2e) > 20 * min(e2e):               # accelerate next to the rest: a log scale
            ax.set_yscale("log")
        ax.set_ylabel("end to end per request, ms")
    handles = {}
    for ax in axes[0]:                          # one legend for all panels, below them: it never hides a line
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=7,
               frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(handles) - 1) // 5 + 1), 1, 1))
    paths.append(os.path.join(out_dir, "latency_vs_budget.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # time breakdown: stall vs the rest, per system, first link / budget
    key = (rows[0]["link_name"], rows[0]["budget"])
    sub = [r for r in rows if (r["link_name"], r["budget"]) == key]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["system"] for r in sub]
    stall = [r["e2e_s"] * (r["stall_share"] or 0) * 1e3 for r in sub]
    rest = [r["e2e_s"] * 1e3 - s for r, s in zip(sub, stall)]
    ax.barh(names, rest, label="compute and other")
    ax.barh(names, stall, left=rest, label="waiting for experts (stall)")
    ax.set_xlabel("ms per request")
    ax.set_title(f"time breakdown, link {sub[0]['link']}, budget {key[1]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "time_breakdown.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(base, samples, systems, links, budgets, reps, max_new_tokens, calibration, out_dir, title,
        progress=None, save_traces: str | None = None, calibrate_on: list[Request] | None = None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()

    def write(rows: list[dict], partial: bool) -> dict:
        res = {"rows": rows, "speedup": speedups(rows), "title": title, "seconds": time.perf_counter() - t0}
        if partial:             # a run cut short (a time limit) keeps the groups it finished
            res["partial"] = True
        with open(os.path.join(out_dir, "bench.md"), "w") as f:
            f.write(markdown(rows, title + (" (PARTIAL: the run did not finish)" if partial else "")))
        res["plots"] = [] if partial else plots(rows, out_dir, title)
        with open(os.path.join(out_dir, "bench.json"), "w") as f:
            json.dump(res, f, indent=1)
        return res

    rows = bench_systems(base, samples, systems, links, budgets, reps, max_new_tokens, calibration, progress,
                         on_rows=lambda done: write(done, partial=True), save_traces=save_traces,
                         calibrate_on=calibrate_on, tables_path=os.path.join(out_dir, "calibration.npz"))
    return write(rows, partial=False)
