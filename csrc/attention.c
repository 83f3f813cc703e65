/* vx_attention: splits the work over the threads and, for decode-like calls, merges the per-key-range
 * partial softmaxes. The loops themselves are in attention_simd.h. */
#include <math.h>
#include <stdlib.h>

#include "dispatch.h"

typedef struct {
    const vx_isa *isa;
    const vx_attention_args *a;
    int64_t ntasks, next;      /* tasks, and the next one to take (whichever thread is free) */
    int rows;                  /* by_rows: rows per task */
    int nrows;                 /* by_keys: rows per kv head */
    int groups;                /* by_keys: kv head groups per key range (a task is one group of one range) */
    int64_t j_lo, j_hi, c_lo, chunk;
    size_t per;                /* by_keys: floats of partial state per key range */
    float *state;
    int64_t *last;
} att_ctx;

static void by_rows_task(void *ctx, int tid, int nt) {
    att_ctx *c = ctx;
    const vx_attention_args *a = c->a;
    float *scratch = vx_alloc(sizeof(float) * ((size_t)2 * a->d * c->rows + a->d + VX_ATT_CONV * a->d));
    (void)tid, (void)nt;
    for (int64_t t; (t = vx_next_tasks(&c->next, 1)) < c->ntasks;)
        c->isa->attention_rows(a, (int)(t % a->hkv), (t / a->hkv) * c->rows, scratch);
    free(scratch);
}

/* Many rows per kv head (prefill, encoder): tasks are (kv head, block of 2 * VW rows). */
static void by_rows(const vx_isa *isa, const vx_attention_args *a, int64_t nrows) {
    const int rows = 2 * isa->attn_vw;
    const int64_t nblocks = (nrows + rows - 1) / rows, ntasks = nblocks * a->hkv;
    int nt = vx_threads_for((double)nrows * a->hkv * (a->tk < a->window ? a->tk : a->window) * a->d);
    if (nt > ntasks) nt = (int)ntasks;
    att_ctx c = {.isa = isa, .a = a, .ntasks = ntasks, .rows = rows};
    vx_parallel(nt, by_rows_task, &c);
}

/* by_keys' task t: group t % groups of the kv heads over key range t / groups (none past the last) */
static vx_key_task key_task(const att_ctx *c, int64_t t) {
    if (t >= c->ntasks) return (vx_key_task){0, 0, 0, 0};
    const int64_t c0 = (c->c_lo + t / c->groups) * c->chunk, g = t % c->groups, H = c->a->hkv;
    return (vx_key_task){c0 > c->j_lo ? c0 : c->j_lo, c0 + c->chunk < c->j_hi ? c0 + c->chunk : c->j_hi,
                         (int)(g * H / c->groups), (int)((g + 1) * H / c->groups)};
}

/* The merge of by_keys' ranges for kv heads tid, tid + nt, ...: per row (a query and a query head),
 *   M = max_c m_c,  out = sum_c o_c e^(m_c - M) / sum_c l_c e^(m_c - M)
 * over the ranges it saw, in the order of their keys' positions (a ring's index order wraps), so a row adds
 * the same partial sums in the same order whatever the ring's capacity (see VX_ATT_ALIGN) or the thread
 * that merges it. On the calling thread alone, after the region, it was ~3 % of a decode call (perf, one
 * thread, 8192 keys) while the other thread waited. */
