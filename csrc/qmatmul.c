/* Quantised linears (int8 / q4 weights in panels, int8 activations): argument handling and threads.
 * The formats are specified by their NumPy twins in voxtral_ref/runtime/quant.py; the loops are in
 * qmatmul_simd.h. */
#include <stdlib.h>
#include <string.h>

#include "dispatch.h"

int64_t vx_qpanel_bytes(int fmt, int64_t k) {
    if (fmt == VX_Q_INT8) return k / VX_QBLOCK * (2 * VX_QPANEL + VX_QPANEL * VX_QBLOCK);
    const int64_t nb = vx_q4_blocks_per_super(k);
    return k / (nb * VX_QBLOCK) * (VX_Q4_HEAD + nb * VX_QPANEL * VX_QBLOCK / 2);
}

typedef struct {
    const float *x;
    int64_t n, k, block;
    int8_t *xq;
    float *sx;
    int32_t *xsum;
    int32_t *xpair;            /* q4 (vx_qlinear_args), or NULL: filled by the thread that quantised the rows */
} act_ctx;

/* the pairs of 32-input block sums of `rows` rows of q4 codes, 4 per super-block (vx_qlinear_args) */
static void q4_pair_sums(const int8_t *xq4, int64_t rows, int64_t k, int32_t *xpair) {
    const int64_t nb = vx_q4_blocks_per_super(k), supers = rows * (k / (nb * VX_QBLOCK));
    for (int64_t c = 0; c < supers; c++) {
        int32_t sum[8] = {0};
        for (int64_t b = 0; b < nb; b++)
            for (int t = 0; t < VX_QBLOCK; t++) sum[b] += xq4[(c * nb + b) * VX_QBLOCK + t];
        for (int j = 0; j < 4; j++) xpair[c * 4 + j] = (int32_t)((uint32_t)(uint16_t)sum[j] | (uint32_t)sum[j + 4] << 16);
    }
}

static void quantize_act_task(void *ctx, int tid, int nt) {
    const act_ctx *c = ctx;
    int64_t lo, hi;
    vx_split(c->n, 1, tid, nt, &lo, &hi);
    const int64_t nb = c->k / c->block;
    if (lo >= hi) return;
    vx_active()->quantize_act(c->x + lo * c->k, hi - lo, c->k, c->block, c->xq + lo * c->k, c->sx + lo * nb, c->xsum + lo * nb);
    if (c->xpair) q4_pair_sums(c->xq + lo * c->k, hi - lo, c->k, c->xpair + lo * nb * 4);
}

void vx_quantize_act(const float *x, int64_t n, int64_t k, int64_t block, int8_t *xq, float *sx, int32_t *xsum) {
    act_ctx c = {x, n, k, block, xq, sx, xsum, NULL};
    vx_parallel(vx_threads_for((double)n * k / 4), quantize_act_task, &c);
}

typedef struct {
    const void *w;
    int wtype, fmt;
    int64_t m, k;
    uint8_t *out;
    int64_t next;              /* the next panel to take */
} wq_ctx;

static void quantize_weights_task(void *ctx, int tid, int nt) {
    wq_ctx *c = ctx;
    const int64_t panels = (c->m + VX_QPANEL - 1) / VX_QPANEL, bytes = vx_qpanel_bytes(c->fmt, c->k);
    (void)tid, (void)nt;
    for (int64_t p0; (p0 = vx_next_tasks(&c->next, 4)) < panels;)   /* 4 panels at a time, to whichever thread is free */
        for (int64_t p = p0; p < p0 + 4 && p < panels; p++) {
            const int64_t rows = c->m - p * VX_QPANEL < VX_QPANEL ? c->m - p * VX_QPANEL : VX_QPANEL;
            vx_active()->quantize_panel(c->w, c->wtype, p * VX_QPANEL, rows, c->k, c->fmt, c->out + p * bytes);
        }
}

