"""Concurrent clients against `vismmoe serve`: throughput and latency with and without batching, side by side.

    one engine -> one server per --max-batches value (same engine, same port range, loopback)
    warm-up: one unmeasured round per server and client count (the fast step compiles and captures each batch
             size and KV length on first use)
    for each client count C (default 1, 2, 4, 8), for each repetition, for each server in turn (A B A B ...):
        C threads, each sending --requests chat completions back to back through the official `openai` client
        (an image as a data: URL + a question, temperature 0; --ignore-eos makes every answer --max-tokens long)
    -> per server and C: generated tokens per second of wall time, p50 / p99 request latency, mean batch size
    --batchings continuous,static: servers of each batching (at --max-batches' largest) instead, compared in the
    same run; --mixed-tokens 8,256: each request's max tokens cycles through 8, 16, ..., 256 (powers of two;
    with --ignore-eos, exactly that many), and the p50 latency of the short ones (at most 32 tokens) is reported
    --prefill-chunks 0,64: continuous servers whose engines prefill newcomers whole (0) or in chunks of 64
    positions (`--prefill-chunk`), compared in the same run; every row also gets the running rows' inter-token
    latency (p50 / p99 of the gaps between a request's tokens, the engine's own token times), the time to first
    token (arrival at the server to the first token, p50 / p99) and the expert misses and bytes moved of the run
    -> serve_load.md (table), serve_load.json, serve_load.png (tokens/s and p50 latency against clients)

Run: `python -m vismmoe.bench.serve_load [--model DIR] [--device cuda] [--expert-budget 25%]`. The bundled model
answers its own test questions; any other checkpoint gets a photo from matplotlib's sample data.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def _images_and_questions(model_dir: str | None, n: int):
    from ..checkpoints import BUNDLED
    if model_dir is None or os.path.realpath(model_dir) == os.path.realpath(BUNDLED):
        from ..data import balanced_subset
        return [(s.image, s.question) for s in balanced_subset("test", n)]
    import matplotlib.cbook
    from PIL import Image
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return [(photo.resize((448, 448)), q) for q in ("What is in the picture?", "Describe the person.",
                                                     "What colour is the uniform?", "Where was this taken?")]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SHORT = 32                  # tokens: a request this long or shorter counts as short (p50_short_s)


def _lengths(mixed: str | None, max_tokens: int) -> list[int]:
    """Max tokens of successive requests: `max_tokens`, or powers of two from lo to hi ("lo,hi")."""
    if not mixed:
        return [max_tokens]
    lo, hi = (int(x) for x in mixed.split(","))
    out = [lo]
    while out[-1] * 2 <= hi:
        out.append(out[-1] * 2)
    return out


def _run_clients(client, model: str, prompts, clients: int, requests: int, max_tokens, ignore_eos: bool):
    """(wall seconds, [latency s], generated tokens, [latency s of short requests]); `max_tokens` an int or the
    list that successive requests cycle through (client i starts at its i-th entry)."""
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens]

    def one(i: int):
        lat, toks, short = [], 0, []
        for j in range(requests):
            url, q = prompts[(i * requests + j) % len(prompts)]
            n = lengths[(i + j) % len(lengths)]
            t0 = time.perf_counter()
            r = client.chat.completions.create(
                model=model, temperature=0, max_tokens=n, extra_body={"ignore_eos": ignore_eos},
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": q}]}])
            lat.append(time.perf_counter() - t0)
            if n <= SHORT:
                short.append(lat[-1])
            toks += r.usage.completion_tokens
        return lat, toks, short

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    return (wall, [x for lat, _, _ in results for x in lat], sum(t for _, t, _ in results),
            [x for _, _, sh in results for x in sh])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--expert-budget", default="25%")
    ap.add_argument("--decode", default="auto")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--max-batches", default="1,8", help="servers to compare, by their --max-batch")
    ap.add_argument("--batchings", default=None,
                    help="servers to compare by --batching (e.g. continuous,static), at the largest --max-batches")
    ap.add_argument("--prefill-chunks", default=None, metavar="N,M",
                    help="servers to compare by --prefill-chunk (e.g. 0,64; continuous, at the largest --max-batches)")
    ap.add_argument("--admit-waits", default="0", metavar="MS,MS",
                    help="with --batchings: a continuous server per --admit-wait-ms value (e.g. 0,200)")
    ap.add_argument("--mixed-tokens", default=None, metavar="LO,HI",
                    help="requests' max tokens cycle through powers of two from LO to HI (e.g. 8,256)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per run")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="runs/serve_load")
    args = ap.parse_args(argv)
    try:
        waits = _waits(args.admit_waits)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import threading

    import uvicorn
    from openai import OpenAI

    from ..engine.loading import load
    from ..serve.app import ServeOptions, create_app
    from ..serve.cli import warm_up
    os.makedirs(args.out, exist_ok=True)
    eng = load(args.model, device=args.device, expert_budget=args.expert_budget, decode=args.decode)
    batches = [int(x) for x in args.max_batches.split(",")]
    lengths = _lengths(args.mixed_tokens, args.max_tokens)
    # servers: (label, max batch, batching, engine, admission wait in seconds)
    if args.prefill_chunks:
        kinds = [(f"chunk {n}", max(batches), "continuous", eng.fork(prefill_chunk=int(n)), 0.0)
                 for n in args.prefill_chunks.split(",")]
    elif args.batchings:
        kinds = [(b if b == "static" or waits == [0.0] else f"{b} wait {w:g} ms", max(batches), b, eng, w / 1e3)
                 for b in args.batchings.split(",") for w in (waits if b == "continuous" else [0.0])]
    else:
        kinds = [(mb, mb, "continuous", eng, 0.0) for mb in batches]
    clients = [int(x) for x in args.clients.split(",")]
    samples = _images_and_questions(args.model, 8)
    from ..engine.request import GenerationRequest
    for e in {id(k[3]): k[3] for k in kinds}.values():
        warm_up(e, max(batches), lambda: GenerationRequest.from_prompt(samples[0][0], samples[0][1],
                                                                       ignore_eos=True, max_new_tokens=max(lengths)),
                static=any(k[2] == "static" for k in kinds), continuous=any(k[2] == "continuous" for k in kinds))
    servers, seen = {}, {}
    for i, (label, mb, batching, e, wait) in enumerate(kinds):
        app = create_app(e, ServeOptions(model_name="m", max_batch=mb, max_queue=64, batching=batching,
                                         admit_wait_s=wait))
        seen[label] = _capture(app.state.scheduler)
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=18700 + i, log_level="error",
                                                timeout_keep_alive=30))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.02)
        servers[label] = (app, srv, OpenAI(base_url=f"http://127.0.0.1:{18700 + i}/v1", api_key="x", max_retries=2,
                                        timeout=600))
    prompts = [(_data_url(im), q) for im, q in samples]
    for C in clients:               # every (batch size, KV length) shape compiles and captures before timing
        for mb, (_, _, c) in servers.items():
            _run_clients(c, "m", prompts, C, 1, args.max_tokens, args.ignore_eos)
    rows = {}
    labels = list(servers)
    for C in clients:
        for rep in range(args.reps):
            order = labels if rep % 2 == 0 else labels[::-1]
            for mb in order:
                app, _, c = servers[mb]
                sch = app.state.scheduler
                n0, s0, w0 = sch.batches, sch.steps, sch.rows_stepped
                seen[mb].clear()
                counters = app.state.engine.cache.counters
                m0, b0 = counters.total().misses, counters.total().bytes_moved
                cap0 = _captures(app.state.engine)
                wall, lat, toks, short = _run_clients(c, "m", prompts, C, args.requests, lengths, args.ignore_eos)
                nb = sch.batches - n0
                row = rows.setdefault((mb, C), {"walls": [], "lat": [], "tokens": [], "batches": 0, "requests": 0,
                                                "steps": 0, "rows_stepped": 0,
                                                "short": [], "gaps": [], "ttft": [], "misses": 0, "bytes": 0,
                                                "captures": 0, "capture_s": 0.0})
                cap1 = _captures(app.state.engine)
                row["captures"] += cap1[0] - cap0[0]
                row["capture_s"] += cap1[1] - cap0[1]
                for r in seen[mb]:
                    row["gaps"] += [b - a for a, b in zip(r.token_times, r.token_times[1:])]
                    if r.t_first is not None:
                        row["ttft"].append(r.t_first - r.t_submit)
                row["misses"] += counters.total().misses - m0
                row["bytes"] += counters.total().bytes_moved - b0
                row["walls"].append(wall)
                row["lat"] += lat
                row["short"] += short
                row["tokens"].append(toks)
                row["batches"] += nb
                row["steps"] += sch.steps - s0
                row["rows_stepped"] += sch.rows_stepped - w0
                row["requests"] += len(lat)
                print(f"server {mb}, {C} clients, rep {rep}: {toks / wall:.1f} tokens/s, "
                      f"p50 {statistics.median(lat):.3f} s, {cap1[0] - cap0[0]} shapes captured "
                      f"({cap1[1] - cap0[1]:.1f} s)", flush=True)
    table = []
    for (mb, C), r in sorted(rows.items(), key=lambda kv: (kv[0][1], labels.index(kv[0][0]))):
        tps = statistics.median(t / w for t, w in zip(r["tokens"], r["walls"]))
        table.append({"max_batch": mb, "clients": C, "tokens_per_s": tps, "p50_s": _pct(r["lat"], 0.5),
                      "p99_s": _pct(r["lat"], 0.99), "p50_short_s": _pct(r["short"], 0.5) if r["short"] else None,
                      "mean_batch": r["requests"] / max(1, r["batches"]),
                      "rows_per_step": r["rows_stepped"] / max(1, r["steps"]),
                      "requests": r["requests"],
                      "itl_p50_ms": 1e3 * _pct(r["gaps"], 0.5) if r["gaps"] else None,
                      "itl_p99_ms": 1e3 * _pct(r["gaps"], 0.99) if r["gaps"] else None,
                      "ttft_p50_s": _pct(r["ttft"], 0.5) if r["ttft"] else None,
                      "ttft_p99_s": _pct(r["ttft"], 0.99) if r["ttft"] else None,
                      "misses": r["misses"], "bytes_moved": r["bytes"],
                      "captures": r["captures"], "capture_s": r["capture_s"]})
    meta = {"model": args.model or "bundled vqa-moe", "device": args.device, "expert_budget": args.expert_budget,
            "decode": eng.rc.decode, "max_tokens": lengths, "batchings": args.batchings,
            "prefill_chunks": args.prefill_chunks, "admit_waits_ms": waits, "ignore_eos": args.ignore_eos,
            "requests_per_client": args.requests, "reps": args.reps,
            "gpu": _gpu_name() if args.device.startswith("cuda") else None}
    with open(os.path.join(args.out, "serve_load.json"), "w") as f:
        json.dump({"meta": meta, "rows": table}, f, indent=1)
    lines = ["| clients | server | tokens/s | p50 latency (s) | p99 latency (s) | p50 short (s) | rows per "
             "decode step | shapes captured while measured (s) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['max_batch']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
              f"{r['p50_short_s'] if r['p50_short_s'] is None else round(r['p50_short_s'], 3)} | "
              f"{r['rows_per_step']:.2f} | {r['captures']} ({r['capture_s']:.1f}) |" for r in table]
    if args.prefill_chunks:
        lines += ["", "| clients | server | inter-token p50 (ms) | inter-token p99 (ms) | TTFT p50 (s) | "
                      "TTFT p99 (s) | misses | MB moved |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['clients']} | {r['max_batch']} | {_num(r['itl_p50_ms'], 1)} | {_num(r['itl_p99_ms'], 1)} | "
                  f"{_num(r['ttft_p50_s'], 3)} | {_num(r['ttft_p99_s'], 3)} | {r['misses']} | "
                  f"{r['bytes_moved'] / 1e6:.1f} |" for r in table]
    with open(os.path.join(args.out, "serve_load.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(table, labels, os.path.join(args.out, "serve_load.png"), meta)
    for app, srv, _ in servers.values():
        srv.should_exit = True
        app.state.scheduler.close()
    print(json.dumps({"meta": meta, "rows": table}))
    return 0


def _captures(engine) -> tuple[int, float]:
    """(decode step shapes captured so far, seconds spent compiling and capturing them) over every `StepGraphs` of
    `engine`'s model (step/graphs.py): a measured round that adds to them paid a capture mid-run."""
    sgs = engine.model.__dict__.get("_vismmoe_step_graphs", {}).values()
    return sum(len(sg.buckets) for sg in sgs), sum(sg.capture_s for sg in sgs)


