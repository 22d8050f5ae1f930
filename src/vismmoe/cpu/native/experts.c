/* Routed experts for a few tokens each, straight from their host blobs: vismmoe's native CPU expert kernel.
 *
 * Per expert, for its t tokens:
 *   x [t, H] float32  ->  gu = x @ gate_up^T [t, 2I]  ->  h = act(gate) * up [t, I]  ->  y = h @ down^T [t, H]
 *   y[k] *= w[k] (the routing weight of token k), when w is given
 *
 * Formats (the blob layouts of src/vismmoe/formats/):
 *   VM_F32    dense float32:   gate_up [2I, H] | down [H, I]
 *   VM_BF16   dense bfloat16:  the same, 2 bytes an element (a bf16 is the high half of a float32)
 *   VM_FP8    e4m3 weights [2I, H] | [H, I] and float32 scales, one per `block` x `block` block
 *             (gate [nb(I), nb(H)], up [nb(I), nb(H)], down [nb(H), nb(I)]); w = q * s
 *   VM_INT4   4-bit unsigned values two a byte (column 2j low nibble, 2j+1 high), float32 scales and uint8 zero points
 *             per group of `block` columns (gu [2I, H/g], down [H, I/g]); w = (q - z) * s
 *
 * How: output rows of all the call's experts are shared among OpenMP threads in blocks of RB rows (every expert's
 * gate/up rows, one barrier, the gating, one barrier, every expert's down rows: vm_experts; each expert's rows are
 * shared by all threads in turn, with no barrier between experts). A block's
 * rows are read once per tile of up to 4 tokens, VL weights at a time, dequantized in registers (bf16 by a shift,
 * e4m3 by bit operations or F16C, int4 nibbles against the even and odd columns of x) and multiplied into R * T
 * vector accumulators; the scale (and zero point) of a block or group is applied in the same registers. Nothing is
 * written between the weights and the sums, accumulation is float32 throughout, and x stays in cache. Vectorized
 * through the GCC/clang vector extension at the width -march gives; no reassociation is needed, so no -ffast-math.
 *
 * Built at first use by src/vismmoe/cpu/native/__init__.py with the system C compiler (-O3 -march=native
 * -fopenmp) and loaded with ctypes; entry points return 0 on success, a negative number for arguments they refuse.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define VM_F32 0
#define VM_BF16 1
#define VM_FP8 2
#define VM_INT4 3

#define VM_SILU 0
#define VM_GELU_TANH 1

#define RB 4          /* rows per block */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int32_t fmt, hidden, inter, block;   /* block: fp8's block side, int4's group size; unused for dense */
    int64_t q_gu, q_dn;                  /* byte offsets of gate_up's and down's weights in the blob */
    int64_t s_gate, s_up, s_dn;          /* byte offsets of float32 scales (int4: s_gate = gate_up's, s_up unused) */
    int64_t z_gu, z_dn;                  /* int4: byte offsets of the zero points */
} vm_layout;

/* one weight row: its values, and (quantized formats) the scales and zero points of its blocks / groups */
typedef struct {
    const void *q;
    const float *s;
    const uint8_t *z;
} vm_row;

/* ---- vectors: VL floats, the register width -march gives (AVX-512: 16, AVX: 8, else 4); -DVM_VL=N sets it (a
 * test builds every width on any host: the paths of other processors, groups narrower than a vector) ---------- */
#if defined(VM_VL)
#define VL VM_VL
#elif defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint8_t vb __attribute__((vector_size(VL)));

