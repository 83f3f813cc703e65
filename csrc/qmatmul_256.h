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
 * The sums are the AVX-512 kernel's (qmatmul_simd.h), in its order, so a row's result does not depend on n
 * or the threads. Q256_NAME is the function's name, Q256_TARGET its target string. */
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

/* one 6-bit code per row (8 int32 lanes) of block g + 4 up of a q4 super-block, half hh: the low nibble from
 * the code bytes at lo, the high 2 bits from hi at bit `shift` */
Q256_INLINE __m256i Q256_FN(code6)(const uint8_t *lo, const uint8_t *hi, int up, int shift) {
    const __m256i l = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)lo));
    const __m256i hb = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)hi));
    return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(l, 4 * up), _mm256_set1_epi32(15)),
                           _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, shift), _mm256_set1_epi32(3)), 4));
}

Q256_INLINE void Q256_FN(int8_half)(const vx_qlinear_args *a, const uint8_t *pw, int64_t i0, const int NX, const int hh,
                                    __m256 *acc) {
    const int64_t K = a->k, nblocks = K / VX_QBLOCK, blk_bytes = 2 * VX_QPANEL + VX_QPANEL * VX_QBLOCK;
    const int8_t *xq = a->xq + i0 * K;
    const float *sx = a->sx + i0 * nblocks;
    for (int64_t b = 0; b < nblocks; b++) {
        const uint8_t *h = pw + b * blk_bytes, *u = h + 2 * VX_QPANEL + 32 * hh;
        if (hh == 0) vx_qprefetch(h, blk_bytes, 0, 1, NX >= 4);   /* as the AVX-512 kernel */
        const __m256 S = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 16 * hh)));
        const int8_t *xb = xq + b * VX_QBLOCK;
        __m256i dot[Q256_X];
#if Q256_VNNI
        for (int i = 0; i < NX; i++) dot[i] = _mm256_set1_epi32(a->xoff[(i0 + i) * nblocks + b]);   /* the offset term */
        for (int s = 0; s < 8; s++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(u + 64 * s));
            for (int i = 0; i < NX; i++) dot[i] = Q256_FN(dot_u8)(dot[i], wv, Q256_FN(bcast4)(xb + i * K + 4 * s));
        }
#else
        for (int i = 0; i < NX; i++) dot[i] = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(u + 64 * s)), _mm256_set1_epi8((char)0x80));
            for (int i = 0; i < NX; i++) {
                const __m256i x4 = Q256_FN(bcast4)(xb + i * K + 4 * s);
                const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x4, x4), _mm256_sign_epi8(q, x4));
                dot[i] = _mm256_add_epi32(dot[i], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
            }
        }
#endif
        for (int i = 0; i < NX; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot[i]), _mm256_set1_ps(sx[i * nblocks + b])), S, acc[i]);
    }
}

#if !Q256_VNNI
/* A super-block's codes for half hh's 8 rows (one int32 lane each), from its header at `codes` (h + 8 hh):
 * sc2[b] block b's scale code in both int16 halves of the lane (VPMADDWD multiplies a block's pair of int16
 * sums by it), pair[g] the offset codes of blocks g (low int16) and g + 4 (high), as the VPMADDWD with the
 * pairs of block sums wants them. One VPSHUFB puts each row's header byte in both halves of its lane, then
 * masks and shifts pick the fields (quant.py's _q4_super): 24 instructions for 4 blocks' scale codes and
 * offset pairs, where widening each code on its own (code6, as the VNNI kernel still does) took 38. */
Q256_INLINE void Q256_FN(q4_header)(const uint8_t *codes, __m256i *sc2, __m256i *pair) {
    const __m256i dup = _mm256_setr_epi8(0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3, -1,
                                         4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7, -1);
    const __m256i lo4 = _mm256_set1_epi32(0x000f000f), hi2 = _mm256_set1_epi32(0x00300030);
    for (int g = 0; g < 4; g++) {
        int64_t l8, m8, h8;
        memcpy(&l8, codes + 64 + 16 * g, 8), memcpy(&m8, codes + 128 + 16 * g, 8), memcpy(&h8, codes + 192 + 16 * g, 8);
        const __m256i L = _mm256_shuffle_epi8(_mm256_set1_epi64x(l8), dup);   /* lane r: byte r in both halves */
        const __m256i M = _mm256_shuffle_epi8(_mm256_set1_epi64x(m8), dup);
        const __m256i H = _mm256_shuffle_epi8(_mm256_set1_epi64x(h8), dup);
        /* H's bits: 0-1 scale g, 2-3 scale g + 4, 4-5 offset g, 6-7 offset g + 4 (the codes' high 2 bits) */
        sc2[g] = _mm256_or_si256(_mm256_and_si256(L, lo4), _mm256_slli_epi32(_mm256_and_si256(H, _mm256_set1_epi32(0x00030003)), 4));
        sc2[g + 4] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(L, 4), lo4), _mm256_and_si256(_mm256_slli_epi32(H, 2), hi2));
        pair[g] = _mm256_or_si256(
            _mm256_or_si256(_mm256_and_si256(M, _mm256_set1_epi32(0x0000000f)), _mm256_and_si256(_mm256_srli_epi32(M, 4), _mm256_set1_epi32(0x000f0000))),
            _mm256_or_si256(_mm256_and_si256(H, _mm256_set1_epi32(0x00000030)), _mm256_and_si256(_mm256_srli_epi32(H, 2), _mm256_set1_epi32(0x00300000))));
    }
}
#endif

