"""The `vismmoe` console script: one subcommand per job, user errors as one line and exit status 2.

Subcommands parse arguments, check every one of them (values, names, files to read, paths to write) before any
model is read, call the library, and print; they hold no logic of their own. `--json` prints exactly one JSON
object on the last line of stdout. The runtime options (flags, help, defaults, checks) are generated from their
declaration in config.RuntimeConfig (args.py: `add_runtime_options`, `runtime_config`); output paths go through
`paths.py`.
Importing this module imports no torch or transformers (`vismmoe --help` answers at once): each command
imports what it runs, and options whose values come from a registry (policies, predictors, compressors, links,
families) list them only when their help is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .. import __version__
from .args import Parser, add_runtime_options, at_least, check_text, compressor_list, ratios, registry, runtime_config
from .args import format_name, seed_in_range
from .args import families as _families, links as _links, shapes as _shapes
from .args import formats as _formats, quantized_formats as _quantized_formats, systems as _systems
from ..errors import UserError
from ..paths import atomic_file, input_file, output_dir, output_file

DEFAULT_KEEP_RATIOS, DEFAULT_LIMIT = "1,0.5,0.33,0.22,0.11", 60          # analyze's sweep (tools/analyze.py)


def _decode_label(args, device) -> str:
    return args.decode if args.decode != "auto" else ("fast" if device.type == "cuda" else "eager")


def _model_dir(args) -> str:
    if args.model is None:
        from ..checkpoints import default_model
        args.model = default_model()[0]
    return args.model


def _inputs(args) -> dict:
    """The inputs a command reads, by option (an output must not destroy them: paths.not_an_input): the model
    folder, the image, the calibration file (given, or the one the checkpoint ships), saved traces."""
    out = {"--model": _model_dir(args)}
    for flag in ("image", "calibration"):
        if getattr(args, flag, None):
            out["--" + flag] = getattr(args, flag)
    if getattr(args, "prefetch", None) in ("trace", "blend") and not getattr(args, "calibration", None):
        from ..checkpoints import shipped_calibration
        out["--calibration"] = shipped_calibration(args.model)
    for i, path in enumerate(p.strip() for p in (getattr(args, "traces", None) or "").split(",") if p.strip()):
        out[f"--traces ({i + 1})"] = path
    return out


def _engine_from(args, trace: bool = False):
    rc = runtime_config(args, args.cmd, trace=trace)    # checked before the engine's imports (seconds) and any weight
    from ..engine.loading import load
    from ..progress import layer_progress, status
    with layer_progress("reading experts") as tick:
        eng = load(_model_dir(args), rc, progress=tick)
    eng.progress = status                     # the fast step's first call compiles and captures: say so
    return eng


def cmd_generate(args) -> int:
    from ..engine.inputs import load_image
    if not args.prompt.strip():
        raise UserError("empty --prompt", "ask something about the image")
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    sampling = _sampling(args)
    inputs = _inputs(args)
    if args.trace:
        output_file(args.trace, "--trace", (".npz",), inputs)
    if args.timeline:
        output_file(args.timeline, "--timeline", (".png",), inputs)
    image = load_image(args.image) if args.image is not None else None   # reported before the model is read
    if image is not None:                                               # so is an image for a text-only model
        from ..engine.loading import read_model_type
        from ..families import get_family
        get_family(read_model_type(_model_dir(args))).check_images()
    elif args.compress != "none" or args.visual_top_k:  # they act on an image's visual tokens: none to act on
        unused = "--compress" if args.compress != "none" else "--visual-top-k"
        runtime_config(args, args.cmd)                  # a bad value is named as such first
        from ..engine.loading import read_config, read_model_type
        from ..engine.visual_topk import check as check_visual_top_k
        from ..families import get_family
        family = get_family(read_model_type(_model_dir(args)))
        if family.has_vision:                           # text-only: refused at load
            check_visual_top_k(args.visual_top_k or 0, family, family.geometry(read_config(_model_dir(args))).top_k)
            raise UserError(f"{unused} acts on the visual tokens of an image, and no --image is given",
                            f"add --image PATH, or drop {unused}")
    eng = _engine_from(args)
    warmup_s = 0.0 if args.no_warmup else eng.warm_up(with_image=image is not None)
    if args.trace:
        from ..offload.trace import RoutingTrace
        eng.record_trace(RoutingTrace())
    if args.timeline:
        eng.record_timeline()
    if sampling.greedy:
        gen = eng.generate(image, args.prompt, max_new_tokens=args.max_new_tokens)
    else:
        from ..engine.core import Generation
        from ..engine.request import GenerationRequest
        req = GenerationRequest.from_prompt(image, args.prompt, max_new_tokens=args.max_new_tokens,
                                            sampling=sampling)
        eng.generate_requests([req])
        gen = Generation(text=req.text, token_ids=req.token_ids, stats=req.stats)
    gen.stats["warmup_s"] = warmup_s
    if args.trace:
        with atomic_file(args.trace) as tmp:
            eng.trace.save(tmp)
    if args.timeline:
        with atomic_file(args.timeline) as tmp:
            eng.last_timeline.png(tmp, title=f"one request: {gen.stats['link']} link, budget "
                                             f"{gen.stats['slots']} of {gen.stats['experts_total']} experts")
        if not args.json:
            print(eng.last_timeline.ascii())
    if args.json:
        print(json.dumps({"text": gen.text, "token_ids": gen.token_ids, "stats": gen.stats,
                          "per_layer": eng.per_layer_counters()}))
    else:
        from ..report import console, stats_table
        out = console()
        out.print(f"[bold]answer:[/bold] {gen.text}")
        out.print(stats_table(gen.stats))
    return 0


def _sampling(args):
    from ..engine.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy (default 0); above 0 samples, at most 2")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this mass (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: not repeatable)")


def cmd_serve(args) -> int:
    runtime_config(args, "serve")               # refused before the server's imports and any weight
    from ..serve.cli import serve
    return serve(args, _engine_from)


def cmd_make_tiny(args) -> int:
    from ..families import get_family
    from ..paths import new_dir
    get_family(args.family, flag="--family")
    seed_in_range(args.seed)
    new_dir(args.out, "--out", args.force)          # before the imports and the drawing of weights
    from ..tools.tiny import make_tiny
    out = make_tiny(args.family, args.out, seed=args.seed, force=args.force)
    print(out)
    return 0


def cmd_export_gguf(args) -> int:
    output_dir(args.out, "--out", force=True, inputs=_inputs(args))   # any folder; export() checks its two files
    from ..tools.export_gguf import export
    from ..progress import layer_progress
    if args.model is None:
        args.model = _model_dir(args)
    with layer_progress("writing GGUF decoder layers") as tick:
        seen: set[str] = set()

        def on_tensor(name: str) -> None:           # one tick per decoder layer (blk.N.*)
            if name.startswith("blk.") and name.split(".")[1] not in seen:
                seen.add(name.split(".")[1])
                tick()

        res = export(args.model, args.out, dtype=args.dtype, name=args.name, progress=on_tensor, quant=args.quant,
                     llama_quantize=args.llama_quantize, force=args.force)
    if args.json:
        print(json.dumps(res))
    else:
        print(res["text"]["path"])
        print(res["mmproj"]["path"])
    return 0


def cmd_make_shape(args) -> int:
    from ..paths import new_dir
    at_least(args.layers, 1, "--layers")
    seed_in_range(args.seed)
    if args.format != "dense":
        from ..formats import make_format
        # bf16 would be the dense checkpoint of --dtype bf16
        if args.format.partition(":")[0].strip() == "bf16":
            raise UserError("make-shape --format bf16 writes nothing new",
                            "use --dtype bf16 (the dense format in bf16) or --format fp8|int4")
        format_name(args.format, "--format", ["dense"] + _quantized_formats())
        make_format(args.format, 256, 128, None)    # a bad spec is refused before anything is drawn
    new_dir(args.out, "--out", args.force)          # before the imports and the drawing of weights
    from ..bench.make_shape import make_shape
    from ..formats import make_format
    from ..progress import layer_progress
    from ..tools.quantize import quantize_checkpoint
    if args.format == "dense":
        with layer_progress("writing shards") as tick:
            res = make_shape(args.shape, args.out, layers=args.layers, dtype=args.dtype, seed=args.seed,
                             device=args.device, progress=tick, force=args.force)
        print(json.dumps(res) if args.json else res["dir"])
        return 0
    import tempfile
    with tempfile.TemporaryDirectory(prefix=".make-shape-", dir=os.path.dirname(os.path.abspath(args.out))) as tmp:
        with layer_progress("writing dense shards") as tick:
            make_shape(args.shape, os.path.join(tmp, "dense"), layers=args.layers, dtype=args.dtype,
                       seed=args.seed, device=args.device, progress=tick)
        with layer_progress(f"quantizing experts ({args.format})") as tick:
            res = quantize_checkpoint(os.path.join(tmp, "dense"), args.format, args.out, force=args.force,
                                      progress=tick)
    print(json.dumps(res) if args.json else res["out"])
    return 0


def cmd_quantize(args) -> int:
    from ..progress import layer_progress
    from ..tools.quantize import quantize_checkpoint
    if args.format.partition(":")[0].strip() not in ("dense", "bf16"):     # quantize_checkpoint says why not
        format_name(args.format, "--format", _quantized_formats())
    spec = args.format
    if args.rounding is not None:
        if not spec.startswith("int4"):
            raise UserError(f"--rounding {args.rounding} applies to int4 only", "drop --rounding, or use --format int4")
        from ..config import split_spec
        named = [v for k, v, _ in split_spec(spec)[1] if k == "rounding"]
        if named and named[-1] != args.rounding:     # the flag used to win silently
            raise UserError(f"--rounding {args.rounding} and --format {spec} name two roundings",
                            "give the rounding once: as --rounding, or as the format's rounding= knob")
        if not named:
            spec += ("," if ":" in spec else ":") + f"rounding={args.rounding}"
    with layer_progress(f"quantizing experts ({args.format})") as tick:
        res = quantize_checkpoint(_model_dir(args), spec, args.out, all_linears=args.all_linears,
                                  force=args.force, progress=tick, layout=args.layout)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['out']}: experts as {res['format']}, {res['expert_bytes'] / 2**20:.1f} MiB of experts "
              f"(dense: {res['dense_expert_bytes'] / 2**20:.1f} MiB)")
    return 0


def cmd_calibrate_rates(args) -> int:
    import torch

    from ..cpu.rates import calibrate
    from ..formats import make_format
    from ..engine.loading import _resolve_device
    dev = _resolve_device(args.device)
    specs = compressor_list(args.formats)       # "int4:group=32,sym=0,fp8": a knob joins the format before it
    if not specs:
        raise UserError(f"--formats {args.formats!r} names no expert format", "give e.g. --formats dense,fp8,int4")
    for spec in specs:
        format_name(spec, "--formats", _formats())
    if args.shape is not None and args.model is not None:      # --model was ignored
        raise UserError("--shape and --model name two expert shapes", "give one: --model DIR or --shape NAME")
    if args.shape is not None:
        from ..bench.shapes import get_shape
        fam_name, config = get_shape(args.shape)
    else:
        from ..engine.loading import read_config, read_model_type
        model = _model_dir(args)
        read_model_type(model)                  # a local folder holding config.json: never the hub
        config = read_config(model)
        fam_name = config.model_type
    from ..families import get_family
    geo = get_family(fam_name).geometry(config)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    layouts = [make_format(s, geo.hidden, geo.inter, dtype) for s in specs]
    rates, path = calibrate(dev, layouts)
    out = {"machine": rates.machine, "file": path, "link_gbps": rates.link_gbps, "handoff_us": rates.handoff_s * 1e6,
           "cpu": {lay.spec(): rates.summary(lay) for lay in layouts}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"machine: {rates.machine}\nlink {rates.link_gbps:.2f} GB/s, worker hand-off "
          f"{rates.handoff_s * 1e6:.0f} us; cached in {path or '(not written: the cache folder is read-only)'}")
    for lay in layouts:
        print(f"{lay.spec()} {geo.hidden}x{geo.inter} {str(dtype).replace('torch.', '')}, "
              f"{lay.nbytes / 2**20:.2f} MiB per expert:")
        for r in rates.summary(lay):
            print(f"  {r['tokens']:3d} tokens  {r['ms']:8.3f} ms/expert  {r['gbps']:7.2f} GB/s  "
                  f"{r['gflops']:7.2f} GFLOP/s")
    return 0


def cmd_calibrate(args) -> int:
    from ..tools.calibrate import calibrate, default_samples
    from ..engine.loading import load
    from ..progress import layer_progress
    at_least(args.limit, 3, "--limit", "calibration needs at least 3 samples")
    if args.depth is not None:
        at_least(args.depth, 1, "--depth")
    output_file(args.out, "--out", (".npz",), _inputs(args))
    rc = runtime_config(args, "calibrate", expert_budget="100%")
    from ..engine.loading import read_config, read_model_type
    from ..families import get_family
    model = _model_dir(args)
    layers = len(get_family(read_model_type(model)).geometry(read_config(model)).moe_layers)
    if args.depth is None:                          # 3, fewer on a model with fewer MoE layers
        args.depth = max(1, min(3, layers - 1))
    elif args.depth >= layers:                      # a table of depth d predicts MoE layer l + d from layer l
        raise UserError(f"--depth {args.depth}: the model has {layers} MoE layers, so a table that deep predicts "
                        "nothing", f"give at most {layers - 1}")
    eng = load(_model_dir(args), rc)
    with layer_progress("calibrating (requests)") as tick:
        tables, rows = calibrate(eng, default_samples(args.limit), depth=args.depth, progress=tick)
    with atomic_file(args.out) as tmp:
        tables.save(tmp)
    if args.json:
        print(json.dumps({"out": args.out, "alpha": tables.alpha.tolist(), "rows": rows}))
    else:
        from rich.table import Table

        from ..report import console
        t = Table(title="predictor quality on held-out samples")
        for col in ("predictor", "kind", "depth", "precision", "recall"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["predictor"], r["kind"], str(r["depth"]), f"{r['precision']:.3f}", f"{r['recall']:.3f}")
        console().print(t)
        print(f"wrote {args.out}")
    return 0


def cmd_analyze(args) -> int:
    from ..tools.analyze import DEFAULT_COMPRESSORS, run
    from ..engine.compress import make_compressor
    from ..engine.loading import load
    from ..progress import layer_progress
    if args.traces is not None:                     # saved routing traces: no model is loaded
        from ..tools.analyze import trace_report
        if args.routing:
            raise UserError("--routing and --traces are two reports", "give one of them")
        if args.experts is not None:
            at_least(args.experts, 1, "--experts")
        _unused_by(args, "--traces reads saved traces (no model is loaded)", model=True)
        paths = [p.strip() for p in args.traces.split(",") if p.strip()]
        if not paths:
            raise UserError("--traces names no file", "give comma-separated routing trace files (.npz)")
        twice = next((p for i, p in enumerate(paths) if os.path.realpath(p) in map(os.path.realpath, paths[:i])), None)
        if twice is not None:               # its requests would count twice in every statistic
            raise UserError(f"--traces names {twice} twice", "give each trace file once")
        _routing_out(args, {f"--traces ({i + 1})": p for i, p in enumerate(paths)})
        rep = trace_report(paths, args.experts)
        return _print_routing(args, rep, f"{len(paths)} saved trace file{'s' if len(paths) > 1 else ''}")
    if args.experts is not None:
        raise UserError("--experts goes with --traces", "drop it, or analyze saved traces with --traces")
    if args.routing:
        _unused_by(args, "--routing reports the model's own routing (no compressor runs)", model=False)
    keep = ratios(args.keep_ratios, "--keep-ratios")
    comps = compressor_list(args.compressors) if args.compressors else list(DEFAULT_COMPRESSORS)
    for c in comps:
        make_compressor(c)                          # a name, or name:knob=value[,knob=value]
    at_least(args.limit, 1, "--limit")
    if args.routing:
        _routing_out(args, _inputs(args))
    else:
        args.out = args.out or "runs/analyze"
        output_dir(args.out, "--out", args.force, owned=("analyze.json", "analyze.md"), inputs=_inputs(args))
    eng = load(_model_dir(args), runtime_config(args, "analyze", expert_budget="100%"))
    if args.routing:
        from ..tools.analyze import routing_report
        rep = routing_report(eng, args.limit)
        return _print_routing(args, rep, f"{os.path.basename(os.path.abspath(_model_dir(args)))}, test split, "
                                         f"{args.limit} samples" + _trim_label(eng))
    title = f"{os.path.basename(os.path.abspath(args.model))}, test split, {args.limit} samples, {eng.device}" + \
        _trim_label(eng)
    with layer_progress("analyze (requests)") as tick:
        res = run(eng, args.out, comps, keep, args.limit, title, progress=tick)
    if args.json:
        print(json.dumps(res))
    else:
        with open(os.path.join(args.out, "analyze.md")) as f:
            print(f.read())
        print("plots:", ", ".join(res["plots"]))
    return 0


def _trim_label(eng) -> str:
    """The title's note of --visual-top-k, when set."""
    return f", visual tokens on their top-{eng.rc.visual_top_k} experts" if eng.rc.visual_top_k else ""


