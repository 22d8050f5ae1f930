"""Sampling: temperature 0 is the argmax, top-k and top-p cut the support, a seed repeats, bad values are refused,
values in range too small for float32 still give the argmax, and a row whose logits hold NaN/Inf fails alone."""

import pytest
import torch

from vismmoe.errors import UserError
from vismmoe.engine.sampling import NonFiniteLogits, SamplingParams, Sampler


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


@pytest.mark.parametrize("kw", [dict(temperature=1e-30), dict(temperature=1e-45), dict(temperature=5e-324),
                                dict(temperature=1.0, top_p=1e-45), dict(temperature=1.0, top_p=5e-324),
                                dict(temperature=1e-300, top_p=1e-300, top_k=3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_below_float32_still_sample(kw, dtype):
    """A temperature or top_p in range but under float32's smallest number leaves the argmax (the distribution
    such a value asks for), never NaN or an empty distribution."""
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randperm(200, generator=g) for _ in range(3)]).to(dtype) / 8   # distinct in every dtype
    s = Sampler([SamplingParams(**kw, seed=r) for r in range(3)])
    for _ in range(3):
        assert torch.equal(s.pick(x.clone()), x.argmax(-1))
    assert not s.errors


def test_tiny_temperature_draws_among_exact_ties():
    x = torch.tensor([[1.0, 5.0, 5.0, 2.0]])
    s = Sampler([SamplingParams(temperature=1e-40, seed=0)])
    assert {s.pick(x).item() for _ in range(60)} == {1, 2}


def test_a_row_with_nan_or_inf_logits_fails_alone():
    x = _logits(B=4, V=30)
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")
    x[3] = float("-inf")
    params = [SamplingParams(temperature=0.7, seed=1)] * 4
    s = Sampler(params)
    picked = s.pick(x.clone())
    assert sorted(s.errors) == [1, 2, 3] and all(isinstance(e, NonFiniteLogits) for e in s.errors.values())
    assert "\n" not in str(s.errors[1]) and "NaN" in str(s.errors[1])
    alone = Sampler(params[:1]).pick(x[:1].clone())
    assert picked[0] == alone[0]                        # the good row draws what it draws alone
    assert 0 <= int(picked.min()) and int(picked.max()) < 30
