"""GGUF export for llama.cpp (Qwen3-VL-MoE, GLM-4.5V), random-weight shapes as checkpoints, and the llama.cpp
bench system's parsing.

The exported files are read back with `gguf.GGUFReader` (what llama.cpp's loader reads: arch, hyper-parameters,
vocabulary, tensor names, GGML shapes = reversed torch shapes, types). When a llama.cpp build is at hand
(VISMMOE_LLAMA_CPP_BIN=folder with llama-mtmd-cli), it answers a question on the exported bundled model too.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vismmoe.cli.app import main
from vismmoe.checkpoints import BUNDLED
from vismmoe.errors import UserError

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    from vismmoe.tools.export_gguf import export
    return export(BUNDLED, str(tmp_path_factory.mktemp("gguf")), dtype="bf16")


def _tensors(path: str) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _field(reader, key):
    return reader.fields[key].contents()


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_text_gguf_metadata(exported):
    with open(os.path.join(BUNDLED, "config.json")) as f:
        tc = json.load(f)["text_config"]
    r = gguf.GGUFReader(exported["text"]["path"])
    assert _field(r, "general.architecture") == "qwen3vlmoe"
    assert _field(r, "qwen3vlmoe.block_count") == tc["num_hidden_layers"]
    assert _field(r, "qwen3vlmoe.expert_count") == tc["num_local_experts"]
    assert _field(r, "qwen3vlmoe.expert_used_count") == tc["num_experts_per_tok"]
    assert _field(r, "qwen3vlmoe.expert_feed_forward_length") == tc["moe_intermediate_size"]
    assert _field(r, "qwen3vlmoe.attention.key_length") == tc["head_dim"]
    assert _field(r, "qwen3vlmoe.rope.dimension_sections") == tc["rope_parameters"]["mrope_section"] + [0]
    assert _field(r, "qwen3vlmoe.n_deepstack_layers") == 2
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == tc["vocab_size"] == 518                 # our tokenizer's vocabulary, nothing padded
    assert _field(r, "tokenizer.ggml.pre") == "gpt-2"             # byte-level BPE with GPT-2's split regex
    assert tokens[_field(r, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[tokens.index("<|image_pad|>")] == gguf.TokenType.CONTROL
    assert len(_field(r, "tokenizer.ggml.merges")) > 0
    assert "<|im_start|>" in _field(r, "tokenizer.chat_template")


def test_text_gguf_tensors(exported):
    H, I, E, V, L = 256, 128, 32, 518, 8
    ts = _tensors(exported["text"]["path"])
    # GGML shapes list the fastest dimension first (torch shape reversed)
    want = {"token_embd.weight": [H, V], "output.weight": [H, V], "output_norm.weight": [H],
            "blk.0.ffn_gate_inp.weight": [H, E], "blk.0.ffn_gate_exps.weight": [H, I, E],
            "blk.0.ffn_up_exps.weight": [H, I, E], "blk.0.ffn_down_exps.weight": [I, H, E],
            "blk.7.attn_q.weight": [H, 4 * 64], "blk.7.attn_k.weight": [H, 2 * 64], "blk.7.attn_q_norm.weight": [64]}
    for name, shape in want.items():
        assert ts[name].shape.tolist() == shape, name
    assert len(ts) == 3 + L * 12
    Q = gguf.GGMLQuantizationType
    assert ts["blk.0.ffn_gate_exps.weight"].tensor_type == Q.BF16
    assert ts["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32        # router and norms stay f32
    assert ts["blk.0.attn_norm.weight"].tensor_type == Q.F32


def test_bf16_values_round_trip(exported):
    from vismmoe.offload.store import CheckpointReader
    ts = _tensors(exported["text"]["path"])
    rd = CheckpointReader(BUNDLED, 256, 128)
    pre = "model.language_model."
    for gname, key in (("token_embd.weight", pre + "embed_tokens.weight"),
                       ("blk.3.attn_q.weight", pre + "layers.3.self_attn.q_proj.weight"),
                       ("output.weight", "lm_head.weight")):
        got = ts[gname].data.view(np.uint16).reshape(rd.tensor(key).shape)
        assert np.array_equal(got, _bf16_bits(rd.tensor(key))), gname
    gate = ts["blk.5.ffn_gate_exps.weight"].data.view(np.uint16).reshape(32, 128, 256)
    up = ts["blk.5.ffn_up_exps.weight"].data.view(np.uint16).reshape(32, 128, 256)
    down = ts["blk.5.ffn_down_exps.weight"].data.view(np.uint16).reshape(32, 256, 128)
    for e in (0, 17, 31):
        gu, dn = rd.read(pre + "layers.5.mlp.experts", e)            # [2I, H] gate rows then up rows, [H, I]
        assert np.array_equal(gate[e], _bf16_bits(gu[:128]))
        assert np.array_equal(up[e], _bf16_bits(gu[128:]))
        assert np.array_equal(down[e], _bf16_bits(dn))
    router = ts["blk.5.ffn_gate_inp.weight"].data
    assert np.array_equal(router, rd.tensor(pre + "layers.5.mlp.gate.weight").float().numpy())


def test_mmproj_gguf(exported):
    r = gguf.GGUFReader(exported["mmproj"]["path"])
    assert _field(r, "general.architecture") == "clip"
    assert _field(r, "clip.projector_type") == "qwen3vl_merger"
    assert _field(r, "clip.has_vision_encoder") is True
    assert _field(r, "clip.vision.is_deepstack_layers") == [False, True, True, False]
    assert _field(r, "clip.vision.projection_dim") == 256
    assert _field(r, "clip.vision.image_size") == 448                  # sqrt(784 positions) x patch 16
    ts = {t.name: t for t in r.tensors}
    for name in ("v.patch_embd.weight", "v.patch_embd.weight.1", "v.patch_embd.bias", "v.position_embd.weight",
                 "v.blk.3.attn_qkv.weight", "v.blk.3.ffn_down.bias", "v.post_ln.weight", "mm.0.weight", "mm.2.bias",
                 "v.deepstack.1.fc1.weight", "v.deepstack.2.norm.bias"):
        assert name in ts, name
    assert "v.deepstack.0.fc1.weight" not in ts
    assert ts["v.patch_embd.weight"].shape.tolist() == [16, 16, 3, 128]   # one Conv2d kernel per frame


def test_pre_tokenizer_names():
    from vismmoe.tools.export_gguf import _QWEN2_REGEX, pre_tokenizer_name
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                 "use_regex": True}}) == "gpt-2"
    qwen2 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": qwen2}) == "qwen2"
    with pytest.raises(UserError):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(UserError):
        pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}})


def _one_line_error(capsys, argv, needle):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and needle in lines[0], err


def test_glm4v_moe_export(tiny_dirs, tmp_path):
    """GLM-4.5V: arch glm4moe (dense first layer, shared expert, sigmoid router with correction bias) and the glm4v
    projector; per-expert hub tensors come out as llama.cpp's banks."""
    from vismmoe.tools.export_gguf import export
    from vismmoe.offload.store import CheckpointReader
    d = tiny_dirs["glm4v_moe"]
    res = export(d, str(tmp_path), dtype="bf16")
    tc = json.loads(open(os.path.join(d, "config.json")).read())["text_config"]
    r = gguf.GGUFReader(res["text"]["path"])
    assert _field(r, "general.architecture") == "glm4moe"
    assert _field(r, "glm4moe.leading_dense_block_count") == tc["first_k_dense_replace"] == 1
    assert _field(r, "glm4moe.expert_shared_count") == 1
    assert _field(r, "glm4moe.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert _field(r, "glm4moe.rope.dimension_count") == tc["head_dim"] // 2          # partial rotary 0.5
    ts = {t.name: t for t in r.tensors}
    H, I, E = tc["hidden_size"], tc["moe_intermediate_size"], tc["n_routed_experts"]
    assert "blk.0.ffn_gate.weight" in ts and "blk.0.ffn_gate_exps.weight" not in ts            # dense layer 0
    assert ts["blk.1.ffn_down_exps.weight"].shape.tolist() == [I, H, E]
    assert ts["blk.1.exp_probs_b.bias"].shape.tolist() == [E]
    assert {"blk.1.ffn_up_shexp.weight", "blk.1.post_attention_norm.weight", "blk.1.attn_q.bias"} <= ts.keys()
    rd = CheckpointReader(d, H, I)
    gu, dn = rd.read("model.language_model.layers.2.mlp.experts", 5)
    down = ts["blk.2.ffn_down_exps.weight"].data.view(np.uint16).reshape(E, H, I)
    assert np.array_equal(down[5], _bf16_bits(dn))
    m = gguf.GGUFReader(res["mmproj"]["path"])
    assert _field(m, "clip.projector_type") == "glm4v"
    names = {t.name for t in m.tensors}
    assert {"v.norm_embd.weight", "mm.patch_merger.weight", "mm.model.fc.weight", "mm.gate.weight",
            "v.blk.0.ffn_gate.weight", "v.patch_embd.weight.1"} <= names


def test_export_unknown_family_is_a_one_line_error(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _one_line_error(capsys, ["export-gguf", "--model", str(other), "--out", str(tmp_path / "o")],
                    "qwen3_vl_moe, glm4v_moe")
    _one_line_error(capsys, ["make-shape", "--shape", "nope", "--out", str(tmp_path / "s")], "unknown shape")


def test_an_empty_name_is_refused_not_replaced(tiny_dirs, tmp_path, capsys):
    """--name '' was dropped for the folder's name without a word."""
    tiny = tiny_dirs["qwen3_vl_moe"]
    capsys.readouterr()
    _one_line_error(capsys, ["export-gguf", "--model", tiny, "--out", str(tmp_path / "g"), "--name", ""],
                    "--name '' is not a file name stem")
    assert not (tmp_path / "g").exists()


def test_make_shape_loads_generates_and_exports(tmp_path, image_file, capsys):
    import vismmoe
    from vismmoe.offload.store import CheckpointReader
    out = tmp_path / "shape"
    assert main(["make-shape", "--shape", "tiny-qwen3", "--layers", "3", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    with open(out / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) == 4                                          # non-layer tensors + one shard per layer
    cfg = json.loads((out / "config.json").read_text())
    tc = cfg["text_config"]
    assert tc["num_hidden_layers"] == 3
    eng = vismmoe.load(str(out), device="cpu", expert_budget="50%")
    assert cfg["image_token_id"] == eng.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    gen = eng.generate(image_file, "Describe this image.", max_new_tokens=3)
    assert 1 <= len(gen.token_ids) <= 3
    rd = CheckpointReader(str(out), tc["hidden_size"], tc["moe_intermediate_size"])
    hub = rd.shape("model.language_model.layers.1.mlp.experts.gate_up_proj")
    assert hub == (16, tc["hidden_size"], 2 * tc["moe_intermediate_size"])     # the hub layout [E, H, 2I]
    assert main(["export-gguf", "--model", str(out), "--out", str(tmp_path / "g"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = gguf.GGUFReader(res["text"]["path"])
    assert len(_field(r, "tokenizer.ggml.tokens")) == tc["vocab_size"]
    ts = {t.name: t for t in r.tensors}
    gate = ts["blk.1.ffn_gate_exps.weight"].data.view(np.uint16).reshape(16, 48, 64)
    gu, _ = rd.read("model.language_model.layers.1.mlp.experts", 3)
    assert np.array_equal(gate[3], _bf16_bits(gu[:48]))


def test_export_needs_more_layers_than_deepstack_taps(tmp_path, capsys):
    """llama.cpp's qwen3vlmoe graph fails an assert when the last layer has DeepStack rows to add."""
    assert main(["make-shape", "--shape", "tiny-qwen3", "--layers", "2", "--out", str(tmp_path / "s"),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["export-gguf", "--model", str(tmp_path / "s"), "--out", str(tmp_path / "g")],
                    "DeepStack")


def test_make_shape_pads_the_vocab(tmp_path, monkeypatch):
    """A shape with a larger vocab than our tokenizer's gets [PADi] entries up to it: every id decodes."""
    from transformers import AutoTokenizer

    from vismmoe.bench import make_shape as ms
    ms._tokenizer_files(str(tmp_path), 600)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 600 and tok.decode([599]) == "[PAD599]"
    assert tok("What color is the circle?")["input_ids"] == \
        AutoTokenizer.from_pretrained(BUNDLED)("What color is the circle?")["input_ids"]


STDERR = """0.00.010.711 I load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
0.00.015.539 I load_tensors:   CUDA0 model buffer size =    51.78 MiB
0.00.016.123 I llama_kv_cache:      CUDA0 KV buffer size =     8.00 MiB
0.00.025.308 I sched_reserve:      CUDA0 compute buffer size =     9.14 MiB
0.00.025.308 I sched_reserve:  CUDA_Host compute buffer size =     3.00 MiB
0.00.106.555 I main: loading model: m.gguf
0.00.111.704 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
0.00.154.229 I mtmd batch encoding done in 43 ms
0.00.182.840 I image decoded (batch 1/1) in 28 ms
0.01.187.491 I llama_perf_context_print:        load time =      17.36 ms
0.01.187.501 I llama_perf_context_print: prompt eval time =      76.47 ms /   214 tokens (    0.36 ms per token)
0.01.187.503 I llama_perf_context_print:        eval time =      30.00 ms /    10 runs   (    3.00 ms per token)
0.01.187.503 I llama_perf_context_print:       total time =     159.47 ms /   215 tokens
"""


def test_llama_cpp_output_parsing():
    from vismmoe.bench.llama_cpp import Request, parse_run
    run = parse_run("llama.cpp", "\nYes\n\n\n", STDERR, 1.5, 900.0, Request("x.png", "q?", 10, answer="yes"))
    assert run.text == "Yes" and run.correct is True
    assert run.request_s == pytest.approx(1.187491 - 0.106555)     # log stamps: loaded -> timings printed
    assert run.tpot_s == pytest.approx(3e-3)
    assert run.ttft_s == pytest.approx(run.request_s - 0.030)
    assert run.new_tokens == 11 and run.extra["encode_ms"] == 43
    assert run.device_mib_alloc == pytest.approx(51.78 + 8 + 9.14)   # CUDA0 buffers; CUDA_Host is host memory
    assert run.load_s == pytest.approx(0.01736) and run.wall_s == 1.5
    with pytest.raises(RuntimeError):
        parse_run("llama.cpp", "Yes", "no timings here", 1.0, None, Request("x.png", "q?", 4))


def test_placement_arithmetic(tiny_dirs):
    from vismmoe.bench.llama_cpp import image_token_range, n_cpu_moe
    assert [n_cpu_moe(b, 8) for b in (0.1, 0.25, 0.5, 1.0)] == [8, 6, 4, 0]   # device share never above the budget
    assert [n_cpu_moe(b, 16) for b in (0.1, 0.25, 0.5)] == [15, 12, 8]
    assert image_token_range(BUNDLED) == (1, 196)
    assert image_token_range(tiny_dirs["glm4v_moe"]) == (1, 32)     # GLM-4V counts both frames: 50176 px / 2 / 28^2


@pytest.mark.parametrize("flag,value,says", [("--policy", "bogus", "unknown cache policy"),
                                              ("--prefetch", "bogus", "unknown predictor")])
def test_llama_cpp_bench_refuses_bad_vismmoe_options_first(flag, value, says, tmp_path):
    """A bad vismmoe option of bench.llama_cpp is one line and exit 2, before llama.cpp is looked for."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "vismmoe.bench.llama_cpp", "--llama-cpp-bin", str(tmp_path / "none"),
                          "--gguf", str(tmp_path / "g"), "--out", str(tmp_path / "o"), flag, value],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and says in lines[0], out.stderr


@pytest.mark.slow
def test_llama_cpp_answers_like_vismmoe(exported, tmp_path):
    """Needs a llama.cpp build (scripts/build_llama_cpp.sh): VISMMOE_LLAMA_CPP_BIN=BUILD/bin."""
    bin_dir = _llama_bin()
    import vismmoe
    from vismmoe.bench.llama_cpp import Llama, vismmoe_run, vqa_requests
    reqs = vqa_requests(3, 4, str(tmp_path))
    llama = Llama(bin_dir, exported["text"]["path"], exported["mmproj"]["path"], ctx=2048, image_tokens=(1, 196),
                  ignore_eos=False)
    eng = vismmoe.load(BUNDLED, device="cpu", dtype="bfloat16", expert_budget="100%")
    for r in reqs:
        assert llama.run("llama.cpp", r, [], gpu=False).text == vismmoe_run(eng, "vismmoe", r).text


def _llama_bin(tool: str = "llama-mtmd-cli") -> str:
    """The llama.cpp build's bin folder (VISMMOE_LLAMA_CPP_BIN) when it holds `tool`; the test skips otherwise."""
    bin_dir = os.environ.get("VISMMOE_LLAMA_CPP_BIN")
    if not bin_dir or not os.path.exists(os.path.join(bin_dir, tool)):
        pytest.skip(f"set VISMMOE_LLAMA_CPP_BIN to a folder with {tool}")
    return bin_dir


@pytest.mark.slow
def test_llama_cpp_glm4v_same_tokens(tmp_path):
    """The tiny random GLM-4.5V-class model: llama.cpp and vismmoe make the same 8 tokens for noise images of three
    sizes (one kept, two resized by both processors alike)."""
    bin_dir = _llama_bin()
    import vismmoe
    from vismmoe.bench.llama_cpp import Llama, image_token_range, noise_requests, vismmoe_run
    from vismmoe.tools.export_gguf import export
    from vismmoe.tools.tiny import make_tiny
    d = make_tiny("glm4v_moe", str(tmp_path / "glm"), layers=3, experts=8, top_k=2)
    files = export(d, str(tmp_path / "g"), dtype="f32")
    llama = Llama(bin_dir, files["text"]["path"], files["mmproj"]["path"], ctx=1024,
                  image_tokens=image_token_range(d), ignore_eos=True)
    eng = vismmoe.load(d, device="cpu", expert_budget="100%")
    eng.eos_ids = set()
    for r in noise_requests([112, 168, 224], 8, str(tmp_path)):
        assert llama.run("llama.cpp", r, [], gpu=False).text == vismmoe_run(eng, "vismmoe", r).text


@pytest.mark.slow
def test_llama_cpp_random_shape_same_tokens(tmp_path):
    """A random-weight shape through make-shape and export-gguf: llama.cpp (--ignore-eos) and vismmoe (end-of-turn
    ignored) make the same 8 tokens for a noise image, through the vision tower, DeepStack and M-RoPE."""
    bin_dir = _llama_bin()
    import vismmoe
    from vismmoe.bench.llama_cpp import Llama, image_token_range, noise_requests, vismmoe_run
    from vismmoe.bench.make_shape import make_shape
    from vismmoe.tools.export_gguf import export
    d = make_shape("tiny-qwen3", str(tmp_path / "s"), layers=3, device="cpu")["dir"]
    files = export(d, str(tmp_path / "g"), dtype="f32")
    llama = Llama(bin_dir, files["text"]["path"], files["mmproj"]["path"], ctx=1024,
                  image_tokens=image_token_range(d), ignore_eos=True)
    eng = vismmoe.load(d, device="cpu", expert_budget="100%")
    eng.eos_ids = set()
    for r in noise_requests([128, 192], 8, str(tmp_path)):
        ours = vismmoe_run(eng, "vismmoe", r)
        theirs = llama.run("llama.cpp", r, [], gpu=False)
        assert ours.new_tokens == theirs.new_tokens == 8
        assert theirs.text == ours.text


def test_a_quantized_checkpoint_is_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    """A checkpoint `vismmoe quantize` wrote: export-gguf said its experts' tensors were missing (the checkpoint
    looked incomplete); it now says it exports dense checkpoints and names the stored format."""
    q = tmp_path / "q"
    assert main(["quantize", "--model", tiny_dirs["qwen3_vl_moe"], "--format", "fp8", "--out", str(q)]) == 0
    capsys.readouterr()
    assert main(["export-gguf", "--model", str(q), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writes dense checkpoints" in err and "as fp8" in err, err
    assert not (tmp_path / "g").exists() or not os.listdir(tmp_path / "g")
