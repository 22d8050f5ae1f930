"""Quantized experts end to end: a quantized model (fp8, int4) gives the greedy tokens of itself with every expert
resident at every budget down to the smallest legal one, every policy and predictor, both tiers, eager and fast
decode; checkpoints in the hub layouts (`vismmoe quantize`) load into the blobs a load-time quantization makes;
budgets count the format's bytes; every damaged or unsupported quantized checkpoint is one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.errors import UserError
from vismmoe.tools.quantize import quantize_checkpoint

from .conftest import FAMILIES, MORE_FAMILIES

PROMPT = "What is in the picture?"
NEW = 8
SPECS = ["fp8", "int4:group=16,sym=0"]


@pytest.fixture(scope="module")
def quantized_dirs(tiny_dirs, tmp_path_factory):
    """(family, spec) -> a checkpoint written by `vismmoe quantize` (attention quantized too for fp8)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for fam in FAMILIES:
        for spec in SPECS:
            d = str(root / f"{fam}-{spec.partition(':')[0]}")
            quantize_checkpoint(tiny_dirs[fam], spec, d, all_linears=spec == "fp8")
            out[fam, spec] = d
    return out


def _gen(eng, image_file):
    return eng.generate(image_file, PROMPT, max_new_tokens=NEW)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_quantized_offload_is_exact_down_to_the_smallest_budget(family, spec, tiny_dirs, image_file):
    d = tiny_dirs[family]
    full = load(d, expert_format=spec)
    want = _gen(full, image_file).token_ids
    least = str(full.geometry.top_k * full.layout.nbytes)
    runs = [dict(expert_budget=least, policy="lru"), dict(expert_budget=least, policy="predictive", prefetch="gate"),
            dict(expert_budget="25%", policy="lfru", prefetch="gate", lookahead=3),
            dict(expert_budget=least, decode="fast"), dict(expert_budget="25%", expert_tier="disk"),
            dict(expert_budget=least, decode="fast", expert_tier="disk")]
    for opts in runs:
        eng = load(d, expert_format=spec, **opts)
        gen = _gen(eng, image_file)
        assert gen.token_ids == want, (spec, opts)
        st = gen.stats
        assert st["expert_format"] == eng.layout.spec() and st["expert_bytes"] == eng.layout.nbytes
        assert st["expert_bytes_peak"] <= st["expert_budget_bytes"]
    assert eng.cache.counters.total().misses > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_hub_layout_loads_into_the_blobs_of_a_load_time_quantization(family, spec, tiny_dirs, quantized_dirs,
                                                                       image_file):
    at_load = load(tiny_dirs[family], expert_format=spec)
    from_file = load(quantized_dirs[family, spec])
    assert from_file.layout.spec() == at_load.layout.spec()
    for a, b in zip(at_load.store.buffers, from_file.store.buffers):
        assert torch.equal(a, b)
    least = str(from_file.geometry.top_k * from_file.layout.nbytes)
    small = load(quantized_dirs[family, spec], expert_budget=least, policy="predictive", prefetch="gate")
    got = _gen(small, image_file).token_ids
    assert got == _gen(from_file, image_file).token_ids
    if spec != "fp8":                      # fp8 files quantize the attention too: another model, by design
        assert got == _gen(at_load, image_file).token_ids


@pytest.mark.parametrize("family", [f for f in MORE_FAMILIES if f != "ernie4_5_vl_moe"])   # ERNIE: not written
def test_every_family_loads_what_quantize_wrote(family, tiny_dirs, tmp_path):
    """DeepSeek-OCR-2's quantized checkpoint did not load: its per-expert tensors, written under the model's own
    names, were renamed again by the legacy renaming (`model.` -> `model.language_model.`), and the loader said the
    checkpoint had no such tensor."""
    d = str(tmp_path / "q")
    quantize_checkpoint(tiny_dirs[family], "fp8", d)
    at_load, from_file = load(tiny_dirs[family], expert_format="fp8"), load(d)
    assert from_file.layout.spec() == at_load.layout.spec()
    for a, b in zip(at_load.store.buffers, from_file.store.buffers):
        assert torch.equal(a, b)


