/* vx_layers_forward: pre-norm transformer layers (the encoder's or the decoder's) in one call, so a live
 * step crosses from Python into C once per stack instead of some sixteen times a layer (the Python side's
 * pointer conversions and glue cost more than the small kernels themselves). It runs the same kernels, in the
 * same order, on the same values as the readable layers in voxtral_ref/stages/ (encoder_layer,
 * decoder_layer, self_attention, KVCache.update), so its result is bit for bit theirs
 * (tests/test_kernels.py checks it). */
#include <stdlib.h>

#include "dispatch.h"

static int quantised(const vx_mat *w) { return w->kind == VX_MAT_INT8 || w->kind == VX_MAT_Q4; }

static int qformat(const vx_mat *w) { return w->kind == VX_MAT_INT8 ? VX_Q_INT8 : VX_Q_Q4; }

/* y_i = x @ w_i.T (+ b_i) for `count` matrices of one input: quantised ones in one call (x quantised once,
 * one team of threads for all), as each would be alone */
static void matmuls(int count, const vx_mat *const *w, const float *x, int64_t n, int xtype, const float *const *b,
                    float *const *y) {
    int all = 1;
    for (int i = 0; i < count; i++) all &= quantised(w[i]);
    if (all) {
        const uint8_t *data[VX_QLINEARS_MAX];
        int fmt[VX_QLINEARS_MAX];
        int64_t m[VX_QLINEARS_MAX];
        for (int i = 0; i < count; i++)
            data[i] = w[i]->data, fmt[i] = qformat(w[i]), m[i] = w[i]->m;
        vx_qlinear_many(x, n, w[0]->k, count, data, fmt, m, b, y);
        return;
    }
    for (int i = 0; i < count; i++)
        if (quantised(w[i]))
            vx_qlinear(x, n, w[i]->k, w[i]->data, qformat(w[i]), w[i]->m, b[i], y[i]);
        else
            vx_linear(x, n, w[i]->k, xtype, w[i]->data, w[i]->kind == VX_MAT_BF16 ? VX_W_BF16 : VX_W_F32, w[i]->m, b[i], y[i]);
}

static void matmul(const vx_mat *w, const float *x, int64_t n, int xtype, const float *b, float *y) {
    matmuls(1, &w, x, n, xtype, &b, &y);
}

/* rows [t, heads * hd] of fresh keys or values -> ring slots (or a chunk's own buffer): float32 copied,
 * int8 quantised per (position, head) row as kernels.kv_pack does, each head's codes into its block */
static void store_kv(const float *x, int64_t t, int heads, int hd, int kvtype, const int64_t *slot, void *dst,
                     float *scale) {
    const int64_t row = (int64_t)heads * hd;
    if (kvtype == VX_KV_INT8) {
        int32_t *sums = vx_alloc(sizeof(int32_t) * heads);
        int8_t *codes = vx_alloc((size_t)row);
        for (int64_t i = 0; i < t; i++) {
            vx_quantize_act(x + i * row, heads, hd, hd, codes, scale + slot[i] * heads, sums);
            for (int h = 0; h < heads; h++) memcpy((int8_t *)dst + vx_kv8_row(slot[i], h, heads, hd), codes + h * hd, hd);
        }
        free(codes), free(sums);
    } else {
        for (int64_t i = 0; i < t; i++) memcpy((float *)dst + slot[i] * row, x + i * row, sizeof(float) * row);
    }
}

/* One sequence's attention: its rows' roped q [t, HD] and k, v [t, KD] -> o [t, HD]; the keys and values
 * go into its ring first (or, without one, it attends to its own chunk) */
