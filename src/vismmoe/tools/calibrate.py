"""`vismmoe calibrate`: transition tables for the trace and blend predictors, and how well each predictor does.

    samples (image, prompt), in three disjoint thirds:
      build: run with a routing trace -> TransitionTables (depth 1..D)
      fit:   gate and trace probes -> mixing weight per depth and layer from their recalls there
             (alpha = rg^8 / (rg^8 + rt^8): the better predictor of that layer and depth dominates)
      test:  one PredictorProbe per predictor (gate, trace, blend) -> precision / recall per depth,
             prefill vs decode, on samples neither the tables nor alpha have seen
    tables + alpha -> one .npz file (--calibration FILE for generate/bench)

Default samples are the validation split of the bundled VQA scenes (never the test split).
"""

from __future__ import annotations

import numpy as np

from ..offload.predict import BlendPredictor, PredictorProbe, TracePredictor, TransitionTables, gate_predictor
from ..offload.trace import RoutingTrace


SHARP = 8.0        # alpha = rg^8 / (rg^8 + rt^8): a 10% better recall gets about 70% of the weight


def default_samples(n: int):
    """(image, question) of the first `n` validation samples, made as they are read (memory stays flat)."""
    from ..data import make_sample
    from ..data.scenes import LazySeq

    def pair(i: int) -> tuple:
        s = make_sample("val", i)
        return s.image, s.question
    return LazySeq(n, pair)


def _run(engine, samples, max_new_tokens: int, progress=None) -> None:
    for image, prompt in samples:
        engine.generate(image, prompt, max_new_tokens=max_new_tokens)
        if progress:
            progress()


def _probe(engine, predictors: dict, samples, depth, max_new_tokens, progress) -> dict:
    geo = engine.geometry
    probes = {name: PredictorProbe(p, geo.moe_layers, geo.top_k, depth) for name, p in predictors.items()}
    for p in probes.values():
        engine.add_observer(p)
    try:
        _run(engine, samples, max_new_tokens, progress)
    finally:
        for p in probes.values():
            engine.remove_observer(p)
    return probes


def calibrate(engine, samples: list[tuple], depth: int = 3, max_new_tokens: int = 8, progress=None) -> tuple:
    """(TransitionTables with alpha, rows of predictor quality on the test third)."""
    geo = engine.geometry
    n = len(samples)
    if n < 3:
        raise ValueError("calibration needs at least 3 samples")
    build, fit, test = samples[: n // 3], samples[n // 3: 2 * n // 3], samples[2 * n // 3:]
    trace = RoutingTrace()
    engine.record_trace(trace)
    _run(engine, build, max_new_tokens, progress)
    engine.record_trace(None)
    tables = TransitionTables.from_traces([trace], geo.moe_layers, geo.num_experts, depth)

    def gate():
        return gate_predictor(engine, depth)

    probes = _probe(engine, {"gate": gate(), "trace": TracePredictor(tables, geo.moe_layers, depth)}, fit, depth,
                    max_new_tokens, progress)
    alpha = np.full((depth, len(geo.moe_layers)), 0.5)                    # [D, L]: weight of the gate
    for (d, pos), g in probes["gate"].per_layer.items():
        t = probes["trace"].per_layer.get((d, pos))
        rg = g[0] / g[1] if g[1] else 0.0
        rt = t[0] / t[1] if t and t[1] else 0.0
        if rg + rt > 0:                                                    # sharpened: the better one dominates
            alpha[d - 1, pos] = rg ** SHARP / (rg ** SHARP + rt ** SHARP)
    tables.alpha = alpha
    final = {"gate": gate(), "trace": TracePredictor(tables, geo.moe_layers, depth),
             "blend": BlendPredictor(gate(), TracePredictor(tables, geo.moe_layers, depth))}
    probes = _probe(engine, final, test, depth, max_new_tokens, progress)
    rows = [dict(predictor=name, **r) for name, p in probes.items() for r in p.table()]
    return tables, rows
