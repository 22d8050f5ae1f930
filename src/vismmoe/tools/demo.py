"""`vismmoe demo`: the main job on the shipped default model, on the CPU in well under a minute.

The default model is the bundled trained VQA model (checkpoints/vqa-moe, a Qwen3-VL-MoE-class model with learned
routing). The demo asks it one question of each type about test-split scenes, first with every expert resident
and then with the experts offloaded under a 25% budget, and prints the questions, the model's answers, the true
answers and the offload statistics of each budget. Without the bundled model (a stripped install) it falls back
to a tiny random checkpoint, whose answers are noise.
"""

from __future__ import annotations

import json

from ..checkpoints import BUNDLED, default_model
from ..report import console, stats_table

DEMO_BUDGETS = ("100%", "25%")


def _questions(n: int) -> list[tuple]:
    from ..data import balanced_subset
    return [(x.image, x.question, x.answer, x.qtype) for x in balanced_subset("test", n)]


def run_demo(device: str = "cpu", as_json: bool = False) -> int:
    from rich.table import Table

    from ..engine.loading import _resolve_device, load
    _resolve_device(device)                     # a device it cannot use is refused before any output
    out = console()
    model_dir, routing = default_model()
    trained = model_dir == BUNDLED
    if trained:
        questions = _questions(6)
    else:
        import matplotlib.cbook
        questions = [(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
                      "What is in the picture?", None, "open")]
    if not as_json:
        out.print(f"[bold]model[/bold] {model_dir}  ([italic]{routing}[/italic])")
    results = []
    for budget in DEMO_BUDGETS:
        eng = load(model_dir, device=device, expert_budget=budget)
        eng.generate(questions[0][0], questions[0][1], max_new_tokens=2)   # warm-up (first-call allocations)
        eng.cache.clear()
        before = eng._snapshot()
        answers = []
        for image, q, truth, qtype in questions:
            gen = eng.generate(image, q, max_new_tokens=4 if trained else 12)
            answers.append({"qtype": qtype, "question": q, "answer": gen.text, "truth": truth,
                            "token_ids": gen.token_ids, "ttft_s": gen.stats["ttft_s"], "e2e_s": gen.stats["e2e_s"]})
        ttft = sum(a["ttft_s"] for a in answers)
        e2e = sum(a["e2e_s"] for a in answers)
        stats = eng._request_stats(before, ttft=ttft, decode_s=e2e - ttft,
                                   steps=sum(len(a["token_ids"]) - 1 for a in answers), e2e=e2e,
                                   visual=gen.stats["visual_tokens"])
        results.append({"budget": budget, "answers": answers, "stats": stats})
        if not as_json:
            t = Table(title=f"expert budget {budget}", show_header=True, header_style="bold")
            for col in ("type", "question", "model", "truth"):
                t.add_column(col)
            for a in answers:
                ok = a["truth"] is None or a["answer"].strip().lower() == a["truth"]
                t.add_row(a["qtype"], a["question"], ("" if ok else "[red]") + a["answer"], a["truth"] or "-")
            out.print(t)
            out.print(stats_table(stats, title=f"offload statistics over {len(answers)} questions, budget {budget}",
                                  requests=len(answers)))
    same = len({tuple(tuple(a["token_ids"]) for a in r["answers"]) for r in results}) == 1
    if as_json:
        print(json.dumps({"model": model_dir, "routing": routing, "results": results, "identical_tokens": same}))
    else:
        out.print(f"same answers at every budget (offloading is lossless): [bold]{same}[/bold]")
    return 0 if same else 1
