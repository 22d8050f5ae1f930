"""Every registered policy, predictor and compressor, and the routing observers, meet their declared protocols."""

from __future__ import annotations

import pytest

from vismmoe import load
from vismmoe.compress import COMPRESSORS, make_compressor
from vismmoe.policies import POLICIES, make_policy
from vismmoe.protocols import Compressor, EvictionPolicy, Predictor, RoutingObserver, StepObserver
from vismmoe.trace import RoutingTrace


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_meet_the_protocol(name):
    policy = make_policy(name, moe_layers=(0, 1), num_experts=4, future=[{(0, 1)}, {(1, 2)}])
    assert isinstance(policy, EvictionPolicy)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compressors_meet_the_protocol(name):
    assert isinstance(make_compressor(name), Compressor)


def test_predictors_and_observers_meet_their_protocols(tiny_dirs, tmp_path):
    from vismmoe.calibrate import calibrate, default_samples
    eng = load(tiny_dirs["qwen3_vl_moe"])
    tables, _ = calibrate(eng, default_samples(3), depth=2, max_new_tokens=2)
    path = str(tmp_path / "t.npz")
    tables.save(path)
    for name in ("gate", "trace", "blend"):
        e = load(tiny_dirs["qwen3_vl_moe"], prefetch=name, calibration=path)
        assert isinstance(e.runtime.prefetcher.predictor, Predictor)
        assert isinstance(e.runtime.prefetcher, RoutingObserver)
    trace = RoutingTrace()
    assert isinstance(trace, StepObserver)
    eng.record_trace(trace)
    assert eng.step_observers == [trace] and trace in eng.runtime.observers
    eng.record_trace(None)
    assert eng.step_observers == [] and trace not in eng.runtime.observers
