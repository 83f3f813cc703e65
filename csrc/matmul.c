/* vx_linear (y = x @ w.T + b) and vx_quantize_int8: argument handling, blocking, packing, threads.
 * The inner loops are in matmul_simd.h. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dispatch.h"

static float weight_at(const void *w, int wtype, size_t i) {
    if (wtype == VX_W_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    if (wtype == VX_W_I8) return (float)((const int8_t *)w)[i];
    return ((const float *)w)[i];
}

/* ---- n <= 4: GEMV, weight rows split evenly over the threads (each streams its share once) ---- */
static void linear_gemv(const vx_linear_args *a) {
    const vx_isa *isa = vx_active();
    int nt = vx_threads_for((double)a->m * a->k);
#pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        vx_split(a->m, 16, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (lo < hi) isa->gemv(a, lo, hi);
    }
}

/* ---- larger n: GEMM, blocked as in BLIS (Goto & van de Geijn) -----------------------------------
 * For each thread's range of output columns (weight rows), in blocks of NC columns and KC of k:
 * pack the weight block into NR-wide k-major panels widened to float32 (so bf16 / int8 cost one
 * conversion per element per call, not per use), then for each block of MC activation rows pack them
 * into MR-wide k-major panels and run the micro-kernel over all panel pairs.
 * Block sizes measured on Zen 5: KC from 128 to 1024 gains ~15% (fewer passes over y, fewer activation
 * packs; the panels stream from L2 fast enough); MC and NC matter little. */
enum { KC = 1024, MC_PANELS = 8, NC_PANELS = 16 };

/* ap[p][kk][i] = x[i0 + p * MR + i, k0 + kk]; rows past n are 0. */
static void pack_activations(const vx_linear_args *a, int64_t i0, int64_t mc, int64_t k0, int64_t kc, int mr, float *ap) {
    for (int64_t p = 0; p < mc; p += mr, ap += kc * mr)
        for (int i = 0; i < mr; i++) {
            int64_t row = i0 + p + i;
            const float *x = a->x + row * a->k + k0;
            if (row >= a->n)
                for (int64_t kk = 0; kk < kc; kk++) ap[kk * mr + i] = 0.0f;
            else
                for (int64_t kk = 0; kk < kc; kk++) ap[kk * mr + i] = x[kk];
        }
}

/* y[i0:i0+mr, j0:j0+nr] (clipped to [n, m]) = tile on the first k block, += on later ones; the bias is
 * added once the sum is complete, as the twin adds it to the finished product. */
static void store_tile(const vx_linear_args *a, const float *tile, int mr, int nr, int64_t i0, int64_t j0,
                       int first, int last) {
    int rows = (int)(a->n - i0 < mr ? a->n - i0 : mr), cols = (int)(a->m - j0 < nr ? a->m - j0 : nr);
    for (int i = 0; i < rows; i++) {
        float *y = a->y + (i0 + i) * a->m + j0;
        const float *t = tile + i * nr;
        for (int j = 0; j < cols; j++) {
            float v = first ? t[j] : y[j] + t[j];
            y[j] = last && a->b ? v + a->b[j0 + j] : v;
        }
    }
}

static void linear_gemm(const vx_linear_args *a) {
    const vx_isa *isa = vx_active();
    const int mr = isa->gemm_mr, nr = isa->gemm_nr;
    const int64_t mc_max = (int64_t)MC_PANELS * mr, nc_max = (int64_t)NC_PANELS * nr;
    int nt = vx_threads_for((double)a->n * a->m * a->k / 16);
#pragma omp parallel num_threads(nt)
    {
        float *bp = vx_alloc(sizeof(float) * KC * nc_max);
        float *ap = vx_alloc(sizeof(float) * KC * mc_max);
        float *tile = vx_alloc(sizeof(float) * mr * nr);
        int64_t lo, hi;
        vx_split(a->m, nr, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        for (int64_t j0 = lo; j0 < hi; j0 += nc_max) {
            int64_t nc = hi - j0 < nc_max ? hi - j0 : nc_max;
            for (int64_t k0 = 0; k0 < a->k; k0 += KC) {
                int64_t kc = a->k - k0 < KC ? a->k - k0 : KC;
                int first = k0 == 0, last = k0 + kc == a->k;
                isa->pack_weights(a, j0, nc, k0, kc, bp);
                for (int64_t i0 = 0; i0 < a->n; i0 += mc_max) {
                    int64_t mc = a->n - i0 < mc_max ? a->n - i0 : mc_max;
                    pack_activations(a, i0, mc, k0, kc, mr, ap);
                    for (int64_t jp = 0; jp < nc; jp += nr)
                        for (int64_t ip = 0; ip < mc; ip += mr) {
                            isa->gemm_micro(kc, ap + ip * kc, bp + jp * kc, tile);
                            store_tile(a, tile, mr, nr, i0 + ip, j0 + jp, first, last);
                        }
                }
            }
        }
        free(tile);
        free(ap);
        free(bp);
    }
}

void vx_linear(const float *x, int64_t n, int64_t k, const void *w, int wtype, const float *scales,
               int64_t group, int64_t m, const float *b, float *y) {
    vx_linear_args a = {x, n, k, m, w, wtype, scales, group, b, y};
    if (n <= 0 || m <= 0) return;
    if (k == 0) {   /* an empty sum: the bias alone */
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < m; j++) y[i * m + j] = b ? b[j] : 0.0f;
        return;
    }
    if (n <= VX_GEMV_ROWS)
        linear_gemv(&a);
    else
        linear_gemm(&a);
}

/* ---- int8 quantisation ---------------------------------------------------------------------------- */
void vx_quantize_int8(const void *w, int wtype, int64_t m, int64_t k, int64_t group, int8_t *q, float *scales) {
    int nt = vx_threads_for((double)m * k);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < m; i++)
        for (int64_t g = 0; g < k / group; g++) {
            size_t base = (size_t)i * k + g * group;
            float amax = 0.0f;
            for (int64_t j = 0; j < group; j++) amax = fmaxf(amax, fabsf(weight_at(w, wtype, base + j)));
            float s = amax / 127.0f;
            float safe = s > 0.0f ? s : 1.0f;
            scales[i * (k / group) + g] = s;
            for (int64_t j = 0; j < group; j++) {
                float r = nearbyintf(weight_at(w, wtype, base + j) / safe);   /* ties to even, as np.rint */
                q[base + j] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
            }
        }
}
