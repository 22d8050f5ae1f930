"""`vismmoe demo`: the main job on the shipped default model, on the CPU in well under a minute.

Until a trained default model ships, the demo builds a tiny random Qwen3-VL-MoE checkpoint (its answers are
noise; the point is the offload machinery) in a cache directory and answers one prompt about a photo at two
expert budgets, printing the answer and the offload statistics of each.
"""

from __future__ import annotations

import json
import os
import tempfile

from .report import console, stats_table

DEMO_BUDGETS = ("100%", "25%")


def _cache_dir() -> str:
    base = os.environ.get("VISMMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vismmoe")
    try:
        os.makedirs(base, exist_ok=True)
        return base
    except OSError:
        return tempfile.mkdtemp(prefix="vismmoe-")


BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "vqa-moe")


def default_model() -> tuple[str, str]:
    """(checkpoint dir, routing source) of the default model: the bundled trained model when it is there."""
    if os.path.exists(os.path.join(BUNDLED, "config.json")):
        return BUNDLED, "trained (bundled Qwen3-VL-MoE-class VQA model)"
    from .tiny import make_tiny
    path = os.path.join(_cache_dir(), "tiny-qwen3_vl_moe")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny("qwen3_vl_moe", path, layers=4, experts=16, top_k=4)
    return path, "random weights (tiny Qwen3-VL-MoE built by make-tiny)"


def _demo_image() -> str:
    import matplotlib.cbook
    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def run_demo(device: str = "cpu", as_json: bool = False) -> int:
    from .engine import load
    out = console()
    model_dir, routing = default_model()
    image, prompt = _demo_image(), "What is in the picture?"
    if not as_json:
        out.print(f"[bold]model[/bold] {model_dir}  ([italic]{routing}[/italic])")
        out.print(f"[bold]image[/bold] {image}\n[bold]prompt[/bold] {prompt}")
    results = []
    for budget in DEMO_BUDGETS:
        eng = load(model_dir, device=device, expert_budget=budget)
        eng.generate(image, prompt, max_new_tokens=4)            # warm-up (first-call allocations)
        eng.cache.clear()
        gen = eng.generate(image, prompt, max_new_tokens=16)
        results.append({"budget": budget, "text": gen.text, "token_ids": gen.token_ids, "stats": gen.stats})
        if not as_json:
            out.print(f"\n[bold]expert budget {budget}[/bold]  answer: {gen.text!r}")
            out.print(stats_table(gen.stats, title=f"offload statistics, budget {budget}"))
    same = len({tuple(r["token_ids"]) for r in results}) == 1
    if as_json:
        print(json.dumps({"model": model_dir, "routing": routing, "results": results, "identical_tokens": same}))
    else:
        out.print(f"\nsame tokens at every budget: [bold]{same}[/bold]")
    return 0 if same else 1
