/* Inner loops of the quantised linears and their quantisers, instantiated per ISA level (isa_*.c).
 * Formats: voxtral_ref/runtime/quant.py. The driver (qmatmul.c) owns threads and buffers.
 *
 * The quantisers are plain C that the compiler vectorises at each level (the avx512 levels' activation
 * quantiser is written out in 512-bit steps, quantize_act_zmm); they use only IEEE-exact steps (division,
 * rint, min/max), left-to-right float sums and exact integer ones, with -ffp-contract=off, so every level
 * equals the twins bit for bit. Minima and maxima are written as comparisons (VX_MIN / VX_MAX, what the
 * vector instructions compute), which the compiler vectorises where it would not vectorise the libm
 * functions. */
#define VX_MIN(a, b) ((a) < (b) ? (a) : (b))
#define VX_MAX(a, b) ((a) > (b) ? (a) : (b))
#define VX_CLIP(v, lo, hi) VX_MIN(VX_MAX(v, lo), hi)

/* ---- activations: [n, k] -> int8 per block (32 for the linears, a head row for attention) ------------ */
#if VX_LEVEL == VX_LEVEL_AVX512
/* Blocks of a multiple of 16 with explicit 512-bit steps, each the C loops' own operation (max, IEEE
 * division, round to nearest even, min / max clamp, exact integer sums), so the result is theirs bit for
 * bit: the compiler made 256-bit code of those loops with blends and scalar steps, 0.52 ns an element (the
 * linears' inputs, attention's queries and every KV row go through here), against 0.20 here (1 thread,
 * 64 x 9216). */
VX_FN static void quantize_act_zmm(const float *x, int64_t nblocks, int64_t block, int8_t *xq, float *sx, int32_t *xsum) {
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t i = 0; i < nblocks; i++) {
        const float *xb = x + i * block;
        __m512 m = _mm512_setzero_ps();
        for (int64_t t = 0; t < block; t += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + t)));
        const float s = _mm512_reduce_max_ps(m) / 127.0f, safe = s > 0.0f ? s : 1.0f;
        const __m512 sv = _mm512_set1_ps(safe);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t t = 0; t < block; t += 16) {
            const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xb + t), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512i c = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, lo), hi));
            _mm_storeu_si128((__m128i *)(xq + i * block + t), _mm512_cvtepi32_epi8(c));
            sum = _mm512_add_epi32(sum, c);
        }
        sx[i] = s, xsum[i] = _mm512_reduce_add_epi32(sum);
    }
}
#endif

VX_FN static void VX_NAME(quantize_act)(const float *x, int64_t n, int64_t k, int64_t block, int8_t *xq, float *sx,
                                        int32_t *xsum) {
#if VX_LEVEL == VX_LEVEL_AVX512
    if (block % 16 == 0) {
        quantize_act_zmm(x, n * (k / block), block, xq, sx, xsum);
        return;
    }
#endif
    if (block == VX_QBLOCK) {        /* the linears': a constant block, each step a loop the compiler vectorises */
        for (int64_t i = 0; i < n * (k / VX_QBLOCK); i++) {
            const float *xb = x + i * VX_QBLOCK;
            float amax = 0.0f, q[VX_QBLOCK];
            for (int t = 0; t < VX_QBLOCK; t++) amax = VX_MAX(amax, fabsf(xb[t]));
            const float s = amax / 127.0f, safe = s > 0.0f ? s : 1.0f;
            for (int t = 0; t < VX_QBLOCK; t++) q[t] = VX_CLIP(nearbyintf(xb[t] / safe), -127.0f, 127.0f);
            int32_t sum = 0;
            for (int t = 0; t < VX_QBLOCK; t++) {
                xq[i * VX_QBLOCK + t] = (int8_t)q[t];
                sum += (int32_t)q[t];
            }
            sx[i] = s, xsum[i] = sum;
        }
        return;
    }
    for (int64_t i = 0; i < n * (k / block); i++) {   /* any block: the KV caches' head rows */
        const float *xb = x + i * block;
        float amax = 0.0f;
        for (int64_t t = 0; t < block; t++) amax = VX_MAX(amax, fabsf(xb[t]));
        const float s = amax / 127.0f, safe = s > 0.0f ? s : 1.0f;
        int32_t sum = 0;
        for (int64_t t = 0; t < block; t++) {
            const float q = VX_CLIP(nearbyintf(xb[t] / safe), -127.0f, 127.0f);
            xq[i * block + t] = (int8_t)q;
            sum += (int32_t)q;
        }
        sx[i] = s, xsum[i] = sum;
    }
}