_SWEEP = (("--keep-ratios", "keep_ratios", DEFAULT_KEEP_RATIOS), ("--compressors", "compressors", None))


def _unused_by(args, why: str, model: bool) -> None:
    """Refuse analyze's sweep options (and with `model`, every option of a model run) where the report asked for
    does not use them: `--routing` and `--traces` would ignore them."""
    from ..config import declared, flag_of
    unused = [(flag, getattr(args, name) != default) for flag, name, default in _SWEEP]
    if model:
        unused += [("--model", args.model is not None), ("--limit", args.limit != DEFAULT_LIMIT)]
        unused += [(flag_of(f), getattr(args, f.name) != f.metadata["cli_default"]) for f in declared("analyze")]
    for flag, given in unused:
        if given:
            raise UserError(f"{flag} is not used here: {why}", f"drop {flag}")


def _routing_out(args, inputs: dict) -> None:
    """The routing report's --out folder (optional: the report is printed either way), checked before the work."""
    if args.out is not None:
        output_dir(args.out, "--out", args.force, owned=("routing.json", "routing.md"), inputs=inputs)


def _print_routing(args, rep: dict, title: str) -> int:
    """Print the routing report (JSON with --json, else its markdown table) and write both into --out if given."""
    from ..tools.analyze import routing_markdown
    md = routing_markdown(rep, title)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        with atomic_file(os.path.join(args.out, "routing.json")) as tmp, open(tmp, "w") as f:
            json.dump(rep, f, indent=1)
        with atomic_file(os.path.join(args.out, "routing.md")) as tmp, open(tmp, "w") as f:
            f.write(md)
    print(json.dumps(rep) if args.json else md, end="\n" if args.json else "")
    return 0


