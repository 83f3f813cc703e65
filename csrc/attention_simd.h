/* Inner loops of vx_attention, written once against simd.h and instantiated per ISA level.
 *
 * A "row" is a (query, query head of the group) pair of one kv head, so the hq / hkv query heads sharing a
 * kv head share every key and value load (GQA). Two loops, by the number of rows per kv head:
 *   attention_block  (prefill, encoder: more than VW rows per kv head) vectors run across rows;
 *   attention_keys   (decode, streaming: at most VW rows per kv head) vectors run along d.
 * Both keep an online softmax (running max m, running sum l, rescaling by exp(m_old - m_new)) in float32,
 * take keys in blocks, and mask by comparing positions relative to the block's smallest query position:
 * small exact integers in float32 (the Python wrapper keeps them below 2^23). */

/* Key j of kv head hk: its K and V rows (a bfloat16 cache's widened into conv[2 * d] first) and its
 * position relative to qmin, clamped to [-window - 1, span + 1] (which keeps every visibility test
 * unchanged). Keys at or past j_hi pad the block: a zero row that no query sees. `any` / `all` track
 * whether some / every query of the block sees the key. */
static inline void attention_key(const vx_attention_args *a, int hk, int64_t j, int64_t j_hi, int64_t qmin, int64_t qmax,
                                 int64_t span, const float *zero_row, float *conv, const float **kr, const float **vr,
                                 float *kp, int *any, int *all) {
    const int64_t W = a->window;
    if (j >= j_hi) {
        *kr = *vr = zero_row, *kp = (float)(-W - 1), *all = 0;
        return;
    }
    int64_t p = a->k_pos[j], rel = p - qmin;
    *any |= p > qmin - W && p <= qmax;
    *all &= p > qmax - W && p <= qmin;
    *kp = (float)(rel < -W - 1 ? -W - 1 : rel > span + 1 ? span + 1 : rel);
    const int64_t at = (j * a->hkv + hk) * a->d, n = a->d;
    if (a->kvtype == VX_W_BF16) {
        const uint16_t *ks = (const uint16_t *)a->k + at, *vs = (const uint16_t *)a->v + at;
        for (int64_t i = 0; i < n; i++) conv[i] = vx_bf16_to_f32(ks[i]), conv[n + i] = vx_bf16_to_f32(vs[i]);
        *kr = conv, *vr = conv + n;
    } else {
        *kr = (const float *)a->k + at, *vr = (const float *)a->v + at;
    }
}

/* More rows (prefill, encoder), 2 * VW per task: the query block is transposed once into qt[d][R] and
 * the output accumulated in ot[d][R], so each key row K[j, :] is used through scalar broadcasts, the
 * scores come out one vector per key, and the softmax is vector arithmetic across rows. */
#define ATT_BK (VW == 8 ? 4 : 8)
_Static_assert(2 * ATT_BK <= VX_ATT_CONV, "the driver's scratch holds 2 * ATT_BK widened rows");
#define ATT_RV 2   /* rows = ATT_RV * VW */

