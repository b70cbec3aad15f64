/* int8 matmuls for decoding on x86-64 CPUs with AVX-512 VNNI: y[M, N] = x[M, K] @ (q[N, K] * scale[N]).T + bias.
 *
 * Why hand-written: decoding multiplies one to a few rows by every weight, so a step is as fast as the weights stream
 * from memory. PyTorch's CPU kernels fall short there (measured in docs/benchmarks.md): `_weight_int8pack_mm` widens
 * each int8 weight to fp32 and is compute-bound on one core; `torch._int_mm` and the fbgemm/oneDNN int8 linears reach
 * 5-8 GB/s at 8 rows against 15 GB/s of memory. Here each 64-byte line of weights is read once per block of rows
 * and consumed by one VNNI dot-product instruction per row (int8 x int8 -> int32, exact), so both batch 1 and
 * batch 8 stay near the memory's speed. q is the row-major [N, K] int8 layout the rest of codegen2 keeps (no
 * repacking, no second copy).
 *
 * Two schemes, the same int8 weights:
 * - dynamic (`int8-dynamic`): each row of x is rounded to int8 with its own scale max|x[m]| / 127 (the rule of
 *   quantize.quantize_activations: x / scale, rounded half to even, clamped to +-127), the products are summed
 *   exactly in int32, then scaled by row scale x channel scale. VNNI multiplies unsigned by signed bytes, so x
 *   is stored shifted by +128 and 128 * sum_k q[n, k] is subtracted (sums computed in the same pass).
 * - weight-only (`int8`): x stays fp32; each int8 weight is widened to fp32 and multiply-added.
 *
 * Rows of q are split between threads (OpenMP). Each thread walks blocks of NR weight rows (when decoding, one row from
 * each of NR long streams: see run_range) and, for each block, every block of MR input rows, so a block of weights
 * is read from memory once and reused from L1 for all rows of x.
 */
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <cpuid.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* What this CPU runs, as the paths of int8_matmul_dynamic / int8_matmul_weight_only: 0 none of them, 1 AVX2 and FMA
 * (PATH_AVX2), 2 also AVX-512 VNNI (PATH_VNNI), 3 also AMX int8 tiles that the OS lets this process use (PATH_AMX).
 * The loader asks once per process; asking for AMX also requests the permission Linux wants before the first tile
 * instruction (arch_prctl ARCH_REQ_XCOMP_PERM), so a kernel that refuses it reports level 2. */
enum { PATH_AVX2 = 1, PATH_VNNI = 2, PATH_AMX = 3 };

static int amx_usable(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return 0;
    /* bits 17 and 18 of XCR0: the OS saves the tile configuration and data */
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
#ifdef SYS_arch_prctl
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

int int8_cpu_level(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512vnni")))
        return PATH_AVX2;
    return amx_usable() ? PATH_AMX : PATH_VNNI;
}

/* Thread splitting, compiled for any x86-64 CPU (outside the AVX-512 and AVX2 regions below, so the AVX2 path
 * never calls code built for AVX-512). */
static int threads_for(int nthreads, int64_t blocks) {
    if (nthreads < 1) nthreads = 1;
    return blocks < nthreads ? (int)blocks : nthreads;
}

/* This thread's number inside an OpenMP parallel region (0 without OpenMP). */
static inline int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Where thread t of `threads` begins, splitting `units` whole units of `unit` rows evenly (end: share(t + 1)). */
static inline int64_t share(int64_t units, int t, int threads, int64_t unit) { return units * t / threads * unit; }

/* The AVX-512 VNNI path (and the AMX path, which shares its quantizing and its leftover rows); only called where
 * int8_cpu_level() says so. */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

/* acc += u8 a . s8 w, in place. The intrinsic (_mm512_dpbusd_epi32) returns a new vector, and GCC 12 then copies and
 * spills every accumulator on every step (measured: 2-3x slower); with the accumulator as an in-out operand it does not. */
#define DPBUSD(acc, a, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w))

/* Complete unrolling of the loops over block rows lets GCC keep each accumulator in its own register. */
#define UNROLL _Pragma("GCC unroll 8")

#define MR 8     /* input rows multiplied per pass over a block of weights */
#define NR_MAX 8 /* weight rows per block, at most */

/* Weight rows per block for a pass of `mrows` input rows: as many as keep mrows x rows <= 24 accumulators in the 32
 * vector registers. More rows per block at batch 1 keeps more memory streams in flight. */
static int block_rows(int64_t mrows) { return mrows <= 2 ? 8 : mrows <= 4 ? 6 : 3; }

static inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

/* Round each row of x [M, K] to int8 (+128 as uint8, zero-padded to Kp) and return its scale in xs[m]. */
static void quantize_rows_u8(const float *x, int64_t M, int64_t K, int64_t Kp, uint8_t *xq, float *xs) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        __m512 vmax = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        float amax = _mm512_reduce_max_ps(vmax);
        for (; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
        float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
        xs[m] = scale;
        uint8_t *out = xq + m * Kp;
        __m512 vscale = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        __m512i shift = _mm512_set1_epi32(128);
        for (k = 0; k + 16 <= K; k += 16) {
            __m512 v = _mm512_div_ps(_mm512_loadu_ps(row + k), vscale);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(v), shift);
            _mm_storeu_si128((__m128i *)(out + k), _mm512_cvtepi32_epi8(i));
        }
        for (; k < K; k++) {
            float v = nearbyintf(row[k] / scale);
            v = fminf(fmaxf(v, -127.0f), 127.0f);
            out[k] = (uint8_t)((int)v + 128);
        }
        memset(out + K, 0, (size_t)(Kp - K));
    }
}

/* Horizontal sums of four accumulators at once (fold each to 128 bits, then two rounds of pairwise adds): about half
 * the instructions of four separate reductions, which matters for the short rows of small models (K = 768). */