/* ---- weights -> panels -----------------------------------------------------------------------------------
 * One panel's block column at a time, transposed to g[t][r] (input t of the block, row r): the loops then
 * run over the 16 rows in the innermost position, which the compiler turns into vectors, while each row's
 * own sums still run left to right over t, as the twin's _seq_sum does. */
typedef float vx_qcol[VX_QBLOCK][VX_QPANEL];

static inline void q_load_column(const void *w, int wtype, int64_t row0, int64_t rows, int64_t k, int64_t k0, vx_qcol g) {
    for (int r = 0; r < VX_QPANEL; r++)
        for (int t = 0; t < VX_QBLOCK; t++) {
            const int64_t i = (row0 + r) * k + k0 + t;
            g[t][r] = r >= rows ? 0.0f
                    : wtype == VX_W_BF16 ? vx_bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
        }
}

VX_FN static void VX_NAME(quantize_int8_panel)(const void *w, int wtype, int64_t row0, int64_t rows, int64_t k, uint8_t *out) {
    vx_qcol g;
    for (int64_t b = 0; b < k / VX_QBLOCK; b++, out += 2 * VX_QPANEL + VX_QPANEL * VX_QBLOCK) {
        q_load_column(w, wtype, row0, rows, k, b * VX_QBLOCK, g);
        float amax[VX_QPANEL] = {0}, s[VX_QPANEL];
        for (int t = 0; t < VX_QBLOCK; t++)
            for (int r = 0; r < VX_QPANEL; r++) amax[r] = VX_MAX(amax[r], fabsf(g[t][r]));
        for (int r = 0; r < VX_QPANEL; r++) {
            const uint16_t h = vx_f32_to_f16(amax[r] / 127.0f);
            memcpy(out + 2 * r, &h, 2);
            s[r] = vx_f16_to_f32(h);
            s[r] = s[r] > 0.0f ? s[r] : 1.0f;
        }
        for (int t = 0; t < VX_QBLOCK; t++)
            for (int r = 0; r < VX_QPANEL; r++) {
                const float q = VX_CLIP(nearbyintf(g[t][r] / s[r]), -127.0f, 127.0f);
                out[2 * VX_QPANEL + (t / 4) * 4 * VX_QPANEL + 4 * r + t % 4] = (uint8_t)((int)q + 128);
            }
    }
}

/* q = clip(rint((w + offset) * (1 / scale)), 0, 15) for the 16 rows of input t (0 where scale is 0) */
static inline void q4_codes(const vx_qcol g, int t, const float *scale, const float *inv, const float *offset, float *q) {
    for (int r = 0; r < VX_QPANEL; r++) {
        const float v = VX_CLIP(nearbyintf((g[t][r] + offset[r]) * inv[r]), 0.0f, 15.0f);
        q[r] = scale[r] > 0.0f ? v : 0.0f;
    }
}

static inline void q4_inverse(const float *scale, float *inv) {
    for (int r = 0; r < VX_QPANEL; r++) inv[r] = 1.0f / (scale[r] > 0.0f ? scale[r] : 1.0f);
}

static inline void q4_error(const vx_qcol g, const float *scale, const float *offset, float *err) {
    float q[VX_QPANEL], inv[VX_QPANEL];
    q4_inverse(scale, inv);
    for (int r = 0; r < VX_QPANEL; r++) err[r] = 0.0f;
    for (int t = 0; t < VX_QBLOCK; t++) {
        q4_codes(g, t, scale, inv, offset, q);
        for (int r = 0; r < VX_QPANEL; r++) {
            const float d = q[r] * scale[r] - offset[r] - g[t][r];
            err[r] = err[r] + d * d;
        }
    }
}