static void merge_ranges(const att_ctx *c, int tid, int nt) {
    const vx_attention_args *a = c->a;
    const int H = a->hkv, D = a->d, g = a->hq / a->hkv, nrows = c->nrows;
    const int64_t tq = nrows / g, nchunks = c->ntasks / c->groups;
    const size_t per = c->per;
    const float *state = c->state;
    const int64_t *last = c->last;
    int64_t *order = vx_alloc(sizeof(int64_t) * nchunks);
    for (int64_t i = 0; i < tq; i++) {
        int64_t n = 0;
        for (int64_t k = 0; k < nchunks; k++) {
            if (last[k * tq + i] == INT64_MIN) continue;   /* saw nothing: its (m, l, o) are untouched */
            int64_t at = n++;
            for (; at > 0 && last[order[at - 1] * tq + i] > last[k * tq + i]; at--) order[at] = order[at - 1];
            order[at] = k;
        }
        for (int hk = tid; hk < H; hk += nt)
            for (int rr = 0; rr < g; rr++) {
                const int64_t r = i * g + rr;
                const size_t row = (size_t)hk * nrows + r;
                float m = -INFINITY, l = 0.0f;
                for (int64_t k = 0; k < n; k++) m = fmaxf(m, state[order[k] * per + row]);
                float *out = a->out + (i * a->hq + hk * g + rr) * D;
                for (int d = 0; d < D; d++) out[d] = 0.0f;
                for (int64_t k = 0; k < n; k++) {
                    const float *st = state + order[k] * per;
                    const float w = expf(st[row] - m);
                    l += st[(size_t)H * nrows + row] * w;
                    const float *o = st + (size_t)2 * H * nrows + row * D;
                    for (int d = 0; d < D; d++) out[d] += o[d] * w;
                }
                for (int d = 0; d < D; d++) out[d] /= l;               /* 0 / 0 = NaN if no key was visible */
            }
    }
    free(order);
}

static void by_keys_task(void *ctx, int tid, int nt) {
    att_ctx *c = ctx;
    const vx_attention_args *a = c->a;
    const int64_t tq = c->nrows / (a->hq / a->hkv);
    /* K rows [sb][d], p [VW][sb], K and V scales [2][hkv][sb], query codes [VW][d] (float32), integer scores
     * [VW][sb]; then float32 V rows [sb][d], or for an int8 cache a zero row [d] (see attention_keys_d) */
    const size_t vw = (size_t)c->isa->attn_vw, sb = (size_t)vx_att_sb(a->d, a->hkv, a->kvtype), D = (size_t)a->d;
    float *scratch = vx_alloc(sizeof(float) * (sb * D + (vw + 2 * (size_t)a->hkv) * sb + vw * D + vw * sb)
                              + (a->kvtype == VX_KV_INT8 ? D : sb * D * sizeof(float)));
    /* Thread tid's first task is task tid; the rest go to whichever thread is free, each claimed before the
     * current one is computed, so its first super-block is prefetched meanwhile (attention_keys_d). (All
     * claimed so, the thread that started first took two of an encoder call's 2 ranges of 128 keys and left
     * the other thread none.) Only a thread's first task starts with a burst. */
    for (int64_t t = tid, tn, first = 1; t < c->ntasks; t = tn, first = 0) {
        tn = nt + vx_next_tasks(&c->next, 1);
        const vx_key_task task = key_task(c, t);
        c->isa->attention_keys(a, task, c->nrows, c->state + t / c->groups * c->per, scratch, (int)first, key_task(c, tn));
        if (t % c->groups == 0)   /* the range's, once */
            for (int64_t i = 0; i < tq; i++) {
                int64_t p = INT64_MIN;
                for (int64_t j = task.j0; j < task.j1; j++)
                    if (a->k_pos[j] > a->q_pos[i] - a->window && a->k_pos[j] <= a->q_pos[i] && a->k_pos[j] > p) p = a->k_pos[j];
                c->last[t / c->groups * tq + i] = p;
            }
    }
    free(scratch);
    vx_team_barrier(nt);      /* every range's partials are in: the threads merge them, a share of the heads each */
    merge_ranges(c, tid, nt);
}

/* Few rows per kv head (decode, streaming): tasks are ranges of keys, each for every head, leaving a
 * partial (max m, sum l, unnormalised o) per row, which the same threads then merge (merge_ranges).
 * The ranges (and the kernel's super-blocks within them) sit at fixed multiples of the key index, a
 * range or super-block a row does not see leaves its (m, l, o) exactly as they were, and a row merges the
 * ranges it saw in the order of their keys' positions: so a row's result depends on its own query and the
 * keys only, not on the other rows of the call (which set the range of keys looked at), nor on the thread
 * count, nor (VX_ATT_ALIGN) on the capacity of the ring the keys sit in. */