static inline __attribute__((always_inline)) __m128i fold_epi32(__m512i v) {
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
static inline __attribute__((always_inline)) __m128i sum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
    return _mm_hadd_epi32(_mm_hadd_epi32(fold_epi32(a), fold_epi32(b)), _mm_hadd_epi32(fold_epi32(c), fold_epi32(d)));
}
static inline __attribute__((always_inline)) __m128 fold_ps(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
static inline __attribute__((always_inline)) __m128 sum4_ps(__m512 a, __m512 b, __m512 c, __m512 d) {
    return _mm_hadd_ps(_mm_hadd_ps(fold_ps(a), fold_ps(b)), _mm_hadd_ps(fold_ps(c), fold_ps(d)));
}
/* One sum in exactly sum4_ps's order, so a row's result never depends on how many rows share its block. */
static inline __attribute__((always_inline)) float sum1_ps(__m512 v) {
    __m128 f = fold_ps(v);
    f = _mm_hadd_ps(f, f);
    return _mm_cvtss_f32(_mm_hadd_ps(f, f));
}

/* DST[j] = horizontal sum of VEC[j] for j < NROWS (constant), four at a time. */
#define REDUCE_ROW(DST, VEC, NROWS, SUM4, STORE4, REDUCE1)                                                           \
    do {                                                                                                             \
        int j = 0;                                                                                                   \
        UNROLL for (; j + 4 <= NROWS; j += 4) STORE4(&(DST)[j], SUM4((VEC)[j], (VEC)[j + 1], (VEC)[j + 2], (VEC)[j + 3])); \
        UNROLL for (; j < NROWS; j++)(DST)[j] = REDUCE1((VEC)[j]);                                                   \
    } while (0)
#define STORE4_EPI32(p, v) _mm_storeu_si128((__m128i *)(p), v)
#define STORE4_PS(p, v) _mm_storeu_ps(p, v)

/* Block kernels: MROWS input rows x NROWS weight rows over the whole of K. Each is its own function with constant loop
 * bounds (generated below for every shape used) because GCC keeps the accumulators in registers only then; with
 * run-time bounds, or a branch inside the loop, it stores all of them to the stack on every step. The last, partial
 * column of K is a masked step after the main loop. All input rows of a pass share one read of each weight vector:
 * a second pass over the same block from L1 would not overlap with the memory stalls of the first. */

/* One 64-byte column of K: NROWS weight vectors (row j at q + j * stride) loaded with LOAD_W (an expression of j and
 * k), multiply-added. Each step also prefetches into L2 the bytes `pf` past each row's column: for a block of
 * consecutive rows the same column two blocks ahead (pf = 2 * NROWS * K), for a block of streams STREAM_PREFETCH
 * bytes down each stream. Two blocks ahead, against none: the hardware prefetcher ramps up late on rows of a few hundred bytes
 * and stops at page ends, and a pass at 8 input rows, whose multiply-adds take longer than the loads, otherwise
 * leaves the memory idle part of the time. Measured on 125M/1B-shaped weights, one thread, GB/s of weights:
 * batch 1 11.4 -> 13.3 and 13.8 -> 14.7, batch 8 7.8 -> 9.6 and 8.3 -> 10.4 (against a fixed 1 KB ahead per row
 * into L1; one block ahead or into L1 was within noise of this, none at all worse still).
 * Past the last block it prefetches addresses beyond the weights, which never faults. */
#define U8S8_STEP(MROWS, NROWS, WITH_SUMS, LOAD_W)                                                                   \
    do {                                                                                                             \
        __m512i w[NROWS];                                                                                            \
        UNROLL for (int j = 0; j < NROWS; j++) _mm_prefetch((const char *)(q + j * stride + pf + k), _MM_HINT_T1);    \
        UNROLL for (int j = 0; j < NROWS; j++) w[j] = LOAD_W;                                                        \
        if (WITH_SUMS)                                                                                               \
            UNROLL for (int j = 0; j < NROWS; j++) DPBUSD(rs[j], ones, w[j]);                                        \
        UNROLL for (int i = 0; i < MROWS; i++) {                                                                     \
            __m512i a = _mm512_load_si512(xq + i * Kp + k);                                                          \
            UNROLL for (int j = 0; j < NROWS; j++) DPBUSD(acc[i][j], a, w[j]);                                       \
        }                                                                                                            \
    } while (0)

/* u8 x s8 -> int32 sums of the rows of xq (+128 shifted, 64-byte aligned rows of Kp bytes) with the rows of q; with
 * WITH_SUMS also sum_k q[n, k] (needed once per weight row to remove the shift). */
#define DEFINE_U8S8(MROWS, NROWS, WITH_SUMS)                                                                         \
    static void u8s8_##MROWS##x##NROWS##_##WITH_SUMS(const uint8_t *xq, int64_t Kp, const int8_t *q, int64_t K,      \
                                                     int64_t stride, int64_t pf, int32_t out[MR][NR_MAX],             \
                                                     int32_t sums[NR_MAX]) {                                         \
        const __m512i ones = _mm512_set1_epi8(1);                                                                    \
        __m512i acc[MROWS][NROWS], rs[NROWS];                                                                        \
        UNROLL for (int i = 0; i < MROWS; i++)                                                                       \
            UNROLL for (int j = 0; j < NROWS; j++) acc[i][j] = _mm512_setzero_si512();                               \
        UNROLL for (int j = 0; j < NROWS; j++) rs[j] = _mm512_setzero_si512();                                       \
        int64_t k = 0;                                                                                               \
        for (; k + 64 <= K; k += 64) U8S8_STEP(MROWS, NROWS, WITH_SUMS, _mm512_loadu_si512(q + j * stride + k));          \
        if (k < K) {                                                                                                 \
            const __mmask64 mask = ((__mmask64)1 << (K - k)) - 1;                                                    \
            U8S8_STEP(MROWS, NROWS, WITH_SUMS, _mm512_maskz_loadu_epi8(mask, q + j * stride + k));                        \
        }                                                                                                            \
        UNROLL for (int i = 0; i < MROWS; i++)                                                                       \
            REDUCE_ROW(out[i], acc[i], NROWS, sum4_epi32, STORE4_EPI32, _mm512_reduce_add_epi32);                   \
        if (WITH_SUMS) REDUCE_ROW(sums, rs, NROWS, sum4_epi32, STORE4_EPI32, _mm512_reduce_add_epi32);               \
    }

/* One 16-wide column of K for the weight-only scheme: int8 weights widened to fp32, fp32 multiply-adds. */
#define F32S8_STEP(MROWS, NROWS, MASK)                                                                               \
    do {                                                                                                             \
        __m512 w[NROWS];                                                                                             \
        if ((k & 63) == 0) UNROLL for (int j = 0; j < NROWS; j++) _mm_prefetch((const char *)(q + j * stride + pf + k), _MM_HINT_T1); \
        UNROLL for (int j = 0; j < NROWS; j++)                                                                       \
            w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(MASK, q + j * stride + k)));              \
        UNROLL for (int i = 0; i < MROWS; i++) {                                                                     \
            __m512 a = _mm512_maskz_loadu_ps(MASK, x + i * K + k);                                                   \
            UNROLL for (int j = 0; j < NROWS; j++) acc[i][j] = _mm512_fmadd_ps(a, w[j], acc[i][j]);                  \
        }                                                                                                            \
    } while (0)

#define DEFINE_F32S8(MROWS, NROWS)                                                                                   \
    static void f32s8_##MROWS##x##NROWS(const float *x, int64_t K, const int8_t *q, int64_t stride, int64_t pf,      \
                                         float out[MR][NR_MAX]) {                                                \
        __m512 acc[MROWS][NROWS];                                                                                    \
        UNROLL for (int i = 0; i < MROWS; i++)                                                                       \
            UNROLL for (int j = 0; j < NROWS; j++) acc[i][j] = _mm512_setzero_ps();                                  \
        int64_t k = 0;                                                                                               \
        for (; k + 16 <= K; k += 16) F32S8_STEP(MROWS, NROWS, (__mmask16)0xFFFF);                                    \
        if (k < K) F32S8_STEP(MROWS, NROWS, (__mmask16)((1u << (K - k)) - 1));                                       \
        UNROLL for (int i = 0; i < MROWS; i++)                                                                       \
            REDUCE_ROW(out[i], acc[i], NROWS, sum4_ps, STORE4_PS, sum1_ps);                                          \
    }

