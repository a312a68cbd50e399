/* kernels.c -- fused SIMD top-k scans (float32 and int8 + float32 re-score).
 *
 * Layout of the work: rows are cut into blocks of ROW_BLOCK rows (kept in L2);
 * every tile of up to TILE_Q queries passes over a block in micro-tiles of
 * TILE_ROWS rows, and each tile's scores go straight into per-query top-k heaps.
 * With two threads each scans half of the rows into its own heaps; the halves
 * are merged at the end (score descending, index ascending).
 *
 * The int8 path scans an int8 copy of the rows (x ~= sx * qx, ||x - sx qx|| <= ex)
 * against an int8 copy of each query (y ~= sy * qy, ||y - sy qy|| <= ey). The
 * integer dot D = qx.qy is exact (AVX-512 VNNI vpdpbusd on rows stored as
 * qx + 128 in blocks of 16 rows x 4 dims, minus 128 * sum(qy); or a scalar
 * loop), and a = sx * sy * D satisfies
 *     |x.y - a| <= ex ||y|| + (1 + ex) ey + M =: slack,
 * M covering float32 rounding (of a and of the float32 score): (2d+4) 2^-24 ||y|| 1.1.
 * Per query the k best lower bounds lb = a - slack are kept; a row whose upper
 * bound ub = a + slack is below the k-th best lower bound L cannot be in the
 * float32 top-k (k rows score at least L > ub), so only rows with ub >= L are
 * re-scored in float32 -- with the same tile code as the float32 scan, hence
 * bit-identical scores and the identical top-k.
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
/* Per-query constants of the int8 scan, shared by the workers. */
typedef struct {
    int8_t *qy;      /* (m, d4) quantised queries, zero-padded */
    float *sy, *ey;  /* scale and residual-norm bound of each quantised query */
    float *yn, *M;   /* ||y|| and the rounding margin */
    int32_t *bias;   /* 128 * sum(qy): removes the +128 offset of the stored rows */
} qctx;

/* One block of 16 rows x nq queries of the int8 scan: for lane l of query j,
 * a[j*16+l] = approximate score, slack[j*16+l] = its error bound, bit l of
 * mask[j] set when a + slack >= L[j] (the query's current threshold). */
typedef void (*tile_u8_fn)(const uint8_t *B, const int8_t *Q, int nq, size_t d4, const float *sc,
                           const float *er, const qctx *c, size_t q0, const float *L, float *a,
                           float *slack, uint32_t *mask);

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

static void kernel_scalar_u8(const uint8_t *B, const int8_t *Q, int nq, size_t d4, const float *sc,
                             const float *er, const qctx *c, size_t q0, const float *L, float *a,
                             float *slack, uint32_t *mask) {
    for (int j = 0; j < nq; j++) {
        size_t q = q0 + j;
        uint32_t mk = 0;
        for (int l = 0; l < 16; l++) {
            int32_t acc = 0;
            for (size_t s = 0; s < d4 / 4; s++)
                for (int t = 0; t < 4; t++)
                    acc += (int32_t)B[s * 64 + l * 4 + t] * Q[j * d4 + 4 * s + t];
            float av = sc[l] * (c->sy[q] * (float)(acc - c->bias[q]));
            float sl = er[l] * c->yn[q] + (1.0f + er[l]) * c->ey[q] + c->M[q];
            a[j * 16 + l] = av;
            slack[j * 16 + l] = sl;
            mk |= (uint32_t)(av + sl >= L[q]) << l;
        }
        mask[j] = mk;
    }
}

#ifdef IC_X86
/* ---------------------------------------------------------------- AVX-512 -- */
#define IC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define IC_INLINE static inline __attribute__((always_inline))

#define LD512_F32(p) _mm512_loadu_ps(p)
#define LDM512_F32(p, m) _mm512_maskz_loadu_ps((m), (p))

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

/* ------------------------------------------------------ AVX-512 VNNI int8 -- */
#define IC_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
#define U8_TILE_Q 8

