/* Column mode's elementwise passes with streaming stores, for _bn_column.pxi.
 *
 * Column mode sees a channels-last buffer as an (N, cols) matrix whose column j has its
 * own coefficients (see pass_columns). A pass over whole rows r0..r1 writes one
 * contiguous span; written with ordinary stores it moves three arrays' worth of bytes
 * (see _elementwise.h), with streaming stores two. On (32, 56, 56, 64) float32 the
 * normalization went from 1.3x a NumPy copy to below it.
 *
 * Streaming needs whole aligned vectors: rows of a whole number of vectors (cols a
 * multiple of the vector width) and an aligned output (bncpu_columns_stream_ok). The
 * vector at column j then takes coefficients j..j+W-1 of each row, and every element
 * gets the same operations in the same order as pass_columns' scalar loops, so the
 * results are bitwise those of the ordinary stores (build with -ffp-contract=off).
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

/* Whether rows of `cols` values of `itemsize` bytes, written at out, can be streamed. */
static inline int bncpu_columns_stream_ok(const void* out, int64_t cols, int64_t itemsize)
{
    return BNCPU_HAVE_STREAMING_STORES && (uintptr_t)out % BNCPU_EW_BYTES == 0
           && (cols * itemsize) % BNCPU_EW_BYTES == 0;
}

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
    const int64_t per = BNCPU_EW_BYTES / sizeof(T);                                           \
    int64_t i, j, at;                                                                         \
    for (i = 0; i < rows; i++)                                                                \
        for (j = 0; j < cols; j += per) {                                                     \
            VT v;                                                                             \
            at = i * cols + j;                                                                \
            if (kind == BNCPU_COLUMNS_AFFINE)                                                 \
                v = ((bncpu_col_load_##SUFFIX(a + at) - bncpu_col_load_##SUFFIX(hi + j))      \
                     - bncpu_col_load_##SUFFIX(lo + j)) * bncpu_col_load_##SUFFIX(scale + j)  \
                    + bncpu_col_load_##SUFFIX(offset + j);                                    \
            else if (kind == BNCPU_COLUMNS_BACKWARD)                                          \
                v = ((bncpu_col_load_##SUFFIX(a + at) - bncpu_col_load_##SUFFIX(offset + j))  \
                     - ((bncpu_col_load_##SUFFIX(b + at) - bncpu_col_load_##SUFFIX(hi + j))   \
                        - bncpu_col_load_##SUFFIX(lo + j)) * bncpu_col_load_##SUFFIX(k + j))  \
                    * bncpu_col_load_##SUFFIX(scale + j);                                     \
            else                                                                              \
                v = bncpu_col_load_##SUFFIX(a + at) * bncpu_col_load_##SUFFIX(scale + j);     \
            bncpu_stream_bytes(out + at, (bncpu_ew_f32)v);                                    \
        }                                                                                     \
    bncpu_store_fence();                                                                      \
}

BNCPU_DEFINE_COLUMN_PASSES(float, f32, bncpu_ew_f32)
BNCPU_DEFINE_COLUMN_PASSES(double, f64, bncpu_ew_f64)

#undef BNCPU_DEFINE_COLUMN_PASSES

#endif