static void by_keys(const vx_isa *isa, const vx_attention_args *a, int nrows) {
    const int H = a->hkv, D = a->d, g = a->hq / a->hkv;
    int64_t qmin = INT64_MAX, qmax = INT64_MIN, j_lo, j_hi;
    for (int64_t i = 0; i < a->tq; i++) {
        qmin = a->q_pos[i] < qmin ? a->q_pos[i] : qmin;
        qmax = a->q_pos[i] > qmax ? a->q_pos[i] : qmax;
    }
    vx_key_range(a, qmin, qmax, &j_lo, &j_hi);
    int nt = vx_threads_for((double)nrows * H * (j_hi - j_lo) * D);
    /* Fixed-size key ranges (a multiple of every VW), not one per thread: the merge order, hence the
     * rounding, then depends on the shapes only, and the thread count never changes a result. */
    const int sb = vx_att_sb(D, H, a->kvtype);
    /* Two super-blocks, at least 128 keys, at most VX_ATT_ALIGN: the encoder's ranges (2 x 64 keys) leave 3 for
     * its first steps (~290 keys), which keeps 2 threads busy; the decoder's (2 x 128) halve the partial
     * states written and merged, and the tasks claimed, against one super-block a range: its 26 calls over
     * 8192 int8 keys, 2 threads, from memory (a /tmp C program, both builds alternated 4 times on the
     * twenty-second session's Xeon) 29.6-30.2 -> 27.7-28.9 ms. */
    const int64_t chunk = 2 * sb < 128 ? 128 : 2 * sb > VX_ATT_ALIGN ? VX_ATT_ALIGN : 2 * sb;
    const int64_t c_lo = j_lo / chunk, nchunks = j_hi > j_lo ? (j_hi + chunk - 1) / chunk - c_lo : 1;
    const size_t per = (size_t)H * nrows * (2 + D);
    const int64_t tq = nrows / g;
    float *state = vx_alloc(sizeof(float) * per * nchunks);
    int64_t *last = vx_alloc(sizeof(int64_t) * nchunks * tq);   /* [chunk][query]: its last visible key's position */
    /* Fewer than 4 ranges a thread (an encoder step's 2-6 ranges, a young decoder cache's) are shared out by
     * groups of kv heads too, so the threads get even shares: a head's rows are computed alike whatever its
     * group (attention_keys_d: every head on its own), so no result moves. The encoder's 32 calls of a live
     * step, 2 threads, caches read from memory (three alternated runs): over 160 keys 2.36-2.54 -> 1.73-1.93
     * ms, 300 keys 3.84-3.98 -> 2.74-2.99, 768 keys 6.54-6.80 -> 5.23-6.01. */
    int groups = 1;
    while (nt > 1 && nchunks * groups < 4 * nt && H % (2 * groups) == 0) groups *= 2;
    if (nt > nchunks * groups) nt = (int)(nchunks * groups);
    att_ctx ctx = {.isa = isa, .a = a, .ntasks = nchunks * groups, .nrows = nrows, .groups = groups, .j_lo = j_lo,
                   .j_hi = j_hi, .c_lo = c_lo, .chunk = chunk, .per = per, .state = state, .last = last};
    vx_parallel(nt, by_keys_task, &ctx);
    free(last);
    free(state);
}

/* An int8 cache whose K and V take at most this many bytes stays in the last-level cache while several query
 * groups sweep it; a larger one (or a single group) is read from memory, where a burst of loads over each
 * super-block before the arithmetic on it reads it faster than the arithmetic's own loads would (see
 * attention_keys_d) */
enum { VX_ATT_SHARED_BYTES = 8 << 20 };