/* Every shape used: NROWS = block_rows(mrows) for passes of 1..MR rows, and NROWS = 1 for a block's last rows. */
#define DEFINE_SHAPE(MROWS, NROWS) DEFINE_U8S8(MROWS, NROWS, 0) DEFINE_U8S8(MROWS, NROWS, 1) DEFINE_F32S8(MROWS, NROWS)
DEFINE_SHAPE(1, 8) DEFINE_SHAPE(2, 8)
DEFINE_SHAPE(1, 6) DEFINE_SHAPE(2, 6) DEFINE_SHAPE(3, 6) DEFINE_SHAPE(4, 6)
DEFINE_SHAPE(1, 3) DEFINE_SHAPE(2, 3) DEFINE_SHAPE(3, 3) DEFINE_SHAPE(4, 3)
DEFINE_SHAPE(5, 3) DEFINE_SHAPE(6, 3) DEFINE_SHAPE(7, 3) DEFINE_SHAPE(8, 3)
DEFINE_SHAPE(1, 1) DEFINE_SHAPE(2, 1) DEFINE_SHAPE(3, 1) DEFINE_SHAPE(4, 1)
DEFINE_SHAPE(5, 1) DEFINE_SHAPE(6, 1) DEFINE_SHAPE(7, 1) DEFINE_SHAPE(8, 1)

typedef void (*u8s8_fn)(const uint8_t *, int64_t, const int8_t *, int64_t, int64_t, int64_t, int32_t[MR][NR_MAX],
                        int32_t[NR_MAX]);
typedef void (*f32s8_fn)(const float *, int64_t, const int8_t *, int64_t, int64_t, float[MR][NR_MAX]);

/* The kernel for mrows input rows and nrows (1 or block_rows) weight rows. */
#define PICK(MROWS, NROWS, FN)                                                                                       \
    if (mrows == MROWS && nrows == NROWS) return FN;
static u8s8_fn pick_u8s8(int mrows, int nrows, int with_sums) {
#define P(MROWS, NROWS) PICK(MROWS, NROWS, with_sums ? u8s8_##MROWS##x##NROWS##_1 : u8s8_##MROWS##x##NROWS##_0)
    P(1, 8) P(2, 8) P(1, 6) P(2, 6) P(3, 6) P(4, 6) P(1, 3) P(2, 3) P(3, 3) P(4, 3) P(5, 3) P(6, 3) P(7, 3) P(8, 3)
    P(1, 1) P(2, 1) P(3, 1) P(4, 1) P(5, 1) P(6, 1) P(7, 1) P(8, 1)
#undef P
    return NULL;
}
static f32s8_fn pick_f32s8(int mrows, int nrows) {
#define P(MROWS, NROWS) PICK(MROWS, NROWS, f32s8_##MROWS##x##NROWS)
    P(1, 8) P(2, 8) P(1, 6) P(2, 6) P(3, 6) P(4, 6) P(1, 3) P(2, 3) P(3, 3) P(4, 3) P(5, 3) P(6, 3) P(7, 3) P(8, 3)
    P(1, 1) P(2, 1) P(3, 1) P(4, 1) P(5, 1) P(6, 1) P(7, 1) P(8, 1)
#undef P
    return NULL;
}
#undef PICK

/* Rescale one row of a block's results, 8 outputs per instruction (the last group masked, so every output goes
 * through the same instructions whatever its position: a row's result never depends on the block shape).
 * Dynamic: y = (float)(sum - 128 * rowsum) * x_scale * scale (+ bias); weight-only: y = sum * scale (+ bias). */
static inline void rescale_dynamic(const int32_t *acc, const int32_t *sums, float x_scale, const float *scale,
                                   const float *bias, float *y, int nr) {
    for (int j = 0; j < nr; j += 8) {
        const __mmask8 m = nr - j >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (nr - j)) - 1);
        __m256i unshifted = _mm256_sub_epi32(_mm256_maskz_loadu_epi32(m, acc + j),
                                             _mm256_slli_epi32(_mm256_maskz_loadu_epi32(m, sums + j), 7));
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(unshifted), _mm256_set1_ps(x_scale));
        v = _mm256_mul_ps(v, _mm256_maskz_loadu_ps(m, scale + j));
        if (bias) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(m, bias + j));
        _mm256_mask_storeu_ps(y + j, m, v);
    }
}

static inline void rescale_weight_only(const float *acc, const float *scale, const float *bias, float *y, int nr) {
    for (int j = 0; j < nr; j += 8) {
        const __mmask8 m = nr - j >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (nr - j)) - 1);
        __m256 v = _mm256_mul_ps(_mm256_maskz_loadu_ps(m, acc + j), _mm256_maskz_loadu_ps(m, scale + j));
        if (bias) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(m, bias + j));
        _mm256_mask_storeu_ps(y + j, m, v);
    }
}


/* One call's operands; xq and xs (the rounded input rows and their scales) only for the dynamic scheme. */
struct job {
    const float *x;
    const uint8_t *xq;
    const float *xs;
    int64_t M, K, Kp, N;
    const int8_t *q;
    const float *scale;
    const int32_t *qsum;
    const float *bias;
    float *y;
};

/* How far ahead of itself each stream of weight rows prefetches (bytes), with few input rows (see run_range). */
#define STREAM_PREFETCH 1024

/* A block of weight rows: nr rows n0, n0 + gap, ..., n0 + (nr - 1) * gap, where nr is the block size nb or, for the
 * last rows of a range, fewer. gap 1: consecutive rows; gap > 1: one row from each of nb long streams. pf: how many
 * bytes past each row's current column to prefetch. */
struct block {
    int64_t n0, gap, pf;
    int nb, nr;
};

/* The per-channel values of a block's rows (scale, bias, row sums) next to each other: pointers into the model's
 * arrays for consecutive rows, else gathered into `buf` (so rescaling runs the same instructions either way). */
static const float *block_values_f32(const float *all, const struct block *b, float *buf) {
    if (!all) return NULL;
    if (b->gap == 1) return all + b->n0;
    for (int j = 0; j < b->nr; j++) buf[j] = all[b->n0 + j * b->gap];
    return buf;
}

/* Where row i of the output goes: straight into y for consecutive rows, else through `tmp`, scattered by `put_row`. */
static float *out_row(const struct job *job, const struct block *b, int64_t m, float *tmp) {
    return b->gap == 1 ? job->y + m * job->N + b->n0 : tmp;
}
static void put_row(const struct job *job, const struct block *b, int64_t m, const float *tmp) {
    if (b->gap != 1)
        for (int j = 0; j < b->nr; j++) job->y[m * job->N + b->n0 + j * b->gap] = tmp[j];
}

/* A block's weight rows times every input row, dynamic scheme. */
static void block_dynamic(const struct job *job, const struct block *b) {
    const int64_t K = job->K, Kp = job->Kp, n0 = b->n0, gap = b->gap;
    const int nb = b->nb, nr = b->nr;
    int32_t sums[NR_MAX] = {0}, out[MR][NR_MAX], first[NR_MAX];
    float scale_buf[NR_MAX], bias_buf[NR_MAX], tmp[NR_MAX];
    const float *scale = block_values_f32(job->scale, b, scale_buf), *bias = block_values_f32(job->bias, b, bias_buf);
    for (int64_t m0 = 0; m0 < job->M; m0 += MR) {
        const int mr = job->M - m0 < MR ? (int)(job->M - m0) : MR;
        const int with_sums = m0 == 0 && !job->qsum;
        const uint8_t *xq = job->xq + m0 * Kp;
        if (m0 == 0 && job->qsum)
            for (int j = 0; j < nr; j++) sums[j] = job->qsum[n0 + j * gap];
        if (nr == nb) {
            pick_u8s8(mr, nb, with_sums)(xq, Kp, job->q + n0 * K, K, gap * K, b->pf, out, sums);
        } else { /* the last rows of a range, one at a time */
            for (int j = 0; j < nr; j++) {
                int32_t col[MR][NR_MAX];
                pick_u8s8(mr, 1, with_sums)(xq, Kp, job->q + (n0 + j * gap) * K, K, K, 2 * K, col,
                                            with_sums ? first : NULL);
                for (int i = 0; i < mr; i++) out[i][j] = col[i][0];
                if (with_sums) sums[j] = first[0];
            }
        }
        for (int i = 0; i < mr; i++) {
            float *y = out_row(job, b, m0 + i, tmp);
            rescale_dynamic(out[i], sums, job->xs[m0 + i], scale, bias, y, nr);
            put_row(job, b, m0 + i, y);
        }
    }
}

