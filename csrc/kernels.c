/* kernels.c -- fused SIMD top-k scans (float32 and int8 + float32 re-score).
 *
 * Layout of the work: rows are cut into blocks of ROW_BLOCK rows (kept in L2);
 * every tile of up to TILE_Q queries passes over a block in micro-tiles of
 * TILE_ROWS rows, and each tile's scores go straight into per-query top-k heaps.
 * With two threads each scans half of the rows into its own heaps; the halves
 * are merged at the end (score descending, index ascending).
 *
 * The int8 path scans an int8 copy (x ~= s * q, |x.y - s(q.y)| <= err ||y||)
 * and keeps, per query, the k best *lower* bounds lb = a - err - M; a row whose
 * *upper* bound ub = a + err + M is below the k-th best lower bound L cannot be
 * in the float32 top-k (k rows score at least L > ub), so only rows with
 * ub >= L are re-scored in float32 -- with the same tile code as the float32
 * scan, hence bit-identical scores and the identical top-k. M covers the
 * float32 rounding of both sums: (2d + 4) * 2^-24 * ||y|| * 1.1.
 */
#include "kernels.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef IC_X86
#include <immintrin.h>
#endif

#define TILE_ROWS 4
#define MAX_TILE_Q 6
#define ROW_BLOCK 256

typedef void (*tile_f32_fn)(const float *R, int nr, const float *Q, int nq, size_t d, float *out);
typedef void (*tile_i8_fn)(const int8_t *R, int nr, const float *Q, int nq, size_t d, float *out);

/* ---------------------------------------------------------------- scalar -- */

static void kernel_scalar_f32(const float *R, int nr, const float *Q, int nq, size_t d, float *out) {
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < nq; j++) {
            double s = 0.0; /* double: the portable path is also the most accurate */
            for (size_t t = 0; t < d; t++)
                s += (double)R[i * d + t] * Q[j * d + t];
            out[i * nq + j] = (float)s;
        }
}

static void kernel_scalar_i8(const int8_t *R, int nr, const float *Q, int nq, size_t d, float *out) {
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < nq; j++) {
            double s = 0.0;
            for (size_t t = 0; t < d; t++)
                s += (double)R[i * d + t] * Q[j * d + t];
            out[i * nq + j] = (float)s;
        }
}

#ifdef IC_X86
/* ---------------------------------------------------------------- AVX-512 -- */
#define IC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define IC_INLINE static inline __attribute__((always_inline))

#define LD512_F32(p) _mm512_loadu_ps(p)
#define LDM512_F32(p, m) _mm512_maskz_loadu_ps((m), (p))
#define LD512_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define LDM512_I8(p, m) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8((m), (p))))

/* One NR x NQ tile; NR and NQ are compile-time constants at every call site, so
 * the loops unroll and the accumulators live in registers. */
#define DEFINE_TILE512(NAME, T, LD, LDM)                                                      \
    IC_INLINE IC_AVX512 void NAME(const T *R, const float *Q, size_t d, float *out, const int NR, \
                                  const int NQ) {                                             \
        __m512 acc[TILE_ROWS][MAX_TILE_Q];                                                    \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)                                                          \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                acc[i][j] = _mm512_setzero_ps();                                              \
        size_t t = 0;                                                                         \
        for (; t + 16 <= d; t += 16) {                                                        \
            __m512 q[MAX_TILE_Q];                                                             \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                q[j] = _mm512_loadu_ps(Q + j * d + t);                                        \
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {                                                    \
                __m512 r = LD(R + i * d + t);                                                 \
                _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                  \
                    acc[i][j] = _mm512_fmadd_ps(r, q[j], acc[i][j]);                          \
            }                                                                                 \
        }                                                                                     \
        if (t < d) {                                                                          \
            __mmask16 mk = (__mmask16)((1u << (d - t)) - 1u);                                 \
            __m512 q[MAX_TILE_Q];                                                             \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                q[j] = _mm512_maskz_loadu_ps(mk, Q + j * d + t);                              \
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {                                                    \
                __m512 r = LDM(R + i * d + t, mk);                                            \
                _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                  \
                    acc[i][j] = _mm512_fmadd_ps(r, q[j], acc[i][j]);                          \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)                                                          \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                out[i * NQ + j] = _mm512_reduce_add_ps(acc[i][j]);                            \
    }

