/* Inner loops of vx_linear, written once against simd.h and instantiated per ISA level (isa_*.c).
 * The driver (matmul.c) owns argument checks, blocking, packing and threads. */

/* ---- GEMV: n <= 4 activation rows against R weight rows at a time ----------------------------------
 * Memory-bound: every weight byte is loaded once and used for all n rows. Weights are widened to
 * float32 in registers (int8 also scaled, exactly as the twin dequantises), x stays float32. */

VX_INLINE vf gemv_load_w(const void *w, int wtype, int64_t i) {
    if (wtype == VX_W_BF16) return vx_load_bf16((const uint16_t *)w + i);
    if (wtype == VX_W_I8) return vx_load_i8((const int8_t *)w + i);
    return vx_load((const float *)w + i);
}

static inline float gemv_load_w1(const void *w, int wtype, int64_t i) {
    if (wtype == VX_W_BF16) return vx_bf16_to_f32(((const uint16_t *)w)[i]);
    if (wtype == VX_W_I8) return (float)((const int8_t *)w)[i];
    return ((const float *)w)[i];
}

/* Accumulators: NX * R vectors, kept within half the register file. */
#define GEMV_R(nx) ((VW == 8 && (nx) > 2) ? 2 : 4)

/* y[0:NX, m:m+R] for compile-time NX, R and wtype (the switch in gemv() makes them constants). */
VX_INLINE void gemv_tile(const vx_linear_args *a, int64_t m, const int NX, const int R, const int wtype) {
    const int64_t K = a->k;
    const int64_t G = wtype == VX_W_I8 ? a->group : K;    /* one group spanning the row when unscaled */
    const size_t esize = wtype == VX_W_BF16 ? 2 : wtype == VX_W_I8 ? 1 : 4;
    const char *w = (const char *)a->w + (size_t)m * K * esize;
    vf acc[NX][R];
    float tail[NX][R];
    for (int n = 0; n < NX; n++)
        for (int r = 0; r < R; r++) acc[n][r] = vx_zero(), tail[n][r] = 0.0f;
    for (int64_t g0 = 0; g0 < K; g0 += G) {
        float s[R];
        for (int r = 0; r < R; r++) s[r] = wtype == VX_W_I8 ? a->scales[(m + r) * (K / G) + g0 / G] : 1.0f;
        int64_t k = g0;
        for (; k + VW <= g0 + G; k += VW) {
            vf wv[R];
            for (int r = 0; r < R; r++) {
                wv[r] = gemv_load_w(w + (size_t)r * K * esize, wtype, k);
                if (wtype == VX_W_I8) wv[r] = vx_mul(wv[r], vx_set1(s[r]));
            }
            for (int n = 0; n < NX; n++) {
                vf xv = vx_load(a->x + n * K + k);
                for (int r = 0; r < R; r++) acc[n][r] = vx_fma(xv, wv[r], acc[n][r]);
            }
        }
        for (; k < g0 + G; k++)
            for (int r = 0; r < R; r++) {
                float wr = gemv_load_w1(w + (size_t)r * K * esize, wtype, k);
                if (wtype == VX_W_I8) wr *= s[r];
                for (int n = 0; n < NX; n++) tail[n][r] += a->x[n * K + k] * wr;
            }
    }
    for (int n = 0; n < NX; n++)
        for (int r = 0; r < R; r++) {
            float y = vx_hsum(acc[n][r]) + tail[n][r];
            a->y[n * a->m + m + r] = a->b ? y + a->b[m + r] : y;
        }
}

VX_INLINE void gemv_rows(const vx_linear_args *a, int64_t m0, int64_t m1, const int NX, const int wtype) {
    const int R = GEMV_R(NX);
    int64_t m = m0;
    for (; m + R <= m1; m += R) gemv_tile(a, m, NX, R, wtype);
    for (; m < m1; m++) gemv_tile(a, m, NX, 1, wtype);
}

#define GEMV_CASE(nx, wt) \
    case (nx) * 3 + (wt): gemv_rows(a, m0, m1, nx, wt); break;

VX_FN static void VX_NAME(gemv)(const vx_linear_args *a, int64_t m0, int64_t m1) {
    switch (a->n * 3 + a->wtype) {
        GEMV_CASE(1, VX_W_F32) GEMV_CASE(1, VX_W_BF16) GEMV_CASE(1, VX_W_I8)
        GEMV_CASE(2, VX_W_F32) GEMV_CASE(2, VX_W_BF16) GEMV_CASE(2, VX_W_I8)
        GEMV_CASE(3, VX_W_F32) GEMV_CASE(3, VX_W_BF16) GEMV_CASE(3, VX_W_I8)
        GEMV_CASE(4, VX_W_F32) GEMV_CASE(4, VX_W_BF16) GEMV_CASE(4, VX_W_I8)
    }
}
#undef GEMV_CASE

/* ---- GEMM micro-kernel -------------------------------------------------------------------------------
 * tile[MR, NR] = sum_k a[k, 0:MR] (x) b[k, 0:NR]: a is a packed panel of MR activation rows, b a packed
 * panel of NR weight rows already widened to float32, both k-major. One broadcast of a and NV vector
 * loads of b feed MR * NV independent FMAs per k. */
#if VW == 16
#define GEMM_MR 12
#define GEMM_NV 2
#elif VW == 8
#define GEMM_MR 6
#define GEMM_NV 2
#else
#define GEMM_MR 4
#define GEMM_NV 4
#endif
#define GEMM_NR (GEMM_NV * VW)

VX_FN static void VX_NAME(gemm_micro)(int64_t kc, const float *a, const float *b, float *tile) {
    vf acc[GEMM_MR][GEMM_NV];
    for (int i = 0; i < GEMM_MR; i++)
        for (int j = 0; j < GEMM_NV; j++) acc[i][j] = vx_zero();
    for (int64_t k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        vf bv[GEMM_NV];
        for (int j = 0; j < GEMM_NV; j++) bv[j] = vx_load(b + j * VW);
        for (int i = 0; i < GEMM_MR; i++) {
            vf av = vx_set1(a[i]);
            for (int j = 0; j < GEMM_NV; j++) acc[i][j] = vx_fma(av, bv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < GEMM_MR; i++)
        for (int j = 0; j < GEMM_NV; j++) vx_store(tile + i * GEMM_NR + j * VW, acc[i][j]);
}
