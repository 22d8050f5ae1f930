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

FP8_V1, INT4_V1, FP8_V2, INT4_V2, FP8_V3, INT4_V3 = 1, 2, 3, 4, 5, 6
# a format's kernel id (1 fp8, 2 int4) -> its variants by name (the `kernels` knob, formats/base.py)
VARIANTS = {1: {"v1": FP8_V1, "v2": FP8_V2, "v3": FP8_V3}, 2: {"v1": INT4_V1, "v2": INT4_V2, "v3": INT4_V3}}


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

    @triton.jit
    def _split8(v):
        """v [N, 8] -> its 8 columns, each [N], in order 0..7 (three rounds of tl.split; in registers where a
        thread holds a row's 8)."""
        N: tl.constexpr = v.shape[0]
        e, o = tl.split(tl.reshape(v, [N, 4, 2]))            # columns 0 2 4 6 | 1 3 5 7
        e0, e1 = tl.split(tl.reshape(e, [N, 2, 2]))           # 0 4 | 2 6
        o0, o1 = tl.split(tl.reshape(o, [N, 2, 2]))           # 1 5 | 3 7
        c0, c4 = tl.split(e0)
        c2, c6 = tl.split(e1)
        c1, c5 = tl.split(o0)
        c3, c7 = tl.split(o1)
        return c0, c1, c2, c3, c4, c5, c6, c7

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
        """As `row_dot_int4_v2` (the same words, the same 1 + q/16 algebra), with every tensor two-dimensional so
        no product is reduced across threads before the end: the words [R, W]; per nibble position S, x's column
        8k+S as a vector [W] loaded in the words' own layout; the scale and the zero point per (row, word):
            sum_{8 columns of a word} x (q - z) s = s (16 sum x (1 + q/16) - (16 + z) sum x)
        Per weight: a shift, a LOP3, an FMA; per word two loads and three FMAs."""
        W: tl.constexpr = BLOCK_C // 8
        WG: tl.constexpr = STEP // 8
        CW: tl.constexpr = C // 8
        EVEN: tl.constexpr = C % BLOCK_C == 0
        wp = base.to(tl.pointer_type(tl.int32))
        jw = tl.arange(0, W)
        one = one_bits.to(tl.int32)                          # 0x3F800000, from the host (see moe_kernel.ONE_BITS)
        mask = (one >> 7) ^ 0x70000                          # 0x00780000, derived so it stays a register too
        acc = tl.zeros([BLOCK_R, W], dtype=tl.float32)
        for c0 in tl.range(0, C, BLOCK_C):
            wc = tl.max_contiguous(tl.multiple_of(c0 // 8 + jw, W), W)
            if EVEN:
                wm = jw < W
            else:
                wm = wc < CW
            m2 = rmask[:, None] & wm[None, :]
            q = tl.load(wp + rows[:, None] * CW + wc[None, :], mask=m2, other=0)
            xp = x_ptr + t * C + 8 * wc
            x0 = tl.load(xp + 0, mask=wm, other=0.0).to(tl.float32)
            tw = _one_plus(q, 0, mask, one) * x0[None, :]
            xs = x0
            x1 = tl.load(xp + 1, mask=wm, other=0.0).to(tl.float32)
            tw += _one_plus(q, 1, mask, one) * x1[None, :]
            xs += x1
            x2 = tl.load(xp + 2, mask=wm, other=0.0).to(tl.float32)
            tw += _one_plus(q, 2, mask, one) * x2[None, :]
            xs += x2
            x3 = tl.load(xp + 3, mask=wm, other=0.0).to(tl.float32)
            tw += _one_plus(q, 3, mask, one) * x3[None, :]
            xs += x3
            x4 = tl.load(xp + 4, mask=wm, other=0.0).to(tl.float32)
            tw += _one_plus(q, 4, mask, one) * x4[None, :]
            xs += x4
            x5 = tl.load(xp + 5, mask=wm, other=0.0).to(tl.float32)
            tw += _one_plus(q, 5, mask, one) * x5[None, :]
            xs += x5
            x6 = tl.load(xp + 6, mask=wm, other=0.0).to(tl.float32)
            tw += _one_plus(q, 6, mask, one) * x6[None, :]
            xs += x6
            x7 = tl.load(xp + 7, mask=wm, other=0.0).to(tl.float32)
            tw += _one_plus(q, 7, mask, one) * x7[None, :]
            xs += x7
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
        EVEN: tl.constexpr = C % BLOCK_C == 0
        wp = base.to(tl.pointer_type(tl.int32))
        jw = tl.arange(0, W)
        rb = tl.min(rows) // 128
        anyr = tl.max(rmask.to(tl.int32), axis=0)          # no row to read (address 0): no scale read either
        acc = tl.zeros([BLOCK_R, W], dtype=tl.float32)
        for c0 in tl.range(0, C, BLOCK_C):
            wc = tl.max_contiguous(tl.multiple_of(c0 // 4 + jw, W), W)
            if EVEN:
                wm = jw < W
            else:
                wm = wc < CW
            q = tl.load(wp + rows[:, None] * CW + wc[None, :], mask=rmask[:, None] & wm[None, :], other=0)
            sv = tl.load(sp + rb * SR + (4 * wc) // 128, mask=wm & ((wc * 0 + anyr) > 0), other=0.0)
            sv = sv * 18446744073709551616.0                   # 2^64
            xp = x_ptr + t * C + 4 * wc
            x0 = tl.load(xp + 0, mask=wm, other=0.0).to(tl.float32) * sv
            acc += _e4m3_scaled(q, 0) * x0[None, :]
            x1 = tl.load(xp + 1, mask=wm, other=0.0).to(tl.float32) * sv
            acc += _e4m3_scaled(q, 1) * x1[None, :]
            x2 = tl.load(xp + 2, mask=wm, other=0.0).to(tl.float32) * sv
            acc += _e4m3_scaled(q, 2) * x2[None, :]
            x3 = tl.load(xp + 3, mask=wm, other=0.0).to(tl.float32) * sv
            acc += _e4m3_scaled(q, 3) * x3[None, :]
        return tl.sum(acc, axis=1) * 72057594037927936.0        # 2^56