DEFINE_TILE512(tile512_f32, float, LD512_F32, LDM512_F32)
DEFINE_TILE512(tile512_i8, int8_t, LD512_I8, LDM512_I8)

/* ------------------------------------------------------------- AVX2 + FMA -- */
#define IC_AVX2 __attribute__((target("avx2,fma")))

IC_INLINE IC_AVX2 float hsum256(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
}

#define LD256_F32(p) _mm256_loadu_ps(p)
#define LDM256_F32(p, m, rem) _mm256_maskload_ps((p), (m))
#define LD256_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
IC_INLINE IC_AVX2 __m256 ldm256_i8(const int8_t *p, size_t rem) {
    int8_t buf[8] = {0};
    memcpy(buf, p, rem);
    return LD256_I8(buf);
}
#define LDM256_I8(p, m, rem) ldm256_i8((p), (rem))

#define AVX2_TILE_Q 3
#define DEFINE_TILE256(NAME, T, LD, LDM)                                                      \
    IC_INLINE IC_AVX2 void NAME(const T *R, const float *Q, size_t d, float *out, const int NR, \
                                const int NQ) {                                               \
        __m256 acc[TILE_ROWS][AVX2_TILE_Q];                                                   \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)                                                          \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                acc[i][j] = _mm256_setzero_ps();                                              \
        size_t t = 0;                                                                         \
        for (; t + 8 <= d; t += 8) {                                                          \
            __m256 q[AVX2_TILE_Q];                                                            \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                q[j] = _mm256_loadu_ps(Q + j * d + t);                                        \
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {                                                    \
                __m256 r = LD(R + i * d + t);                                                 \
                _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                  \
                    acc[i][j] = _mm256_fmadd_ps(r, q[j], acc[i][j]);                          \
            }                                                                                 \
        }                                                                                     \
        if (t < d) {                                                                          \
            size_t rem = d - t;                                                               \
            __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)rem),                     \
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));       \
            __m256 q[AVX2_TILE_Q];                                                            \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                q[j] = _mm256_maskload_ps(Q + j * d + t, mk);                                 \
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {                                                    \
                __m256 r = LDM(R + i * d + t, mk, rem);                                       \
                _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                  \
                    acc[i][j] = _mm256_fmadd_ps(r, q[j], acc[i][j]);                          \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)                                                          \
            _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++)                                                      \
                out[i * NQ + j] = hsum256(acc[i][j]);                                         \
    }

DEFINE_TILE256(tile256_f32, float, LD256_F32, LDM256_F32)
DEFINE_TILE256(tile256_i8, int8_t, LD256_I8, LDM256_I8)

/* Dispatch a runtime (nr, nq) to the constant-shaped tile. */
#define CASE(F, NR, NQ)                  \
    case (NR) * 8 + (NQ):                \
        F(R, Q, d, out, NR, NQ);         \
        break;
#define CASES_Q3(F, NR) CASE(F, NR, 1) CASE(F, NR, 2) CASE(F, NR, 3)
#define CASES_Q6(F, NR) CASES_Q3(F, NR) CASE(F, NR, 4) CASE(F, NR, 5) CASE(F, NR, 6)

#define DEFINE_KERNEL(NAME, ATTR, T, TILE, CASES)                                              \
    static ATTR void NAME(const T *R, int nr, const float *Q, int nq, size_t d, float *out) {  \
        switch (nr * 8 + nq) {                                                                 \
            CASES(TILE, 1) CASES(TILE, 2) CASES(TILE, 3) CASES(TILE, 4)                        \
        default:                                                                               \
            break;                                                                             \
        }                                                                                      \
    }

DEFINE_KERNEL(kernel_avx512_f32, IC_AVX512, float, tile512_f32, CASES_Q6)
DEFINE_KERNEL(kernel_avx512_i8, IC_AVX512, int8_t, tile512_i8, CASES_Q6)
DEFINE_KERNEL(kernel_avx2_f32, IC_AVX2, float, tile256_f32, CASES_Q3)
DEFINE_KERNEL(kernel_avx2_i8, IC_AVX2, int8_t, tile256_i8, CASES_Q3)
#endif /* IC_X86 */

