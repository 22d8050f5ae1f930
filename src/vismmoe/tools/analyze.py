"""`vismmoe analyze`: visual-expert affinity measured. Every compressor at every keep ratio over the same test
images: accuracy, and what the routing needs (working set, entropy, concentration, cross-layer stability),
split by visual and text tokens; prefill time beside it.

    for (compressor, ratio) in [(none, 1.0)] + compressors x ratios:
        for each test sample: generate with a routing trace -> exact-match answer, trace.routing_metrics, TTFT
    -> rows (means) -> analyze.md table, plots: expert-use heatmaps per layer (unpruned vs pruned),
       working set vs keep ratio per compressor, accuracy vs working set with the Pareto front

Owns the sweep and the report; metrics live in trace.py, compressors in compress.py, scoring in evaluate.py.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ..data import balanced_subset
from .evaluate import normalize
from ..offload.trace import RoutingTrace, layer_counts, routing_metrics, stability

DEFAULT_RATIOS = (1.0, 0.5, 0.33, 0.22, 0.11)
DEFAULT_COMPRESSORS = ("random", "pool", "dart", "divprune", "textrel", "affinity")


def _sweep_point(engine, samples, name: str, ratio: float, max_new_tokens: int, progress=None) -> tuple[dict, dict]:
    engine.set_compression(name, ratio)
    E = engine.geometry.num_experts
    acc, ttft, kept = [], [], []
    mets = {None: [], 1: [], 0: []}
    heat = {}
    for s in samples:
        tr = RoutingTrace()
        engine.record_trace(tr)
        gen = engine.generate(s.image, s.question, max_new_tokens=max_new_tokens)
        engine.record_trace(None)
        acc.append(normalize(gen.text) == normalize(s.answer))
        ttft.append(gen.stats["ttft_s"] - gen.stats.get("preprocess_s", 0.0))
        kept.append(gen.stats["visual_tokens_kept"] / max(1, gen.stats["visual_tokens"]))
        for m in mets:
            mets[m].append(routing_metrics(tr, E, m))
        for l, c in layer_counts(tr, E).items():
            heat[l] = heat.get(l, 0) + c
        if progress:
            progress()

    def mean(m, key):
        vals = [x[key] for x in mets[m] if x[key] is not None]
        return float(np.mean(vals)) if vals else None

    row = {"compressor": name, "keep_ratio": ratio, "kept_share": float(np.mean(kept)),
           "accuracy": float(np.mean(acc)), "n": len(samples),
           "working_set": mean(None, "working_set"), "entropy": mean(None, "entropy"),
           "top10_share": mean(None, "top10_share"), "stability": mean(None, "stability"),
           "step_jaccard": mean(None, "step_jaccard"),
           "working_set_visual": mean(1, "working_set"), "entropy_visual": mean(1, "entropy"),
           "stability_visual": mean(1, "stability"), "working_set_text": mean(0, "working_set"),
           "entropy_text": mean(0, "entropy"), "stability_text": mean(0, "stability"),
           "prefill_s": float(np.median(ttft))}   # model prefill (vision + decoder), no preprocessing
    return row, heat


def analyze(engine, compressors=DEFAULT_COMPRESSORS, ratios=DEFAULT_RATIOS, limit: int = 60,
            max_new_tokens: int = 4, progress=None) -> tuple[list[dict], dict]:
    samples = balanced_subset("test", limit)
    points = [("none", 1.0)] + [(c, r) for c in compressors for r in ratios if r < 1.0]
    rows, heats = [], {}
    for name, ratio in points:
        row, heat = _sweep_point(engine, samples, name, ratio, max_new_tokens, progress)
        rows.append(row)
        heats[(name, ratio)] = heat
    engine.set_compression("none", 1.0)
    return rows, heats


def markdown(rows: list[dict], header: str) -> str:
    cols = [("compressor", "{}"), ("keep_ratio", "{:.2f}"), ("accuracy", "{:.3f}"), ("working_set", "{:.2f}"),
            ("working_set_visual", "{:.2f}"), ("entropy", "{:.2f}"), ("top10_share", "{:.2f}"),
            ("stability", "{:.3f}"), ("prefill_s", "{:.3f}")]
    out = [header, "", "| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("-" if r[c] is None else f.format(r[c]) for c, f in cols) + " |")
    return "\n".join(out) + "\n"


def pareto(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (higher accuracy, smaller working set)."""
    front = []
    for r in rows:
        if not any(o is not r and o["accuracy"] >= r["accuracy"] and o["working_set"] <= r["working_set"]
                   and (o["accuracy"] > r["accuracy"] or o["working_set"] < r["working_set"]) for o in rows):
            front.append(r)
    return sorted(front, key=lambda r: r["working_set"])


