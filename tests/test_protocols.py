"""Every registered policy, predictor and compressor, and the routing observers, meet their declared protocols."""

from __future__ import annotations

import pytest

from vismmoe import load
from vismmoe.offload.hooks import hook_of
from vismmoe.engine.compress import COMPRESSORS, make_compressor
from vismmoe.offload.policies import POLICIES, make_policy
from vismmoe.protocols import Compressor, EvictionPolicy, Predictor, RoutingObserver, StepObserver
from vismmoe.offload.trace import RoutingTrace


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_meet_the_protocol(name):
    policy = make_policy(name, moe_layers=(0, 1), num_experts=4, future=[{(0, 1)}, {(1, 2)}])
    assert isinstance(policy, EvictionPolicy)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_compressors_meet_the_protocol(name):
    assert isinstance(make_compressor(name), Compressor)


def test_predictors_and_observers_meet_their_protocols(tiny_dirs, tmp_path):
    from vismmoe.tools.calibrate import calibrate, default_samples
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


def test_engine_attach_and_detach(tiny_dirs, image_file):
    """A request runs through its own engine's runtime (forks share the model); detach undoes attach and leaves a
    module attached to another engine alone."""
    eng = load(tiny_dirs["glm4v_moe"], expert_budget="25%")
    other = eng.fork(policy="lfu")
    ex = eng.family.moe_block(eng.model, eng.geometry.moe_layers[0]).experts
    assert hook_of(ex).runtime is other.runtime                     # the newest engine is attached
    eng.generate(image_file, "What is in the picture?", max_new_tokens=3)
    assert hook_of(ex).runtime is eng.runtime
    other.detach()
    assert hook_of(ex).runtime is eng.runtime
    state = other.prefill(other.prepare([image_file], ["What?"]), 3)
    assert hook_of(ex).runtime is other.runtime
    other.decode_one_token(state)
    other.finish(state)
    other.detach()
    assert hook_of(ex) is None


def test_detach_leaves_the_experts_modules_as_they_were(tiny_dirs, image_file):
    """An engine's hooks are the only thing it puts on transformers' experts modules, and detach takes them off
    again (also after a request, whose fast step sets and clears the hook's `fast`)."""
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="50%", decode="fast")
    mods = [eng.family.moe_block(eng.model, layer).experts for layer in eng.geometry.moe_layers]
    eng.detach()
    before = [dict(m.__dict__) for m in mods]
    assert not any(k.startswith("_vismmoe") for d in before for k in d)
    eng.attach()
    assert all(hook_of(m) is eng.hooks[layer] for m, layer in zip(mods, eng.geometry.moe_layers))
    eng.generate(image_file, "What?", max_new_tokens=3)
    assert all(hook_of(m).fast is None for m in mods)
    eng.detach()
    assert [dict(m.__dict__) for m in mods] == before