def _waits(text: str) -> list[float]:
    """--admit-waits "0,200" -> [0.0, 200.0] (milliseconds); ValueError, saying what to give, for another."""
    try:
        waits = [float(w) for w in text.split(",")]
    except ValueError:
        waits = []
    if not waits or not all(math.isfinite(w) and 0 <= w <= 60_000 for w in waits):
        raise ValueError(f"--admit-waits {text!r} is not a list of waits in milliseconds: give e.g. 0,200 (each 0 to "
                         "60000)")
    return waits


def _num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _capture(sched) -> list:
    """The requests `sched` takes from now on (its `submit` wrapped): their token times once they finished."""
    seen = []
    submit = sched.submit

    def recording(req, done):
        seen.append(req)
        return submit(req, done)

    sched.submit = recording
    return seen


def _gpu_name() -> str | None:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _plot(table, batches, path, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mb in batches:
        rs = [r for r in table if r["max_batch"] == mb]
        a.plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=f"server {mb}")
        b.plot([r["clients"] for r in rs], [r["p50_s"] for r in rs], "o-", label=f"server {mb}")
    a.set(xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput")
    b.set(xlabel="concurrent clients", ylabel="p50 request latency (s)", title="latency")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"vismmoe serve: {meta['model']}, {meta['device']} ({meta.get('gpu') or 'CPU'}), "
                 f"experts {meta['expert_budget']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
