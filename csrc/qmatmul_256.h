/* y = x @ w.T for quantised panels (voxtral_ref/runtime/quant.py) with 256-bit integer dot products, for
 * CPUs without AVX512-VNNI. isa_avx2.c includes this file twice:
 *   Q256_VNNI 1  AVX-VNNI (VEX VPDPBUSD): 4 unsigned weight bytes times 4 signed activation bytes summed
 *                into an int32 lane, as the AVX-512 kernel does, 8 rows per vector instead of 16;
 *   Q256_VNNI 0  AVX2: VPMADDUBSW (byte pairs into int16) then VPMADDWD (int16 pairs into int32). The int16
 *                sums saturate past 32767: q4 codes (0..15) times |x| <= 127 stay below it for 16 inputs
 *                (30480), which is what a lane sums over a block; int8 codes carry the +128 bias (1..255)
 *                and would saturate a single pair, so they are re-centred (xor 0x80: q in -127..127), the
 *                activations' signs are moved onto them (VPSIGNB), |x| * q pairs stay below 2 * 127 * 127,
 *                and the twin's bias term, 128 S sx xsum, is not subtracted.
 * A panel's 16 rows are two halves of 8; each half streams the panel's blocks once (the second half's
 * bytes are then in L1/L2), and up to Q256_X activation rows share each weight load and unpacking.
 * Per block: exact integer dots, then acc += (dot sx) S and, for q4, acc -= M sxs, as the AVX-512 kernel
 * does, so a row's result does not depend on n or the threads. Q256_NAME is the function's name,
 * Q256_TARGET its target string. */
#define Q256_X 4
#define Q256_INLINE static inline __attribute__((always_inline, target(Q256_TARGET)))

Q256_INLINE __m256i Q256_FN(bcast4)(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* int32 dot += 4-byte dot products of the 8 rows' weight bytes w (unsigned) with x4 (signed, broadcast) */
Q256_INLINE __m256i Q256_FN(dot_u8)(__m256i dot, __m256i w, __m256i x4) {
#if Q256_VNNI
    return _mm256_dpbusd_avx_epi32(dot, w, x4);
#else
    return _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x4), _mm256_set1_epi16(1)));
#endif
}

Q256_INLINE void Q256_FN(half)(const vx_qlinear_args *a, const uint8_t *pw, int64_t i0, const int NX, const int fmt,
                               const int hh, __m256 *acc) {
    const int64_t K = a->k, nblocks = K / VX_QBLOCK;
    const int8_t *xq = a->xq + i0 * K;
    const float *sx = a->sx + i0 * nblocks;
    const float *sxs = a->sxs + i0 * nblocks;
    const __m256i low4 = _mm256_set1_epi8(15);
    const int64_t nb = fmt == VX_Q_INT8 ? 1 : vx_q4_blocks_per_super(K);
    const int64_t sup_bytes = fmt == VX_Q_INT8 ? 2 * VX_QPANEL + VX_QPANEL * VX_QBLOCK
                                               : VX_Q4_HEAD + nb * VX_QPANEL * VX_QBLOCK / 2;
    for (int i = 0; i < NX; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t s0 = 0; s0 < nblocks; s0 += nb) {
        const uint8_t *h = pw + s0 / nb * sup_bytes;
        if (hh == 0)   /* every line of the super-block VX_QPREFETCH bytes ahead, as the AVX-512 kernel */
            for (int64_t l = 0; l < sup_bytes; l += 64) __builtin_prefetch(h + VX_QPREFETCH + l, 0, 0);
        __m256 d = _mm256_setzero_ps(), dmin = d;
        if (fmt == VX_Q_Q4) {
            d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 16 * hh)));
            dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 32 + 16 * hh)));
        }
        for (int64_t bb = 0; bb < nb; bb++) {
            const int64_t b = s0 + bb;
            const int8_t *xb = xq + b * VX_QBLOCK;
            __m256 S, M = _mm256_setzero_ps();     /* M: q4's (int8's is folded into the dot, or re-centred away) */
            __m256i dot[Q256_X];
            for (int i = 0; i < NX; i++) dot[i] = _mm256_setzero_si256();
            if (fmt == VX_Q_INT8) {
                const uint8_t *u = h + 2 * VX_QPANEL + 32 * hh;
                S = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 16 * hh)));
#if Q256_VNNI
                for (int s = 0; s < 8; s++) {
                    const __m256i wv = _mm256_loadu_si256((const __m256i *)(u + 64 * s));
                    for (int i = 0; i < NX; i++) dot[i] = Q256_FN(dot_u8)(dot[i], wv, Q256_FN(bcast4)(xb + i * K + 4 * s));
                }
                for (int i = 0; i < NX; i++)     /* M = 128 S: the offset term joins the exact integer dot */
                    dot[i] = _mm256_sub_epi32(dot[i], _mm256_slli_epi32(_mm256_set1_epi32(a->xsum[(i0 + i) * nblocks + b]), 7));
