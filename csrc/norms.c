/* vx_rms_norm and vx_silu_mul: thread split; the loops are in norms_simd.h. vx_rope: plain C (memory-bound,
 * the compiler vectorises it at baseline width). */
#include "dispatch.h"

typedef struct {   /* the arguments of the three kernels below, each taking its own (silu_mul: a in x) */
    const float *x, *w, *b;
    float eps, *y;
    int64_t rows, d;
    const float *cos, *sin;
    int h, interleaved;
} rows_ctx;

static void rms_norm_task(void *ctx, int tid, int nt) {
    const rows_ctx *c = ctx;
    int64_t lo, hi;
    vx_split(c->rows, 1, tid, nt, &lo, &hi);
    vx_active()->rms_norm(c->x + lo * c->d, c->w, c->eps, c->y + lo * c->d, hi - lo, c->d);
}

void vx_rms_norm(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t d) {
    rows_ctx c = {.x = x, .w = w, .eps = eps, .y = y, .rows = rows, .d = d};
    vx_parallel(vx_threads_for((double)rows * d / 4), rms_norm_task, &c);
}

static void silu_mul_task(void *ctx, int tid, int nt) {
    const rows_ctx *c = ctx;
    int64_t lo, hi;
    vx_split(c->rows, 64, tid, nt, &lo, &hi);
    vx_active()->silu_mul(c->x + lo, c->b + lo, c->y + lo, hi - lo);
}

void vx_silu_mul(const float *a, const float *b, float *y, int64_t n) {
    rows_ctx c = {.x = a, .b = b, .y = y, .rows = n};
    vx_parallel(vx_threads_for((double)n / 2), silu_mul_task, &c);
}

static void rope_task(void *ctx, int tid, int nt) {
    const rows_ctx *c = ctx;
    const int d = (int)c->d, half = d / 2, step = c->interleaved ? 2 : 1, second = c->interleaved ? 1 : half;   /* where p, q sit */
    int64_t lo, hi;
    vx_split(c->rows, 1, tid, nt, &lo, &hi);
    for (int64_t r = lo; r < hi; r++)
        for (int j = 0; j < c->h; j++) {
            const float *xr = c->x + (r * c->h + j) * d, *cs = c->cos + r * half, *sn = c->sin + r * half;
            float *yr = c->y + (r * c->h + j) * d;
            for (int i = 0; i < half; i++) {
                const float p = xr[i * step], q = xr[i * step + second];
                yr[i] = p * cs[i] - q * sn[i];
                yr[i + half] = q * cs[i] + p * sn[i];
            }
        }
}

void vx_rope(const float *x, const float *cos, const float *sin, float *y, int64_t t, int h, int d, int interleaved) {
    rows_ctx c = {.x = x, .y = y, .rows = t, .d = d, .cos = cos, .sin = sin, .h = h, .interleaved = interleaved};
    vx_parallel(vx_threads_for((double)t * h * d / 4), rope_task, &c);
}