void vx_quantize_weights(const void *w, int wtype, int64_t m, int64_t k, int fmt, uint8_t *out) {
    wq_ctx c = {w, wtype, fmt, m, k, out, 0};
    vx_parallel(vx_threads_for((double)m * k), quantize_weights_task, &c);
}

typedef struct {
    int count;
    const vx_qlinear_args *a;
    const int64_t *first;      /* matrix i's panels: [first[i], first[i + 1]) */
    int64_t *taken;            /* [nt]: panels taken so far from thread r's range */
} qlinears_ctx;

/* Rows of x per pass over a run of panels: a block's codes (up to 256 KB) stay in L2 while the run's panels
 * pass over them; a whole prefill's (a file's 1696 encoder frames: 2.2 MB at k = 1280) went through the
 * cache once per panel. At least 32 rows, so a batch's passes (M <= 16) are one block, as before. Each
 * (row, panel) is computed the same way whatever the blocking, so no output moves. */
static int64_t rows_per_block(int64_t k) {
    const int64_t r = (256 << 10) / k / 8 * 8;
    return r > 32 ? r : 32;
}

/* matrix a's panels [p0, p1) for every row, a block of rows at a time */
static void qlinear_blocks(const vx_qlinear_args *a, int64_t p0, int64_t p1) {
    const int64_t rb = rows_per_block(a->k), nb = a->k / VX_QBLOCK, supers = a->k / (vx_q4_blocks_per_super(a->k) * VX_QBLOCK);
    for (int64_t r0 = 0; r0 < a->n; r0 += rb) {
        vx_qlinear_args b = *a;
        b.n = a->n - r0 < rb ? a->n - r0 : rb;
        if (a->xq) b.xq = a->xq + r0 * a->k, b.sx = a->sx + r0 * nb, b.xoff = a->xoff + r0 * nb;
        if (a->xq4) b.xq4 = a->xq4 + r0 * a->k, b.sx4 = a->sx4 + r0 * supers, b.xpair = a->xpair + r0 * supers * 4;
        b.y = a->y + r0 * a->m;
        vx_active()->qlinear(&b, p0, p1);
    }
}

/* Thread r's range of the concatenated panels is vx_split's r-th (one sequential weight stream each, as
 * the GEMV), taken in runs of about an eighth; a thread done with its own takes the next runs of the
 * others'. A thread the OS pauses (the server's event loop, a client on the same cores) then delays the
 * call by about one run, not by its whole range. */
static void qlinears_task(void *ctx, int tid, int nt) {
    qlinears_ctx *c = ctx;
    for (int k = 0; k < nt; k++) {
        const int r = (tid + k) % nt;
        int64_t lo, hi;
        vx_split(c->first[c->count], 1, r, nt, &lo, &hi);
        const int64_t step = (hi - lo + 7) / 8;
        for (int64_t p0; (p0 = lo + vx_next_tasks(&c->taken[r], step)) < hi;) {
            const int64_t p1 = p0 + step < hi ? p0 + step : hi;
            for (int i = 0; i < c->count; i++) {
                const int64_t q0 = p0 > c->first[i] ? p0 : c->first[i], q1 = p1 < c->first[i + 1] ? p1 : c->first[i + 1];
                if (q0 < q1) qlinear_blocks(&c->a[i], q0 - c->first[i], q1 - c->first[i]);
            }
        }
    }
}

/* x's int8 codes for the q4 matrices (vx_qlinear_args): a scale per super-block, and the pairs of block sums */
static void quantize_act_q4(const float *x, int64_t n, int64_t k, int8_t *xq4, float *sx4, int32_t *xpair) {
    const int64_t block = vx_q4_blocks_per_super(k) * VX_QBLOCK;
    int32_t *xsum = vx_alloc(sizeof(int32_t) * n * (k / block));   /* per super-block: the quantiser's, unused */
    act_ctx c = {x, n, k, block, xq4, sx4, xsum, xpair};
    vx_parallel(vx_threads_for((double)n * k / 4), quantize_act_task, &c);
    free(xsum);
}

