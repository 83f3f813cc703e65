/* Machine probes for bench_kernels.py (bench only: built on the fly with -march=native, never shipped).
 *
 * read_bw:  stream a buffer once on `threads` threads with wide loads and independent accumulators;
 *           the most a memory-bound kernel such as the decode GEMV can hope for.
 * fma_peak: a register-blocked FMA loop over L1-resident data (12 x 2 vectors, the shape of a GEMM
 *           micro-kernel); the most a compute-bound kernel can hope for. Returns flops.
 * bf16dot_peak: the same loop with the AVX512-BF16 dot-product instruction (32 multiply-adds each), the
 *           ceiling of the bf16-precision GEMM; 0 where the CPU lacks it.
 * vnni_peak: independent AVX512-VNNI int8 dot products (64 multiply-adds each), the ceiling of the
 *           quantised-weight kernels; counts 2 ops per multiply-add; 0 where the CPU lacks it.
 * overlap:  does a thread's streaming from memory hide under its arithmetic? Each thread walks its share of
 *           a buffer in 32 KB blocks, and per block: mode 0 loads it (one load per 64-byte line); mode 1
 *           runs `work` steps of register-only FMAs (8 independent chains); mode 2 both, the loads first;
 *           mode 3 the arithmetic with software prefetches of the next block spread through it. Full overlap
 *           would make modes 2 and 3 take the longer of modes 0 and 1; none, their sum. */
#include <stdint.h>
#include <immintrin.h>
#include <omp.h>

float read_bw(const float *p, int64_t n, int threads) {
    float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t lo = n / 64 * t / nt * 64, hi = n / 64 * (t + 1) / nt * 64;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = lo; i < hi; i += 64) {
            a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
            a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
            a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
            a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
        float a[16] = {0};
        for (int64_t i = lo; i < hi; i += 16)
            for (int j = 0; j < 16; j++) a[j] += p[i + j];
        for (int j = 0; j < 16; j++) total += a[j];
#endif
    }
    return total;
}

#if defined(__AVX512F__)
#define VEC 16
typedef __m512 vec;
#define VZERO _mm512_setzero_ps()
#define VLOAD _mm512_loadu_ps
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VSUM _mm512_reduce_add_ps
#else
#define VEC 8
typedef __m256 vec;
#define VZERO _mm256_setzero_ps()
#define VLOAD _mm256_loadu_ps
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
static inline float VSUM(__m256 v) {
    float f[8], s = 0;
    _mm256_storeu_ps(f, v);
    for (int i = 0; i < 8; i++) s += f[i];
    return s;
}
#endif

double fma_peak(int64_t iters, int threads, float *sink) {
    double flops = 0;
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    {
        float a[256 * 12], b[256 * 2 * VEC];
        for (int i = 0; i < 256 * 12; i++) a[i] = 1e-3f;
        for (int i = 0; i < 256 * 2 * VEC; i++) b[i] = 1e-3f;
        vec acc[12][2];
        for (int i = 0; i < 12; i++) acc[i][0] = acc[i][1] = VZERO;
        for (int64_t it = 0; it < iters; it++) {
            const float *pa = a, *pb = b;
            for (int k = 0; k < 256; k++, pa += 12, pb += 2 * VEC) {
                vec b0 = VLOAD(pb), b1 = VLOAD(pb + VEC);
#pragma GCC unroll 12
                for (int i = 0; i < 12; i++) {
                    vec av = VSET1(pa[i]);
                    acc[i][0] = VFMA(av, b0, acc[i][0]);
                    acc[i][1] = VFMA(av, b1, acc[i][1]);
                }
            }
            __asm__ volatile("" ::: "memory");
        }
        float s = 0;
        for (int i = 0; i < 12; i++) s += VSUM(acc[i][0]) + VSUM(acc[i][1]);
        sink[omp_get_thread_num()] = s;
        flops += (double)iters * 256 * 12 * 2 * VEC * 2;
    }
    return flops;
}

