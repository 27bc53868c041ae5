/* The elementwise passes of the normalizations, for _primitives.pxd, with an option to
 * write the output with non-temporal (streaming) stores.
 *
 * A normal store first reads the output's cache line from memory (read for
 * ownership), so a pass y = f(x) over arrays larger than the caches moves three
 * arrays' worth of bytes: x in, y in, y out. Streaming stores write whole lines
 * straight to memory and skip the read: two arrays' worth. They pay off only when the
 * output is not read again soon (it is larger than the last-level cache) and is not
 * the input itself; the callers decide (see STREAM_MIN_BYTES in _primitives.pxd).
 *
 * The arithmetic is the same with and without streaming, element by element, so the
 * choice never changes a bit. Every streaming pass ends with a store fence, so what it
 * wrote is visible to other threads once the pass returns.
 *
 *   affine:   y  = ((x - hi) - lo)·scale + shift
 *             (affine_relu: then + r and relu, batch norm + add + ReLU fused)
 *   backward: dx = (g - mean_dy - ((x - hi) - lo)·k)·scale
 *   scale:    dx = g·scale
 *             with g = dy, or for the fused ReLU's backward g = dy where the forward's
 *             output passed the ReLU, else 0 (g itself also written when asked)
 *   affine_each: y = ((x - hi) - lo)·scale·weight[i] + bias[i]   (layer norm)
 */
#ifndef BNCPU_ELEMENTWISE_H
#define BNCPU_ELEMENTWISE_H

#include <stdint.h>
#include <string.h>
/* Streaming stores are x86 instructions; elsewhere the "streaming" passes store
 * normally (the same values: only the memory traffic differs). */
#if defined(__SSE2__) && (defined(__x86_64__) || defined(__i386__) || defined(_M_X64))
#include <immintrin.h>
#define BNCPU_HAVE_STREAMING_STORES 1
#else
#define BNCPU_HAVE_STREAMING_STORES 0
#endif

#if defined(__AVX512F__)
#define BNCPU_EW_BYTES 64
#elif defined(__AVX__)
#define BNCPU_EW_BYTES 32
#else
#define BNCPU_EW_BYTES 16
#endif

typedef float bncpu_ew_f32 __attribute__((vector_size(BNCPU_EW_BYTES)));
typedef double bncpu_ew_f64 __attribute__((vector_size(BNCPU_EW_BYTES)));
typedef int32_t bncpu_ew_i32 __attribute__((vector_size(BNCPU_EW_BYTES)));
typedef int64_t bncpu_ew_i64 __attribute__((vector_size(BNCPU_EW_BYTES)));

/* One vector stored to p (aligned to BNCPU_EW_BYTES) without reading its line. */
static inline void bncpu_stream_bytes(void* p, bncpu_ew_f32 v)
{
#if !BNCPU_HAVE_STREAMING_STORES
    memcpy(p, &v, sizeof v);
#elif defined(__AVX512F__)
    _mm512_stream_ps((float*)p, (__m512)v);
#elif defined(__AVX__)
    _mm256_stream_ps((float*)p, (__m256)v);
#else
    _mm_stream_ps((float*)p, (__m128)v);
#endif
}

/* Orders the streaming stores before the later stores of this thread (x86's
 * streaming stores are weakly ordered); nothing to do for ordinary stores. */
static inline void bncpu_store_fence(void)
{
#if BNCPU_HAVE_STREAMING_STORES
    _mm_sfence();
#endif
}

/* Spans shorter than this are stored normally even when streaming is asked for: a
 * streaming store that fills only part of a cache line, and the fence after each
 * span, cost more than they save on short rows (e.g. 7x7 images). */
#define BNCPU_STREAM_MIN_SPAN_BYTES 4096

/* Streaming stores are issued for whole cache lines only. A line written partly by a
 * streaming store and partly by an ordinary one (a span's first and last lines, when
 * the output does not start on a line: NumPy's data sit 16 bytes past one) makes the
 * write-combining buffer flush a partial line, and a line shared by two spans is
 * written both ways: peeling only to the vector width makes the passes slower at some
 * output offsets (benchmarks/alignment.py). */