INLINE vf ldv(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
/* the sum of a vector's lanes as a tree, halves added lane by lane (log2(VL) vector adds, not VL - 1 dependent
 * scalar ones: a tile's sums cost about as much as its multiply-adds otherwise) */
typedef float vf2 __attribute__((vector_size(8)));
typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
INLINE float hsum2(vf2 v) { return v[0] + v[1]; }
INLINE float hsum4(vf4 v) { vf2 a, b; memcpy(&a, &v, 8); memcpy(&b, (const char *)&v + 8, 8); return hsum2(a + b); }
INLINE float hsum8(vf8 v) { vf4 a, b; memcpy(&a, &v, 16); memcpy(&b, (const char *)&v + 16, 16); return hsum4(a + b); }
INLINE float hsum(vf v) {
#if VL == 16
    vf8 a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (const char *)&v + 32, 32);
    return hsum8(a + b);
#elif VL == 8
    return hsum8(v);
#elif VL == 4
    return hsum4(v);
#else
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
#endif
}
INLINE float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* VL bytes zero-extended to 32-bit lanes (one vpmovzxbd where the processor has it: compilers do not always find
 * it for __builtin_convertvector) */
INLINE vu ld_u8(const uint8_t *p) {
#if defined(__AVX512F__) && VL == 16
    return (vu)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__) && VL == 8
    return (vu)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(b, vu);
#endif
}

/* VL bf16 -> float32: the bf16 is the float's high half (one vpmovzxwd from memory and a shift where the processor
 * has them: compilers split the generic conversion into halves and inserts) */
INLINE vf ld_bf16(const uint16_t *p) {
#if defined(__AVX512F__) && VL == 16
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__) && VL == 8
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

/* e4m3 byte -> float32, exact: normals re-biased (exponent bias 7 -> 127), subnormals (exponent 0) m * 2^-9,
 * S.1111.111 NaN; the sign bit moved to bit 31 (the scalar reference of the vector loads below) */
INLINE float e4m3_f32(uint8_t b) {
    const uint32_t em = b & 0x7Fu;
    float v = em < 8u ? (float)em * 0x1p-9f : bits_f32((em << 20) + (120u << 23));
    v = em == 0x7Fu ? NAN : v;
    return (b & 0x80u) ? -v : v;
}

/* VL e4m3 bytes -> float32 times E4M3_UNIT. With F16C: the byte's bits moved into a binary16 (sign to bit 15,
 * exponent and mantissa up by 7) are its value times 2^-8, subnormals included, and S.1111.111 is made a binary16
 * NaN; the scale it is multiplied by is taken times 2^8 (exact: a power of two), so the product is e4m3_f32(q) * s
 * bit for bit. Elsewhere the same bit operations as e4m3_f32 on 32-bit lanes. */
#if defined(__F16C__) && defined(__AVX2__) && VL == 8
#define E4M3_UNIT 0x1p-8f
INLINE vf ld_e4m3(const uint8_t *p) {
    const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i em = _mm_and_si128(v, _mm_set1_epi16(0x7F));
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(v, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(em, 7));
    h = _mm_or_si128(h, _mm_and_si128(_mm_cmpeq_epi16(em, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7E00)));
    return (vf)_mm256_cvtph_ps(h);
}
#elif defined(__F16C__) && defined(__AVX512F__) && VL == 16
#define E4M3_UNIT 0x1p-8f
INLINE vf ld_e4m3(const uint8_t *p) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i em = _mm256_and_si256(v, _mm256_set1_epi16(0x7F));
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8),
                                _mm256_slli_epi16(em, 7));
    h = _mm256_or_si256(h, _mm256_and_si256(_mm256_cmpeq_epi16(em, _mm256_set1_epi16(0x7F)),
                                            _mm256_set1_epi16(0x7E00)));
    return (vf)_mm512_cvtph_ps(h);
}
#else
#define E4M3_UNIT 1.0f
INLINE vf ld_e4m3(const uint8_t *p) {
    const vu u = ld_u8(p), em = u & 0x7Fu;
    const vu sub = (vu)(__builtin_convertvector((vi)em, vf) * 0x1p-9f);
    const vu is_sub = (vu)(em < 8u), is_nan = (vu)(em == 0x7Fu);
    vu mag = (sub & is_sub) | (((em << 20) + (120u << 23)) & ~is_sub);
    mag = (0x7FC00000u & is_nan) | (mag & ~is_nan);
    return (vf)(mag | ((u & 0x80u) << 24));
}
#endif