VX_INLINE void attention_block(const vx_attention_args *a, int hk, int64_t row0, float *scratch) {
    const int R = ATT_RV * VW, D = a->d, g = a->hq / a->hkv;
    const int64_t nrows = a->tq * g, W = a->window;
    float *qt = scratch, *ot = scratch + (size_t)D * R, *zero_row = scratch + (size_t)2 * D * R, *conv = zero_row + D;
    int nr = (int)(nrows - row0 < R ? nrows - row0 : R);

    int64_t qmin = INT64_MAX, qmax = INT64_MIN;
    for (int r = 0; r < nr; r++) {
        int64_t p = a->q_pos[(row0 + r) / g];
        qmin = p < qmin ? p : qmin;
        qmax = p > qmax ? p : qmax;
    }
    float qrel[ATT_RV * VW];
    for (int r = 0; r < R; r++) {
        int64_t i = (row0 + r) / g, h = (int64_t)hk * g + (row0 + r) % g;
        const float *qrow = a->q + (i * a->hq + h) * D;
        for (int d = 0; d < D; d++) qt[d * R + r] = r < nr ? qrow[d] : 0.0f, ot[d * R + r] = 0.0f;
        qrel[r] = r < nr ? (float)(a->q_pos[i] - qmin) : -3.0e7f;   /* padding rows see no key */
    }
    for (int d = 0; d < D; d++) zero_row[d] = 0.0f;
    vf qhi[ATT_RV], qlo[ATT_RV], m[ATT_RV], l[ATT_RV];
    for (int v = 0; v < ATT_RV; v++) {
        qhi[v] = vx_load(qrel + v * VW);
        qlo[v] = vx_sub(qhi[v], vx_set1((float)W));
        m[v] = vx_set1(-INFINITY);
        l[v] = vx_zero();
    }
    int64_t j_lo, j_hi;
    vx_key_range(a, qmin, qmax, &j_lo, &j_hi);
    const int64_t span = qmax - qmin;
    for (int64_t j0 = j_lo; j0 < j_hi; j0 += ATT_BK) {
        const float *kr[ATT_BK], *vr[ATT_BK];
        float kp[ATT_BK];
        int any = 0, all = 1;
        for (int jj = 0; jj < ATT_BK; jj++)
            attention_key(a, hk, j0 + jj, j_hi, qmin, qmax, span, zero_row, conv + 2 * jj * D, &kr[jj], &vr[jj], &kp[jj],
                          &any, &all);
        if (!any) continue;

        vf s[ATT_BK][ATT_RV];
        for (int jj = 0; jj < ATT_BK; jj++)
            for (int v = 0; v < ATT_RV; v++) s[jj][v] = vx_zero();
        for (int d = 0; d < D; d++) {
            vf qv[ATT_RV];
            for (int v = 0; v < ATT_RV; v++) qv[v] = vx_load(qt + d * R + v * VW);
            for (int jj = 0; jj < ATT_BK; jj++) {
                vf kb = vx_set1(kr[jj][d]);
                for (int v = 0; v < ATT_RV; v++) s[jj][v] = vx_fma(kb, qv[v], s[jj][v]);
            }
        }
        vf corr[ATT_RV];
        for (int v = 0; v < ATT_RV; v++) {
            vf mb = vx_set1(-INFINITY);
            for (int jj = 0; jj < ATT_BK; jj++) {
                s[jj][v] = vx_mul(s[jj][v], vx_set1(a->scale));
                if (!all) s[jj][v] = vx_mask_range(s[jj][v], vx_set1(kp[jj]), qlo[v], qhi[v]);
                mb = vx_max(mb, s[jj][v]);
            }
            vf mnew = vx_max(m[v], mb);
            vf msafe = vx_ninf_to_zero(mnew);           /* rows that saw nothing yet stay at 0 */
            corr[v] = vx_exp(vx_sub(m[v], msafe));
            vf sum = vx_zero();
            for (int jj = 0; jj < ATT_BK; jj++) {
                s[jj][v] = vx_exp(vx_sub(s[jj][v], msafe));
                sum = vx_add(sum, s[jj][v]);
            }
            l[v] = vx_fma(l[v], corr[v], sum);
            m[v] = mnew;
        }
        for (int d = 0; d < D; d++)
            for (int v = 0; v < ATT_RV; v++) {
                vf o = vx_mul(vx_load(ot + d * R + v * VW), corr[v]);
                for (int jj = 0; jj < ATT_BK; jj++) o = vx_fma(vx_set1(vr[jj][d]), s[jj][v], o);
                vx_store(ot + d * R + v * VW, o);
            }
    }

    float lsum[ATT_RV * VW];
    for (int v = 0; v < ATT_RV; v++) vx_store(lsum + v * VW, l[v]);
    for (int r = 0; r < nr; r++) {
        int64_t i = (row0 + r) / g, h = (int64_t)hk * g + (row0 + r) % g;
        float *orow = a->out + (i * a->hq + h) * D;
        for (int d = 0; d < D; d++) orow[d] = ot[d * R + r] / lsum[r];   /* 0 / 0 = NaN if it saw nothing */
    }
}

/* At most VW rows per kv head (decode: the hq / hkv query heads of one token; streaming: a few frames).
 * Vectors across rows would leave most lanes idle, so here they run along d, VW keys at a time: a row's
 * VW partial dot products are transposed and summed into one vector of VW scores (no per-key horizontal
 * sums), and the output row accumulates p_j * v_j.
 * The work is split by keys, not heads: each call takes a range of keys for every kv head, so the cache
 * is swept in memory order (a key's heads are contiguous; one head's keys are hkv * d apart, a stride that
 * defeats the hardware prefetchers and the TLB), and leaves a partial (m, l, o) per row that the driver
 * merges across key ranges (as flash-decoding does). Keys come in super-blocks (vx_att_sb: 64 keys at
 * d = 64, 32 at d = 128); per super-block and kv head, its K and V rows are first widened (or copied)
 * into kbuf / vbuf: in the cache they are hkv * d apart, 2-4 KB, so they would fall in the same L1 sets
 * and each row's pass would refetch them, while widening every head of the block at once spilled to L2.
 * The online softmax updates once per super-block, and the next super-block is prefetched into L2
 * (together: the encoder's streaming attention 10.2 -> 6.3 ms per step, 32 layers, 2 threads).
 * state: m [hkv][nrows], l [hkv][nrows], o [hkv][nrows][d]. DC is d when it is a compile-time 64 or 128
 * (the model's head sizes: q and o rows then live in registers), else 0. */
