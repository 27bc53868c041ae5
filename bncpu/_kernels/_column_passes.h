/* Column mode's elementwise passes with streaming stores, for _bn_column.pxi.
 *
 * Column mode sees a channels-last buffer as an (N, cols) matrix whose column j has its
 * own coefficients (see pass_columns). A pass over whole rows r0..r1 writes one
 * contiguous span; written with ordinary stores it moves three arrays' worth of bytes
 * (see _elementwise.h), with streaming stores two.
 *
 * Streaming stores write aligned vectors: rows must be a whole number of vectors (cols a
 * multiple of the vector width W) and the output aligned to an element
 * (bncpu_columns_stream_ok). A span whose output starts `head` elements before a cache
 * line (NumPy's large arrays start 16 bytes past one) writes those elements normally,
 * then vectors that each cover W consecutive columns, wrapping from the end of a row to
 * the start of the next: they take their coefficients from copies rotated by `head`
 * columns. Only whole lines are streamed (bncpu_stream_range in _elementwise.h); the
 * span's last partial line is written with ordinary vector stores. Every element gets the same operations in the same order as
 * pass_columns' scalar loops, so the results are bitwise those of the ordinary stores
 * (build with -ffp-contract=off).
 *
 *   affine:   y  = ((x - hi) - lo)·scale + offset
 *   backward: dx = ((dy - offset) - ((x - hi) - lo)·k)·scale
 *   scale:    dx = dy·scale
 */
#ifndef BNCPU_COLUMN_PASSES_H
#define BNCPU_COLUMN_PASSES_H

#include <stdint.h>
#include <string.h>
#include "_elementwise.h"

/* The passes' kinds. */
#define BNCPU_COLUMNS_AFFINE 0
#define BNCPU_COLUMNS_BACKWARD 1
#define BNCPU_COLUMNS_SCALE 2

/* Misaligned outputs: rows up to this many columns (rotated coefficients on the stack). */
#define BNCPU_COLUMNS_MAX_ROTATED 512

/* Whether rows of `cols` values of `itemsize` bytes, written at out, can be streamed. */
static inline int bncpu_columns_stream_ok(const void* out, int64_t cols, int64_t itemsize)
{
    const uintptr_t misalign = (uintptr_t)out % BNCPU_LINE_BYTES;
    return BNCPU_HAVE_STREAMING_STORES && misalign % itemsize == 0
           && (cols * itemsize) % BNCPU_EW_BYTES == 0
           && (misalign == 0 || cols <= BNCPU_COLUMNS_MAX_ROTATED);
}

/* One element of a pass (the vector code does the same operations on W elements). */
#define BNCPU_COLUMNS_ONE(kind, a, b, f, j, hi, lo, scale, offset, k)                         \
    ((kind) == BNCPU_COLUMNS_AFFINE                                                           \
         ? ((a[f] - hi[j]) - lo[j]) * scale[j] + offset[j]                                    \
     : (kind) == BNCPU_COLUMNS_BACKWARD                                                       \
         ? ((a[f] - offset[j]) - ((b[f] - hi[j]) - lo[j]) * k[j]) * scale[j]                  \
         : a[f] * scale[j])

#define BNCPU_DEFINE_COLUMN_PASSES(T, SUFFIX, VT)                                             \
static inline VT bncpu_col_load_##SUFFIX(const T* p)                                          \
{                                                                                             \
    VT v;                                                                                     \
    memcpy(&v, p, sizeof v);                                                                  \
    return v;                                                                                 \
}                                                                                             \
                                                                                              \
/* Rows 0..rows of (rows, cols) matrices a (and b) into out, streamed; the caller has         \
 * checked bncpu_columns_stream_ok. kind: BNCPU_COLUMNS_AFFINE, _BACKWARD or _SCALE. */       \
