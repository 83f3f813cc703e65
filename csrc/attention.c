/* vx_attention: splits the work into (kv head, block of rows) tasks over the threads; the per-block
 * loop is in attention_simd.h. */
#include <math.h>
#include <stdlib.h>

#include "dispatch.h"

void vx_attention(const float *q, const float *k, const float *v, float *out, int64_t tq, int64_t tk,
                  int hq, int hkv, int d, const int64_t *q_pos, const int64_t *k_pos, int64_t window) {
    const vx_isa *isa = vx_active();
    vx_attention_args a = {q, k, v, out, tq, tk, window, hq, hkv, d, q_pos, k_pos, 1, 1.0f / sqrtf((float)d)};
    for (int64_t j = 1; j < tk; j++)
        if (k_pos[j] < k_pos[j - 1]) {
            a.k_sorted = 0;
            break;
        }
    const int64_t nrows = tq * (hq / hkv);          /* rows of one kv head: (query, head of the group) */
    const int rows = nrows <= isa->attn_vw ? isa->attn_vw : 2 * isa->attn_vw;
    const int64_t nblocks = (nrows + rows - 1) / rows, ntasks = nblocks * hkv;
    int nt = vx_threads_for((double)nrows * hkv * (tk < window ? tk : window) * d);
    if (nt > ntasks) nt = (int)ntasks;
#pragma omp parallel num_threads(nt)
    {
        float *scratch = vx_alloc(sizeof(float) * ((size_t)2 * d * rows + d));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntasks; t++) isa->attention_rows(&a, (int)(t % hkv), (t / hkv) * rows, rows, scratch);
        free(scratch);
    }
}