#define BNCPU_LINE_BYTES 64

/* The streamed part [head, *end) of a span of `length` elements at out: its whole
 * 64-byte lines. Elements before head and from *end on are stored normally (vectors,
 * then single elements). head = *end = 0 when the span is not streamed (too short, or
 * out not aligned to an element). */
static inline int64_t bncpu_stream_range(const void* out, int64_t length, int64_t itemsize,
                                         int64_t* end)
{
    const uintptr_t misalign = (uintptr_t)out % BNCPU_LINE_BYTES;
    const int64_t per_line = BNCPU_LINE_BYTES / itemsize;
    int64_t head;
    *end = 0;
    if (misalign % itemsize != 0 || length * itemsize < BNCPU_STREAM_MIN_SPAN_BYTES)
        return 0;
    head = misalign ? (int64_t)((BNCPU_LINE_BYTES - misalign) / itemsize) : 0;
    if (head >= length)
        return 0;
    *end = head + (length - head) / per_line * per_line;
    return head;
}

/* A second output (g_out) streams along with the first (out) when both sit at the same
 * offset within a line: the first's streamed range then covers whole lines of both. */
static inline int bncpu_stream_along(const void* g_out, const void* out, int stream)
{
    return stream && g_out != NULL
           && ((uintptr_t)g_out - (uintptr_t)out) % BNCPU_LINE_BYTES == 0;
}

/* relu(v) = 0 where v < 0, else v (NaN and -0.0 kept, as torch.relu); the mask of
 * the fused backwards keeps g where the forward's output y passed the ReLU, that is
 * where !(y <= 0) (a NaN output passes its gradient, as torch's threshold_backward).
 * Both clear bits (v & ~mask), so a cleared value is +0, as a select would give. */
#define BNCPU_DEFINE_ELEMENTWISE(T, SUFFIX, VT, IT)                                           \
/* v at p (BNCPU_EW_BYTES-aligned when streaming): a streaming or an ordinary store. */     \
static inline void bncpu_store_##SUFFIX(T* p, VT v, int stream)                               \
{                                                                                             \
    if (stream)                                                                               \
        bncpu_stream_bytes(p, (bncpu_ew_f32)v);                                               \
    else                                                                                      \
        memcpy(p, &v, sizeof v);                                                              \
}                                                                                             \
                                                                                              \
static inline T bncpu_relu1_##SUFFIX(T v)                                                     \
{                                                                                             \
    return v < 0 ? (T)0 : v;                                                                  \
}                                                                                             \
                                                                                              \
static inline VT bncpu_reluv_##SUFFIX(VT v)                                                   \
{                                                                                             \
    const VT zero = {0};                                                                      \
    return (VT)((IT)v & ~(IT)(v < zero));                                                     \
}                                                                                             \
                                                                                              \
/* g where mask (may be NULL: no mask) passed, else 0. */                                     \
static inline T bncpu_mask1_##SUFFIX(T g, const T* mask, int64_t i)                           \
{                                                                                             \
    return mask != NULL && mask[i] <= 0 ? (T)0 : g;                                           \
}                                                                                             \
                                                                                              \
static inline VT bncpu_maskv_##SUFFIX(VT g, const T* mask, int64_t i)                         \
{                                                                                             \
    const VT zero = {0};                                                                      \
    VT m;                                                                                     \
    if (mask == NULL)                                                                         \
        return g;                                                                             \
    memcpy(&m, mask + i, sizeof m);                                                           \
    return (VT)((IT)g & ~(IT)(m <= zero));                                                    \
}                                                                                             \
                                                                                              \
static inline T bncpu_affine1_##SUFFIX(const T* x, const T* r, int64_t i, T hi, T lo,         \
                                       T scale, T shift, int relu)                            \
{                                                                                             \
    T v = ((x[i] - hi) - lo) * scale + shift;                                                 \
    if (r != NULL)                                                                            \
        v = v + r[i];                                                                         \
    return relu ? bncpu_relu1_##SUFFIX(v) : v;                                                \
}                                                                                             \
                                                                                              \
