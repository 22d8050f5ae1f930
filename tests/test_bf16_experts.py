"""The bf16 expert format (formats/bf16.py): dense experts stored in bfloat16 for a float32 model.

For a bf16 checkpoint (the bundled model) it is the dense float32 run in half the expert bytes: the same values, so
the same logits bit for bit on every decode step. For float32 weights it rounds them (a quantization): exact
against itself with every expert resident, down to the smallest legal budget."""

from __future__ import annotations

import pytest
import torch

from vismmoe import load
from vismmoe.cli.app import main
from vismmoe.cpu.native import compiler
from vismmoe.errors import UserError
from vismmoe.formats import Bf16Format, DenseFormat, make_format

from .conftest import POLICIES, fast_step_logits

needs_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler")
PROMPT = "What is in the picture?"
NEW = 6
TEACHER = list(range(100, 100 + NEW))


def _no_eos(eng):
    """`eng` decoding past its end-of-turn ids (the bundled model answers in one or two tokens)."""
    eng.eos_ids = set()
    return eng


def test_blob_is_half_the_float32_dense_blob_and_rounds_to_nearest_even():
    H, I = 96, 40
    fmt, dense = make_format("bf16", H, I, torch.float32), make_format("dense", H, I, torch.float32)
    assert isinstance(fmt, Bf16Format) and fmt.pool_dtype == torch.bfloat16 and fmt.dtype == torch.float32
    assert fmt.nbytes % 512 == 0 and fmt.nbytes <= dense.nbytes // 2 + 512
    g = torch.Generator().manual_seed(0)
    gu, dn = torch.randn(3, 2 * I, H, generator=g), torch.randn(3, H, I, generator=g)
    blobs = torch.full((3, fmt.numel), 7.0, dtype=torch.bfloat16)
    fmt.quantize(gu, dn, blobs)
    g2, d2 = fmt.dequantize(blobs)
    assert g2.dtype == d2.dtype == torch.float32
    assert torch.equal(g2, gu.bfloat16().float()) and torch.equal(d2, dn.bfloat16().float())
    assert not torch.equal(g2, gu)                              # float32 weights really were rounded
    assert torch.count_nonzero(blobs[:, 3 * I * H:]) == 0       # the padding is zeros
    exact = gu.bfloat16().float()                               # bf16 values (a bf16 checkpoint) come back as they were
    fmt.quantize(exact, dn.bfloat16().float(), blobs)
    assert torch.equal(fmt.dequantize(blobs)[0], exact)


def test_a_bf16_model_gets_the_dense_format_and_other_dtypes_are_refused():
    assert isinstance(make_format("bf16", 64, 32, torch.bfloat16), DenseFormat)
    with pytest.raises(UserError, match="float16"):
        make_format("bf16", 64, 32, torch.float16)
    with pytest.raises(UserError, match="no knob"):
        make_format("bf16:group=8", 64, 32, torch.float32)


def test_a_float32_model_on_cuda_is_refused_in_one_line(tiny_dirs, monkeypatch):
    """The Triton decode kernels read weights in the activation dtype: bf16 blobs in a float32 CUDA model are
    refused before any weight is read (the device is faked: nothing reaches CUDA before the check)."""
    from vismmoe.engine import loading
    monkeypatch.setattr(loading, "_resolve_device", lambda d: torch.device("cuda"))
    with pytest.raises(UserError, match="no GPU kernel") as e:
        load(tiny_dirs["qwen3_vl_moe"], expert_format="bf16", dtype="float32")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [["quantize", "--format", "bf16"], ["make-shape", "--shape", "qwen3-30b-a3b",
                                                                    "--layers", "1", "--format", "bf16"]])
def test_writing_a_bf16_checkpoint_is_one_line(argv, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bf16 writes nothing new" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bundled_model_in_bf16_is_the_float32_run_bit_for_bit(bundled_engine, image_file):
    """The bundled checkpoint is bf16: stored as bf16 experts it gives the dense float32 run's logits bit for bit
    on the fast step (teacher-forced) and its greedy tokens on the eager step, in half the expert bytes."""
    dense = _no_eos(bundled_engine.fork(expert_budget="25%", decode="fast"))
    half = _no_eos(load(None, expert_format="bf16", expert_budget="25%", decode="fast"))
    assert half.layout.spec() == "bf16" and half.store.nbytes() * 2 <= dense.store.nbytes() + 512 * 256
    inputs = dense.prepare([image_file], [PROMPT])
    want, want_logits, _ = fast_step_logits(dense, inputs, NEW, TEACHER)
    got, got_logits, stats = fast_step_logits(half, inputs, NEW, TEACHER)
    assert got == want and stats["misses"] > 0 and len(got_logits) == NEW - 1
    assert all(torch.equal(a, b) for a, b in zip(got_logits, want_logits))
    assert half.fast_step().land_slots == dense.fast_step().land_slots > 0    # misses land in slots alike (CPU)
    eager = [half.fork(decode="eager"), dense.fork(decode="eager")]
    a, b = (e.generate(image_file, PROMPT, max_new_tokens=NEW).token_ids for e in eager)
    assert a == b


@needs_cc
def test_native_step_reads_bf16_experts_bit_for_bit_as_float32(bundled_engine, image_file, tmp_path, monkeypatch):
    """The native step (cpu/native/, VM_BF16 rows) over bf16 blobs gives the float32 blobs' logits bit for bit (the
    same values, the same code), fetching misses or reading them in place (`--cpu-experts on`, against the float32
    run with the same switch: CPU-computed prefill misses are only numerically equivalent)."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    dense = bundled_engine.fork(expert_budget="25%", decode="native")
    half = load(None, expert_format="bf16", expert_budget="25%", decode="native")
    inputs = dense.prepare([image_file], [PROMPT])
    for a, b in ((dense, half), (dense.fork(cpu_experts="on"), half.fork(cpu_experts="on"))):
        want, want_logits, _ = fast_step_logits(_no_eos(a), inputs, NEW, TEACHER)
        got, got_logits, _ = fast_step_logits(_no_eos(b), inputs, NEW, TEACHER)
        assert got == want and len(got_logits) == NEW - 1
        assert all(torch.equal(x, y) for x, y in zip(got_logits, want_logits))


@pytest.mark.parametrize("policy", POLICIES)
def test_float32_weights_rounded_to_bf16_are_exact_down_to_the_smallest_budget(policy, tiny_dirs, image_file):
    """A float32 checkpoint (the tiny model's random weights) stored as bf16 experts: the greedy tokens of the same
    format with every expert resident, for each policy at the smallest legal budget, eager and fast, both tiers."""
    d = tiny_dirs["qwen3_vl_moe"]
    full = load(d, expert_format="bf16")
    want = full.generate(image_file, PROMPT, max_new_tokens=8).token_ids
    least = str(full.geometry.top_k * full.layout.nbytes)
    runs = [dict(decode="eager"), dict(decode="fast"), dict(decode="fast", expert_tier="disk")]
    for opts in runs:
        eng = load(d, expert_format="bf16", expert_budget=least, policy=policy, **opts)
        gen = eng.generate(image_file, PROMPT, max_new_tokens=8)
        assert gen.token_ids == want, (policy, opts)
        stats = gen.stats
        assert stats["expert_bytes_peak"] <= stats["expert_budget_bytes"] == int(least)
        assert stats["misses"] > 0
