/* Fast, accurate sums over float32 spans, for _primitives.pxd.
 *
 * Summing float32 data in float64 costs a float->double conversion per element, and
 * that conversion, not memory, bounds a float64 two-pass. Here each of the 16 lanes (element i of a span goes to lane i % 16)
 * first adds RUN = 8 of its values in float32, and only that partial sum is widened
 * and added to the lane's float64 accumulator: one conversion per 8 elements.
 *
 * Accuracy: a partial of 8 float32 values carries at most 7 roundings. The statistics
 * use these sums for the *deviations* from a float32 center c close to the mean, where
 * x - c is exact when x is within a factor 2 of c (Sterbenz) and otherwise rounded
 * once; every partial then holds values of the size of the spread, not of the mean, so
 * data whose mean dwarfs its spread keeps its precision (see bncpu_f32_add_dev_sums).
 *
 * Determinism: lane k of a span always gets the same values in the same order, whatever
 * the vector width: the code below works on groups of 16 lanes held in 16 / W hardware
 * vectors of W floats (W = 16 with AVX-512, 8 with AVX, 4 with SSE2), and every lane
 * does the same float32 and float64 operations in the same order. So the portable,
 * AVX2 and AVX-512 builds give bit-identical sums. Build with -ffp-contract=off.
 */
#ifndef BNCPU_FLOAT32_SUMS_H
#define BNCPU_FLOAT32_SUMS_H

#include <stdint.h>
#include <string.h>

#define BNCPU_SUM_LANES 16
#define BNCPU_SUM_RUN 8

#if defined(__AVX512F__)
#define BNCPU_VW 16
#elif defined(__AVX__)
#define BNCPU_VW 8
#else
#define BNCPU_VW 4
#endif
#define BNCPU_GROUP (BNCPU_SUM_LANES / BNCPU_VW)   /* hardware vectors per 16 lanes */

typedef float bncpu_vf __attribute__((vector_size(BNCPU_VW * 4)));
typedef double bncpu_vd __attribute__((vector_size(BNCPU_VW * 4)));   /* W/2 doubles */
typedef int32_t bncpu_vi __attribute__((vector_size(BNCPU_VW * 4)));

