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

from vismmoe.cli import main
from vismmoe.demo import BUNDLED
from vismmoe.errors import UserError

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    from vismmoe.export_gguf import export
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
    from vismmoe.store import CheckpointReader
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
    from vismmoe.export_gguf import _QWEN2_REGEX, pre_tokenizer_name
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
    from vismmoe.export_gguf import export
    from vismmoe.store import CheckpointReader
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


def test_make_shape_loads_generates_and_exports(tmp_path, image_file, capsys):
    import vismmoe
    from vismmoe.store import CheckpointReader
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


def _llama_bin() -> str:
    bin_dir = os.environ.get("VISMMOE_LLAMA_CPP_BIN")
    if not bin_dir or not os.path.exists(os.path.join(bin_dir, "llama-mtmd-cli")):
        pytest.skip("set VISMMOE_LLAMA_CPP_BIN to a folder with llama-mtmd-cli")
    return bin_dir


@pytest.mark.slow
def test_llama_cpp_glm4v_same_tokens(tmp_path):
    """The tiny random GLM-4.5V-class model: llama.cpp and vismmoe make the same 8 tokens for noise images of three
    sizes (one kept, two resized by both processors alike)."""
    bin_dir = _llama_bin()
    import vismmoe
    from vismmoe.bench.llama_cpp import Llama, image_token_range, noise_requests, vismmoe_run
    from vismmoe.export_gguf import export
    from vismmoe.tiny import make_tiny
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
    from vismmoe.export_gguf import export
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


# ---- quantized exports (--type) -----------------------------------------------------------------------------------

def _bound(src: np.ndarray, qtype) -> np.ndarray:
    """Per value, the most a round-to-nearest GGML block format may move it, from the step of its block:
    Q8_0 (blocks of 32, d = max|x| / 127 stored in f16): half a step plus the f16 rounding of d over 127 steps;
    Q5_0 (blocks of 32, d = max|x| / 16): one step (+16 is clamped to +15); Q4_K (4-bit values in sub-blocks of 32
    whose 6-bit scales and mins are steps of the super-block of 256's widest sub-block): one step (max - min) / 15
    of that widest sub-block; Q6_K (6-bit signed values in sub-blocks of 16, step max|x| / 32): one step.
    F16: its rounding."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F16:
        return np.abs(src) * 2.0 ** -11 + 2.0 ** -25
    if qtype == Q.Q4_K:
        b = src.reshape(-1, 8, 32)
        step = ((b.max(axis=2) - b.min(axis=2)) / 15).max(axis=1)[:, None, None]
        return np.broadcast_to(step, b.shape).reshape(src.shape)
    block = {Q.Q8_0: 32, Q.Q5_0: 32, Q.Q6_K: 16}[qtype]
    b = src.reshape(-1, block)
    amax = np.abs(b).max(axis=1, keepdims=True)
    step = {Q.Q8_0: amax / 127 * (0.5 + 127 * 2.0 ** -11), Q.Q5_0: amax / 16 * (1 + 2.0 ** -6), Q.Q6_K: amax / 32}
    return np.broadcast_to(step[qtype], b.shape).reshape(src.shape)


def _dequant(t) -> np.ndarray:
    """A GGUFReader tensor's values in the torch shape (GGML shape reversed), float32."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def _assert_close(t, src: torch.Tensor, name: str) -> None:
    x = src.float().numpy()
    err = np.abs(_dequant(t) - x)
    bound = _bound(x, t.tensor_type)
    assert (err <= bound + 1e-12).all(), f"{name} ({t.tensor_type.name}): error {err.max()} over its step"


def _expert_sources(rd, layer: int, E: int, I: int) -> dict[str, torch.Tensor]:
    """One layer's three expert banks as export-gguf stacks them, from the checkpoint."""
    gate, up, down = [], [], []
    for e in range(E):
        gu, dn = rd.read(f"model.language_model.layers.{layer}.mlp.experts", e)
        gate.append(gu[:I])
        up.append(gu[I:])
        down.append(dn)
    return {"gate": torch.stack(gate), "up": torch.stack(up), "down": torch.stack(down)}