static inline VT bncpu_affinev_##SUFFIX(const T* x, const T* r, int64_t i, T hi, T lo,        \
                                        T scale, T shift, int relu)                           \
{                                                                                             \
    VT v, w;                                                                                  \
    memcpy(&v, x + i, sizeof v);                                                              \
    v = ((v - hi) - lo) * scale + shift;                                                      \
    if (r != NULL) {                                                                          \
        memcpy(&w, r + i, sizeof w);                                                          \
        v = v + w;                                                                            \
    }                                                                                         \
    return relu ? bncpu_reluv_##SUFFIX(v) : v;                                                \
}                                                                                             \
                                                                                              \
/* y = ((x - hi) - lo)·scale + shift, then + r[i] when r is given, then relu when asked:     \
 * y may be x or r. */                                                                        \
static inline void bncpu_affine_relu_##SUFFIX(const T* x, const T* r, T* y, int64_t length,   \
                                              T hi, T lo, T scale, T shift, int relu,         \
                                              int stream)                                     \
{                                                                                             \
    const int64_t per = BNCPU_EW_BYTES / sizeof(T);                                           \
    int64_t i = 0, head = 0, end = 0;                                                         \
    if (stream)                                                                               \
        head = bncpu_stream_range(y, length, sizeof(T), &end);                                \
    for (; i < head; i++)                                                                     \
        y[i] = bncpu_affine1_##SUFFIX(x, r, i, hi, lo, scale, shift, relu);                   \
    for (; i + per <= length; i += per)                                                       \
        bncpu_store_##SUFFIX(y + i, bncpu_affinev_##SUFFIX(x, r, i, hi, lo, scale, shift,     \
                                                           relu), i < end);                   \
    if (end > head)                                                                           \
        bncpu_store_fence();                                                                  \
    for (; i < length; i++)                                                                   \
        y[i] = bncpu_affine1_##SUFFIX(x, r, i, hi, lo, scale, shift, relu);                   \
}                                                                                             \
                                                                                              \
static inline void bncpu_affine_##SUFFIX(const T* x, T* y, int64_t length, T hi, T lo,        \
                                         T scale, T shift, int stream)                        \
{                                                                                             \
    bncpu_affine_relu_##SUFFIX(x, NULL, y, length, hi, lo, scale, shift, 0, stream);          \
}                                                                                             \
                                                                                              \
/* The backward pass of g = dy masked by `mask` (may be NULL: g = dy); g is also written    \
 * to g_out when given, after x is read. dx and g_out may each be dy, x or mask; g_out must  \
 * not be dx. */                                                                              \
static inline T bncpu_backward1_##SUFFIX(const T* dy, const T* mask, const T* x, T* g_out,    \
                                         int64_t i, T hi, T lo, T k, T mean_dy, T scale)      \
{                                                                                             \
    T g = bncpu_mask1_##SUFFIX(dy[i], mask, i);                                               \
    T result = (g - mean_dy - ((x[i] - hi) - lo) * k) * scale;                                \
    if (g_out != NULL)                                                                        \
        g_out[i] = g;                                                                         \
    return result;                                                                            \
}                                                                                             \
                                                                                              \
static inline void bncpu_backward_relu_##SUFFIX(const T* dy, const T* mask, const T* x,       \
                                                T* dx, T* g_out, int64_t length, T hi, T lo,  \
                                                T k, T mean_dy, T scale, int stream)          \
{                                                                                             \
    const int64_t per = BNCPU_EW_BYTES / sizeof(T);                                           \
    const int stream_g = bncpu_stream_along(g_out, dx, stream);                               \
    int64_t i = 0, head = 0, end = 0;                                                         \
    VT g, v;                                                                                  \
    if (stream)                                                                               \
        head = bncpu_stream_range(dx, length, sizeof(T), &end);                               \
    for (; i < head; i++)                                                                     \
        dx[i] = bncpu_backward1_##SUFFIX(dy, mask, x, g_out, i, hi, lo, k, mean_dy, scale);   \
    for (; i + per <= length; i += per) {                                                     \
        memcpy(&g, dy + i, sizeof g);                                                         \
        memcpy(&v, x + i, sizeof v);                                                          \
        g = bncpu_maskv_##SUFFIX(g, mask, i);                                                 \
        if (g_out != NULL)                                                                    \
            bncpu_store_##SUFFIX(g_out + i, g, stream_g && i < end);                          \
        bncpu_store_##SUFFIX(dx + i, (g - mean_dy - ((v - hi) - lo) * k) * scale, i < end);   \
    }                                                                                         \
    if (end > head)                                                                           \
        bncpu_store_fence();                                                                  \
    for (; i < length; i++)                                                                   \
        dx[i] = bncpu_backward1_##SUFFIX(dy, mask, x, g_out, i, hi, lo, k, mean_dy, scale);   \
}                                                                                             \
                                                                                              \