IC_INLINE IC_VNNI void tile_u8(const uint8_t *B, const int8_t *Q, size_t d4, const float *sc,
                               const float *er, const qctx *c, size_t q0, const float *L, float *a,
                               float *slack, uint32_t *mask, const int NQ) {
    __m512i acc[U8_TILE_Q];
    _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++) acc[j] = _mm512_setzero_si512();
    for (size_t s = 0; s < d4 / 4; s++) {
        __m512i r = _mm512_loadu_si512((const void *)(B + s * 64));
        _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++) {
            int32_t qv;
            memcpy(&qv, Q + j * d4 + 4 * s, 4);
            acc[j] = _mm512_dpbusd_epi32(acc[j], r, _mm512_set1_epi32(qv));
        }
    }
    __m512 vsc = _mm512_loadu_ps(sc), ver = _mm512_loadu_ps(er);
    __m512 one_er = _mm512_add_ps(_mm512_set1_ps(1.0f), ver);
    _Pragma("GCC unroll 8") for (int j = 0; j < NQ; j++) {
        size_t q = q0 + j;
        __m512 D = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], _mm512_set1_epi32(c->bias[q])));
        __m512 av = _mm512_mul_ps(vsc, _mm512_mul_ps(_mm512_set1_ps(c->sy[q]), D));
        __m512 sl = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(ver, _mm512_set1_ps(c->yn[q])),
                                                _mm512_mul_ps(one_er, _mm512_set1_ps(c->ey[q]))),
                                  _mm512_set1_ps(c->M[q]));
        _mm512_storeu_ps(a + j * 16, av);
        _mm512_storeu_ps(slack + j * 16, sl);
        mask[j] = _mm512_cmp_ps_mask(_mm512_add_ps(av, sl), _mm512_set1_ps(L[q]), _CMP_GE_OQ);
    }
}

static IC_VNNI void kernel_vnni_u8(const uint8_t *B, const int8_t *Q, int nq, size_t d4, const float *sc,
                                   const float *er, const qctx *c, size_t q0, const float *L, float *a,
                                   float *slack, uint32_t *mask) {
    switch (nq) {
#define U8CASE(NQ)                                                      \
    case NQ:                                                            \
        tile_u8(B, Q, d4, sc, er, c, q0, L, a, slack, mask, NQ);        \
        break;
        U8CASE(1) U8CASE(2) U8CASE(3) U8CASE(4) U8CASE(5) U8CASE(6) U8CASE(7) U8CASE(8)
#undef U8CASE
    default:
        break;
    }
}

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
DEFINE_KERNEL(kernel_avx2_f32, IC_AVX2, float, tile256_f32, CASES_Q3)
#endif /* IC_X86 */

/* ------------------------------------------------------------- dispatch -- */

typedef struct {
    tile_f32_fn f32;
    int tile_q;
    tile_u8_fn u8; /* the int8 scan: VNNI when the CPU has it, else the scalar loop */
    int u8_tile_q;
} isa_kernels;