def test_hub_files_are_what_the_layouts_say(quantized_dirs):
    d = quantized_dirs["glm4v_moe", "fp8"]
    cfg = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [128, 128] and cfg["fmt"] == "e4m3"
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    key = "model.language_model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(os.path.join(d, index[key]), "pt") as f:
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
        assert f.get_tensor(key + "_scale_inv").dtype == torch.float32
        assert f.get_tensor("model.language_model.layers.1.self_attn.q_proj.weight").dtype == torch.float8_e4m3fn
    d = quantized_dirs["glm4v_moe", "int4:group=16,sym=0"]
    cfg = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    w = cfg["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["strategy"]) == (4, 16, False, "group")
    # compressed-tensors' own decompressor reads what was written back into the weights it came from
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    pfx = "model.language_model.layers.1.mlp.experts.3.down_proj"
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    with safe_open(os.path.join(d, index[pfx + ".weight_packed"]), "pt") as f:
        state = {k: f.get_tensor(f"{pfx}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                          "weight_shape")}
    scheme = QuantizationScheme(targets=["Linear"], weights=w)
    dense = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    eng = load(d)
    pos = eng.geometry.moe_layers.index(1)
    ours = eng.layout.dequantize(eng.store.buffers[pos][3:4])[1][0]        # down [H, I] of layer 1, expert 3
    assert torch.allclose(dense.float(), ours.float(), atol=1e-6)


def test_budget_counts_the_formats_bytes(tiny_dirs):
    d = tiny_dirs["qwen3_vl_moe"]
    dense, int4 = load(d, expert_budget="25%"), load(d, expert_budget="25%", expert_format="int4:group=16")
    assert int4.layout.nbytes < dense.layout.nbytes / 3
    assert int4.budget_bytes < dense.budget_bytes / 3            # 25% of all experts as stored
    assert int4.cache.num_slots == dense.cache.num_slots
    same_bytes = load(d, expert_budget=str(dense.budget_bytes), expert_format="int4:group=16")
    assert same_bytes.cache.num_slots > 3 * dense.cache.num_slots - 1
    # --device-memory: the same device bytes hold more experts in a smaller format (the reserve is the same)
    total = dense.nonexpert_bytes + (64 << 20) + dense.budget_bytes
    dm = {f: load(d, device_memory=str(total), reserve="64MiB", expert_format=f) for f in (None, "fp8")}
    assert dm["fp8"].budget_bytes == dm[None].budget_bytes
    assert dm["fp8"].cache.num_slots > 1.9 * dm[None].cache.num_slots


# ---- bad input: one line -------------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, fn):
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    fn(cfg["quantization_config"])
    json.dump(cfg, open(p, "w"))


def _edit_tensor(d, key, fn):
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    path = os.path.join(d, index[key])
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    out = fn(state[key])
    if out is None:
        del state[key]
    else:
        state[key] = out
    save_file(state, path, metadata={"format": "pt"})


BAD = {
    "method": (lambda d: _edit_config(d, lambda q: q.update(quant_method="gptq")), "quantization method 'gptq'"),
    "bits": (lambda d: _edit_config(d, lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3)),
             "3-bit"),
    "group": (lambda d: _edit_config(d, lambda q: q["config_groups"]["group_0"]["weights"].update(group_size=96)),
              "group size 96"),
    "missing scale": (lambda d: _edit_tensor(d, "model.language_model.layers.2.mlp.experts.5.up_proj.weight_scale",
                                             lambda t: None), "no such tensor"),
    "scale shape": (lambda d: _edit_tensor(d, "model.language_model.layers.2.mlp.experts.5.up_proj.weight_scale",
                                           lambda t: t[:, :1].contiguous()), "has shape"),
    "nan scale": (lambda d: _edit_tensor(d, "model.language_model.layers.1.mlp.experts.1.gate_proj.weight_scale",
                                         lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), "NaN or Inf"),
}
BAD_FP8 = {
    "block": (lambda d: _edit_config(d, lambda q: q.update(weight_block_size=[64, 64])), "weight_block_size"),
    "static": (lambda d: _edit_config(d, lambda q: q.update(activation_scheme="static")), "activation_scheme"),
    "nan scale": (lambda d: _edit_tensor(d, "model.language_model.layers.1.mlp.experts.1.down_proj.weight_scale_inv",
                                         lambda t: t.fill_(float("inf"))), "NaN or Inf"),
    "attention scale": (lambda d: _edit_tensor(d, "model.language_model.layers.0.self_attn.o_proj.weight_scale_inv",
                                               lambda t: t.fill_(float("nan"))), "non-finite"),
}


@pytest.mark.parametrize("case", list(BAD) + [f"fp8 {k}" for k in BAD_FP8])
def test_damaged_or_unsupported_quantized_checkpoints_are_one_line(case, quantized_dirs, tmp_path, capsys):
    spec, table = ("fp8", BAD_FP8) if case.startswith("fp8 ") else ("int4:group=16,sym=0", BAD)
    damage, words = table[case.removeprefix("fp8 ")]
    d = _copy(quantized_dirs["glm4v_moe", spec], str(tmp_path / "ckpt"))
    damage(d)
    with pytest.raises(UserError) as e:
        load(d)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert main(["generate", "--model", d, "--prompt", PROMPT, "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_a_quantized_checkpoint_given_to_expert_format_is_refused(quantized_dirs, capsys):
    d = quantized_dirs["qwen3_vl_moe", "fp8"]
    assert load(d, expert_format="fp8").layout.name == "fp8"            # its own format: fine
    assert main(["generate", "--model", d, "--prompt", PROMPT, "--expert-format", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already quantized as fp8" in err[0]


def test_quantize_cli_refuses_what_it_cannot_do_and_never_overwrites(tiny_dirs, quantized_dirs, tmp_path, capsys):
    d = tiny_dirs["qwen3_vl_moe"]
    full = str(tmp_path / "full")
    os.makedirs(full)
    open(os.path.join(full, "keep.txt"), "w").write("mine")
    open(tmp_path / "a-file", "w").write("x")
    cases = [(["--format", "int4:group=16", "--out", full], "already holds files"),           # existing data
             (["--format", "fp9", "--out", str(tmp_path / "a")], "unknown expert format"),
             (["--format", "dense", "--out", str(tmp_path / "b")], "writes nothing new"),
             (["--format", "fp8", "--out", str(tmp_path / "a-file" / "dir")], "is a file"),
             (["--format", "int4:group=16", "--out", str(tmp_path / "c"), "--model", quantized_dirs["qwen3_vl_moe", "fp8"]],
              "already quantized")]
    for args, words in cases:
        argv = ["quantize", *args] + ([] if "--model" in args else ["--model", d])
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert os.listdir(full) == ["keep.txt"]
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]                     # no temporary left behind


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_gpu_quantized_fast_and_eager_exact_across_budgets(family, spec, tiny_dirs, image_file):
    """bf16 on the GPU, quantized experts: the captured, compiled step (misses read by the kernel from host memory)
    and the eager decode each give the tokens of themselves with every expert resident, at every budget and policy;
    the pool's bytes are measured against the CUDA allocator."""
    d = tiny_dirs[family]
    for decode in ("fast", "eager"):
        base = load(d, device="cuda", dtype="bfloat16", decode=decode, expert_format=spec)
        base.runtime.preload([(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)])
        want = _gen(base, image_file).token_ids
        least = str(base.geometry.top_k * base.layout.nbytes)
        for budget in ("25%", least):
            for policy in ("lru", "predictive"):
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                eng = base.fork(expert_budget=budget, policy=policy)
                assert torch.cuda.memory_allocated() - before <= eng.budget_bytes
                gen = _gen(eng, image_file)
                assert gen.token_ids == want, (family, spec, decode, budget, policy)
                assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi", "--expert-format", "fp9"],
                                  ["eval", "--limit", "1", "--expert-format", "int4:group=100"],
                                  ["bench", "--quick", "--expert-format", "int4:sym=3"],
                                  ["make-shape", "--shape", "tiny-qwen3-moe", "--out", "OUT", "--format", "fp7"]])
def test_a_bad_expert_format_is_one_line_before_any_work(argv, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expert format" in err[0]
    assert not (tmp_path / "out").exists()
