# Numeric building blocks shared by every kernel family: block statistics, their
# merge, and sums. All inline, all `noexcept nogil`, float32 or float64 data with
# float64 accumulation.
#
# Determinism: every reduction here is a fixed sequence of operations on a span whose
# bounds come from the shape alone, so a caller that merges spans in a fixed order
# gets bit-identical results whatever the number of threads.
#
# Vectorization: gcc may not reorder a floating-point sum (that would change the
# result), so the loops keep eight independent accumulators that the compiler packs
# into vector registers, then add them in a fixed tree.
from libc.stdint cimport int64_t

ctypedef fused real:
    float
    double

# Statistics of a long span are merged from blocks this long; a block's two passes
# (mean, then squared deviations from it) read the block from L1 cache.
cdef enum:
    STATS_BLOCK = 2048


cdef inline double sum_span(const real* x, int64_t length) noexcept nogil:
    """Σ x, in float64."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef int64_t i, stop = length - length % 8
    for i in range(0, stop, 8):
        a0 += x[i]
        a1 += x[i + 1]
        a2 += x[i + 2]
        a3 += x[i + 3]
        a4 += x[i + 4]
        a5 += x[i + 5]
        a6 += x[i + 6]
        a7 += x[i + 7]
    for i in range(stop, length):
        a0 += x[i]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


cdef inline double sum_sq_dev_span(const real* x, int64_t length, double center) noexcept nogil:
    """Σ (x - center)², in float64."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef double d0, d1, d2, d3, d4, d5, d6, d7
    cdef int64_t i, stop = length - length % 8
    for i in range(0, stop, 8):
        d0 = x[i] - center
        d1 = x[i + 1] - center
        d2 = x[i + 2] - center
        d3 = x[i + 3] - center
        d4 = x[i + 4] - center
        d5 = x[i + 5] - center
        d6 = x[i + 6] - center
        d7 = x[i + 7] - center
        a0 += d0 * d0
        a1 += d1 * d1
        a2 += d2 * d2
        a3 += d3 * d3
        a4 += d4 * d4
        a5 += d5 * d5
        a6 += d6 * d6
        a7 += d7 * d7
    for i in range(stop, length):
        d0 = x[i] - center
        a0 += d0 * d0
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


cdef inline double sum_sq_span(const real* x, int64_t length) noexcept nogil:
    """Σ x², in float64 (RMS norm)."""
    return sum_sq_dev_span(x, length, 0.0)


cdef inline void sum_dy_xmu_span(const real* dy, const real* x, int64_t length, double mean,
                                 double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    """Adds Σ dy and Σ dy·(x - mean) over the span to the two accumulators."""
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0, p0 = 0, p1 = 0, p2 = 0, p3 = 0
    cdef int64_t i, stop = length - length % 4
    for i in range(0, stop, 4):
        s0 += dy[i]
        s1 += dy[i + 1]
        s2 += dy[i + 2]
        s3 += dy[i + 3]
        p0 += dy[i] * (<double>x[i] - mean)
        p1 += dy[i + 1] * (<double>x[i + 1] - mean)
        p2 += dy[i + 2] * (<double>x[i + 2] - mean)
        p3 += dy[i + 3] * (<double>x[i + 3] - mean)
    for i in range(stop, length):
        s0 += dy[i]
        p0 += dy[i] * (<double>x[i] - mean)
    sum_dy[0] += (s0 + s1) + (s2 + s3)
    sum_dy_xmu[0] += (p0 + p1) + (p2 + p3)


cdef inline void merge_stats(double* count, double* mean, double* m2,
                             double count_b, double mean_b, double m2_b) noexcept nogil:
    """Chan et al.'s merge of (count, mean, M2) partials: M2 = Σ (x - mean)²."""
    cdef double count_a = count[0], total, delta
    if count_b == 0:
        return
    if count_a == 0:
        count[0] = count_b
        mean[0] = mean_b
        m2[0] = m2_b
        return
    total = count_a + count_b
    delta = mean_b - mean[0]
    mean[0] += delta * (count_b / total)
    m2[0] += m2_b + delta * delta * (count_a * count_b / total)
    count[0] = total


cdef inline void span_stats(const real* x, int64_t length,
                            double* count, double* mean, double* m2) noexcept nogil:
    """Merge the statistics of x[:length] into (count, mean, m2), block by block.

    Each block is summarized two-pass (exact mean, then squared deviations from it),
    so data whose mean dwarfs its spread loses no precision.
    """
    cdef int64_t start, start_index, size
    cdef double block_mean
    for start_index in range((length + STATS_BLOCK - 1) // STATS_BLOCK):
        start = start_index * STATS_BLOCK
        size = min(<int64_t>STATS_BLOCK, length - start)
        block_mean = sum_span(x + start, size) / size
        merge_stats(count, mean, m2, <double>size, block_mean,
                    sum_sq_dev_span(x + start, size, block_mean))


cdef inline void split_center(double center, real* hi, real* lo) noexcept nogil:
    """center ≈ hi + lo in the data's precision: (x - hi) - lo keeps float32 results
    exact to rounding even when the mean dwarfs the spread (x - hi is then exact)."""
    hi[0] = <real>center
    lo[0] = <real>(center - <double>hi[0])


cdef inline void affine_span(const real* x, real* y, int64_t length,
                             real hi, real lo, real scale, real shift) noexcept nogil:
    """y = ((x - hi) - lo)·scale + shift; y may be x."""
    cdef int64_t i
    for i in range(length):
        y[i] = ((x[i] - hi) - lo) * scale + shift


cdef inline void scale_span(const real* dy, real* dx, int64_t length, real scale) noexcept nogil:
    """dx = dy·scale; dx may be dy."""
    cdef int64_t i
    for i in range(length):
        dx[i] = dy[i] * scale


cdef inline void backward_span(const real* dy, const real* x, real* dx, int64_t length,
                               real hi, real lo, real k, real mean_dy, real scale) noexcept nogil:
    """dx = (dy - mean_dy - ((x - hi) - lo)·k)·scale; dx may be dy or x."""
    cdef int64_t i
    for i in range(length):
        dx[i] = (dy[i] - mean_dy - ((x[i] - hi) - lo) * k) * scale