/* The same for the weight-only scheme (fp32 input rows). */
static void block_weight_only(const struct job *job, const struct block *b) {
    const int64_t K = job->K, n0 = b->n0, gap = b->gap;
    const int nb = b->nb, nr = b->nr;
    float out[MR][NR_MAX], scale_buf[NR_MAX], bias_buf[NR_MAX], tmp[NR_MAX];
    const float *scale = block_values_f32(job->scale, b, scale_buf), *bias = block_values_f32(job->bias, b, bias_buf);
    for (int64_t m0 = 0; m0 < job->M; m0 += MR) {
        const int mr = job->M - m0 < MR ? (int)(job->M - m0) : MR;
        const float *x = job->x + m0 * K;
        if (nr == nb) {
            pick_f32s8(mr, nb)(x, K, job->q + n0 * K, gap * K, b->pf, out);
        } else {
            for (int j = 0; j < nr; j++) {
                float col[MR][NR_MAX];
                pick_f32s8(mr, 1)(x, K, job->q + (n0 + j * gap) * K, K, 2 * K, col);
                for (int i = 0; i < mr; i++) out[i][j] = col[i][0];
            }
        }
        for (int i = 0; i < mr; i++) {
            float *y = out_row(job, b, m0 + i, tmp);
            rescale_weight_only(out[i], scale, bias, y, nr);
            put_row(job, b, m0 + i, y);
        }
    }
}

static void run_block(const struct job *job, int dynamic, const struct block *b) {
    if (dynamic)
        block_dynamic(job, b);
    else
        block_weight_only(job, b);
}

/* Weight rows begin..end of one thread. At most MR input rows (decoding), the range is cut into nb streams of
 * consecutive rows and each block takes the next row of every stream: the memory then sees nb long sequential reads,
 * which the hardware prefetcher follows across rows, and each stream prefetches STREAM_PREFETCH bytes ahead of
 * itself. Rows of a few hundred bytes taken in blocks of consecutive rows instead make nb short streams per block,
 * on which the prefetcher never gets going. Measured on 125M/1B-shaped weights, one thread, against consecutive
 * blocks in the same run: dynamic batch 1 1.07x / 1.05x, batch 4 1.11x / 1.04x, batch 8 1.08-1.18x / 1.02-1.05x,
 * weight-only batch 1 1.22x / 1.12x; 2 KB ahead was within noise of 1 KB, twice as many streams no better. With
 * more input rows (prefill) the weights are reused from L1 over several passes and streams measured slower. The
 * rows left over (fewer than nb) go in blocks of consecutive rows, like every block of a long input. */
static void run_range(const struct job *job, int dynamic, int nb, int64_t begin, int64_t end) {
    const int64_t K = job->K;
    if (job->M <= MR) {
        const int64_t len = (end - begin) / nb;
        if (len >= 2) {
            for (int64_t i = 0; i < len; i++) {
                const struct block b = {begin + i, len, STREAM_PREFETCH, nb, nb};
                run_block(job, dynamic, &b);
            }
            begin += len * nb;
        }
    }
    for (int64_t n0 = begin; n0 < end; n0 += nb) {
        const struct block b = {n0, 1, 2 * nb * K, nb, end - n0 < nb ? (int)(end - n0) : nb};
        run_block(job, dynamic, &b);
    }
}

/* Split the weight rows between threads (whole blocks each); every block multiplies all input rows. */
static void run_blocks(const struct job *job, int dynamic, int nthreads) {
    const int nb = block_rows(job->M < MR ? job->M : MR);
    const int64_t blocks = (job->N + nb - 1) / nb;
    const int threads = threads_for(nthreads, blocks);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = thread_index();
        const int64_t begin = share(blocks, t, threads, nb), end = share(blocks, t + 1, threads, nb);
        run_range(job, dynamic, nb, begin, end < job->N ? end : job->N);
    }
}

/* The rounded input rows (x_q, +128 as uint8, rows of Kp bytes) and their scales; NULL if out of memory. */
static uint8_t *quantized_input(const float *x, int64_t M, int64_t K, int64_t Kp, float **xs) {
    const int64_t rows = M > 0 ? M : 1;
    uint8_t *xq = aligned_alloc(64, (size_t)(rows * Kp)); /* Kp is a multiple of 64 */
    *xs = malloc(sizeof(float) * (size_t)rows);
    if (!xq || !*xs) {
        free(xq);
        free(*xs);
        return NULL;
    }
    quantize_rows_u8(x, M, K, Kp, xq, *xs);
    return xq;
}

static int vnni_dynamic(const struct job *job, int nthreads) {
    run_blocks(job, 1, nthreads);
    return 0;
}

static void vnni_weight_only(const struct job *job, int nthreads) { run_blocks(job, 0, nthreads); }

/* Weight-only as int8 pieces (pieces_weight_only below): x_m ~= s0 q0 + s1 q1 + s2 q2, row m of x as the three
 * consecutive rows 3m..3m+2 of the pieces' input. */
#define PIECES 3

/* The pieces of rows 0..M-1 of x: rows of Kp bytes (+128 uint8, as quantize_rows_u8) and their scales. `left`:
 * room for K floats, what the pieces so far leave of the row. */
static void split_rows(const float *x, int64_t M, int64_t K, int64_t Kp, uint8_t *xq, float *xs, float *left) {
    for (int64_t m = 0; m < M; m++) {
        memcpy(left, x + m * K, sizeof(float) * (size_t)K);
        for (int p = 0; p < PIECES; p++) {
            uint8_t *row = xq + (m * PIECES + p) * Kp;
            float *scale = xs + m * PIECES + p;
            quantize_rows_u8(left, 1, K, Kp, row, scale);
            for (int64_t k = 0; k < K; k++) left[k] -= (float)((int)row[k] - 128) * *scale;
        }
    }
}

/* split_rows for every row, by up to nthreads threads where there are enough rows (a prompt) to pay for them;
 * each row is split the same way whichever thread takes it. Returns 0, or -1 if out of memory. */
static int split_pieces(const float *x, int64_t M, int64_t K, int64_t Kp, uint8_t *xq, float *xs, int nthreads) {
    const int threads = M >= 32 ? threads_for(nthreads, M) : 1;
    float *left = malloc(sizeof(float) * (size_t)(threads * K) + 1);
    if (!left) return -1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = thread_index();
        const int64_t begin = share(M, t, threads, 1), end = share(M, t + 1, threads, 1);
        split_rows(x + begin * K, end - begin, K, Kp, xq + begin * PIECES * Kp, xs + begin * PIECES, left + t * K);
    }
    free(left);
    return 0;
}