/* dx = g·scale, g = dy masked by `mask` (may be NULL), g also to g_out when given. */       \
static inline T bncpu_scale1_##SUFFIX(const T* dy, const T* mask, T* g_out, int64_t i,        \
                                      T scale)                                                \
{                                                                                             \
    T g = bncpu_mask1_##SUFFIX(dy[i], mask, i);                                               \
    if (g_out != NULL)                                                                        \
        g_out[i] = g;                                                                         \
    return g * scale;                                                                         \
}                                                                                             \
                                                                                              \
static inline void bncpu_scale_relu_##SUFFIX(const T* dy, const T* mask, T* dx, T* g_out,     \
                                             int64_t length, T scale, int stream)             \
{                                                                                             \
    const int64_t per = BNCPU_EW_BYTES / sizeof(T);                                           \
    const int stream_g = bncpu_stream_along(g_out, dx, stream);                               \
    int64_t i = 0, head = 0, end = 0;                                                         \
    VT g;                                                                                     \
    if (stream)                                                                               \
        head = bncpu_stream_range(dx, length, sizeof(T), &end);                               \
    for (; i < head; i++)                                                                     \
        dx[i] = bncpu_scale1_##SUFFIX(dy, mask, g_out, i, scale);                             \
    for (; i + per <= length; i += per) {                                                     \
        memcpy(&g, dy + i, sizeof g);                                                         \
        g = bncpu_maskv_##SUFFIX(g, mask, i);                                                 \
        if (g_out != NULL)                                                                    \
            bncpu_store_##SUFFIX(g_out + i, g, stream_g && i < end);                          \
        bncpu_store_##SUFFIX(dx + i, g * scale, i < end);                                     \
    }                                                                                         \
    if (end > head)                                                                           \
        bncpu_store_fence();                                                                  \
    for (; i < length; i++)                                                                   \
        dx[i] = bncpu_scale1_##SUFFIX(dy, mask, g_out, i, scale);                             \
}

/* Layer norm's pass, weight and bias per element (either may be NULL: 1 and 0). */
#define BNCPU_DEFINE_AFFINE_EACH(T, SUFFIX, VT)                                               \
static inline void bncpu_affine_each_##SUFFIX(const T* x, T* y, int64_t length, T hi, T lo,   \
                                              T scale, const T* weight, const T* bias,        \
                                              int stream)                                     \
{                                                                                             \
    const int64_t per = BNCPU_EW_BYTES / sizeof(T);                                           \
    int64_t i = 0, head = 0, end = 0;                                                         \
    if (weight == NULL || bias == NULL) {                                                     \
        /* Rare (layer norm without affine parameters): scalar, streaming or not. */          \
        for (; i < length; i++)                                                               \
            y[i] = ((x[i] - hi) - lo) * scale * (weight ? weight[i] : 1)                      \
                   + (bias ? bias[i] : 0);                                                    \
        return;                                                                               \
    }                                                                                         \
    if (stream)                                                                               \
        head = bncpu_stream_range(y, length, sizeof(T), &end);                                \
    for (; i < head; i++)                                                                     \
        y[i] = ((x[i] - hi) - lo) * scale * weight[i] + bias[i];                              \
    for (; i + per <= length; i += per) {                                                     \
        VT v, w, b;                                                                           \
        memcpy(&v, x + i, sizeof v);                                                          \
        memcpy(&w, weight + i, sizeof w);                                                     \
        memcpy(&b, bias + i, sizeof b);                                                       \
        v = ((v - hi) - lo) * scale * w + b;                                                  \
        bncpu_store_##SUFFIX(y + i, v, i < end);                                              \
    }                                                                                         \
    if (end > head)                                                                           \
        bncpu_store_fence();                                                                  \
    for (; i < length; i++)                                                                   \
        y[i] = ((x[i] - hi) - lo) * scale * weight[i] + bias[i];                              \
}

