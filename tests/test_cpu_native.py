"""The native CPU expert kernel (cpu/native/): its results against float64 references of the formats' own
dequantization and against the torch kernel, the build (cache key, rebuild on a changed source, two builds at once,
no compiler), and the switch `VISMMOE_CPU_KERNEL`.

Tolerance: the kernel accumulates in float32, so against a float64 reference of the same weights a row differs by
float32 summation error: within 1e-5 of the largest output (measured: about 1e-7). Against the torch kernel the
same for float32 inputs; for bf16 experts the torch kernel rounds gate/up to bf16 and the native one does not, so
there 2e-2 (the tolerance of two bf16 summation orders, as tests/test_cpu_experts.py uses)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from vismmoe.cpu import executor as ex_mod
from vismmoe.cpu import native
from vismmoe.cpu import rates as rates_mod
from vismmoe.cpu.executor import AUTO_MAX_TOKENS, AUTO_MAX_TOKENS_QUANTIZED, CpuExecutor
from vismmoe.errors import UserError
from vismmoe.formats import make_format

needs_cc = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")
REL_TOL = 1e-5          # native against a float64 reference, relative to the largest output
BF16_TOL = 2e-2         # native against torch for bf16 experts (torch rounds gate/up to bf16)


@pytest.fixture
def fresh_native():
    """The process's kernel forgotten before and after (a test that breaks the build leaves no broken state)."""
    native.reset()
    yield
    native.reset()


def _blobs(spec, H, I, dtype, n=2, seed=0):
    fmt = make_format(spec, H, I, dtype)
    g = torch.Generator().manual_seed(seed)
    blobs = torch.empty(n, fmt.numel, dtype=fmt.pool_dtype)
    fmt.quantize(torch.randn(n, 2 * I, H, generator=g) * 0.05, torch.randn(n, H, I, generator=g) * 0.05, blobs)
    return fmt, blobs


def _reference(fmt, blob, x, w, act="silu"):
    """float64 over the weights as stored (dense) or dequantized exactly in float32 (fp8, int4: the torch kernel's
    weights, tested equal to the formats' references); x rounded as the executor rounds it (dense: to its dtype)."""
    gu, dn = (t.double() for t in CpuExecutor(fmt, kernel="torch").weights(blob))
    x = (x.to(fmt.dtype) if fmt.name == "dense" else x.float()).double()
    h = x @ gu.T
    g, u = h.chunk(2, dim=-1)
    a = torch.nn.functional.silu(g) if act == "silu" else torch.nn.functional.gelu(g, approximate="tanh")
    return (a * u) @ dn.T * w.double()[:, None]


# (spec, dtype, H, I): odd shapes where the format takes them (rows not multiples of the vector width, fp8's last
# block partial, row blocks of 4 with rows left over), an int4 group that is a whole down row (I = group)
CASES = [("dense", torch.float32, 37, 19), ("dense", torch.bfloat16, 45, 27), ("bf16", torch.float32, 45, 27),
         ("fp8", torch.float32, 200, 72),
         ("fp8", torch.bfloat16, 136, 130), ("int4", torch.float32, 256, 128),
         ("int4:group=16,sym=0", torch.float32, 272, 48), ("int4:group=32,sym=0", torch.float32, 96, 32)]


@needs_cc
@pytest.mark.parametrize("spec,dtype,H,I", CASES)
@pytest.mark.parametrize("t", [1, 3, 8])
def test_native_matches_the_formats_reference(spec, dtype, H, I, t):
    """Every format at t tokens, routing weights applied: within REL_TOL of float64 over the format's own
    dequantized weights, and close to the torch kernel."""
    fmt, blobs = _blobs(spec, H, I, dtype)
    nat, tor = CpuExecutor(fmt, kernel="native"), CpuExecutor(fmt, kernel="torch")
    assert nat.native is not None and nat.kernel_key.startswith("native-")
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, H, generator=g).to(dtype)
    w = torch.rand(t, generator=g) + 0.5
    for e in range(blobs.shape[0]):
        got = nat.expert(blobs[e], x, w)
        want = _reference(fmt, blobs[e], x, w)
        assert got.dtype == torch.float32 and got.shape == (t, H)
        assert (got.double() - want).abs().max().item() <= REL_TOL * want.abs().max().item()
        tol = BF16_TOL if (fmt.name == "dense" and dtype == torch.bfloat16) else REL_TOL
        torch.testing.assert_close(got, tor.expert(blobs[e], x, w), rtol=0, atol=tol * want.abs().max().item())


