/* vx_rms_norm and vx_silu_mul: thread split; the loops are in norms_simd.h. */
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