#else
                for (int s = 0; s < 8; s++) {
                    const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(u + 64 * s)), _mm256_set1_epi8((char)0x80));
                    for (int i = 0; i < NX; i++) {
                        const __m256i x4 = Q256_FN(bcast4)(xb + i * K + 4 * s);
                        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x4, x4), _mm256_sign_epi8(q, x4));
                        dot[i] = _mm256_add_epi32(dot[i], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
                    }
                }
#endif
            } else {
                const int gi = (int)(bb & 3), up = (int)(bb >> 2);
                const __m256i lo_sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(h + 64 + 16 * gi + 8 * hh)));
                const __m256i lo_mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(h + 128 + 16 * gi + 8 * hh)));
                const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(h + 192 + 16 * gi + 8 * hh)));
                const __m256i m15 = _mm256_set1_epi32(15), m3 = _mm256_set1_epi32(3);
                const __m256i sc = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(lo_sc, 4 * up), m15),
                                                   _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hi, 2 * up), m3), 4));
                const __m256i mn = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(lo_mn, 4 * up), m15),
                                                   _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hi, 4 + 2 * up), m3), 4));
                S = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
                M = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(mn));
                const uint8_t *u = h + VX_Q4_HEAD + bb * (VX_QPANEL * VX_QBLOCK / 2) + 32 * hh;
#if Q256_VNNI
                for (int v = 0; v < 4; v++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(u + 64 * v));
                    const __m256i lo = _mm256_and_si256(raw, low4), hi4 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                    for (int i = 0; i < NX; i++) {
                        dot[i] = Q256_FN(dot_u8)(dot[i], lo, Q256_FN(bcast4)(xb + i * K + 4 * v));
                        dot[i] = Q256_FN(dot_u8)(dot[i], hi4, Q256_FN(bcast4)(xb + i * K + 4 * v + 16));
                    }
                }
#else
                /* a lane of VPMADDUBSW holds 2 of a row's inputs; over the 4 steps' low and high codes it sums
                 * 16 of them, at most 16 * 15 * 127 = 30480: one int16 sum per block, then VPMADDWD */
                __m256i s16[Q256_X];
                for (int i = 0; i < NX; i++) s16[i] = _mm256_setzero_si256();
                for (int v = 0; v < 4; v++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(u + 64 * v));
                    const __m256i lo = _mm256_and_si256(raw, low4), hi4 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                    for (int i = 0; i < NX; i++)
                        s16[i] = _mm256_add_epi16(s16[i], _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, Q256_FN(bcast4)(xb + i * K + 4 * v)),
                            _mm256_maddubs_epi16(hi4, Q256_FN(bcast4)(xb + i * K + 4 * v + 16))));
                }
                for (int i = 0; i < NX; i++) dot[i] = _mm256_madd_epi16(s16[i], _mm256_set1_epi16(1));
#endif
            }
            for (int i = 0; i < NX; i++) {
                acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot[i]), _mm256_set1_ps(sx[i * nblocks + b])), S, acc[i]);
                if (fmt == VX_Q_Q4) acc[i] = _mm256_fnmadd_ps(M, _mm256_set1_ps(sxs[i * nblocks + b]), acc[i]);
            }
        }
    }
}

#define Q256_CASE(nx, fmt) \
    case (nx) * 2 + (fmt): Q256_FN(half)(a, pw, i0, nx, fmt, hh, acc); break;

__attribute__((target(Q256_TARGET))) void Q256_NAME(const vx_qlinear_args *a, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *pw = a->w + p * a->panel_bytes;
        const int64_t row0 = p * VX_QPANEL;
        for (int64_t i0 = 0; i0 < a->n; i0 += Q256_X) {
            const int nx = (int)(a->n - i0 < Q256_X ? a->n - i0 : Q256_X);
            for (int hh = 0; hh < 2; hh++) {
                __m256 acc[Q256_X];
                switch (nx * 2 + a->fmt) {
                    Q256_CASE(1, 0) Q256_CASE(2, 0) Q256_CASE(3, 0) Q256_CASE(4, 0)
                    Q256_CASE(1, 1) Q256_CASE(2, 1) Q256_CASE(3, 1) Q256_CASE(4, 1)
                }
                for (int i = 0; i < nx; i++) {
                    float out[8];
                    _mm256_storeu_ps(out, acc[i]);
                    for (int r = 0; r < 8 && row0 + 8 * hh + r < a->m; r++) {
                        const int64_t row = row0 + 8 * hh + r;
                        a->y[(i0 + i) * a->m + row] = a->b ? out[r] + a->b[row] : out[r];
                    }
                }
            }
        }
    }
}
#undef Q256_CASE
#undef Q256_X
#undef Q256_INLINE
