"""The bench's physical bounds (bench/bound.py): the prefill's share of a trace and the phased bound."""

from __future__ import annotations

import numpy as np
import pytest

from vismmoe.bench.bound import access_groups, belady_misses, phased, prefill_calls
from vismmoe.offload.trace import RoutingTrace


def _trace(steps):
    tr = RoutingTrace()
    for kind, layers in steps:
        tr.begin_step(kind, None, 1)
        for layer, experts in layers.items():
            tr.steps[-1]["layers"][layer] = (np.array([experts], dtype=np.int16), None)
    return tr


def test_prefill_calls_count_the_leading_prefill_layers():
    tr = _trace([("prefill", {0: [0, 1], 1: [2, 3]}), ("decode", {0: [0, 4], 1: [2, 5]}), ("decode", {0: [1, 2]})])
    groups = access_groups(tr)
    n = prefill_calls(tr)
    assert n == 2 and groups[:n] == [{(0, 0), (0, 1)}, {(1, 2), (1, 3)}]
    # a cold cache of 2 slots: the prefill alone must load its 4 experts; the whole trace needs more
    assert belady_misses(groups[:n], 2) == 4 < belady_misses(groups, 2)


@pytest.mark.parametrize("compute, prefill_compute, nbytes, prefill_bytes, want", [
    (10.0, 4.0, 5e9, 4e9, 10.0),        # compute-bound everywhere: the plain bound
    (10.0, 4.0, 30e9, 8e9, 30.0),       # the link dominates the whole request
    (10.0, 4.0, 15e9, 12e9, 18.0),      # the prefill waits for its bytes (12 s), then decode computes (6 s)
])
def test_phased_bound(compute, prefill_compute, nbytes, prefill_bytes, want):
    got = phased(compute, prefill_compute, nbytes, prefill_bytes, gbps=1.0)
    assert got == pytest.approx(want)
    assert got >= max(compute, nbytes / 1e9)
