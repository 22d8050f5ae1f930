"""Routed experts of a decode step, read wherever each expert lives: a device slot or page-locked host memory.

    # T tokens (a few: decode), K experts per token, P = T*K (token, expert) pairs, H hidden, I expert inter
    addr   [E] int64      where expert e's blob starts: a slot of the device pool, or its page-locked host blob
                          (device-visible through unified addressing); written by the host before each step.
                          0: none; the pair reads nothing and contributes zeros (the split step, split_step.py,
                          computes such misses on the CPU or in a second launch)
    topk   [T, K]         router's choice; weights [T, K]
    blob   one expert in its format (formats/), the same bytes in a slot and on the host: dense gate_up [2I, H]
           then down [H, I]; fp8 e4m3 weights + 128x128 block scales; int4 nibbles + group scales and zeros
    ->  gate_up pass  [P, I]   act(x @ gate^T) * (x @ up^T), one program per (pair, block of I rows); act is
                               SiLU, or GELU with the tanh approximation (Gemma 4): `ACTIVATIONS`
    ->  down pass     [P, H]   (h @ down^T) * weight, one program per (pair, block of H rows)
    ->  sum over K    [T, H]

Nothing here synchronises with the host and no shape depends on the routing, so the whole step can be captured
in a CUDA graph: an expert that is not resident is read over the link by the kernel itself (the miss costs its
bytes once, on the step's critical path) and the host fills the cache after the step. A resident expert and a
host one go through the same arithmetic, so offloading never changes a result.

The step also records its routing (`route_idx`, `route_w`) for the host's cache bookkeeping after the step.

Landing (dense blobs): the host hands the step a few candidate slots (`land`, `LAND` per routed expert): free
slots, then the policy's next victims. Each MoE layer's missing experts (the distinct ones of its live pairs whose
address is outside the pool, by expert id) take, in order, the candidates no earlier layer took whose expert
belongs to an EARLIER layer (or to none): no later kernel of the step reads such a slot (`_land_kernel`). The
passes write every weight they read of a landing expert into its slot as they go, so the miss crosses the link
once; after the step the host evicts the slot's old expert and adopts the new one there (fast_step.py) instead of
copying it over the link a second time. `landing_plan` is the same assignment on the host.

Quantized blobs are dequantized in registers (`_row_dot`: one helper per kernel variant of quant_kernels.py, chosen
by the constant `FMT` = the variant's id, `kernel_id`); activations stay in x's dtype, accumulation in float32. The
prefill does not use these kernels: it dequantizes a wave's slots, read in place, into a scratch (`dequantize`,
`_dequant_kernel`) and runs `grouped_mm` on it (grouped.py).

On CUDA the two passes are Triton kernels behind the custom op `vismmoe::decode_experts` (opaque to
torch.compile). `decode_experts_reference` is the plain torch version over dequantized weights: the CPU path and
the tests' reference; the tests also run the kernels under Triton's interpreter (TRITON_INTERPRET=1) on the CPU.
"""

from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"     # kernels run on the CPU in Triton's interpreter (tests)

try:                                    # the GPU path; the CPU runs the torch reference
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - CPU installs without triton
    triton = None

from . import quant_kernels as qk

# the experts' activation (transformers' `hidden_act` / `hidden_activation` name) -> the kernels' constant ACT
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1}


def activation_id(name: str) -> int:
    """The kernels' ACT for the activation `name` (transformers' ACT2FN key); ValueError for one they lack."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"the decode kernels compute {sorted(ACTIVATIONS)}, not {name!r}") from None


def _act_reference(g: torch.Tensor, act: str) -> torch.Tensor:
    if activation_id(act) == 1:
        return torch.nn.functional.gelu(g, approximate="tanh")
    return torch.nn.functional.silu(g)


def decode_experts_reference(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                             down: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """x [T, H], topk [T, K], weights [T, K], gate_up [P, 2I, H], down [P, H, I] (pair p's expert, p = t*K + k,
    dequantized into x's dtype by its format) -> [T, H]. `act`: the activation of the gate (`ACTIVATIONS`;
    ValueError for another).

    Rounds where the kernels round: gate/up outputs, the activation and its product, and the down output are in
    x's dtype; accumulation, the routing weight and the sum over K in float32."""
    T, K = topk.shape
    H = x.shape[-1]
    inter = down.shape[-1]
    xp = x.repeat_interleave(K, dim=0).float()                                       # [P, H]
    g = torch.einsum("ph,pih->pi", xp, gate_up[:, :inter].float()).to(x.dtype)     # [P, I]
    u = torch.einsum("ph,pih->pi", xp, gate_up[:, inter:].float()).to(x.dtype)     # [P, I]
    h = (_act_reference(g.float(), act).to(x.dtype).float() * u.float()).to(x.dtype)
    y = torch.einsum("pi,phi->ph", h.float(), down.float()).to(x.dtype)              # [P, H]
    y = y.float() * weights.reshape(-1, 1).float()
    return y.view(T, K, H).sum(1).to(x.dtype)