class _Experts(torch.nn.Module):
    """What the executor sees of a transformers experts module: `_apply_gate` (transformers' default one) and
    `act_fn`."""

    def __init__(self, act_fn):
        super().__init__()
        self.act_fn = act_fn

    from transformers.integrations.moe import _default_apply_gate as _apply_gate


@needs_cc
def test_gelu_tanh_gate_is_computed_natively():
    """Gemma 4's gate (transformers' default gate over GELUTanh) runs in the kernel and matches GELU-tanh."""
    from transformers.activations import ACT2FN
    gate = _Experts(ACT2FN["gelu_pytorch_tanh"])._apply_gate
    assert native.activation(gate) == native.GELU_TANH
    fmt, blobs = _blobs("fp8", 256, 128, torch.float32)
    x, w = torch.randn(3, 256), torch.rand(3)
    got = CpuExecutor(fmt, kernel="native").expert(blobs[0], x, w, gate=gate)
    want = _reference(fmt, blobs[0], x, w, act="gelu_tanh")
    assert (got.double() - want).abs().max().item() <= REL_TOL * want.abs().max().item()


@needs_cc
def test_a_gate_the_kernel_does_not_know_runs_on_torch(monkeypatch):
    """A clamped gate (no kernel id): the torch kernel computes it, the same values as the torch executor's."""
    def clamped(h):
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g).clamp(max=0.01) * u
    assert native.activation(clamped) is None
    assert native.activation(_Experts(torch.nn.ReLU())._apply_gate) is None
    fmt, blobs = _blobs("dense", 64, 32, torch.float32)
    nat = CpuExecutor(fmt, kernel="native")
    monkeypatch.setattr(native.Native, "expert", lambda *a, **k: pytest.fail("the native kernel ran"))
    x, w = torch.randn(2, 64), torch.rand(2)
    assert torch.equal(nat.expert(blobs[0], x, w, gate=clamped),
                       CpuExecutor(fmt, kernel="torch").expert(blobs[0], x, w, gate=clamped))


def _check_every_e4m3_byte(lib=None):
    """All 256 e4m3 codes (subnormals, both zeros) through the kernel: gate row = every code, up row = 1, down = 1,
    token k one-hot at column k, so y[k] = SiLU(e4m3(k)), the table's value. The two NaN codes (placed apart:
    0 x NaN is NaN, so one in the row makes every dot product NaN) give NaN, as the torch kernel does."""
    H, I = 256, 1
    fmt = make_format("fp8", H, I, torch.float32)
    blob = torch.zeros(fmt.numel, dtype=torch.uint8)
    qgu, qdn, sg, su, sd = fmt._parts(blob[None])
    codes = torch.arange(256, dtype=torch.uint8)
    nan = (codes & 0x7F) == 0x7F
    qgu.view(torch.uint8)[0, 0] = torch.where(nan, 0, codes)
    qgu[0, 1] = torch.ones(H).to(torch.float8_e4m3fn)
    qdn[0] = torch.ones(H, 1).to(torch.float8_e4m3fn)
    for s in (sg, su, sd):
        s.fill_(1.0)
    ex = CpuExecutor(fmt, kernel="native")
    ex.native = lib or ex.native
    y = ex.expert(blob, torch.eye(H))
    want = torch.nn.functional.silu(torch.where(nan, 0, codes).view(torch.float8_e4m3fn).float())
    torch.testing.assert_close(y[:, 0], want, rtol=1e-6, atol=0)
    assert torch.equal(y[:, 0], y[:, -1])
    for code in (0x7F, 0xFF):
        qgu.view(torch.uint8)[0, 0, 5] = code
        assert ex.expert(blob, torch.eye(H)[:3]).isnan().all()
        assert CpuExecutor(fmt, kernel="torch").expert(blob, torch.eye(H)[:3]).isnan().all()


@needs_cc
def test_every_e4m3_byte_converts_exactly():
    _check_every_e4m3_byte()