BNCPU_DEFINE_ELEMENTWISE(float, f32, bncpu_ew_f32, bncpu_ew_i32)
BNCPU_DEFINE_ELEMENTWISE(double, f64, bncpu_ew_f64, bncpu_ew_i64)
BNCPU_DEFINE_AFFINE_EACH(float, f32, bncpu_ew_f32)
BNCPU_DEFINE_AFFINE_EACH(double, f64, bncpu_ew_f64)

#undef BNCPU_DEFINE_ELEMENTWISE
#undef BNCPU_DEFINE_AFFINE_EACH

/* Ask for the cache lines of bytes at p to be brought into L2 ahead of use. */
static inline void bncpu_prefetch(const void* p, int64_t bytes)
{
    const char* c = (const char*)p;
    int64_t at;
    for (at = 0; at < bytes; at += 64)
        __builtin_prefetch(c + at, 0, 2);
}

/* The same for lines about to be written (fetched for ownership ahead of the stores). */
static inline void bncpu_prefetch_write(void* p, int64_t bytes)
{
    char* c = (char*)p;
    int64_t at;
    for (at = 0; at < bytes; at += 64)
        __builtin_prefetch(c + at, 1, 2);
}

/* Layer and RMS norm backward over `length` columns of one row:
 *   dx     = (dy·weight - mean_g - ((x - hi) - lo)·k)·scale
 *   acc_w += dy·(((x - hi) - lo)·scale)
 *   acc_b += dy
 * The float32 accumulators hold a column's sums over a few rows; the caller widens
 * them into float64 partials (bncpu_widen_f32), as the runs of _float32_sums.h do.
 * dx (may be dy or x), weight, acc_w and acc_b may be NULL. With `stream` (dx neither
 * dy nor x), dx's whole cache lines are written with streaming stores. */
static inline void bncpu_row_backward1_f32(const float* dy, const float* x, float* dx,
                                           int64_t i, float hi, float lo, float scale,
                                           float mean_g, float k, const float* weight,
                                           float* acc_w, float* acc_b)
{
    float d = dy[i], xh = (x[i] - hi) - lo;
    if (acc_w != NULL)
        acc_w[i] += d * (xh * scale);
    if (acc_b != NULL)
        acc_b[i] += d;
    if (dx != NULL)
        dx[i] = (d * (weight != NULL ? weight[i] : 1.0f) - mean_g - xh * k) * scale;
}

static inline void bncpu_row_backward_f32(const float* dy, const float* x, float* dx,
                                          int64_t length, float hi, float lo, float scale,
                                          float mean_g, float k, const float* weight,
                                          float* acc_w, float* acc_b, int stream)
{
    const int64_t per = BNCPU_EW_BYTES / sizeof(float);
    const bncpu_ew_f32 ones = (bncpu_ew_f32){0} + 1.0f;
    int64_t i = 0, head = 0, end = 0;
    if (stream && dx != NULL)
        head = bncpu_stream_range(dx, length, sizeof(float), &end);
    for (; i < head; i++)
        bncpu_row_backward1_f32(dy, x, dx, i, hi, lo, scale, mean_g, k, weight, acc_w, acc_b);
    /* One loop body; gcc unswitches it on the NULL tests. dy and x are read before dx,
     * which may be either of them, is written. */
    for (; i + per <= length; i += per) {
        bncpu_ew_f32 d, v, w, xh, a;
        memcpy(&d, dy + i, sizeof d);
        memcpy(&v, x + i, sizeof v);
        xh = (v - hi) - lo;
        if (acc_w != NULL) {
            memcpy(&a, acc_w + i, sizeof a);
            a += d * (xh * scale);
            memcpy(acc_w + i, &a, sizeof a);
        }
        if (acc_b != NULL) {
            memcpy(&a, acc_b + i, sizeof a);
            a += d;
            memcpy(acc_b + i, &a, sizeof a);
        }
        if (dx != NULL) {
            if (weight != NULL)
                memcpy(&w, weight + i, sizeof w);
            else
                w = ones;
            v = (d * w - mean_g - xh * k) * scale;
            bncpu_store_f32(dx + i, v, i < end);
        }
    }
    if (end > head)
        bncpu_store_fence();
    for (; i < length; i++)
        bncpu_row_backward1_f32(dy, x, dx, i, hi, lo, scale, mean_g, k, weight, acc_w, acc_b);
}

