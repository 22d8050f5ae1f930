"""AutoAWQ GEMM checkpoints (formats/awq.py): `vismmoe quantize --layout awq` writes them, and they load into the
int4 blobs whose dequantized weights equal AWQ's own (q - z) * s bit for bit, as an unpacking written here from
AutoAWQ's packing rule computes it; the same quantized values written as compressed-tensors give the same blobs
and greedy tokens, at every budget down to the smallest; everything AWQ-shaped that is not the GEMM layout of
4-bit weights with zero points, or is damaged, is one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.errors import UserError
from vismmoe.formats import awq
from vismmoe.tools.quantize import quantize_checkpoint

from .conftest import FAMILIES, quarter_and_smallest

PROMPT = "What is in the picture?"
NEW = 6
SPEC = "int4:group=16,sym=0"
ATTN = "model.language_model.layers.0.self_attn.q_proj"


def _fp16_copy(src: str, dst: str) -> str:
    """The checkpoint with every float tensor in fp16 (AutoAWQ quantizes fp16 models; both writers then quantize
    the same values)."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.endswith(".safetensors"):
            path = os.path.join(dst, name)
            state = {k: (t.half() if t.is_floating_point() else t) for k, t in load_file(path).items()}
            save_file(state, path, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def dirs(tiny_dirs, tmp_path_factory):
    """family -> {fp16, awq, ct}: the fp16 checkpoint and it written in AWQ's and compressed-tensors' layouts
    (attention quantized too, as the published releases do)."""
    root = tmp_path_factory.mktemp("awq")
    out = {}
    for fam in FAMILIES:
        fp16 = _fp16_copy(tiny_dirs[fam], str(root / f"{fam}-fp16"))
        out[fam] = {"fp16": fp16,
                    "awq": quantize_checkpoint(fp16, "int4:group=16", str(root / f"{fam}-awq"), layout="awq",
                                               all_linears=True)["out"],
                    "ct": quantize_checkpoint(fp16, SPEC, str(root / f"{fam}-ct"), all_linears=True)["out"]}
    return out


# ---- an unpacking of AWQ's GEMM layout written from AutoAWQ's packer, not from formats/awq.py -------------------
PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]      # AutoAWQ WQLinear_GEMM.from_linear: nibble i <- column 8c + order[i]