static inline void bncpu_columns_stream_##SUFFIX(int kind, const T* a, const T* b, T* out,    \
                                                 int64_t rows, int64_t cols, const T* hi,     \
                                                 const T* lo, const T* scale,                 \
                                                 const T* offset, const T* k)                 \
{                                                                                             \
    const int64_t per = BNCPU_EW_BYTES / sizeof(T), length = rows * cols;                     \
    int64_t end;                                                                              \
    const int64_t head = bncpu_stream_range(out, length, sizeof(T), &end);                    \
    T rotated[5][BNCPU_COLUMNS_MAX_ROTATED];                                                  \
    const T *rhi = hi, *rlo = lo, *rscale = scale, *roffset = offset, *rk = k;                \
    int64_t f, j, t;                                                                          \
    if (head > 0) {                                                                           \
        /* rotated[.][t]: the coefficient of column (head + t) % cols. */                     \
        for (t = 0; t < cols; t++) {                                                          \
            j = (head + t) % cols;                                                            \
            rotated[2][t] = scale[j];                                                         \
            if (kind != BNCPU_COLUMNS_SCALE) {                                                \
                rotated[0][t] = hi[j];                                                        \
                rotated[1][t] = lo[j];                                                        \
                rotated[3][t] = offset[j];                                                    \
            }                                                                                 \
            if (kind == BNCPU_COLUMNS_BACKWARD)                                               \
                rotated[4][t] = k[j];                                                         \
        }                                                                                     \
        rhi = rotated[0];                                                                     \
        rlo = rotated[1];                                                                     \
        rscale = rotated[2];                                                                  \
        roffset = rotated[3];                                                                 \
        rk = rotated[4];                                                                      \
    }                                                                                         \
    for (f = 0; f < head && f < length; f++)                                                  \
        out[f] = BNCPU_COLUMNS_ONE(kind, a, b, f, f % cols, hi, lo, scale, offset, k);        \
    for (t = 0; f + per <= length; f += per) {                                                \
        VT v;                                                                                 \
        if (kind == BNCPU_COLUMNS_AFFINE)                                                     \
            v = ((bncpu_col_load_##SUFFIX(a + f) - bncpu_col_load_##SUFFIX(rhi + t))          \
                 - bncpu_col_load_##SUFFIX(rlo + t)) * bncpu_col_load_##SUFFIX(rscale + t)    \
                + bncpu_col_load_##SUFFIX(roffset + t);                                       \
        else if (kind == BNCPU_COLUMNS_BACKWARD)                                              \
            v = ((bncpu_col_load_##SUFFIX(a + f) - bncpu_col_load_##SUFFIX(roffset + t))      \
                 - ((bncpu_col_load_##SUFFIX(b + f) - bncpu_col_load_##SUFFIX(rhi + t))       \
                    - bncpu_col_load_##SUFFIX(rlo + t)) * bncpu_col_load_##SUFFIX(rk + t))    \
                * bncpu_col_load_##SUFFIX(rscale + t);                                        \
        else                                                                                  \
            v = bncpu_col_load_##SUFFIX(a + f) * bncpu_col_load_##SUFFIX(rscale + t);         \
        if (f < end)                                                                          \
            bncpu_stream_bytes(out + f, (bncpu_ew_f32)v);                                     \
        else                                                                                  \
            memcpy(out + f, &v, sizeof v);                                                    \
        t += per;                                                                             \
        if (t == cols)                                                                        \
            t = 0;                                                                            \
    }                                                                                         \
    for (; f < length; f++)                                                                   \
        out[f] = BNCPU_COLUMNS_ONE(kind, a, b, f, f % cols, hi, lo, scale, offset, k);        \
    bncpu_store_fence();                                                                      \
}

BNCPU_DEFINE_COLUMN_PASSES(float, f32, bncpu_ew_f32)
BNCPU_DEFINE_COLUMN_PASSES(double, f64, bncpu_ew_f64)

#undef BNCPU_DEFINE_COLUMN_PASSES
#undef BNCPU_COLUMNS_ONE

#endif
