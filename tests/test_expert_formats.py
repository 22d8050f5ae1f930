"""Expert formats (formats/): blobs, quantization error, the decode and dequantize kernels against the torch
reference (Triton's interpreter on the CPU, the real kernels on the GPU), and the budget counted in a format's
bytes."""

from __future__ import annotations

import pytest
import torch

from vismmoe.step import moe_kernel
from vismmoe.step import quant_kernels as qk_ids
from vismmoe.errors import UserError
from vismmoe.formats import make_format, names

from .conftest import INTERPRETER

SPECS = ["dense", "fp8", "int4:group=16", "int4:group=16,sym=0"]
SHAPES = [(64, 48), (256, 128), (160, 48)]     # (H, I): one block, several, a partial last block (fp8)


def _experts(n, H, I, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2 * I, H, generator=g) * scale, torch.randn(n, H, I, generator=g) * scale


def test_registry_lists_every_format():
    assert {"dense", "bf16", "fp8", "int4"} <= set(names())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("H,I", SHAPES)
def test_blob_is_one_aligned_row_and_round_trips_within_the_format_step(spec, H, I):
    fmt = make_format(spec, H, I, torch.float32)
    gu, dn = _experts(3, H, I)
    blobs = torch.full((3, fmt.numel), 7, dtype=fmt.pool_dtype)
    fmt.quantize(gu, dn, blobs)
    assert fmt.nbytes % 512 == 0 and fmt.nbytes == fmt.numel * blobs.element_size()
    g2, d2 = fmt.dequantize(blobs)
    assert g2.shape == gu.shape and d2.shape == dn.shape
    if fmt.name == "dense":
        assert torch.equal(g2, gu) and torch.equal(d2, dn)
        return
    for w, back in ((gu, g2), (dn, d2)):
        # e4m3 keeps 3 mantissa bits: half a step is 1/16 of a value, at most 1/16 of its block's largest;
        # int4 rounds to half a step of (max - min) / 15 (asymmetric) or amax / 7.5 (symmetric) per group
        bound = w.abs().max() / 16 if fmt.name == "fp8" else w.abs().max() / 7.5 / 2 * 1.01
        assert (back - w).abs().max() <= bound
    assert fmt.nbytes < 0.3 * make_format("dense", H, I, torch.float32).nbytes


def test_quantized_bytes_at_the_30b_shape():
    """One Qwen3-VL-30B-A3B expert (H 2048, I 768): bf16 9 MiB, fp8 half of it, int4 g128 under 2.6 MiB."""
    dense, fp8, int4 = (make_format(s, 2048, 768, torch.bfloat16).nbytes for s in ("dense", "fp8", "int4"))
    assert dense == 3 * 2048 * 768 * 2
    assert dense / 2 < fp8 < dense / 2 * 1.01
    assert int4 < 2.6 * 1024**2 and dense / int4 > 3.5


@pytest.mark.parametrize("spec", ["fp8", "int4:group=16", "int4:group=16,sym=0"])
def test_narrow_experts_are_zero_padded_exactly(spec):
    """An expert narrower than the slot (ERNIE's vision bank) computes what the narrow expert computes."""
    H, I, i = 64, 48, 16
    fmt = make_format(spec, H, I, torch.float32)
    gu, dn = _experts(2, H, i)
    blobs = torch.empty(2, fmt.numel, dtype=fmt.pool_dtype)
    g2, d2 = fmt.dequantize(fmt.quantize(gu, dn, blobs))
    assert torch.count_nonzero(g2[:, i:I]) == 0 and torch.count_nonzero(g2[:, I + i:]) == 0
    assert torch.count_nonzero(d2[:, :, i:]) == 0
    narrow = make_format(spec, H, i, torch.float32)
    n2 = torch.empty(2, narrow.numel, dtype=narrow.pool_dtype)
    ng, nd = narrow.dequantize(narrow.quantize(gu, dn, n2))
    if not spec.endswith("sym=0"):          # the same blocks and groups: the same values
        assert torch.equal(torch.cat([g2[:, :i], g2[:, I:I + i]], 1), ng) and torch.equal(d2[:, :, :i], nd)