@needs_cc
def test_pairs_use_the_kernel_and_keep_their_contract(monkeypatch):
    """`pairs` under native: the chosen experts in ONE kernel call, the pairs of the chosen experts in order, rows
    equal to per-expert calls."""
    calls = []
    real = native.Native.experts
    monkeypatch.setattr(native.Native, "experts", lambda self, lay, blobs, *a: calls.append(len(blobs)) or
                        real(self, lay, blobs, *a))
    fmt, blobs = _blobs("int4:group=64", 128, 64, torch.float32, n=4)
    hidden = torch.randn(5, 128)
    idx = np.array([[0, 2], [1, 2], [3, 0], [2, 1], [0, 3]])
    weights = torch.rand(5, 2)
    ex = CpuExecutor(fmt, kernel="native")
    pick, rows = ex.pairs(lambda e: blobs[e], hidden, idx, weights, [2, 0])
    assert calls == [2]
    assert pick.tolist() == [1, 3, 6, 0, 5, 8]
    want = torch.cat([ex.expert(blobs[e], hidden[pick[i] // 2][None], weights.reshape(-1)[pick[i]][None])
                      for i, e in enumerate([2, 2, 2, 0, 0, 0])])
    assert torch.equal(rows, want)          # rows are independent: one call or many, the same arithmetic


@needs_cc
def test_pairs_mix_the_kernel_and_torch_in_the_experts_order(monkeypatch):
    """auto: an expert with more tokens than the kernel takes goes to torch, the others to one kernel call; an
    expert without pairs is skipped; a staged store (`release`) takes its blobs one at a time. The order and the
    rows stay those of per-expert calls."""
    monkeypatch.setattr("vismmoe.cpu.executor.AUTO_MAX_TOKENS", 2)
    fmt, blobs = _blobs("dense", 128, 64, torch.float32, n=4)
    hidden = torch.randn(6, 128)
    idx = np.array([[1, 0], [1, 3], [0, 1], [2, 0], [0, 2], [2, 3]])     # pairs: expert 0 4, 1 3, 2 3, 3 2
    weights = torch.rand(6, 2)
    ex = CpuExecutor(fmt, kernel="auto")
    assert ex.max_native_tokens == 2
    calls = []
    real = native.Native.experts
    monkeypatch.setattr(native.Native, "experts", lambda self, lay, bl, *a: calls.append(len(bl)) or
                        real(self, lay, bl, *a))
    pick, rows = ex.pairs(lambda e: blobs[e], hidden, idx, weights, [3, 0, 2, 1])
    order = [3, 0, 2, 1]
    flat = idx.reshape(-1)
    want_pick = [int(q) for e in order for q in np.flatnonzero(flat == e)]
    assert pick.tolist() == want_pick
    assert calls == [1]                             # only expert 3 (2 pairs) fits the kernel; the rest: torch
    ref = CpuExecutor(fmt, kernel="torch")
    want = torch.cat([ref.expert(blobs[int(flat[q])], hidden[q // 2][None], weights.reshape(-1)[q][None])
                      for q in want_pick])
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-6)
    released = []
    pick2, rows2 = ex.pairs(lambda e: blobs[e], hidden, idx, weights, order, release=released.append)
    assert len(released) == 4 and calls == [1, 1]     # staged: one expert a call, each blob released
    assert pick2.tolist() == want_pick
    torch.testing.assert_close(rows2, rows, rtol=0, atol=0)
    empty_pick, empty_rows = ex.pairs(lambda e: blobs[e], hidden, np.zeros((6, 2), dtype=np.int64), weights, [3])
    assert empty_pick.numel() == 0 and empty_rows.shape == (0, 128)


@needs_cc
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="builds for baseline x86-64")
def test_the_portable_paths_compute_the_same(tmp_path):
    """The kernel built for baseline x86-64 (no AVX, no F16C: 4-float vectors and the bit-operation e4m3
    conversion, the paths of processors without them) gives the same results within the same tolerance."""
    lib = native.load(native.build(native.SOURCE, str(tmp_path), flag_sets=(("-O2", "-march=x86-64"),)))
    assert not lib.info["avx2"] and not lib.info["f16c"]
    _check_cases(lib, CASES)
    _check_every_e4m3_byte(lib)


def _check_cases(lib, cases):
    """Each case of `cases` computed by the library `lib` at 1 and 5 tokens within REL_TOL of the reference."""
    for spec, dtype, H, I in cases:
        fmt, blobs = _blobs(spec, H, I, dtype, n=1)
        ex = CpuExecutor(fmt, kernel="native")
        ex.native = lib
        for t in (1, 5):
            x, w = torch.randn(t, H).to(dtype), torch.rand(t) + 0.5
            want = _reference(fmt, blobs[0], x, w)
            got = ex.expert(blobs[0], x, w)
            assert (got.double() - want).abs().max().item() <= REL_TOL * want.abs().max().item(), (spec, t)


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@needs_cc
@pytest.mark.parametrize("vl,march", [(4, None), (8, None), (16, None), (8, "haswell"), (8, "native")])
def test_every_vector_width_computes_the_same(vl, march, tmp_path):
    """The kernel built with each vector width on this host (`-DVM_VL`: the widths of other processors, through the
    portable loads; with -march=haswell or native at width 8, the AVX2 intrinsics, also on an AVX-512 host): every
    format within the same tolerance, int4 groups of 16 included, which are narrower than a 16-float vector (each
    lane then takes its own group's scale)."""
    if march == "haswell" and not {"avx2", "fma", "f16c"} <= _host_flags():
        pytest.skip("the host cannot run AVX2 code")
    flags = ("-O2", f"-DVM_VL={vl}") + ((f"-march={march}",) if march else ())
    lib = native.load(native.build(native.SOURCE, str(tmp_path), flag_sets=(flags,)))
    assert lib.lib.vm_vl() == vl
    if march and "avx2" in _host_flags():
        assert lib.info["avx2"]
    _check_cases(lib, CASES + [("int4:group=16", torch.float32, 96, 48)])


# ---- the switch ------------------------------------------------------------------------------------------------
@needs_cc
def test_switch_picks_the_kernel(monkeypatch):
    fmt, blobs = _blobs("dense", 64, 32, torch.float32)
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", "native")
    ex = CpuExecutor(fmt)
    assert ex.native is not None and ex.max_native_tokens is None and ex.kernel_key == ex_mod.kernel_key(fmt)
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", " Auto ")
    ex = CpuExecutor(fmt)
    assert ex.max_native_tokens == AUTO_MAX_TOKENS and ex.kernel_key.endswith(f"-to{AUTO_MAX_TOKENS}")
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", "")
    assert CpuExecutor(fmt).kernel_key == ex.kernel_key                     # unset / empty: auto
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", "torch")
    monkeypatch.setattr(native, "kernel", lambda: pytest.fail("torch never builds the kernel"))
    ex = CpuExecutor(fmt)
    assert ex.native is None and ex.kernel_key == "torch" == ex_mod.kernel_key(fmt)


@needs_cc
def test_auto_hands_many_tokens_to_torch(monkeypatch):
    """auto: the kernel up to AUTO_MAX_TOKENS tokens per expert, torch's GEMM beyond; native: any count."""
    calls = []
    real = native.Native.experts
    monkeypatch.setattr(native.Native, "experts", lambda self, *a: calls.append(a[3].shape[0]) or real(self, *a))
    fmt, blobs = _blobs("dense", 64, 32, torch.float32)
    for t in (1, AUTO_MAX_TOKENS, AUTO_MAX_TOKENS + 1):
        CpuExecutor(fmt, kernel="auto").expert(blobs[0], torch.randn(t, 64))
    CpuExecutor(fmt, kernel="native").expert(blobs[0], torch.randn(AUTO_MAX_TOKENS + 1, 64))
    assert calls == [1, AUTO_MAX_TOKENS, AUTO_MAX_TOKENS + 1]


@needs_cc
@pytest.mark.parametrize("spec", ["fp8", "int4:group=16"])
def test_auto_keeps_quantized_experts_on_the_kernel_to_more_tokens(monkeypatch, spec):
    """auto, fp8 and int4: the kernel up to AUTO_MAX_TOKENS_QUANTIZED tokens per expert (torch would dequantize
    the whole expert first), torch's GEMM beyond."""
    assert AUTO_MAX_TOKENS_QUANTIZED > AUTO_MAX_TOKENS
    calls = []
    real = native.Native.experts
    monkeypatch.setattr(native.Native, "experts", lambda self, *a: calls.append(a[3].shape[0]) or real(self, *a))
    fmt, blobs = _blobs(spec, 64, 32, torch.float32)
    ex = CpuExecutor(fmt, kernel="auto")
    assert ex.max_native_tokens == AUTO_MAX_TOKENS_QUANTIZED
    for t in (AUTO_MAX_TOKENS + 1, AUTO_MAX_TOKENS_QUANTIZED, AUTO_MAX_TOKENS_QUANTIZED + 1):
        ex.expert(blobs[0], torch.randn(t, 64))
    assert calls == [AUTO_MAX_TOKENS + 1, AUTO_MAX_TOKENS_QUANTIZED]


def test_a_bad_switch_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", "fast")
    with pytest.raises(UserError, match="VISMMOE_CPU_KERNEL='fast'"):
        CpuExecutor(make_format("dense", 64, 32, torch.float32))


def test_cli_refuses_a_bad_switch_value(monkeypatch, capsys, tiny_dirs):
    """One line, exit 2, from a run that would use the CPU side."""
    from vismmoe.cli.app import main
    model = tiny_dirs["qwen3_vl_moe"]
    capsys.readouterr()
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", "fast")
    assert main(["generate", "--model", model, "--cpu-experts", "on", "--prompt", "hi",
                 "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "VISMMOE_CPU_KERNEL" in err[0]


# ---- the build -------------------------------------------------------------------------------------------------
def test_no_compiler_falls_back_to_torch(monkeypatch, caplog, fresh_native):
    """No compiler: one warning line, the executor on torch (also when native is asked for), the torch result."""
    monkeypatch.setattr(native, "compiler", lambda: None)
    fmt, blobs = _blobs("fp8", 128, 64, torch.float32)
    x, w = torch.randn(2, 128), torch.rand(2)
    with caplog.at_level(logging.WARNING, logger="vismmoe"):
        for mode in ("auto", "native"):
            ex = CpuExecutor(fmt, kernel=mode)
            assert ex.native is None and ex.kernel_key == "torch"
            assert torch.equal(ex.expert(blobs[0], x, w), CpuExecutor(fmt, kernel="torch").expert(blobs[0], x, w))
    lines = [r.getMessage() for r in caplog.records if "native CPU expert kernel" in r.getMessage()]
    assert len(lines) == 1 and "no C compiler" in lines[0]
    assert native.failure() is not None


def test_a_failing_compiler_falls_back_to_torch(monkeypatch, tmp_path, fresh_native):
    """A compiler that fails every flag set (here: `false`): torch, no error, nothing half-written in the cache."""
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program")
    monkeypatch.setattr(native, "compiler", lambda: false)
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    fmt, _ = _blobs("dense", 64, 32, torch.float32)
    assert CpuExecutor(fmt).kernel_key == "torch"
    assert os.listdir(tmp_path / "native") == []


@needs_cc
def test_changed_source_builds_anew(tmp_path):
    src = tmp_path / "experts.c"
    shutil.copy(native.SOURCE, src)
    out = tmp_path / "lib"
    first = native.build(str(src), str(out))
    assert os.path.basename(first).startswith("experts-") and os.path.isfile(first)
    with open(src, "a") as f:
        f.write("\n/* changed */\n")
    second = native.build(str(src), str(out))
    assert second != first and os.path.isfile(first) and os.path.isfile(second)
    assert native.load(second).lib.vm_info() == native.load(first).lib.vm_info()


@needs_cc
def test_the_same_source_is_found_built(tmp_path, monkeypatch):
    out = str(tmp_path)
    path = native.build(native.SOURCE, out)
    real = native.subprocess.run

    def no_compiling(cmd, *a, **k):
        if "-o" in cmd:
            pytest.fail("compiled again")
        return real(cmd, *a, **k)
    monkeypatch.setattr(native.subprocess, "run", no_compiling)
    assert native.build(native.SOURCE, out) == path


@needs_cc
def test_two_builds_at_once_each_get_a_whole_library(tmp_path):
    """Two builders of the same key (threads here; processes take the same path): both load what they get, and no
    temporary file is left."""
    got, errors = [], []

    def run():
        try:
            got.append(native.load(native.build(native.SOURCE, str(tmp_path))).path)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(set(got)) == 1
    assert [n for n in os.listdir(tmp_path) if not n.startswith("experts-")] == []


# ---- the rates -------------------------------------------------------------------------------------------------
@needs_cc
def test_rates_are_kept_apart_per_kernel(tmp_path, monkeypatch):
    """The rates of torch and of native are two rows of the cache: switching the kernel measures anew, and the
    placement reads the row of the kernel that runs."""
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    measured = []

    def fake(layout, tokens=rates_mod.TOKENS, **k):
        measured.append(ex_mod.kernel_key(layout))
        return [1e-3 if measured[-1] == "torch" else 1e-4] * len(tokens)
    monkeypatch.setattr(rates_mod, "measure_cpu", fake)
    monkeypatch.setattr(rates_mod, "measure_link", lambda device: 10.0)
    fmt = make_format("int4:group=64", 128, 64, torch.float32)
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", "torch")
    assert rates_mod.rates_for(torch.device("cpu"), fmt).cpu_s(fmt, 1) == pytest.approx(1e-3)
    monkeypatch.setenv("VISMMOE_CPU_KERNEL", "auto")
    r = rates_mod.rates_for(torch.device("cpu"), fmt)
    assert r.cpu_s(fmt, 1) == pytest.approx(1e-4) and r.summary(fmt)[0]["kernel"].startswith("native-")
    assert measured == ["torch", ex_mod.kernel_key(fmt)]
    saved = json.loads(next(tmp_path.glob("rates-*.json")).read_text())
    assert sorted(k.rsplit("|", 1)[1] for k in saved["cpu"]) == sorted(measured)


@needs_cc
def test_hybrid_engine_computes_with_the_kernel(tiny_dirs, image_file, tmp_path, monkeypatch):
    """An engine with --cpu-experts on: its executor is the native one and the kernel computed its misses, a layer
    call's experts in one call; the tokens equal fetch-only's (tests/test_cpu_experts.py checks the logits'
    tolerance)."""
    from vismmoe import load
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    calls = []
    real = native.Native.experts
    monkeypatch.setattr(native.Native, "experts", lambda self, lay, bl, *a: calls.append(len(bl)) or
                        real(self, lay, bl, *a))
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, expert_budget="25%").generate(image_file, "What is in the picture?", max_new_tokens=6)
    eng = load(d, expert_budget="25%", cpu_experts="on")
    assert eng.runtime.cpu.executor.kernel_key.startswith("native-")
    got = eng.generate(image_file, "What is in the picture?", max_new_tokens=6)
    assert got.token_ids == ref.token_ids and got.stats["cpu_computed"] > 0 and len(calls) > 0
    assert max(calls) > 1           # a layer call's experts in one kernel call (host blobs are not staged)


# ---- the benches -----------------------------------------------------------------------------------------------
@needs_cc
def test_bench_cpu_kernels_writes_its_rows(tmp_path, capsys):
    from vismmoe.bench import cpu_kernels
    out = tmp_path / "out"
    assert cpu_kernels.main(["--out", str(out), "--shapes", "tiny-qwen3", "--formats", "dense,fp8@bfloat16",
                             "--tokens", "1,3", "--reps", "1", "--budget-mib", "1"]) == 0
    res = json.loads((out / "cpu_kernels.json").read_text())
    assert [(r["format"], r["tokens"]) for r in res["rows"]] == [("dense", 1), ("dense", 3), ("fp8@bfloat16", 1),
                                                                 ("fp8@bfloat16", 3)]
    for r in res["rows"]:
        assert r["torch_ms"] > 0 and r["native_ms"] > 0 and r["max_rel_diff"] < 1e-5 and r["experts"] >= 2
        assert r["native_group_ms"] > 0 and r["group"] == min(8, r["experts"])
    assert res["machine"]["native"]["source"] == native.source_hash()
    assert "| tiny-qwen3" in (out / "cpu_kernels.md").read_text()


@pytest.mark.parametrize("argv,says", [(["--tokens", "0"], "--tokens"), (["--tokens", "a"], "--tokens"),
                                       (["--formats", "dense@int8"], "int8"), (["--shapes", "nope"], "nope"),
                                       (["--reps", "0"], "--reps"), (["--group", "0"], "--group")])
def test_bench_cpu_kernels_refuses_bad_input(argv, says, tmp_path, capsys, monkeypatch):
    from vismmoe.bench import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "measure", lambda *a, **k: pytest.fail("measured"))
    assert cpu_kernels.main(["--out", str(tmp_path / "o"), "--shapes", "tiny-qwen3", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "o").exists()


@needs_cc
def test_bench_decode_cpu_runs_each_kernel(tmp_path, monkeypatch):
    from vismmoe.bench import decode_cpu
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    res = decode_cpu.main(["--systems", "eager+cpu-torch,eager+cpu-native", "--limit", "1", "--reps", "1",
                           "--new-tokens", "2", "--out", str(tmp_path / "r.json")])
    assert res["cpu_kernels"]["eager+cpu-torch"] == "torch"
    assert res["cpu_kernels"]["eager+cpu-native"].startswith("native-")
    assert set(res["tpot_ms"]) == {"eager+cpu-torch", "eager+cpu-native"}


@pytest.mark.parametrize("systems,says", [("nat", "unknown nat"), ("native@", "unknown expert format"),
                                          ("native@fp9", "fp9"), ("native@int4:sym=2", "sym=2"), ("", "none given")])
def test_bench_decode_cpu_refuses_bad_systems_in_one_line(systems, says, capsys):
    """A system or an @FORMAT the bench does not know: one line, exit 2, before any model is loaded."""
    from vismmoe.bench import decode_cpu
    with pytest.raises(SystemExit) as e:
        decode_cpu.main(["--systems", systems])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "error: --systems" in err[0]


@needs_cc
def test_the_kernel_refuses_arguments_that_do_not_fit():
    """The C code trusts its pointers, so the wrapper checks them: a short blob, a short scratch, a wrong dtype or
    shape is a ValueError, never a read or write past a buffer."""
    fmt, blobs = _blobs("fp8", 128, 64, torch.float32)
    ex = CpuExecutor(fmt, kernel="native")
    lay, lib = ex._params, ex.native
    x, w, y = torch.randn(2, 128), torch.rand(2), torch.empty(2, 128)
    sc = torch.empty(lib.scratch(lay, 2))
    lib.expert(lay, blobs[0], x, w, 0, sc, y, 1)
    for bad in [dict(blob=blobs[0][:-512]), dict(scratch=sc[:-1]), dict(x=x.double()), dict(y=torch.empty(3, 128)),
                dict(w=torch.rand(3)), dict(x=torch.randn(128, 2).T)]:
        args = dict(blob=blobs[0], x=x, w=w, scratch=sc, y=y) | bad
        with pytest.raises(ValueError):
            lib.expert(lay, args["blob"], args["x"], args["w"], 0, args["scratch"], args["y"], 1)
    x4, y4, sc4 = torch.randn(4, 128), torch.empty(4, 128), torch.empty(lib.scratch(lay, 4))
    lib.experts(lay, [blobs[0], blobs[1]], [0, 1, 4], x4, None, 0, sc4, y4, 1)
    for blobs_, off in [([blobs[0], blobs[1]], [0, 3, 1]), ([blobs[0], blobs[1]], [0, 1, 3]),
                        ([blobs[0], blobs[1]], [1, 2, 4]), ([blobs[0], blobs[1]], [0, 4]),
                        ([blobs[0], blobs[1][:-512]], [0, 1, 4])]:
        with pytest.raises(ValueError):
            lib.experts(lay, blobs_, off, x4, None, 0, sc4, y4, 1)


@needs_cc
def test_a_damaged_library_is_built_again(tmp_path, monkeypatch, fresh_native):
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    path = native.build()
    with open(path, "wb") as f:
        f.write(b"not a library")
    lib = native.kernel()
    assert lib is not None and lib.path == path and lib.lib.vm_info() >= 0


@needs_cc
def test_pairs_cap_the_rows_of_one_call(monkeypatch):
    """A set with more token rows than MAX_CALL_ROWS goes to the kernel in several calls (the scratch stays
    bounded), each of at most that many rows unless one expert alone has more; the rows are those of one call."""
    fmt, blobs = _blobs("dense", 128, 64, torch.float32, n=4)
    hidden = torch.randn(6, 128)
    idx = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [0, 1], [1, 2]])      # pairs: expert 0 3, 1 4, 2 3, 3 2
    weights = torch.rand(6, 2)
    ex = CpuExecutor(fmt, kernel="native")
    want_pick, want = ex.pairs(lambda e: blobs[e], hidden, idx, weights, [0, 1, 2, 3])
    calls = []
    real = native.Native.experts
    monkeypatch.setattr(native.Native, "experts", lambda self, lay, bl, off, *a: calls.append(list(off)) or
                        real(self, lay, bl, off, *a))
    monkeypatch.setattr("vismmoe.cpu.executor.MAX_CALL_ROWS", 5)
    pick, got = ex.pairs(lambda e: blobs[e], hidden, idx, weights, [0, 1, 2, 3])
    assert calls == [[0, 3], [0, 4], [0, 3, 5]]          # 3 | 4 (3 + 4 > 5) | 3 + 2
    assert torch.equal(pick, want_pick) and torch.equal(got, want)
