/* ---- y = x @ w.T with AMX tiles: q4 passes of many rows (the avx512amx level) -----------------------------
 * TDPBSUD multiplies a tile of 16 activation rows' int8 codes (A: 16 rows x 64 inputs) by a tile of
 * unsigned weight bytes (B: 16 rows of 64 bytes, input t / 4 of a pair of blocks at byte 4 r + t % 4 for
 * weight row r: the panel's own VPDPBUSD layout) into 16 x 16 exact int32 sums. A q4 super-block's
 * integer part is I[r] = sum over its blocks b of sc[b][r] dot_b[r], a 6-bit scale code per block and
 * row; split as sc = 8 sh + sl (3 bits each), the products sl q and sh q (at most 7 x 15 = 105) are
 * bytes, so two B tiles per pair of blocks, B_lo = sl q and B_hi = sh q (each byte one VPERMI2B lookup in a
 * 128-entry table of s q at 16 s + q), let two C tiles sum the whole super-block: I = C_lo + 8 C_hi, the
 * integers the VNNI kernel sums. A super-block's B tiles are built once and serve every group of 16 rows,
 * so their cost spreads over the rows of a pass. The rest (the offsets' term N, the float steps per
 * super-block, in the same order) is the VNNI kernel's, so every output is qlinear_vnni's bit for bit,
 * whichever kernel takes a row (tests/test_kernels.py).
 *
 * Passes of fewer than AMX_MIN_ROWS rows, a last group of fewer than AMX_MIN_GROUP rows, and every int8
 * matrix go to the VNNI kernel. Measured on the twentieth session's Xeon (9216 x 3072 q4 matrices from
 * memory, 2 threads, both levels alternated in one process), the tiles' time over the VNNI kernel's: 8 /
 * 10 / 12 / 14 / 16 / 24 / 32 / 40 rows 1.25 / 1.00 / 0.93 / 0.87 / 0.79 / 0.78 / 0.64 / 0.68; 64 / 128 /
 * 700 rows of a 1024 x 3072 matrix in L2 0.53 / 0.55 / 0.60. (Building the B tiles per group of rows
 * instead of once: 0.84 at 16 rows, slower below 10. A C tile per block, stored and scaled per block as the
 * VNNI kernel scales its dots, without the split: slower at every row count, the tile unit's round trip
 * per block being the cost; int8's float scales per block leave it only that way.) The A tile always reads
 * 16 rows of 64 codes: qmatmul.c pads the activation codes with VX_QPAD_ROWS rows, whose sums are not used. */
#define VX_AMX_TARGET "avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8"
#define VX_AMX_FN __attribute__((target(VX_AMX_TARGET)))
#define VX_AMX_INLINE static inline __attribute__((always_inline, target(VX_AMX_TARGET)))
#define AMX_MIN_ROWS 12
#define AMX_MIN_GROUP 8

/* LDTILECFG's 64-byte operand, palette 1 */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* tmm0 / tmm1 and tmm2 / tmm3: C_lo / C_hi of two groups of 16 rows, 16 x 16 int32; tmm4 / tmm5: their A
 * tiles, 16 rows x 64 codes; tmm6 / tmm7: B_lo / B_hi, 16 x 64 bytes */
VX_AMX_INLINE void amx_configure(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* block b's 8 B rows of B_lo and B_hi: table lookups of 16 s + q for its nibbles q and its rows' scale
 * codes' low / high 3 bits s (scode: the 16 rows' codes) */
VX_AMX_INLINE void q4_block_b(const uint8_t *u, const uint8_t *scode, __m512i t0, __m512i t1, uint8_t *blo, uint8_t *bhi) {
    const __m512i low4 = _mm512_set1_epi8(15), s3 = _mm512_set1_epi8(0x70);
    const __m512i rep = _mm512_set_epi8(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12, 11, 11, 11, 11, 10,
                                        10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8, 7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3,
                                        3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);   /* byte 4 r + i: row r */
    const __m512i sc = _mm512_permutexvar_epi8(rep, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)scode)));
    /* 16-bit shifts: what they carry across a byte is masked off */
    const __m512i sl = _mm512_and_si512(_mm512_slli_epi16(sc, 4), s3), sh = _mm512_and_si512(_mm512_slli_epi16(sc, 1), s3);
    for (int v = 0; v < 4; v++) {   /* vector v: inputs 4v..4v+3 in its low nibbles, 16+4v.. in its high ones */
        const __m512i raw = _mm512_loadu_si512(u + 64 * v);
        const __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        _mm512_store_si512(blo + 64 * v, _mm512_permutex2var_epi8(t0, _mm512_or_si512(lo, sl), t1));
        _mm512_store_si512(blo + 64 * (4 + v), _mm512_permutex2var_epi8(t0, _mm512_or_si512(hi, sl), t1));
        _mm512_store_si512(bhi + 64 * v, _mm512_permutex2var_epi8(t0, _mm512_or_si512(lo, sh), t1));
        _mm512_store_si512(bhi + 64 * (4 + v), _mm512_permutex2var_epi8(t0, _mm512_or_si512(hi, sh), t1));
    }
}

/* panel p for rows [0, rows) (rows % 16 == 0 or a last group of AMX_MIN_GROUP or more): y = x w.T + b,
 * accumulated in acc [rows][16] between super-blocks */