@pytest.mark.parametrize("bad", ["fp9", "int4:group=100", "int4:group=16,sym=2", "fp8:block=64",
                                 "int4:group=16,bits=3", "int4:group", "dense:x=1", "fp8:kernels=v2",
                                 "int4:group=16,kernels=new"])
def test_bad_format_specs_are_one_line_errors(bad):
    with pytest.raises(UserError) as e:
        make_format(bad, 64, 48, torch.float32)
    assert "\n" not in str(e.value)


def test_int4_needs_sizes_that_are_multiples_of_the_group():
    with pytest.raises(UserError, match="multiples of the group"):
        make_format("int4", 64, 48, torch.float32)            # default group 128
    assert make_format("int4:group=16", 64, 48, torch.float32).group == 16


# ---- kernels ------------------------------------------------------------------------------------------------
def _kernel_case(spec, dtype, device, H, I, seed=0, act="silu"):
    """Experts of format `spec` half in a device pool (slots) and half in (page-locked, on CUDA) host memory,
    one address table over both; the torch reference over the dequantized pairs."""
    E, K, T = 8, 2, 3
    fmt = make_format(spec, H, I, dtype)
    gu, dn = _experts(E, H, I, seed)
    bank = fmt.quantize(gu.to(dtype), dn.to(dtype), torch.empty(E, fmt.numel, dtype=fmt.pool_dtype))
    slots = [2, -1, 0, -1, 1, -1, 3, -1]
    pool = torch.zeros(4, fmt.numel, dtype=fmt.pool_dtype)
    for e, s in enumerate(slots):
        if s >= 0:
            pool[s] = bank[e]
    if device == "cuda":
        pool, bank = pool.cuda(), bank.pin_memory()
    nb = fmt.nbytes
    addr = torch.tensor([pool.data_ptr() + s * nb if s >= 0 else bank.data_ptr() + e * nb
                         for e, s in enumerate(slots)], dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=g).to(dtype)
    topk = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g).to(dtype)
    pairs = bank.cpu()[topk.reshape(-1)]
    ref = moe_kernel.decode_experts_reference(x, topk, w, *fmt.dequantize(pairs), act=act)
    return fmt, x.to(device), topk.to(device), w.to(device), addr, ref, (pool, bank)


def _check_kernels(device, spec, H, I, variant=None, act="silu"):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        fmt, x, topk, w, addr, ref, keep = _kernel_case(spec, dtype, device, H, I, act=act)
        ri = torch.full((topk.numel(),), -1, dtype=torch.long, device=device)
        rw = torch.zeros(topk.numel(), device=device)
        # small tiles on the GPU (several per row and column); fewer, larger ones in the (slow) interpreter
        tiles = ({"BLOCK_I": 16, "BLOCK_H": 32}, {"BLOCK_O": 16, "BLOCK_K": 32}) if device == "cuda" else \
            ({"BLOCK_I": 32, "BLOCK_H": 64}, {"BLOCK_O": 64, "BLOCK_K": 64})
        out = moe_kernel.decode_experts_triton(x, topk, w, addr, ri, rw, I, *tiles,
                                               fmt=None if spec == "dense" else fmt, variant=variant,
                                               act=act).cpu().float()
        err = (out - ref.float()).norm() / ref.float().norm()
        assert err < tol, (spec, dtype, err)
        assert torch.equal(ri.cpu().view_as(topk), topk.cpu())
        assert torch.equal(rw.cpu().view_as(w), w.cpu().float())
        if spec != "dense":                     # the prefill's dequantize kernel against the format's reference
            pool = keep[0]
            sel = torch.tensor([pool.shape[0] - 1, 0, 2], device=pool.device)    # slots read in place, any order
            got = moe_kernel.dequantize_triton(fmt, pool, sel)
            want = fmt.dequantize(pool.cpu()[sel.cpu()])
            for a, b in zip(got, want):
                assert a.dtype == b.dtype
                # float32: the same products; bf16: at most one rounding step apart
                assert torch.allclose(a.cpu().float(), b.float(), rtol=0 if dtype == torch.float32 else 2 ** -7,
                                      atol=0 if dtype == torch.float32 else 1e-6)


