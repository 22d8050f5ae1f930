"""HQQ-style rounding of int4 groups (formats/hqq.py, `int4:rounding=hqq`, `vismmoe quantize --rounding hqq`):
never a larger reconstruction error than round to nearest, the same blob layout, a written checkpoint that loads
into the blobs of a load-time quantization, and one-line errors for what it cannot do."""

from __future__ import annotations

import pytest
import torch

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.errors import UserError
from vismmoe.formats import make_format
from vismmoe.formats.hqq import hqq_quantize
from vismmoe.formats.int4 import group_quantize


def _err(q, s, z, w, group):
    R, C = w.shape
    r = ((q.float().view(R, -1, group) - z.float()[..., None]) * s.float()[..., None]).view(R, C)
    return (r - w.float()).pow(2).view(R, -1, group).sum(-1)           # [R, ng]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hqq_is_never_worse_than_round_to_nearest_per_group_and_better_overall(sym, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[3, 7], w[10, 200] = 0.9, -0.7                     # outliers: the groups HQQ's sparse norm helps most
    w[5] = -w[5].abs() - 0.01                           # all-negative groups: the zero point stays in [0, 15]
    w = w.to(dtype)
    q0, s0, z0 = group_quantize(w, 32, sym)
    q1, s1, z1 = hqq_quantize(w, 32, sym)
    assert q1.dtype == torch.int8 and int(q1.min()) >= -8 and int(q1.max()) <= 7
    assert s1.dtype == dtype and z1.dtype == torch.int8 and s1.shape == s0.shape == z1.shape
    assert int(z1.min()) >= -8 and int(z1.max()) <= 7
    if sym:
        assert torch.count_nonzero(z1) == 0
    e0, e1 = _err(q0, s0, z0, w, 32), _err(q1, s1, z1, w, 32)
    if dtype == torch.float32:          # per group: round to nearest is where it starts (bf16: compressed-tensors
        assert (e1 <= e0 * (1 + 1e-5) + 1e-12).all()     # divides in bf16, so only the total is compared)
    assert e1.sum() < 0.97 * e0.sum()


def test_rounding_knob_in_the_spec_and_its_errors():
    f = make_format("int4:group=16,rounding=hqq", 64, 48, torch.float32)
    assert f.rounding == "hqq" and f.spec() == "int4:group=16,sym=1,rounding=hqq"
    assert make_format(f.spec(), 64, 48, torch.float32).spec() == f.spec()
    assert make_format("int4:group=16", 64, 48, torch.float32).spec() == "int4:group=16,sym=1"
    for bad in ("int4:group=16,rounding=gptq", "fp8:rounding=hqq"):
        with pytest.raises(UserError) as e:
            make_format(bad, 64, 48, torch.float32)
        assert "\n" not in str(e.value)


def test_hqq_blobs_dequantize_closer_than_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    gu, dn = torch.randn(2, 96, 64, generator=g) * 0.1, torch.randn(2, 64, 48, generator=g) * 0.1
    errs = []
    for spec in ("int4:group=16", "int4:group=16,rounding=hqq"):
        f = make_format(spec, 64, 48, torch.float32)
        b = f.quantize(gu, dn, torch.empty(2, f.numel, dtype=f.pool_dtype))
        g2, d2 = f.dequantize(b)
        errs.append(((g2 - gu).pow(2).sum() + (d2 - dn).pow(2).sum()).item())
    assert errs[1] < errs[0]


def test_hqq_checkpoint_loads_into_the_blobs_of_a_load_time_hqq_quantization(tiny_dirs, tmp_path, capsys):
    d = tiny_dirs["qwen3_vl_moe"]
    out = str(tmp_path / "hqq")
    assert main(["quantize", "--model", d, "--format", "int4:group=16,sym=0", "--rounding", "hqq",
                 "--out", out]) == 0
    capsys.readouterr()
    at_load = load(d, expert_format="int4:group=16,sym=0,rounding=hqq")
    rtn = load(d, expert_format="int4:group=16,sym=0")
    from_file = load(out)
    same = all(torch.equal(a, b) for a, b in zip(at_load.store.buffers, from_file.store.buffers))
    assert same
    assert not all(torch.equal(a, b) for a, b in zip(rtn.store.buffers, from_file.store.buffers))


def test_quantize_rounding_hqq_is_for_int4_only(tiny_dirs, tmp_path, capsys):
    assert main(["quantize", "--model", tiny_dirs["qwen3_vl_moe"], "--format", "fp8", "--rounding", "hqq",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int4 only" in err[0]
    assert not (tmp_path / "x").exists()