static void attend(const vx_layer *L, const float *qr, const float *kr, const float *v, int64_t t, const int64_t *pos,
                   vx_kv_ring *ring, float *o) {
    const int64_t KD = (int64_t)L->n_kv_heads * L->head_dim;
    const size_t esz = ring->kvtype == VX_KV_INT8 ? 1 : sizeof(float);
    int64_t *slot = vx_alloc(sizeof(int64_t) * t);
    void *ck = ring->k, *cv = ring->v;
    float *cks = ring->k_scale, *cvs = ring->v_scale;
    const int64_t *kpos = ring->pos;
    int64_t nkeys;
    if (ring->capacity > 0) {
        for (int64_t i = 0; i < t; i++) slot[i] = pos[i] % ring->capacity, ring->pos[slot[i]] = pos[i];
        ring->filled = ring->filled + t < ring->capacity ? ring->filled + t : ring->capacity;
        nkeys = ring->filled;
    } else {
        for (int64_t i = 0; i < t; i++) slot[i] = i;
        const int64_t rows = ring->kvtype == VX_KV_INT8 ? (t + VX_KV8_BLOCK - 1) / VX_KV8_BLOCK * VX_KV8_BLOCK : t;
        ck = vx_alloc(esz * rows * KD), cv = vx_alloc(esz * rows * KD);
        cks = vx_alloc(sizeof(float) * t * L->n_kv_heads), cvs = vx_alloc(sizeof(float) * t * L->n_kv_heads);
        kpos = pos, nkeys = t;
    }
    store_kv(kr, t, L->n_kv_heads, L->head_dim, ring->kvtype, slot, ck, cks);
    store_kv(v, t, L->n_kv_heads, L->head_dim, ring->kvtype, slot, cv, cvs);
    vx_attention_uncounted(qr, ck, cv, ring->kvtype == VX_KV_INT8 ? cks : NULL, ring->kvtype == VX_KV_INT8 ? cvs : NULL,
                 ring->kvtype, o, t, nkeys, L->n_heads, L->n_kv_heads, L->head_dim, pos, kpos, L->window);
    if (ring->capacity <= 0) free(ck), free(cv), free(cks), free(cvs);
    free(slot);
}

typedef struct {
    const vx_layer *L;
    const float *qr, *kr, *v;
    const int64_t *pos, *seq_rows, *r0;
    vx_kv_ring *const *rings;
    float *o;
    const int *order;          /* the sequences, most work first */
    int nseq;
    int64_t next;              /* the next of `order` to take */
} attend_ctx;

static void attend_task(void *ctx, int tid, int nt) {
    attend_ctx *c = ctx;
    const int64_t HD = (int64_t)c->L->n_heads * c->L->head_dim, KD = (int64_t)c->L->n_kv_heads * c->L->head_dim;
    (void)tid, (void)nt;
    for (int64_t i; (i = vx_next_tasks(&c->next, 1)) < c->nseq;) {
        const int s = c->order[i];
        const int64_t r0 = c->r0[s];
        attend(c->L, c->qr + r0 * HD, c->kr + r0 * KD, c->v + r0 * KD, c->seq_rows[s], c->pos + r0, c->rings[s], c->o + r0 * HD);
    }
}

/* Every sequence's attention. Several sequences whose work can be shared out evenly (none more than a
 * thread's share) run one per thread, each call on its thread alone (a region inside a region does):
 * a decode pass's sequences of a few hundred keys each are one key range apiece, which one call would
 * give to one thread while the other waited, and each call's region costs its own start and join. They
 * go so in whole rounds of nt sequences; the last nseq % nt (the least work: `order` is most work first)
 * then split their keys over the threads each, so no thread waits out another's last sequence (3 streams
 * on 2 threads: the third alone on one thread made each layer's attention take two calls' time, not one
 * and a half; 3 q4 streams at full windows, batch_bench's rounds alternated: 142.6 / 152.4 -> 131.8 /
 * 142.5 ms at 83 / 48 GB/s). Otherwise (one sequence, or one holding most of the keys) each call splits
 * its keys over the threads. Either way a sequence's result is the same: vx_attention's does not depend
 * on the thread count. */
static void attend_all(const vx_layer *L, const float *qr, const float *kr, const float *v, const int64_t *pos, int nseq,
                       const int64_t *seq_rows, vx_kv_ring *const *rings, float *o) {
    const int64_t t0 = vx_now_ns(), HD = (int64_t)L->n_heads * L->head_dim, KD = (int64_t)L->n_kv_heads * L->head_dim;
    int64_t *r0 = vx_alloc(sizeof(int64_t) * nseq);
    double *work = vx_alloc(sizeof(double) * nseq), total = 0.0, most = 0.0;
    int *order = vx_alloc(sizeof(int) * nseq);
    for (int s = 0; s < nseq; s++) {
        r0[s] = s ? r0[s - 1] + seq_rows[s - 1] : 0;
        const vx_kv_ring *ring = rings[s];
        int64_t keys = ring->capacity > 0 ? ring->filled + seq_rows[s] : seq_rows[s];
        keys = ring->capacity > 0 && keys > ring->capacity ? ring->capacity : keys;
        keys = keys - seq_rows[s] > L->window ? L->window + seq_rows[s] : keys;   /* min(keys, window + rows) */
        work[s] = (double)seq_rows[s] * L->n_heads * (double)keys * L->head_dim;
        total += work[s], most = work[s] > most ? work[s] : most;
        int at = s;   /* insertion sort, most work first */
        for (; at > 0 && work[order[at - 1]] < work[s]; at--) order[at] = order[at - 1];
        order[at] = s;
    }
    const int nt = nseq < vx_threads_for(total) ? nseq : vx_threads_for(total);
    int split = 0;                     /* order[split:] split their keys over the threads */
    if (nt > 1 && most * nt <= total) {
        split = nseq - nseq % nt;
        attend_ctx c = {L, qr, kr, v, pos, seq_rows, r0, rings, o, order, split, 0};
        vx_parallel(nt, attend_task, &c);
    }
    for (int i = split; i < nseq; i++) {
        const int s = order[i];
        attend(L, qr + r0[s] * HD, kr + r0[s] * KD, v + r0[s] * KD, seq_rows[s], pos + r0[s], rings[s], o + r0[s] * HD);
    }
    free(order), free(work), free(r0);
    vx_count_ns(VX_TIME_ATTENTION, vx_now_ns() - t0);
}