Q256_INLINE void Q256_FN(q4_half)(const vx_qlinear_args *a, const uint8_t *pw, int64_t i0, const int NX, const int hh,
                                  __m256 *acc) {
    const int64_t K = a->k, nb = vx_q4_blocks_per_super(K), supers = K / (nb * VX_QBLOCK);
    const int64_t sup_bytes = VX_Q4_HEAD + nb * VX_QPANEL * VX_QBLOCK / 2;
    const int8_t *xq = a->xq4 + i0 * K;
    const __m256i low4 = _mm256_set1_epi8(15);
    for (int64_t c = 0; c < supers; c++) {
        const uint8_t *h = pw + c * sup_bytes, *codes = h + 8 * hh;
        __m256i I[Q256_X];
        for (int i = 0; i < NX; i++) I[i] = _mm256_setzero_si256();
#if !Q256_VNNI
        __m256i sc2[8], pair[4];
        Q256_FN(q4_header)(codes, sc2, pair);
#endif
        for (int64_t bb = 0; bb < nb; bb++) {
            const uint8_t *u = h + VX_Q4_HEAD + bb * (VX_QPANEL * VX_QBLOCK / 2) + 32 * hh;
            const int8_t *xb = xq + (c * nb + bb) * VX_QBLOCK;
#if Q256_VNNI
            const int gi = (int)(bb & 3), up = (int)(bb >> 2);
            const __m256i sc = Q256_FN(code6)(codes + 64 + 16 * gi, codes + 192 + 16 * gi, up, 2 * up);
            __m256i dot[Q256_X];
            for (int i = 0; i < NX; i++) dot[i] = _mm256_setzero_si256();
            for (int v = 0; v < 4; v++) {
                if (hh == 0) vx_q4_prefetch(h, u, bb, v);
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(u + 64 * v));
                const __m256i lo = _mm256_and_si256(raw, low4), hi4 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                for (int i = 0; i < NX; i++) {
                    dot[i] = Q256_FN(dot_u8)(dot[i], lo, Q256_FN(bcast4)(xb + i * K + 4 * v));
                    dot[i] = Q256_FN(dot_u8)(dot[i], hi4, Q256_FN(bcast4)(xb + i * K + 4 * v + 16));
                }
            }
            for (int i = 0; i < NX; i++) I[i] = _mm256_add_epi32(I[i], _mm256_mullo_epi32(dot[i], sc));
#else
            /* a lane of VPMADDUBSW holds 2 of a row's inputs; over the 4 steps' low and high codes it sums
             * 16 of them, at most 16 * 15 * 127 = 30480: one int16 sum per block, then VPMADDWD with the
             * block's code in both int16 halves multiplies and sums the pair at once */
            __m256i s16[Q256_X];
            for (int i = 0; i < NX; i++) s16[i] = _mm256_setzero_si256();
            for (int v = 0; v < 4; v++) {
                if (hh == 0) vx_q4_prefetch(h, u, bb, v);
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(u + 64 * v));
                const __m256i lo = _mm256_and_si256(raw, low4), hi4 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                for (int i = 0; i < NX; i++) {
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(lo, Q256_FN(bcast4)(xb + i * K + 4 * v)));
                    s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(hi4, Q256_FN(bcast4)(xb + i * K + 4 * v + 16)));
                    /* the sum as written, step by step: integer adds reassociate, and GCC made a tree of
                     * all 32 products of a 4-row block, spilling each to the stack (Zen 3, 1 thread, q4
                     * 2048 x 3072 from L3, with q4_header: n = 4 402 -> 310 us, n = 1 174 -> 155) */
                    __asm__("" : "+x"(s16[i]));
                }
            }
            for (int i = 0; i < NX; i++) I[i] = _mm256_add_epi32(I[i], _mm256_madd_epi16(s16[i], sc2[bb]));
#endif
        }
        __m256i N[Q256_X];   /* blocks past nb have codes 0 and sums 0 */
        for (int i = 0; i < NX; i++) N[i] = _mm256_setzero_si256();
        for (int g = 0; g < 4; g++) {
#if Q256_VNNI
            const __m256i pg = _mm256_or_si256(Q256_FN(code6)(codes + 128 + 16 * g, codes + 192 + 16 * g, 0, 4),
                                               _mm256_slli_epi32(Q256_FN(code6)(codes + 128 + 16 * g, codes + 192 + 16 * g, 1, 6), 16));
#else
            const __m256i pg = pair[g];
#endif
            for (int i = 0; i < NX; i++) {
                const __m256i xp = _mm256_set1_epi32(a->xpair[((i0 + i) * supers + c) * 4 + g]);
#if Q256_VNNI
                N[i] = _mm256_dpwssd_avx_epi32(N[i], pg, xp);
#else
                N[i] = _mm256_add_epi32(N[i], _mm256_madd_epi16(pg, xp));
#endif
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 16 * hh)));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 32 + 16 * hh)));
        for (int i = 0; i < NX; i++) {
            const __m256 sxv = _mm256_set1_ps(a->sx4[(i0 + i) * supers + c]);
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(I[i]), sxv), d, acc[i]);
            acc[i] = _mm256_fnmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(N[i]), sxv), dmin, acc[i]);
        }
    }
}

Q256_INLINE void Q256_FN(half)(const vx_qlinear_args *a, const uint8_t *pw, int64_t i0, const int NX, const int fmt,
                               const int hh, __m256 *acc) {
    for (int i = 0; i < NX; i++) acc[i] = _mm256_setzero_ps();
    if (fmt == VX_Q_INT8) Q256_FN(int8_half)(a, pw, i0, NX, hh, acc);
    else Q256_FN(q4_half)(a, pw, i0, NX, hh, acc);
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