/* partial += acc (widened to float64), then acc = 0. */
static inline void bncpu_widen_f32(float* acc, double* partial, int64_t length)
{
    int64_t i;
    for (i = 0; i < length; i++) {
        partial[i] += acc[i];
        acc[i] = 0;
    }
}

/* Layer and RMS norm backward, rows of one group sharing their columns' parameters:
 * rows r < n_rows (at most 8) of `length` columns, row r at dy + r·stride etc.:
 *   dx[r]     = (dy[r]·weight - mean_g[r] - ((x[r] - hi[r]) - lo[r])·k[r])·scale[r]
 *   dweight  += Σ_r dy[r]·(((x[r] - hi[r]) - lo[r])·scale[r])
 *   dbias    += Σ_r dy[r]
 * in float32, rows in order, each column's sum over the rows widened once into the
 * float64 partials (as the runs of _float32_sums.h). dx (may be dy or x), weight,
 * dweight, dbias may be NULL. Rows 4 KiB apart map their lines to the same L1 sets:
 * used for long rows, a few at a time, read from L3 (see row_norm.pyx). */
static inline void bncpu_rows_span_backward_f32(const float* dy, const float* x, float* dx,
                                              int64_t stride, int n_rows, int64_t length,
                                              const float* hi, const float* lo,
                                              const float* scale, const float* mean_g,
                                              const float* k, const float* weight,
                                              double* dweight, double* dbias)
{
    const int64_t per = BNCPU_EW_BYTES / sizeof(float);
    int64_t i = 0, at;
    int r, e;
    for (; i + per <= length; i += per) {
        bncpu_ew_f32 sw = {0}, sb = {0}, w, d, v, xh, out;
        if (weight != NULL)
            memcpy(&w, weight + i, sizeof w);
        else
            for (e = 0; e < per; e++)
                w[e] = 1;
        for (r = 0; r < n_rows; r++) {
            at = r * stride + i;
            memcpy(&d, dy + at, sizeof d);
            memcpy(&v, x + at, sizeof v);
            xh = (v - hi[r]) - lo[r];
            sw += d * (xh * scale[r]);
            sb += d;
            if (dx != NULL) {
                out = (d * w - mean_g[r] - xh * k[r]) * scale[r];
                memcpy(dx + at, &out, sizeof out);
            }
        }
        for (e = 0; e < per; e++) {
            if (dweight != NULL)
                dweight[i + e] += sw[e];
            if (dbias != NULL)
                dbias[i + e] += sb[e];
        }
    }
    for (; i < length; i++) {
        float sw = 0, sb = 0, w = weight != NULL ? weight[i] : 1, d, xh;
        for (r = 0; r < n_rows; r++) {
            at = r * stride + i;
            d = dy[at];
            xh = (x[at] - hi[r]) - lo[r];
            sw += d * (xh * scale[r]);
            sb += d;
            if (dx != NULL)
                dx[at] = (d * w - mean_g[r] - xh * k[r]) * scale[r];
        }
        if (dweight != NULL)
            dweight[i] += sw;
        if (dbias != NULL)
            dbias[i] += sb;
    }
}

#endif
