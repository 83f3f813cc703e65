/* A small vector layer so every kernel body is written once and compiled once per ISA level.
 *
 * A translation unit defines VX_LEVEL before including this header:
 *   VX_LEVEL_SCALAR  plain C, one float per "vector" (the fallback that always exists)
 *   VX_LEVEL_AVX2    8 floats per __m256, AVX2 + FMA
 *   VX_LEVEL_AVX512  16 floats per __m512, AVX-512F (+ AVX2/FMA for the 256-bit helpers)
 * and gets: the vector type `vf` of VW floats, the VX_FN / VX_INLINE attributes that enable the ISA for a
 * function (the build itself stays baseline x86-64: no -march flag, so the shared library loads on any
 * CPU and dispatch.c only calls a level that __builtin_cpu_supports reports), VX_NAME(f) for the
 * per-level symbol, and the operations below.
 *
 * Weight loads widen to float32 in registers: bf16 -> f32 is exact (the 16 bf16 bits are the high half
 * of the f32). Every product and sum is float32, so results agree with the NumPy
 * twins to float32 rounding whatever the level.
 */
#ifndef VX_SIMD_H
#define VX_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define VX_LEVEL_SCALAR 0
#define VX_LEVEL_AVX2 1
#define VX_LEVEL_AVX512 2

#ifndef VX_LEVEL
#error "define VX_LEVEL before including simd.h"
#endif

/* Loops over the lanes or registers of a block must be fully unrolled, or their arrays of vectors go to
 * memory: say so rather than rely on the compiler's size heuristics. */
#define VX_UNROLL _Pragma("GCC unroll 16")

#define VX_CAT_(a, b) a##_##b
#define VX_CAT(a, b) VX_CAT_(a, b)

static inline float vx_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if VX_LEVEL == VX_LEVEL_AVX512
#include <immintrin.h>
#define VX_SUFFIX avx512
#define VX_FN __attribute__((target("avx512f,avx2,fma")))
#define VX_INLINE static inline __attribute__((always_inline, target("avx512f,avx2,fma")))
#define VW 16
typedef __m512 vf;
VX_INLINE vf vx_zero(void) { return _mm512_setzero_ps(); }
VX_INLINE vf vx_set1(float a) { return _mm512_set1_ps(a); }
VX_INLINE vf vx_load(const float *p) { return _mm512_loadu_ps(p); }
VX_INLINE void vx_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
VX_INLINE vf vx_load_bf16(const uint16_t *p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
/* VW int8 codes as floats (exact) */
VX_INLINE vf vx_load_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
/* VW int32 as floats (exact below 2^24) */
VX_INLINE vf vx_load_i32(const int32_t *p) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(p)); }
/* AVX512-VNNI (the avx512bf16 level's kernels): acc += w's unsigned bytes times the 4 signed bytes at p,
 * broadcast to every lane, the broadcast embedded in VPDPBUSD ({1to16}), which GCC 12 does not fold from
 * _mm512_set1_epi32 (a separate VPBROADCASTD per dot step). One uop fewer per dot step: a q4 pass over a
 * 3072 x 3072 panel set in cache, one thread, 141 -> 124 us at n = 1, 960 -> 923 at n = 16 (with
 * vx_qprefetch's spread, both builds loaded in one process, alternated); attention's integer scores
 * (attention_idots.h) likewise. */
