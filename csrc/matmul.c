/* vx_linear (y = x @ w.T + b): argument handling, blocking, packing, threads.
 * The inner loops are in matmul_simd.h. */
#include <stdlib.h>

#include "dispatch.h"

/* ---- n <= 4: GEMV, weight rows split evenly over the threads (each streams its share once) ---- */
static void gemv_task(void *ctx, int tid, int nt) {
    const vx_linear_args *a = ctx;
    int64_t lo, hi;
    vx_split(a->m, 16, tid, nt, &lo, &hi);
    if (lo < hi) vx_active()->gemv(a, lo, hi);
}

static void linear_gemv(const vx_linear_args *a) {
    vx_parallel(vx_threads_for((double)a->m * a->k), gemv_task, (void *)a);
}

/* ---- larger n: GEMM, blocked as in BLIS (Goto & van de Geijn) -----------------------------------
 * Activations: NB rows at a time are packed once, by all threads together, into MR-wide k-major panels
 * (for every k block). Weights: each thread takes a range of output columns (weight rows) and, per block
 * of NC columns and KC of k, packs them into NR-wide k-major panels (float32, or bf16 pairs for the dot
 * product kernel: one conversion per element and call, not per use); then the micro-kernel runs over all
 * panel pairs, MC rows at a time so the activation panels it re-reads stay in L2.
 * Block sizes measured on Zen 5: KC from 128 to 1024 gains ~15% (fewer passes over y; the panels stream
 * from L2 fast enough); MC and NC matter little. Packing the activations once instead of once per column
 * block, and writing full tiles straight into y, gained another ~15%. */
enum { KC = 1024, MC_PANELS = 8, NC_PANELS = 16, NB = 1024 };   /* KC even: k-pairs never straddle blocks */

/* rows [i0, i0 + rows) of x, all of k, into ap[k block][panel][step][i] as the kernel's 32-bit elements
 * (g->pack_panel: float32, rounded to bf16 precision for VX_X_BF16, or bf16 pairs); rows past n are 0 */
static void pack_activations(const vx_linear_args *a, const vx_gemm_kernel *g, int64_t i0, int64_t rows, int64_t panel,
                             uint32_t *ap) {
    const int mr = g->mr;
    const int64_t npanels = (rows + mr - 1) / mr, row = i0 + panel * mr;
    const int64_t end = a->n < i0 + rows ? a->n : i0 + rows;
    const int valid = (int)(end - row < mr ? end - row : mr);
    for (int64_t k0 = 0; k0 < a->k; k0 += KC) {
        const int64_t kc = a->k - k0 < KC ? a->k - k0 : KC, steps = (kc + g->kstep - 1) / g->kstep;
        g->pack_panel(a->x + row * a->k + k0, a->k, valid, kc, a->xtype, ap + k0 / g->kstep * npanels * mr + panel * steps * mr);
    }
}

/* y[i0:i0+mr, j0:j0+nr] = (first k block) or += the tile, clipped to [n, m] */
static void merge_edge_tile(const vx_linear_args *a, const float *tile, int mr, int nr, int64_t i0, int64_t j0, int first) {
    const int rows = (int)(a->n - i0 < mr ? a->n - i0 : mr), cols = (int)(a->m - j0 < nr ? a->m - j0 : nr);
    for (int i = 0; i < rows; i++) {
        float *y = a->y + (i0 + i) * a->m + j0;
        for (int j = 0; j < cols; j++) y[j] = first ? tile[i * nr + j] : y[j] + tile[i * nr + j];
    }
}

typedef struct {
    const vx_linear_args *a;
    const vx_gemm_kernel *g;
    uint32_t *ap;              /* the packed activations, shared */
} gemm_ctx;

