"""Compressor knobs (`name:knob=value`): every knob of every compressor is finite and in range, or a one-line
UserError; `affinity:lam=nan`, `affinity:gamma=inf` and `dart:pivots=-4` used to be taken and degenerate."""

from __future__ import annotations

import inspect

import pytest

from vismmoe.engine.compress import COMPRESSORS, make_compressor
from vismmoe.errors import UserError

KNOBS = [(name, key) for name, cls in COMPRESSORS.items() for key in getattr(cls, "knobs", {})]


def test_every_constructor_argument_is_a_declared_knob():
    for name, cls in COMPRESSORS.items():
        args = set(inspect.signature(cls).parameters)
        assert args == set(getattr(cls, "knobs", {})), name


def test_the_documented_knobs_are_there():
    assert {("affinity", "lam"), ("affinity", "gamma"), ("dart", "pivots")} <= set(KNOBS)


@pytest.mark.parametrize("name, key", KNOBS)
def test_bad_values_are_one_line_errors(name, key):
    knob = COMPRESSORS[name].knobs[key]
    bad = ["nan", "inf", "-inf", "x", "", str(knob.low - 1), "1e999"] + (["2.5"] if knob.whole else [])
    for value in bad:
        with pytest.raises(UserError, match="bad compressor knob") as e:
            make_compressor(f"{name}:{key}={value}")
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, key", KNOBS)
def test_legal_values_reach_the_compressor(name, key):
    knob = COMPRESSORS[name].knobs[key]
    for value in (knob.low, knob.low + 3):
        comp = make_compressor(f"{name}:{key}={value:g}")
        assert getattr(comp, key) == value and type(getattr(comp, key)) is (int if knob.whole else float)


def test_unknown_and_repeated_knobs():
    with pytest.raises(UserError, match="has no knob 'seed'"):
        make_compressor("random:seed=1")
    with pytest.raises(UserError, match="has no knob 'pivots'"):
        make_compressor("affinity:pivots=3")
    with pytest.raises(UserError, match="given twice"):
        make_compressor("affinity:lam=1,lam=2")