static void layer_forward(const vx_layer *L, float *h, int64_t t, const int64_t *pos, const float *cos, const float *sin,
                          const float *ada, int xtype, int nseq, const int64_t *seq_rows, vx_kv_ring *const *rings) {
    const int64_t D = L->dim, F = L->w1.m, HD = (int64_t)L->n_heads * L->head_dim, KD = (int64_t)L->n_kv_heads * L->head_dim;
    float *x = vx_alloc(sizeof(float) * t * D), *y = vx_alloc(sizeof(float) * t * D);            /* [t, D] */
    float *q = vx_alloc(sizeof(float) * t * HD), *qr = vx_alloc(sizeof(float) * t * HD);           /* [t, H, hd] */
    float *o = vx_alloc(sizeof(float) * t * HD);                                                  /* [t, H, hd] */
    float *k = vx_alloc(sizeof(float) * t * KD), *kr = vx_alloc(sizeof(float) * t * KD);           /* [t, Hkv, hd] */
    float *v = vx_alloc(sizeof(float) * t * KD);                                                  /* [t, Hkv, hd] */
    float *a = vx_alloc(sizeof(float) * t * F), *g = vx_alloc(sizeof(float) * t * F);             /* [t, F] */

    /* attention block: x = norm(h); h += wo(attention(rope(wq x), rope(wk x), wv x)), the projections once
     * over every sequence's rows, attention per sequence */
    vx_rms_norm(h, L->attention_norm, L->eps, x, t, D);
    {
        const vx_mat *w[] = {&L->wq, &L->wk, &L->wv};
        const float *b[] = {L->bq, NULL, L->bv};
        float *out[] = {q, k, v};
        matmuls(3, w, x, t, xtype, b, out);
    }
    vx_rope(q, cos, sin, qr, t, L->n_heads, L->head_dim, L->interleaved);
    vx_rope(k, cos, sin, kr, t, L->n_kv_heads, L->head_dim, L->interleaved);
    attend_all(L, qr, kr, v, pos, nseq, seq_rows, rings, o);
    matmul(&L->wo, o, t, xtype, L->bo, y);
    for (int64_t i = 0; i < t * D; i++) h[i] = h[i] + y[i];

    /* MLP block: x = norm(h) (* (1 + ada): the decoder's AdaRMSNorm, a scale per row); h += w2(silu(w1 x) * w3 x) */
    vx_rms_norm(h, L->ffn_norm, L->eps, x, t, D);
    if (ada)
        for (int64_t i = 0; i < t * D; i++) x[i] = x[i] * (1.0f + ada[i]);
    {
        const vx_mat *w[] = {&L->w1, &L->w3};
        const float *b[] = {NULL, NULL};
        float *out[] = {a, g};
        matmuls(2, w, x, t, xtype, b, out);
    }
    vx_silu_mul(a, g, a, t * F);
    matmul(&L->w2, a, t, xtype, L->b2, y);
    for (int64_t i = 0; i < t * D; i++) h[i] = h[i] + y[i];

    free(x), free(y), free(q), free(qr), free(o), free(k), free(kr), free(v), free(a), free(g);
}

void vx_layers_forward(const vx_layer *const *L, int n_layers, float *h, int64_t t, const int64_t *pos, const float *cos,
                       const float *sin, const float *ada, int xtype, int nseq, const int64_t *seq_rows,
                       vx_kv_ring *const *rings) {
    for (int i = 0; i < n_layers; i++)
        layer_forward(L[i], h, t, pos, cos, sin, ada ? ada + (size_t)i * t * L[i]->dim : NULL, xtype, nseq, seq_rows,
                      rings + (size_t)i * nseq);
}