static inline bncpu_vf bncpu_load(const float* p)
{
    bncpu_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline bncpu_vf bncpu_splat(float value)
{
    bncpu_vf v;
    int k;
    for (k = 0; k < BNCPU_VW; k++)
        v[k] = value;
    return v;
}

/* acc[0] += widen(v[:W/2]); acc[1] += widen(v[W/2:]): the float64 lanes of one
 * hardware vector, in lane order. */
#if BNCPU_VW == 16
#define BNCPU_LO(v) __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
#define BNCPU_HI(v) __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
#elif BNCPU_VW == 8
#define BNCPU_LO(v) __builtin_shufflevector(v, v, 0, 1, 2, 3)
#define BNCPU_HI(v) __builtin_shufflevector(v, v, 4, 5, 6, 7)
#else
#define BNCPU_LO(v) __builtin_shufflevector(v, v, 0, 1)
#define BNCPU_HI(v) __builtin_shufflevector(v, v, 2, 3)
#endif

static inline void bncpu_widen_add(bncpu_vd* acc, bncpu_vf v)
{
    acc[0] += __builtin_convertvector(BNCPU_LO(v), bncpu_vd);
    acc[1] += __builtin_convertvector(BNCPU_HI(v), bncpu_vd);
}

/* A run: the 8 vectors at p, p + 16, ..., p + 112 (8 values of each of W lanes), added
 * in a fixed pairwise tree: 3 roundings per value, and short dependency chains. */
#define BNCPU_TREE8(f) (((f(0) + f(1)) + (f(2) + f(3))) + ((f(4) + f(5)) + (f(6) + f(7))))

static inline bncpu_vf bncpu_run_sum(const float* p)
{
#define BNCPU_X(r) bncpu_load(p + (r) * BNCPU_SUM_LANES)
    return BNCPU_TREE8(BNCPU_X);
#undef BNCPU_X
}

static inline void bncpu_run_dev_sums(const float* p, bncpu_vf c, bncpu_vf* sum, bncpu_vf* sq)
{
    bncpu_vf d[BNCPU_SUM_RUN];
    int r;
    for (r = 0; r < BNCPU_SUM_RUN; r++)
        d[r] = bncpu_load(p + r * BNCPU_SUM_LANES) - c;
#define BNCPU_D(r) d[r]
#define BNCPU_DD(r) (d[r] * d[r])
    *sum = BNCPU_TREE8(BNCPU_D);
    *sq = BNCPU_TREE8(BNCPU_DD);
#undef BNCPU_D
#undef BNCPU_DD
}

/* dy where mask[at] passed a ReLU (!(mask <= 0), NaN passes), else +0; mask may be
 * NULL (no mask). The fused batch norm + ReLU backward reads its gradient so. */
static inline bncpu_vf bncpu_load_masked(const float* dy, const float* mask, int64_t at)
{
    const bncpu_vf zero = {0};
    if (mask == NULL)
        return bncpu_load(dy + at);
    return (bncpu_vf)((bncpu_vi)bncpu_load(dy + at) & ~(bncpu_vi)(bncpu_load(mask + at) <= zero));
}

static inline float bncpu_masked1(const float* dy, const float* mask, int64_t at)
{
    return mask != NULL && mask[at] <= 0 ? 0.0f : dy[at];
}

/* g = dy·weight (dy when weight is NULL), dy masked by mask (may be NULL). */
static inline bncpu_vf bncpu_load_g(const float* dy, const float* weight, const float* mask,
                                    int64_t at)
{
    bncpu_vf d = bncpu_load_masked(dy, mask, at);
    return weight != NULL ? d * bncpu_load(weight + at) : d;
}

static inline void bncpu_run_grad_sums(const float* dy, const float* weight, const float* mask,
                                       const float* x, bncpu_vf c, bncpu_vf* g_sum,
                                       bncpu_vf* dev_sum)
{
    bncpu_vf g[BNCPU_SUM_RUN];
    int r;
    for (r = 0; r < BNCPU_SUM_RUN; r++)
        g[r] = bncpu_load_g(dy, weight, mask, r * BNCPU_SUM_LANES);
#define BNCPU_G(r) g[r]
#define BNCPU_P(r) (g[r] * (bncpu_load(x + (r) * BNCPU_SUM_LANES) - c))
    *g_sum = BNCPU_TREE8(BNCPU_G);
    *dev_sum = BNCPU_TREE8(BNCPU_P);
#undef BNCPU_G
#undef BNCPU_P
}

static inline void bncpu_store_lanes(double* lanes, const bncpu_vd* acc)
{
    memcpy(lanes, acc, BNCPU_SUM_LANES * sizeof(double));
}

static inline void bncpu_load_lanes(bncpu_vd* acc, const double* lanes)
{
    memcpy(acc, lanes, BNCPU_SUM_LANES * sizeof(double));
}

/* lanes[k] += Σ x[i] over i % 16 == k, each lane's values taken in runs of 8 summed in
 * float32 (the last run of a lane may be shorter; a span shorter than a whole group of
 * 16 x 8 values ends in elements added one by one). */
static inline void bncpu_f32_add_sums(double* lanes, const float* x, int64_t length)
{
    const int64_t chunk = BNCPU_SUM_LANES * BNCPU_SUM_RUN;
    bncpu_vd acc[2 * BNCPU_GROUP];
    bncpu_vf part[BNCPU_GROUP];
    int64_t i = 0, stop;
    int g;
    bncpu_load_lanes(acc, lanes);
    for (; i + chunk <= length; i += chunk) {
        for (g = 0; g < BNCPU_GROUP; g++)
            part[g] = bncpu_run_sum(x + i + g * BNCPU_VW);
        for (g = 0; g < BNCPU_GROUP; g++)
            bncpu_widen_add(acc + 2 * g, part[g]);
    }
    /* What is left: whole groups of 16 widened directly, then single elements. */
    for (; i + BNCPU_SUM_LANES <= length; i += BNCPU_SUM_LANES)
        for (g = 0; g < BNCPU_GROUP; g++)
            bncpu_widen_add(acc + 2 * g, bncpu_load(x + i + g * BNCPU_VW));
    bncpu_store_lanes(lanes, acc);
    for (stop = i; i < length; i++)
        lanes[i - stop] += x[i];
}

/* With d = x - center rounded to float32: sum_lanes += Σ d and sq_lanes += Σ d², lane
 * by lane as bncpu_f32_add_sums (d·d rounded to float32 too). Then Σ (x - center) =
 * Σ d and Σ (x - center)² = Σ d² up to float32 rounding of each deviation, its square
 * and 7 partial additions: relative errors of order 2^-24 per term, of random sign, in
 * the size of the spread. */
static inline void bncpu_f32_add_dev_sums(double* sum_lanes, double* sq_lanes, const float* x,
                                          int64_t length, float center)
{
    const int64_t chunk = BNCPU_SUM_LANES * BNCPU_SUM_RUN;
    const bncpu_vf c = bncpu_splat(center);
    bncpu_vd sum_acc[2 * BNCPU_GROUP], sq_acc[2 * BNCPU_GROUP];
    bncpu_vf sum_part[BNCPU_GROUP], sq_part[BNCPU_GROUP], d;
    int64_t i = 0, stop;
    int g;
    bncpu_load_lanes(sum_acc, sum_lanes);
    bncpu_load_lanes(sq_acc, sq_lanes);
    for (; i + chunk <= length; i += chunk) {
        for (g = 0; g < BNCPU_GROUP; g++)
            bncpu_run_dev_sums(x + i + g * BNCPU_VW, c, sum_part + g, sq_part + g);
        for (g = 0; g < BNCPU_GROUP; g++) {
            bncpu_widen_add(sum_acc + 2 * g, sum_part[g]);
            bncpu_widen_add(sq_acc + 2 * g, sq_part[g]);
        }
    }
    for (; i + BNCPU_SUM_LANES <= length; i += BNCPU_SUM_LANES)
        for (g = 0; g < BNCPU_GROUP; g++) {
            d = bncpu_load(x + i + g * BNCPU_VW) - c;
            bncpu_widen_add(sum_acc + 2 * g, d);
            bncpu_widen_add(sq_acc + 2 * g, d * d);
        }
    bncpu_store_lanes(sum_lanes, sum_acc);
    bncpu_store_lanes(sq_lanes, sq_acc);
    for (stop = i; i < length; i++) {
        float dev = x[i] - center;
        sum_lanes[i - stop] += dev;
        sq_lanes[i - stop] += dev * dev;
    }
}

/* With g = dy·weight (dy when weight is NULL; dy masked by mask when mask is given,
 * the fused ReLU backward) and p = g·(x - center), both rounded to float32:
 * g_lanes += Σ g and g_dev_lanes += Σ p, lane by lane as above (the backward pass's two
 * sums; with a weight, layer norm's row sums). The NULL tests are the same on every
 * iteration: gcc takes them out of the loops. */
static inline void bncpu_f32_add_grad_sums(double* g_lanes, double* g_dev_lanes,
                                           const float* dy, const float* weight,
                                           const float* mask, const float* x, int64_t length,
                                           float center)
{
    const int64_t chunk = BNCPU_SUM_LANES * BNCPU_SUM_RUN;
    const bncpu_vf c = bncpu_splat(center);
    bncpu_vd g_acc[2 * BNCPU_GROUP], dev_acc[2 * BNCPU_GROUP];
    bncpu_vf g_part[BNCPU_GROUP], dev_part[BNCPU_GROUP], g;
    int64_t i = 0, stop, at;
    int grp;
    bncpu_load_lanes(g_acc, g_lanes);
    bncpu_load_lanes(dev_acc, g_dev_lanes);
    for (; i + chunk <= length; i += chunk) {
        for (grp = 0; grp < BNCPU_GROUP; grp++) {
            at = i + grp * BNCPU_VW;
            bncpu_run_grad_sums(dy + at, weight != NULL ? weight + at : NULL,
                                mask != NULL ? mask + at : NULL, x + at, c,
                                g_part + grp, dev_part + grp);
        }
        for (grp = 0; grp < BNCPU_GROUP; grp++) {
            bncpu_widen_add(g_acc + 2 * grp, g_part[grp]);
            bncpu_widen_add(dev_acc + 2 * grp, dev_part[grp]);
        }
    }
    for (; i + BNCPU_SUM_LANES <= length; i += BNCPU_SUM_LANES)
        for (grp = 0; grp < BNCPU_GROUP; grp++) {
            at = i + grp * BNCPU_VW;
            g = bncpu_load_g(dy, weight, mask, at);
            bncpu_widen_add(g_acc + 2 * grp, g);
            bncpu_widen_add(dev_acc + 2 * grp, g * (bncpu_load(x + at) - c));
        }
    bncpu_store_lanes(g_lanes, g_acc);
    bncpu_store_lanes(g_dev_lanes, dev_acc);
    for (stop = i; i < length; i++) {
        float gi = weight != NULL ? bncpu_masked1(dy, mask, i) * weight[i]
                                  : bncpu_masked1(dy, mask, i);
        float dev = gi * (x[i] - center);
        g_lanes[i - stop] += gi;
        g_dev_lanes[i - stop] += dev;
    }
}

/* ---- Columns: a block of `rows` rows of `width` float32 values, rows `stride` apart ----
 * (batch norm with one value per channel and sample: column j is channel j). Column j
 * takes its rows in runs of 8, each run added in float32 in the BNCPU_TREE8 order and
 * widened once; rows left over at the end are widened one by one. Columns go 16 at a
 * time through the vector code, the last width % 16 through scalar code doing the same
 * operations, so every build gives the same bits.
 *
 * Gradient sums of rows a multiple of 4 KiB apart (bncpu_rows_alias) read a run two
 * rows at a time, over chunks of BNCPU_COLUMN_CHUNK columns, keeping the pair sums of
 * the tree in small buffers: ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), the
 * same operations as reading the 8 rows side by side. Such rows map to one L1 set
 * (8-way): 8 rows of dy and 8 of x side by side evict each other before use. The
 * single-array sums keep 8 rows side by side: 8 lines fit the set, and pairs are slower
 * there. */

#define BNCPU_COLUMN_CHUNK 256

/* Rows `stride` floats apart whose lines all fall in one L1 set: gradient sums read
 * them in pairs. Otherwise 8 side by side, in registers, which is faster (rows 2 KiB
 * apart, in two sets, gain nothing from pairs). */
static inline int bncpu_rows_alias(int64_t stride)
{
    return (stride * (int64_t)sizeof(float)) % 4096 == 0;
}

/* Rows of at most BNCPU_SHORT_ROW_BYTES (e.g. channels-last data of 64 float32
 * channels: 256 bytes) are read in pairs too, by the gradient sums and the deviation
 * sums: a run of 8 such rows is one contiguous block, and reading it two rows at a
 * time walks it in memory order, where 8 rows side by side made the hardware
 * prefetcher miss (rows of 1 KiB and more gain nothing). The same additions in the
 * same tree, so the same bits. */
#define BNCPU_SHORT_ROW_BYTES 512

static inline int bncpu_short_rows(int64_t stride)
{
    return stride * (int64_t)sizeof(float) <= BNCPU_SHORT_ROW_BYTES;
}

/* acc[0..W) += widen(part), the two float64 halves loaded and stored as whole vectors
 * (as bncpu_widen_add). Copying them through an array of two vectors made gcc 12 store
 * 16-byte halves and reload 32-byte vectors, a failed store forwarding each time, which
 * made the column sums compute-bound even on data in L1. */
static inline void bncpu_add_widened(double* acc, bncpu_vf part)
{
    bncpu_vd lo, hi;
    memcpy(&lo, acc, sizeof lo);
    memcpy(&hi, acc + BNCPU_VW / 2, sizeof hi);
    lo += __builtin_convertvector(BNCPU_LO(part), bncpu_vd);
    hi += __builtin_convertvector(BNCPU_HI(part), bncpu_vd);
    memcpy(acc, &lo, sizeof lo);
    memcpy(acc + BNCPU_VW / 2, &hi, sizeof hi);
}

/* sums[j] += Σ_i x[i·stride + j] */
static inline void bncpu_f32_add_column_sums(double* sums, const float* x, int64_t rows,
                                             int64_t stride, int64_t width)
{
    int64_t i = 0, j;
    int g;
    for (; i + BNCPU_SUM_RUN <= rows; i += BNCPU_SUM_RUN) {
        const float* p = x + i * stride;
        for (j = 0; j + BNCPU_SUM_LANES <= width; j += BNCPU_SUM_LANES)
            for (g = 0; g < BNCPU_GROUP; g++) {
                const float* q = p + j + g * BNCPU_VW;
#define BNCPU_X(r) bncpu_load(q + (r) * stride)
                bncpu_add_widened(sums + j + g * BNCPU_VW, BNCPU_TREE8(BNCPU_X));
#undef BNCPU_X
            }
        for (; j < width; j++) {
#define BNCPU_X(r) p[(r) * stride + j]
            sums[j] += BNCPU_TREE8(BNCPU_X);
#undef BNCPU_X
        }
    }
    for (; i < rows; i++)
        for (j = 0; j < width; j++)
            sums[j] += x[i * stride + j];
}

/* With d = x - center[j] rounded to float32: sum[j] += Σ d and sq[j] += Σ d²
 * (as bncpu_f32_add_dev_sums, column by column). */
static inline void bncpu_f32_add_column_dev_sums(double* sum, double* sq, const float* x,
                                                 int64_t rows, int64_t stride, int64_t width,
                                                 const float* center)
{
    float s01[BNCPU_COLUMN_CHUNK], q01[BNCPU_COLUMN_CHUNK];
    float s45[BNCPU_COLUMN_CHUNK], q45[BNCPU_COLUMN_CHUNK];
    bncpu_vf d[BNCPU_SUM_RUN], c, u, v;
    float e[BNCPU_SUM_RUN];
    const int64_t vec_width = width - width % BNCPU_SUM_LANES;
    const int pairs = bncpu_short_rows(stride);
    int64_t i = 0, j, j0, n, at;
    int g, r;
    for (; i + BNCPU_SUM_RUN <= rows; i += BNCPU_SUM_RUN) {
        const float* p = x + i * stride;
        for (j0 = 0; j0 < vec_width && pairs; j0 += BNCPU_COLUMN_CHUNK) {
            const float* q = p + j0;
            const float* cc = center + j0;
            n = vec_width - j0 < BNCPU_COLUMN_CHUNK ? vec_width - j0 : BNCPU_COLUMN_CHUNK;
#define BNCPU_DV(r) (bncpu_load(q + (r) * stride + at) - bncpu_load(cc + at))
            for (at = 0; at < n; at += BNCPU_VW) {
                u = BNCPU_DV(0);
                v = BNCPU_DV(1);
                c = u + v;
                memcpy(s01 + at, &c, sizeof c);
                c = u * u + v * v;
                memcpy(q01 + at, &c, sizeof c);
            }
            for (at = 0; at < n; at += BNCPU_VW) {
                u = BNCPU_DV(2);
                v = BNCPU_DV(3);
                c = bncpu_load(s01 + at) + (u + v);
                memcpy(s01 + at, &c, sizeof c);
                c = bncpu_load(q01 + at) + (u * u + v * v);
                memcpy(q01 + at, &c, sizeof c);
            }
            for (at = 0; at < n; at += BNCPU_VW) {
                u = BNCPU_DV(4);
                v = BNCPU_DV(5);
                c = u + v;
                memcpy(s45 + at, &c, sizeof c);
                c = u * u + v * v;
                memcpy(q45 + at, &c, sizeof c);
            }
            for (at = 0; at < n; at += BNCPU_VW) {
                u = BNCPU_DV(6);
                v = BNCPU_DV(7);
                bncpu_add_widened(sum + j0 + at, bncpu_load(s01 + at)
                                  + (bncpu_load(s45 + at) + (u + v)));
                bncpu_add_widened(sq + j0 + at, bncpu_load(q01 + at)
                                  + (bncpu_load(q45 + at) + (u * u + v * v)));
            }
#undef BNCPU_DV
        }
        for (j = pairs ? vec_width : 0; j + BNCPU_SUM_LANES <= width; j += BNCPU_SUM_LANES)
            for (g = 0; g < BNCPU_GROUP; g++) {
                const int64_t at = j + g * BNCPU_VW;
                c = bncpu_load(center + at);
                for (r = 0; r < BNCPU_SUM_RUN; r++)
                    d[r] = bncpu_load(p + r * stride + at) - c;
#define BNCPU_D(r) d[r]
#define BNCPU_DD(r) (d[r] * d[r])
                bncpu_add_widened(sum + at, BNCPU_TREE8(BNCPU_D));
                bncpu_add_widened(sq + at, BNCPU_TREE8(BNCPU_DD));
#undef BNCPU_D
#undef BNCPU_DD
            }
        for (; j < width; j++) {
            for (r = 0; r < BNCPU_SUM_RUN; r++)
                e[r] = p[r * stride + j] - center[j];
#define BNCPU_D(r) e[r]
#define BNCPU_DD(r) (e[r] * e[r])
            sum[j] += BNCPU_TREE8(BNCPU_D);
            sq[j] += BNCPU_TREE8(BNCPU_DD);
#undef BNCPU_D
#undef BNCPU_DD
        }
    }
    for (; i < rows; i++)
        for (j = 0; j < width; j++) {
            float dev = x[i * stride + j] - center[j];
            sum[j] += dev;
            sq[j] += dev * dev;
        }
}

/* With p = dy·(x - center[j]) rounded to float32: dy_sum[j] += Σ dy and
 * dev_sum[j] += Σ p (as bncpu_f32_add_grad_sums, column by column; dy masked by mask,
 * laid out as dy, when mask is given). */
static inline void bncpu_f32_add_column_grad_sums(double* dy_sum, double* dev_sum,
                                                  const float* dy, const float* mask,
                                                  const float* x,
                                                  int64_t rows, int64_t stride, int64_t width,
                                                  const float* center)
{
    float g01[BNCPU_COLUMN_CHUNK], p01[BNCPU_COLUMN_CHUNK];
    float g45[BNCPU_COLUMN_CHUNK], p45[BNCPU_COLUMN_CHUNK];
    const int64_t vec_width = width - width % BNCPU_SUM_LANES;
    const int pairs = bncpu_rows_alias(stride) || bncpu_short_rows(stride);
    int64_t i = 0, j, j0, n, at;
    for (; i + BNCPU_SUM_RUN <= rows; i += BNCPU_SUM_RUN) {
        const float* pd = dy + i * stride;
        const float* pm = mask != NULL ? mask + i * stride : NULL;
        const float* px = x + i * stride;
        for (j0 = 0; j0 < vec_width && !pairs; j0 += BNCPU_VW) {
            const bncpu_vf c = bncpu_load(center + j0);
#define BNCPU_DY(r) bncpu_load_masked(pd, pm, (r) * stride + j0)
#define BNCPU_P(r) (BNCPU_DY(r) * (bncpu_load(px + (r) * stride + j0) - c))
            bncpu_add_widened(dy_sum + j0, BNCPU_TREE8(BNCPU_DY));
            bncpu_add_widened(dev_sum + j0, BNCPU_TREE8(BNCPU_P));
#undef BNCPU_DY
#undef BNCPU_P
        }
        for (j0 = 0; j0 < vec_width && pairs; j0 += BNCPU_COLUMN_CHUNK) {
            const float* qd = pd + j0;
            const float* qm = pm != NULL ? pm + j0 : NULL;
            const float* qx = px + j0;
            n = vec_width - j0 < BNCPU_COLUMN_CHUNK ? vec_width - j0 : BNCPU_COLUMN_CHUNK;
#define BNCPU_DY(r) bncpu_load_masked(qd, qm, (r) * stride + at)
#define BNCPU_P(r) (BNCPU_DY(r) * (bncpu_load(qx + (r) * stride + at) \
                                   - bncpu_load(center + j0 + at)))
            for (at = 0; at < n; at += BNCPU_VW) {
                bncpu_vf v = BNCPU_DY(0) + BNCPU_DY(1), w = BNCPU_P(0) + BNCPU_P(1);
                memcpy(g01 + at, &v, sizeof v);
                memcpy(p01 + at, &w, sizeof w);
            }
            for (at = 0; at < n; at += BNCPU_VW) {
                bncpu_vf v = bncpu_load(g01 + at) + (BNCPU_DY(2) + BNCPU_DY(3));
                bncpu_vf w = bncpu_load(p01 + at) + (BNCPU_P(2) + BNCPU_P(3));
                memcpy(g01 + at, &v, sizeof v);
                memcpy(p01 + at, &w, sizeof w);
            }
            for (at = 0; at < n; at += BNCPU_VW) {
                bncpu_vf v = BNCPU_DY(4) + BNCPU_DY(5), w = BNCPU_P(4) + BNCPU_P(5);
                memcpy(g45 + at, &v, sizeof v);
                memcpy(p45 + at, &w, sizeof w);
            }
            for (at = 0; at < n; at += BNCPU_VW) {
                bncpu_add_widened(dy_sum + j0 + at, bncpu_load(g01 + at)
                                  + (bncpu_load(g45 + at) + (BNCPU_DY(6) + BNCPU_DY(7))));
                bncpu_add_widened(dev_sum + j0 + at, bncpu_load(p01 + at)
                                  + (bncpu_load(p45 + at) + (BNCPU_P(6) + BNCPU_P(7))));
            }
#undef BNCPU_DY
#undef BNCPU_P
        }
        for (j = vec_width; j < width; j++) {
#define BNCPU_DY(r) bncpu_masked1(pd, pm, (r) * stride + j)
#define BNCPU_P(r) (BNCPU_DY(r) * (px[(r) * stride + j] - center[j]))
            dy_sum[j] += BNCPU_TREE8(BNCPU_DY);
            dev_sum[j] += BNCPU_TREE8(BNCPU_P);
#undef BNCPU_DY
#undef BNCPU_P
        }
    }
    for (; i < rows; i++)
        for (j = 0; j < width; j++) {
            float d = bncpu_masked1(dy, mask, i * stride + j);
            float p = d * (x[i * stride + j] - center[j]);
            dy_sum[j] += d;
            dev_sum[j] += p;
        }
}

#endif