/* y[m, n0 .. n0+w) = ((p0 + p1) + p2) * scale + bias, from the pieces' fp32 partial results (row 3m + p of `part`,
 * rows `stride` apart, w values each); 16 at a time, the last group masked, so every output takes the same steps. */
static void combine_pieces(const struct job *job, const float *part, int64_t stride, int64_t n0, int64_t w) {
    for (int64_t m = 0; m < job->M; m++) {
        const float *p = part + m * PIECES * stride;
        for (int64_t j = 0; j < w; j += 16) {
            const __mmask16 k = w - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (w - j)) - 1);
            __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, p + j), _mm512_maskz_loadu_ps(k, p + stride + j));
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, p + 2 * stride + j));
            v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, job->scale + n0 + j));
            if (job->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, job->bias + n0 + j));
            _mm512_mask_storeu_ps(job->y + m * job->N + n0 + j, k, v);
        }
    }
}
#pragma GCC pop_options

/* ------------------------------------------------------------------------------------------------ AMX path
 * The dynamic scheme on AMX tiles (Xeon 4th generation on). Why: at 8 input rows VNNI spends more time in its
 * multiply-adds than the memory takes to stream the weights, and one tile multiply (TDPBSSD) does 16 x 16 x 64 of
 * them. The weights are the A operand as they are stored: 16 rows of q, 64 bytes of each, loaded with q's row
 * stride, so there is no repacking and no second copy. The input rows, rounded to int8 as on the VNNI path, are
 * the B operand: for each 64-byte column of K, 16 tile rows of 64 bytes, tile row r holding bytes 4r..4r+3 of the
 * column for each of 16 input rows (packed once per call). Signed x signed needs neither the +128 shift nor the
 * row sums. The int32 sums are exact, so the results are the VNNI path's bit for bit (the same rescale follows).
 * Needs K a multiple of 64 (every model shape here); other shapes and the last N % 32 weight rows take the VNNI
 * path. */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,amx-tile,amx-int8")

#define AMX_ROWS 32 /* weight rows per group: two tiles of 16 */

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Every tile 16 rows of 64 bytes: C (tiles 0-3) 16 x 16 int32, A (4-5) 16 weight rows, B (6-7) one column of K. */
static void amx_configure(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* xq (+128 uint8, rows of K bytes) as B tiles, blocks of 16 input rows (zero rows pad the last block). */
static void amx_pack(const uint8_t *xq, int64_t M, int64_t K, uint32_t *xb) {
    const int64_t groups = K / 4; /* 4-byte groups per row */
    memset(xb, 0, (size_t)((M + 15) / 16 * groups * 64));
    for (int64_t m = 0; m < M; m++) {
        const uint32_t *row = (const uint32_t *)(xq + m * K);
        uint32_t *dst = xb + (m / 16) * groups * 16 + m % 16;
        for (int64_t g = 0; g < groups; g++) dst[g * 16] = row[g] ^ 0x80808080u; /* back to signed int8 */
    }
}

/* One 64-byte column c of K for both 16-row tiles of a group: B from xb, A from q, into C tiles C0 and C1. No
 * software prefetch: a group's 32 rows are one contiguous run of memory, which the hardware prefetcher follows;
 * prefetching each row's next group (into L2) or 256-512 bytes ahead (into L1) measured 0.5-0.9x of none. */
#define AMX_STEP(B, C0, C1)                                                                                               \
    do {                                                                                                              \
        _tile_loadd(B, xb + c * 1024, 64);                                                                            \
        _tile_loadd(4, q + c * 64, K);                                                                                \
        _tile_dpbssd(C0, 4, B);                                                                                       \
        _tile_loadd(5, q + 16 * K + c * 64, K);                                                                       \
        _tile_dpbssd(C1, 5, B);                                                                                   \
    } while (0)

/* Tiles 0-3 hold a group's int32 sums: cleared before the K loop, stored to `part` after it. */
static inline void amx_zero_accumulators(void) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

static inline void amx_store_accumulators(int32_t part[4][16][16]) {
    _tile_stored(0, part[0], 64);
    _tile_stored(1, part[1], 64);
    _tile_stored(2, part[2], 64);
    _tile_stored(3, part[3], 64);
}

/* Weight rows q[0..31] times one block of 16 input rows (xb): out[n][m] int32. Even and odd columns of K go to
 * separate tiles (two chains of dependent tile multiplies, not one), added at the end. */
static void amx_group(const int8_t *q, int64_t K, const uint8_t *xb, int32_t out[AMX_ROWS][16]) {
    int32_t part[4][16][16] __attribute__((aligned(64)));
    const int64_t columns = K / 64;
    amx_zero_accumulators();
    int64_t c = 0;
    for (; c + 2 <= columns; c += 2) {
        AMX_STEP(6, 0, 2);
        c++;
        AMX_STEP(7, 1, 3);
        c--;
    }
    if (c < columns) AMX_STEP(6, 0, 2);
    amx_store_accumulators(part);
    for (int i = 0; i < 16; i++)
        for (int m = 0; m < 16; m++) {
            out[i][m] = part[0][i][m] + part[1][i][m];
            out[16 + i][m] = part[2][i][m] + part[3][i][m];
        }
}

/* Weight rows q[0..31] times two blocks of 16 input rows (xb0, xb1): out[n][m] int32, m < 32. Four chains of
 * tile multiplies (2 weight tiles x 2 input blocks), each weight tile loaded once for both blocks. */
static void amx_group2(const int8_t *q, int64_t K, const uint8_t *xb0, const uint8_t *xb1, int32_t out[AMX_ROWS][32]) {
    int32_t part[4][16][16] __attribute__((aligned(64)));
    amx_zero_accumulators();
    for (int64_t c = 0; c < K / 64; c++) {
        _tile_loadd(6, xb0 + c * 1024, 64);
        _tile_loadd(7, xb1 + c * 1024, 64);
        _tile_loadd(4, q + c * 64, K);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_loadd(5, q + 16 * K + c * 64, K);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    amx_store_accumulators(part);
    for (int i = 0; i < 16; i++)
        for (int m = 0; m < 16; m++) {
            out[i][m] = part[0][i][m];
            out[i][16 + m] = part[1][i][m];
            out[16 + i][m] = part[2][i][m];
            out[16 + i][16 + m] = part[3][i][m];
        }
}

/* y[m, n0..n0+31] from a group's sums for input row m (column j of out, rows `stride` apart): the VNNI path's
 * rescale, 16 at a time. */
static void amx_rescale(const struct job *job, const int32_t *out, int stride, int j, int64_t m, int64_t n0) {
    const __m512i columns = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(stride));
    for (int h = 0; h < AMX_ROWS; h += 16) {
        __m512i sums = _mm512_i32gather_epi32(_mm512_add_epi32(columns, _mm512_set1_epi32(j)), out + h * stride, 4);
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(job->xs[m]));
        v = _mm512_mul_ps(v, _mm512_loadu_ps(job->scale + n0 + h));
        if (job->bias) v = _mm512_add_ps(v, _mm512_loadu_ps(job->bias + n0 + h));
        _mm512_storeu_ps(job->y + m * job->N + n0 + h, v);
    }
}

/* Groups of weight rows begin..end (multiples of AMX_ROWS) times every input row, on this thread's tiles: input rows
 * 32 at a time (amx_group2), a last block of 16 or fewer alone (amx_group). */