static void gemm_task(void *ctx, int tid, int nt) {
    const gemm_ctx *c = ctx;
    const vx_linear_args *a = c->a;
    const vx_gemm_kernel *g = c->g;
    const int mr = g->mr, nr = g->nr;
    const int64_t mc_max = (int64_t)MC_PANELS * mr, nc_max = (int64_t)NC_PANELS * nr, nb_max = (NB + mr - 1) / mr * mr;
    uint32_t *bp = vx_alloc(4 * (size_t)KC * nc_max), *ap = c->ap;
    float *tile = vx_alloc(sizeof(float) * mr * nr);
    int64_t lo, hi;
    vx_split(a->m, nr, tid, nt, &lo, &hi);
    for (int64_t n0 = 0; n0 < a->n; n0 += nb_max) {
        const int64_t nb = a->n - n0 < nb_max ? a->n - n0 : nb_max, npanels = (nb + mr - 1) / mr;
        int64_t p0, p1;
        vx_split(npanels, 1, tid, nt, &p0, &p1);
        for (int64_t p = p0; p < p1; p++) pack_activations(a, g, n0, nb, p, ap);
        vx_team_barrier(nt);   /* every panel is packed */
        for (int64_t j0 = lo; j0 < hi; j0 += nc_max) {
            const int64_t nc = hi - j0 < nc_max ? hi - j0 : nc_max;
            for (int64_t k0 = 0; k0 < a->k; k0 += KC) {
                const int64_t kc = a->k - k0 < KC ? a->k - k0 : KC, steps = (kc + g->kstep - 1) / g->kstep;
                const uint32_t *apk = ap + k0 / g->kstep * npanels * mr;
                g->pack_weights(a, j0, nc, k0, kc, bp);
                for (int64_t i0 = 0; i0 < nb; i0 += mc_max)
                    for (int64_t jp = 0; jp < nc; jp += nr)
                        for (int64_t ip = i0; ip < i0 + mc_max && ip < nb; ip += mr) {
                            const int64_t row = n0 + ip, col = j0 + jp;
                            if (row + mr <= a->n && col + nr <= a->m) {
                                g->micro(steps, apk + ip * steps, bp + jp * steps, a->y + row * a->m + col, a->m, k0 > 0);
                            } else {
                                g->micro(steps, apk + ip * steps, bp + jp * steps, tile, nr, 0);
                                merge_edge_tile(a, tile, mr, nr, row, col, k0 == 0);
                            }
                        }
            }
        }
        vx_team_barrier(nt);   /* ap is refilled for the next rows only once every thread is done with it */
    }
    if (a->b)   /* added to the finished sum, as the twin does */
        for (int64_t i = 0; i < a->n; i++)
            for (int64_t j = lo; j < hi; j++) a->y[i * a->m + j] += a->b[j];
    free(tile);
    free(bp);
}

static void linear_gemm(const vx_linear_args *a, const vx_gemm_kernel *g) {
    const int mr = g->mr;
    const int64_t nb_max = (NB + mr - 1) / mr * mr;
    const int64_t k_elems = (KC + g->kstep - 1) / g->kstep * ((a->k + KC - 1) / KC);   /* 32-bit elements per row */
    gemm_ctx c = {a, g, vx_alloc(4 * (size_t)(a->n < nb_max ? (a->n + mr - 1) / mr * mr : nb_max) * k_elems)};
    vx_parallel(vx_threads_for((double)a->n * a->m * a->k / 16), gemm_task, &c);
    free(c.ap);
}

static void linear(const float *x, int64_t n, int64_t k, int xtype, const void *w, int wtype, int64_t m, const float *b,
                   float *y) {
    vx_linear_args a = {x, n, k, m, xtype, w, wtype, b, y};
    if (n <= 0 || m <= 0) return;
    if (k == 0) {   /* an empty sum: the bias alone */
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < m; j++) y[i * m + j] = b ? b[j] : 0.0f;
        return;
    }
    const vx_isa *isa = vx_active();
    if (n <= VX_GEMV_ROWS) {
        float *xr = NULL;
        if (xtype == VX_X_BF16) {   /* a few rows: round a copy, the GEMV then runs as for float32 */
            xr = vx_alloc(sizeof(float) * (size_t)(n * k));
            for (int64_t i = 0; i < n * k; i++) xr[i] = vx_round_bf16(x[i]);
            a.x = xr;
        }
        linear_gemv(&a);
        free(xr);
    } else if (xtype == VX_X_BF16 && wtype == VX_W_BF16 && isa->gemm_bf16dot) {
        linear_gemm(&a, isa->gemm_bf16dot);
    } else {
        linear_gemm(&a, &isa->gemm);
    }
}

void vx_linear(const float *x, int64_t n, int64_t k, int xtype, const void *w, int wtype, int64_t m, const float *b,
               float *y) {
    const int64_t t0 = vx_now_ns();
    linear(x, n, k, xtype, w, wtype, m, b, y);
    vx_count_ns(VX_TIME_WEIGHTS, vx_now_ns() - t0);
}
