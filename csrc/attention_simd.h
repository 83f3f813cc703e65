/* Inner loops of vx_attention, written once against simd.h and instantiated per ISA level.
 *
 * A "row" is a (query, query head of the group) pair of one kv head, so the hq / hkv query heads sharing a
 * kv head share every key and value load (GQA). Two loops, by the number of rows per kv head:
 *   attention_block  (prefill, encoder: more than VW rows per kv head) vectors run across rows;
 *   attention_keys   (decode, streaming: at most VW rows per kv head) vectors run along d.
 * Both keep an online softmax (running max m, running sum l, rescaling by exp(m_old - m_new)) in float32,
 * take keys in blocks, and mask by comparing positions relative to the block's smallest query position:
 * small exact integers in float32 (the Python wrapper keeps them below 2^23). */

/* Key j of kv head hk: its K and V rows (an int8 cache's widened into conv[2 * d] first: K as its codes,
 * whose scale multiplies the scores, V dequantised), the key's scale (1 for float32 keys) and its position
 * relative to qmin, clamped to [-window - 1, span + 1] (which keeps every visibility test unchanged). Keys
 * at or past j_hi pad the block: a zero row that no query sees. `any` / `all` track whether some / every
 * query of the block sees the key. */
static inline void attention_key(const vx_attention_args *a, int hk, int64_t j, int64_t j_hi, int64_t qmin, int64_t qmax,
                                 int64_t span, const float *zero_row, float *conv, const float **kr, const float **vr,
                                 float *ks, float *kp, int *any, int *all) {
    const int64_t W = a->window;
    *ks = 1.0f;
    if (j >= j_hi) {
        *kr = *vr = zero_row, *kp = (float)(-W - 1), *all = 0;
        return;
    }
    int64_t p = a->k_pos[j], rel = p - qmin;
    *any |= p > qmin - W && p <= qmax;
    *all &= p > qmax - W && p <= qmin;
    *kp = (float)(rel < -W - 1 ? -W - 1 : rel > span + 1 ? span + 1 : rel);
    const int64_t n = a->d;
    if (a->kvtype == VX_KV_INT8) {
        const int64_t at = vx_kv8_row(j, hk, a->hkv, a->d);
        const int8_t *kc = (const int8_t *)a->k + at, *vc = (const int8_t *)a->v + at;
        const float vs = a->vs[j * a->hkv + hk];
        for (int64_t i = 0; i < n; i++) conv[i] = (float)kc[i], conv[n + i] = (float)vc[i] * vs;
        *kr = conv, *vr = conv + n, *ks = a->ks[j * a->hkv + hk];
    } else {
        const int64_t at = (j * a->hkv + hk) * a->d;
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
    float qrel[ATT_RV * VW], qkr[ATT_RV * VW];   /* qkr: a row's score factor (int8 cache: its codes' scale) */
    const int q8 = a->kvtype == VX_KV_INT8;
    for (int r = 0; r < R; r++) {
        int64_t i = (row0 + r) / g, h = (int64_t)hk * g + (row0 + r) % g;
        const float *qrow = a->q + (i * a->hq + h) * D;
        const int8_t *qcode = q8 ? a->qc + (i * a->hq + h) * D : NULL;
        for (int d = 0; d < D; d++) qt[d * R + r] = r < nr ? (q8 ? (float)qcode[d] : qrow[d]) : 0.0f, ot[d * R + r] = 0.0f;
        qrel[r] = r < nr ? (float)(a->q_pos[i] - qmin) : -3.0e7f;   /* padding rows see no key */
        qkr[r] = r < nr && q8 ? a->qk[i * a->hq + h] : a->scale;
    }
    for (int d = 0; d < D; d++) zero_row[d] = 0.0f;
    vf qhi[ATT_RV], qlo[ATT_RV], m[ATT_RV], l[ATT_RV], qk[ATT_RV];
    for (int v = 0; v < ATT_RV; v++) {
        qk[v] = vx_load(qkr + v * VW);
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
        float kp[ATT_BK], ks[ATT_BK];
        int any = 0, all = 1;
        for (int jj = 0; jj < ATT_BK; jj++)
            attention_key(a, hk, j0 + jj, j_hi, qmin, qmax, span, zero_row, conv + 2 * jj * D, &kr[jj], &vr[jj], &ks[jj],
                          &kp[jj], &any, &all);
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
                s[jj][v] = vx_mul(vx_mul(s[jj][v], qk[v]), vx_set1(ks[jj]));   /* ks 1: exact */
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
 * Vectors across rows would leave most lanes idle, so here they run along d (scores: a row's VW partial
 * dot products for VW keys are transposed and summed into one vector of VW scores, no per-key horizontal
 * sums) and along d for the outputs (4 rows at a time, so each value vector serves the GQA group).
 * The work is split by keys, not heads: each call takes a range of keys for every kv head, so the cache
 * is swept in memory order (a key's heads are contiguous; one head's keys are hkv * d apart, a stride that
 * defeats the hardware prefetchers and the TLB), and leaves a partial (m, l, o) per row that the driver
 * merges across key ranges (as flash-decoding does). Keys come in super-blocks (vx_att_sb). A float32
 * cache's K and V rows are copied per kv head into kbuf / vbuf: in the cache they are hkv * d apart, 1-4 KB,
 * so they would fall in the same L1 sets and each row's pass would refetch them. An int8 cache is stored
 * in blocks of 32 keys, head-major (vx_kv8_row), so a super-block's rows of one head are contiguous and
 * read in place: its K codes feed the integer scores (attention_idots, or widened into kbuf), its V codes
 * pv_rows. An int8 cache read from memory (kv_touch): the first super-block of a thread's first range is
 * loaded in one burst of loads, one per line in memory order, whose misses overlap each other; while it
 * computes a super-block it prefetches the next one (past its range's last, the first of the next range it
 * has claimed, attention.c), a line of K and one of V per value step of pv_rows, so the reads run under the
 * arithmetic. The decoder's super-block is its whole range: its 26 calls over 8192 keys (2 threads, two
 * alternated sweeps) 17.6-20.1 -> 16.6-16.7 ms, 18.4 -> 17.3-17.9 against bursting every range (issued 512
 * at a time per kv head, the prefetches stalled the arithmetic: 27-43 ms). An encoder step's 750 keys are 3
 * ranges per thread of 2 super-blocks each: prefetching the whole next range (512 KB, half a core's L2)
 * made its 32 calls 6.4-6.9 -> 8.3-8.6 ms; bursting each super-block, as they did, against prefetching the
 * next one (bench_kernels.attention_step, three alternated runs): encoder 6.52-6.64 -> 5.78-6.01 ms,
 * decoder 16.3-18.0 -> 15.5-16.0 (the same prefetches there; not explained). The online softmax updates once
 * per super-block.
 * state: m [hkv][nrows], l [hkv][nrows], o [hkv][nrows][d]. DC is d when it is a compile-time 64 or 128
 * (the model's head sizes), else 0; Q8 is 1 for an int8 cache. */

/* A super-block's key positions relative to qmin, shared by every head: keys [lo, hi) of it are in the
 * call's range, the others pad it (a position no query sees); -> whether some query sees a key (any) and
 * every query every key (all). */
static inline void keys_visible(const vx_attention_args *a, int64_t jb, int lo, int hi, int SB, int64_t qmin,
                                int64_t qmax, float *kp, int *any, int *all) {
    const int64_t W = a->window, span = qmax - qmin;
    *any = 0, *all = lo == 0 && hi == SB;
    for (int jj = 0; jj < SB; jj++) {
        if (jj < lo || jj >= hi) {
            kp[jj] = (float)(-W - 1);
            continue;
        }
        const int64_t p = a->k_pos[jb + jj], rel = p - qmin;
        *any |= p > qmin - W && p <= qmax;
        *all &= p > qmax - W && p <= qmin;
        kp[jj] = (float)(rel < -W - 1 ? -W - 1 : rel > span + 1 ? span + 1 : rel);
    }
}

/* Scores of one row with VW consecutive keys kb[VW][D] (float32): VW independent FMA chains along d, then
 * transposed (lane jj of acc[i]: part i of key jj's sum) and summed as a tree (short chains). */
VX_INLINE vf key_dots(const float *qrow, const float *kb, int D) {
    const int DV = D / VW * VW;
    vf acc[VW];
    VX_UNROLL
    for (int jj = 0; jj < VW; jj++) acc[jj] = vx_zero();
    for (int d = 0; d < DV; d += VW) {
        vf qv = vx_load(qrow + d);
        VX_UNROLL
        for (int jj = 0; jj < VW; jj++) acc[jj] = vx_fma(qv, vx_load(kb + jj * D + d), acc[jj]);
    }
    vx_transpose(acc);
    VX_UNROLL
    for (int i = 1; i < VW; i += 2) acc[i - 1] = vx_add(acc[i - 1], acc[i]);
    VX_UNROLL
    for (int i = 2; i < VW; i += 4) acc[i - 2] = vx_add(acc[i - 2], acc[i]);
    VX_UNROLL
    for (int i = 4; i < VW; i += 8) acc[i - 4] = vx_add(acc[i - 4], acc[i]);
    VX_UNROLL
    for (int i = 8; i < VW; i += 16) acc[i - 8] = vx_add(acc[i - 8], acc[i]);
    if (DV == D) return acc[0];
    float t[VW];                                       /* d not a multiple of VW */
    vx_store(t, acc[0]);
    for (int jj = 0; jj < VW; jj++)
        for (int d = DV; d < D; d++) t[jj] += qrow[d] * kb[jj * D + d];
    return vx_load(t);
}

/* One online-softmax update of a row with a super-block's scores s[nsub] (masked ones -inf): running max m
 * and sum l; the probabilities e^(s - m) into p[nsub VW], times vsc[nsub VW] if given (an int8 cache's
 * value scales); -> the factor e^(m_old - m_new) that rescales the row's output so far. */
VX_INLINE float softmax_update(const vf *s, int nsub, float *m, float *l, const float *vsc, float *p) {
    vf smax = vx_set1(-INFINITY);
    for (int sb = 0; sb < nsub; sb++) smax = vx_max(smax, s[sb]);
    float mb = vx_hmax(smax), mnew = *m > mb ? *m : mb;
    float msafe = mnew == -INFINITY ? 0.0f : mnew;   /* a row that saw nothing yet stays at 0 */
    float corr = vx_hmax(vx_exp(vx_set1(*m - msafe)));   /* not expf: a call would spill every register */
    vf psum = vx_zero();
    for (int sb = 0; sb < nsub; sb++) {
        vf e = vx_exp(vx_sub(s[sb], vx_set1(msafe)));
        psum = vx_add(psum, e);
        vx_store(p + sb * VW, vsc ? vx_mul(e, vx_load(vsc + sb * VW)) : e);
    }
    *l = *l * corr + vx_hsum(psum);
    *m = mnew;
    return corr;
}

/* lines of a cache's K and V codes to prefetch while computing, `per` lines a step: bytes [at, end) in runs
 * of `span` (one block's rows of the task's heads; `skip` bytes from one run's end to the next's start) */
typedef struct {
    const char *k, *v;
    int64_t at, end, per, run_end, span, skip;
} kv_prefetch;

VX_INLINE void prefetch_step(kv_prefetch *pf) {
    for (int64_t i = 0; i < pf->per && pf->at < pf->end; i++) {
        __builtin_prefetch(pf->k + pf->at, 0, 2), __builtin_prefetch(pf->v + pf->at, 0, 2);
        if ((pf->at += 64) >= pf->run_end) pf->at = pf->run_end + pf->skip, pf->run_end = pf->at + pf->span;
    }
}

/* point pf at keys [n0, n1) of kv heads [h0, h1) (their rows in each block), spread over `steps` steps */
VX_INLINE void prefetch_keys(kv_prefetch *pf, int64_t n0, int64_t n1, int h0, int h1, int D, int64_t blk, int64_t steps) {
    const int64_t rows = (int64_t)VX_KV8_BLOCK * D, blocks = (n1 - 1) / VX_KV8_BLOCK + 1 - n0 / VX_KV8_BLOCK;
    const int64_t span = (h1 - h0) * rows;
    pf->at = n0 / VX_KV8_BLOCK * blk + h0 * rows, pf->end = pf->at + (blocks - 1) * blk + span;
    pf->span = span == blk ? blocks * blk : span, pf->skip = blk - span, pf->run_end = pf->at + pf->span;
    pf->per = (blocks * ((span + 63) / 64) + steps - 1) / steps;
}

/* NR (<= 4) rows' outputs over a super-block's nk value rows vrow[j] (D float32, or int8 codes if Q8):
 * o = o * corr + p V, with p [NR][SB] (an int8 cache's value scales folded in). PV_NV vectors of d at a
 * time, so each value vector, widened once, serves every row and the loads stay below the FMAs; each value
 * step also issues `pf`'s next prefetches. 4 x PV_NV accumulators: 16 of AVX-512's 32 registers; AVX2 has
 * 16 in all, and 4 x 4 there left none for the values (Zen 3, 2 threads, 26 decoder calls over 8192 int8
 * keys, three alternated runs, with avx2's integer scores landing at the same time: 81-112 -> 70-78 ms; 32
 * encoder calls over 750: 22-26 -> 20-22). Each output
 * element still sums its keys in order, so the blocking moves no result. */
#define PV_NV (VW == 8 ? 2 : 4)
VX_INLINE void pv_rows(const void *const *vrow, int nk, int D, const float *p, int SB, const float *corr, float *o,
                       const int NR, const int Q8, kv_prefetch *pf) {
    const int DB = PV_NV * VW;
    int d0 = 0;
    for (; d0 + DB <= D; d0 += DB) {
        vf acc[4][PV_NV];
        VX_UNROLL
        for (int r = 0; r < NR; r++) {
            VX_UNROLL
            for (int i = 0; i < PV_NV; i++) acc[r][i] = vx_mul(vx_load(o + r * D + d0 + i * VW), vx_set1(corr[r]));
        }
        for (int jj = 0; jj < nk; jj++) {
            prefetch_step(pf);
            vf v[PV_NV];
            VX_UNROLL
            for (int i = 0; i < PV_NV; i++)
                v[i] = Q8 ? vx_load_i8((const int8_t *)vrow[jj] + d0 + i * VW) : vx_load((const float *)vrow[jj] + d0 + i * VW);
            VX_UNROLL
            for (int r = 0; r < NR; r++) {
                vf pb = vx_set1(p[r * SB + jj]);
                VX_UNROLL
                for (int i = 0; i < PV_NV; i++) acc[r][i] = vx_fma(pb, v[i], acc[r][i]);
            }
        }
        VX_UNROLL
        for (int r = 0; r < NR; r++) {
            VX_UNROLL
            for (int i = 0; i < PV_NV; i++) vx_store(o + r * D + d0 + i * VW, acc[r][i]);
        }
    }
    for (int r = 0; r < NR; r++)                     /* d not a multiple of PV_NV VW */
        for (int d = d0; d < D; d++) {
            float t = o[r * D + d] * corr[r];
            for (int jj = 0; jj < nk; jj++)
                t += p[r * SB + jj] * (Q8 ? (float)((const int8_t *)vrow[jj])[d] : ((const float *)vrow[jj])[d]);
            o[r * D + d] = t;
        }
}

/* scratch: kbuf [SB][d] float32, p [VW][SB], kscale and vscale [hkv][SB] float32, then vbuf [SB][d]
 * (float32, or int8 if Q8) */
VX_INLINE void attention_keys_d(const vx_attention_args *a, vx_key_task task, int nrows, float *state,
                                float *scratch, int burst, vx_key_task next, const int DC, const int Q8) {
    const int D = DC ? DC : a->d, H = a->hkv, g = a->hq / a->hkv, h0 = task.h0, h1 = task.h1;
    const int64_t j0 = task.j0, j1 = task.j1;
    const int SB = vx_att_sb(D, H, a->kvtype);
    const int64_t W = a->window, row = (int64_t)H * D;
    float *ms = state, *ls = state + H * nrows, *os = state + 2 * H * nrows;
    float *kbuf = scratch, *pj = kbuf + (size_t)SB * D;
    float *ksc_all = pj + (size_t)VW * SB, *vsc_all = ksc_all + (size_t)H * SB;   /* Q8: [head][key] */
    float *qf = vsc_all + (size_t)H * SB;          /* Q8: a head's query codes as floats [nrows][D] */
    int32_t *isc = (int32_t *)(qf + (size_t)VW * D);   /* Q8 with a->idots: integer scores [nrows][SB] */
    char *vbuf = (char *)(isc + (size_t)VW * SB);
    const int idots = Q8 && a->idots;
    const int8_t *zrow = (const int8_t *)vbuf;     /* Q8: vbuf's first row, zeros */
    if (Q8) memset(vbuf, 0, D);
    float qrel[VW] = {0}, corr[VW];
    int64_t qmin = INT64_MAX, qmax = INT64_MIN;
    for (int r = 0; r < nrows; r++) {
        int64_t p = a->q_pos[r / g];
        qmin = p < qmin ? p : qmin;
        qmax = p > qmax ? p : qmax;
    }
    for (int r = 0; r < nrows; r++) qrel[r] = (float)(a->q_pos[r / g] - qmin);
    kv_prefetch pf = {(const char *)a->k, (const char *)a->v, 0, 0, 0, 0, 0, 0};
    const int64_t blk = (int64_t)H * VX_KV8_BLOCK * D;                 /* bytes of a block of keys, every head */
    const int64_t steps = (int64_t)(h1 - h0) * SB * (D / (PV_NV * VW) > 0 ? D / (PV_NV * VW) : 1) * ((nrows + 3) / 4);
    const int64_t jfirst = j0 / SB * SB;                                /* the range's first super-block */
    for (int i = h0 * nrows; i < h1 * nrows; i++) ms[i] = -INFINITY, ls[i] = 0.0f;   /* its heads' state only */
    for (int64_t i = (int64_t)h0 * nrows * D; i < (int64_t)h1 * nrows * D; i++) os[i] = 0.0f;
    for (int64_t jb = jfirst; jb < j1; jb += SB) {   /* super-blocks at multiples of SB (see by_keys) */
        const int lo = (int)(j0 > jb ? j0 - jb : 0), nk = (int)(j1 - jb < SB ? j1 - jb : SB);
        /* the vectors of scores holding keys [0, nk): past them a super-block is padding, whose masked scores
         * would add exact zeros to the softmax's sums and nothing to its maximum */
        const int nsub = (nk + VW - 1) / VW;
        float kp[VX_ATT_SB_MAX];
        int any, all;
        keys_visible(a, jb, lo, nk, SB, qmin, qmax, kp, &any, &all);
        if (!any) continue;
        if (!Q8) {   /* a float32 cache: the next super-block, every head, one contiguous run of K and one of V, into
                      * L2 while this one is computed (an int8 cache's burst below reads faster without it: an encoder
                      * call 0.22 -> 0.20 ms) */
            const int64_t keys = jb + SB < j1 ? (j1 - jb - SB < SB ? j1 - jb - SB : SB) : 0;
            const char *kn = (const char *)((const float *)a->k + (jb + SB) * row), *vn = (const char *)((const float *)a->v + (jb + SB) * row);
            for (size_t o = 0; o < (size_t)(keys * row) * sizeof(float); o += 64) __builtin_prefetch(kn + o, 0, 1), __builtin_prefetch(vn + o, 0, 1);
        }
        if (Q8 && a->kv_touch) {   /* the next super-block's keys (past the task's: the next task's first) */
            const int within = jb + SB < j1;
            const int64_t n0 = within ? jb + SB : next.j0;
            const int64_t n1 = within ? (jb + 2 * SB < j1 ? jb + 2 * SB : j1) : (n0 / SB * SB + SB < next.j1 ? n0 / SB * SB + SB : next.j1);
            pf.at = pf.end = 0;
            if (n0 < n1) {
                prefetch_keys(&pf, n0, n1, within ? h0 : next.h0, within ? h1 : next.h1, D, blk, steps);
                const char *ks = (const char *)(a->ks + n0 * H), *vs = (const char *)(a->vs + n0 * H);
                for (int64_t o = 0; o < (int64_t)sizeof(float) * (n1 - n0) * H; o += 64)
                    __builtin_prefetch(ks + o, 0, 2), __builtin_prefetch(vs + o, 0, 2);
            }
        }
        /* Q8: the super-block's scales by head (one pass over the [key][head] rows, not a gather per head at
         * hkv floats' stride), and its keys' offsets in their blocks, the same for every head (vx_kv8_row) */
        size_t koff[VX_ATT_SB_MAX];
        if (Q8) {
            const float *ksb = a->ks + jb * H, *vsb = a->vs + jb * H;
            const size_t blk = (size_t)H * VX_KV8_BLOCK * D;
            const unsigned r0 = (unsigned)(jb % VX_KV8_BLOCK);
            if (lo == 0 && nk == SB && h0 % VW == 0 && h1 % VW == 0) {   /* whole VW x VW tiles, transposed */
                for (int j = 0; j < SB; j += VW)
                    for (int hb = h0; hb < h1; hb += VW)
                        for (int t = 0; t < 2; t++) {
                            const float *src = (t ? vsb : ksb) + (size_t)j * H + hb;
                            float *dst = (t ? vsc_all : ksc_all) + (size_t)hb * SB + j;
                            vf tile[VW];
                            for (int i = 0; i < VW; i++) tile[i] = vx_load(src + (size_t)i * H);   /* key j + i */
                            vx_transpose(tile);
                            for (int i = 0; i < VW; i++) vx_store(dst + (size_t)i * SB, tile[i]);    /* head hb + i */
                        }
            } else {
                for (int jj = 0; jj < SB; jj++) {
                    const int in = jj >= lo && jj < nk;
                    for (int hk = h0; hk < h1; hk++) {
                        ksc_all[hk * SB + jj] = in ? ksb[(size_t)jj * H + hk] : 0.0f;
                        vsc_all[hk * SB + jj] = in ? vsb[(size_t)jj * H + hk] : 0.0f;
                    }
                }
            }
            for (int jj = 0; jj < SB; jj++) {
                const unsigned r = r0 + (unsigned)jj;
                koff[jj] = (r / VX_KV8_BLOCK) * blk + (r % VX_KV8_BLOCK) * (size_t)D;
            }
        }
        if (Q8 && a->kv_touch && burst && jb == jfirst) {   /* keys [jb + lo, jb + nk) of its heads, K and V: one load per line */
            const int64_t rows = (int64_t)VX_KV8_BLOCK * D;
            const char *kb = (const char *)a->k, *vb = (const char *)a->v;
            uint64_t t = 0;
            for (int64_t b = (jb + lo) / VX_KV8_BLOCK; b <= (jb + nk - 1) / VX_KV8_BLOCK; b++)
                for (int64_t o = b * blk + h0 * rows; o < b * blk + h1 * rows; o += 64) {
                    uint64_t x, y;
                    memcpy(&x, kb + o, 8), memcpy(&y, vb + o, 8);
                    t ^= x ^ y;
                }
            __asm__ volatile("" : : "r"(t));    /* keeps the loads */
        }
        for (int hk = h0; hk < h1; hk++) {
            /* The super-block's K and V rows of head hk (an int8 cache's in place, a float32 one's copied into
             * kbuf / vbuf). Keys outside [lo, nk) pad: zero rows, masked, and p * 0. */
            const void *krow[VX_ATT_SB_MAX], *vrow[VX_ATT_SB_MAX];
            const float *ksc = ksc_all + (size_t)hk * SB, *vsc = vsc_all + (size_t)hk * SB;
            if (Q8) {
                /* head hk's rows of keys jb + [lo, nk): koff from row 0 of head hk in block jb / 32 */
                const size_t at = (size_t)(jb / VX_KV8_BLOCK * H + hk) * VX_KV8_BLOCK * D;
                const int8_t *kh = (const int8_t *)a->k + at, *vh = (const int8_t *)a->v + at;
                for (int jj = 0; jj < SB; jj++) {
                    const int in = jj >= lo && jj < nk;
                    krow[jj] = in ? kh + koff[jj] : zrow, vrow[jj] = in ? vh + koff[jj] : zrow;
                }
                if (!idots)
                    for (int jj = 0; jj < nsub * VW; jj++) {
                        const int8_t *kc = krow[jj];
                        int d = 0;
                        for (; d + VW <= D; d += VW) vx_store(kbuf + jj * D + d, vx_load_i8(kc + d));
                        for (; d < D; d++) kbuf[jj * D + d] = (float)kc[d];
                    }
            } else {   /* a float32 cache: head hk's rows copied out, hkv * d apart in it */
                const int64_t at = (jb * H + hk) * D;
                for (int jj = 0; jj < SB; jj++) {
                    const int in = jj >= lo && jj < nk;
                    if (in) memcpy(kbuf + jj * D, (const float *)a->k + at + jj * row, sizeof(float) * D);
                    else for (int d = 0; d < D; d++) kbuf[jj * D + d] = 0.0f;
                    if (in) memcpy(vbuf + jj * D * sizeof(float), (const float *)a->v + at + jj * row, sizeof(float) * D);
                    else if (jj < lo) memset(vbuf + jj * D * sizeof(float), 0, sizeof(float) * D);
                    vrow[jj] = vbuf + jj * D * sizeof(float);
                }
            }
            /* int8 caches: a score is the exact integer q . k (float32 sums of these small integers stay
             * below 2^24, exact in any order, so every path and level gets the same), times its row's factor */
            int64_t qrow_at[VW];                       /* row r: query r / g, head hk * g + r % g, of [tq, hq] */
            const int8_t *qrows[VW];
            int32_t qsum[VW];
            for (int r = 0; r < nrows; r++) {
                qrow_at[r] = (int64_t)(r / g) * a->hq + hk * g + r % g;
                if (Q8) qrows[r] = a->qc + qrow_at[r] * D, qsum[r] = a->qsum[qrow_at[r]];
            }
            if (idots)
                a->idots((const int8_t *const *)krow, nsub * VW, D, qrows, qsum, nrows, isc);   /* isc [nrows][nsub VW] */
            else if (Q8)
                for (int r = 0; r < nrows; r++)
                    for (int d = 0; d < D; d++) qf[r * D + d] = (float)qrows[r][d];
            for (int r = 0; r < nrows; r++) {
                const int64_t qi = qrow_at[r];
                const float *qrow = Q8 ? qf + r * D : a->q + qi * D;
                const vf qk = vx_set1(Q8 ? a->qk[qi] : a->scale);
                vf s[VX_ATT_SB_MAX / VW];
                for (int sb = 0; sb < nsub; sb++) {
                    vf dot = idots ? vx_load_i32(isc + (r * nsub + sb) * VW) : key_dots(qrow, kbuf + (size_t)sb * VW * D, D);
                    vf sv = vx_mul(dot, qk);
                    if (Q8) sv = vx_mul(sv, vx_load(ksc + sb * VW));
                    if (!all) sv = vx_mask_range(sv, vx_load(kp + sb * VW), vx_set1(qrel[r] - (float)W), vx_set1(qrel[r]));
                    s[sb] = sv;
                }
                corr[r] = softmax_update(s, nsub, ms + hk * nrows + r, ls + hk * nrows + r, Q8 ? vsc : NULL, pj + r * SB);
            }
            for (int r = 0; r < nrows; r += 4) {
                const int nr = nrows - r < 4 ? nrows - r : 4;
                float *o = os + ((int64_t)hk * nrows + r) * D;
                if (nr == 4) pv_rows(vrow, nk, D, pj + r * SB, SB, corr + r, o, 4, Q8, &pf);
                else if (nr == 3) pv_rows(vrow, nk, D, pj + r * SB, SB, corr + r, o, 3, Q8, &pf);
                else if (nr == 2) pv_rows(vrow, nk, D, pj + r * SB, SB, corr + r, o, 2, Q8, &pf);
                else pv_rows(vrow, nk, D, pj + r * SB, SB, corr + r, o, 1, Q8, &pf);
            }
        }
    }
}

VX_FN static void VX_NAME(attention_keys)(const vx_attention_args *a, vx_key_task task, int nrows, float *state,
                                          float *scratch, int burst, vx_key_task next) {   /* scratch: see attention_keys_d */
    const int q8 = a->kvtype == VX_KV_INT8;
#define VX_KEYS(dc, q) attention_keys_d(a, task, nrows, state, scratch, burst, next, dc, q)
    if (a->d == 128)
        q8 ? VX_KEYS(128, 1) : VX_KEYS(128, 0);
    else if (a->d == 64)
        q8 ? VX_KEYS(64, 1) : VX_KEYS(64, 0);
    else
        q8 ? VX_KEYS(0, 1) : VX_KEYS(0, 0);
#undef VX_KEYS
}

VX_FN static void VX_NAME(attention_rows)(const vx_attention_args *a, int hk, int64_t row0, float *scratch) {
    attention_block(a, hk, row0, scratch);
}

#if VX_LEVEL == VX_LEVEL_AVX512 || VX_LEVEL == VX_LEVEL_AVX2
/* vx_isa.attention_idots (attention_idots.h): with AVX512-VNNI at the avx512bf16 level; with AVX-VNNI
 * (avxvnni level) and with AVX2's VPMADDUBSW (avx2 level), 256-bit */
#if VX_LEVEL == VX_LEVEL_AVX512
typedef __m512i vi;
#define vi_zero _mm512_setzero_si512
#define vi_of_vf _mm512_castps_si512
#define vi_xor _mm512_xor_si512
#define vi_set1_8 _mm512_set1_epi8
#define vi_set1_32 _mm512_set1_epi32
#define vi_dot_q vx_dpbusd_bcst
#define vi_sub _mm512_sub_epi32
#define vi_store(p, v) _mm512_storeu_si512(p, v)
#define ID_VNNI 1
#define ID_NAME attention_idots_vnni
#define ID_TARGET "avx512f,avx512bw,avx512vnni,avx2,fma"
#include "attention_idots.h"
#else
typedef __m256i vi;
#define vi_zero _mm256_setzero_si256
#define vi_of_vf _mm256_castps_si256
#define vi_xor _mm256_xor_si256
#define vi_set1_8 _mm256_set1_epi8
#define vi_set1_32 _mm256_set1_epi32
#define vi_dot_q vi_dot_q_avxvnni
static inline __attribute__((always_inline, target("avx2,fma,avxvnni"))) __m256i
vi_dot_q_avxvnni(__m256i acc, __m256i k, const int8_t *p) {
    int32_t q4;
    memcpy(&q4, p, 4);
    return _mm256_dpbusd_avx_epi32(acc, k, _mm256_set1_epi32(q4));   /* AVX-VNNI (VEX) has no embedded broadcast */
}
#define vi_sub _mm256_sub_epi32
#define vi_store(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define ID_VNNI 1
#define ID_NAME attention_idots_avxvnni
#define ID_TARGET "avx2,fma,avxvnni"
#include "attention_idots.h"
#undef ID_VNNI
#undef ID_NAME
#undef ID_TARGET
#define ID_VNNI 0
#define ID_NAME attention_idots_avx2
#define ID_TARGET "avx2,fma"
#include "attention_idots.h"
#endif
#endif