interpreter = INTERPRETER


@interpreter
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("H,I", [(64, 48), (256, 32)])      # one block; several blocks along H
@pytest.mark.parametrize("variant", ["v1", "v3"])
def test_kernels_match_reference_in_interpreter(spec, H, I, variant):
    """The decode kernels (slots and host blobs through one address table) and the dequantize kernel, under
    Triton's interpreter on the CPU; every variant of the quantized kernels."""
    if spec == "dense" and variant != "v1":
        pytest.skip("dense has one variant")
    _check_kernels("cpu", spec, H, I, variant)


@interpreter
def test_int4_v3_kernel_sums_several_tiles_and_groups_in_interpreter():
    """int4 v3 with a column tile of 2 groups over 4 groups a row (two tiles), asymmetric zeros, and row tiles
    that leave a partial last one: each word's scale and zero point line up with its group."""
    fmt, x, topk, w, addr, ref, keep = _kernel_case("int4:group=16,sym=0", torch.float32, "cpu", 64, 48)
    ri = torch.full((topk.numel(),), -1, dtype=torch.long)
    rw = torch.zeros(topk.numel())
    out = moe_kernel.decode_experts_triton(x, topk, w, addr, ri, rw, 48, {"BLOCK_I": 32, "BLOCK_H": 32},
                                           {"BLOCK_O": 16, "BLOCK_K": 32}, fmt=fmt, variant="v3")
    assert (out - ref).norm() / ref.norm() < 1e-5


@interpreter
def test_fp8_widths_not_multiples_of_4_run_v1_in_interpreter():
    """fp8 v3 reads rows as int32 words; widths that are not multiples of 4 run v1 (kernel_id), with its values."""
    fmt = make_format("fp8:kernels=v3", 66, 50, torch.float32)
    assert moe_kernel.kernel_id(fmt) == qk_ids.FP8_V1
    assert moe_kernel.kernel_id(make_format("fp8", 64, 48, torch.float32)) == qk_ids.FP8_V3
    _check_kernels("cpu", "fp8", 66, 50, "v3")


def _subnormal_fp8(device):
    """Every weight byte an e4m3 subnormal (0x01..0x07, either sign), every block scale 1: the v3 kernels turn them
    into float32 subnormals (times 2^-120) and must keep them; flushed to zero, the output would be 0."""
    H, I, E, K = 64, 48, 4, 2
    fmt = make_format("fp8:kernels=v3", H, I, torch.float32)
    g = torch.Generator().manual_seed(3)
    blobs = torch.zeros(E, fmt.numel, dtype=torch.uint8)
    qgu, qdn, sg, su, sd = fmt._parts(blobs)
    for q in (qgu, qdn):
        b = torch.randint(1, 8, q.shape, generator=g, dtype=torch.uint8) | (torch.randint(0, 2, q.shape, generator=g,
                                                                                       dtype=torch.uint8) << 7)
        q.view(torch.uint8).copy_(b)
    for sc in (sg, su, sd):
        sc.fill_(1.0)
    x = torch.randn(1, H, generator=g) * 1e3
    topk = torch.tensor([[2, 0]])
    w = torch.tensor([[0.6, 0.4]])
    ref = moe_kernel.decode_experts_reference(x, topk, w, *fmt.dequantize(blobs[topk.reshape(-1)]))
    pool = blobs.to(device)
    addr = torch.tensor([pool.data_ptr() + e * fmt.nbytes for e in range(E)], dtype=torch.int64, device=device)
    ri, rw = torch.empty(K, dtype=torch.long, device=device), torch.empty(K, device=device)
    out = moe_kernel.decode_experts_triton(x.to(device), topk.to(device), w.to(device), addr, ri, rw, I,
                                           fmt=fmt).cpu()
    assert ref.abs().max() > 0
    assert (out - ref).norm() / ref.norm() < 1e-5