/* ------------------------------------------------------------- dispatch -- */

typedef struct {
    tile_f32_fn f32;
    tile_i8_fn i8;
    int tile_q;
} isa_kernels;

static isa_kernels kernels_for(ic_isa isa) {
    isa_kernels k = {kernel_scalar_f32, kernel_scalar_i8, 1};
#ifdef IC_X86
    if (isa == IC_ISA_AVX512)
        k = (isa_kernels){kernel_avx512_f32, kernel_avx512_i8, MAX_TILE_Q};
    else if (isa == IC_ISA_AVX2)
        k = (isa_kernels){kernel_avx2_f32, kernel_avx2_i8, AVX2_TILE_Q};
#endif
    return k;
}

/* ---------------------------------------------------------------- heaps -- */

/* a is worse than b: lower score, or equal score and higher index */
static inline int worse(float sa, int64_t ia, float sb, int64_t ib) {
    return sa < sb || (sa == sb && ia > ib);
}

/* Min-heap (worst at the root) of at most cap hits. */
static void hit_push(ic_hit *h, size_t *len, size_t cap, float s, int64_t idx) {
    size_t i;
    if (*len < cap) {
        i = (*len)++;
        while (i > 0) {
            size_t p = (i - 1) / 2;
            if (!worse(s, idx, h[p].score, h[p].index))
                break;
            h[i] = h[p];
            i = p;
        }
    } else {
        if (!worse(h[0].score, h[0].index, s, idx))
            return;
        i = 0;
        for (;;) {
            size_t c = 2 * i + 1;
            if (c >= cap)
                break;
            if (c + 1 < cap && worse(h[c + 1].score, h[c + 1].index, h[c].score, h[c].index))
                c++;
            if (!worse(h[c].score, h[c].index, s, idx))
                break;
            h[i] = h[c];
            i = c;
        }
    }
    h[i].score = s;
    h[i].index = idx;
}

/* Min-heap of at most cap floats (the k best lower bounds). */
static void float_push(float *h, size_t *len, size_t cap, float v) {
    size_t i;
    if (*len < cap) {
        i = (*len)++;
        while (i > 0 && v < h[(i - 1) / 2]) {
            h[i] = h[(i - 1) / 2];
            i = (i - 1) / 2;
        }
    } else {
        if (!(v > h[0]))
            return;
        i = 0;
        for (;;) {
            size_t c = 2 * i + 1;
            if (c >= cap)
                break;
            if (c + 1 < cap && h[c + 1] < h[c])
                c++;
            if (!(h[c] < v))
                break;
            h[i] = h[c];
            i = c;
        }
    }
    h[i] = v;
}

static int cmp_better(const void *a, const void *b) {
    const ic_hit *x = a, *y = b;
    if (worse(x->score, x->index, y->score, y->index))
        return 1;
    return worse(y->score, y->index, x->score, x->index) ? -1 : 0;
}

static int cmp_float_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* --------------------------------------------------------------- workers -- */

typedef struct {
    int64_t index;
    float ub;
} cand;

typedef struct {
    const ic_job *job;
    size_t r0, r1;
    size_t allowed;   /* rows of [r0, r1) passing the tenant filter */
    ic_hit *hits;     /* f32: (m, k) heaps */
    float *lbs;       /* int8: (m, k) heaps of lower bounds */
    size_t *lens;     /* (m,) heap sizes */
    cand **cands;     /* int8: (m,) candidate lists */
    size_t *clen, *ccap;
    int oom;
} worker;

static void scan_f32(worker *w, const float *out, size_t r, int nr, size_t qb, int nq) {
    const ic_job *job = w->job;
    for (int i = 0; i < nr; i++) {
        int64_t row = (int64_t)(r + i);
        if (job->codes && job->codes[row] != job->tenant)
            continue;
        for (int j = 0; j < nq; j++) {
            size_t q = qb + j;
            ic_hit *h = w->hits + q * job->k;
            float s = out[i * nq + j];
            if (w->lens[q] == job->k && s < h[0].score) /* fast reject */
                continue;
            hit_push(h, &w->lens[q], job->k, s, row);
        }
    }
}