static isa_kernels kernels_for(ic_isa isa) {
    isa_kernels k = {kernel_scalar_f32, 1, kernel_scalar_u8, 1};
#ifdef IC_X86
    if (isa == IC_ISA_AVX512)
        k = (isa_kernels){kernel_avx512_f32, MAX_TILE_Q, kernel_scalar_u8, 1};
    else if (isa == IC_ISA_AVX2)
        k = (isa_kernels){kernel_avx2_f32, AVX2_TILE_Q, kernel_scalar_u8, 1};
    if (isa == IC_ISA_AVX512 && ic_cpu_has_vnni512()) {
        k.u8 = kernel_vnni_u8;
        k.u8_tile_q = U8_TILE_Q;
    }
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
    const qctx *qc;
    size_t r0, r1;    /* rows [r0, r1); r0 is a multiple of 16 */
    size_t allowed;   /* rows of [r0, r1) passing the tenant filter */
    ic_hit *hits;     /* f32: (m, k) heaps */
    float *lbs;       /* int8: (m, k) heaps of lower bounds */
    float *L;         /* int8: (m,) current k-th best lower bound (-inf until k seen) */
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

/* Rows of one 16-row block whose upper bound reached the threshold. */
static void scan_u8(worker *w, size_t r, size_t qb, int nq, const float *a, const float *slack,
                    const uint32_t *mask) {
    const ic_job *job = w->job;
    size_t k = job->k;
    for (int j = 0; j < nq; j++) {
        size_t q = qb + j;
        for (uint32_t mk = mask[j]; mk; mk &= mk - 1) {
            int l = __builtin_ctz(mk);
            size_t row = r + (size_t)l;
            if (row >= w->r1 || (job->codes && job->codes[row] != job->tenant))
                continue;
            float av = a[j * 16 + l], sl = slack[j * 16 + l], ub = av + sl;
            if (!(ub >= w->L[q]))
                continue;
            float *h = w->lbs + q * k;
            float_push(h, &w->lens[q], k, av - sl);
            if (w->lens[q] == k)
                w->L[q] = h[0];
            if (!(ub >= w->L[q]))
                continue;
            if (w->clen[q] == w->ccap[q]) { /* compact, then grow if still crowded */
                cand *c = w->cands[q];
                size_t kept = 0;
                for (size_t t = 0; t < w->clen[q]; t++)
                    if (c[t].ub >= w->L[q])
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
            w->cands[q][w->clen[q]++] = (cand){(int64_t)row, ub};
        }
    }
}

static void run_f32(worker *w, isa_kernels kern) {
    const ic_job *job = w->job;
    size_t d = job->d, m = job->m;
    float out[TILE_ROWS * MAX_TILE_Q];
    for (size_t rb = w->r0; rb < w->r1; rb += ROW_BLOCK) {
        size_t re = rb + ROW_BLOCK < w->r1 ? rb + ROW_BLOCK : w->r1;
        for (size_t qb = 0; qb < m; qb += kern.tile_q) {
            int nq = (int)(m - qb < (size_t)kern.tile_q ? m - qb : (size_t)kern.tile_q);
            for (size_t r = rb; r < re; r += TILE_ROWS) {
                int nr = (int)(re - r < TILE_ROWS ? re - r : TILE_ROWS);
                kern.f32(job->vectors + r * d, nr, job->queries + qb * d, nq, d, out);
                scan_f32(w, out, r, nr, qb, nq);
            }
        }
    }
}

#define U8_ROW_BLOCK 1024 /* rows of int8 copy kept in L2 while every query tile passes */

static void run_u8(worker *w, isa_kernels kern) {
    const ic_job *job = w->job;
    const qctx *qc = w->qc;
    size_t d4 = (job->d + 3) / 4 * 4, m = job->m;
    float a[16 * U8_TILE_Q], slack[16 * U8_TILE_Q];
    uint32_t mask[U8_TILE_Q];
    for (size_t q = 0; q < m; q++)
        w->L[q] = -INFINITY;
    for (size_t rb = w->r0; rb < w->r1 && !w->oom; rb += U8_ROW_BLOCK) {
        size_t re = rb + U8_ROW_BLOCK < w->r1 ? rb + U8_ROW_BLOCK : w->r1;
        for (size_t qb = 0; qb < m && !w->oom; qb += kern.u8_tile_q) {
            int nq = (int)(m - qb < (size_t)kern.u8_tile_q ? m - qb : (size_t)kern.u8_tile_q);
            for (size_t r = rb; r < re && !w->oom; r += 16) {
                kern.u8(job->packed + r * d4, qc->qy + qb * d4, nq, d4, job->scales + r, job->errs + r, qc,
                        qb, w->L, a, slack, mask);
                scan_u8(w, r, qb, nq, a, slack, mask);
            }
        }
    }
}

static void *run_worker(void *arg) {
    worker *w = arg;
    const ic_job *job = w->job;
    isa_kernels kern = kernels_for(job->isa);
    w->allowed = 0;
    for (size_t r = w->r0; r < w->r1; r++)
        w->allowed += !job->codes || job->codes[r] == job->tenant;
    if (job->packed)
        run_u8(w, kern);
    else
        run_f32(w, kern);
    return NULL;
}

/* Quantise the queries for the int8 scan (same rule as the rows: s = max|y| / 127). */
static int quantise_queries(const ic_job *job, qctx *c) {
    size_t m = job->m, d = job->d, d4 = (d + 3) / 4 * 4;
    c->qy = calloc(m * d4, 1);
    c->sy = malloc(m * sizeof(float));
    c->ey = malloc(m * sizeof(float));
    c->yn = malloc(m * sizeof(float));
    c->M = malloc(m * sizeof(float));
    c->bias = malloc(m * sizeof(int32_t));
    if (!c->qy || !c->sy || !c->ey || !c->yn || !c->M || !c->bias)
        return -1;
    for (size_t q = 0; q < m; q++) {
        const float *y = job->queries + q * d;
        float mx = 0.0f;
        double norm2 = 0.0, err2 = 0.0;
        int32_t sum = 0;
        for (size_t t = 0; t < d; t++) {
            mx = fabsf(y[t]) > mx ? fabsf(y[t]) : mx;
            norm2 += (double)y[t] * y[t];
        }
        float s = mx > 0.0f ? mx / 127.0f : 1.0f;
        for (size_t t = 0; t < d; t++) {
            float v = nearbyintf(y[t] / s);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            c->qy[q * d4 + t] = (int8_t)v;
            sum += (int32_t)v;
            double r = (double)y[t] - (double)s * v;
            err2 += r * r;
        }
        c->sy[q] = s;
        c->ey[q] = nextafterf((float)(sqrt(err2) * (1.0 + 1e-9)), INFINITY);
        c->yn[q] = nextafterf((float)sqrt(norm2), INFINITY);
        c->M[q] = (float)((2.0 * d + 4.0) * 0x1p-24 * sqrt(norm2) * 1.1 + 1e-7);
        c->bias[q] = 128 * sum;
    }
    return 0;
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
    int nw = job->threads >= 2 && n >= 64 ? 2 : 1;
    worker ws[2];
    qctx qc;
    int rc = -1, started = 0;
    pthread_t th;
    size_t split = nw == 2 ? (n / 2) & ~(size_t)15 : n; /* block aligned for the int8 copy */
    ic_hit *merged = NULL;
    float *tmp = NULL;
    memset(ws, 0, sizeof ws);
    memset(&qc, 0, sizeof qc);
    if (job->packed && quantise_queries(job, &qc) < 0)
        goto cleanup;
    for (int t = 0; t < nw; t++) {
        worker *w = &ws[t];
        w->job = job;
        w->qc = &qc;
        w->r0 = t == 0 ? 0 : split;
        w->r1 = t == 0 ? split : n;
        w->lens = calloc(m, sizeof(size_t));
        if (!w->lens)
            goto cleanup;
        if (job->packed) {
            w->lbs = malloc(m * k * sizeof(float));
            w->L = malloc(m * sizeof(float));
            w->cands = calloc(m, sizeof(cand *));
            w->clen = calloc(m, sizeof(size_t));
            w->ccap = calloc(m, sizeof(size_t));
            if (!w->lbs || !w->L || !w->cands || !w->clen || !w->ccap)
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
        if (job->packed) {
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
        free(w->L);
        free(w->hits);
        free(w->lens);
    }
    free(qc.qy);
    free(qc.sy);
    free(qc.ey);
    free(qc.yn);
    free(qc.M);
    free(qc.bias);
    free(merged);
    free(tmp);
    return rc;
}

/* ---------------------------------------------------------------- gather -- */
/* Exact re-score of chosen rows (kernels.h, ic_gather). The double product of two
 * floats is exact, so fma(r, q, acc) == acc + r * q in every ISA, and a lane never
 * holds -0.0 (it starts at +0.0), so the zero-padded tail adds nothing. Rows are
 * taken GATHER_ROWS at a time: independent accumulators hide the add latency. */
#define GATHER_ROWS 4

static inline float reduce8(const double *l) {
    return (float)(((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])));
}

static void gather_scalar(const float *const *R, int nr, const float *q, size_t d, float *out) {
    for (int i = 0; i < nr; i++) {
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (size_t t = 0; t < d; t++)
            acc[t & 7] += (double)R[i][t] * (double)q[t];
        out[i] = reduce8(acc);
    }
}

#ifdef IC_X86
IC_INLINE IC_AVX512 void g512(const float *const *R, const float *q, size_t d, float *out, const int NR) {
    __m512d acc[GATHER_ROWS];
    _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) acc[i] = _mm512_setzero_pd();
    size_t t = 0;
    for (; t + 8 <= d; t += 8) {
        __m512d qv = _mm512_cvtps_pd(_mm256_loadu_ps(q + t));
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++)
            acc[i] = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_loadu_ps(R[i] + t)), qv, acc[i]);
    }
    if (t < d) {
        __mmask8 mk = (__mmask8)((1u << (d - t)) - 1u);
        __m512d qv = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, q + t));
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++)
            acc[i] = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, R[i] + t)), qv, acc[i]);
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) {
        double l[8];
        _mm512_storeu_pd(l, acc[i]);
        out[i] = reduce8(l);
    }
}