static void amx_range(const struct job *job, const uint32_t *xb, int64_t begin, int64_t end) {
    int32_t out[AMX_ROWS][32] __attribute__((aligned(64)));
    const int64_t K = job->K, block_words = K / 4 * 16;
    amx_configure();
    for (int64_t n0 = begin; n0 < end; n0 += AMX_ROWS)
        for (int64_t m0 = 0; m0 < job->M; m0 += 32) {
            const uint8_t *xb0 = (const uint8_t *)(xb + m0 / 16 * block_words);
            const int two = job->M - m0 > 16, stride = two ? 32 : 16;
            if (two)
                amx_group2(job->q + n0 * K, K, xb0, xb0 + block_words * 4, out);
            else
                amx_group(job->q + n0 * K, K, xb0, (int32_t(*)[16])out);
            for (int j = 0; j < 32 && m0 + j < job->M; j++) amx_rescale(job, &out[0][0], stride, j, m0 + j, n0);
        }
    _tile_release();
}

/* Weight rows per block of the pieces' loop: about 1 MiB of them (half of a Sapphire Rapids core's L2), at most
 * PIECE_BLOCK_MAX; a multiple of AMX_ROWS. */
#define PIECE_BLOCK_MAX 256
static int64_t piece_block(int64_t K) {
    const int64_t rows = ((int64_t)1 << 20) / K / AMX_ROWS * AMX_ROWS;
    return rows < AMX_ROWS ? AMX_ROWS : rows > PIECE_BLOCK_MAX ? PIECE_BLOCK_MAX : rows;
}

/* Weight-only pieces on the tiles, weight rows begin..end (multiples of AMX_ROWS), in blocks of piece_block(K)
 * rows: every block of 32 piece rows runs through all of a block's weight groups, so with many rows (a prompt:
 * 1536 piece rows at batch 8) the packed inputs stream from L3 once per block, not once per group of 32, and the
 * block's weights are reused from L2. The pieces' fp32 partial results go to `local` (rows x PIECE_BLOCK_MAX
 * floats, this thread's own) and are combined into y once the block is done. */
static void amx_pieces_range(const struct job *job, const struct job *pieces, const uint32_t *xb, int64_t begin,
                             int64_t end, float *local) {
    int32_t out[AMX_ROWS][32] __attribute__((aligned(64)));
    const int64_t K = job->K, block_words = K / 4 * 16, step = piece_block(K);
    struct job part = *pieces; /* the partial results of a block: its columns of `local`, scale 1 */
    part.y = local;
    amx_configure();
    for (int64_t b0 = begin; b0 < end; b0 += step) {
        const int64_t b1 = end - b0 < step ? end : b0 + step;
        part.N = b1 - b0;
        for (int64_t m0 = 0; m0 < pieces->M; m0 += 32) {
            const uint8_t *xb0 = (const uint8_t *)(xb + m0 / 16 * block_words);
            const int two = pieces->M - m0 > 16, stride = two ? 32 : 16;
            for (int64_t n0 = b0; n0 < b1; n0 += AMX_ROWS) {
                if (two)
                    amx_group2(job->q + n0 * K, K, xb0, xb0 + block_words * 4, out);
                else
                    amx_group(job->q + n0 * K, K, xb0, (int32_t(*)[16])out);
                for (int j = 0; j < 32 && m0 + j < pieces->M; j++)
                    amx_rescale(&part, &out[0][0], stride, j, m0 + j, n0 - b0);
            }
        }
        combine_pieces(job, local, part.N, b0, part.N);
    }
    _tile_release();
}

/* The pieces' matmul and their combination on the tiles: groups of 32 weight rows split between threads, the last
 * N % 32 rows on the VNNI kernel (by the last thread; the same bits). No [rows, N] intermediate: each thread's
 * partial results stay in its cache. Returns 0, or -1 if out of memory. */
static int amx_pieces(const struct job *job, const struct job *pieces, int nthreads) {
    const int64_t groups = job->N / AMX_ROWS, tail = groups * AMX_ROWS, rows = pieces->M;
    const int threads = threads_for(nthreads, groups > 0 ? groups : 1);
    uint32_t *xb = aligned_alloc(64, (size_t)((rows + 15) / 16 * job->K * 16));
    float *local = malloc(sizeof(float) * (size_t)(threads * rows * PIECE_BLOCK_MAX));
    if (!xb || !local) {
        free(xb);
        free(local);
        return -1;
    }
    amx_pack(pieces->xq, rows, job->K, xb);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = thread_index();
        float *mine = local + t * rows * PIECE_BLOCK_MAX;
        amx_pieces_range(job, pieces, xb, share(groups, t, threads, AMX_ROWS), share(groups, t + 1, threads, AMX_ROWS),
                         mine);
        if (t == threads - 1 && tail < job->N) {
            struct job rest = *pieces; /* the last rows' partial results, rows of N - tail in `mine` */
            rest.q = job->q + tail * job->K;
            rest.N = job->N - tail;
            rest.y = mine;
            run_range(&rest, 1, block_rows(rows < MR ? rows : MR), 0, rest.N);
            combine_pieces(job, mine, rest.N, tail, rest.N);
        }
    }
    free(xb);
    free(local);
    return 0;
}

/* The AMX path for K a multiple of 64: whole groups of 32 weight rows split between threads, the last N % 32 rows
 * on the VNNI kernel (by the last thread). */
static int amx_dynamic(const struct job *job, int nthreads) {
    const int64_t groups = job->N / AMX_ROWS, tail = groups * AMX_ROWS;
    uint32_t *xb = aligned_alloc(64, (size_t)((job->M + 15) / 16 * job->K * 16));
    if (!xb) return -1;
    amx_pack(job->xq, job->M, job->K, xb);
    const int threads = threads_for(nthreads, groups > 0 ? groups : 1);
    const int nb = block_rows(job->M < MR ? job->M : MR);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = thread_index();
        amx_range(job, xb, share(groups, t, threads, AMX_ROWS), share(groups, t + 1, threads, AMX_ROWS));
        if (t == threads - 1 && tail < job->N) run_range(job, 1, nb, tail, job->N);
    }
    free(xb);
    return 0;
}
#pragma GCC pop_options

/* ----------------------------------------------------------------------------------------------- AVX2 path
 * For CPUs without AVX-512 (AMD Zen 1-3, Intel before Skylake-SP). Dynamic: AVX2 has no exact int8 dot product
 * (vpmaddubsw saturates its int16 pairs), so both operands are widened to int16 and vpmaddwd sums pairs into
 * int32, exactly; the results are the other paths' bit for bit. Weight-only: the AVX-512 path's sums in the same
 * order (its 16 lanes as two 8-lane halves, reduced in the same steps), so the same bits there too. Blocks of 4
 * weight rows x 2 input rows keep 13 of the 16 vector registers busy. */
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define AVX2_NR 4
#define AVX2_MR 2

/* Each row of x rounded to int16-widened int8 (rows of K16 values, zero-padded) with its scale: quantize_rows_u8's
 * rule in scalar code, which rounds identically (division, then nearest-even). */
static void avx2_quantize(const float *x, int64_t M, int64_t K, int64_t K16, int16_t *xq, float *xs) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
        const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
        xs[m] = scale;
        for (int64_t k = 0; k < K16; k++)
            xq[m * K16 + k] = k < K ? (int16_t)fminf(fmaxf(nearbyintf(row[k] / scale), -127.0f), 127.0f) : 0;
    }
}

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

