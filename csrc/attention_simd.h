/* Inner loop of vx_attention, written once against simd.h and instantiated per ISA level.
 *
 * One call handles a block of R = RV * VW "rows" of one kv head, a row being a (query, query head of the
 * group) pair, so the hq / hkv query heads sharing a kv head share every key and value load (GQA). The
 * vectors run across rows, not across d: the query block is transposed once into qt[d][R] and the
 * output accumulated in ot[d][R], so each key row K[j, :] (contiguous in the cache) is used through
 * scalar broadcasts, scores come out one vector per key with no horizontal sums, and the online softmax
 * (running max m, running sum l, rescaling by exp(m_old - m_new)) is vector arithmetic across rows.
 * Keys go in blocks of BK; masking compares positions relative to the block's smallest query position,
 * small exact integers in float32. */

#define ATT_BK (VW == 8 ? 4 : 8)
#define ATT_RV_MAX 2   /* row vectors per block: 1 when a block has at most VW rows (decode), else 2 */

VX_INLINE void attention_block(const vx_attention_args *a, int hk, int64_t row0, float *scratch, const int RV) {
    const int R = RV * VW;
    const int D = a->d, g = a->hq / a->hkv;
    const int64_t nrows = a->tq * g, W = a->window;
    float *qt = scratch, *ot = scratch + (size_t)D * R, *zero_row = scratch + (size_t)2 * D * R;
    int nr = (int)(nrows - row0 < R ? nrows - row0 : R);

    /* the rows: their query vectors (transposed), positions, and output slots */
    int64_t qmin = INT64_MAX, qmax = INT64_MIN;
    for (int r = 0; r < nr; r++) {
        int64_t p = a->q_pos[(row0 + r) / g];
        qmin = p < qmin ? p : qmin;
        qmax = p > qmax ? p : qmax;
    }
    float qrel[ATT_RV_MAX * VW];
    for (int r = 0; r < R; r++) {
        int64_t i = (row0 + r) / g, h = (int64_t)hk * g + (row0 + r) % g;
        const float *qrow = a->q + (i * a->hq + h) * D;
        for (int d = 0; d < D; d++) qt[d * R + r] = r < nr ? qrow[d] : 0.0f, ot[d * R + r] = 0.0f;
        qrel[r] = r < nr ? (float)(a->q_pos[i] - qmin) : -3.0e7f;   /* padding rows see no key */
    }
    for (int d = 0; d < D; d++) zero_row[d] = 0.0f;
    vf qhi[ATT_RV_MAX], qlo[ATT_RV_MAX], m[ATT_RV_MAX], l[ATT_RV_MAX];
    for (int v = 0; v < RV; v++) {
        qhi[v] = vx_load(qrel + v * VW);
        qlo[v] = vx_sub(qhi[v], vx_set1((float)W));
        m[v] = vx_set1(-INFINITY);
        l[v] = vx_zero();
    }

    /* the keys any row can see: with sorted positions a binary search bounds them */
    int64_t j_lo = 0, j_hi = a->tk;
    if (a->k_sorted) {
        int64_t lo = 0, hi = a->tk;
        while (lo < hi) {  /* first key with k_pos > qmin - W */
            int64_t mid = (lo + hi) / 2;
            if (a->k_pos[mid] > qmin - W) hi = mid; else lo = mid + 1;
        }
        j_lo = lo;
        hi = a->tk;
        while (lo < hi) {  /* first key with k_pos > qmax */
            int64_t mid = (lo + hi) / 2;
            if (a->k_pos[mid] > qmax) hi = mid; else lo = mid + 1;
        }
        j_hi = lo;
    }
    const int64_t span = qmax - qmin;
    for (int64_t j0 = j_lo; j0 < j_hi; j0 += ATT_BK) {
        const float *kr[ATT_BK], *vr[ATT_BK];
        float kp[ATT_BK];
        int any = 0, all = 1;
        for (int jj = 0; jj < ATT_BK; jj++) {
            int64_t j = j0 + jj;
            if (j >= j_hi) {
                kr[jj] = vr[jj] = zero_row, kp[jj] = (float)(-W - 1), all = 0;
                continue;
            }
            int64_t p = a->k_pos[j], rel = p - qmin;
            any |= p > qmin - W && p <= qmax;
            all &= p > qmax - W && p <= qmin;
            kp[jj] = (float)(rel < -W - 1 ? -W - 1 : rel > span + 1 ? span + 1 : rel);
            kr[jj] = a->k + (j * a->hkv + hk) * D;
            vr[jj] = a->v + (j * a->hkv + hk) * D;
        }
        if (!any) continue;

        vf s[ATT_BK][ATT_RV_MAX];
        for (int jj = 0; jj < ATT_BK; jj++)
            for (int v = 0; v < RV; v++) s[jj][v] = vx_zero();
        for (int d = 0; d < D; d++) {
            vf qv[ATT_RV_MAX];
            for (int v = 0; v < RV; v++) qv[v] = vx_load(qt + d * R + v * VW);
            for (int jj = 0; jj < ATT_BK; jj++) {
                vf kb = vx_set1(kr[jj][d]);
                for (int v = 0; v < RV; v++) s[jj][v] = vx_fma(kb, qv[v], s[jj][v]);
            }
        }
        vf corr[ATT_RV_MAX];
        for (int v = 0; v < RV; v++) {
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
            for (int v = 0; v < RV; v++) {
                vf o = vx_mul(vx_load(ot + d * R + v * VW), corr[v]);
                for (int jj = 0; jj < ATT_BK; jj++) o = vx_fma(vx_set1(vr[jj][d]), s[jj][v], o);
                vx_store(ot + d * R + v * VW, o);
            }
    }

    float lsum[ATT_RV_MAX * VW];
    for (int v = 0; v < RV; v++) vx_store(lsum + v * VW, l[v]);
    for (int r = 0; r < nr; r++) {
        int64_t i = (row0 + r) / g, h = (int64_t)hk * g + (row0 + r) % g;
        float *orow = a->out + (i * a->hq + h) * D;
        for (int d = 0; d < D; d++) orow[d] = ot[d * R + r] / lsum[r];   /* 0 / 0 = NaN if it saw nothing */
    }
}

VX_FN static void VX_NAME(attention_rows)(const vx_attention_args *a, int hk, int64_t row0, int rows, float *scratch) {
    if (rows <= VW)
        attention_block(a, hk, row0, scratch, 1);
    else
        attention_block(a, hk, row0, scratch, 2);
}