def _ref_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, W] -> int64 [rows, 8W]: nibble i of word c is column 8c + PACK_ORDER[i]."""
    rows, W = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(rows, 8 * W, dtype=torch.int64)
    for i in range(8):
        out[:, PACK_ORDER[i]::8] = (words >> (4 * i)) & 0xF
    return out


def _ref_dequant(files: dict, name: str, group: int) -> torch.Tensor:
    """AWQ's w = (q - z) * s of linear `name`, as nn.Linear's weight [out, in], float32."""
    q, z = _ref_unpack(files[f"{name}.qweight"]), _ref_unpack(files[f"{name}.qzeros"])
    s = files[f"{name}.scales"].float()
    return ((q - z.repeat_interleave(group, 0)).float() * s.repeat_interleave(group, 0)).t()


def _files(d: str) -> dict:
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for fname in set(index.values()):
        out.update(load_file(os.path.join(d, fname)))
    return out


def test_awq_nibble_order_is_autoawqs():
    cols = torch.arange(8)[None]                            # columns 0..7 holding the values 0..7
    assert awq.pack(cols).item() == 0x75316420              # nibble i holds column PACK_ORDER[i]
    assert [awq.AWQ_ORDER.index(j) for j in range(8)] == list(awq.AWQ_REVERSE)
    v = torch.randint(0, 16, (5, 64))
    assert torch.equal(awq.unpack(awq.pack(v)).long(), v)
    assert torch.equal(_ref_unpack(awq.pack(v)), v)


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_files_load_into_experts_equal_to_awqs_own_dequantization(family, dirs):
    d = dirs[family]["awq"]
    cfg = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
        {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"}
    files = _files(d)
    dense = load_file(os.path.join(dirs[family]["fp16"], "model.safetensors"))
    eng = load(d)
    assert eng.layout.spec() == SPEC
    H, I = eng.geometry.hidden, eng.geometry.inter
    for pos, layer in enumerate(eng.geometry.moe_layers):
        prefix = eng.family.expert_prefix(layer)
        gate_up, down = eng.layout.dequantize(eng.store.buffers[pos])
        assert gate_up.dtype == torch.float32
        for e in range(eng.geometry.num_experts):
            name = f"{prefix}.{e}"
            assert files[f"{name}.gate_proj.qweight"].shape == (H, I // 8)           # [in, out/8]: transposed
            assert files[f"{name}.down_proj.scales"].dtype == torch.float16
            ref = torch.cat([_ref_dequant(files, f"{name}.gate_proj", 16), _ref_dequant(files, f"{name}.up_proj", 16)])
            assert torch.equal(gate_up[e], ref)
            assert torch.equal(down[e], _ref_dequant(files, f"{name}.down_proj", 16))
    # what was written is the weights quantized: within half a step of the fp16 weights
    w = dense.get(f"{prefix}.gate_up_proj")
    if w is None:
        w = torch.cat([dense[f"{prefix}.{e}.{p}_proj.weight"] for e in range(8) for p in ("gate", "up")]).view(8, -1, H)
    w = w[-1]
    w = w.float() if w.shape == gate_up[-1].shape else w.float().t()
    step = torch.cat([files[f"{prefix}.7.{p}.scales"].float() for p in ("gate_proj", "up_proj")], dim=1).t()
    assert ((gate_up[-1] - w).abs() <= step.repeat_interleave(16, 1) / 2 + 1e-3).all()
    # the attention is AWQ too, dequantized at load into the same values
    params = dict(eng.model.named_parameters())
    assert f"{ATTN}.qweight" in files and f"{ATTN}.weight" not in files
    assert torch.equal(params[f"{ATTN}.weight"].float(), _ref_dequant(files, ATTN, 16))


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_and_compressed_tensors_of_the_same_values_give_the_same_tokens_at_every_budget(family, dirs,
                                                                                             image_file):
    d = dirs[family]
    a, c = load(d["awq"]), load(d["ct"])
    at_load = load(d["fp16"], expert_format=SPEC)
    assert a.layout.spec() == c.layout.spec() == at_load.layout.spec()
    for x, y, z in zip(a.store.buffers, c.store.buffers, at_load.store.buffers):
        assert torch.equal(x, y) and torch.equal(x, z)
    pa, pc = dict(a.model.named_parameters()), dict(c.model.named_parameters())
    assert all(torch.equal(pa[k], pc[k]) for k in pa)
    want = a.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids
    assert c.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids == want
    quarter, least = quarter_and_smallest(d["awq"])
    runs = [a.fork(expert_budget=least, policy="lru"),
            a.fork(expert_budget=least, policy="predictive", prefetch="gate", decode="fast"),
            load(d["awq"], expert_budget=quarter, expert_tier="disk")]
    for eng in runs:
        gen = eng.generate(image_file, PROMPT, max_new_tokens=NEW)
        assert gen.token_ids == want
        assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
    assert runs[0].cache.counters.total().misses > 0


# ---- bad input: one line -------------------------------------------------------------------------------------
def _edit_config(d, **kv):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"].update(kv)
    json.dump(cfg, open(p, "w"))


def _edit_tensor(d, key, fn):
    """Replace tensor `key` by fn(it); None removes it from its shard and from the index."""
    ipath = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(ipath))
    path = os.path.join(d, index["weight_map"][key])
    state = load_file(path)
    out = fn(state[key])
    if out is None:
        del state[key], index["weight_map"][key]
        json.dump(index, open(ipath, "w"))
    else:
        state[key] = out
    save_file(state, path, metadata={"format": "pt"})


def _cut_attention_input(d):
    """q_proj of 48 input columns instead of 64, consistent in itself: a shape only the model can refuse."""
    for key, cut in (("qweight", 16), ("qzeros", 1), ("scales", 1)):
        _edit_tensor(d, f"{ATTN}.{key}", lambda t: t[:-cut].contiguous())


EXPERT = "model.language_model.layers.2.mlp.experts.5.up_proj"
BAD = {
    "bits": (lambda d: _edit_config(d, bits=8), "8-bit"),
    "gemv": (lambda d: _edit_config(d, version="gemv"), "GEMV"),
    "exllama": (lambda d: _edit_config(d, version="exllama"), "ExLlama"),
    "marlin": (lambda d: _edit_config(d, version="marlin"), "Marlin"),
    "zero point": (lambda d: _edit_config(d, zero_point=False), "zero_point false"),
    "group": (lambda d: _edit_config(d, group_size=96), "group size 96"),
    "qweight shape": (lambda d: _edit_tensor(d, f"{EXPERT}.qweight", lambda t: t[:, :-1].contiguous()), "has shape"),
    "qzeros shape": (lambda d: _edit_tensor(d, f"{EXPERT}.qzeros", lambda t: t[:-1].contiguous()), "has shape"),
    "scales shape": (lambda d: _edit_tensor(d, f"{EXPERT}.scales", lambda t: t.t().contiguous()), "has shape"),
    "scales dtype": (lambda d: _edit_tensor(d, f"{EXPERT}.scales", lambda t: t.to(torch.int16)), "stored as I16"),
    "nan scales": (lambda d: _edit_tensor(d, f"{EXPERT}.scales", lambda t: t.index_fill(1, torch.tensor([3]),
                                                                                            float("nan"))),
                   "up_proj.scales has NaN or Inf"),
    "missing": (lambda d: _edit_tensor(d, f"{EXPERT}.qzeros", lambda t: None), "no tensor " + EXPERT + ".qzeros"),
    "attention inf": (lambda d: _edit_tensor(d, f"{ATTN}.scales", lambda t: t.fill_(float("inf"))),
                      "q_proj.scales has NaN or Inf"),
    "attention missing": (lambda d: _edit_tensor(d, f"{ATTN}.qzeros", lambda t: None), "no tensor " + ATTN),
    "attention shape": (lambda d: _edit_tensor(d, f"{ATTN}.qzeros", lambda t: t[:, :-1].contiguous()),
                        "q_proj.qzeros has shape"),
    "attention rows": (lambda d: _cut_attention_input(d), "config.json gives the model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_awq_checkpoints_are_one_line(case, dirs, tmp_path, capsys):
    damage, words = BAD[case]
    d = shutil.copytree(dirs["glm4v_moe"]["awq"], str(tmp_path / "ckpt"))
    damage(d)
    with pytest.raises(UserError) as e:
        load(d)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert main(["generate", "--model", d, "--prompt", PROMPT, "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_quantize_layout_awq_refuses_what_it_cannot_write(dirs, tmp_path, capsys):
    d = dirs["qwen3_vl_moe"]["fp16"]
    cases = [(["--format", "int4:group=16,sym=1", "--layout", "awq"], "not sym=1"),
             (["--format", "fp8", "--layout", "awq"], "--layout awq does not hold --format fp8"),
             (["--format", "int4:group=16", "--layout", "awq", "--model", dirs["qwen3_vl_moe"]["awq"]],
              "already quantized")]
    for i, (args, words) in enumerate(cases):
        argv = ["quantize", *args, "--out", str(tmp_path / f"out{i}")] + ([] if "--model" in args else ["--model", d])
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
        assert not (tmp_path / f"out{i}").exists()