void vx_attention_uncounted(const float *q, const void *k, const void *v, const float *k_scale, const float *v_scale,
                            int kvtype, float *out, int64_t tq, int64_t tk, int hq, int hkv, int d, const int64_t *q_pos,
                            const int64_t *k_pos, int64_t window) {
    const vx_isa *isa = vx_active();
    vx_attention_args a = {q, k, v, k_scale, v_scale, kvtype, out, tq, tk, window, hq, hkv, d, q_pos, k_pos, 1,
                           1.0f / sqrtf((float)d), NULL, NULL, NULL, 1, NULL};
    int8_t *qc = NULL;
    float *qk = NULL;
    int32_t *qsum = NULL;
    if (kvtype == VX_KV_INT8) {   /* the queries' codes: per row, whatever the call, so a score is too */
        qc = vx_alloc((size_t)(tq * hq * d)), qk = vx_alloc(sizeof(float) * tq * hq), qsum = vx_alloc(sizeof(int32_t) * tq * hq);
        vx_quantize_act(q, tq * hq, d, d, qc, qk, qsum);
        for (int64_t i = 0; i < tq * hq; i++) qk[i] = qk[i] * a.scale;
        a.qc = qc, a.qk = qk, a.qsum = qsum, a.idots = d % 64 == 0 && d <= VX_ATT_DMAX ? isa->attention_idots : NULL;
    }
    for (int64_t j = 1; j < tk; j++)
        if (k_pos[j] < k_pos[j - 1]) {
            a.k_sorted = 0;
            break;
        }
    const int g = hq / hkv, qg = isa->attn_vw / g;  /* queries whose rows fit one by_keys call */
    if (tq * g <= isa->attn_vw)
        by_keys(isa, &a, (int)(tq * g));
    else if (qg > 0 && (tq <= VX_ATT_FEW_QUERIES || kvtype == VX_KV_INT8))
        /* a decode step with drafts (speculative verification), or any call over an int8 cache (a stream's
         * 4 encoder frames and a file's 1000 then compute each query alike): by_keys, a group of queries at
         * a time, so each query's result is the one it gets alone (see by_keys) */
        for (int64_t i0 = 0; i0 < tq; i0 += qg) {
            vx_attention_args b = a;
            b.tq = tq - i0 < qg ? tq - i0 : qg;
            b.q = q + i0 * hq * d, b.out = out + i0 * hq * d, b.q_pos = q_pos + i0;
            if (qc) b.qc = qc + i0 * hq * d, b.qk = qk + i0 * hq, b.qsum = qsum + i0 * hq;
            b.kv_touch = tq <= qg || 2 * tk * hkv * d > VX_ATT_SHARED_BYTES;
            by_keys(isa, &b, (int)(b.tq * g));
        }
    else
        by_rows(isa, &a, tq * g);
    free(qc);
    free(qk);
    free(qsum);
}

void vx_attention(const float *q, const void *k, const void *v, const float *k_scale, const float *v_scale, int kvtype,
                  float *out, int64_t tq, int64_t tk, int hq, int hkv, int d, const int64_t *q_pos,
                  const int64_t *k_pos, int64_t window) {
    const int64_t t0 = vx_now_ns();
    vx_attention_uncounted(q, k, v, k_scale, v_scale, kvtype, out, tq, tk, hq, hkv, d, q_pos, k_pos, window);
    vx_count_ns(VX_TIME_ATTENTION, vx_now_ns() - t0);
}

int vx_attention_idots(const int8_t *q, int nrows, const int8_t *k, int nk, int d, int32_t *s) {
    const vx_isa *isa = vx_active();
    if (!isa->attention_idots || nrows <= 0 || nk <= 0) return isa->attention_idots != NULL;
    const int8_t **kb = vx_alloc(sizeof(int8_t *) * nk), **qr = vx_alloc(sizeof(int8_t *) * nrows);
    int32_t *qsum = vx_alloc(sizeof(int32_t) * nrows);
    for (int j = 0; j < nk; j++) kb[j] = k + (size_t)j * d;
    for (int r = 0; r < nrows; r++) {
        qr[r] = q + (size_t)r * d, qsum[r] = 0;
        for (int t = 0; t < d; t++) qsum[r] += q[(size_t)r * d + t];
    }
    isa->attention_idots(kb, nk, d, qr, qsum, nrows, s);
    free(kb), free(qr), free(qsum);
    return 1;
}