static void scan_i8(worker *w, const float *out, size_t r, int nr, size_t qb, int nq,
                    const float *margin) {
    const ic_job *job = w->job;
    size_t k = job->k;
    for (int i = 0; i < nr; i++) {
        int64_t row = (int64_t)(r + i);
        if (job->codes && job->codes[row] != job->tenant)
            continue;
        float s = job->scales[row], e = job->errs[row];
        for (int j = 0; j < nq; j++) {
            size_t q = qb + j;
            float a = s * out[i * nq + j], slack = e + margin[q], ub = a + slack;
            float *h = w->lbs + q * k;
            if (w->lens[q] == k && !(ub >= h[0])) /* fast reject: lb <= ub < L */
                continue;
            float_push(h, &w->lens[q], k, a - slack);
            float L = w->lens[q] == k ? h[0] : -INFINITY;
            if (!(ub >= L))
                continue;
            if (w->clen[q] == w->ccap[q]) { /* compact, then grow if still crowded */
                cand *c = w->cands[q];
                size_t kept = 0;
                for (size_t t = 0; t < w->clen[q]; t++)
                    if (c[t].ub >= L)
                        c[kept++] = c[t];
                w->clen[q] = kept;
                if (kept * 2 > w->ccap[q]) {
                    cand *bigger = realloc(c, 2 * w->ccap[q] * sizeof(cand));
                    if (!bigger) {
                        w->oom = 1;
                        return;
                    }
                    w->cands[q] = bigger;
                    w->ccap[q] *= 2;
                }
            }
            w->cands[q][w->clen[q]++] = (cand){row, ub};
        }
    }
}

static void *run_worker(void *arg) {
    worker *w = arg;
    const ic_job *job = w->job;
    isa_kernels kern = kernels_for(job->isa);
    size_t d = job->d, m = job->m;
    float out[TILE_ROWS * MAX_TILE_Q];
    float *margin = NULL;
    if (job->qvectors) {
        margin = malloc(m * sizeof(float));
        if (!margin) {
            w->oom = 1;
            return NULL;
        }
        for (size_t q = 0; q < m; q++) {
            double s = 0.0;
            for (size_t t = 0; t < d; t++)
                s += (double)job->queries[q * d + t] * job->queries[q * d + t];
            margin[q] = (float)((2.0 * d + 4.0) * 0x1p-24 * sqrt(s) * 1.1);
        }
    }
    w->allowed = 0;
    for (size_t r = w->r0; r < w->r1; r++)
        w->allowed += !job->codes || job->codes[r] == job->tenant;
    for (size_t rb = w->r0; rb < w->r1 && !w->oom; rb += ROW_BLOCK) {
        size_t re = rb + ROW_BLOCK < w->r1 ? rb + ROW_BLOCK : w->r1;
        for (size_t qb = 0; qb < m && !w->oom; qb += kern.tile_q) {
            int nq = (int)(m - qb < (size_t)kern.tile_q ? m - qb : (size_t)kern.tile_q);
            for (size_t r = rb; r < re && !w->oom; r += TILE_ROWS) {
                int nr = (int)(re - r < TILE_ROWS ? re - r : TILE_ROWS);
                if (job->qvectors) {
                    kern.i8(job->qvectors + r * d, nr, job->queries + qb * d, nq, d, out);
                    scan_i8(w, out, r, nr, qb, nq, margin);
                } else {
                    kern.f32(job->vectors + r * d, nr, job->queries + qb * d, nq, d, out);
                    scan_f32(w, out, r, nr, qb, nq);
                }
            }
        }
    }
    free(margin);
    return NULL;
}

