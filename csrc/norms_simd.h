/* Inner loops of vx_rms_norm and vx_silu_mul, written once against simd.h and instantiated per ISA
 * level. Both follow the twin's operation order: x / sqrt(mean + eps) then times w; a / (1 + exp(-a))
 * then times b. */

VX_FN static void VX_NAME(rms_norm)(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t d) {
    for (int64_t r = 0; r < rows; r++, x += d, y += d) {
        vf acc[4] = {vx_zero(), vx_zero(), vx_zero(), vx_zero()};
        int64_t i = 0;
        for (; i + 4 * VW <= d; i += 4 * VW)
            for (int u = 0; u < 4; u++) {
                vf v = vx_load(x + i + u * VW);
                acc[u] = vx_fma(v, v, acc[u]);
            }
        for (; i + VW <= d; i += VW) {
            vf v = vx_load(x + i);
            acc[0] = vx_fma(v, v, acc[0]);
        }
        float ss = vx_hsum(vx_add(vx_add(acc[0], acc[1]), vx_add(acc[2], acc[3])));
        for (; i < d; i++) ss += x[i] * x[i];
        float rms = sqrtf(ss / (float)d + eps);
        vf rv = vx_set1(rms);
        for (i = 0; i + VW <= d; i += VW) vx_store(y + i, vx_mul(vx_load(w + i), vx_div(vx_load(x + i), rv)));
        for (; i < d; i++) y[i] = w[i] * (x[i] / rms);
    }
}

VX_FN static void VX_NAME(silu_mul)(const float *a, const float *b, float *y, int64_t n) {
    int64_t i = 0;
    const vf one = vx_set1(1.0f);
    for (; i + VW <= n; i += VW) {
        vf av = vx_load(a + i);
        vf e = vx_exp(vx_sub(vx_zero(), av));
        vx_store(y + i, vx_mul(vx_div(av, vx_add(one, e)), vx_load(b + i)));
    }
    for (; i < n; i++) y[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}
