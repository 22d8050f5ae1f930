"""VQA accuracy of a loaded engine on the synthetic scenes, next to a per-type majority baseline.

`evaluate(engine, split="test", limit=None)` answers the first `limit` samples of a split (`balanced_subset`,
so question types are balanced; each batch's scenes are made when it runs and dropped after it, so memory stays
flat at any limit) through the inference engine itself (`engine.generate_batch`, greedy, 4 new
tokens) and scores exact match after lower-casing and stripping. The majority baseline answers every question
of a type with that type's most common answer in the TRAIN split (`majority_answers`, from its first 3000
samples), so "accuracy above the baseline" means the model looks at the image.

This module owns scoring only: loading belongs to the engine, the data to `vismmoe.data`, training to
`vismmoe.tools.train`. `python -m vismmoe.tools.evaluate --model DIR` prints the result (one JSON object with `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from functools import lru_cache

from ..data import QTYPES, balanced_subset, make_sample

DEFAULT_LIMIT = 1200           # samples evaluated when no limit is given (200 per question type)
MAJORITY_SAMPLES = 3000


def normalize(text: str) -> str:
    return text.strip().lower()


def _answer_and_type(index: int) -> tuple[str, str]:
    s = make_sample("train", index)
    return s.qtype, normalize(s.answer)


@lru_cache(maxsize=8)
def majority_answers(n: int = MAJORITY_SAMPLES, processes: int | None = None) -> dict[str, str]:
    """{qtype: most common answer of that type among the first n TRAIN samples} (ties: alphabetical)."""
    processes = processes if processes is not None else min(8, os.cpu_count() or 1)
    if processes > 1 and n >= 300:
        from ..data import fork_pool, warm_cache
        warm_cache()
        with fork_pool(processes) as pool:
            pairs = pool.map(_answer_and_type, range(n), chunksize=max(1, n // (4 * processes)))
    else:
        pairs = [_answer_and_type(i) for i in range(n)]
    counts: dict[str, Counter] = {q: Counter() for q in QTYPES}
    for qtype, answer in pairs:
        counts[qtype][answer] += 1
    return {q: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for q, c in counts.items() if c}


def evaluate(engine, split: str = "test", limit: int | None = None, batch_size: int = 16, progress: bool = True,
             max_new_tokens: int = 4, majority_samples: int = MAJORITY_SAMPLES, photos: float = 0.0,
             side: int | None = None) -> dict:
    """Exact-match accuracy (overall and per question type) of `engine` on a split, plus the majority baseline.
    `photos`: the share of questions on photograph backgrounds (`data.make_sample_and_scene`; same questions);
    `side`: the scenes resized to that many pixels a side (`data.scenes.at_side`; None: their own 448).

    Returns {"accuracy", "n", "by_type", "majority_baseline", "majority_by_type", "majority_answers", "split",
    "photo_backgrounds", "image_side", "seconds", "samples_per_s", "errors"} (errors: up to 20 wrong answers, for a look).
    """
    n = DEFAULT_LIMIT if limit is None else int(limit)
    if n < 1:
        raise ValueError("limit must be at least 1")
    samples = balanced_subset(split, n, photos, side)
    majority = majority_answers(majority_samples)
    right: Counter = Counter()
    base: Counter = Counter()
    seen: Counter = Counter()
    errors = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(samples), desc=f"eval {split}", dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i:i + batch_size])       # made now, dropped after the batch: memory stays flat
        gens = engine.generate_batch([s.image for s in chunk], [s.question for s in chunk],
                                     max_new_tokens=max_new_tokens)
        for s, g in zip(chunk, gens):
            pred, gold = normalize(g.text), normalize(s.answer)
            seen[s.qtype] += 1
            right[s.qtype] += int(pred == gold)
            base[s.qtype] += int(majority.get(s.qtype) == gold)
            if pred != gold and len(errors) < 20:
                errors.append({"index": s.index, "qtype": s.qtype, "question": s.question, "answer": gold,
                               "predicted": pred})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    total = sum(seen.values())
    return {
        "accuracy": sum(right.values()) / total,
        "n": total,
        "by_type": {q: right[q] / seen[q] for q in QTYPES if seen[q]},
        "majority_baseline": sum(base.values()) / total,
        "majority_by_type": {q: base[q] / seen[q] for q in QTYPES if seen[q]},
        "majority_answers": majority,
        "split": split,
        "photo_backgrounds": photos,
        "image_side": side,
        "seconds": seconds,
        "samples_per_s": total / max(seconds, 1e-9),
        "errors": errors,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vismmoe.tools.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=None, help=f"first N samples (default {DEFAULT_LIMIT})")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--expert-budget", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from ..engine.loading import load
    engine = load(args.model, device=args.device, dtype=args.dtype, expert_budget=args.expert_budget)
    res = evaluate(engine, split=args.split, limit=args.limit, batch_size=args.batch_size,
                   progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.split}: accuracy {res['accuracy']:.3f} on {res['n']} "
              f"(majority baseline {res['majority_baseline']:.3f}), {res['samples_per_s']:.1f} samples/s")
        for q in res["by_type"]:
            print(f"  {q:9s} {res['by_type'][q]:.3f}  (majority {res['majority_by_type'][q]:.3f} "
                  f"'{res['majority_answers'].get(q)}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