IC_INLINE IC_AVX2 void g256(const float *const *R, const float *q, size_t d, float *out, const int NR) {
    __m256d lo[GATHER_ROWS], hi[GATHER_ROWS]; /* lanes 0-3 and 4-7 */
    _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) lo[i] = hi[i] = _mm256_setzero_pd();
    size_t t = 0;
    for (; t + 8 <= d; t += 8) {
        __m256 qf = _mm256_loadu_ps(q + t);
        __m256d ql = _mm256_cvtps_pd(_mm256_castps256_ps128(qf)), qh = _mm256_cvtps_pd(_mm256_extractf128_ps(qf, 1));
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) {
            __m256 r = _mm256_loadu_ps(R[i] + t);
            lo[i] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(r)), ql, lo[i]);
            hi[i] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(r, 1)), qh, hi[i]);
        }
    }
    if (t < d) {
        __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(d - t)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 qf = _mm256_maskload_ps(q + t, mk);
        __m256d ql = _mm256_cvtps_pd(_mm256_castps256_ps128(qf)), qh = _mm256_cvtps_pd(_mm256_extractf128_ps(qf, 1));
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) {
            __m256 r = _mm256_maskload_ps(R[i] + t, mk);
            lo[i] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(r)), ql, lo[i]);
            hi[i] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(r, 1)), qh, hi[i]);
        }
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) {
        double l[8];
        _mm256_storeu_pd(l, lo[i]);
        _mm256_storeu_pd(l + 4, hi[i]);
        out[i] = reduce8(l);
    }
}