VX_AMX_INLINE void qpanel_q4_amx(const vx_qlinear_args *a, int64_t p, int64_t rows, float *acc, __m512i t0, __m512i t1) {
    const int64_t K = a->k, nb = vx_q4_blocks_per_super(K), supers = K / (nb * VX_QBLOCK), row0 = p * VX_QPANEL;
    const int64_t sup_bytes = VX_Q4_HEAD + nb * VX_QPANEL * VX_QBLOCK / 2;
    const uint8_t *pw = a->w + p * a->panel_bytes;
    /* B tiles [pair of blocks][input / 4][4 inputs x 16 weight rows]; C tiles [2 x 16 activation rows][16 weight rows] */
    uint8_t blo[4][16][64] __attribute__((aligned(64))), bhi[4][16][64] __attribute__((aligned(64)));
    int32_t clo[32][16] __attribute__((aligned(64))), chi[32][16] __attribute__((aligned(64)));
    if (nb & 1) memset(blo[nb / 2][8], 0, 8 * 64), memset(bhi[nb / 2][8], 0, 8 * 64);   /* an odd last block's pair */
    memset(acc, 0, sizeof(float) * 16 * (size_t)rows);
    for (int64_t s = 0; s < supers; s++) {
        const uint8_t *h = pw + s * sup_bytes;
        uint8_t codes[4][64];
        q4_super_codes(h, codes);
        for (int64_t b = 0; b < nb; b++) {
            vx_qprefetch(h, sup_bytes, b, nb, 1);
            q4_block_b(h + VX_Q4_HEAD + b * (VX_QPANEL * VX_QBLOCK / 2), codes[b >> 2] + 16 * (b & 3), t0, t1,
                       blo[b / 2][8 * (b & 1)], bhi[b / 2][8 * (b & 1)]);
        }
        __m512i pair[4];
        for (int g = 0; g < 4; g++) pair[g] = q4_offset_pair(codes, g);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 32)));
        for (int64_t i0 = 0; i0 < rows; i0 += 32) {   /* two groups of 16 rows share each B tile load */
            const int two = i0 + 16 < rows;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t bb = 0; bb < nb; bb += 2) {
                _tile_loadd(6, blo[bb / 2], 64);
                _tile_loadd(7, bhi[bb / 2], 64);
                _tile_loadd(4, a->xq4 + i0 * K + (s * nb + bb) * VX_QBLOCK, K);
                _tile_dpbsud(0, 4, 6);
                _tile_dpbsud(1, 4, 7);
                if (two) {
                    _tile_loadd(5, a->xq4 + (i0 + 16) * K + (s * nb + bb) * VX_QBLOCK, K);
                    _tile_dpbsud(2, 5, 6);
                    _tile_dpbsud(3, 5, 7);
                }
            }
            _tile_stored(0, clo[0], 64);
            _tile_stored(1, chi[0], 64);
            _tile_stored(2, clo[16], 64);
            _tile_stored(3, chi[16], 64);
            for (int64_t i = 0; i < 32 && i0 + i < rows; i++) {
                __m512i N = _mm512_setzero_si512();
                for (int g = 0; g < 4; g++) N = _mm512_dpwssd_epi32(N, pair[g], _mm512_set1_epi32(a->xpair[((i0 + i) * supers + s) * 4 + g]));
                const __m512i I = _mm512_add_epi32(_mm512_load_si512(clo[i]), _mm512_slli_epi32(_mm512_load_si512(chi[i]), 3));
                const __m512 sxv = _mm512_set1_ps(a->sx4[(i0 + i) * supers + s]);
                __m512 y = _mm512_loadu_ps(acc + 16 * (i0 + i));
                y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(I), sxv), d, y);
                y = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(N), sxv), dmin, y);
                _mm512_storeu_ps(acc + 16 * (i0 + i), y);
            }
        }
    }
    const __mmask16 valid = a->m - row0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (a->m - row0)) - 1);
    const __m512 bias = a->b ? _mm512_maskz_loadu_ps(valid, a->b + row0) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; i++)
        _mm512_mask_storeu_ps(a->y + i * a->m + row0, valid, _mm512_add_ps(_mm512_loadu_ps(acc + 16 * i), bias));
}

VX_AMX_FN static void qlinear_amx(const vx_qlinear_args *a, int64_t p0, int64_t p1) {
    if (a->fmt != VX_Q_Q4 || a->n < AMX_MIN_ROWS) {
        qlinear_vnni(a, p0, p1);
        return;
    }
    const int64_t rows = a->n % 16 >= AMX_MIN_GROUP ? a->n : a->n / 16 * 16;   /* the tiles' rows; the rest VNNI's */
    float *acc = vx_alloc(sizeof(float) * 16 * (size_t)rows);
    uint8_t table[128] __attribute__((aligned(64)));   /* s q at 16 s + q */
    for (int e = 0; e < 128; e++) table[e] = (uint8_t)((e >> 4) * (e & 15));
    const __m512i t0 = _mm512_load_si512(table), t1 = _mm512_load_si512(table + 64);
    amx_configure();   /* per call: the tile state is the thread's, and other code may have released it */
    for (int64_t p = p0; p < p1; p++) {
        qpanel_q4_amx(a, p, rows, acc, t0, t1);
        if (rows < a->n) qpanel_rows_vnni(a, p, rows, a->n);
    }
    _tile_release();
    free(acc);
}