/* quant._fit_blocks for the 16 rows of one block column: (scale, offset) per row */
static inline void q4_fit(const vx_qcol g, float *best_s, float *best_o) {
    float lo[VX_QPANEL], rng[VX_QPANEL], sum_w[VX_QPANEL], best_e[VX_QPANEL];
    for (int r = 0; r < VX_QPANEL; r++) {
        float mn = g[0][r], mx = g[0][r], sw = 0.0f;
        for (int t = 0; t < VX_QBLOCK; t++) {
            mn = VX_MIN(mn, g[t][r]);
            mx = VX_MAX(mx, g[t][r]);
            sw = sw + g[t][r];
        }
        lo[r] = VX_MIN(mn, 0.0f), rng[r] = mx - lo[r], sum_w[r] = sw;
        best_s[r] = rng[r] / 15.0f, best_o[r] = 0.0f - lo[r];            /* 0 - x: never a -0.0 */
    }
    q4_error(g, best_s, best_o, best_e);
    const float n = (float)VX_QBLOCK;
    for (int c = 1; c < VX_Q4_CANDIDATES; c++) {
        const float steps = 15.0f + (float)(c - 3) / 4.0f;
        float sq[VX_QPANEL] = {0}, sqq[VX_QPANEL] = {0}, sqw[VX_QPANEL] = {0}, s[VX_QPANEL], o[VX_QPANEL], e[VX_QPANEL];
        int ok[VX_QPANEL];
        for (int t = 0; t < VX_QBLOCK; t++)
            for (int r = 0; r < VX_QPANEL; r++) {
                const float inv = rng[r] > 0.0f ? steps / rng[r] : 0.0f;
                const float q = VX_CLIP(nearbyintf((g[t][r] - lo[r]) * inv), 0.0f, 15.0f);
                sq[r] = sq[r] + q, sqq[r] = sqq[r] + q * q, sqw[r] = sqw[r] + q * g[t][r];
            }
        for (int r = 0; r < VX_QPANEL; r++) {
            const float det = n * sqq[r] - sq[r] * sq[r];
            const float det1 = det > 0.0f ? det : 1.0f;
            float sr = (n * sqw[r] - sq[r] * sum_w[r]) / det1;
            float m = (sum_w[r] - sr * sq[r]) / n;
            if (m > 0.0f) sr = sqw[r] / (sqq[r] > 0.0f ? sqq[r] : 1.0f), m = 0.0f;
            ok[r] = det > 0.0f && sr > 0.0f;
            s[r] = ok[r] ? sr : 1.0f, o[r] = 0.0f - m;
        }
        q4_error(g, s, o, e);
        for (int r = 0; r < VX_QPANEL; r++)
            if (ok[r] && e[r] < best_e[r]) best_s[r] = s[r], best_o[r] = o[r], best_e[r] = e[r];
    }
}

VX_FN static void VX_NAME(quantize_q4_panel)(const void *w, int wtype, int64_t row0, int64_t rows, int64_t k, uint8_t *out) {
    const int nb = (int)vx_q4_blocks_per_super(k);
    vx_qcol g[8];
    for (int64_t k0 = 0; k0 < k; k0 += nb * VX_QBLOCK) {
        float s[8][VX_QPANEL], o[8][VX_QPANEL], smax[VX_QPANEL] = {0}, omax[VX_QPANEL] = {0}, d[VX_QPANEL], dmin[VX_QPANEL];
        uint8_t sc[8][VX_QPANEL] = {{0}}, mn[8][VX_QPANEL] = {{0}};
        for (int b = 0; b < nb; b++) {
            q_load_column(w, wtype, row0, rows, k, k0 + b * VX_QBLOCK, g[b]);
            q4_fit(g[b], s[b], o[b]);
            for (int r = 0; r < VX_QPANEL; r++) smax[r] = VX_MAX(smax[r], s[b][r]), omax[r] = VX_MAX(omax[r], o[b][r]);
        }
        for (int r = 0; r < VX_QPANEL; r++) {
            const uint16_t hd = vx_f32_to_f16(smax[r] / 63.0f + 0.0f), hm = vx_f32_to_f16(omax[r] / 63.0f + 0.0f);
            memcpy(out + 2 * r, &hd, 2);
            memcpy(out + 32 + 2 * r, &hm, 2);
            d[r] = vx_f16_to_f32(hd), dmin[r] = vx_f16_to_f32(hm);
        }
        for (int b = 0; b < nb; b++)
            for (int r = 0; r < VX_QPANEL; r++) {
                sc[b][r] = (uint8_t)VX_CLIP(nearbyintf(s[b][r] / (d[r] > 0.0f ? d[r] : 1.0f)), 0.0f, 63.0f);
                mn[b][r] = (uint8_t)VX_CLIP(nearbyintf(o[b][r] / (dmin[r] > 0.0f ? dmin[r] : 1.0f)), 0.0f, 63.0f);
            }
        for (int gi = 0; gi < 4; gi++)
            for (int r = 0; r < VX_QPANEL; r++) {
                out[64 + gi * 16 + r] = (uint8_t)((sc[gi][r] & 15) | (sc[gi + 4][r] & 15) << 4);
                out[128 + gi * 16 + r] = (uint8_t)((mn[gi][r] & 15) | (mn[gi + 4][r] & 15) << 4);
                out[192 + gi * 16 + r] = (uint8_t)(sc[gi][r] >> 4 | (sc[gi + 4][r] >> 4) << 2 | (mn[gi][r] >> 4) << 4 |
                                                   (mn[gi + 4][r] >> 4) << 6);
            }
        for (int b = 0; b < nb; b++) {
            float scale[VX_QPANEL], inv[VX_QPANEL], offset[VX_QPANEL], q[VX_QPANEL];
            uint8_t *nib = out + VX_Q4_HEAD + b * (VX_QPANEL * VX_QBLOCK / 2);
            for (int r = 0; r < VX_QPANEL; r++) scale[r] = d[r] * (float)sc[b][r], offset[r] = dmin[r] * (float)mn[b][r];
            q4_inverse(scale, inv);
            memset(nib, 0, VX_QPANEL * VX_QBLOCK / 2);
            for (int t = 0; t < VX_QBLOCK; t++) {
                q4_codes(g[b], t, scale, inv, offset, q);
                const int v = (t / 4) % 4, hi = t >= 16;
                for (int r = 0; r < VX_QPANEL; r++) nib[v * 64 + 4 * r + t % 4] |= (uint8_t)((int)q[r] << (4 * hi));
            }
        }
        out += VX_Q4_HEAD + nb * (VX_QPANEL * VX_QBLOCK / 2);
    }
}