/* VL int4 bytes -> their low (even columns) and high (odd columns) nibbles as float32 */
INLINE void ld_int4(const uint8_t *p, vf *lo, vf *hi) {
    const vi u = (vi)ld_u8(p);
    *lo = __builtin_convertvector(u & 15, vf);
    *hi = __builtin_convertvector(u >> 4, vf);
}

/* ---- tiles: R rows (R <= RB) against T tokens (T <= 4) --------------------------------------------------------
 * out[k * ldo + r] = (row r . x[k]) * (scale ? scale[k] : 1), x [T, C] with rows `ldx` apart. Vector accumulators
 * acc[r][k] over the first columns (multiples of VL, a block / group at a time), scalar over the rest. Each
 * instantiation has constant R and T, so the arrays below live in registers. */
#define ACC_DECL                                                                                                \
    vf acc[RB][4];                                                                                             \
    for (int r = 0; r < R; r++)                                                                                \
        for (int k = 0; k < T; k++) acc[r][k] = (vf){0};

INLINE void finish(vf acc[RB][4], const float tail[RB][4], int R, int T, float *out, int ldo, const float *scale) {
    for (int r = 0; r < R; r++)
        for (int k = 0; k < T; k++) {
            const float s = hsum(acc[r][k]) + tail[r][k];
            out[(size_t)k * ldo + r] = scale ? s * scale[k] : s;
        }
}

INLINE void tile_f32(const vm_row *rw, int R, int T, int C, int B, const float *x, int ldx, float *out, int ldo,
                     const float *scale) {
    (void)B;
    ACC_DECL
    const int Cv = C - C % VL;
    for (int c = 0; c < Cv; c += VL) {
        vf xv[4];
        for (int k = 0; k < T; k++) xv[k] = ldv(x + (size_t)k * ldx + c);
        for (int r = 0; r < R; r++) {
            const vf wv = ldv((const float *)rw[r].q + c);
            for (int k = 0; k < T; k++) acc[r][k] += wv * xv[k];
        }
    }
    float tail[RB][4] = {{0}};
    for (int r = 0; r < R; r++)
        for (int k = 0; k < T; k++)
            for (int c = Cv; c < C; c++) tail[r][k] += ((const float *)rw[r].q)[c] * x[(size_t)k * ldx + c];
    finish(acc, tail, R, T, out, ldo, scale);
}

INLINE void tile_bf16(const vm_row *rw, int R, int T, int C, int B, const float *x, int ldx, float *out, int ldo,
                      const float *scale) {
    (void)B;
    ACC_DECL
    const int Cv = C - C % VL;
    for (int c = 0; c < Cv; c += VL) {
        vf xv[4];
        for (int k = 0; k < T; k++) xv[k] = ldv(x + (size_t)k * ldx + c);
        for (int r = 0; r < R; r++) {
            const vf wv = ld_bf16((const uint16_t *)rw[r].q + c);
            for (int k = 0; k < T; k++) acc[r][k] += wv * xv[k];
        }
    }
    float tail[RB][4] = {{0}};
    for (int r = 0; r < R; r++)
        for (int k = 0; k < T; k++)
            for (int c = Cv; c < C; c++)
                tail[r][k] += bits_f32((uint32_t)((const uint16_t *)rw[r].q)[c] << 16) * x[(size_t)k * ldx + c];
    finish(acc, tail, R, T, out, ldo, scale);
}

