"""The bundled trained model: a real transformers checkpoint, inside the size limit, answering like plain
transformers does, with non-uniform learned routing."""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import Qwen3VLMoeForConditionalGeneration

from vismmoe import load
from vismmoe.data import balanced_subset
from vismmoe.checkpoints import BUNDLED
from vismmoe.offload.trace import RoutingTrace, layer_counts


def test_checkpoint_shape_and_size():
    size = sum(os.path.getsize(os.path.join(BUNDLED, f)) for f in os.listdir(BUNDLED))
    assert size <= 64 * 1000**2
    eng = load(BUNDLED)
    geo = eng.geometry
    assert len(geo.moe_layers) >= 8 and geo.num_experts >= 32 and geo.top_k >= 4
    expert_bytes = len(geo.moe_layers) * geo.num_experts * 3 * geo.hidden * geo.inter * 2
    assert expert_bytes > 0.75 * size                                   # experts carry most of the bytes


def test_plain_transformers_gives_the_same_answers():
    ref = Qwen3VLMoeForConditionalGeneration.from_pretrained(BUNDLED, dtype=torch.float32,
                                                             experts_implementation="eager").eval()
    eng = load(BUNDLED, expert_budget="25%")
    for s in balanced_subset("test", 6):
        inputs = eng.prepare([s.image], [s.question])
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=sorted(eng.eos_ids),
                               pad_token_id=eng.tokenizer.pad_token_id)
        want = out[0, inputs["input_ids"].shape[1]:].tolist()
        got = eng.generate(s.image, s.question, max_new_tokens=4).token_ids
        assert got == want[: len(got)]


def test_routing_is_learned_not_uniform_nor_collapsed():
    eng = load(BUNDLED)
    tr = RoutingTrace()
    eng.record_trace(tr)
    for s in balanced_subset("test", 12):
        eng.generate(s.image, s.question, max_new_tokens=2)
    E = eng.geometry.num_experts
    for layer, c in layer_counts(tr, E, modality=1).items():
        p = c / c.sum()
        ent = -(p[p > 0] * np.log2(p[p > 0])).sum()
        assert 1.0 < ent < np.log2(E) - 0.05, (layer, ent)                # neither collapsed nor uniform


def test_bundled_model_ships_its_calibration(tiny_dirs):
    """--prefetch trace / blend work on the bundled model without running calibrate first (its tables ship with
    it and are used by default); a checkpoint without tables still asks for them."""
    import pytest

    from vismmoe.errors import UserError
    s = balanced_subset("test", 1)[0]
    assert load().model_dir == BUNDLED                   # no directory: the bundled model
    for name in ("trace", "blend"):
        eng = load(BUNDLED, prefetch=name, expert_budget="25%", fixed_lookahead=True)
        assert eng.rc.calibration == os.path.join(BUNDLED, "calibration.npz")
        assert eng.generate(s.image, s.question, max_new_tokens=4).stats["prefetch_issued"] > 0
    with pytest.raises(UserError, match="needs a calibration file"):
        load(tiny_dirs["qwen3_vl_moe"], prefetch="blend")