VX_INLINE void attention_keys_d(const vx_attention_args *a, int64_t j0, int64_t j1, int nrows, float *state,
                                float *scratch, const int DC) {
    const int D = DC ? DC : a->d, DV = D / VW * VW, g = a->hq / a->hkv, H = a->hkv;
    /* keys per super-block: its widened K and V rows fill 32 KB, in L1 */
    const int SB = vx_att_sb(D), NSUB = SB / VW;
    const int64_t W = a->window;
    float *ms = state, *ls = state + H * nrows, *os = state + 2 * H * nrows;
    float *kbuf = scratch, *vbuf = kbuf + (size_t)SB * D;
    float qrel[VW] = {0};
    int64_t qmin = INT64_MAX, qmax = INT64_MIN;
    for (int r = 0; r < nrows; r++) {
        int64_t p = a->q_pos[r / g];
        qmin = p < qmin ? p : qmin;
        qmax = p > qmax ? p : qmax;
    }
    for (int r = 0; r < nrows; r++) qrel[r] = (float)(a->q_pos[r / g] - qmin);
    for (int i = 0; i < H * nrows; i++) ms[i] = -INFINITY, ls[i] = 0.0f;
    for (int64_t i = 0; i < (int64_t)H * nrows * D; i++) os[i] = 0.0f;
    const int64_t span = qmax - qmin, row_stride = (int64_t)H * D;
    for (int64_t jb = j0; jb < j1; jb += SB) {
        const int nk = (int)(j1 - jb < SB ? j1 - jb : SB);
        float kp[VX_ATT_SB_MAX];
        int any = 0, all = nk == SB;
        for (int jj = 0; jj < SB; jj++) {            /* positions relative to qmin, shared by every head */
            if (jj >= nk) {
                kp[jj] = (float)(-W - 1);            /* padding: a zero row no query sees */
                continue;
            }
            const int64_t p = a->k_pos[jb + jj], rel = p - qmin;
            any |= p > qmin - W && p <= qmax;
            all &= p > qmax - W && p <= qmin;
            kp[jj] = (float)(rel < -W - 1 ? -W - 1 : rel > span + 1 ? span + 1 : rel);
        }
        if (!any) continue;
        {   /* the next super-block, every head: one contiguous run of K and one of V, into L2 while this one is
             * computed (its rows are hkv * d apart per head, a pattern the hardware prefetchers miss) */
            const int64_t next = jb + SB < j1 ? (j1 - jb - SB < SB ? j1 - jb - SB : SB) : 0;
            const size_t esz = a->kvtype == VX_W_BF16 ? 2 : 4, bytes = (size_t)(next * row_stride) * esz;
            const char *kn = (const char *)a->k + (size_t)((jb + SB) * row_stride) * esz;
            const char *vn = (const char *)a->v + (size_t)((jb + SB) * row_stride) * esz;
            for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(kn + o, 0, 1), __builtin_prefetch(vn + o, 0, 1);
        }
        for (int hk = 0; hk < H; hk++) {
            const int64_t at = (jb * H + hk) * D;
            if (a->kvtype == VX_W_BF16) {
                const uint16_t *ks = (const uint16_t *)a->k + at, *vs = (const uint16_t *)a->v + at;
                for (int jj = 0; jj < nk; jj++) {
                    for (int d = 0; d < DV; d += VW) {
                        vx_store(kbuf + jj * D + d, vx_load_bf16(ks + jj * row_stride + d));
                        vx_store(vbuf + jj * D + d, vx_load_bf16(vs + jj * row_stride + d));
                    }
                    for (int d = DV; d < D; d++)
                        kbuf[jj * D + d] = vx_bf16_to_f32(ks[jj * row_stride + d]), vbuf[jj * D + d] = vx_bf16_to_f32(vs[jj * row_stride + d]);
                }
            } else {
                const float *ks = (const float *)a->k + at, *vs = (const float *)a->v + at;
                for (int jj = 0; jj < nk; jj++) {
                    memcpy(kbuf + jj * D, ks + jj * row_stride, sizeof(float) * D);
                    memcpy(vbuf + jj * D, vs + jj * row_stride, sizeof(float) * D);
                }
            }
            for (int jj = nk; jj < SB; jj++)
                for (int d = 0; d < D; d++) kbuf[jj * D + d] = 0.0f, vbuf[jj * D + d] = 0.0f;
            for (int r = 0; r < nrows; r++) {
                const float *qrow = a->q + ((r / g) * a->hq + hk * g + r % g) * D;
                float *orow = os + (hk * nrows + r) * D, *m = ms + hk * nrows + r, *l = ls + hk * nrows + r;
                vf s[VX_ATT_SB_MAX / VW];
                for (int sb = 0; sb < NSUB; sb++) {
                    const float *kb = kbuf + (size_t)sb * VW * D;
                    vf acc[VW];                        /* VW independent FMA chains */
                    VX_UNROLL
                    for (int jj = 0; jj < VW; jj++) acc[jj] = vx_zero();
                    for (int d = 0; d < DV; d += VW) {
                        vf qv = vx_load(qrow + d);
                        VX_UNROLL
                        for (int jj = 0; jj < VW; jj++) acc[jj] = vx_fma(qv, vx_load(kb + jj * D + d), acc[jj]);
                    }
                    vx_transpose(acc);                 /* lane jj of acc[i]: part i of key jj's sum */
                    VX_UNROLL
                    for (int i = 1; i < VW; i += 2) acc[i - 1] = vx_add(acc[i - 1], acc[i]);   /* a tree: short chains */
                    VX_UNROLL
                    for (int i = 2; i < VW; i += 4) acc[i - 2] = vx_add(acc[i - 2], acc[i]);
                    VX_UNROLL
                    for (int i = 4; i < VW; i += 8) acc[i - 4] = vx_add(acc[i - 4], acc[i]);
                    VX_UNROLL
                    for (int i = 8; i < VW; i += 16) acc[i - 8] = vx_add(acc[i - 8], acc[i]);
                    vf sv = acc[0];
                    if (DV < D) {                      /* d not a multiple of VW */
                        float t[VW];
                        vx_store(t, sv);
                        for (int jj = 0; jj < VW; jj++)
                            for (int d = DV; d < D; d++) t[jj] += qrow[d] * kb[jj * D + d];
                        sv = vx_load(t);
                    }
                    sv = vx_mul(sv, vx_set1(a->scale));
                    if (!all) sv = vx_mask_range(sv, vx_load(kp + sb * VW), vx_set1(qrel[r] - (float)W), vx_set1(qrel[r]));
                    s[sb] = sv;
                }
                /* one online-softmax update per super-block */
                vf smax = s[0];
                for (int sb = 1; sb < NSUB; sb++) smax = vx_max(smax, s[sb]);
                float mb = vx_hmax(smax), mnew = *m > mb ? *m : mb;
                float msafe = mnew == -INFINITY ? 0.0f : mnew;   /* a row that saw nothing yet stays at 0 */
                vf corr = vx_exp(vx_set1(*m - msafe));           /* not expf: a call would spill every register */
                float pj[VX_ATT_SB_MAX];
                vf psum = vx_zero();
                for (int sb = 0; sb < NSUB; sb++) {
                    vf p = vx_exp(vx_sub(s[sb], vx_set1(msafe)));
                    psum = vx_add(psum, p);
                    vx_store(pj + sb * VW, p);
                }
                *l = *l * vx_hmax(corr) + vx_hsum(psum);
                *m = mnew;
                if (DC) {                              /* output row in registers, one broadcast per key */
                    vf ov[DC / VW > 0 ? DC / VW : 1];
                    VX_UNROLL
                    for (int i = 0; i < DC / VW; i++) ov[i] = vx_mul(vx_load(orow + i * VW), corr);
                    for (int jj = 0; jj < SB; jj++) {
                        vf pv = vx_set1(pj[jj]);
                        VX_UNROLL
                        for (int i = 0; i < DC / VW; i++) ov[i] = vx_fma(pv, vx_load(vbuf + jj * D + i * VW), ov[i]);
                    }
                    VX_UNROLL
                    for (int i = 0; i < DC / VW; i++) vx_store(orow + i * VW, ov[i]);
                } else {
                    for (int d = 0; d < DV; d += VW) {
                        vf ov = vx_mul(vx_load(orow + d), corr);
                        for (int jj = 0; jj < SB; jj++) ov = vx_fma(vx_set1(pj[jj]), vx_load(vbuf + jj * D + d), ov);
                        vx_store(orow + d, ov);
                    }
                    for (int d = DV; d < D; d++) {
                        float t = orow[d] * vx_hmax(corr);
                        for (int jj = 0; jj < SB; jj++) t += pj[jj] * vbuf[jj * D + d];
                        orow[d] = t;
                    }
                }
            }
        }
    }
}

VX_FN static void VX_NAME(attention_keys)(const vx_attention_args *a, int64_t j0, int64_t j1, int nrows, float *state,
                                          float *scratch) {   /* scratch: VW K and VW V rows */
    if (a->d == 128)
        attention_keys_d(a, j0, j1, nrows, state, scratch, 128);
    else if (a->d == 64)
        attention_keys_d(a, j0, j1, nrows, state, scratch, 64);
    else
        attention_keys_d(a, j0, j1, nrows, state, scratch, 0);
}

VX_FN static void VX_NAME(attention_rows)(const vx_attention_args *a, int hk, int64_t row0, float *scratch) {
    attention_block(a, hk, row0, scratch);
}