/* fp8: a block of B columns shares one scale per row */
INLINE void tile_fp8(const vm_row *rw, int R, int T, int C, int B, const float *x, int ldx, float *out, int ldo,
                     const float *scale) {
    ACC_DECL
    const int Cv = C - C % VL;
    for (int c0 = 0, j = 0; c0 < Cv; c0 += B, j++) {
        const int c1 = c0 + B < Cv ? c0 + B : Cv;
        vf sv[RB];
        for (int r = 0; r < R; r++) sv[r] = (vf){0} + rw[r].s[j] * (1.0f / E4M3_UNIT);
        for (int c = c0; c < c1; c += VL) {
            vf xv[4];
            for (int k = 0; k < T; k++) xv[k] = ldv(x + (size_t)k * ldx + c);
            for (int r = 0; r < R; r++) {
                const vf wv = ld_e4m3((const uint8_t *)rw[r].q + c) * sv[r];
                for (int k = 0; k < T; k++) acc[r][k] += wv * xv[k];
            }
        }
    }
    float tail[RB][4] = {{0}};
    for (int r = 0; r < R; r++)
        for (int c = Cv; c < C; c++) {
            const float wc = e4m3_f32(((const uint8_t *)rw[r].q)[c]) * rw[r].s[c / B];
            for (int k = 0; k < T; k++) tail[r][k] += wc * x[(size_t)k * ldx + c];
        }
    finish(acc, tail, R, T, out, ldo, scale);
}

/* int4: x comes de-interleaved, each token's even columns then its odd ones (ldx apart per token, the odd half at
 * C/2); byte j of a row holds columns 2j (low nibble) and 2j+1 (high). A group of B columns is B/2 bytes. */
INLINE void tile_int4(const vm_row *rw, int R, int T, int C, int B, const float *x, int ldx, float *out, int ldo,
                      const float *scale) {
    ACC_DECL
    const int Cb = C / 2, Cbv = Cb - Cb % VL, G = B / 2;
    /* a group narrower than a vector (G < VL: groups of 16 under AVX-512) puts several groups in one vector: each
     * lane takes its own group's scale and zero point */
    for (int c = 0; G % VL && c < Cbv; c += VL) {
        vf xe[4], xo[4];
        for (int k = 0; k < T; k++) {
            xe[k] = ldv(x + (size_t)k * ldx + c);
            xo[k] = ldv(x + (size_t)k * ldx + Cb + c);
        }
        int jl[VL];                                     /* each lane's group */
        for (int l = 0; l < VL; l++) jl[l] = (c + l) / G;
        for (int r = 0; r < R; r++) {
            vf sv, zs, lo, hi;
            for (int l = 0; l < VL; l++) {
                sv[l] = rw[r].s[jl[l]];
                zs[l] = rw[r].s[jl[l]] * (float)rw[r].z[jl[l]];
            }
            ld_int4((const uint8_t *)rw[r].q + c, &lo, &hi);
            lo = lo * sv - zs;
            hi = hi * sv - zs;
            for (int k = 0; k < T; k++) acc[r][k] += lo * xe[k] + hi * xo[k];
        }
    }
    for (int c0 = 0, j = 0; G % VL == 0 && c0 < Cbv; c0 += G, j++) {
        const int c1 = c0 + G < Cbv ? c0 + G : Cbv;
        vf sv[RB], zs[RB];
        for (int r = 0; r < R; r++) {
            sv[r] = (vf){0} + rw[r].s[j];
            zs[r] = (vf){0} + rw[r].s[j] * (float)rw[r].z[j];
        }
        for (int c = c0; c < c1; c += VL) {
            vf xe[4], xo[4];
            for (int k = 0; k < T; k++) {
                xe[k] = ldv(x + (size_t)k * ldx + c);
                xo[k] = ldv(x + (size_t)k * ldx + Cb + c);
            }
            for (int r = 0; r < R; r++) {
                vf lo, hi;
                ld_int4((const uint8_t *)rw[r].q + c, &lo, &hi);
                lo = lo * sv[r] - zs[r];                 /* (q - z) * s as q * s - z * s */
                hi = hi * sv[r] - zs[r];
                for (int k = 0; k < T; k++) acc[r][k] += lo * xe[k] + hi * xo[k];
            }
        }
    }
    float tail[RB][4] = {{0}};
    for (int r = 0; r < R; r++)
        for (int c = Cbv; c < Cb; c++) {
            const uint8_t b = ((const uint8_t *)rw[r].q)[c];
            const float s = rw[r].s[c / G], zs = s * (float)rw[r].z[c / G];
            const float lo = (float)(b & 15u) * s - zs, hi = (float)(b >> 4) * s - zs;
            for (int k = 0; k < T; k++)
                tail[r][k] += lo * x[(size_t)k * ldx + c] + hi * x[(size_t)k * ldx + Cb + c];
        }
    finish(acc, tail, R, T, out, ldo, scale);
}