@interpreter
def test_fp8_v3_keeps_subnormal_weights_in_interpreter():
    _subnormal_fp8("cpu")


@interpreter
@pytest.mark.parametrize("spec", SPECS)
def test_rows_past_live_get_zeros_in_interpreter(spec):
    """`live` (a static bucket's rows in use): rows before it are the reference's, rows at or past it are exact
    zeros (no weight is read for them), and the routing of every row is still recorded."""
    fmt, x, topk, w, addr, ref, keep = _kernel_case(spec, torch.float32, "cpu", 64, 48)
    ri = torch.full((topk.numel(),), -1, dtype=torch.long)
    rw = torch.zeros(topk.numel())
    out = moe_kernel.decode_experts_triton(x, topk, w, addr, ri, rw, 48, {"BLOCK_I": 32, "BLOCK_H": 64},
                                           {"BLOCK_O": 64, "BLOCK_K": 64}, fmt=None if spec == "dense" else fmt,
                                           live=torch.tensor([2], dtype=torch.int32))
    assert (out[:2] - ref[:2]).norm() / ref[:2].norm() < 1e-5
    assert torch.count_nonzero(out[2:]) == 0
    assert torch.equal(ri.view_as(topk), topk)


@interpreter
@pytest.mark.parametrize("spec", SPECS + [f"{f}kernels={v}" for f in ("fp8:", "int4:group=16,")
                                          for v in ("v1", "v3")])
def test_address_zero_pairs_read_nothing_and_give_zeros_in_interpreter(spec):
    """Address 0 (the split step's experts without a slot, split_step.py): those pairs give exact zeros and read
    nothing, not even a scale (a read at address 0 would fault on the GPU); the other pairs are the reference's
    with the zeroed pairs' weights set to 0."""
    fmt, x, topk, w, addr, ref, keep = _kernel_case(spec, torch.float32, "cpu", 64, 48)
    gone = torch.tensor([1, 3, 5, 7])                       # the experts held in host memory
    addr = addr.clone()
    addr[gone] = 0
    ri = torch.full((topk.numel(),), -1, dtype=torch.long)
    rw = torch.zeros(topk.numel())
    out = moe_kernel.decode_experts_triton(x, topk, w, addr, ri, rw, 48, {"BLOCK_I": 16, "BLOCK_H": 64},
                                           {"BLOCK_O": 64, "BLOCK_K": 64}, fmt=None if spec == "dense" else fmt)
    kept = w * ~torch.isin(topk, gone)
    want = moe_kernel.decode_experts_reference(x, topk, kept, *fmt.dequantize(keep[1][topk.reshape(-1)]))
    assert (out - want).norm() / want.norm() < 1e-5
    assert torch.isin(topk, gone).any() and torch.equal(ri.view_as(topk), topk)
    none = moe_kernel.decode_experts_triton(x, topk, w, torch.zeros_like(addr), ri, rw, 48,
                                            {"BLOCK_I": 16, "BLOCK_H": 64}, {"BLOCK_O": 64, "BLOCK_K": 64},
                                            fmt=None if spec == "dense" else fmt)
    assert torch.count_nonzero(none) == 0


