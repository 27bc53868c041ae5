/* Batch norm's elementwise passes on half-precision data, for _bn_half.pxi:
 *
 *   BNCPU_HALF_AFFINE:   out = ((a - hi) - lo)·scale + offset, then + b (when b is given),
 *                        then relu (when asked): the forward, a = x, b = the residual
 *   BNCPU_HALF_BACKWARD: out = ((a - offset) - ((b - hi) - lo)·k)·scale: a = dy, b = x
 *   BNCPU_HALF_SCALE:    out = a·scale: a = dy
 *
 * in float32 on values widened in registers and narrowed as they are stored (_half.h),
 * never through a float32 array. The arithmetic is _elementwise.h's passes, operation
 * for operation, so out is the float32 pass's result on the widened values rounded once
 * to the data's format. Every lane, the vector body's and the tail's (loaded and stored
 * n lanes at a time), does the same float32 operations, so every build gives the same
 * bits. out may be a or b.
 *
 * The data are the one-member structs bncpu_bf16_lane and bncpu_f16_lane (distinct types
 * for Cython's fused types), laid out as their uint16_t bits.
 */
#ifndef BNCPU_HALF_PASSES_H
#define BNCPU_HALF_PASSES_H

#include <stdint.h>
#include "_half.h"

typedef struct { uint16_t bits; } bncpu_bf16_lane;
typedef struct { uint16_t bits; } bncpu_f16_lane;

enum { BNCPU_HALF_AFFINE, BNCPU_HALF_BACKWARD, BNCPU_HALF_SCALE };

static inline bncpu_half_vf bncpu_half_relu(bncpu_half_vf v)
{
    const bncpu_half_vf zero = {0};
    return (bncpu_half_vf)((bncpu_half_vi32)v & ~(bncpu_half_vi32)(v < zero));
}

/* One vector of a pass; b is read only when has_b. */
static inline bncpu_half_vf bncpu_half_op(int kind, bncpu_half_vf a, bncpu_half_vf b,
                                          int has_b, float hi, float lo, float scale,
                                          float offset, float k, int relu)
{
    bncpu_half_vf v;
    if (kind == BNCPU_HALF_BACKWARD)
        return ((a - offset) - ((b - hi) - lo) * k) * scale;
    if (kind == BNCPU_HALF_SCALE)
        return a * scale;
    v = ((a - hi) - lo) * scale + offset;
    if (has_b)
        v = v + b;
    return relu ? bncpu_half_relu(v) : v;
}

/* One value of a pass (the same operations). */
static inline float bncpu_half_op1(int kind, float a, float b, int has_b, float hi, float lo,
                                   float scale, float offset, float k, int relu)
{
    float v;
    if (kind == BNCPU_HALF_BACKWARD)
        return ((a - offset) - ((b - hi) - lo) * k) * scale;
    if (kind == BNCPU_HALF_SCALE)
        return a * scale;
    v = ((a - hi) - lo) * scale + offset;
    if (has_b)
        v = v + b;
    return relu && v < 0 ? 0.0f : v;
}

#define BNCPU_HALF_DEFINE_PASSES(F)                                                         \
/* One span of `length` values, one channel's coefficients; b may be NULL. */              \
static inline void bncpu_half_pass_##F(int kind, const bncpu_##F##_lane* a_,               \
                                       const bncpu_##F##_lane* b_, bncpu_##F##_lane* out_,  \
                                       int64_t length, float hi, float lo, float scale,     \
                                       float offset, float k, int relu)                     \
{                                                                                           \
    const bncpu_##F* a = (const bncpu_##F*)a_;                                              \
    const bncpu_##F* b = (const bncpu_##F*)b_;                                              \
    bncpu_##F* out = (bncpu_##F*)out_;                                                      \
    const bncpu_half_vf none = {0};                                                         \
    const int has_b = b != NULL;                                                            \
    bncpu_half_vf v;                                                                        \
    int64_t i = 0;                                                                          \
    int n;                                                                                  \
    for (; i + BNCPU_HALF_VW <= length; i += BNCPU_HALF_VW) {                               \
        v = bncpu_half_op(kind, bncpu_##F##_load(a + i),                                    \
                          has_b ? bncpu_##F##_load(b + i) : none, has_b, hi, lo, scale,     \
                          offset, k, relu);                                                 \
        bncpu_##F##_store(out + i, v);                                                      \
    }                                                                                       \
    if (i < length) {                                                                       \
        n = (int)(length - i);                                                              \
        v = bncpu_half_op(kind, bncpu_##F##_load_n(a + i, n),                               \
                          has_b ? bncpu_##F##_load_n(b + i, n) : none, has_b, hi, lo,       \
                          scale, offset, k, relu);                                          \
        bncpu_##F##_store_n(out + i, v, n);                                                 \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* Short rows: segments t0..t1 of `s` values each (segment t is row t / c of channel        \
 * t % c), channel j's coefficients at hi[j], lo[j], scale[j], offset[j], k[j]. */          \
static inline void bncpu_half_pass_rows_##F(int kind, const bncpu_##F##_lane* a_,          \
                                            const bncpu_##F##_lane* b_,                     \
                                            bncpu_##F##_lane* out_, int64_t t0, int64_t t1, \
                                            int64_t c, int64_t s, const float* hi,          \
                                            const float* lo, const float* scale,            \
                                            const float* offset, const float* k, int relu)  \
{                                                                                           \
    const bncpu_##F* a = (const bncpu_##F*)a_;                                              \
    const bncpu_##F* b = (const bncpu_##F*)b_;                                              \
    bncpu_##F* out = (bncpu_##F*)out_;                                                      \
    const int has_b = b != NULL;                                                            \
    int64_t t, i, at, j = t0 % c;                                                           \
    for (t = t0; t < t1; t++) {                                                             \
        for (i = 0; i < s; i++) {                                                           \
            at = t * s + i;                                                                 \
            out[at] = bncpu_f32_to_##F(bncpu_half_op1(                                      \
                kind, bncpu_##F##_to_f32(a[at]), has_b ? bncpu_##F##_to_f32(b[at]) : 0.0f,  \
                has_b, hi[j], lo[j], scale[j], offset[j], k[j], relu));                     \
        }                                                                                   \
        if (++j == c)                                                                       \
            j = 0;                                                                          \
    }                                                                                       \
}

BNCPU_HALF_DEFINE_PASSES(bf16)
BNCPU_HALF_DEFINE_PASSES(f16)

#undef BNCPU_HALF_DEFINE_PASSES

#endif /* BNCPU_HALF_PASSES_H */
