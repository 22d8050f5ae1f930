"""The quantized formats' arithmetic inside the decode kernels (moe_kernel.py): how one row tile of a blob's
matrix is dequantized and dotted with an activation row, one Triton helper per kernel variant.

    variant (FMT)  format  dequantization per weight
    1   fp8 v1     e4m3 -> float32 (hardware conversion on CUDA, `_e4m3` bit moves in the interpreter), times
                   x * block scale (the scale folded into x once per column)
    2   int4 v1    bytes [R, g/2] per group; nibble -> float32 through the mantissa of 2^23 and a subtraction;
                   s (q x) - s z x into an accumulator of [R, g/2]
    3   fp8 v2     e4m3 -> float16 (the hardware converts two a instruction) -> float32, times x * block scale;
                   as v1 but one conversion fewer a weight where the compiler lowers e4m3 -> f32 through f16
                   twice, and wider column tiles (`--sweep` chooses)
    4   int4 v2    int32 words [R, BLOCK_C/8] (one 16-byte load carries 32 weights); each nibble becomes the
                   float 1 + q/16 by two integer ops (its 4 bits into the top of 1.0's mantissa: shift, and-or),
                   one FMA with x; the group scale once per word (1 FMA / 8 weights) and the zero point and the
                   1.0 once per (row, group) of the tile:
                       sum_k x_k (q_k - z) s = s (16 sum_k x_k (1 + q_k/16) - (16 + z) sum_k x_k)

Every variant is exact in its dequantized weights (the products with x are float32); the kernels differ from
the torch reference (moe_kernel.decode_experts_reference) only in summation order. `INTERPRETED` (Triton's
interpreter on the CPU, the tests) has no float8 type: there the e4m3 conversions are `_e4m3`'s bit moves,
which give the same values (tests/test_expert_formats.py checks all 256 bytes against torch's float8_e4m3fn).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - CPU installs without triton
    triton = None

FP8_V1, INT4_V1, FP8_V2, INT4_V2 = 1, 2, 3, 4
NEW = {1: FP8_V2, 2: INT4_V2}           # format kernel id -> its default (newest) variant
OLD = {1: FP8_V1, 2: INT4_V1}


if triton is not None:
    @triton.jit
    def _e4m3(b):
        """uint8 e4m3 bits -> float32, exactly: the bits moved into an fp16 (whose 5-bit exponent holds e4m3's 4
        bits with the bias 8 lower, subnormals included) and scaled by 2^8."""
        b16 = b.to(tl.int16)
        bits = ((b16 & 0x7F) << 7) | ((b16 & 0x80) << 8)
        return bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def e4m3_to_f32(w, NATIVE_F8: tl.constexpr, VIA_F16: tl.constexpr):
        """uint8 e4m3 bytes -> float32 (exact). NATIVE_F8: the hardware conversion (CUDA), else `_e4m3`."""
        if NATIVE_F8:
            if VIA_F16:
                return w.to(tl.float8e4nv, bitcast=True).to(tl.float16).to(tl.float32)
            return w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return _e4m3(w)

    @triton.jit
    def _nibble(v):
        """int32 in [0, 16) -> float32, exactly, without an int-to-float conversion (a quarter-rate instruction):
        the value as the low mantissa bits of 2^23, minus 2^23."""
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def row_dot_fp8(base, x_ptr, t, rows, rmask, C: tl.constexpr, sp, SR: tl.constexpr, BLOCK_C: tl.constexpr,
                    NATIVE_F8: tl.constexpr, VIA_F16: tl.constexpr, acc):
        """acc [BLOCK_R] += sum_c w[rows, c] x[t, c]; e4m3 bytes [R, C] at `base`, float32 block scales
        [ceil(R/128), SR] at `sp`; the tile's rows lie in one 128-row block (BLOCK_R divides 128), so its scales
        are one vector over its columns, folded into x."""
        rb = tl.min(rows) // 128
        anyr = tl.max(rmask.to(tl.int32), axis=0)          # no row to read (address 0): no scale read either
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cm = cols < C
            xv = tl.load(x_ptr + t * C + cols, mask=cm, other=0.0).to(tl.float32)
            w = tl.load(base + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0)
            sv = tl.load(sp + rb * SR + cols // 128, mask=cm & ((cols * 0 + anyr) > 0), other=0.0)  # [BLOCK_C]
            acc += tl.sum(e4m3_to_f32(w, NATIVE_F8, VIA_F16) * (xv * sv)[None, :], axis=1)
        return acc

    @triton.jit
    def row_dot_int4_v1(base, x_ptr, t, rows, rmask, C: tl.constexpr, sp, zp, SR: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEP: tl.constexpr):
        """sum_c w[rows, c] x[t, c], float32 [BLOCK_R]: 4-bit pairs [R, C/2] at `base`, float32 scales `sp` and
        uint8 zeros `zp` [R, SR], one per STEP columns: (q - z) s x summed as s (q x) - s z x into one
        [BLOCK_R, STEP/2] accumulator, reduced once at the end."""
        KG: tl.constexpr = BLOCK_C // STEP
        accg = tl.zeros([BLOCK_R, STEP // 2], dtype=tl.float32)
        j = tl.arange(0, STEP // 2)
        for c0 in range(0, C, BLOCK_C):
            for gk in tl.static_range(KG):
                ce = c0 + gk * STEP + 2 * j
                cm = ce < C
                xe = tl.load(x_ptr + t * C + ce, mask=cm, other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + t * C + ce + 1, mask=cm, other=0.0).to(tl.float32)
                q = tl.load(base + rows[:, None] * (C // 2) + (ce // 2)[None, :],
                            mask=rmask[:, None] & cm[None, :], other=0)
                g = (c0 + gk * STEP) // STEP
                gm = rmask & ((rows * 0 + g * STEP) < C)      # a tensor mask (a scalar one breaks interpreters)
                sc = tl.load(sp + rows * SR + g, mask=gm, other=0.0)                     # [BLOCK_R]
                z = tl.load(zp + rows * SR + g, mask=gm, other=0).to(tl.float32)
                q32 = q.to(tl.int32)
                accg += sc[:, None] * (_nibble(q32 & 0xF) * xe[None, :] + _nibble(q32 >> 4) * xo[None, :]) - \
                    (sc * z)[:, None] * (xe + xo)[None, :]
        return tl.sum(accg, axis=1)

    @triton.jit
    def row_dot_int4_v2(base, x_ptr, t, rows, rmask, C: tl.constexpr, sp, zp, SR: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEP: tl.constexpr):
        """As `row_dot_int4_v1`, read as int32 words: word k of a row holds columns 8k..8k+7, column 8k+s in
        bits 4s..4s+3 (the blob's little-endian nibble order). Each nibble q becomes 1 + q/16 = bitcast((q << 19)
        | 0x3F800000): exact, and its product with a bf16 x is exact in float32. BLOCK_C a multiple of STEP."""
        W: tl.constexpr = BLOCK_C // 8                  # words of a tile row
        KG: tl.constexpr = BLOCK_C // STEP              # groups of a tile row
        WG: tl.constexpr = STEP // 8                    # words of a group
        CW: tl.constexpr = C // 8                       # words of a matrix row
        wp = base.to(tl.pointer_type(tl.int32))
        jw = tl.arange(0, W)
        sh = tl.arange(0, 8)
        kg = tl.arange(0, KG)
        acc = tl.zeros([BLOCK_R, W], dtype=tl.float32)      # 16 s sum x (1 + q/16), per (row, word)
        corr = tl.zeros([BLOCK_R, KG], dtype=tl.float32)    # s (16 + z) sum x, per (row, group)
        for c0 in range(0, C, BLOCK_C):
            wc = c0 // 8 + jw
            wm = wc < CW
            q = tl.load(wp + rows[:, None] * CW + wc[None, :], mask=rmask[:, None] & wm[None, :], other=0)
            xc = c0 + 8 * jw[:, None] + sh[None, :]                                          # [W, 8]
            xv = tl.load(x_ptr + t * C + xc, mask=xc < C, other=0.0).to(tl.float32)
            f = ((((q[:, :, None] >> (4 * sh)[None, None, :]) & 0xF) << 19) | 0x3F800000).to(tl.float32,
                                                                                           bitcast=True)
            tw = tl.sum(f * xv[None, :, :], axis=2)                                          # [R, W]
            gi = c0 // STEP + jw // WG                                                       # group of a word
            s = tl.load(sp + rows[:, None] * SR + gi[None, :], mask=rmask[:, None] & wm[None, :], other=0.0)
            acc += (16.0 * s) * tw
            g = c0 // STEP + kg                                                              # [KG]
            gm = rmask[:, None] & (g < SR)[None, :]
            sg = tl.load(sp + rows[:, None] * SR + g[None, :], mask=gm, other=0.0)
            zg = tl.load(zp + rows[:, None] * SR + g[None, :], mask=gm, other=0).to(tl.float32)
            xg = tl.sum(tl.reshape(xv, [KG, STEP]), axis=1)                                  # [KG]
            corr += sg * (16.0 + zg) * xg[None, :]
        return tl.sum(acc, axis=1) - tl.sum(corr, axis=1)