@pytest.fixture(scope="module")
def q8_exported(tmp_path_factory) -> dict:
    from vismmoe.export_gguf import export
    return export(BUNDLED, str(tmp_path_factory.mktemp("gguf_q8")), dtype="bf16", quant="q8_0")


def test_q8_0_export_types(q8_exported):
    """Every weight matrix of the text model in Q8_0; norms and routers f32; the projector stays in --dtype."""
    Q = gguf.GGMLQuantizationType
    path = q8_exported["text"]["path"]
    assert os.path.basename(path) == "vqa-moe-q8_0.gguf"
    r = gguf.GGUFReader(path)
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    ts = {t.name: t for t in r.tensors}
    for name, t in ts.items():
        want = Q.F32 if len(t.shape) == 1 or "ffn_gate_inp" in name else Q.Q8_0
        assert t.tensor_type == want, name
    assert q8_exported["text"]["types"] == {"F32": 41, "Q8_0": 58}         # 2 + 8 x 7 matrices; 1 + 8 x 5 f32
    assert os.path.basename(q8_exported["mmproj"]["path"]) == "mmproj-vqa-moe-bf16.gguf"
    assert set(q8_exported["mmproj"]["types"]) == {"BF16", "F32"}
    assert ts["blk.2.ffn_down_exps.weight"].shape.tolist() == [128, 256, 32]   # GGML shape of [E, H, I]


def test_q8_0_experts_are_the_source_within_a_step(q8_exported):
    """Each expert bank (and the attention, embedding and output matrices) dequantizes to the checkpoint's values
    within the step of its block, and its bytes are gguf's Q8_0 quantization of exactly those values."""
    from vismmoe.store import CheckpointReader
    Q = gguf.GGMLQuantizationType
    ts = _tensors(q8_exported["text"]["path"])
    rd = CheckpointReader(BUNDLED, 256, 128)
    for layer in (0, 5):
        for which, src in _expert_sources(rd, layer, 32, 128).items():
            t = ts[f"blk.{layer}.ffn_{which}_exps.weight"]
            _assert_close(t, src, t.name)
            want = gguf.quants.quantize(src.float().numpy().reshape(-1, src.shape[-1]), Q.Q8_0)
            assert np.array_equal(t.data.reshape(want.shape), want), t.name
    pre = "model.language_model."
    for gname, key in (("token_embd.weight", pre + "embed_tokens.weight"), ("output.weight", "lm_head.weight"),
                       ("blk.3.attn_v.weight", pre + "layers.3.self_attn.v_proj.weight")):
        _assert_close(ts[gname], rd.tensor(key), gname)