if triton is not None:
    @triton.jit
    def _blob(addr_ptr, e):
        """Address of expert e's blob: a multiple of 16 (blobs are whole multiples of 512 bytes in buffers that
        torch's allocators align to 64 bytes or more), said so the compiler vectorises the loads of 1-byte weights."""
        return tl.multiple_of(tl.load(addr_ptr + e), 16)

    @triton.jit
    def _landing(dst_ptr, p, base, WRITE: tl.constexpr):
        """(where pair p's expert lands, whether it does): its landing slot as a pointer like `base` and True, or
        `base` and False (no landing slot, or landing off)."""
        if WRITE:
            d = tl.load(dst_ptr + p)
            return d.to(base.dtype), d != 0
        else:
            return base, p < 0

    @triton.jit
    def _land_kernel(topk_ptr, addr_ptr, live_ptr, layer_ptr, land_ptr, dst_ptr, K: tl.constexpr, P: tl.constexpr,
                     BLOCK_P: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
        """One MoE layer's landing slots (see the module docstring). land: [1], [2] the pool's first and
        last-plus-one byte address; [3:3+C] the candidate slots' addresses (0: none), [3+C:3+2C] the MoE layer of
        each one's expert (-1: free), [3+2C:3+3C] taken by an earlier layer of the step (1) or not (0).
        dst [P] <- the landing slot of each pair's expert (0: none)."""
        i = tl.arange(0, BLOCK_P)
        valid = (i < P) & (i // K < tl.load(live_ptr))
        e = tl.load(topk_ptr + i, mask=valid, other=0)
        a = tl.load(addr_ptr + e, mask=valid, other=0)
        miss = valid & ((a < tl.load(land_ptr + 1)) | (a >= tl.load(land_ptr + 2)))
        same_before = (e[None, :] == e[:, None]) & (i[None, :] < i[:, None]) & miss[None, :]
        first = miss & (tl.sum(same_before.to(tl.int32), axis=1) == 0)        # one pair per distinct miss
        rank = tl.sum(((e[None, :] < e[:, None]) & first[None, :]).to(tl.int32), axis=1)
        c = tl.arange(0, BLOCK_C)
        cm = c < C
        cand = tl.load(land_ptr + 3 + c, mask=cm, other=0)
        owner = tl.load(land_ptr + 3 + C + c, mask=cm, other=0)
        taken = tl.load(land_ptr + 3 + 2 * C + c, mask=cm, other=1)
        # a candidate whose expert belongs to an earlier layer (or none) is read by no later kernel of the step
        elig = cm & (cand != 0) & (owner < tl.load(layer_ptr)) & (taken == 0)
        order = tl.cumsum(elig.to(tl.int32), axis=0) - 1                     # its place among the eligible
        match = miss[:, None] & elig[None, :] & (order[None, :] == rank[:, None])    # [P, C]
        slot = tl.sum(tl.where(match, cand[None, :], 0), axis=1)
        tl.store(dst_ptr + i, slot, mask=i < P)
        took = tl.sum(match.to(tl.int32), axis=0) > 0
        tl.store(land_ptr + 3 + 2 * C + c, tl.where(took, 1, taken), mask=cm)

    @triton.jit
    def _row_dot(base, x_ptr, t, rows, rmask, C: tl.constexpr, sp, zp, SR: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr, STEP: tl.constexpr, FMT: tl.constexpr, NATIVE_F8: tl.constexpr,
                 dst=None, wr=False, WRITE: tl.constexpr = False, one_bits=0):
        """sum_c w[rows, c] * x[t, c] for one matrix of a blob, float32 [BLOCK_R]. A column tile of BLOCK_C spans
        BLOCK_C // STEP scale groups (STEP: 128 for fp8 blocks, the group size for int4).
        FMT 0: `base` points at dense weights [R, C] of x's dtype.
        FMT 1, 5 (fp8 v1, v3): e4m3 bytes [R, C]; `sp` float32 block scales [ceil(R/128), SR].
        FMT 2, 6 (int4 v1, v3): 4-bit pairs [R, C/2]; `sp` float32 scales and `zp` uint8 zeros [R, SR].
        The quantized variants are quant_kernels.py's helpers."""
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        if FMT == 1:
            acc = qk.row_dot_fp8(base, x_ptr, t, rows, rmask, C, sp, SR, BLOCK_C, NATIVE_F8, acc)
        elif FMT == 2:
            acc = qk.row_dot_int4_v1(base, x_ptr, t, rows, rmask, C, sp, zp, SR, BLOCK_R, BLOCK_C, STEP)
        elif FMT == 5:
            acc = qk.row_dot_fp8_v3(base, x_ptr, t, rows, rmask, C, sp, SR, BLOCK_R, BLOCK_C)
        elif FMT == 6:
            acc = qk.row_dot_int4_v3(base, x_ptr, t, rows, rmask, C, sp, zp, SR, BLOCK_R, BLOCK_C, STEP, one_bits)
        else:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                cm = cols < C
                xv = tl.load(x_ptr + t * C + cols, mask=cm, other=0.0).to(tl.float32)
                w = tl.load(base + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0)
                if WRITE:                           # landing: the tile into the expert's new slot as it is read
                    tl.store(dst + rows[:, None] * C + cols[None, :], w,
                             mask=(rmask & ((rows * 0 + wr.to(tl.int32)) != 0))[:, None] & cm[None, :])
                acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        return acc

    @triton.jit
    def _gate_up_kernel(x_ptr, topk_ptr, w_ptr, addr_ptr, h_ptr, ridx_ptr, rw_ptr, live_ptr, dst_ptr, one_bits,
                        K: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, FMT: tl.constexpr,
                        S_OFF: tl.constexpr, Z_OFF: tl.constexpr, SH: tl.constexpr, NB: tl.constexpr,
                        STEP: tl.constexpr, NATIVE_F8: tl.constexpr, ACT: tl.constexpr, WRITE: tl.constexpr):
        p = tl.program_id(0)                        # pair t*K + k
        ib = tl.program_id(1)
        t = p // K
        e = tl.load(topk_ptr + p)
        if ib == 0:                                 # the routing, for the host's bookkeeping after the step
            tl.store(ridx_ptr + p, e.to(tl.int64))
            tl.store(rw_ptr + p, tl.load(w_ptr + p).to(tl.float32))
        dt = x_ptr.dtype.element_ty
        rows = ib * BLOCK_I + tl.arange(0, BLOCK_I)
        omask = rows < I
        # a pair of a row past the live ones (a bucket's padding) does no work and writes zeros: its loop over the
        # columns would cost as much as a live pair's, and one row in a bucket of 8 has 7 padding rows. A pair whose
        # expert's address is 0 (none: the split step computes it elsewhere) reads nothing and gives zeros (tensor
        # masks: a scalar one breaks interpreters)
        if t < tl.load(live_ptr):
            rmask = omask & ((rows * 0 + tl.load(addr_ptr + e)) != 0)
            if FMT == 0:
                base = _blob(addr_ptr, e).to(tl.pointer_type(dt))
                dst, wr = _landing(dst_ptr, p, base, WRITE)
                acc_g = _row_dot(base, x_ptr, t, rows, rmask, H, base, base, 0, BLOCK_I, BLOCK_H, 0, 0, NATIVE_F8,
                                 dst, wr, WRITE)
                acc_u = _row_dot(base + I * H, x_ptr, t, rows, rmask, H, base, base, 0, BLOCK_I, BLOCK_H, 0, 0,
                                 NATIVE_F8, dst + I * H, wr, WRITE)
            elif FMT == 1 or FMT == 5:                  # gate [I, H] | up [I, H] e4m3; scales gate | up | down
                base = _blob(addr_ptr, e).to(tl.pointer_type(tl.uint8))
                sp = (base + S_OFF).to(tl.pointer_type(tl.float32))
                acc_g = _row_dot(base, x_ptr, t, rows, rmask, H, sp, base, SH, BLOCK_I, BLOCK_H, STEP, FMT, NATIVE_F8)
                acc_u = _row_dot(base + I * H, x_ptr, t, rows, rmask, H, sp + NB, base, SH, BLOCK_I, BLOCK_H, STEP, FMT,
                                 NATIVE_F8)
            else:                                       # gate_up [2I, H/2] nibbles; scales, zeros [2I, SH]
                base = _blob(addr_ptr, e).to(tl.pointer_type(tl.uint8))
                sp = (base + S_OFF).to(tl.pointer_type(tl.float32))
                zp = base + Z_OFF
                acc_g = _row_dot(base, x_ptr, t, rows, rmask, H, sp, zp, SH, BLOCK_I, BLOCK_H, STEP, FMT, NATIVE_F8,
                                 one_bits=one_bits)
                acc_u = _row_dot(base + I * (H // 2), x_ptr, t, rows, rmask, H, sp + I * SH, zp + I * SH, SH,
                                 BLOCK_I, BLOCK_H, STEP, FMT, NATIVE_F8, one_bits=one_bits)
            g = acc_g.to(dt).to(tl.float32)
            u = acc_u.to(dt).to(tl.float32)
            if ACT == 1:                                # GELU, tanh approximation; tanh(z) = 1 - 2 / (1 + e^2z)
                z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
                act = (0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))).to(dt).to(tl.float32)
            else:                                       # SiLU
                act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            tl.store(h_ptr + p * I + rows, (act * u).to(dt), mask=omask)
        else:
            tl.store(h_ptr + p * I + rows, tl.zeros([BLOCK_I], dtype=dt), mask=omask)

    @triton.jit
    def _down_kernel(h_ptr, topk_ptr, w_ptr, addr_ptr, y_ptr, live_ptr, dst_ptr, one_bits,
                     K: tl.constexpr, H: tl.constexpr, I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                     FMT: tl.constexpr, S_OFF: tl.constexpr, Z_OFF: tl.constexpr, SI: tl.constexpr,
                     NB: tl.constexpr, STEP: tl.constexpr, NATIVE_F8: tl.constexpr, WRITE: tl.constexpr):
        p = tl.program_id(0)
        ob = tl.program_id(1)
        e = tl.load(topk_ptr + p)
        dt = h_ptr.dtype.element_ty
        rows = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = rows < H
        if p // K < tl.load(live_ptr):              # a padding row's pair does no work (as in the gate_up pass)
            rmask = omask & ((rows * 0 + tl.load(addr_ptr + e)) != 0)
            if FMT == 0:
                base = _blob(addr_ptr, e).to(tl.pointer_type(dt))
                dst, wr = _landing(dst_ptr, p, base, WRITE)
                acc = _row_dot(base + 2 * I * H, h_ptr, p, rows, rmask, I, base, base, 0, BLOCK_O, BLOCK_K, 0, 0,
                               NATIVE_F8, dst + 2 * I * H, wr, WRITE)
            elif FMT == 1 or FMT == 5:                  # down [H, I] e4m3 after gate_up; its scales after gate's, up's
                base = _blob(addr_ptr, e).to(tl.pointer_type(tl.uint8))
                sp = (base + S_OFF).to(tl.pointer_type(tl.float32)) + NB
                acc = _row_dot(base + 2 * I * H, h_ptr, p, rows, rmask, I, sp, base, SI, BLOCK_O, BLOCK_K, STEP, FMT,
                               NATIVE_F8)
            else:                                       # down [H, I/2] nibbles after gate_up; scales, zeros [H, SI]
                base = _blob(addr_ptr, e).to(tl.pointer_type(tl.uint8))
                sp = (base + S_OFF).to(tl.pointer_type(tl.float32)) + NB
                acc = _row_dot(base + I * H, h_ptr, p, rows, rmask, I, sp, base + Z_OFF + NB, SI, BLOCK_O, BLOCK_K,
                               STEP, FMT, NATIVE_F8, one_bits=one_bits)
            y = acc.to(dt).to(tl.float32) * tl.load(w_ptr + p).to(tl.float32)
            tl.store(y_ptr + p * H + rows, y, mask=omask)
        else:
            tl.store(y_ptr + p * H + rows, tl.zeros([BLOCK_O], dtype=tl.float32), mask=omask)

    @triton.jit
    def _dequant_kernel(pool_ptr, sel_ptr, out_ptr, NBYTES: tl.constexpr, OUT_N: tl.constexpr, OUT_OFF: tl.constexpr,
                        R: tl.constexpr, C: tl.constexpr, Q_OFF: tl.constexpr, S_OFF: tl.constexpr,
                        Z_OFF: tl.constexpr, SR: tl.constexpr, FMT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEP: tl.constexpr, NATIVE_F8: tl.constexpr):
        """One matrix [R, C] of the blob in slot sel[n] of `pool` (program axis 0: n) into out[n] at element
        OUT_OFF (out [N, OUT_N]), the format's reference arithmetic in float32, one rounding into out's dtype.
        fp8: a tile of BLOCK_R rows (dividing 128) and BLOCK_C = 128 columns lies in one scale block (one scale).
        int4: the nibbles read as int32 words [BLOCK_R, BLOCK_C/8] (column 8k+s in bits 4s..4s+3 of word k), each
        nibble made exact float32 by the mantissa of 2^23; the scale and zero point read once per word."""
        n = tl.program_id(0)
        blob = pool_ptr + tl.load(sel_ptr + n).to(tl.int64) * NBYTES
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (rows < R)[:, None] & (cols < C)[None, :]
        sp = (blob + S_OFF).to(tl.pointer_type(tl.float32))
        if FMT == 1:
            q = tl.load(blob + Q_OFF + rows[:, None] * C + cols[None, :], mask=m, other=0)
            sc = tl.load(sp + (tl.program_id(1) * BLOCK_R // 128) * SR + tl.program_id(2) * BLOCK_C // 128)
            w = qk.e4m3_to_f32(q, NATIVE_F8) * sc
        else:
            W: tl.constexpr = BLOCK_C // 8
            CW: tl.constexpr = C // 8
            wc = tl.program_id(2) * W + tl.arange(0, W)
            wm = (rows < R)[:, None] & (wc < CW)[None, :]
            q = tl.load((blob + Q_OFF).to(tl.pointer_type(tl.int32)) + rows[:, None] * CW + wc[None, :], mask=wm,
                        other=0)                                                            # [R, W]
            gi = rows[:, None] * SR + (wc // (STEP // 8))[None, :]
            s = tl.load(sp + gi, mask=wm, other=0.0)
            z = tl.load(blob + Z_OFF + gi, mask=wm, other=0).to(tl.float32)
            sh = tl.arange(0, 8)
            nib = ((q[:, :, None] >> (4 * sh)[None, None, :]) & 0xF) | 0x4B000000            # [R, W, 8]
            f = nib.to(tl.float32, bitcast=True) - 8388608.0
            w = tl.reshape((f - z[:, :, None]) * s[:, :, None], [BLOCK_R, BLOCK_C])
        dst = out_ptr + n.to(tl.int64) * OUT_N + OUT_OFF + rows[:, None] * C + cols[None, :]
        tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=m)


# block sizes per pass and kernel variant (quant_kernels.py), the column tile a multiple of the format's scale
# group: dense chosen on the H200 for the 30B shape (H 2048, I 768) by bench/step_ceiling.py's kernel sweep; fp8 and
# int4 v1 on the H100 by bench/formats.py's sweep (its results file records the grid and the times); v3's the fastest
# of `bench/quant_kernels.py --quick` on the H100 (docs/results/quant/v3_h100_2026-12-07)
GATE_UP_BLOCKS = {"BLOCK_I": 16, "BLOCK_H": 256, "num_warps": 4}
DOWN_BLOCKS = {"BLOCK_O": 32, "BLOCK_K": 256, "num_warps": 4}
BLOCKS = {0: (GATE_UP_BLOCKS, DOWN_BLOCKS),
          1: ({"BLOCK_I": 16, "BLOCK_H": 1024, "num_warps": 4, "num_stages": 2},
              {"BLOCK_O": 16, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2}),
          2: ({"BLOCK_I": 4, "BLOCK_H": 512, "num_warps": 4, "num_stages": 4},
              {"BLOCK_O": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2}),
          5: ({"BLOCK_I": 8, "BLOCK_H": 1024, "num_warps": 4, "num_stages": 2},
              {"BLOCK_O": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2}),
          6: ({"BLOCK_I": 8, "BLOCK_H": 1024, "num_warps": 4, "num_stages": 2},
              {"BLOCK_O": 32, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2})}


# float32 1.0's bits, handed to the kernels as a runtime value so the compiler keeps it (and the nibble mask derived
# from it) in registers: `(b & mask) | one` is then a single LOP3 (with both as immediates it takes two)
ONE_BITS = 0x3F800000


def kernel_id(fmt, variant: str | None = None) -> int:
    """The decode kernels' variant (FMT) for expert format `fmt` (None: dense, 0): quant_kernels.VARIANTS's, named by
    `variant` ("v1", "v3") or else by the format's `kernels` knob; fp8 widths (H, I) that are not multiples of 4
    run v1 (v3 reads rows as int32 words)."""
    if fmt is None or fmt.kernel == 0:
        return 0
    if fmt.kernel < 0:
        raise ValueError(f"expert format {fmt.spec()} has no decode kernel on the GPU")
    kid = qk.VARIANTS[fmt.kernel][variant or fmt.kernels]
    if kid == qk.FP8_V3 and (fmt.hidden % 4 or fmt.inter % 4):
        return qk.FP8_V1            # v3 reads each row as 4-byte words: widths that are not multiples of 4 run v1
    return kid


def _geometry(fmt) -> dict:
    """The quantized layout's offsets and strides the kernels take as constants (see formats/fp8.py, int4.py)."""
    if fmt is not None and fmt.kernel == 1:
        return dict(S_OFF=fmt.s_off, Z_OFF=0, SH=fmt.nbH, SI=fmt.nbI, NB_GU=fmt.s_gate, NB_DN=2 * fmt.s_gate,
                    STEP=fmt.block)
    if fmt is not None and fmt.kernel == 2:
        return dict(S_OFF=fmt.s_off, Z_OFF=fmt.z_off, SH=fmt.ngH, SI=fmt.ngI, NB_GU=0, NB_DN=fmt.n_gu,
                    STEP=fmt.group)
    return dict(S_OFF=0, Z_OFF=0, SH=0, SI=0, NB_GU=0, NB_DN=0, STEP=0)


def _tile(block: int, step: int, size: int) -> int:
    """A column tile: a multiple of the scale group `step`, no wider than needed for `size` columns."""
    if not step:
        return block
    block = max(step, block // step * step)
    while block > step and block // 2 >= size:
        block //= 2
    return block


def _live(live: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """[1] int32 on `device`: how many of the T rows are computed (`live`; None: all)."""
    return torch.full((1,), T, dtype=torch.int32, device=device) if live is None else live


def gate_up_pass(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor, h: torch.Tensor,
                 route_idx: torch.Tensor, route_w: torch.Tensor, blocks: dict | None = None, fmt=None,
                 variant: str | None = None, act: str = "silu", live: torch.Tensor | None = None,
                 dst: torch.Tensor | None = None) -> None:
    """h [P, I] = act(x @ gate^T) * (x @ up^T) per pair; records the routing. x [T, H] contiguous. `fmt`: the
    expert format of the blobs `addr` points at (None: dense); `variant`: "v1" or "v3" kernels (None: the format's
    knob); `act`: the gate's activation (`ACTIVATIONS`); `live` [1] int32 on the device: rows at or past it read
    no weights and get zeros (a static batch's unused rows; None: every row); `dst` [P] int64 (dense only): each
    pair's landing slot address (0: none), where every weight read is also written (None: landing off)."""
    P, inter = h.shape
    kid = kernel_id(fmt, variant)
    b = dict(BLOCKS[kid][0], **(blocks or {}))
    g = _geometry(fmt)
    H = x.shape[-1]
    assert kid not in (1, 5) or 128 % b["BLOCK_I"] == 0, "fp8 row tiles must divide the 128-row scale blocks"
    _gate_up_kernel[(P, triton.cdiv(inter, b["BLOCK_I"]))](
        x, topk, weights, addr, h, route_idx, route_w, _live(live, x.shape[0], x.device),
        topk if dst is None else dst, ONE_BITS, WRITE=dst is not None, K=topk.shape[-1], H=H, I=inter,
        BLOCK_I=b["BLOCK_I"], BLOCK_H=_tile(b["BLOCK_H"], g["STEP"], H), FMT=kid,
        S_OFF=g["S_OFF"], Z_OFF=g["Z_OFF"], SH=g["SH"], NB=g["NB_GU"], STEP=g["STEP"], NATIVE_F8=not INTERPRETED,
        ACT=activation_id(act), num_warps=b["num_warps"], num_stages=b.get("num_stages", 3))


def down_pass(h: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor, y: torch.Tensor,
              blocks: dict | None = None, fmt=None, variant: str | None = None,
              live: torch.Tensor | None = None, dst: torch.Tensor | None = None) -> None:
    """y [P, H] (float32) = (h @ down^T) * routing weight per pair; `live`, `dst` as in `gate_up_pass`."""
    P, inter = h.shape
    H = y.shape[-1]
    kid = kernel_id(fmt, variant)
    b = dict(BLOCKS[kid][1], **(blocks or {}))
    g = _geometry(fmt)
    assert kid not in (1, 5) or 128 % b["BLOCK_O"] == 0, "fp8 row tiles must divide the 128-row scale blocks"
    _down_kernel[(P, triton.cdiv(H, b["BLOCK_O"]))](
        h, topk, weights, addr, y, _live(live, topk.shape[0], h.device), topk if dst is None else dst, ONE_BITS,
        WRITE=dst is not None, K=topk.shape[-1], H=H, I=inter,
        BLOCK_O=b["BLOCK_O"], BLOCK_K=_tile(b["BLOCK_K"], g["STEP"], inter),
        FMT=kid, S_OFF=g["S_OFF"], Z_OFF=g["Z_OFF"], SI=g["SI"], NB=g["NB_DN"], STEP=g["STEP"],
        NATIVE_F8=not INTERPRETED, num_warps=b["num_warps"], num_stages=b.get("num_stages", 3))


def decode_experts_triton(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor,
                          route_idx: torch.Tensor, route_w: torch.Tensor, inter: int,
                          gate_up_blocks: dict | None = None, down_blocks: dict | None = None,
                          fmt=None, variant: str | None = None, act: str = "silu",
                          live: torch.Tensor | None = None, land: torch.Tensor | None = None,
                          layer: torch.Tensor | None = None) -> torch.Tensor:
    """The two Triton passes (see the module docstring); x [T, H], addr [E] int64 -> [T, H]. `fmt`: the expert
    format of the blobs (formats.ExpertFormat; None: dense in x's dtype); `act`: the gate's activation; `live`:
    [1] int32, rows at or past it get zeros without reading a weight (None: every row); `land` [3 + 3C + T*K]
    int64 (dense only; None or empty: off): the landing state `_land_kernel` reads and updates, then each pair's
    landing slot; `layer` [1] int64: the MoE layer's position (landing only)."""
    T, K = topk.shape
    H = x.shape[-1]
    x, topk, weights = x.contiguous(), topk.contiguous(), weights.contiguous()
    h = x.new_empty(T * K, inter)
    y = torch.empty(T * K, H, device=x.device, dtype=torch.float32)
    live = _live(live, T, x.device)
    dst = None
    if land is not None and land.numel() and fmt is None:
        P = T * K
        C = (land.numel() - 3 - P) // 3
        dst = land[3 + 3 * C:]
        _land_kernel[(1,)](topk, addr, live, layer, land, dst, K=K, P=P, BLOCK_P=triton.next_power_of_2(P), C=C,
                           BLOCK_C=triton.next_power_of_2(C))
    gate_up_pass(x, topk, weights, addr, h, route_idx, route_w, gate_up_blocks, fmt, variant, act, live, dst)
    down_pass(h, topk, weights, addr, y, down_blocks, fmt, variant, live, dst)
    return y.view(T, K, H).sum(1).to(x.dtype)


_FORMATS: dict[tuple, object] = {}


def _format(spec: str, hidden: int, inter: int, dtype: torch.dtype):
    key = (spec, hidden, inter, dtype)
    f = _FORMATS.get(key)
    if f is None:
        from ..formats import make_format
        f = _FORMATS[key] = make_format(spec, hidden, inter, dtype)
    return f


@torch.library.custom_op("vismmoe::decode_experts", mutates_args=("route_idx", "route_w", "land"))
def decode_experts(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor,
                   route_idx: torch.Tensor, route_w: torch.Tensor, live: torch.Tensor, land: torch.Tensor,
                   layer: torch.Tensor, inter: int, spec: str = "dense", act: str = "silu") -> torch.Tensor:
    """Routed experts of a few tokens read through the address table `addr` (blobs of expert format `spec`,
    gate activation `act`); records the routing; rows at or past `live` ([1] int32) get zeros, and their pairs'
    programs return at once (no weight read, no loop); `land` (empty: off) as in `decode_experts_triton`. CUDA
    only."""
    fmt = None if spec == "dense" else _format(spec, x.shape[-1], inter, x.dtype)
    return decode_experts_triton(x, topk, weights, addr, route_idx, route_w, inter, fmt=fmt, act=act, live=live,
                                 land=land, layer=layer)


@decode_experts.register_fake
def _(x, topk, weights, addr, route_idx, route_w, live, land, layer, inter, spec="dense", act="silu"):
    return torch.empty_like(x)


DEQUANT_BLOCKS = {"BLOCK_R": 32, "BLOCK_C": 128}


def dequantize(fmt, pool: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The blobs in slots `sel` [N] (int64, on pool's device) of `pool` [S, numel] (a quantized format) ->
    (gate_up [N, 2I, H], down [N, H, I]) in its activation dtype: `dequantize_triton` on CUDA (reads the slots in
    place), the format's torch reference over the gathered blobs elsewhere."""
    if not pool.is_cuda or triton is None or fmt.kernel == 0:
        return fmt.dequantize(pool.index_select(0, sel))
    return dequantize_triton(fmt, pool, sel)


def dequantize_triton(fmt, pool: torch.Tensor, sel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`dequantize` by `_dequant_kernel`, one launch per matrix (gate, up, down for fp8; gate_up, down for int4);
    `sel` None: every slot of `pool`."""
    H, I = fmt.hidden, fmt.inter
    assert pool.is_contiguous(), "the slot pool is read in place"
    if sel is None:
        sel = torch.arange(pool.shape[0], device=pool.device)
    sel = sel.to(device=pool.device, dtype=torch.int64).contiguous()
    N = sel.shape[0]
    out = torch.empty(N, 3 * I * H, dtype=fmt.dtype, device=pool.device)
    g = _geometry(fmt)
    BR = DEQUANT_BLOCKS["BLOCK_R"]
    assert 128 % BR == 0, "an fp8 tile's rows lie in one 128-row scale block"
    BC = max(DEQUANT_BLOCKS["BLOCK_C"], g["STEP"])
    if fmt.kernel == 1:      # (rows, cols, q offset, scale offset, zero offset, scale row length, out offset)
        BC = 128             # one scale block per tile
        mats = [(I, H, 0, g["S_OFF"], 0, g["SH"], 0),
                (I, H, I * H, g["S_OFF"] + 4 * g["NB_GU"], 0, g["SH"], I * H),
                (H, I, 2 * I * H, g["S_OFF"] + 4 * g["NB_DN"], 0, g["SI"], 2 * I * H)]
    else:
        mats = [(2 * I, H, 0, g["S_OFF"], g["Z_OFF"], g["SH"], 0),
                (H, I, I * H, g["S_OFF"] + 4 * g["NB_DN"], g["Z_OFF"] + g["NB_DN"], g["SI"], 2 * I * H)]
    for R, C, q_off, s_off, z_off, sr, o_off in mats:
        _dequant_kernel[(N, triton.cdiv(R, BR), triton.cdiv(C, BC))](
            pool, sel, out, NBYTES=fmt.nbytes, OUT_N=3 * I * H, OUT_OFF=o_off, R=R, C=C, Q_OFF=q_off, S_OFF=s_off,
            Z_OFF=z_off, SR=sr, FMT=fmt.kernel, BLOCK_R=BR, BLOCK_C=BC, STEP=g["STEP"], NATIVE_F8=not INTERPRETED)
    return out[:, : 2 * I * H].view(N, 2 * I, H), out[:, 2 * I * H:].view(N, H, I)


LAND = 2            # landing candidates of a step, per expert a token routes to (C = LAND * top-k)


def landing_plan(idx, missing, layer: int, owners: list[int], taken: list[bool]) -> list[tuple[int, int]]:
    """The landing slots MoE layer `layer`'s misses take (`_land_kernel`'s rule, on the host): its distinct
    experts of `idx` (its live pairs' experts) for which `missing(e)` holds, by expert id, take the candidates
    (in their order) whose expert's layer `owners[c]` is earlier (-1: a free slot) and that no earlier layer
    `taken`. Marks them taken. Returns [(expert, candidate index)]."""
    miss = sorted({int(e) for e in idx if missing(int(e))})
    elig = [c for c, (o, t) in enumerate(zip(owners, taken)) if o < layer and not t]
    plan = list(zip(miss, elig))
    for _, c in plan:
        taken[c] = True
    return plan


def land_on_host(pool, bank, idx, missing, layer: int, slots: list[int], owners: list[int], taken: list[bool]) -> None:
    """What the kernels' landing writes, done on the host (the CPU steps): each miss `landing_plan` gives a candidate
    is copied from `bank [E, numel]` (its layer's host blobs) into that candidate's slot of `pool`."""
    for e, c in landing_plan(idx, missing, layer, owners, taken):
        pool[slots[c]].copy_(bank[e])