VX_FN static void VX_NAME(quantize_panel)(const void *w, int wtype, int64_t row0, int64_t rows, int64_t k, int fmt, uint8_t *out) {
    if (fmt == VX_Q_INT8) VX_NAME(quantize_int8_panel)(w, wtype, row0, rows, k, out);
    else VX_NAME(quantize_q4_panel)(w, wtype, row0, rows, k, out);
}

/* ---- y = x @ w.T, portable: one panel, one activation row at a time ------------------------------------
 * The scalar level's (the others use integer dot-product instructions: qmatmul_256.h and the VNNI kernel
 * below), in the other levels' order (they fuse two of its roundings): int8 per block, acc[r] +=
 * ((dot - 128 xsum) sx) s[r]; q4 per super-block, acc[r] += (I sx) d[r] - (N sx) dmin[r] (quant.py's terms). */
#if VX_LEVEL == VX_LEVEL_SCALAR

static inline float q_f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return vx_f16_to_f32(h);
}

/* the exact integer dots of one block's 16 rows with xq[0:32]: int8 steps u[(t / 4) * 64 + 4 r + t % 4];
 * q4 nibbles, the low half of vector (t / 4) % 4 for t < 16, the high half after */
static inline void q_block_dots(int fmt, const uint8_t *u, const int8_t *xq, int32_t *dot) {
    for (int r = 0; r < VX_QPANEL; r++) dot[r] = 0;
    for (int t = 0; t < VX_QBLOCK; t++)
        for (int r = 0; r < VX_QPANEL; r++) {
            const int byte = fmt == VX_Q_INT8 ? u[(t / 4) * 64 + 4 * r + t % 4]
                                              : u[((t / 4) % 4) * 64 + 4 * r + t % 4] >> (4 * (t >= 16)) & 15;
            dot[r] += byte * xq[t];
        }
}

/* acc[16] for activation row i over an int8 panel */
static inline void q_int8_row(const vx_qlinear_args *a, const uint8_t *pw, int64_t i, float *acc) {
    const int64_t nblocks = a->k / VX_QBLOCK;
    for (int64_t b = 0; b < nblocks; b++) {
        const uint8_t *blk = pw + b * (2 * VX_QPANEL + VX_QPANEL * VX_QBLOCK);
        int32_t dot[VX_QPANEL];
        q_block_dots(VX_Q_INT8, blk + 2 * VX_QPANEL, a->xq + i * a->k + b * VX_QBLOCK, dot);
        const float sx = a->sx[i * nblocks + b];
        const int32_t xoff = a->xoff[i * nblocks + b];
        for (int r = 0; r < VX_QPANEL; r++) acc[r] = acc[r] + ((float)(dot[r] + xoff) * sx) * q_f16_at(blk + 2 * r);
    }
}