WS_LABEL = "working set (distinct experts / MoE layer / request)"


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(rows: list[dict], heats: dict, out_dir: str, title: str, focus=("affinity", 0.22)) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    # working set vs keep ratio
    fig, ax = plt.subplots(figsize=(6, 4))
    base = next(r for r in rows if r["compressor"] == "none")
    for c in sorted({r["compressor"] for r in rows} - {"none"}):
        pts = sorted([(1.0, base["working_set"])] + [(r["keep_ratio"], r["working_set"]) for r in rows
                                                     if r["compressor"] == c])
        ax.plot(*zip(*pts), marker="o", label=c)
    paths.append(_finish(fig, ax, "keep ratio (visual tokens)", WS_LABEL, title,
                         os.path.join(out_dir, "working_set_vs_ratio.png")))
    # accuracy vs working set, Pareto front
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in sorted({r["compressor"] for r in rows}):
        pts = [(r["working_set"], r["accuracy"]) for r in rows if r["compressor"] == c]
        ax.scatter(*zip(*pts), label=c, s=22)
    front = pareto(rows)
    ax.plot([r["working_set"] for r in front], [r["accuracy"] for r in front], "k--", lw=1, label="Pareto front")
    paths.append(_finish(fig, ax, WS_LABEL, "accuracy", title, os.path.join(out_dir, "accuracy_vs_working_set.png")))
    # heatmaps
    key = focus if focus in heats else next(k for k in heats if k[0] != "none") if len(heats) > 1 else None
    pair = [("none", 1.0)] + ([key] if key else [])
    fig, axes = plt.subplots(1, len(pair), figsize=(5 * len(pair), 3.5), squeeze=False)
    for ax, k in zip(axes[0], pair):
        h = heats[k]
        m = np.stack([h[l] / max(h[l].sum(), 1) for l in sorted(h)])
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"expert use, {k[0]} @ {k[1]:.2f}", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "expert_heatmaps.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run(engine, out_dir: str, compressors, ratios, limit: int, title: str, progress=None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    rows, heats = analyze(engine, compressors, ratios, limit, progress=progress)
    with open(os.path.join(out_dir, "analyze.md"), "w") as f:
        f.write(markdown(rows, title))
    pngs = plots(rows, heats, out_dir, title)
    result = {"rows": rows, "pareto": [(r["compressor"], r["keep_ratio"]) for r in pareto(rows)],
              "plots": pngs, "seconds": time.perf_counter() - t0}
    with open(os.path.join(out_dir, "analyze.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def routing_report(engine, limit: int = 120, max_new_tokens: int = 4) -> dict:
    """Routing statistics of a model over `limit` test samples (one trace for all): `routing_stats`."""
    E = engine.geometry.num_experts
    tr = RoutingTrace()
    engine.record_trace(tr)
    try:
        for s in balanced_subset("test", limit):
            engine.generate(s.image, s.question, max_new_tokens=max_new_tokens)
    finally:
        engine.record_trace(None)
    return routing_stats(tr, E, limit)


def trace_report(paths: list[str], experts: int | None = None) -> dict:
    """`routing_stats` of saved routing traces (`RoutingTrace.save` files: `generate --trace`, `bench
    --save-traces`), their steps taken together. `experts`: the model's routed experts per layer (None: the
    highest expert id in the traces + 1, which undercounts experts no token chose). Raises UserError for a file
    that is missing or not a trace, or `experts` below an id the traces hold."""
    from ..errors import UserError
    tr = RoutingTrace()
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--traces: {path} is not a file", "give routing trace files (.npz) that exist")
        try:
            tr.steps += RoutingTrace.load(path).steps
        except Exception as exc:            # not an npz, or an npz without a trace's arrays
            raise UserError(f"--traces: {path} is not a routing trace ({type(exc).__name__})",
                            "give files written by `vismmoe generate --trace` or `vismmoe bench --save-traces`") \
                from None
    ids = [int(idx.max()) for s in tr.steps for idx, _ in s["layers"].values() if idx.size]
    if not ids:
        raise UserError("--traces: the traces hold no routed token", "give traces of requests that ran")
    top = max(ids) + 1
    if experts is None:
        experts = top
    elif experts < top:
        raise UserError(f"--experts {experts} is below the traces' expert ids (up to {top - 1})",
                        f"give the model's routed experts per layer, at least {top}")
    rep = routing_stats(tr, experts, sum(s["kind"] == "prefill" for s in tr.steps))
    rep["traces"] = list(paths)
    rep["experts"] = experts
    return rep


def routing_stats(tr: RoutingTrace, E: int, n: int) -> dict:
    """Per MoE layer of trace `tr` (E experts a layer): how many experts visual and text tokens use, the entropy of
    expert use (bits; log2 E = uniform), the share of experts visual tokens never touch, the overlap (Jaccard) of
    the experts visual and text tokens use; over the layers, how predictable layer l+1's experts are from layer l's
    (stability, all / visual / text tokens). `n`: the requests it covers (reported as is)."""
    counts = {m: layer_counts(tr, E, m) for m in (None, 1, 0)}
    rows = []
    for l in sorted(counts[None]):
        row = {"layer": l}
        for m, tag in ((None, "all"), (1, "visual"), (0, "text")):
            c = counts[m][l]
            p = c[c > 0] / max(c.sum(), 1)
            row[f"entropy_{tag}"] = float(-(p * np.log2(p)).sum())
            row[f"experts_{tag}"] = int((c > 0).sum())
        row["never_visual_share"] = float((counts[1][l] == 0).mean())
        vis, txt = counts[1][l] > 0, counts[0][l] > 0
        row["visual_text_overlap"] = float((vis & txt).sum() / max((vis | txt).sum(), 1))   # Jaccard of the sets
        rows.append(row)
    return {"rows": rows, "stability_all": stability(tr, E), "stability_visual": stability(tr, E, 1),
            "stability_text": stability(tr, E, 0), "uniform_entropy": float(np.log2(E)),
            "never_visual_share": float(np.mean([r["never_visual_share"] for r in rows])), "n": n}


def _f3(v) -> str:
    """A stability for the report: '-' where it has no tokens to measure (a trace with no visual token)."""
    return "-" if v is None else f"{v:.3f}"


def routing_markdown(rep: dict, title: str) -> str:
    """The routing report (`routing_stats`, `trace_report`) as markdown: the means over layers, then one row per MoE
    layer (experts used and entropy in bits, all / visual / text tokens; never-visual share; visual-text overlap)."""
    rows = rep["rows"]

    def mean(key):
        return sum(r[key] for r in rows) / max(len(rows), 1)
    out = [f"# Routing: {title}", "",
           f"{rep['n']} requests; entropy of a uniform router {rep['uniform_entropy']:.2f} bits; stability (layer l's "
           f"experts predicting layer l+1's) all {_f3(rep['stability_all'])}, visual {_f3(rep['stability_visual'])}, "
           f"text {_f3(rep['stability_text'])}.", "",
           "| layer | experts all / visual / text | entropy all / visual / text (bits) | never visual | visual-text overlap |",
           "|---|---|---|---|---|"]
    line = "| {} | {:.1f} / {:.1f} / {:.1f} | {:.2f} / {:.2f} / {:.2f} | {:.3f} | {:.3f} |"
    out.append(line.format("mean", *(mean(f"experts_{t}") for t in ("all", "visual", "text")),
                           *(mean(f"entropy_{t}") for t in ("all", "visual", "text")),
                           mean("never_visual_share"), mean("visual_text_overlap")))
    for r in rows:
        out.append(line.format(r["layer"], *(r[f"experts_{t}"] for t in ("all", "visual", "text")),
                               *(r[f"entropy_{t}"] for t in ("all", "visual", "text")),
                               r["never_visual_share"], r["visual_text_overlap"]))
    return "\n".join(out) + "\n"