double bf16dot_peak(int64_t iters, int threads, float *sink) {
#if defined(__AVX512BF16__)
    double flops = 0;
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    {
        uint32_t a[256 * 12], b[256 * 32];
        for (int i = 0; i < 256 * 12; i++) a[i] = 0x3a833a83u;     /* a pair of bf16 1e-3 */
        for (int i = 0; i < 256 * 32; i++) b[i] = 0x3a833a83u;
        __m512 acc[12][2];
        for (int i = 0; i < 12; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        for (int64_t it = 0; it < iters; it++) {
            const uint32_t *pa = a, *pb = b;
            for (int k = 0; k < 256; k++, pa += 12, pb += 32) {
                __m512bh b0 = (__m512bh)_mm512_loadu_si512(pb), b1 = (__m512bh)_mm512_loadu_si512(pb + 16);
#pragma GCC unroll 12
                for (int i = 0; i < 12; i++) {
                    __m512bh av = (__m512bh)_mm512_set1_epi32((int)pa[i]);
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, b0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, b1);
                }
            }
            __asm__ volatile("" ::: "memory");
        }
        float s = 0;
        for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(acc[i][0]) + _mm512_reduce_add_ps(acc[i][1]);
        sink[omp_get_thread_num()] = s;
        flops += (double)iters * 256 * 12 * 2 * 32 * 2;
    }
    return flops;
#else
    (void)iters, (void)threads, (void)sink;
    return 0.0;
#endif
}

double vnni_peak(int64_t iters, int threads, float *sink) {
#if defined(__AVX512VNNI__)
    /* 12 independent accumulators fed from registers only (no broadcast loads): the instruction's own
     * throughput. Fewer live registers than the FMA loop's shape on purpose: with 8 x 2 accumulators and 8
     * activation vectors GCC spilled one accumulator to the stack every step, and the probe read half the
     * peak (1 VPDPBUSD a cycle instead of 2 on Zen 5). */
    double ops = 0;
#pragma omp parallel num_threads(threads) reduction(+ : ops)
    {
        __m512i acc[12];
        const __m512i av = _mm512_set1_epi32(0x01010101), bv = _mm512_set1_epi32(0x02020202);
        for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_epi32(i);
        for (int64_t it = 0; it < iters; it++) {
            for (int k = 0; k < 256; k++) {
#pragma GCC unroll 12
                for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], bv, av);
            }
            __asm__ volatile("" ::: "memory");
        }
        int64_t s = 0;
        for (int i = 0; i < 12; i++) s += _mm512_reduce_add_epi32(acc[i]);
        sink[omp_get_thread_num()] = (float)s;
        ops += (double)iters * 256 * 12 * 64 * 2;
    }
    return ops;
#else
    (void)iters, (void)threads, (void)sink;
    return 0.0;
#endif
}

void overlap(const float *p, int64_t n, int threads, int mode, int64_t work, float *sink) {
    const int64_t block = 32768 / sizeof(float), nblocks = n / block;
#pragma omp parallel num_threads(threads)
    {
        vec a[8], m = VSET1(0.999f);
        for (int i = 0; i < 8; i++) a[i] = VSET1(1.0f);
        unsigned t = 0;
        /* the arithmetic in 512 pieces of `per` steps, one per line of a block; mode 3 prefetches a line of the
         * next block after each piece (no division in the loop: an earlier version's s % every per step
         * slowed the arithmetic it measured) */
        const int64_t per = (work + 511) / 512;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            const char *blk = (const char *)(p + b * block), *next = blk + 32768;
            if (mode == 0 || mode == 2)
                for (int64_t o = 0; o < 32768; o += 64) t ^= *(const unsigned *)(blk + o);
            if (mode >= 1)
                for (int64_t l = 0; l < 512; l++) {
                    for (int64_t s = 0; s < per; s++) {
#pragma GCC unroll 8
                        for (int i = 0; i < 8; i++) a[i] = VFMA(a[i], m, m);
                    }
                    if (mode == 3 && b + 1 < nblocks) __builtin_prefetch(next + 64 * l, 0, 2);
                }
        }
        float s = (float)t;
        for (int i = 0; i < 8; i++) s += VSUM(a[i]);
        sink[omp_get_thread_num()] = s;
    }
}