/* Re-score the int8 candidates of query q in float32 into heap h (k hits). */
static size_t rescore(const ic_job *job, worker *ws, int nw, size_t q, ic_hit *h, size_t *hlen,
                      float *tmp) {
    size_t k = job->k, d = job->d, count = 0, nl = 0;
    tile_f32_fn f32 = kernels_for(job->isa).f32;
    for (int t = 0; t < nw; t++) {
        memcpy(tmp + nl, ws[t].lbs + q * k, ws[t].lens[q] * sizeof(float));
        nl += ws[t].lens[q];
    }
    float L = -INFINITY;
    if (nl >= k) {
        qsort(tmp, nl, sizeof(float), cmp_float_desc);
        L = tmp[k - 1];
    }
    for (int t = 0; t < nw; t++) /* worker 0 holds the lower rows: index order kept */
        for (size_t c = 0; c < ws[t].clen[q]; c++) {
            cand cd = ws[t].cands[q][c];
            if (!(cd.ub >= L))
                continue;
            float s;
            f32(job->vectors + (size_t)cd.index * d, 1, job->queries + q * d, 1, d, &s);
            hit_push(h, hlen, k, s, cd.index);
            count++;
        }
    return count;
}

int ic_topk(const ic_job *job, ic_hit *out_hits, size_t *out_kprime, size_t *out_candidates) {
    size_t m = job->m, k = job->k, n = job->n;
    int nw = job->threads >= 2 && n >= 2 * TILE_ROWS ? 2 : 1;
    worker ws[2];
    int rc = -1, started = 0;
    pthread_t th;
    size_t split = nw == 2 ? (n / 2) & ~(size_t)(TILE_ROWS - 1) : n;
    ic_hit *merged = NULL;
    float *tmp = NULL;
    memset(ws, 0, sizeof ws);
    for (int t = 0; t < nw; t++) {
        worker *w = &ws[t];
        w->job = job;
        w->r0 = t == 0 ? 0 : split;
        w->r1 = t == 0 ? split : n;
        w->lens = calloc(m, sizeof(size_t));
        if (!w->lens)
            goto cleanup;
        if (job->qvectors) {
            w->lbs = malloc(m * k * sizeof(float));
            w->cands = calloc(m, sizeof(cand *));
            w->clen = calloc(m, sizeof(size_t));
            w->ccap = calloc(m, sizeof(size_t));
            if (!w->lbs || !w->cands || !w->clen || !w->ccap)
                goto cleanup;
            for (size_t q = 0; q < m; q++) {
                w->ccap[q] = 4 * k > 256 ? 4 * k : 256;
                w->cands[q] = malloc(w->ccap[q] * sizeof(cand));
                if (!w->cands[q])
                    goto cleanup;
            }
        } else if (!(w->hits = malloc(m * k * sizeof(ic_hit)))) {
            goto cleanup;
        }
    }
    if (nw == 2)
        started = pthread_create(&th, NULL, run_worker, &ws[1]) == 0;
    run_worker(&ws[0]);
    if (nw == 2) {
        if (started)
            pthread_join(th, NULL);
        else
            run_worker(&ws[1]);
    }
    if (ws[0].oom || ws[1].oom)
        goto cleanup;

    size_t allowed = ws[0].allowed + (nw == 2 ? ws[1].allowed : 0);
    size_t kp = k < allowed ? k : allowed, total = 0;
    merged = malloc(2 * k * sizeof(ic_hit));
    tmp = malloc(2 * k * sizeof(float));
    if (!merged || !tmp)
        goto cleanup;
    for (size_t q = 0; q < m; q++) {
        size_t len = 0;
        if (job->qvectors) {
            total += rescore(job, ws, nw, q, merged, &len, tmp);
        } else {
            for (int t = 0; t < nw; t++) {
                memcpy(merged + len, ws[t].hits + q * k, ws[t].lens[q] * sizeof(ic_hit));
                len += ws[t].lens[q];
            }
        }
        qsort(merged, len, sizeof(ic_hit), cmp_better);
        memcpy(out_hits + q * kp, merged, kp * sizeof(ic_hit));
    }
    *out_kprime = kp;
    if (out_candidates)
        *out_candidates = total;
    rc = 0;
cleanup:
    for (int t = 0; t < 2; t++) {
        worker *w = &ws[t];
        if (w->cands)
            for (size_t q = 0; q < m; q++)
                free(w->cands[q]);
        free(w->cands);
        free(w->clen);
        free(w->ccap);
        free(w->lbs);
        free(w->hits);
        free(w->lens);
    }
    free(merged);
    free(tmp);
    return rc;
}