@interpreter
def test_landing_writes_misses_into_candidate_slots_in_interpreter():
    """Landing (moe_kernel): the distinct missing experts of the live pairs take, by expert id, the candidates
    (free, or holding an earlier layer's expert; not a later layer's, not one taken) as `landing_plan` says on
    the host; each taken slot ends holding the expert's blob byte for byte; the result is the reference's."""
    fmt, x, topk, w, addr, ref, (pool, bank) = _kernel_case("dense", torch.float32, "cpu", 64, 48)
    big = torch.zeros(8, fmt.numel, dtype=fmt.pool_dtype)           # slots 0..3 as before, 4..7 candidates
    big[:4] = pool
    nb = fmt.nbytes
    slots = [2, -1, 0, -1, 1, -1, 3, -1]                            # _kernel_case's residency
    addr = torch.tensor([big.data_ptr() + s * nb if s >= 0 else bank.data_ptr() + e * nb
                         for e, s in enumerate(slots)], dtype=torch.int64)
    C, P = 4, topk.numel()
    cands, owners = [5, 4, 6, 7], [-1, 3, 1, 0]                     # layer 2: 4 holds a later layer's expert
    land = torch.zeros(3 + 3 * C + P, dtype=torch.long)
    land[1], land[2] = big.data_ptr(), big.data_ptr() + 8 * nb
    land[3:3 + C] = torch.tensor([big.data_ptr() + s * nb for s in cands])
    land[3 + C:3 + 2 * C] = torch.tensor(owners)
    ri = torch.full((P,), -1, dtype=torch.long)
    rw = torch.zeros(P)
    out = moe_kernel.decode_experts_triton(x, topk, w, addr, ri, rw, 48, {"BLOCK_I": 32, "BLOCK_H": 64},
                                           {"BLOCK_O": 64, "BLOCK_K": 64}, land=land,
                                           layer=torch.tensor([2]))
    assert (out - ref).norm() / ref.norm() < 1e-5
    taken = [False] * C
    plan = moe_kernel.landing_plan(topk.reshape(-1).numpy(), lambda e: slots[e] < 0, 2, owners, taken)
    assert plan and all(owners[c] < 2 for _, c in plan)
    assert land[3 + 2 * C:3 + 3 * C].tolist() == [int(t) for t in taken]
    for e, c in plan:
        assert torch.equal(big[cands[c]], bank[e])
    dst = land[3 + 3 * C:].tolist()
    want = {e: big.data_ptr() + cands[c] * nb for e, c in plan}
    assert dst == [want.get(int(e), 0) for e in topk.reshape(-1)]
    assert torch.count_nonzero(big[4]) == 0                          # a later layer's slot is never written


def test_gelu_tanh_reference_is_transformers_gemma4_experts():
    """The reference with act="gelu_pytorch_tanh" gives what Gemma 4's experts module computes (float32), and
    differs from SiLU's (the activation reaches the arithmetic); an activation the kernels lack is refused."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts
    E, H, I, T, K = 8, 32, 24, 3, 2
    cfg = Gemma4TextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, top_k_experts=K,
                           enable_moe_block=True)
    torch.manual_seed(0)
    mod = Gemma4TextExperts(cfg)
    with torch.no_grad():
        mod.gate_up_proj.normal_(std=0.3)
        mod.down_proj.normal_(std=0.3)
    x = torch.randn(T, H)
    topk = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    with torch.no_grad():
        want = mod(x, topk, w)
    flat = topk.reshape(-1)
    got = moe_kernel.decode_experts_reference(x, topk, w, mod.gate_up_proj.data[flat], mod.down_proj.data[flat],
                                              act=cfg.hidden_activation)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    silu = moe_kernel.decode_experts_reference(x, topk, w, mod.gate_up_proj.data[flat], mod.down_proj.data[flat])
    assert not torch.allclose(silu, want, atol=1e-3)
    with pytest.raises(ValueError, match="relu"):
        moe_kernel.decode_experts_reference(x, topk, w, mod.gate_up_proj.data[flat], mod.down_proj.data[flat],
                                            act="relu")


@interpreter
@pytest.mark.parametrize("spec", SPECS)
def test_gelu_kernels_match_reference_in_interpreter(spec):
    """Gemma 4's GELU (tanh) experts in the decode kernels, every format, against the torch reference."""
    _check_kernels("cpu", spec, 64, 48, act="gelu_pytorch_tanh")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("H,I", SHAPES)
def test_gpu_gelu_kernels_match_reference(spec, H, I):
    _check_kernels("cuda", spec, H, I, act="gelu_pytorch_tanh")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("H,I", SHAPES + [(2048, 768)])
@pytest.mark.parametrize("variant", ["v1", "v3"])
def test_gpu_kernels_match_reference(spec, H, I, variant):
    """On the GPU, half the experts read from page-locked host memory by the kernel."""
    _check_kernels("cuda", spec, H, I, variant)