static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vnni,avx2,fma"))) __m512i
vx_dpbusd_bcst(__m512i acc, __m512i w, const int8_t *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)p));
    return acc;
}
VX_INLINE vf vx_add(vf a, vf b) { return _mm512_add_ps(a, b); }
VX_INLINE vf vx_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
VX_INLINE vf vx_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
VX_INLINE vf vx_div(vf a, vf b) { return _mm512_div_ps(a, b); }
VX_INLINE vf vx_max(vf a, vf b) { return _mm512_max_ps(a, b); }
VX_INLINE vf vx_min(vf a, vf b) { return _mm512_min_ps(a, b); }
VX_INLINE vf vx_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); } /* a * b + c */
VX_INLINE float vx_hsum(vf a) { return _mm512_reduce_add_ps(a); }
VX_INLINE float vx_hmax(vf a) { return _mm512_reduce_max_ps(a); }
VX_INLINE vf vx_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n for integral n in [-126, 127] */
VX_INLINE vf vx_pow2i(vf n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
/* a where x < lo is false, else r */
VX_INLINE vf vx_where_lt(vf x, vf lo, vf r, vf a) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), a, r);
}
/* s where lo < k <= hi, else -inf (the attention mask) */
VX_INLINE vf vx_mask_range(vf s, vf k, vf lo, vf hi) {
    __mmask16 m = _mm512_cmp_ps_mask(k, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(k, hi, _CMP_LE_OQ);
    return _mm512_mask_blend_ps(m, _mm512_set1_ps(-INFINITY), s);
}
/* 0 where a is -inf, else a */
VX_INLINE vf vx_ninf_to_zero(vf a) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), a, _mm512_setzero_ps());
}
/* r[i][j] <- r[j][i] for a 16 x 16 block: pairs of rows interleaved, then 4 x 4 blocks within each
 * 128-bit lane, then the lanes themselves. */