/* room for n rows of k activation codes and VX_QPAD_ROWS rows of zeros after them (q4's: the AMX kernel
 * reads whole tiles of rows; int8 never goes through it) */
static int8_t *padded_codes(int64_t n, int64_t k) {
    int8_t *xq = vx_alloc((size_t)((n + VX_QPAD_ROWS) * k));
    memset(xq + n * k, 0, (size_t)(VX_QPAD_ROWS * k));
    return xq;
}

/* y_i = x @ w_i.T (+ b_i) for `count` matrices of the same input width k: x quantised once per format
 * present, and one team of threads over all their panels (qlinears_task) */
static void qlinears(const float *x, int64_t n, int64_t k, int count, const uint8_t *const *w, const int *fmt,
                     const int64_t *m, const float *const *b, float *const *y) {
    if (n <= 0) return;
    int has[2] = {0, 0};
    for (int i = 0; i < count; i++) has[fmt[i]] = 1;
    const int64_t nb = k / VX_QBLOCK, supers = k / (vx_q4_blocks_per_super(k) * VX_QBLOCK);
    int8_t *xq = NULL, *xq4 = NULL;
    float *sx = NULL, *sx4 = NULL;
    int32_t *xoff = NULL, *xpair = NULL;
    if (has[VX_Q_INT8]) {
        xq = vx_alloc((size_t)(n * k)), sx = vx_alloc(sizeof(float) * n * nb), xoff = vx_alloc(sizeof(int32_t) * n * nb);
        vx_quantize_act(x, n, k, VX_QBLOCK, xq, sx, xoff);
        /* the sums as the offset term itself, -128 xsum: the kernels start each block's dot from it (a
         * broadcast load) instead of shifting and subtracting per row and block, the same integers */
        for (int64_t i = 0; i < n * nb; i++) xoff[i] *= -128;
    }
    if (has[VX_Q_Q4]) {
        xq4 = padded_codes(n, k), sx4 = vx_alloc(sizeof(float) * n * supers), xpair = vx_alloc(sizeof(int32_t) * n * supers * 4);
        quantize_act_q4(x, n, k, xq4, sx4, xpair);
    }
    vx_qlinear_args a[VX_QLINEARS_MAX];
    int64_t first[VX_QLINEARS_MAX + 1] = {0}, work = 0;   /* matrix i's panels: [first[i], first[i + 1]) */
    for (int i = 0; i < count; i++) {
        a[i] = (vx_qlinear_args){xq, sx, xoff, xq4, sx4, xpair, n, k, m[i], w[i], fmt[i], vx_qpanel_bytes(fmt[i], k), b[i], y[i]};
        first[i + 1] = first[i] + (m[i] > 0 ? (m[i] + VX_QPANEL - 1) / VX_QPANEL : 0);
        work += m[i] * k;
    }
    const int nt = vx_threads_for((double)work);
    qlinears_ctx c = {count, a, first, vx_alloc(sizeof(int64_t) * nt)};
    for (int t = 0; t < nt; t++) c.taken[t] = 0;
    vx_parallel(nt, qlinears_task, &c);
    free(c.taken), free(xq), free(sx), free(xoff), free(xq4), free(sx4), free(xpair);
}

void vx_qlinear_many(const float *x, int64_t n, int64_t k, int count, const uint8_t *const *w, const int *fmt,
                     const int64_t *m, const float *const *b, float *const *y) {
    const int64_t t0 = vx_now_ns();
    qlinears(x, n, k, count, w, fmt, m, b, y);
    vx_count_ns(VX_TIME_WEIGHTS, vx_now_ns() - t0);
}

void vx_qlinear(const float *x, int64_t n, int64_t k, const uint8_t *w, int fmt, int64_t m, const float *b, float *y) {
    vx_qlinear_many(x, n, k, 1, &w, &fmt, &m, &b, &y);
}
