/* kernels.h -- cosine top-k kernels behind intercascade_core.core._simd.
 *
 * Naming: ic_* is the interface used by the glue (_simd.c); kernel_<isa>_* are
 * the per-ISA tile functions in kernels.c. Nothing here touches Python: every
 * function may run with the GIL released.
 *
 * Scores are inner products of unit vectors (= cosine). Order: score descending,
 * equal scores -> lower row index. For every ISA the score of one (row, query)
 * pair is computed by exactly the same sequence of operations whatever tile it
 * sits in, so duplicate rows tie exactly and the int8 path's float32 re-score
 * equals the float32 scan bit for bit.
 */
#ifndef IC_KERNELS_H
#define IC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "cpu.h"

typedef struct {
    float score;
    int64_t index;
} ic_hit;

typedef struct {
    const float *vectors;   /* (n, d) float32, C order */
    const uint8_t *packed;  /* int8 scan copy, or NULL for the float32 scan: blocks of 16
                               rows, (ceil(n/16), ceil(d/4), 16, 4) uint8 = q + 128 */
    const float *scales;    /* (n,) row scale of the int8 copy: x ~= scale * q */
    const float *errs;      /* (n,) upper bound of ||x - scale * q||_2 */
    const int32_t *codes;   /* (n,) tenant code per row, or NULL for no filter */
    int32_t tenant;         /* keep rows with codes[i] == tenant */
    size_t n, d;
    const float *queries;   /* (m, d) float32, C order */
    size_t m, k;
    ic_isa isa;
    int threads;            /* 1 or 2 */
} ic_job;

/* Runs the job. out_hits is (m, k) best-first; out_kprime receives
 * min(k, #rows passing the filter); out_candidates (may be NULL) receives the
 * number of rows re-scored in float32 by the int8 path.
 * Returns 0, or -1 when memory ran out. */
int ic_topk(const ic_job *job, ic_hit *out_hits, size_t *out_kprime, size_t *out_candidates);

/* The gather: out[q * c + j] = score of row rows[q * c + j] of vectors (d columns)
 * against queries[q], for m queries of c candidate rows each (indices already
 * checked). One formula for every ISA, so the result does not depend on the CPU:
 * the float32 products are taken exactly in double, lane l = t mod 8 sums its
 * products in dimension order, the lanes are added as
 * ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)) and the sum is rounded once to float32
 * (_topk_numpy.gather performs the same operations). */
void ic_gather(const float *vectors, size_t d, const float *queries, size_t m, const int64_t *rows,
               size_t c, ic_isa isa, float *out);

#endif /* IC_KERNELS_H */
