"""The quantized formats' arithmetic inside the decode kernels (moe_kernel.py): how one row tile of a blob's
matrix is dequantized and dotted with an activation row, one Triton helper per kernel variant.

    variant (FMT)  format  dequantization per weight
    1   fp8 v1     e4m3 -> float32 (hardware conversion on CUDA, `_e4m3` bit moves in the interpreter), times
                   x * block scale (the scale folded into x once per column)
    2   int4 v1    bytes [R, g/2] per group; nibble -> float32 through the mantissa of 2^23 and a subtraction;
                   s (q x) - s z x into an accumulator of [R, g/2]
    5   fp8 v3     int32 words [R, BLOCK_C/4]; byte K -> its value * 2^-120 by two shifts and a LOP3
                   (`_e4m3_scaled`), one FMA with x * block scale * 2^64 (x's column 4k+K, a vector in the words'
                   layout); the sum times 2^56
    6   int4 v3    int32 words [R, BLOCK_C/8] (column 8k+s in bits 4s..4s+3 of word k); nibble s -> the float
                   1 + n/16 by a shift and one LOP3 (`_one_plus`), one FMA with x's column 8k+s; the scale and
                   zero point once per (row, word):
                       sum_s x_s (n_s - z) s = s (16 sum_s x_s (1 + n_s/16) - (16 + z) sum_s x_s)
    v3 keeps every tensor [rows, words], so nothing is reduced across threads before a tile's end. (A v2, ids 3
    and 4, converted fp8 through f16 and summed int4 over a [rows, words, 8] tensor; slower than v3 in both
    formats on the H100, it was removed: docs/quantization.md.)

Every variant is exact in its dequantized weights (the products with x are float32); the kernels differ from
the torch reference (moe_kernel.decode_experts_reference) in summation order, and the int4 ones also in where
the scale and zero point enter (s (q x) - s z x, or 16 s (1 + q/16) x - s (16 + z) x: float32 rounding of the
sums they cancel). `INTERPRETED` (Triton's interpreter on the CPU, the tests) has no float8 type: there the e4m3
conversions are `_e4m3`'s bit moves, which give the same values (tests/test_expert_formats.py checks all 256
bytes against torch's float8_e4m3fn). fp8 v3 reads rows as int32 words: widths that are not multiples of 4 run
v1 (moe_kernel.kernel_id). Its bit moves give the e4m3 NaN bytes (0x7F, 0xFF) a finite value, where v1 gives NaN;
quantizing never writes them, and a checkpoint's expert weights are checked for NaN at load
(engine/weights_check.py: sampled by default, every value with `--check-weights full`).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - CPU installs without triton
    triton = None

FP8_V1, INT4_V1, FP8_V3, INT4_V3 = 1, 2, 5, 6
# a format's kernel id (1 fp8, 2 int4) -> its variants by name (the `kernels` knob, formats/base.py)
VARIANTS = {1: {"v1": FP8_V1, "v3": FP8_V3}, 2: {"v1": INT4_V1, "v3": INT4_V3}}


if triton is not None:
    @triton.jit
    def _e4m3(b):
        """uint8 e4m3 bits -> float32, exactly: the bits moved into an fp16 (whose 5-bit exponent holds e4m3's 4
        bits with the bias 8 lower, subnormals included) and scaled by 2^8."""
        b16 = b.to(tl.int16)
        bits = ((b16 & 0x7F) << 7) | ((b16 & 0x80) << 8)
        return bits.to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def e4m3_to_f32(w, NATIVE_F8: tl.constexpr):
        """uint8 e4m3 bytes -> float32 (exact). NATIVE_F8: the hardware conversion (CUDA), else `_e4m3`."""
        if NATIVE_F8:
            return w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return _e4m3(w)

    @triton.jit
    def _nibble(v):
        """int32 in [0, 16) -> float32, exactly, without an int-to-float conversion (a quarter-rate instruction):
        the value as the low mantissa bits of 2^23, minus 2^23."""
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def row_dot_fp8(base, x_ptr, t, rows, rmask, C: tl.constexpr, sp, SR: tl.constexpr, BLOCK_C: tl.constexpr,
                    NATIVE_F8: tl.constexpr, acc):
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
            acc += tl.sum(e4m3_to_f32(w, NATIVE_F8) * (xv * sv)[None, :], axis=1)
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
    def _word_tile(wp, rows, rmask, c0, W: tl.constexpr, CW: tl.constexpr, PER: tl.constexpr):
        """The words [R, W] of a tile from column c0 (PER columns a word) of a matrix of CW int32 words a row at
        `wp`: (word indices [W], their mask [W], the words; masked words read 0). Unmasked along the columns where
        the tile divides the row, so the loads vectorise."""
        jw = tl.arange(0, W)
        wc = tl.max_contiguous(tl.multiple_of(c0 // PER + jw, W), W)
        if CW % W == 0:
            wm = jw < W
        else:
            wm = wc < CW
        q = tl.load(wp + rows[:, None] * CW + wc[None, :], mask=rmask[:, None] & wm[None, :], other=0)
        return wc, wm, q

    @triton.jit
    def _one_plus(q, S: tl.constexpr, mask, one):
        """Nibble S of int32 words q -> the float32 1 + n/16, exactly: the nibble moved to mantissa bits 19..22 by
        one shift, then (b & mask) | one with mask = 0x00780000 and one = 1.0's bits, runtime values (one LOP3)."""
        if S <= 4:
            b = q << (19 - 4 * S)
        else:
            b = q >> (4 * S - 19)
        return ((b & mask) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def row_dot_int4_v3(base, x_ptr, t, rows, rmask, C: tl.constexpr, sp, zp, SR: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEP: tl.constexpr, one_bits):
        """sum_c w[rows, c] x[t, c], float32 [BLOCK_R]: nibbles read as int32 words [R, W] (word k of a row holds
        columns 8k..8k+7, column 8k+s in bits 4s..4s+3: the blob's little-endian nibble order), float32 scales
        `sp` and uint8 zeros `zp` [R, SR], one per STEP columns. Every tensor is two-dimensional, so no product
        is reduced across threads before the end: per nibble position S, x's column 8k+S is a vector [W] loaded
        in the words' own layout; the scale and the zero point per (row, word):
            sum_{8 columns of a word} x (q - z) s = s (16 sum x (1 + q/16) - (16 + z) sum x)
        Per weight: a shift, a LOP3, an FMA; per word two loads and three FMAs."""
        W: tl.constexpr = BLOCK_C // 8
        WG: tl.constexpr = STEP // 8
        CW: tl.constexpr = C // 8
        wp = base.to(tl.pointer_type(tl.int32))
        one = one_bits.to(tl.int32)                          # 0x3F800000, from the host (see moe_kernel.ONE_BITS)
        mask = (one >> 7) ^ 0x70000                          # 0x00780000, derived so it stays a register too
        acc = tl.zeros([BLOCK_R, W], dtype=tl.float32)
        for c0 in tl.range(0, C, BLOCK_C):
            wc, wm, q = _word_tile(wp, rows, rmask, c0, W, CW, 8)
            m2 = rmask[:, None] & wm[None, :]
            xp = x_ptr + t * C + 8 * wc
            tw = tl.zeros([BLOCK_R, W], dtype=tl.float32)
            xs = tl.zeros([W], dtype=tl.float32)
            for k in tl.static_range(8):
                xk = tl.load(xp + k, mask=wm, other=0.0).to(tl.float32)
                tw += _one_plus(q, k, mask, one) * xk[None, :]
                xs += xk
            gi = rows[:, None] * SR + (wc // WG)[None, :]
            s = tl.load(sp + gi, mask=m2, other=0.0)
            z = tl.load(zp + gi, mask=m2, other=0).to(tl.float32)
            acc += s * (16.0 * tw - (16.0 + z) * xs[None, :])
        return tl.sum(acc, axis=1)

    @triton.jit
    def _e4m3_scaled(w, K: tl.constexpr):
        """Byte K of int32 words w (e4m3) -> float32 value * 2^-120, exactly, by bit moves: the byte to the top
        (a shift), back down by 4 with its sign repeated (an arithmetic shift), then the sign and the 7 bits of
        exponent and mantissa kept (a LOP3): e4m3's 4-bit exponent lands in float32's low exponent bits, so a
        normal e4m3 value becomes a normal float32 2^-120 times it and a subnormal one a subnormal (kept: the
        kernels do not flush subnormals) 2^-120 times it."""
        if K == 3:
            b = w >> 4
        else:
            b = (w << (24 - 8 * K)) >> 4
        return (b & -0x78100000).to(tl.float32, bitcast=True)      # 0x87F00000 as an int32

    @triton.jit
    def row_dot_fp8_v3(base, x_ptr, t, rows, rmask, C: tl.constexpr, sp, SR: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """acc [BLOCK_R] = sum_c w[rows, c] x[t, c] for e4m3 bytes [R, C] at `base` read as int32 words [R, W]
        (a word holds columns 4k..4k+3), with float32 block scales [ceil(R/128), SR] at `sp` (the tile's rows lie
        in one 128-row block). Every tensor is two-dimensional, so no product is reduced across threads before
        the end. Per byte position K, x's column 4k+K is a vector [W] in the words' layout, times its column
        block's scale and 2^64; each weight is `_e4m3_scaled` (three integer ops, two for K = 3) and one FMA;
        the sum times 2^56 undoes the 2^-120."""
        W: tl.constexpr = BLOCK_C // 4
        CW: tl.constexpr = C // 4
        wp = base.to(tl.pointer_type(tl.int32))
        rb = tl.min(rows) // 128
        anyr = tl.max(rmask.to(tl.int32), axis=0)          # no row to read (address 0): no scale read either
        acc = tl.zeros([BLOCK_R, W], dtype=tl.float32)
        for c0 in tl.range(0, C, BLOCK_C):
            wc, wm, q = _word_tile(wp, rows, rmask, c0, W, CW, 4)
            sv = tl.load(sp + rb * SR + (4 * wc) // 128, mask=wm & ((wc * 0 + anyr) > 0), other=0.0)
            sv = sv * 18446744073709551616.0                   # 2^64
            xp = x_ptr + t * C + 4 * wc
            for k in tl.static_range(4):
                xk = tl.load(xp + k, mask=wm, other=0.0).to(tl.float32) * sv
                acc += _e4m3_scaled(q, k) * xk[None, :]
        return tl.sum(acc, axis=1) * 72057594037927936.0        # 2^56
