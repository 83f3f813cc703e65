/* vx_rms_norm and vx_silu_mul: thread split; the loops are in norms_simd.h. vx_rope: plain C (memory-bound,
 * the compiler vectorises it at baseline width). */
#include "dispatch.h"

void vx_rms_norm(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t d) {
    const vx_isa *isa = vx_active();
    int nt = vx_threads_for((double)rows * d / 4);
#pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        vx_split(rows, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        isa->rms_norm(x + lo * d, w, eps, y + lo * d, hi - lo, d);
    }
}

void vx_silu_mul(const float *a, const float *b, float *y, int64_t n) {
    const vx_isa *isa = vx_active();
    int nt = vx_threads_for((double)n / 2);
#pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        vx_split(n, 64, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        isa->silu_mul(a + lo, b + lo, y + lo, hi - lo);
    }
}

void vx_rope(const float *x, const float *cos, const float *sin, float *y, int64_t t, int h, int d, int interleaved) {
    const int half = d / 2, step = interleaved ? 2 : 1, second = interleaved ? 1 : half;   /* where p, q sit */
    int nt = vx_threads_for((double)t * h * d / 4);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < t; r++)
        for (int j = 0; j < h; j++) {
            const float *xr = x + (r * h + j) * d, *c = cos + r * half, *s = sin + r * half;
            float *yr = y + (r * h + j) * d;
            for (int i = 0; i < half; i++) {
                const float p = xr[i * step], q = xr[i * step + second];
                yr[i] = p * c[i] - q * s[i];
                yr[i + half] = q * c[i] + p * s[i];
            }
        }
}