/* the instantiations: (R, T) = (4, 1), (4, 2), (2, 3), (2, 4) for whole blocks, (1, T) for the rows left over */
typedef void (*tile_fn)(const vm_row *, int, int, const float *, int, float *, int, const float *);
#define TILE_ARGS const vm_row *rw, int C, int B, const float *x, int ldx, float *out, int ldo, const float *scale
#define INST(F, R, T) \
    static void F##_##R##_##T(TILE_ARGS) { F(rw, R, T, C, B, x, ldx, out, ldo, scale); }
#define INST_ALL(F) INST(F, 4, 1) INST(F, 4, 2) INST(F, 2, 3) INST(F, 2, 4) \
    INST(F, 1, 1) INST(F, 1, 2) INST(F, 1, 3) INST(F, 1, 4)
INST_ALL(tile_f32)
INST_ALL(tile_bf16)
INST_ALL(tile_fp8)
INST_ALL(tile_int4)
#define TABLE(F) {F##_4_1, F##_4_2, F##_2_3, F##_2_4, F##_1_1, F##_1_2, F##_1_3, F##_1_4}
static const tile_fn TILES[4][8] = {TABLE(tile_f32), TABLE(tile_bf16), TABLE(tile_fp8), TABLE(tile_int4)};

/* row r of gate_up (which = 0) or down (which = 1) */
static vm_row row_at(const vm_layout *L, const uint8_t *blob, int which, int r) {
    const int H = L->hidden, I = L->inter, C = which ? I : H;
    const uint8_t *q = blob + (which ? L->q_dn : L->q_gu);
    vm_row w = {NULL, NULL, NULL};
    switch (L->fmt) {
        case VM_F32: w.q = (const float *)q + (size_t)r * C; break;
        case VM_BF16: w.q = (const uint16_t *)q + (size_t)r * C; break;
        case VM_FP8: {
            const int B = L->block, nbC = (C + B - 1) / B;
            int rr = r;
            const float *s;
            if (which) s = (const float *)(blob + L->s_dn);
            else if (r < I) s = (const float *)(blob + L->s_gate);
            else { s = (const float *)(blob + L->s_up); rr = r - I; }
            w.q = q + (size_t)r * C;
            w.s = s + (size_t)(rr / B) * nbC;
            break;
        }
        default: {   /* VM_INT4 */
            const int ng = C / L->block;
            w.q = q + (size_t)r * (C / 2);
            w.s = (const float *)(blob + (which ? L->s_dn : L->s_gate)) + (size_t)r * ng;
            w.z = blob + (which ? L->z_dn : L->z_gu) + (size_t)r * ng;
            break;
        }
    }
    return w;
}

/* rows [r0, r0 + R) (R <= RB) of one matrix against t tokens x [t, C] (ldx apart): out[k * ldo + r0 + r], times
 * scale[k] when given; the rows are read once per tile of 4 tokens */
static void rows(const vm_layout *L, const uint8_t *blob, int which, int r0, int R, const float *x, int ldx, int t,
                 float *out, int ldo, const float *scale) {
    const int C = which ? L->inter : L->hidden;
    const tile_fn *tiles = TILES[L->fmt];
    vm_row rw[RB];
    for (int r = 0; r < R; r++) rw[r] = row_at(L, blob, which, r0 + r);
    for (int k0 = 0; k0 < t; k0 += 4) {
        const int T = t - k0 < 4 ? t - k0 : 4;
        const float *xk = x + (size_t)k0 * ldx, *sk = scale ? scale + k0 : NULL;
        float *o = out + (size_t)k0 * ldo + r0;
        if (R == RB) {
            tiles[T - 1](rw, C, L->block, xk, ldx, o, ldo, sk);
            if (T > 2) tiles[T - 1](rw + 2, C, L->block, xk, ldx, o + 2, ldo, sk);     /* (2, T): two halves */
        } else {
            for (int r = 0; r < R; r++) tiles[3 + T](rw + r, C, L->block, xk, ldx, o + r, ldo, sk);
        }
    }
}

