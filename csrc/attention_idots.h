/* vx_isa.attention_idots: the exact integer scores s[r][j] = q_r . k_j of an int8 cache's keys (codes in
 * -127..127) for up to VX_ATT_SB_MAX keys and a head's rows. attention_simd.h includes this file once per
 * instruction set, after defining the vector type vi and its operations (vi_*), ID_NAME, ID_TARGET and:
 *   ID_VNNI 1  VPDPBUSD (AVX512-VNNI, or AVX-VNNI at 256 bits): 4 unsigned key bytes times 4 signed query
 *              bytes summed into an int32 lane. The keys are biased to unsigned (xor 0x80), which adds
 *              128 * qsum to every score, taken off at the end;
 *   ID_VNNI 0  AVX2: VPMADDUBSW multiplies |k| (unsigned) by q with k's sign moved onto it (VPSIGNB): pairs of
 *              products stay within 2 * 127 * 127 = 32258, so the int16 sums never saturate; VPMADDWD by
 *              ones sums the pairs into the int32 lane.
 * Per VW keys, their codes are transposed into kt[d / 4] (lane j of kt[p]: bytes 4p..4p+3 of key j), so one
 * dot step with 4 broadcast query bytes (at 512 bits embedded in VPDPBUSD: vx_dpbusd_bcst) adds 4 products
 * to each key's lane: no horizontal sums, and each transposed vector serves every row (4 rows at a time).
 * Exact integers: the same scores as the float32 path's (attention_keys_d), so a level with or without this
 * function computes the same attention. */
__attribute__((target(ID_TARGET))) static void ID_NAME(const int8_t *const *kb, int sb, int d, const int8_t *const *q,
                                                       const int32_t *qsum, int nrows, int32_t *s) {
    vi kt[VX_ATT_DMAX / 4];
#if ID_VNNI
    const vi bias = vi_set1_8((char)0x80);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    (void)qsum;
#endif
    for (int j0 = 0; j0 < sb; j0 += VW) {
        for (int c = 0; c < d; c += 4 * VW) {
            vf r[VW];
            for (int jj = 0; jj < VW; jj++) r[jj] = vx_load((const float *)(kb[j0 + jj] + c));
            vx_transpose(r);
#if ID_VNNI
            for (int i = 0; i < VW; i++) kt[c / 4 + i] = vi_xor(vi_of_vf(r[i]), bias);
#else
            for (int i = 0; i < VW; i++) kt[c / 4 + i] = vi_of_vf(r[i]);
#endif
        }
        for (int r0 = 0; r0 < nrows; r0 += 4) {
            const int8_t *qr[4];
            for (int i = 0; i < 4; i++) qr[i] = q[r0 + i < nrows ? r0 + i : nrows - 1];   /* past nrows: discarded */
            vi acc[4] = {vi_zero(), vi_zero(), vi_zero(), vi_zero()};
            for (int p = 0; p < d / 4; p++) {
#if !ID_VNNI
                const __m256i ka = _mm256_abs_epi8(kt[p]);
#endif
                VX_UNROLL
                for (int i = 0; i < 4; i++) {
#if ID_VNNI
                    acc[i] = vi_dot_q(acc[i], kt[p], qr[i] + 4 * p);   /* 4 query bytes broadcast */
#else
                    int32_t q4;
                    memcpy(&q4, qr[i] + 4 * p, 4);
                    const __m256i prod = _mm256_maddubs_epi16(ka, _mm256_sign_epi8(_mm256_set1_epi32(q4), kt[p]));
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(prod, ones));
#endif
                }
            }
            for (int i = 0; i < 4 && r0 + i < nrows; i++)
#if ID_VNNI
                vi_store(s + (size_t)(r0 + i) * sb + j0, vi_sub(acc[i], vi_set1_32(128 * qsum[r0 + i])));
#else
                vi_store(s + (size_t)(r0 + i) * sb + j0, acc[i]);
#endif
        }
    }
}