/* The weight rows' 16 int8 values at k, widened; the last, partial column through a zero-padded copy. */
#define AVX2_W16(j) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wsrc[j])))

#define DEFINE_AVX2_DYNAMIC(MROWS, NROWS)                                                                            \
    static void avx2_dyn_##MROWS##x##NROWS(const int16_t *xq, int64_t K16, const int8_t *q, int64_t K,              \
                                           int32_t out[AVX2_MR][AVX2_NR]) {                                          \
        __m256i acc[MROWS][NROWS];                                                                                   \
        int8_t pad[NROWS][16];                                                                                       \
        UNROLL for (int i = 0; i < MROWS; i++) UNROLL for (int j = 0; j < NROWS; j++) acc[i][j] = _mm256_setzero_si256(); \
        for (int64_t k = 0; k < K; k += 16) {                                                                        \
            const int8_t *wsrc[NROWS];                                                                               \
            UNROLL for (int j = 0; j < NROWS; j++) {                                                                 \
                wsrc[j] = q + j * K + k;                                                                             \
                if (k + 16 > K) {                                                                                    \
                    memset(pad[j], 0, 16);                                                                           \
                    memcpy(pad[j], wsrc[j], (size_t)(K - k));                                                        \
                    wsrc[j] = pad[j];                                                                                \
                }                                                                                                    \
            }                                                                                                        \
            __m256i w[NROWS];                                                                                        \
            UNROLL for (int j = 0; j < NROWS; j++) w[j] = AVX2_W16(j);                                               \
            UNROLL for (int i = 0; i < MROWS; i++) {                                                                 \
                __m256i a = _mm256_loadu_si256((const __m256i *)(xq + i * K16 + k));                                \
                UNROLL for (int j = 0; j < NROWS; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(a, w[j])); \
            }                                                                                                        \
        }                                                                                                            \
        UNROLL for (int i = 0; i < MROWS; i++) UNROLL for (int j = 0; j < NROWS; j++) out[i][j] = hsum_epi32(acc[i][j]); \
    }
DEFINE_AVX2_DYNAMIC(1, 1) DEFINE_AVX2_DYNAMIC(2, 1) DEFINE_AVX2_DYNAMIC(1, 4) DEFINE_AVX2_DYNAMIC(2, 4)

/* sum1_ps of the AVX-512 path for a 16-lane accumulator held as two halves: the same additions in the same order. */
static inline float avx2_sum16(__m256 lo, __m256 hi) {
    __m256 h = _mm256_add_ps(lo, hi);
    __m128 f = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    f = _mm_hadd_ps(f, f);
    return _mm_cvtss_f32(_mm_hadd_ps(f, f));
}

#define DEFINE_AVX2_WEIGHT_ONLY(MROWS, NROWS)                                                                        \
    static void avx2_wo_##MROWS##x##NROWS(const float *x, int64_t K, const int8_t *q, float out[AVX2_MR][AVX2_NR]) { \
        __m256 lo[MROWS][NROWS], hi[MROWS][NROWS];                                                                   \
        int8_t wpad[NROWS][16];                                                                                      \
        float xpad[MROWS][16];                                                                                       \
        UNROLL for (int i = 0; i < MROWS; i++) UNROLL for (int j = 0; j < NROWS; j++) lo[i][j] = hi[i][j] = _mm256_setzero_ps(); \
        for (int64_t k = 0; k < K; k += 16) {                                                                        \
            const int8_t *wsrc[NROWS];                                                                               \
            const float *xsrc[MROWS];                                                                                \
            UNROLL for (int j = 0; j < NROWS; j++) wsrc[j] = q + j * K + k;                                          \
            UNROLL for (int i = 0; i < MROWS; i++) xsrc[i] = x + i * K + k;                                          \
            if (k + 16 > K) {                                                                                        \
                UNROLL for (int j = 0; j < NROWS; j++) {                                                             \
                    memset(wpad[j], 0, 16);                                                                          \
                    memcpy(wpad[j], wsrc[j], (size_t)(K - k));                                                       \
                    wsrc[j] = wpad[j];                                                                               \
                }                                                                                                    \
                UNROLL for (int i = 0; i < MROWS; i++) {                                                             \
                    memset(xpad[i], 0, sizeof xpad[i]);                                                              \
                    memcpy(xpad[i], xsrc[i], sizeof(float) * (size_t)(K - k));                                       \
                    xsrc[i] = xpad[i];                                                                               \
                }                                                                                                    \
            }                                                                                                        \
            __m256 wl[NROWS], wh[NROWS];                                                                             \
            UNROLL for (int j = 0; j < NROWS; j++) {                                                                 \
                wl[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)wsrc[j])));        \
                wh[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wsrc[j] + 8))));  \
            }                                                                                                        \
            UNROLL for (int i = 0; i < MROWS; i++) {                                                                 \
                __m256 al = _mm256_loadu_ps(xsrc[i]), ah = _mm256_loadu_ps(xsrc[i] + 8);                             \
                UNROLL for (int j = 0; j < NROWS; j++) {                                                             \
                    lo[i][j] = _mm256_fmadd_ps(al, wl[j], lo[i][j]);                                                 \
                    hi[i][j] = _mm256_fmadd_ps(ah, wh[j], hi[i][j]);                                                 \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        UNROLL for (int i = 0; i < MROWS; i++) UNROLL for (int j = 0; j < NROWS; j++) out[i][j] = avx2_sum16(lo[i][j], hi[i][j]); \
    }
DEFINE_AVX2_WEIGHT_ONLY(1, 1) DEFINE_AVX2_WEIGHT_ONLY(2, 1) DEFINE_AVX2_WEIGHT_ONLY(1, 4) DEFINE_AVX2_WEIGHT_ONLY(2, 4)

/* A block of up to AVX2_NR weight rows (n0..) times up to AVX2_MR input rows (m0..): sums into out. */
static void avx2_block(const struct job *job, const int16_t *xq, int64_t K16, int dynamic, int64_t m0, int mr,
                       int64_t n0, int nr, int32_t iout[AVX2_MR][AVX2_NR], float fout[AVX2_MR][AVX2_NR]) {
    const int64_t K = job->K;
    const int8_t *q = job->q + n0 * K;
    for (int j = 0; j < nr; j += nr == AVX2_NR ? AVX2_NR : 1) {
        int32_t icol[AVX2_MR][AVX2_NR];
        float fcol[AVX2_MR][AVX2_NR];
        const int8_t *w = q + j * K;
        if (dynamic) {
            const int16_t *a = xq + m0 * K16;
            if (nr == AVX2_NR) (mr == 2 ? avx2_dyn_2x4 : avx2_dyn_1x4)(a, K16, w, K, iout);
            else (mr == 2 ? avx2_dyn_2x1 : avx2_dyn_1x1)(a, K16, w, K, icol);
        } else {
            const float *a = job->x + m0 * K;
            if (nr == AVX2_NR) (mr == 2 ? avx2_wo_2x4 : avx2_wo_1x4)(a, K, w, fout);
            else (mr == 2 ? avx2_wo_2x1 : avx2_wo_1x1)(a, K, w, fcol);
        }
        if (nr != AVX2_NR)
            for (int i = 0; i < mr; i++) {
                if (dynamic) iout[i][j] = icol[i][0];
                else fout[i][j] = fcol[i][0];
            }
    }
}

/* Weight rows begin..end times every input row; the rescale is the other paths' (the same float operations). */
static void avx2_range(const struct job *job, const int16_t *xq, int64_t K16, int dynamic, int64_t begin,
                       int64_t end) {
    int32_t iout[AVX2_MR][AVX2_NR];
    float fout[AVX2_MR][AVX2_NR];
    for (int64_t n0 = begin; n0 < end; n0 += AVX2_NR) {
        const int nr = end - n0 < AVX2_NR ? (int)(end - n0) : AVX2_NR;
        for (int64_t m0 = 0; m0 < job->M; m0 += AVX2_MR) {
            const int mr = job->M - m0 < AVX2_MR ? (int)(job->M - m0) : AVX2_MR;
            avx2_block(job, xq, K16, dynamic, m0, mr, n0, nr, iout, fout);
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nr; j++) {
                    const int64_t n = n0 + j;
                    float v = dynamic ? (float)iout[i][j] * job->xs[m0 + i] * job->scale[n] : fout[i][j] * job->scale[n];
                    job->y[(m0 + i) * job->N + n] = job->bias ? v + job->bias[n] : v;
                }
        }
    }
}

