"""Stacked sibling projections in the fast step (step/fused_proj.py): a stand-in returns its own projection of its
own input whatever the order and inputs of its siblings; the siblings' weights become views of one tensor (no
byte held twice) and come back as modules after the body; what cannot be stacked is left alone; the fast step
with stacking gives the eager step's greedy tokens for every family at every budget, with one product per group
a step; `--fuse-projections` is checked; on the GPU (-m gpu) the compiled, captured step with and without stacking
gives the same tokens and logits within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.families import get_family
from vismmoe.step import fused_proj
from vismmoe.step.fused_proj import StackedLinear, stack, stacked_of

from .conftest import FAMILIES, MORE_FAMILIES, TEXT_FAMILIES


class _Attn(nn.Module):
    def __init__(self, bias: bool, widths=(32, 8, 8), H: int = 16):
        super().__init__()
        for name, w in zip(("q_proj", "k_proj", "v_proj"), widths):
            setattr(self, name, nn.Linear(H, w, bias=bias))


@pytest.mark.parametrize("bias", [False, True])
def test_stand_ins_return_their_own_projection_in_any_order(bias):
    torch.manual_seed(0)
    m = _Attn(bias)
    originals = {n: (getattr(m, n), getattr(m, n).weight.detach().clone(),
                     None if not bias else getattr(m, n).bias.detach().clone()) for n in ("q_proj", "k_proj", "v_proj")}
    st = stack(m)
    assert len(st) == 1
    group = st.groups[0]
    for n, (mod, w, b) in originals.items():          # the same parameter objects, now views of the stacked tensor
        assert getattr(m, n) is mod and torch.equal(mod.weight, w)
        assert group.weight.untyped_storage().data_ptr() == mod.weight.untyped_storage().data_ptr()
        if bias:
            assert torch.equal(mod.bias, b)
    x, y = torch.randn(3, 1, 16), torch.randn(3, 1, 16)
    with st.swapped():
        assert all(isinstance(getattr(m, n), StackedLinear) for n in originals)
        got = {"v_proj": m.v_proj(x), "q_proj": m.q_proj(x), "k_proj": m.k_proj(y)}    # any order, another input
        assert group.x is y
    for n, out in got.items():
        _, w, b = originals[n]
        torch.testing.assert_close(out, F.linear(y if n == "k_proj" else x, w, b), rtol=1e-6, atol=1e-6)
    assert all(getattr(m, n) is originals[n][0] for n in originals) and group.x is None and group.y is None


def test_stacked_once_and_one_product_per_input(monkeypatch):
    m = _Attn(False)
    st = stacked_of(m)
    assert stacked_of(m) is st
    calls = []
    real = F.linear
    x = torch.randn(2, 1, 16)
    with st.swapped():
        monkeypatch.setattr(fused_proj.F, "linear", lambda *a: calls.append(1) or real(*a))
        m.q_proj(x), m.k_proj(x), m.v_proj(x)
        monkeypatch.undo()
    assert len(calls) == 1


def test_what_cannot_be_stacked_is_left_alone():
    class Sub(nn.Linear):
        pass
    mixed_bias = _Attn(False)
    mixed_bias.k_proj = nn.Linear(16, 8, bias=True)
    widths = _Attn(False)
    widths.v_proj = nn.Linear(12, 8, bias=False)
    sub = _Attn(False)
    sub.q_proj = Sub(16, 32)
    lone = nn.Module()
    lone.q_proj = nn.Linear(16, 32)
    for m in (mixed_bias, widths, sub, lone):          # every present sibling must fit, else none is stacked
        w = {n: p.detach().clone() for n, p in m.named_parameters()}
        assert len(stack(m)) == 0
        assert all(torch.equal(p, w[n]) for n, p in m.named_parameters())
    ok = _Attn(False)
    del ok.v_proj                                      # two of three present (Gemma 4's k = v layers) still stack
    st = stack(ok)
    assert len(st) == 1 and [n for n, _, _ in st.entries[0][1]] == ["q_proj", "k_proj"]


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES + TEXT_FAMILIES)
def test_fast_step_with_stacked_projections_gives_the_eager_tokens(family, tiny_dirs, image_file, monkeypatch):
    d = tiny_dirs[family]
    image = image_file if get_family(family).has_vision else None
    prompt, new = "What is in the picture?", 8
    want = load(d, decode="eager").generate(image, prompt, max_new_tokens=new).token_ids
    products = []
    forward = StackedLinear.forward

    def counted(self, x):
        products.append(self.group.x is not x)
        return forward(self, x)
    monkeypatch.setattr(StackedLinear, "forward", counted)
    base = load(d, decode="fast", fuse_projections=True)
    for budget in ("100%", str(base.geometry.top_k * base.layout.nbytes)):
        eng = base.fork(expert_budget=budget, policy="lru")
        products.clear()
        assert eng.generate(image, prompt, max_new_tokens=new).token_ids == want, (family, budget)
        groups = len(eng.fast_step().sg.stacked)
        assert groups > 0 and sum(products) == groups * (new - 1), (family, sum(products), groups)
        assert len(products) > sum(products)           # siblings sliced the kept product
    assert load(d, decode="fast").fast_step().sg.stacked is None           # auto: CUDA only


def test_fuse_projections_flag_is_checked(capsys):
    assert main(["generate", "--prompt", "hi", "--fuse-projections", "yes"]) == 2
    err = capsys.readouterr().err
    assert "--fuse-projections" in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_gpu_stacked_projections_match_separate_ones(family, tiny_dirs, image_file):
    """bf16, compiled, graphs: the same tokens as separate products and the first step's logits within bf16
    rounding; exactness across budgets of the stacked step: test_fast_step.py / test_fast_step_families.py (auto
    stacks on CUDA)."""
    d = tiny_dirs[family]
    image = image_file if get_family(family).has_vision else None
    out = {}
    for fuse in (False, True):
        eng = load(d, device="cuda", dtype="bfloat16", decode="fast", fuse_projections=fuse)
        gen = eng.generate(image, "What is in the picture?", max_new_tokens=8)
        b = next(iter(eng.fast_step().sg.buckets.values()))
        out[fuse] = (gen.token_ids, b.logits[0].float().cpu())
        assert (eng.fast_step().sg.stacked is not None) == fuse
    assert out[True][0] == out[False][0]
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0.05, atol=0.05)