def test_q8_0_rows_not_a_multiple_of_the_block_stay_f16(tiny_dirs, tmp_path):
    """Tiny GLM-4.5V: expert and shared-expert rows of 48 values cannot be cut into Q8_0 blocks of 32, so those
    matrices are F16 (llama-quantize's fallback); the dense layer's ffn_down (rows of 128) and the gate/up banks
    (rows of 64) are Q8_0."""
    from vismmoe.export_gguf import export
    from vismmoe.store import CheckpointReader
    Q = gguf.GGMLQuantizationType
    d = tiny_dirs["glm4v_moe"]
    res = export(d, str(tmp_path), dtype="f32", quant="q8_0")
    ts = _tensors(res["text"]["path"])
    tc = json.loads(open(os.path.join(d, "config.json")).read())["text_config"]
    H, I, E = tc["hidden_size"], tc["moe_intermediate_size"], tc["n_routed_experts"]
    assert I % 32 != 0 and H % 32 == 0
    assert ts["blk.1.ffn_down_exps.weight"].tensor_type == Q.F16
    assert ts["blk.1.ffn_down_shexp.weight"].tensor_type == Q.F16
    assert ts["blk.1.ffn_gate_exps.weight"].tensor_type == Q.Q8_0
    assert ts["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0
    assert ts["blk.1.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert set(res["mmproj"]["types"]) <= {"F32"}                            # --dtype f32 projector
    rd = CheckpointReader(d, H, I)
    for which, src in _expert_sources(rd, 2, E, I).items():
        _assert_close(ts[f"blk.2.ffn_{which}_exps.weight"], src, which)


def test_bad_type_is_a_one_line_error(tmp_path, capsys):
    from vismmoe.export_gguf import export
    _one_line_error(capsys, ["export-gguf", "--out", str(tmp_path / "a"), "--type", "q5_k"], "invalid choice")
    _one_line_error(capsys, ["export-gguf", "--out", str(tmp_path / "b"), "--type", "q8_0", "--llama-quantize",
                             str(tmp_path)], "nothing would use it")
    _one_line_error(capsys, ["export-gguf", "--out", str(tmp_path / "c"), "--type", "q4_k_m", "--llama-quantize",
                             str(tmp_path / "nope")], "no llama-quantize executable")
    with pytest.raises(UserError, match="unknown --type"):
        export(BUNDLED, str(tmp_path / "d"), quant="Q4_K_M")
    assert not any((tmp_path / x).exists() for x in "abcd")                 # refused before anything is written


def _fake_llama_quantize(tmp_path, fail: bool = False) -> str:
    """A stand-in llama-quantize (its folder): records its arguments and copies IN to OUT, or writes part of OUT and
    fails as the real one does."""
    import sys
    exe = tmp_path / "bin" / "llama-quantize"
    exe.parent.mkdir()
    exe.write_text(f"""#!{sys.executable}
import shutil, sys
open({str(tmp_path / "args")!r}, "w").write(" ".join(sys.argv[1:]))
src, dst = sys.argv[-3], sys.argv[-2]
if {fail}:
    open(dst, "wb").write(b"part")
    sys.exit("llama_model_quantize: failed to quantize: something")
shutil.copy(src, dst)
""")
    exe.chmod(0o755)
    return str(exe.parent)


def test_llama_quantize_is_called_with_the_type(tmp_path, monkeypatch):
    """q4_k runs `llama-quantize --pure IN OUT Q4_K_S`, q4_k_m `llama-quantize IN OUT Q4_K_M`, on the --dtype text
    file, which is kept; the result names both files (a stand-in binary here: tests with the real one below)."""
    from vismmoe.export_gguf import export
    monkeypatch.delenv("VISMMOE_LLAMA_CPP_BIN", raising=False)
    bin_dir = _fake_llama_quantize(tmp_path)
    out = tmp_path / "g"
    res = export(BUNDLED, str(out), dtype="f16", quant="q4_k", llama_quantize=bin_dir)
    src, dst = str(out / "vqa-moe-f16.gguf"), str(out / "vqa-moe-q4_k.gguf")
    assert (tmp_path / "args").read_text().split() == ["--pure", src, dst, "Q4_K_S"]
    assert res["text"]["path"] == dst and res["text"]["source"] == src and os.path.exists(src)
    assert res["mmproj"]["path"] == str(out / "mmproj-vqa-moe-f16.gguf")
    monkeypatch.setenv("VISMMOE_LLAMA_CPP_BIN", bin_dir)                    # found next to the llama.cpp build
    export(BUNDLED, str(out), dtype="bf16", quant="q4_k_m")
    assert (tmp_path / "args").read_text().split() == [str(out / "vqa-moe-bf16.gguf"),
                                                       str(out / "vqa-moe-q4_k_m.gguf"), "Q4_K_M"]


def test_llama_quantize_failure_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VISMMOE_LLAMA_CPP_BIN", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    bin_dir = _fake_llama_quantize(tmp_path, fail=True)
    out = tmp_path / "g"
    _one_line_error(capsys, ["export-gguf", "--out", str(out), "--type", "q4_k_m", "--llama-quantize", bin_dir],
                    "failed to quantize")
    assert not (out / "vqa-moe-q4_k_m.gguf").exists() and (out / "vqa-moe-bf16.gguf").exists()
    _one_line_error(capsys, ["export-gguf", "--out", str(tmp_path / "h"), "--type", "q4_k"], "VISMMOE_LLAMA_CPP_BIN")


def test_bench_exports_the_llama_type(tmp_path, monkeypatch):
    """The llama.cpp bench's GGUF files per --llama-type: a quantized text model with an f16 projector (q4_k_m
    through llama-quantize from the llama.cpp build folder), a float type for both files."""
    from vismmoe.bench.llama_cpp import _gguf_files
    monkeypatch.delenv("VISMMOE_LLAMA_CPP_BIN", raising=False)
    g = tmp_path / "g"
    assert _gguf_files(BUNDLED, str(g), "q8_0") == (str(g / "vqa-moe-q8_0.gguf"), str(g / "mmproj-vqa-moe-f16.gguf"))
    assert _tensors(str(g / "vqa-moe-q8_0.gguf"))["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    bin_dir = _fake_llama_quantize(tmp_path)
    assert _gguf_files(BUNDLED, str(g), "q4_k_m", bin_dir)[0] == str(g / "vqa-moe-q4_k_m.gguf")
    assert (tmp_path / "args").read_text().split()[-1] == "Q4_K_M"
    assert _gguf_files(BUNDLED, str(g), "f16") == (str(g / "vqa-moe-f16.gguf"), str(g / "mmproj-vqa-moe-f16.gguf"))


def test_bench_extra_gguf_rows(tmp_path):
    """--extra-gpu-types adds one all-on-device llama.cpp row per type, run on its own GGUF file and named after it
    (llama.cpp itself is a stand-in here); the table shows each llama.cpp row's GGUF type."""
    from vismmoe.bench.llama_cpp import Run, side_by_side, vqa_requests
    from vismmoe.bench.llama_cpp_report import markdown

    class Stand:
        def __init__(self, text_gguf):
            self.text_gguf, self.systems = text_gguf, set()

        def run(self, system, req, placement, gpu):
            self.systems.add(system)
            return Run(system=system, text="yes", ttft_s=0.1, tpot_s=0.01, request_s=0.2, new_tokens=2)

    main_, f16 = Stand("/g/m-q4_k_m.gguf"), Stand("/g/m-f16.gguf")
    res = side_by_side(BUNDLED, main_, vqa_requests(1, 2, str(tmp_path)), [], 1, "cpu", None, False, False,
                       progress=lambda m: None, extra={"f16": f16})
    rows = {r["system"]: r for r in res["rows"]}
    assert set(rows) == {"vismmoe@all", "llama.cpp-cpu", "llama.cpp-cpu-f16"}
    assert main_.systems == {"llama.cpp-cpu"} and f16.systems == {"llama.cpp-cpu-f16"}
    assert rows["llama.cpp-cpu"]["gguf"] == "m-q4_k_m.gguf" and rows["llama.cpp-cpu-f16"]["gguf"] == "m-f16.gguf"
    table = markdown(dict(res, title="t"))
    assert "| llama.cpp-cpu-f16 | f16 | all |" in table and "| llama.cpp-cpu | q4_k_m | all |" in table
    assert "| vismmoe@all |  | all |" in table


def test_bench_refuses_unknown_extra_types(tmp_path, capsys):
    from vismmoe.bench.llama_cpp import main as bench
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "llama-mtmd-cli").write_text("")
    assert bench(["--llama-cpp-bin", str(tmp_path / "bin"), "--gguf", str(tmp_path / "g"), "--out",
                  str(tmp_path / "o"), "--extra-gpu-types", "f16,q5_k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "q5_k" in err[0]
    assert not (tmp_path / "g").exists()


# ---- with llama.cpp's llama-quantize (VISMMOE_LLAMA_CPP_BIN=BUILD/bin, scripts/build_llama_cpp.sh) ----------------

def _llama_quantize_bin() -> str:
    bin_dir = os.environ.get("VISMMOE_LLAMA_CPP_BIN")
    if not bin_dir or not os.path.exists(os.path.join(bin_dir, "llama-quantize")):
        pytest.skip("set VISMMOE_LLAMA_CPP_BIN to a folder with llama-quantize")
    return bin_dir


def _expected_type(name: str, shape: tuple, quant: str, layers: int, experts: int):
    """The type docs/llama-cpp.md says a text tensor of torch shape `shape` gets in `quant` (q4_k or q4_k_m)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or "ffn_gate_inp" in name:
        return Q.F32
    want = Q.Q4_K
    if quant == "q4_k_m":
        i = int(name.split(".")[1]) if name.startswith("blk.") else -1
        more = i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
        if name == "output.weight" or (more and ("attn_v." in name or "ffn_down" in name)):
            want = Q.Q6_K
        if experts == 8:
            want = {"attn_v.": Q.Q8_0, "attn_k.": Q.Q8_0, "attn_output.": Q.Q5_K}.get(
                next((k for k in ("attn_v.", "attn_k.", "attn_output.") if k in name), ""), want)
    if shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
        want = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0, Q.Q5_K: Q.Q5_1}.get(want, want)
    return Q.F16 if shape[-1] % gguf.GGML_QUANT_SIZES[want][0] else want


@pytest.mark.parametrize("quant", ["q4_k", "q4_k_m"])
def test_llama_quantize_types_and_values(quant, tmp_path):
    """The bundled model through llama-quantize: every tensor has the type of the stated rule, and the expert
    banks (Q4_K gate/up; down rows of 128 fall back to Q5_0, or Q8_0 where Q4_K_M asks Q6_K) and attention dequantize
    to the checkpoint within their steps."""
    from vismmoe.export_gguf import export
    from vismmoe.store import CheckpointReader
    bin_dir = _llama_quantize_bin()
    res = export(BUNDLED, str(tmp_path), dtype="bf16", quant=quant, llama_quantize=bin_dir)
    ts = _tensors(res["text"]["path"])
    assert len(ts) == 99
    for name, t in ts.items():
        shape = tuple(reversed(t.shape.tolist()))
        assert t.tensor_type == _expected_type(name, shape, quant, 8, 32), (name, t.tensor_type.name)
    rd = CheckpointReader(BUNDLED, 256, 128)
    for layer in (0, 4):
        for which, src in _expert_sources(rd, layer, 32, 128).items():
            _assert_close(ts[f"blk.{layer}.ffn_{which}_exps.weight"], src, f"{layer} {which}")
    _assert_close(ts["blk.0.attn_v.weight"], rd.tensor("model.language_model.layers.0.self_attn.v_proj.weight"),
                  "attn_v")


def test_llama_quantize_glm4v_eight_experts(tiny_dirs, tmp_path):
    """Tiny GLM-4.5V (8 experts, rows of 48 and 64): Q4_K_M's 8-expert attention types and the fallbacks of rows
    no 256-block fits."""
    from vismmoe.export_gguf import export
    bin_dir = _llama_quantize_bin()
    d = tiny_dirs["glm4v_moe"]
    res = export(d, str(tmp_path), dtype="f32", quant="q4_k_m", llama_quantize=bin_dir)
    tc = json.loads(open(os.path.join(d, "config.json")).read())["text_config"]
    for name, t in _tensors(res["text"]["path"]).items():
        shape = tuple(reversed(t.shape.tolist()))
        want = _expected_type(name, shape, "q4_k_m", tc["num_hidden_layers"], tc["n_routed_experts"])
        assert t.tensor_type == want, (name, t.tensor_type.name)


def test_q8_0_equals_llama_quantize(exported, q8_exported, tmp_path):
    """Our Q8_0 file holds the bytes llama-quantize writes for Q8_0 from the bf16 export, tensor by tensor."""
    import subprocess
    exe = os.path.join(_llama_quantize_bin(), "llama-quantize")
    theirs = str(tmp_path / "q8.gguf")
    subprocess.run([exe, exported["text"]["path"], theirs, "Q8_0"], check=True, capture_output=True)
    ours, ref = _tensors(q8_exported["text"]["path"]), _tensors(theirs)
    assert ours.keys() == ref.keys()
    for name, t in ref.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(ours[name].data, t.data), name