#define DEFINE_GATHER(NAME, ATTR, TILE)                                                          \
    static ATTR void NAME(const float *const *R, int nr, const float *q, size_t d, float *out) { \
        switch (nr) {                                                                            \
        case 1: TILE(R, q, d, out, 1); break;                                                    \
        case 2: TILE(R, q, d, out, 2); break;                                                    \
        case 3: TILE(R, q, d, out, 3); break;                                                    \
        case 4: TILE(R, q, d, out, 4); break;                                                    \
        default: break;                                                                          \
        }                                                                                        \
    }
DEFINE_GATHER(gather_avx512, IC_AVX512, g512)
DEFINE_GATHER(gather_avx2, IC_AVX2, g256)
#endif /* IC_X86 */

void ic_gather(const float *vectors, size_t d, const float *queries, size_t m, const int64_t *rows,
               size_t c, ic_isa isa, float *out) {
    void (*g)(const float *const *, int, const float *, size_t, float *) = gather_scalar;
#ifdef IC_X86
    if (isa == IC_ISA_AVX512)
        g = gather_avx512;
    else if (isa == IC_ISA_AVX2)
        g = gather_avx2;
#endif
    for (size_t q = 0; q < m; q++)
        for (size_t j = 0; j < c; j += GATHER_ROWS) {
            int nr = (int)(c - j < GATHER_ROWS ? c - j : GATHER_ROWS);
            const float *R[GATHER_ROWS];
            for (int i = 0; i < nr; i++)
                R[i] = vectors + (size_t)rows[q * c + j + (size_t)i] * d;
            g(R, nr, queries + q * d, d, out + q * c + j);
        }
}