if moe_kernel.triton is not None:
    import triton
    import triton.language as tl

    from vismmoe.step import quant_kernels as qk

    @triton.jit
    def _e4m3_probe(b_ptr, out_ptr, NATIVE_F8: tl.constexpr):
        i = tl.arange(0, 256)
        tl.store(out_ptr + i, qk.e4m3_to_f32(tl.load(b_ptr + i), NATIVE_F8))

    @triton.jit
    def _word_probe(w_ptr, out_ptr, one_bits):
        """int32 words [64] -> [4, 64] e4m3 values * 2^-120 (v3 fp8), [8, 64] nibbles as 1 + n/16 (v3 int4)."""
        i = tl.arange(0, 64)
        w = tl.load(w_ptr + i)
        for k in tl.static_range(4):
            tl.store(out_ptr + k * 64 + i, qk._e4m3_scaled(w, k))
        one = one_bits.to(tl.int32)
        mask = (one >> 7) ^ 0x70000
        for k in tl.static_range(8):
            tl.store(out_ptr + (4 + k) * 64 + i, qk._one_plus(w, k, mask, one))


def _e4m3_all_bytes(device, native):
    """Every e4m3 byte but the two NaNs (0x7F, 0xFF; quantizing never writes them) through the kernels'
    conversion, against torch's float8_e4m3fn."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256, dtype=torch.float32, device=device)
    _e4m3_probe[(1,)](b.to(device), out, NATIVE_F8=native)
    want = b.view(torch.float8_e4m3fn).float()
    keep = ~torch.isnan(want)
    assert keep.sum() == 254
    assert torch.equal(out.cpu()[keep], want[keep])       # bit-exact, subnormals and both zeros included
    assert torch.equal(torch.signbit(out.cpu()[keep]), torch.signbit(want[keep]))


@interpreter
def test_e4m3_bit_moves_give_torchs_values_for_every_byte():
    _e4m3_all_bytes("cpu", False)


def _word_moves(device):
    """The v3 kernels' bit moves on int32 words: every e4m3 byte (but the NaNs) at each of a word's 4 byte positions
    gives torch's float8_e4m3fn value times 2^-120, bit-exact (subnormals, both zeros); every nibble at each of a
    word's 8 positions gives 1 + n/16."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    words = torch.stack([b.roll(-k) for k in range(4)], 1).contiguous().view(torch.int32).reshape(256)
    for half in (words[:64], words[64:128], words[128:192], words[192:]):
        out = torch.empty(12, 64, device=device)
        _word_probe[(1,)](half.to(device), out, moe_kernel.ONE_BITS)
        out = out.cpu()
        byte = half.view(torch.uint8).view(64, 4)
        ref = byte.view(torch.float8_e4m3fn).float()
        for k in range(4):
            keep = ~torch.isnan(ref[:, k])
            got = out[k][keep] * 2.0 ** 120
            assert torch.equal(got, ref[:, k][keep])
            assert torch.equal(torch.signbit(got), torch.signbit(ref[:, k][keep]))
        nib = torch.stack([(half >> (4 * k)) & 0xF for k in range(8)])                      # [8, 64]
        assert torch.equal(out[4:], 1 + nib.float() / 16)


@interpreter
def test_v3_word_bit_moves_in_interpreter():
    _word_moves("cpu")


@pytest.mark.gpu
def test_gpu_v3_word_bit_moves():
    """The same on the GPU: subnormal float32s are kept (the kernels compile without flush to zero)."""
    _word_moves("cuda")


@pytest.mark.gpu
def test_gpu_e4m3_hardware_conversion_gives_torchs_values_for_every_byte():
    """The CUDA path (hardware e4m3 conversion) and the interpreter's bit moves give the same values."""
    _e4m3_all_bytes("cuda", True)


@pytest.mark.gpu
def test_gpu_fp8_v3_keeps_subnormal_weights():
    _subnormal_fp8("cuda")


@pytest.mark.gpu
def test_gpu_kernels_group_128_at_the_30b_shape():
    _check_kernels("cuda", "int4", 2048, 768)