static int avx2_run(const struct job *job, int dynamic, int nthreads) {
    const int64_t K16 = round_up(job->K, 16), rows = job->M > 0 ? job->M : 1;
    int16_t *xq = NULL;
    float *xs = NULL;
    if (dynamic) {
        xq = aligned_alloc(64, (size_t)round_up(rows * K16 * 2, 64));
        xs = malloc(sizeof(float) * (size_t)rows);
        if (!xq || !xs) {
            free(xq);
            free(xs);
            return -1;
        }
        avx2_quantize(job->x, job->M, job->K, K16, xq, xs);
    }
    struct job local = *job;
    local.xs = xs;
    const int64_t blocks = (job->N + AVX2_NR - 1) / AVX2_NR;
    const int threads = threads_for(nthreads, blocks);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = thread_index();
        const int64_t begin = share(blocks, t, threads, AVX2_NR), end = share(blocks, t + 1, threads, AVX2_NR);
        avx2_range(&local, xq, K16, dynamic, begin, end < job->N ? end : job->N);
    }
    free(xq);
    free(xs);
    return 0;
}
#pragma GCC pop_options

/* ------------------------------------------------------------------------------------------------ entry points
 * `path` is one of PATH_*, no higher than int8_cpu_level(); on PATH_AMX, tiles run calls of at least `tile_rows`
 * input rows and the VNNI instructions the rest (the same bits). Both are the caller's rule (kernels/int8.py). */

/* Whether the AMX tiles take a dynamic matmul of M rows (else VNNI). */
static int use_tiles(const struct job *job, int path, int tile_rows) {
    return path == PATH_AMX && job->M >= tile_rows && job->K % 64 == 0 && job->N >= AMX_ROWS;
}

/* y[M, N] = dequant(int8(x) @ q.T) + bias (dynamic scheme); bias may be NULL. qsum: sum_k q[n, k] per row, or NULL
 * to compute it in the first pass (VNNI path; extra multiply-adds: precomputed sums make batch 1 about 8% faster).
 * Every path gives the same bits. Returns 0, or -1 if out of memory. */
int int8_matmul_dynamic(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const float *scale,
                        const int32_t *qsum, const float *bias, float *y, int nthreads, int path, int tile_rows) {
    struct job job = {x, NULL, NULL, M, K, round_up(K, 64), N, q, scale, qsum, bias, y};
    if (path == PATH_AVX2) return avx2_run(&job, 1, nthreads);
    float *xs = NULL;
    uint8_t *xq = quantized_input(x, M, K, job.Kp, &xs);
    if (!xq) return -1;
    job.xq = xq;
    job.xs = xs;
    const int status = use_tiles(&job, path, tile_rows) ? amx_dynamic(&job, nthreads) : vnni_dynamic(&job, nthreads);
    free(xq);
    free(xs);
    return status;
}

/* Weight-only on the int8 units (PATH_AMX): each fp32 input row as the sum of PIECES int8 rows with their own
 * scales, x ~= s0 q0 + s1 q1 + s2 q2 (q0 rounds x, q1 what q0 left over, q2 what both left): each piece leaves at
 * most 1/254 of the one before, so the three hold x to within about 2^-24 of its largest value, as close as fp32
 * holds that value itself. The pieces run as rows of the dynamic scheme (exact int32 sums, same bits on tiles or
 * VNNI), then y = ((p0 + p1) + p2) * scale + bias. Why: at 8 rows the fp32 kernel widens and multiply-adds every
 * weight once per row (compute-bound, about 0.4x of int8-dynamic), where the tiles take 24 int8 rows as fast as
 * 8. The bound is tested (test_int8_kernel.py, test_inference_formats.py). */
static int pieces_weight_only(const struct job *job, int nthreads, int tile_rows) {
    const int64_t M = job->M, K = job->K, N = job->N, Kp = round_up(K, 64), rows = M * PIECES;
    uint8_t *xq = aligned_alloc(64, (size_t)((rows > 0 ? rows : 1) * Kp));
    float *xs = malloc(sizeof(float) * (size_t)(rows + N) + 1);
    int status = xq && xs ? split_pieces(job->x, M, K, Kp, xq, xs, nthreads) : -1;
    if (status == 0) {
        float *ones = xs + rows;
        for (int64_t n = 0; n < N; n++) ones[n] = 1.0f;
        struct job pieces = {NULL, xq, xs, rows, K, Kp, N, job->q, ones, NULL, NULL, NULL};
        if (use_tiles(&pieces, PATH_AMX, tile_rows)) {
            status = amx_pieces(job, &pieces, nthreads);
        } else if ((pieces.y = malloc(sizeof(float) * (size_t)(rows * N) + 1)) == NULL) {
            status = -1;
        } else {
            status = vnni_dynamic(&pieces, nthreads);
            combine_pieces(job, pieces.y, N, 0, N);
            free(pieces.y);
        }
    }
    free(xq);
    free(xs);
    return status;
}

/* y[M, N] = x @ (q * scale).T + bias with x in fp32 (weight-only scheme); bias may be NULL. AVX2 and VNNI: fp32
 * multiply-adds, the same bits on both; AMX: the pieces above (within the tested bound of those). Returns 0, or -1
 * if out of memory. */
int int8_matmul_weight_only(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N, const float *scale,
                            const float *bias, float *y, int nthreads, int path, int tile_rows) {
    const struct job job = {x, NULL, NULL, M, K, K, N, q, scale, NULL, bias, y};
    if (path == PATH_AVX2) return avx2_run(&job, 0, nthreads);
    if (path == PATH_AMX) return pieces_weight_only(&job, nthreads, tile_rows);
    vnni_weight_only(&job, nthreads);
    return 0;
}

/* sums[n] = sum_k q[n, k] (int32; |sum| <= 127 K): the qsum argument of int8_matmul_dynamic, computed once per weight. */
void int8_row_sums(const int8_t *q, int64_t N, int64_t K, int32_t *sums) {
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = q + n * K;
        int32_t total = 0;
        for (int64_t k = 0; k < K; k++) total += row[k];
        sums[n] = total;
    }
}