/* acc[16] for activation row i over a q4 panel */
static inline void q_q4_row(const vx_qlinear_args *a, const uint8_t *pw, int64_t i, float *acc) {
    const int64_t nb = vx_q4_blocks_per_super(a->k), supers = a->k / (nb * VX_QBLOCK);
    for (int64_t c = 0; c < supers; c++) {
        const uint8_t *h = pw + c * (VX_Q4_HEAD + nb * VX_QPANEL * VX_QBLOCK / 2);
        const int32_t *pair = a->xpair + (i * supers + c) * 4;
        int32_t I[VX_QPANEL] = {0}, N[VX_QPANEL] = {0};
        for (int64_t bb = 0; bb < nb; bb++) {
            const int gi = (int)(bb & 3), up = (int)(bb >> 2);
            const int32_t xsum = (int16_t)(uint16_t)((uint32_t)pair[gi] >> (16 * up));
            int32_t dot[VX_QPANEL];
            q_block_dots(VX_Q_Q4, h + VX_Q4_HEAD + bb * (VX_QPANEL * VX_QBLOCK / 2), a->xq4 + i * a->k + (c * nb + bb) * VX_QBLOCK, dot);
            for (int r = 0; r < VX_QPANEL; r++) {
                const int hi = h[192 + gi * 16 + r];
                I[r] += ((h[64 + gi * 16 + r] >> (4 * up) & 15) | (hi >> (2 * up) & 3) << 4) * dot[r];
                N[r] += ((h[128 + gi * 16 + r] >> (4 * up) & 15) | (hi >> (4 + 2 * up) & 3) << 4) * xsum;
            }
        }
        const float sx = a->sx4[i * supers + c];
        for (int r = 0; r < VX_QPANEL; r++)
            acc[r] = acc[r] + ((float)I[r] * sx) * q_f16_at(h + 2 * r) - ((float)N[r] * sx) * q_f16_at(h + 32 + 2 * r);
    }
}

VX_FN static void qlinear_scalar(const vx_qlinear_args *a, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) {
        const uint8_t *pw = a->w + p * a->panel_bytes;
        for (int64_t i = 0; i < a->n; i++) {
            float acc[VX_QPANEL] = {0};
            if (a->fmt == VX_Q_INT8) q_int8_row(a, pw, i, acc);
            else q_q4_row(a, pw, i, acc);
            const int64_t row0 = p * VX_QPANEL;
            for (int r = 0; r < VX_QPANEL && row0 + r < a->m; r++)
                a->y[i * a->m + row0 + r] = a->b ? acc[r] + a->b[row0 + r] : acc[r];
        }
    }
}
#endif

/* ---- y = x @ w.T with AVX512-VNNI (the avx512bf16 level: every CPU with AVX512-BF16 has it) ---------------
 * One panel is one zmm of 16 rows; VPDPBUSD multiplies its 4 unsigned weight bytes per row by 4 signed
 * activation bytes broadcast from x and adds them into the row's int32 lane: 8 dot steps per block of 32
 * inputs and activation row. On Zen 5 every vector multiply (VPDPBUSD, FMA, VPMULLD) issues on the same two
 * pipes, so past one row what a block adds to its 8 dot steps per row is the cost:
 *   int8: acc += (dot sx) S, the exact integer dot started from the offset term -128 xsum (2 multiplies);
 *   q4:   I += sc dot in integers (VPMULLD), and per super-block (I sx) d and (N sx) dmin in float, N from
 *         4 int16-pair dot steps (VPDPWSSD) of the offset codes with the pairs of block sums. A float scale
 *         per block (a convert, a multiply and two multiply-adds per block and row) made an 8-row pass over
 *         hot weights 11 % slower (one core, 8 panels x 3072 inputs in L2: 9.7 us against 8.6).
 * Up to QX activation rows share each weight load (and each q4 unpacking), so a pass over the weights serves
 * QX rows: the decode GEMV (n = 1), the streaming encoder (n = 4), batches, and the GEMM alike. */
#if VX_LEVEL == VX_LEVEL_AVX512
#define VX_VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#define VX_VNNI_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#define QX 8

