"""Quantized GGUF exports (`export-gguf --type q8_0|q4_k|q4_k_m`) and the llama.cpp bench on them.

Each file is read back with `gguf.GGUFReader`: every tensor's type follows the rule docs/llama-cpp.md states, and
the dequantized experts (and attention, embedding, output) are the checkpoint's values within the step of their
block. Q8_0 is written here with the gguf package; Q4_K and Q4_K_M need llama.cpp's llama-quantize: a stand-in
binary tests how it is called, and the real one (VISMMOE_LLAMA_CPP_BIN=BUILD/bin, scripts/build_llama_cpp.sh) the
files it makes, which tests skip without it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vismmoe.checkpoints import BUNDLED
from vismmoe.errors import UserError

from .test_export_gguf import _field, _llama_bin, _one_line_error, _tensors

gguf = pytest.importorskip("gguf")


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
    from vismmoe.tools.export_gguf import export
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
    from vismmoe.offload.store import CheckpointReader
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
    from vismmoe.tools.export_gguf import export
    from vismmoe.offload.store import CheckpointReader
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
    from vismmoe.tools.export_gguf import export
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
    from vismmoe.tools.export_gguf import export
    monkeypatch.delenv("VISMMOE_LLAMA_CPP_BIN", raising=False)
    bin_dir = _fake_llama_quantize(tmp_path)
    out = tmp_path / "g"
    res = export(BUNDLED, str(out), dtype="f16", quant="q4_k", llama_quantize=bin_dir)
    src, dst = str(out / "vqa-moe-f16.gguf"), str(out / "vqa-moe-q4_k.gguf")
    args = (tmp_path / "args").read_text().split()          # it writes a temporary beside dst, renamed when done
    assert args[:2] == ["--pure", src] and args[3] == "Q4_K_S"
    assert os.path.dirname(args[2]) == str(out) and ".vqa-moe-q4_k." in args[2] and args[2].endswith(".gguf")
    assert res["text"]["path"] == dst and res["text"]["source"] == src and os.path.exists(src)
    assert res["mmproj"]["path"] == str(out / "mmproj-vqa-moe-f16.gguf")
    monkeypatch.setenv("VISMMOE_LLAMA_CPP_BIN", bin_dir)                    # found next to the llama.cpp build
    export(BUNDLED, str(out), dtype="bf16", quant="q4_k_m")
    args = (tmp_path / "args").read_text().split()
    assert args[0] == str(out / "vqa-moe-bf16.gguf") and ".vqa-moe-q4_k_m." in args[1] and args[2] == "Q4_K_M"


def test_llama_quantize_failure_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VISMMOE_LLAMA_CPP_BIN", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    bin_dir = _fake_llama_quantize(tmp_path, fail=True)
    out = tmp_path / "g"
    _one_line_error(capsys, ["export-gguf", "--out", str(out), "--type", "q4_k_m", "--llama-quantize", bin_dir],
                    "failed to quantize")
    assert not (out / "vqa-moe-q4_k_m.gguf").exists() and (out / "vqa-moe-bf16.gguf").exists()
    _one_line_error(capsys, ["export-gguf", "--out", str(tmp_path / "h"), "--type", "q4_k"], "VISMMOE_LLAMA_CPP_BIN")


@pytest.mark.slow
def test_llama_cpp_answers_on_q8_0(q8_exported, tmp_path):
    """Needs a llama.cpp build: llama.cpp runs the Q8_0 export (a Q8_0 text model, the bf16 projector) and answers
    the test questions right."""
    bin_dir = _llama_bin()
    from vismmoe.bench.llama_cpp import Llama, vqa_requests
    llama = Llama(bin_dir, q8_exported["text"]["path"], q8_exported["mmproj"]["path"], ctx=2048,
                  image_tokens=(1, 196), ignore_eos=False)
    for r in vqa_requests(3, 4, str(tmp_path)):
        run = llama.run("llama.cpp", r, [], gpu=False)
        assert run.correct, (r.prompt, run.text, r.answer)


# ---- the llama.cpp bench on quantized files -----------------------------------------------------------------------

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
    from vismmoe.tools.export_gguf import export
    from vismmoe.offload.store import CheckpointReader
    bin_dir = _llama_bin("llama-quantize")
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
    from vismmoe.tools.export_gguf import export
    bin_dir = _llama_bin("llama-quantize")
    d = tiny_dirs["glm4v_moe"]
    res = export(d, str(tmp_path), dtype="f32", quant="q4_k_m", llama_quantize=bin_dir)
    tc = json.loads(open(os.path.join(d, "config.json")).read())["text_config"]
    for name, t in _tensors(res["text"]["path"]).items():
        shape = tuple(reversed(t.shape.tolist()))
        want = _expected_type(name, shape, "q4_k_m", tc["num_hidden_layers"], tc["n_routed_experts"])
        assert t.tensor_type == want, (name, t.tensor_type.name)


def test_q8_0_equals_llama_quantize(q8_exported, tmp_path):
    """Our Q8_0 file holds the bytes llama-quantize writes for Q8_0 from the bf16 export, tensor by tensor."""
    import subprocess

    from vismmoe.tools.export_gguf import export
    exe = os.path.join(_llama_bin("llama-quantize"), "llama-quantize")
    theirs = str(tmp_path / "q8.gguf")
    bf16 = export(BUNDLED, str(tmp_path), dtype="bf16")["text"]["path"]
    subprocess.run([exe, bf16, theirs, "Q8_0"], check=True, capture_output=True)
    ours, ref = _tensors(q8_exported["text"]["path"]), _tensors(theirs)
    assert ours.keys() == ref.keys()
    for name, t in ref.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(ours[name].data, t.data), name