VX_INLINE void vx_transpose(vf r[16]) {
    vf t[16], u[16];
    VX_UNROLL
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    VX_UNROLL
    for (int i = 0; i < 16; i += 4) {
        u[i + 0] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }   /* lane L of u[4i + c] holds column 4L + c of rows 4i..4i+3 */
    VX_UNROLL
    for (int c = 0; c < 4; c++) {
        vf v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        vf v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
}

#elif VX_LEVEL == VX_LEVEL_AVX2
#include <immintrin.h>
#define VX_SUFFIX avx2
#define VX_FN __attribute__((target("avx2,fma")))
#define VX_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#define VW 8
typedef __m256 vf;
VX_INLINE vf vx_zero(void) { return _mm256_setzero_ps(); }
VX_INLINE vf vx_set1(float a) { return _mm256_set1_ps(a); }
VX_INLINE vf vx_load(const float *p) { return _mm256_loadu_ps(p); }
VX_INLINE void vx_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
VX_INLINE vf vx_load_bf16(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
VX_INLINE vf vx_load_i8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
VX_INLINE vf vx_load_i32(const int32_t *p) { return _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)p)); }
VX_INLINE vf vx_add(vf a, vf b) { return _mm256_add_ps(a, b); }
VX_INLINE vf vx_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
VX_INLINE vf vx_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
VX_INLINE vf vx_div(vf a, vf b) { return _mm256_div_ps(a, b); }
VX_INLINE vf vx_max(vf a, vf b) { return _mm256_max_ps(a, b); }
VX_INLINE vf vx_min(vf a, vf b) { return _mm256_min_ps(a, b); }
VX_INLINE vf vx_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
VX_INLINE float vx_hsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
VX_INLINE float vx_hmax(vf a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
VX_INLINE vf vx_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
VX_INLINE vf vx_pow2i(vf n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
VX_INLINE vf vx_where_lt(vf x, vf lo, vf r, vf a) { return _mm256_blendv_ps(a, r, _mm256_cmp_ps(x, lo, _CMP_LT_OQ)); }
VX_INLINE vf vx_mask_range(vf s, vf k, vf lo, vf hi) {
    vf m = _mm256_and_ps(_mm256_cmp_ps(k, lo, _CMP_GT_OQ), _mm256_cmp_ps(k, hi, _CMP_LE_OQ));
    return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, m);
}
VX_INLINE vf vx_ninf_to_zero(vf a) {
    return _mm256_blendv_ps(a, _mm256_setzero_ps(), _mm256_cmp_ps(a, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
}
/* r[i][j] <- r[j][i] for an 8 x 8 block (same steps as the AVX-512 version, two lanes) */
VX_INLINE void vx_transpose(vf r[8]) {
    vf t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        u[i + 0] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
        r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
}

#elif VX_LEVEL == VX_LEVEL_SCALAR
#define VX_SUFFIX scalar
#define VX_FN
#define VX_INLINE static inline
#define VW 1
typedef float vf;
VX_INLINE vf vx_zero(void) { return 0.0f; }
VX_INLINE vf vx_set1(float a) { return a; }
VX_INLINE vf vx_load(const float *p) { return *p; }
VX_INLINE void vx_store(float *p, vf a) { *p = a; }
VX_INLINE vf vx_load_bf16(const uint16_t *p) { return vx_bf16_to_f32(*p); }
VX_INLINE vf vx_load_i8(const int8_t *p) { return (float)*p; }
VX_INLINE vf vx_load_i32(const int32_t *p) { return (float)*p; }
VX_INLINE vf vx_add(vf a, vf b) { return a + b; }
VX_INLINE vf vx_sub(vf a, vf b) { return a - b; }
VX_INLINE vf vx_mul(vf a, vf b) { return a * b; }
VX_INLINE vf vx_div(vf a, vf b) { return a / b; }
VX_INLINE vf vx_max(vf a, vf b) { return a > b ? a : b; }
VX_INLINE vf vx_min(vf a, vf b) { return a < b ? a : b; }
VX_INLINE vf vx_fma(vf a, vf b, vf c) { return a * b + c; } /* contracted to an fma where the target has one */
VX_INLINE float vx_hsum(vf a) { return a; }
VX_INLINE float vx_hmax(vf a) { return a; }
VX_INLINE vf vx_mask_range(vf s, vf k, vf lo, vf hi) { return (k > lo && k <= hi) ? s : -INFINITY; }
VX_INLINE vf vx_ninf_to_zero(vf a) { return a == -INFINITY ? 0.0f : a; }
VX_INLINE vf vx_exp(vf a) { return expf(a); }
VX_INLINE void vx_transpose(vf r[1]) { (void)r; }

#else
#error "unknown VX_LEVEL"
#endif

#define VX_NAME(f) VX_CAT(f, VX_SUFFIX)

#if VX_LEVEL != VX_LEVEL_SCALAR
/* exp(x) in float32 to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-7 Taylor
 * polynomial (truncation error < 6e-9 relative, below float32 rounding), times 2^n.
 * Range: below ln(2^-126) it gives 0 (not the subnormals libm returns), above ln(FLT_MAX) +inf, and in
 * (88, 88.72] it saturates at exp(88) ~ 1.7e38 (keeping 2^n a normal float). Softmax only takes x <= 0;
 * SiLU's a / (1 + exp(-a)) is then off by < 1e-36 absolute, and exactly 0 where NumPy's is. */
VX_INLINE vf vx_exp(vf x) {
    const vf lo = vx_set1(-87.33654f), hi = vx_set1(88.0f);
    vf xc = vx_min(vx_max(x, lo), hi);
    vf n = vx_round(vx_mul(xc, vx_set1(1.44269504088896341f)));
    vf r = vx_fma(n, vx_set1(-0.693359375f), xc);        /* ln2 split in a high part exact in float */
    r = vx_fma(n, vx_set1(2.12194440e-4f), r);            /* and the low remainder */
    vf p = vx_set1(1.0f / 5040.0f);
    p = vx_fma(p, r, vx_set1(1.0f / 720.0f));
    p = vx_fma(p, r, vx_set1(1.0f / 120.0f));
    p = vx_fma(p, r, vx_set1(1.0f / 24.0f));
    p = vx_fma(p, r, vx_set1(1.0f / 6.0f));
    p = vx_fma(p, r, vx_set1(0.5f));
    p = vx_fma(p, r, vx_set1(1.0f));
    p = vx_fma(p, r, vx_set1(1.0f));
    vf e = vx_where_lt(vx_set1(88.72284f), x, vx_set1(INFINITY), vx_mul(p, vx_pow2i(n)));
    return vx_where_lt(x, lo, vx_zero(), e);
}
#endif

#endif /* VX_SIMD_H */