VX_VNNI_INLINE void qpanel_int8_vnni(const vx_qlinear_args *a, const uint8_t *pw, int64_t i0, const int NX, __m512 *acc) {
    const int64_t K = a->k, nblocks = K / VX_QBLOCK, blk_bytes = 2 * VX_QPANEL + VX_QPANEL * VX_QBLOCK;
    const int8_t *xq = a->xq + i0 * K;
    const float *sx = a->sx + i0 * nblocks;
    const int32_t *xo = a->xoff + i0 * nblocks;
    for (int64_t b = 0; b < nblocks; b++) {
        const uint8_t *h = pw + b * blk_bytes, *u = h + 2 * VX_QPANEL;
        vx_qprefetch(h, blk_bytes, 0, 1, NX >= 4);
        const __m512 S = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
        __m512i dot[QX];
        for (int i = 0; i < NX; i++) dot[i] = _mm512_set1_epi32(xo[i * nblocks + b]);
        const int8_t *xb = xq + b * VX_QBLOCK;
        for (int s = 0; s < 8; s++) {
            const __m512i wv = _mm512_loadu_si512(u + 64 * s);
            for (int i = 0; i < NX; i++) dot[i] = vx_dpbusd_bcst(dot[i], wv, xb + i * K + 4 * s);
        }
        for (int i = 0; i < NX; i++) {
            acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_set1_ps(sx[i * nblocks + b])), S, acc[i]);
        }
    }
}

/* 64 6-bit codes (4 groups x 16 rows of a q4 header field): the low nibble from nib's bytes at bit nib_shift,
 * the high 2 bits from hb's at bit hb_shift. 16-bit shifts: the bits they carry across a byte are masked off */
VX_VNNI_INLINE __m512i q4_code_bytes(__m512i nib, int nib_shift, __m512i hb, int hb_shift) {
    const __m512i lo = _mm512_and_si512(_mm512_srli_epi16(nib, nib_shift), _mm512_set1_epi8(15));
    return _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, hb_shift), _mm512_set1_epi8(3)), 4));
}

/* a q4 super-block's 6-bit codes at h as bytes (see qpanel_q4_vnni) */
VX_VNNI_INLINE void q4_super_codes(const uint8_t *h, uint8_t codes[4][64]) {
    const __m512i ls = _mm512_loadu_si512(h + 64), lm = _mm512_loadu_si512(h + 128), hb = _mm512_loadu_si512(h + 192);
    _mm512_storeu_si512(codes[0], q4_code_bytes(ls, 0, hb, 0));
    _mm512_storeu_si512(codes[1], q4_code_bytes(ls, 4, hb, 2));
    _mm512_storeu_si512(codes[2], q4_code_bytes(lm, 0, hb, 4));
    _mm512_storeu_si512(codes[3], q4_code_bytes(lm, 4, hb, 6));
}

/* the offsets' codes of blocks g and g + 4 (codes[2 | 3]) as the int16 pairs of a VPDPWSSD with xpair */
VX_VNNI_INLINE __m512i q4_offset_pair(uint8_t codes[4][64], int g) {
    return _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes[2] + 16 * g))),
                           _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes[3] + 16 * g))), 16));
}

