"""Sampling: temperature 0 is the argmax, top-k and top-p cut the support, a seed repeats, bad values are refused."""

import pytest
import torch

from vismmoe.errors import UserError
from vismmoe.sampling import SamplingParams, Sampler


def _logits(B=3, V=50, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_the_argmax():
    x = _logits()
    assert torch.equal(Sampler([SamplingParams()] * 3).pick(x), x.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_the_argmax():
    x = _logits()
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-4)):
        picks = {tuple(Sampler([p] * 3).pick(x).tolist()) for _ in range(20)}
        assert picks == {tuple(x.argmax(-1).tolist())}


def test_seed_repeats_and_rows_are_independent():
    x = _logits(B=2, V=1000)
    p = SamplingParams(temperature=1.0, seed=7)

    def draw(params):
        s = Sampler(params)
        return [s.pick(x.clone()).tolist() for _ in range(30)]

    a, b = draw([p, p]), draw([p, p])
    assert a == b
    alone = Sampler([p])
    # row 1 of the batch draws what the same request draws alone (its own generator)
    assert [r[1] for r in a] == [alone.pick(x[1:].clone()).tolist()[0] for _ in range(30)]
    other = draw([SamplingParams(temperature=1.0, seed=8)] * 2)
    assert other != a


def test_top_k_and_top_p_limit_the_support():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    x = probs.log()[None]
    k = Sampler([SamplingParams(temperature=1.0, top_k=3, seed=1)])
    assert {k.pick(x).item() for _ in range(300)} == {0, 1, 2}
    # top_p 0.6: 0.4 < 0.6, 0.4 + 0.25 >= 0.6: tokens 0 and 1
    p = Sampler([SamplingParams(temperature=1.0, top_p=0.6, seed=1)])
    assert {p.pick(x).item() for _ in range(300)} == {0, 1}
    full = Sampler([SamplingParams(temperature=1.0, seed=1)])
    assert len({full.pick(x).item() for _ in range(600)}) == 6


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=2.5), dict(temperature=float("nan")),
                                dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=1.5),
                                dict(seed=-3)])
def test_bad_values_are_one_line_errors(kw):
    with pytest.raises(UserError) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)