def cmd_eval(args) -> int:
    at_least(args.limit, 1, "--limit")
    if not 0.0 <= args.photo_backgrounds <= 1.0:
        raise UserError(f"--photo-backgrounds {args.photo_backgrounds} is not a share",
                        "give a number from 0 to 1, e.g. 0.3")
    rc = runtime_config(args, "eval")
    from ..engine.loading import load
    from ..tools.evaluate import evaluate
    asked = None if args.image_side is None else _sizes(str(args.image_side), "--image-side", 28, 4096, True)
    eng = load(_model_dir(args), rc)
    side = _fit_sides(eng, asked, "--image-side")[0]
    res = evaluate(eng, split=args.split, limit=args.limit, progress=sys.stderr.isatty() and not args.json,
                   photos=args.photo_backgrounds, side=side)
    res["expert_format"] = eng.layout.spec()
    if args.json:
        print(json.dumps(res))
    else:
        from rich.table import Table

        from ..report import console
        t = Table(title=f"accuracy on the {args.split} split ({res['n']} questions)")
        t.add_column("question type")
        t.add_column("model", justify="right")
        t.add_column("majority baseline", justify="right")
        for q, a in res["by_type"].items():
            t.add_row(q, f"{a:.3f}", f"{res['majority_by_type'].get(q, float('nan')):.3f}")
        t.add_row("overall", f"{res['accuracy']:.3f}", f"{res['majority_baseline']:.3f}")
        console().print(t)
    return 0