VX_VNNI_INLINE void qpanel_q4_vnni(const vx_qlinear_args *a, const uint8_t *pw, int64_t i0, const int NX, __m512 *acc) {
    const int64_t K = a->k, nb = vx_q4_blocks_per_super(K), supers = K / (nb * VX_QBLOCK);
    const int64_t sup_bytes = VX_Q4_HEAD + nb * VX_QPANEL * VX_QBLOCK / 2;
    const int8_t *xq = a->xq4 + i0 * K;
    const __m512i low4 = _mm512_set1_epi8(15);
    for (int64_t c = 0; c < supers; c++) {
        const uint8_t *h = pw + c * sup_bytes;
        __m512i I[QX];
        for (int i = 0; i < NX; i++) I[i] = _mm512_setzero_si512();
        /* the super-block's 6-bit codes as bytes, each from its low nibble and 2 high bits (quant.py's header:
         * scales' nibbles at 64, offsets' at 128, high bits at 192): codes[0 | 1] the scales of blocks g and
         * g + 4, codes[2 | 3] the offsets', [16 g + row]. Decoded once a super-block, here with 64-byte
         * operations, where widening each block's two code bytes took 8 operations a block: in cache, one
         * thread, q4 passes 4-10 % faster for 1-8 rows, 2-5 % from DRAM (both builds alternated in one process) */
        uint8_t codes[4][64];
        q4_super_codes(h, codes);
        for (int64_t bb = 0; bb < nb; bb++) {
            const int gi = (int)(bb & 3), up = (int)(bb >> 2);
            const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes[up] + 16 * gi)));
            const uint8_t *u = h + VX_Q4_HEAD + bb * (VX_QPANEL * VX_QBLOCK / 2);
            const int8_t *xb = xq + (c * nb + bb) * VX_QBLOCK;
            __m512i dot[QX];
            for (int i = 0; i < NX; i++) dot[i] = _mm512_setzero_si512();
            for (int v = 0; v < 4; v++) {
                vx_q4_prefetch(h, u, bb, v);
                const __m512i raw = _mm512_loadu_si512(u + 64 * v);
                const __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                for (int i = 0; i < NX; i++) {
                    dot[i] = vx_dpbusd_bcst(dot[i], lo, xb + i * K + 4 * v);
                    dot[i] = vx_dpbusd_bcst(dot[i], hi, xb + i * K + 4 * v + 16);
                }
            }
            for (int i = 0; i < NX; i++) I[i] = _mm512_add_epi32(I[i], _mm512_mullo_epi32(dot[i], sc));
        }
        __m512i N[QX];   /* blocks past nb have codes 0 and sums 0 */
        for (int i = 0; i < NX; i++) N[i] = _mm512_setzero_si512();
        for (int g = 0; g < 4; g++) {
            const __m512i pair = q4_offset_pair(codes, g);
            for (int i = 0; i < NX; i++)
                N[i] = _mm512_dpwssd_epi32(N[i], pair, _mm512_set1_epi32(a->xpair[((i0 + i) * supers + c) * 4 + g]));
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + 32)));
        for (int i = 0; i < NX; i++) {
            const __m512 sxv = _mm512_set1_ps(a->sx4[(i0 + i) * supers + c]);
            acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(I[i]), sxv), d, acc[i]);
            acc[i] = _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(N[i]), sxv), dmin, acc[i]);
        }
    }
}

VX_VNNI_INLINE void qpanel_vnni(const vx_qlinear_args *a, const uint8_t *pw, int64_t i0, const int NX, const int fmt,
                                int64_t row0) {
    __m512 acc[QX];
    for (int i = 0; i < NX; i++) acc[i] = _mm512_setzero_ps();
    if (fmt == VX_Q_INT8) qpanel_int8_vnni(a, pw, i0, NX, acc);
    else qpanel_q4_vnni(a, pw, i0, NX, acc);
    const __mmask16 valid = a->m - row0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (a->m - row0)) - 1);
    const __m512 bias = a->b ? _mm512_maskz_loadu_ps(valid, a->b + row0) : _mm512_setzero_ps();
    for (int i = 0; i < NX; i++) _mm512_mask_storeu_ps(a->y + (i0 + i) * a->m + row0, valid, _mm512_add_ps(acc[i], bias));
}

#define QPANEL_CASE(nx, fmt) \
    case (nx) * 2 + (fmt): qpanel_vnni(a, pw, i0, nx, fmt, p * VX_QPANEL); break;

/* activation rows [i0, i1) of panel p, QX at a time */
VX_VNNI_INLINE void qpanel_rows_vnni(const vx_qlinear_args *a, int64_t p, int64_t i0, int64_t i1) {
    const uint8_t *pw = a->w + p * a->panel_bytes;
    for (; i0 < i1; i0 += QX) {
        const int64_t nx = i1 - i0 < QX ? i1 - i0 : QX;
        switch (nx * 2 + a->fmt) {
            QPANEL_CASE(1, 0) QPANEL_CASE(2, 0) QPANEL_CASE(3, 0) QPANEL_CASE(4, 0)
            QPANEL_CASE(5, 0) QPANEL_CASE(6, 0) QPANEL_CASE(7, 0) QPANEL_CASE(8, 0)
            QPANEL_CASE(1, 1) QPANEL_CASE(2, 1) QPANEL_CASE(3, 1) QPANEL_CASE(4, 1)
            QPANEL_CASE(5, 1) QPANEL_CASE(6, 1) QPANEL_CASE(7, 1) QPANEL_CASE(8, 1)
        }
    }
}

VX_VNNI_FN static void qlinear_vnni(const vx_qlinear_args *a, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) qpanel_rows_vnni(a, p, 0, a->n);
}
#undef QPANEL_CASE
#endif
