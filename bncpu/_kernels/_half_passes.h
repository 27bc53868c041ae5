/* Batch norm's elementwise pass on half-precision data, for _bn_half.pxi:
 *
 *   y = ((x - hi) - lo)·scale + shift, then + r (when r is given), then relu (when asked)
 *
 * in float32 on values widened in registers and narrowed as they are stored (_half.h),
 * never through a float32 array. The arithmetic is _elementwise.h's affine pass, operation
 * for operation, so y is the float32 pass's result on the widened values rounded once
 * to the data's format. Every lane, the vector body's and the tail's (loaded and stored
 * n lanes at a time), does the same float32 operations, so every build gives the same
 * bits. y may be x or r.
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

static inline bncpu_half_vf bncpu_half_relu(bncpu_half_vf v)
{
    const bncpu_half_vf zero = {0};
    return (bncpu_half_vf)((bncpu_half_vi32)v & ~(bncpu_half_vi32)(v < zero));
}

static inline bncpu_half_vf bncpu_half_affine(bncpu_half_vf v, float hi, float lo, float scale,
                                              float shift)
{
    return ((v - hi) - lo) * scale + shift;
}

#define BNCPU_HALF_DEFINE_PASSES(F)                                                         \
/* One row of `length` values. */                                                           \
static inline void bncpu_affine_relu_##F(const bncpu_##F##_lane* x_,                       \
                                         const bncpu_##F##_lane* r_, bncpu_##F##_lane* y_,  \
                                         int64_t length, float hi, float lo, float scale,   \
                                         float shift, int relu)                             \
{                                                                                           \
    const bncpu_##F* x = (const bncpu_##F*)x_;                                              \
    const bncpu_##F* r = (const bncpu_##F*)r_;                                              \
    bncpu_##F* y = (bncpu_##F*)y_;                                                          \
    bncpu_half_vf v;                                                                        \
    int64_t i = 0;                                                                          \
    int n;                                                                                  \
    for (; i + BNCPU_HALF_VW <= length; i += BNCPU_HALF_VW) {                               \
        v = bncpu_half_affine(bncpu_##F##_load(x + i), hi, lo, scale, shift);               \
        if (r != NULL)                                                                      \
            v = v + bncpu_##F##_load(r + i);                                                \
        bncpu_##F##_store(y + i, relu ? bncpu_half_relu(v) : v);                            \
    }                                                                                       \
    if (i < length) {                                                                       \
        n = (int)(length - i);                                                              \
        v = bncpu_half_affine(bncpu_##F##_load_n(x + i, n), hi, lo, scale, shift);          \
        if (r != NULL)                                                                      \
            v = v + bncpu_##F##_load_n(r + i, n);                                           \
        bncpu_##F##_store_n(y + i, relu ? bncpu_half_relu(v) : v, n);                       \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* Short rows: segments t0..t1 of `s` values each (segment t is row t / c of channel        \
 * t % c), the coefficients of channel j at hi[j], lo[j], scale[j], shift[j]. */            \
static inline void bncpu_affine_relu_rows_##F(const bncpu_##F##_lane* x_,                  \
                                              const bncpu_##F##_lane* r_,                   \
                                              bncpu_##F##_lane* y_, int64_t t0, int64_t t1, \
                                              int64_t c, int64_t s, const float* hi,        \
                                              const float* lo, const float* scale,          \
                                              const float* shift, int relu)                 \
{                                                                                           \
    const bncpu_##F* x = (const bncpu_##F*)x_;                                              \
    const bncpu_##F* r = (const bncpu_##F*)r_;                                              \
    bncpu_##F* y = (bncpu_##F*)y_;                                                          \
    int64_t t, k, at, j = t0 % c;                                                           \
    float v;                                                                                \
    for (t = t0; t < t1; t++) {                                                             \
        for (k = 0; k < s; k++) {                                                           \
            at = t * s + k;                                                                 \
            v = ((bncpu_##F##_to_f32(x[at]) - hi[j]) - lo[j]) * scale[j] + shift[j];        \
            if (r != NULL)                                                                  \
                v = v + bncpu_##F##_to_f32(r[at]);                                          \
            y[at] = bncpu_f32_to_##F(relu && v < 0 ? 0.0f : v);                            \
        }                                                                                   \
        if (++j == c)                                                                       \
            j = 0;                                                                          \
    }                                                                                       \
}

BNCPU_HALF_DEFINE_PASSES(bf16)
BNCPU_HALF_DEFINE_PASSES(f16)

#undef BNCPU_HALF_DEFINE_PASSES

#endif /* BNCPU_HALF_PASSES_H */