def cmd_bench(args) -> int:
    from ..bench.harness import SYSTEMS, requests_from_samples, run, speedup_lines
    from ..config import parse_size
    from ..data import balanced_subset
    from ..data.scenes import LazySeq
    from ..offload.links import get_link
    from ..progress import layer_progress
    if args.shape is not None and args.model is not None:
        raise UserError("--shape and --model name two workloads", "give one: --model DIR (a checkpoint) or --shape "
                        "NAME (random weights)")
    if args.prompt_tokens is not None and args.shape is None:
        raise UserError("--prompt-tokens is for --shape workloads, so nothing would use it",
                        "add --shape NAME, or drop it")
    quick = ("ondemand", "lru-offload", "gate-prefetch", "vismmoe")
    systems = args.systems.split(",") if args.systems else [s for s in SYSTEMS if s != "accelerate" and (
        not args.quick or s in quick)]
    for s in systems:
        if s not in SYSTEMS:
            raise UserError(f"unknown system {s!r}", f"use some of {', '.join(SYSTEMS)}")
    if args.visual_top_k and not any(SYSTEMS[s].visual_top_k for s in systems):
        raise UserError(f"--visual-top-k {args.visual_top_k} sets the K of the systems that trim visual tokens "
                        "(vismmoe-vtopk), and --systems runs none", "add vismmoe-vtopk to --systems, or drop "
                        "--visual-top-k")
    links = args.link or (["mobile"] if args.quick else ["edge", "mobile"])
    if args.device_profile is not None:         # the profile's expert tier is the link
        if args.link:
            raise UserError("--link and --device-profile both set the expert link (the profile's is its tier)",
                            "drop --link, or drop --device-profile")
        links = ["real"]
    for ln in links:
        get_link(ln)
    if "accelerate" in systems and "real" not in links:
        raise UserError("accelerate runs on a CUDA device over the real link only, so no --link given would "
                        "measure it", "add --link real (on a GPU), or drop accelerate from --systems")
    budgets = args.budgets.split(",") if args.budgets else (["25%"] if args.quick else ["10%", "25%", "50%"])
    for b in budgets:
        parse_size(b, total=1 << 62, what="--budgets entry")
    for flag in ("limit", "reps", "max_new_tokens"):
        at_least(getattr(args, flag), 1, "--" + flag.replace("_", "-"))
    asked = None                            # before any model is read (text-only shapes: at the shape)
    if args.image_sides is not None:
        asked = _sizes(args.image_sides, "--image-sides", 28, 4096, True)
    if args.calibration is not None:
        input_file(args.calibration, "--calibration", "give the .npz that vismmoe calibrate wrote")
    inputs = _inputs(args) if not args.shape else {"--calibration": args.calibration}
    output_dir(args.out, "--out", args.force, owned=("bench.json", "bench.md"), inputs=inputs)
    if args.save_traces:
        if os.path.realpath(args.save_traces) == os.path.realpath(args.out):
            raise UserError(f"--save-traces {args.save_traces} is the --out folder",
                            "give the traces a folder of their own (e.g. OUT/traces)")
        output_dir(args.save_traces, "--save-traces", args.force, owned=("trace_*",), inputs=inputs)
    n = args.limit or (6 if args.quick else 30)
    args.reps = args.reps or 3
    calibrate_on = None
    if args.shape:
        base, samples, new, title, calibrate_on = _shape_workload(args)
        _accelerate_device(systems, base)
    else:
        from ..engine.loading import load
        model = _model_dir(args)
        base = load(model, runtime_config(args, "bench", expert_budget="100%"))
        _accelerate_device(systems, base)
        sides = _fit_sides(base, asked, "--image-sides")
        subsets = [balanced_subset("test", n, side=s) for s in sides]
        samples = requests_from_samples(LazySeq(n * len(sides), lambda i: subsets[i // n][i % n]))
        new = args.max_new_tokens or 4
        at = "" if sides == [None] else f" at {','.join(map(str, sides))} px"
        title = (f"model {os.path.basename(os.path.abspath(model))} "
                 f"({'trained' if 'checkpoints' in model else 'given'} routing), {base.device} ({os.cpu_count()} "
                 f"cores), {n} test requests{at}, {new} new tokens, cold cache per request, medians of {args.reps}, "
                 f"{_decode_label(args, base.device)} decode")
    if args.device_profile is not None:
        title += f"; times {base.clock.profile.label()}, not measured"
    with layer_progress("bench (system runs)") as tick:
        res = run(base, samples, systems, links, budgets, args.reps, new, args.calibration,
                  args.out, title, progress=tick, save_traces=args.save_traces, calibrate_on=calibrate_on)
    if args.json:
        print(json.dumps(res))
    else:
        with open(os.path.join(args.out, "bench.md")) as f:
            print(f.read())
        for line in speedup_lines(res["speedup"], args.reps):
            print(line)
    return 0


def _accelerate_device(systems: list[str], eng) -> None:
    """accelerate is measured on CUDA only (its device_map needs a GPU to offload to): refuse it elsewhere."""
    if "accelerate" in systems and eng.device.type != "cuda":
        raise UserError(f"accelerate runs on a CUDA device only, and this bench runs on {eng.device.type}",
                        "add --device cuda on a GPU, or drop accelerate from --systems")


def _fit_sides(eng, sides: list[int] | None, flag: str) -> list[int | None]:
    """The image sides asked for a model's test scenes (`_sizes` of `flag`; None: [None], the scenes' own 448 px),
    each one the model's image processor takes without shrinking it (a larger one would silently run at the
    processor's size)."""
    if sides is None:
        return [None]
    from ..families.base import max_image_side
    if not eng.family.has_vision:
        raise UserError(f"{flag}: {eng.config.model_type} is a text-only model (no vision tower), so it takes no "
                        "images", f"drop {flag}")
    most = max_image_side(eng.image_processor)
    if most is not None and max(sides) > most:
        raise UserError(f"{flag} {','.join(map(str, sides))}: this model's image processor takes images up to "
                        f"{most} px a side, so a {max(sides)} px scene would run shrunk to it",
                        f"give sides up to {most}")
    return sides


def _sizes(text: str, what: str, lo: int, hi: int, images: bool) -> list[int]:
    """Comma-separated image sides (pixels) or prompt lengths (tokens), each in [lo, hi]; UserError otherwise."""
    try:
        sides = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sides = []
    if not sides or any(not lo <= x <= hi for x in sides):
        raise UserError(f"bad {what} {text!r}", f"give comma-separated sides in pixels from {lo} to {hi}, e.g. "
                        "448,1024" if images else
                        f"give comma-separated prompt lengths in tokens from {lo} to {hi}, e.g. 512,2048")
    return sides


def _shape_workload(args):
    """A random-weight shape: one request per image side (text-only shapes: per prompt length), teacher-forced
    random decode tokens; and as many earlier requests (other images and tokens, same sizes) for moe-infinity's
    tables."""
    import torch

    from ..bench.harness import Request
    from ..bench.random_model import random_engine, synthetic_inputs, synthetic_text_inputs
    from ..bench.shapes import get_shape
    from ..engine.loading import _resolve_device
    from ..families import get_family
    from ..formats import make_format
    fam, config = get_shape(args.shape)
    family = get_family(fam)
    if family.has_vision:
        if args.prompt_tokens is not None:
            raise UserError(f"--prompt-tokens is for text-only shapes; {args.shape} takes images",
                            "give --image-sides instead")
        sizes, what, lo, hi = args.image_sides or "448,1024", "--image-sides", 28, 4096
    else:
        if args.image_sides is not None:
            raise UserError(f"shape {args.shape} is text-only ({fam}): it takes no --image-sides",
                            "give --prompt-tokens N[,N] instead")
        sizes, what, lo, hi = args.prompt_tokens or "512", "--prompt-tokens", 1, 32768
    sides = _sizes(sizes, what, lo, hi, family.has_vision)
    dev = _resolve_device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    geo = family.geometry(config)
    spec = "dense" if args.expert_format == "auto" else args.expert_format
    least = geo.top_k * make_format(spec, geo.hidden, geo.inter, dtype).nbytes
    rc = runtime_config(args, "bench", expert_budget=str(least), expert_format=spec,
                        dtype=str(dtype).replace("torch.", ""), device=str(dev))
    base = random_engine(fam, config, rc)
    new = args.max_new_tokens or 64
    g = torch.Generator().manual_seed(1234)
    vocab = family.text_config(config).vocab_size
    inputs = synthetic_inputs if family.has_vision else synthetic_text_inputs
    def requests(seed: int) -> list:
        return [Request(inputs=inputs(base, side, seed=seed),
                        teacher_tokens=torch.randint(min(1000, vocab // 4), vocab, (new + 1,), generator=g).tolist())
                for side in sides]
    reqs = requests(0)
    earlier = requests(1)
    sized = f"images {sizes} px" if family.has_vision else f"prompts of {sizes} tokens"
    title = (f"shape {args.shape} (RANDOM weights), {base.device}, {sized}, {new} new tokens "
             f"(decode inputs teacher-forced random tokens), cold cache per request, medians of {args.reps}, "
             f"{_decode_label(args, base.device)} decode")
    return base, reqs, new, title, earlier


def cmd_demo(args) -> int:
    from ..tools.demo import run_demo
    return run_demo(device=args.device, as_json=args.json)


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """What every model-running job takes besides its own options."""
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"write into an --out folder that holds other files ({what})")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vismmoe", description="Run vision-language MoE models with experts offloaded.")
    p.add_argument("--version", action="version", version=f"vismmoe {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="answer a prompt about an image",
                       description="Answer a prompt about an image with the experts offloaded. Defaults: the "
                                   "predictive policy with gate prefetch (what measured best at a budget); "
                                   "--policy lru --prefetch none is the plain LRU baseline.")
    g.add_argument("--model", default=None,
                   help="checkpoint directory (config.json, safetensors, tokenizer); default: the bundled model")
    g.add_argument("--image", default=None, metavar="PATH",
                   help="the image to ask about (PNG, JPEG, WebP, BMP, GIF, TIFF; EXIF orientation applied); "
                        "default: none, a text-only prompt")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction about the image")
    g.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="most tokens to generate (default 32); stops earlier at end of turn")
    g.add_argument("--trace", default=None, metavar="FILE.npz",
                   help="save the routing trace to this .npz file (default: not saved)")
    g.add_argument("--timeline", default=None, metavar="FILE.png",
                   help="draw the request's vision encoder, compute and copy spans to this .png file (ASCII on the "
                        "terminal too; default: not drawn)")
    g.add_argument("--no-warmup", action="store_true",
                   help="skip the short untimed warm-up request run before the timed one (its time is stats "
                        "warmup_s); without it the request's times carry first-call costs")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token_ids, stats, per_layer) on the last line of stdout")
    _add_sampling_args(g)
    add_runtime_options(g, "generate")
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="an OpenAI-compatible chat completions server (images, streaming, metrics)",
                        description="An OpenAI-compatible chat completions server. Runtime defaults as generate's: "
                                    "the predictive policy with gate prefetch.")
    sv.add_argument("--model", default=None, help="checkpoint directory; default: the bundled model")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--served-model-name", default=None, metavar="NAME",
                    help="the model name clients send (default: the checkpoint folder's name)")
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on /v1 (default: none; also read from VISMMOE_API_KEY)")
    sv.add_argument("--allowed-local-media", default=None, metavar="DIR",
                    help="let image_url file:// URLs read files inside DIR (default: no local files)")
    sv.add_argument("--allow-remote-media", action="store_true", help="let image_url fetch http(s) URLs")
    sv.add_argument("--max-batch", type=int, default=8, metavar="N",
                    help="most requests decoded together: rows running at once (default 8; docs/serving.md)")
    sv.add_argument("--max-queue", type=int, default=16, metavar="N",
                    help="most requests waiting beyond --max-batch: the server holds at most --max-batch + "
                         "--max-queue requests, running and waiting, whatever the engine is doing; more get HTTP "
                         "429 (default 16)")
    sv.add_argument("--max-body", default="32MiB", metavar="SIZE",
                    help="largest request body, at least 1KiB (default 32MiB)")
    sv.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                    help="max new tokens of a request that names none, fewer when the prompt leaves less room in "
                         "the model's context; must be under the context (default 256)")
    from ..serve.cli import add_arguments as _add_serve_args
    _add_serve_args(sv)
    add_runtime_options(sv, "serve")
    sv.set_defaults(func=cmd_serve)

    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint of a family (for tests)")
    registry(t.add_argument("--family", required=True, metavar="NAME", help="model family, one of {names}"),
             _families)
    t.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty directory to write the checkpoint to (written under a temporary name, "
                        "renamed when complete)")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    t.add_argument("--force", action="store_true",
                   help="replace a non-empty --out folder (once the new checkpoint is complete)")
    t.set_defaults(func=cmd_make_tiny)

    x = sub.add_parser("export-gguf", help="write a checkpoint as GGUF files for llama.cpp (text model + mmproj)")
    x.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    x.add_argument("--out", required=True, metavar="DIR",
                   help="directory for <name>-<dtype>.gguf (or <name>-<type>.gguf) and mmproj-<name>-<dtype>.gguf "
                        "(created if missing)")
    x.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"],
                   help="type of the weight matrices (default bf16); norms and biases are always f32. With --type: "
                        "the projector's type, and the text file llama-quantize reads")
    x.add_argument("--type", dest="quant", default=None, choices=["q8_0", "q4_k", "q4_k_m"],
                   help="quantize the text model's weight matrices (routers and norms stay f32; the projector stays "
                        "--dtype) into <name>-<type>.gguf: q8_0 with the gguf package; q4_k (every matrix Q4_K) and "
                        "q4_k_m (llama.cpp's Q4_K/Q6_K mixture) with llama.cpp's llama-quantize; see docs/llama-cpp.md "
                        "(default: none, the text model stays --dtype)")
    x.add_argument("--llama-quantize", default=None, metavar="PATH",
                   help="llama-quantize for q4_k and q4_k_m: the file or its folder (default: "
                        "$VISMMOE_LLAMA_CPP_BIN/llama-quantize, then PATH)")
    x.add_argument("--name", default=None, help="file name stem (default: the checkpoint directory's name)")
    x.add_argument("--force", action="store_true", help="replace GGUF files of the same names in --out")
    x.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    x.set_defaults(func=cmd_export_gguf)

    m = sub.add_parser("make-shape", help="write a random-weight shape as a checkpoint (for peers on the same bytes)")
    registry(m.add_argument("--shape", required=True, metavar="NAME", help="shape name, one of {names}"), _shapes)
    m.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty directory to write the checkpoint to (written under a temporary name, "
                        "renamed when complete)")
    m.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    m.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"], help="weight dtype")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    m.add_argument("--device", default=None,
                   help="where weights are drawn: cuda (fast) or cpu (default: cuda when there is one)")
    registry(m.add_argument("--format", default="dense", metavar="FORMAT",
                             help="expert format of the written checkpoint: dense (default) or one of {names}, "
                                  "written as `vismmoe quantize` writes it"), _quantized_formats)
    m.add_argument("--force", action="store_true",
                   help="replace a non-empty --out folder (once the new checkpoint is complete)")
    m.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    m.set_defaults(func=cmd_make_shape)

    q = sub.add_parser("quantize", help="write a dense checkpoint again with its experts quantized (fp8, int4)")
    q.add_argument("--model", default=None, help="dense checkpoint directory (default: the bundled model)")
    registry(q.add_argument("--format", required=True, metavar="FORMAT",
                             help="fp8 (Qwen's FP8 layout, 128x128 blocks) or int4[:group=16|32|64|128,sym=0|1] "
                                  "(compressed-tensors pack-quantized; default group 128, symmetric); one of "
                                  "{names}"), _quantized_formats)
    q.add_argument("--out", required=True, metavar="DIR", help="directory to write the checkpoint to (new or empty)")
    q.add_argument("--layout", choices=("compressed-tensors", "awq"), default=None,
                   help="int4's checkpoint layout: compressed-tensors pack-quantized (default) or awq (AutoAWQ's "
                        "GEMM layout: qweight/qzeros/scales, asymmetric, fp16 scales)")
    q.add_argument("--all-linears", action="store_true",
                   help="also quantize the decoder's attention projections, as published releases do")
    q.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    q.add_argument("--rounding", choices=("rtn", "hqq"), default=None,
                   help="int4: round to nearest (default) or fit each group's scale and zero point HQQ-style "
                        "(same as --format int4:rounding=hqq)")
    q.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("calibrate", help="transition tables for --prefetch trace/blend, and predictor quality")
    _add_job_args(c)
    c.add_argument("--out", required=True, metavar="FILE.npz", help="the tables' .npz file (replaced if it exists)")
    c.add_argument("--limit", type=int, default=48, help="validation samples to use")
    c.add_argument("--depth", type=int, default=None,
                   help="MoE layers ahead to build tables for, fewer than the model's MoE layers (default 3, or "
                        "one less than the model's MoE layers if that is fewer)")
    add_runtime_options(c, "calibrate")
    c.set_defaults(func=cmd_calibrate)

    cr = sub.add_parser("calibrate-rates", help="measure this machine's link and CPU expert rates for "
                        "--cpu-experts auto, and cache them")
    cr.add_argument("--device", default="cpu", help="cpu or cuda (whose link is measured)")
    cr.add_argument("--model", default=None, help="checkpoint whose expert shape is measured (default: the "
                    "bundled model)")
    cr.add_argument("--shape", default=None, help="a named shape instead of --model, e.g. qwen3-30b-a3b "
                    "(default: none)")
    cr.add_argument("--formats", default="dense", help="comma-separated expert formats with their knobs, e.g. "
                    "dense,fp8,int4:group=32,sym=0")
    cr.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="activation dtype (default: float32 on cpu, bfloat16 on cuda)")
    cr.add_argument("--json", action="store_true", help="print one JSON object")
    cr.set_defaults(func=cmd_calibrate_rates)

    a = sub.add_parser("analyze", help="compressors x keep ratios: accuracy, expert working set, stability")
    _add_job_args(a)
    a.add_argument("--keep-ratios", default=DEFAULT_KEEP_RATIOS, metavar="R,R,...",
                   help="comma-separated shares of visual tokens kept, each in (0, 1]")
    a.add_argument("--compressors", default=None,
                   help="comma-separated names, each optionally with one knob, e.g. affinity:gamma=1.5 (default: all)")
    a.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="test samples (type-balanced)")
    a.add_argument("--out", default=None, metavar="DIR",
                   help="directory for analyze.md, the JSON and the plots (default runs/analyze); with --routing or "
                        "--traces, for routing.md and routing.json (default: printed only): new, empty, or an "
                        "earlier analyze run's")
    _add_force(a, "analyze's own files are replaced, others kept")
    a.add_argument("--routing", action="store_true",
                   help="instead: the model's routing statistics per layer (entropy, never-visual experts, stability)")
    a.add_argument("--traces", default=None, metavar="FILE,FILE",
                   help="instead: the same routing statistics of saved routing traces (generate --trace, bench "
                        "--save-traces), taken together; no model is loaded (default: none, analyze a model)")
    a.add_argument("--experts", type=int, default=None,
                   help="with --traces: routed experts per layer (default: the highest id in the traces + 1)")
    add_runtime_options(a, "analyze")
    a.set_defaults(func=cmd_analyze)

    ev = sub.add_parser("eval", help="VQA accuracy on the test split, with the majority baseline")
    _add_job_args(ev)
    ev.add_argument("--limit", type=int, default=None,
                    help="type-balanced subset size (default 1200); scenes are made as they are asked, so memory "
                         "stays flat at any size")
    ev.add_argument("--split", default="test", choices=["test", "val"], help="question split")
    ev.add_argument("--image-side", type=int, default=None, metavar="PX",
                    help="test scenes resized to PX x PX (default: their own 448; at most what the model's image "
                         "processor takes unshrunk)")
    ev.add_argument("--photo-backgrounds", type=float, default=0.0, metavar="P",
                    help="share of questions on a crop of a bundled photograph instead of a synthetic background "
                         "(0-1; the same questions and answers; default 0: the scenes the shipped model knows)")
    add_runtime_options(ev, "eval")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="offloading systems side by side on the same requests")
    _add_job_args(b)
    b.add_argument("--shape", default=None,
                   help="a random-weight shape instead of a model, e.g. qwen3-vl-30b-a3b (default: none)")
    registry(b.add_argument("--link", action="append", default=None, metavar="PROFILE",
                            help="link profile, repeatable, one of {names} (default: edge and mobile; quick mobile)"),
             _links)
    b.add_argument("--budgets", default=None, help="comma-separated (default 10%%,25%%,50%%; quick 25%%)")
    registry(b.add_argument("--systems", default=None, metavar="NAME,...",
                            help="comma-separated, some of {names} (default: all but accelerate, which runs on "
                                 "CUDA with --link real only)"), _systems)
    b.add_argument("--limit", type=int, default=None, help="test requests (default 30, quick 6)")
    b.add_argument("--reps", type=int, default=None,
                   help="repetitions, systems interleaved; rows are medians and speedups give their spread "
                        "(default 3, quick too)")
    b.add_argument("--max-new-tokens", type=int, default=None, help="default 4 (trained model), 64 (shapes)")
    b.add_argument("--image-sides", default=None,
                   help="with --shape: one request per image side (default 448,1024); with a model: its test scenes "
                        "at each side (default: their own 448), up to what its image processor takes unshrunk")
    b.add_argument("--prompt-tokens", default=None, metavar="N,...",
                   help="with a text-only --shape: one request per prompt length in tokens (default 512)")
    b.add_argument("--calibration", default=None, metavar="FILE",
                   help="tables for trace prefetch (moe-infinity system; default: none, it falls back to gate)")
    b.add_argument("--out", default="runs/bench", metavar="DIR",
                   help="directory for bench.md, bench.json and the plots: new, empty, or an earlier bench run's")
    b.add_argument("--save-traces", default=None, metavar="DIR",
                   help="also save the routing traces behind the bound (one .npz per compression setting and "
                        "request; default: not saved)")
    _add_force(b, "bench's own files are replaced, others kept")
    b.add_argument("--quick", action="store_true",
                   help="a small run (CI smoke test, under 3 minutes on 2 cores): 6 requests, 25%%, the mobile link, "
                        "and (unless --systems names others) ondemand, lru-offload, gate-prefetch and vismmoe")
    add_runtime_options(b, "bench")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="answer questions with the default model and show offload statistics")
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    d.set_defaults(func=cmd_demo)
    return p


def _quiet_libraries() -> None:
    """No progress bars from the libraries either when stderr is not a terminal (ours are off there already):
    Hugging Face's (weights written and read) and tqdm's."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if "transformers" in sys.modules:               # imported already (in-process callers): tell it directly
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, as SIGINT raises KeyboardInterrupt: the same clean-up runs (a partial
    output folder or file is removed, `paths.atomic_dir` / `atomic_file`)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                         # --help, --version, or a usage error already printed as one line
        return int(e.code or 0)
    if os.environ.get("VISMMOE_QUIET") or not sys.stderr.isatty():
        _quiet_libraries()
    previous = None
    # serve too: uvicorn holds SIGTERM while it serves (it drains), then raises it again here once it has stopped
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        check_text(list(argv) if argv is not None else sys.argv[1:])
        return args.func(args)
    except UserError as e:
        sys.stderr.write(f"vismmoe: error: {e}\n")
        return 2
    except Terminated:
        sys.stderr.write("vismmoe: terminated\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("vismmoe: interrupted\n")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