INLINE float act_silu(float g) { return g / (1.0f + expf(-g)); }
INLINE float act_gelu_tanh(float g) {
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

/* Which build this is: bit 0 OpenMP, bit 1 AVX2, bit 2 AVX-512F, bit 3 FMA, bit 4 F16C (what the compiler
 * targeted). */
int vm_info(void) {
    int f = 0;
#ifdef _OPENMP
    f |= 1;
#endif
#ifdef __AVX2__
    f |= 2;
#endif
#ifdef __AVX512F__
    f |= 4;
#endif
#ifdef __FMA__
    f |= 8;
#endif
#ifdef __F16C__
    f |= 16;
#endif
    return f;
}

/* the vector width this build computes with (floats) */
int vm_vl(void) { return VL; }

/* float32 scratch vm_experts needs for C token rows: gu [C, 2I], h [C, I], and for int4 x de-interleaved [C, H] */
int64_t vm_scratch(int hidden, int inter, int t) { return (int64_t)t * (3 * (int64_t)inter + hidden); }

/* A team of threads running one piece of work together: this thread's number, the team's size, and how its
 * threads wait for each other (an OpenMP barrier in vm_experts; decoder.c's own spinning barrier). */
typedef struct vm_team vm_team;
struct vm_team {
    int tid, nt;
    void (*barrier)(vm_team *);
    void *state;                         /* the barrier's own (decoder.c) */
    int sense;                           /* the barrier's per-thread phase (decoder.c) */
};

/* [lo, hi): this thread's share of n items, as OpenMP's schedule(static) gives them */
INLINE int64_t share_lo(const vm_team *T, int64_t n) { return n * T->tid / T->nt; }
INLINE int64_t share_hi(const vm_team *T, int64_t n) { return n * (T->tid + 1) / T->nt; }

/* The work of vm_experts for one thread of team T: every thread of the team calls it with the same arguments and
 * gets its share of each loop (a team of one does all of it). Arguments checked by the caller. Ends with a barrier
 * of the team. */
static void experts_team(vm_team *T, const vm_layout *L, int n, const uint8_t *const *blobs, const int64_t *off,
                         const float *x, const float *w, int act, float *scratch, float *y) {
    const int64_t C = off[n];
    const int H = L->hidden, I = L->inter;
    const int int4 = L->fmt == VM_INT4;
    float *gu = scratch, *h = scratch + (size_t)C * 2 * I, *xd = h + (size_t)C * I;
    const int nb_gu = (2 * I + RB - 1) / RB, nb_dn = (H + RB - 1) / RB;
    if (int4) {             /* each token's even columns, then its odd ones */
        for (int64_t k = share_lo(T, C); k < share_hi(T, C); k++)
            for (int c = 0; c < H; c++) xd[(size_t)k * H + (c & 1) * (H / 2) + c / 2] = x[(size_t)k * H + c];
        T->barrier(T);
    }
    /* expert by expert, every thread on a share of its rows (the memory pattern of one expert a call), with no
     * barrier between experts: the first barrier is the one before the gating */
    for (int e = 0; e < n; e++) {
        const int64_t k0 = off[e], t = off[e + 1] - k0;
        if (t == 0) continue;
        for (int64_t b = share_lo(T, nb_gu); b < share_hi(T, nb_gu); b++) {
            const int r0 = (int)b * RB, R = 2 * I - r0 < RB ? 2 * I - r0 : RB;
            rows(L, blobs[e], 0, r0, R, (int4 ? xd : x) + (size_t)k0 * H, H, (int)t, gu + (size_t)k0 * 2 * I,
                 2 * I, NULL);
        }
    }
    T->barrier(T);
    for (int64_t i = share_lo(T, I); i < share_hi(T, I); i++) {
        const size_t at = int4 ? (size_t)(i & 1) * (I / 2) + i / 2 : (size_t)i;     /* int4: de-interleaved */
        for (int64_t k = 0; k < C; k++) {
            const float g = gu[(size_t)k * 2 * I + i], u = gu[(size_t)k * 2 * I + I + i];
            h[(size_t)k * I + at] = (act == VM_SILU ? act_silu(g) : act_gelu_tanh(g)) * u;
        }
    }
    T->barrier(T);
    for (int e = 0; e < n; e++) {
        const int64_t k0 = off[e], t = off[e + 1] - k0;
        if (t == 0) continue;
        for (int64_t b = share_lo(T, nb_dn); b < share_hi(T, nb_dn); b++) {
            const int r0 = (int)b * RB, R = H - r0 < RB ? H - r0 : RB;
            rows(L, blobs[e], 1, r0, R, h + (size_t)k0 * I, I, (int)t, y + (size_t)k0 * H, H, w ? w + k0 : NULL);
        }
    }
    T->barrier(T);
}

static void omp_team_barrier(vm_team *T) {
    (void)T;
#ifdef _OPENMP
#pragma omp barrier
#endif
}

/* 0 when the kernel computes blobs of layout L with activation act, else -1 */
static int layout_args(const vm_layout *L, int act) {
    if (!L || L->hidden <= 0 || L->inter <= 0 || (act != VM_SILU && act != VM_GELU_TANH)) return -1;
    if (L->fmt < VM_F32 || L->fmt > VM_INT4) return -1;
    if ((L->fmt == VM_FP8 || L->fmt == VM_INT4) && L->block <= 0) return -1;
    if (L->fmt == VM_INT4 && (L->block % 2 || L->hidden % L->block || L->inter % L->block)) return -1;
    return 0;
}

/* Checks vm_experts' arguments: 0 when the call has work, 1 when it has none, -1 when refused. */
static int experts_args(const vm_layout *L, int n, const uint8_t *const *blobs, const int64_t *off, const float *x,
                        int act, const float *scratch, const float *y) {
    if (n == 0) return 1;
    if (!L || n < 0 || !blobs || !off || off[0] != 0) return -1;
    for (int e = 0; e < n; e++)
        if (!blobs[e] || off[e + 1] < off[e]) return -1;
    if (off[n] == 0) return 1;
    if (!x || !scratch || !y) return -1;
    return layout_args(L, act);
}

/* n experts at once, each for its own tokens: one parallel region for the set, every thread on a share of each
 * expert's rows in turn; barriers only before the gating, after it and at the end (and after int4's de-interleave),
 * not between experts.
 *   L        the blobs' layout;                    blobs  [n] each expert's bytes (read only)
 *   off      [n + 1] expert e's tokens are rows off[e] .. off[e + 1] of x, w and y (off[0] = 0, non-decreasing)
 *   x        [C, H] float32 (C = off[n]);          w      [C] routing weights, or NULL
 *   act      VM_SILU or VM_GELU_TANH (applied to the gate half, times the up half)
 *   scratch  vm_scratch(H, I, C) float32;          y      [C, H] float32, written
 *   threads  OpenMP threads (<= 0: the runtime's default)
 * Returns 0, or -1 for a layout or argument it does not take (nothing written). */
int vm_experts(const vm_layout *L, int n, const uint8_t *const *blobs, const int64_t *off, const float *x,
               const float *w, int act, float *scratch, float *y, int threads) {
    const int rc = experts_args(L, n, blobs, off, x, act, scratch, y);
    if (rc != 0) return rc < 0 ? rc : 0;
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
    {
        vm_team T = {omp_get_thread_num(), omp_get_num_threads(), omp_team_barrier, NULL, 0};
        experts_team(&T, L, n, blobs, off, x, w, act, scratch, y);
    }
#else
    (void)threads;
    vm_team T = {0, 1, omp_team_barrier, NULL, 0};
    experts_team(&T, L, n, blobs, off, x, w, act, scratch, y);
#endif
    return 0;
}
