"""The fast step's fused kernels (`--fuse-kernels`). Stacked sibling projections (step/fused_proj.py): a stand-in
returns its own projection of its own input whatever the order and inputs of its siblings; the siblings' weights
become views of one tensor (no byte held twice) and come back as modules after the body; what cannot be stacked
is left alone. The router's tail in one kernel (step/router_topk.py): the kernel under Triton's interpreter against
the torch reference, and each fused router against the transformers router it stands in for. The fast step with
both gives the eager step's greedy tokens for every family at every budget, with one product per group a step;
`--fuse-kernels` is checked; on the GPU (-m gpu) the compiled, captured step with and without them gives the same
tokens and logits within bf16 rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.families import get_family
from vismmoe.step import fused_proj
from vismmoe.step import moe_kernel, router_topk
from vismmoe.step.fused_proj import StackedLinear, stack, stacked_of

from .conftest import FAMILIES, INTERPRETER, MORE_FAMILIES, TEXT_FAMILIES


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
    assert len(st) == 3
    group = st.entries[0][3].group
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
    assert [n for _, n, _, _ in st.entries] == ["q_proj", "k_proj"]


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES + TEXT_FAMILIES)
def test_fast_step_with_stacked_projections_gives_the_eager_tokens(family, tiny_dirs, image_file, monkeypatch):
    d = tiny_dirs[family]
    image = image_file if get_family(family).has_vision else None
    prompt, new = "What is in the picture?", 8
    want = load(d, decode="eager").generate(image, prompt, max_new_tokens=new).token_ids
    products, routed = [], []
    forward, route = StackedLinear.forward, router_topk.FusedRouter.forward

    def counted(self, x):
        products.append(self.group.x is not x)
        return forward(self, x)

    def counted_router(self, h):
        routed.append(1)
        return route(self, h)
    monkeypatch.setattr(StackedLinear, "forward", counted)
    monkeypatch.setattr(router_topk.FusedRouter, "forward", counted_router)
    base = load(d, decode="fast", fuse_kernels=True)
    for budget in ("100%", str(base.geometry.top_k * base.layout.nbytes)):
        eng = base.fork(expert_budget=budget, policy="lru")
        products.clear()
        routed.clear()
        assert eng.generate(image, prompt, max_new_tokens=new).token_ids == want, (family, budget)
        fused_routers = sum(isinstance(s, router_topk.FusedRouter) for _, _, _, s in eng.fast_step().sg.stand_ins.entries)
        assert len(routed) == fused_routers * (new - 1)     # every router of the kernel's form, every step
        assert (fused_routers > 0) == (family in ("qwen3_vl_moe", "internvl", "qwen3_5_moe", "deepseek_ocr2",
                                                  "qwen3_moe")), family
        groups = len({id(s.group) for _, _, _, s in eng.fast_step().sg.stand_ins.entries
                      if isinstance(s, StackedLinear)})
        assert groups > 0 and sum(products) == groups * (new - 1), (family, sum(products), groups)
        assert len(products) > sum(products)           # siblings sliced the kept product
    assert load(d, decode="fast").fast_step().sg.stand_ins is None         # auto: CUDA only


def test_fuse_kernels_flag_is_checked(capsys):
    assert main(["generate", "--prompt", "hi", "--fuse-kernels", "yes"]) == 2
    err = capsys.readouterr().err
    assert "--fuse-kernels" in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_gpu_fused_kernels_match_transformers_ops(family, tiny_dirs, image_file):
    """bf16, compiled, graphs: the same tokens as separate products and the first step's logits within bf16
    rounding; exactness across budgets of the stacked step: test_fast_step.py / test_fast_step_families.py (auto
    stacks on CUDA)."""
    d = tiny_dirs[family]
    image = image_file if get_family(family).has_vision else None
    out = {}
    for fuse in (False, True):
        eng = load(d, device="cuda", dtype="bfloat16", decode="fast", fuse_kernels=fuse)
        gen = eng.generate(image, "What is in the picture?", max_new_tokens=8)
        b = next(iter(eng.fast_step().sg.buckets.values()))
        out[fuse] = (gen.token_ids, b.logits[0].float().cpu())
        assert (eng.fast_step().sg.stand_ins is not None) == fuse
    assert out[True][0] == out[False][0]
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0.05, atol=0.05)


@INTERPRETER
@pytest.mark.parametrize("E,k,renorm,scale", [(8, 2, True, 1.0), (128, 8, True, 1.0), (64, 8, False, 1.0),
                                               (64, 4, False, 2.5), (100, 16, True, 1.0), (8, 1, False, 1.0),
                                               (64, 6, False, 2.5), (160, 6, True, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_topk_kernel_against_the_reference(E, k, renorm, scale, dtype):
    g = torch.Generator().manual_seed(E + k)
    logits = (torch.randn(5, E, generator=g) * 3).to(dtype)
    logits[4] = logits[4, 0]                              # a row of ties: the lower ids first
    w, idx = router_topk.softmax_topk_triton(logits, k, renorm, scale)
    rw, ridx = router_topk.reference(logits, k, renorm, scale)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)   # the same weights, in descending order
    probs = torch.softmax(logits.float(), -1)
    for t in range(5):                                        # a top-k: no expert left out is more likely
        out = torch.ones(E, dtype=torch.bool)
        out[idx[t]] = False
        assert len(set(idx[t].tolist())) == k and (not out.any() or probs[t, idx[t]].min() >= probs[t, out].max())
        order = [(-probs[t, i].item(), i) for i in idx[t].tolist()]
        assert order == sorted(order)                         # by weight, ties to the lower id
    assert idx[4].tolist() == list(range(k))
    distinct = [t for t in range(4) if len(set(probs[t].tolist())) == E]
    assert torch.equal(idx[distinct], ridx[distinct])         # without ties, torch's very order
    assert router_topk.softmax_topk_triton(logits[:0], k, renorm, scale)[0].shape == (0, k)


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_moe", "qwen3_5_moe", "internvl", "deepseek_ocr2"])
def test_fused_router_returns_what_the_router_returns(family, tiny_dirs, monkeypatch):
    """Each router of the forms the kernel knows, against itself: the same logits (bit for bit), the same experts,
    weights within float32 rounding in the router's own dtype; through the torch reference and, under the
    interpreter, through the kernel."""
    eng = load(tiny_dirs[family])
    si = router_topk.router_stand_ins(eng.model, eng.family, eng.geometry.moe_layers)
    assert len(si) == len(eng.geometry.moe_layers)
    h = torch.randn(6, eng.geometry.hidden, generator=torch.Generator().manual_seed(3))
    impls = [router_topk.reference] + ([router_topk.softmax_topk_triton] if moe_kernel.INTERPRETED else [])
    by_expert = lambda out: (out[2].sort(-1).values, out[1].gather(-1, out[2].argsort(-1)))  # noqa: E731
    for _, _, router, fused in si.entries:
        want = router(h)
        for impl in impls:
            monkeypatch.setattr(router_topk, "softmax_topk", impl)
            got = fused(h)
            assert torch.equal(got[0], want[0]) and got[1].dtype == want[1].dtype
            (gi, gw), (wi, ww) = by_expert(got), by_expert(want)
            assert torch.equal(gi, wi), (family, impl)
            torch.testing.assert_close(gw, ww, rtol=1e-6, atol=1e-7)
    r = eng.family.router(eng.model, eng.geometry.moe_layers[0])
    if family == "deepseek_ocr2":
        monkeypatch.setattr(r, "topk_method", "group_limited_greedy")
        assert router_topk.form_of(r) is None
    monkeypatch.setattr(r, "top_k", router_topk.MAX_K + 1)     # more rounds than the kernel unrolls: transformers'
    assert router_topk.form_of(r) is None


@pytest.mark.gpu
@pytest.mark.parametrize("E,k,renorm,scale", [(128, 8, True, 1.0), (64, 6, False, 2.5), (256, 8, True, 1.0)])
def test_gpu_softmax_topk_kernel_against_the_reference(E, k, renorm, scale):
    logits = (torch.randn(64, E, generator=torch.Generator().manual_seed(E)) * 3).to("cuda", torch.bfloat16)
    w, idx = router_topk.softmax_topk(logits, k, renorm, scale)
    rw, ridx = router_topk.reference(logits, k, renorm, scale)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
    probs = torch.softmax(logits.float(), -1)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)
    assert chosen.sum(1).eq(k).all()                    # k distinct experts a row, none less likely than one left out
    assert (probs.masked_fill(~chosen, 2).min(1).values >= probs.masked_fill(chosen, -1).max(1).values).all()
    same = idx.sort(-1).values.eq(ridx.sort(-1).values).all(1)
    assert same.float().mean() > 0.9                    # torch's own choice but for bf16 ties at the k-th place


def test_one_compile_serves_every_layer_and_run():
    """torch.compile over the stand-ins: one graph for every layer, run after run, when the groups are forgotten
    before each run (StandIns.reset, as the decode body does); the stacked product once a layer."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    class Layer(_Attn):
        def forward(self, h):
            return self.q_proj(h)[..., :8] * self.k_proj(h) + self.v_proj(h)

    torch.manual_seed(0)
    layers = [Layer(False) for _ in range(3)]
    parent = nn.ModuleList(layers)
    want = [m(torch.ones(2, 1, 16)) for m in layers]
    st = stack(parent)
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(sum(n.target is F.linear for n in gm.graph.nodes))
        return gm
    call = torch.compile(lambda m, h: m(h), backend=backend, dynamic=False)
    with torch.no_grad(), st.swapped():
        for _ in range(3):
            st.reset()
            for m, w in zip(layers, want):
                torch.testing.assert_close(call(m, torch.ones(2, 1, 16)), w, rtol=1e-5, atol=1e-6)
    assert graphs == [1], graphs
