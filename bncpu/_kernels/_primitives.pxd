# Numeric building blocks shared by every kernel family: block statistics, their
# merge, and sums. All inline, all `noexcept nogil`, float32 or float64 data with
# float64 accumulation.
#
# Determinism: every reduction here is a fixed sequence of operations on a span whose
# bounds come from the shape alone, so a caller that merges spans in a fixed order
# gets bit-identical results whatever the number of threads.
#
# float32 data goes through _float32_sums.h, which adds runs of 8 values per lane in
# float32 before widening (a float->double conversion per element bounds the plain
# float64 loops): the statistics then sum deviations from a float32 center near the
# mean, and correct for the center's offset in float64 (see add_dev_span, finish_dev).
#
# Vectorization (float64 data): gcc may not reorder a floating-point sum (that would change the
# result), so the sums run in LANES independent accumulators (an array the compiler
# keeps in vector registers: several dependency chains, so the adds pipeline), then
# add them in a fixed tree. Lane k always sums the same elements, whatever the vector
# width, so every build gives the same result for any number of threads.
from libc.math cimport isfinite, NAN
from libc.stdint cimport int64_t

cdef extern from "_elementwise.h":
    # The elementwise passes, optionally with streaming stores (see there).
    void affine_f32 "bncpu_affine_f32"(const float* x, float* y, int64_t length, float hi,
                                       float lo, float scale, float shift, int stream) noexcept nogil
    void affine_f64 "bncpu_affine_f64"(const double* x, double* y, int64_t length, double hi,
                                       double lo, double scale, double shift,
                                       int stream) noexcept nogil
    void affine_each_f32 "bncpu_affine_each_f32"(const float* x, float* y, int64_t length,
                                                 float hi, float lo, float scale,
                                                 const float* weight, const float* bias,
                                                 int stream) noexcept nogil
    void affine_each_f64 "bncpu_affine_each_f64"(const double* x, double* y, int64_t length,
                                                 double hi, double lo, double scale,
                                                 const double* weight, const double* bias,
                                                 int stream) noexcept nogil
    void row_backward_f32 "bncpu_row_backward_f32"(
        const float* dy, const float* x, float* dx, int64_t length, float hi, float lo,
        float scale, float mean_g, float k, const float* weight, float* acc_w,
        float* acc_b, int stream) noexcept nogil
    enum:
        STREAM_MIN_SPAN_BYTES "BNCPU_STREAM_MIN_SPAN_BYTES"   # shorter spans: no streaming
    void prefetch "bncpu_prefetch"(const void* p, int64_t n_bytes) noexcept nogil
    void prefetch_write "bncpu_prefetch_write"(void* p, int64_t n_bytes) noexcept nogil
    void widen_f32 "bncpu_widen_f32"(float* acc, double* partial, int64_t length) noexcept nogil
    void rows_span_backward_f32 "bncpu_rows_span_backward_f32"(
        const float* dy, const float* x, float* dx, int64_t stride, int n_rows, int64_t length,
        const float* hi, const float* lo, const float* scale, const float* mean_g,
        const float* k, const float* weight, double* dweight, double* dbias) noexcept nogil
    # The fused batch norm + (add +) ReLU forms of affine, and the backward and scale
    # passes (with the ReLU's mask, or NULL for none).
    void affine_relu_f32 "bncpu_affine_relu_f32"(const float* x, const float* r, float* y,
                                                 int64_t length, float hi, float lo, float scale,
                                                 float shift, int relu, int stream) noexcept nogil
    void affine_relu_f64 "bncpu_affine_relu_f64"(const double* x, const double* r, double* y,
                                                 int64_t length, double hi, double lo,
                                                 double scale, double shift, int relu,
                                                 int stream) noexcept nogil
    void backward_relu_f32 "bncpu_backward_relu_f32"(
        const float* dy, const float* mask, const float* x, float* dx, float* g_out,
        int64_t length, float hi, float lo, float k, float mean_dy, float scale,
        int stream) noexcept nogil
    void backward_relu_f64 "bncpu_backward_relu_f64"(
        const double* dy, const double* mask, const double* x, double* dx, double* g_out,
        int64_t length, double hi, double lo, double k, double mean_dy, double scale,
        int stream) noexcept nogil
    void scale_relu_f32 "bncpu_scale_relu_f32"(const float* dy, const float* mask, float* dx,
                                               float* g_out, int64_t length, float scale,
                                               int stream) noexcept nogil
    void scale_relu_f64 "bncpu_scale_relu_f64"(const double* dy, const double* mask,
                                               double* dx, double* g_out, int64_t length,
                                               double scale, int stream) noexcept nogil

cdef extern from "_float32_sums.h":
    # float32 spans: float32 runs of 8 per lane, widened into float64 lanes (see there).
    void f32_add_sums "bncpu_f32_add_sums"(double* lanes, const float* x,
                                           int64_t length) noexcept nogil
    void f32_add_dev_sums "bncpu_f32_add_dev_sums"(double* sum_lanes, double* sq_lanes,
                                                   const float* x, int64_t length,
                                                   float center) noexcept nogil
    void f32_add_grad_sums "bncpu_f32_add_grad_sums"(double* g_lanes, double* g_dev_lanes,
                                                     const float* dy, const float* weight,
                                                     const float* mask, const float* x,
                                                     int64_t length, float center) noexcept nogil
    # Columns of a (rows, width) block with rows `stride` apart (batch norm with S == 1).
    void f32_add_column_sums "bncpu_f32_add_column_sums"(
        double* sums, const float* x, int64_t rows, int64_t stride, int64_t width) noexcept nogil
    void f32_add_column_dev_sums "bncpu_f32_add_column_dev_sums"(
        double* sum, double* sq, const float* x, int64_t rows, int64_t stride, int64_t width,
        const float* center) noexcept nogil
    void f32_add_column_grad_sums "bncpu_f32_add_column_grad_sums"(
        double* dy_sum, double* dev_sum, const float* dy, const float* mask, const float* x,
        int64_t rows, int64_t stride, int64_t width, const float* center) noexcept nogil

ctypedef fused real:
    float
    double

# Statistics of a long span are merged from blocks this long; a block's two passes
# (mean, then squared deviations from it) read the block from L1 cache.
cdef enum:
    STATS_BLOCK = 2048
    LANES = 16
    HINT_VALUES = 128      # float32 blocks: values whose mean centers a one-pass try



cdef inline double sum_lanes(const double* lanes) noexcept nogil:
    """The LANES (16) partial sums added in a fixed pairwise tree: lane k + 8 into lane k,
    then k + 4 into k, k + 2 into k, 1 into 0. Written out: a loop over the tree's
    levels stays a scalar loop, and this runs once per span."""
    cdef double t0 = lanes[0] + lanes[8]
    cdef double t1 = lanes[1] + lanes[9]
    cdef double t2 = lanes[2] + lanes[10]
    cdef double t3 = lanes[3] + lanes[11]
    cdef double t4 = lanes[4] + lanes[12]
    cdef double t5 = lanes[5] + lanes[13]
    cdef double t6 = lanes[6] + lanes[14]
    cdef double t7 = lanes[7] + lanes[15]
    return ((t0 + t4) + (t2 + t6)) + ((t1 + t5) + (t3 + t7))


cdef inline void zero_lanes(double* lanes) noexcept nogil:
    cdef int k
    for k in range(LANES):
        lanes[k] = 0


cdef inline void add_span(double* lanes, const real* x, int64_t length) noexcept nogil:
    """lanes += x, element i going to lane i % LANES (float32: approximately, in runs)."""
    cdef int64_t i, i_block, stop = length - length % LANES
    cdef int k
    if real is float:
        f32_add_sums(lanes, x, length)
    else:
        for i_block in range(stop // LANES):
            i = i_block * LANES
            for k in range(LANES):
                lanes[k] += x[i + k]
        for i in range(stop, length):
            lanes[i - stop] += x[i]


cdef inline void add_dev_span(double* sum_lanes, double* sq_lanes, const real* x,
                              int64_t length, real center) noexcept nogil:
    """sum_lanes += x - center and sq_lanes += (x - center)², lane by lane.

    The center is a mean rounded to the data's precision (<real>mean): the exact mean
    for float64 data, whose deviations sum to ~0, so only sq_lanes is kept; for float32
    data a float32 value near it, corrected for by finish_dev."""
    cdef double d
    cdef int64_t i, i_block, stop = length - length % LANES
    cdef int k
    if real is float:
        f32_add_dev_sums(sum_lanes, sq_lanes, x, length, center)
    else:
        for i_block in range(stop // LANES):
            i = i_block * LANES
            for k in range(LANES):
                d = x[i + k] - center
                sq_lanes[k] += d * d
        for i in range(stop, length):
            d = x[i] - center
            sq_lanes[i - stop] += d * d


cdef inline void add_dev_span_f64(const float* x, int64_t length, double center,
                                  double* sum_dev, double* sum_sq) noexcept nogil:
    """sum_dev += Σ(x - center), sum_sq += Σ(x - center)², in float64: the fallback of
    the float32 sums when their squares overflow (a spread beyond about 1e19, whose
    variance float64 holds); one lane, in order, so still deterministic."""
    cdef int64_t i
    cdef double d
    for i in range(length):
        d = x[i] - center
        sum_dev[0] += d
        sum_sq[0] += d * d


cdef inline void finish_dev(double count, double center, double sum_dev, double sum_sq,
                            double* mean, double* m2) noexcept nogil:
    """Mean and M2 of count values from Σ(x - center) and Σ(x - center)².

    Every caller's center is the plain mean rounded to the data's precision, or a try
    that is summed again when off: when it is infinite or NaN (data holding inf or NaN),
    the deviations are all NaN, and the plain mean is the center itself (inf for data
    holding +inf, as PyTorch gives), M2 NaN."""
    cdef double shift
    if not isfinite(center):
        mean[0] = center
        m2[0] = NAN
        return
    shift = sum_dev / count
    mean[0] = center + shift
    m2[0] = sum_sq - sum_dev * shift
    if m2[0] < 0:   # rounding; a NaN stays NaN
        m2[0] = 0


cdef inline real masked(const real* dy, const real* mask, int64_t i) noexcept nogil:
    """dy[i] where the fused ReLU passed it (mask[i] = the forward's output, !(mask[i] <= 0):
    NaN passes, as in torch), else 0; mask NULL: dy[i]."""
    if mask != NULL and mask[i] <= 0:
        return 0
    return dy[i]


cdef inline void add_grad_sums_f64(const float* dy, const float* weight, const float* mask,
                                   const float* x, int64_t count, int64_t stride,
                                   double center, double* sum_g,
                                   double* sum_g_dev) noexcept nogil:
    """sum_g += Σg and sum_g_dev += Σg·(x - center) over count values `stride` apart,
    g = dy·weight (dy when weight is NULL, masked by mask, may be NULL), in float64: the
    fallback of the float32 gradient sums when their float32 products or partial sums
    overflow (|dy·(x - mean)| beyond about 1e38: dy and the spread both beyond about
    1e19), which float64 holds. One lane, in order, so still deterministic."""
    cdef int64_t i
    cdef double g
    for i in range(count):
        g = masked(dy, mask, i * stride)
        if weight != NULL:
            g = g * weight[i * stride]
        sum_g[0] += g
        sum_g_dev[0] += g * (<double>x[i * stride] - center)


cdef inline void add_dy_xmu_span(double* dy_lanes, double* dy_xmu_lanes, const real* dy,
                                 const real* mask, const real* x, int64_t length,
                                 real center) noexcept nogil:
    """dy_lanes += dy; dy_xmu_lanes += dy·(x - center), center = <real>mean:
    then Σdy·(x - mean) = Σdy·(x - center) - (mean - center)·Σdy (see finish_dy_xmu).
    dy masked by mask (may be NULL, see masked).

    float64: two loops, one sum each: gcc leaves a loop that updates two lane arrays at
    once mostly scalar; the second loop reads from L1."""
    cdef int64_t i, i_block, stop = length - length % LANES
    cdef int k
    if real is float:
        f32_add_grad_sums(dy_lanes, dy_xmu_lanes, dy, NULL, mask, x, length, center)
    else:
        for i_block in range(stop // LANES):
            i = i_block * LANES
            for k in range(LANES):
                dy_lanes[k] += masked(dy, mask, i + k)
        for i_block in range(stop // LANES):
            i = i_block * LANES
            for k in range(LANES):
                dy_xmu_lanes[k] += masked(dy, mask, i + k) * (<double>x[i + k] - center)
        for i in range(stop, length):
            dy_lanes[i - stop] += masked(dy, mask, i)
            dy_xmu_lanes[i - stop] += masked(dy, mask, i) * (<double>x[i] - center)


cdef inline double finish_dy_xmu(double sum_dy, double sum_dy_dev, double mean,
                                 double center) noexcept nogil:
    """Σdy·(x - mean) from Σdy and Σdy·(x - center)."""
    return sum_dy_dev - (mean - center) * sum_dy


cdef inline double sum_span(const real* x, int64_t length) noexcept nogil:
    """Σ x, in float64."""
    cdef double lanes[LANES]
    zero_lanes(lanes)
    add_span(lanes, x, length)
    return sum_lanes(lanes)


cdef inline double sum_sq_span(const real* x, int64_t length) noexcept nogil:
    """Σ x², in float64 (RMS norm; float32: squares rounded to float32, see add_dev_span)."""
    cdef double sum_lanes_[LANES]
    cdef double sq_lanes[LANES]
    cdef double sum_sq, sum_dev = 0
    zero_lanes(sum_lanes_)
    zero_lanes(sq_lanes)
    add_dev_span(sum_lanes_, sq_lanes, x, length, 0)
    sum_sq = sum_lanes(sq_lanes)
    if real is float:
        if not isfinite(sum_sq):   # float32 squares overflow beyond about 1e19
            sum_sq = 0
            add_dev_span_f64(x, length, 0.0, &sum_dev, &sum_sq)
    return sum_sq


cdef inline void sum_dy_xmu_span(const real* dy, const real* mask, const real* x,
                                 int64_t length, double mean, double* sum_dy,
                                 double* sum_dy_xmu) noexcept nogil:
    """Adds Σ dy and Σ dy·(x - mean) over the span to the two accumulators (dy masked by
    mask, may be NULL)."""
    cdef double dy_lanes[LANES]
    cdef double dy_xmu_lanes[LANES]
    cdef real center = <real>mean
    cdef double span_dy, span_dev
    zero_lanes(dy_lanes)
    zero_lanes(dy_xmu_lanes)
    add_dy_xmu_span(dy_lanes, dy_xmu_lanes, dy, mask, x, length, center)
    span_dy = sum_lanes(dy_lanes)
    span_dev = sum_lanes(dy_xmu_lanes)
    if real is float:
        if not (isfinite(span_dy) and isfinite(span_dev)):
            span_dy = 0
            span_dev = 0
            add_grad_sums_f64(dy, NULL, mask, x, length, 1, center, &span_dy, &span_dev)
    sum_dy[0] += span_dy
    sum_dy_xmu[0] += finish_dy_xmu(span_dy, span_dev, mean, center)


cdef inline void sum_g_xmu_span_f32(const float* dy, const float* weight, const float* x,
                                    int64_t length, double mean, double* sum_g,
                                    double* sum_g_xmu) noexcept nogil:
    """Adds Σ g and Σ g·(x - mean), g = dy·weight (dy when weight is NULL), over a
    float32 span."""
    cdef double g_lanes[LANES]
    cdef double dev_lanes[LANES]
    cdef float center = <float>mean
    cdef double span_g, span_dev
    zero_lanes(g_lanes)
    zero_lanes(dev_lanes)
    f32_add_grad_sums(g_lanes, dev_lanes, dy, weight, NULL, x, length, center)
    span_g = sum_lanes(g_lanes)
    span_dev = sum_lanes(dev_lanes)
    if not (isfinite(span_g) and isfinite(span_dev)):
        span_g = 0
        span_dev = 0
        add_grad_sums_f64(dy, weight, NULL, x, length, 1, center, &span_g, &span_dev)
    sum_g[0] += span_g
    sum_g_xmu[0] += finish_dy_xmu(span_g, span_dev, mean, center)


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
    if isfinite(delta):
        mean[0] += delta * (count_b / total)
    else:   # an infinite (or NaN) mean: the weighted mean, as IEEE evaluates it (inf + inf = inf)
        mean[0] = mean[0] * (count_a / total) + mean_b * (count_b / total)
    m2[0] += m2_b + delta * delta * (count_a * count_b / total)
    count[0] = total


cdef inline double centered_stats(const real* x, int64_t length, int64_t head,
                                  double* mean, double* m2) noexcept nogil:
    """Mean and M2 of x[:length] from its deviations from a center, the mean of its
    first `head` values rounded to the data's precision; returns Σ(x - center)²."""
    cdef double sum_lanes_[LANES]
    cdef double sq_lanes[LANES]
    cdef double sum_sq, head_mean, sum_dev
    cdef real center
    zero_lanes(sum_lanes_)
    add_span(sum_lanes_, x, head)
    head_mean = sum_lanes(sum_lanes_) / head
    center = <real>head_mean
    zero_lanes(sum_lanes_)
    zero_lanes(sq_lanes)
    add_dev_span(sum_lanes_, sq_lanes, x, length, center)
    sum_sq = sum_lanes(sq_lanes)
    sum_dev = sum_lanes(sum_lanes_)
    if real is float:
        if not (isfinite(sum_sq) and isfinite(sum_dev)) and isfinite(center):
            sum_dev = 0
            sum_sq = 0
            add_dev_span_f64(x, length, center, &sum_dev, &sum_sq)
    finish_dev(<double>length, center, sum_dev, sum_sq, mean, m2)
    return sum_sq


cdef inline void block_stats(const real* x, int64_t length, double* mean,
                             double* m2) noexcept nogil:
    """Mean and M2 of one block, two-pass: a first mean, then deviations from it.

    float32 blocks of at least 2·HINT_VALUES values first try one pass, around the
    mean of their first HINT_VALUES values, and keep it when that center is within a
    standard deviation of the block's mean (Σd² <= 2·M2): the float32 deviations and
    their squares then carry at most twice the rounding of the two-pass's (which sums
    them around the float32-rounded mean), still far below float32 resolution. Blocks
    whose start is not typical (sorted data, a group-norm block across channels of
    different means) are summed again, two-pass."""
    if real is float:
        if length >= 2 * HINT_VALUES:
            # Σd² <= 2·M2 is false for NaN: then two-pass, as for any block.
            if centered_stats(x, length, HINT_VALUES, mean, m2) <= 2 * m2[0]:
                return
    centered_stats(x, length, length, mean, m2)


cdef inline void span_stats(const real* x, int64_t length,
                            double* count, double* mean, double* m2) noexcept nogil:
    """Merge the statistics of x[:length] into (count, mean, m2), block by block.

    Each block is summarized from its deviations from a center near its mean (see
    block_stats), so data whose mean dwarfs its spread loses no precision.
    """
    cdef int64_t start, start_index, size
    cdef double block_mean, block_m2
    for start_index in range((length + STATS_BLOCK - 1) // STATS_BLOCK):
        start = start_index * STATS_BLOCK
        size = min(<int64_t>STATS_BLOCK, length - start)
        block_stats(x + start, size, &block_mean, &block_m2)
        merge_stats(count, mean, m2, <double>size, block_mean, block_m2)


cdef inline void split_center(double center, real* hi, real* lo) noexcept nogil:
    """center ≈ hi + lo in the data's precision: (x - hi) - lo keeps float32 results
    exact to rounding even when the mean dwarfs the spread (x - hi is then exact)."""
    hi[0] = <real>center
    lo[0] = <real>(center - <double>hi[0])


cdef inline void affine_span(const real* x, real* y, int64_t length, real hi, real lo,
                             real scale, real shift, bint stream) noexcept nogil:
    """y = ((x - hi) - lo)·scale + shift; y may be x (then stream must be false)."""
    if real is float:
        affine_f32(x, y, length, hi, lo, scale, shift, stream)
    else:
        affine_f64(x, y, length, hi, lo, scale, shift, stream)


cdef inline void affine_each_span(const real* x, real* y, int64_t length, real hi, real lo,
                                  real scale, const real* weight, const real* bias,
                                  bint stream) noexcept nogil:
    """y = ((x - hi) - lo)·scale·weight[i] + bias[i] (NULL weight: 1, NULL bias: 0); y
    may be x (then stream must be false)."""
    if real is float:
        affine_each_f32(x, y, length, hi, lo, scale, weight, bias, stream)
    else:
        affine_each_f64(x, y, length, hi, lo, scale, weight, bias, stream)


cdef inline void affine_relu_span(const real* x, const real* r, real* y, int64_t length,
                                  real hi, real lo, real scale, real shift,
                                  bint stream) noexcept nogil:
    """y = relu(((x - hi) - lo)·scale + shift + r) (r may be NULL: no add); y may be x or
    r (then stream must be false)."""
    if real is float:
        affine_relu_f32(x, r, y, length, hi, lo, scale, shift, 1, stream)
    else:
        affine_relu_f64(x, r, y, length, hi, lo, scale, shift, 1, stream)


cdef inline void scale_span(const real* dy, const real* mask, real* dx, real* g_out,
                            int64_t length, real scale, bint stream) noexcept nogil:
    """dx = g·scale, g = dy masked by mask (may be NULL, see masked), and g_out = g when
    g_out is given; dx may be dy (then stream must be false)."""
    if real is float:
        scale_relu_f32(dy, mask, dx, g_out, length, scale, stream)
    else:
        scale_relu_f64(dy, mask, dx, g_out, length, scale, stream)


cdef inline void backward_span(const real* dy, const real* mask, const real* x, real* dx,
                               real* g_out, int64_t length, real hi, real lo, real k,
                               real mean_dy, real scale, bint stream) noexcept nogil:
    """dx = (g - mean_dy - ((x - hi) - lo)·k)·scale, g = dy masked by mask (may be NULL,
    see masked), and g_out = g when g_out is given; dx may be dy, x or mask (then stream
    must be false)."""
    if real is float:
        backward_relu_f32(dy, mask, x, dx, g_out, length, hi, lo, k, mean_dy, scale, stream)
    else:
        backward_relu_f64(dy, mask, x, dx, g_out, length, hi, lo, k, mean_dy, scale, stream)


# Outputs at least this large are written with streaming stores (use_streaming): about
# half a typical last-level cache; a smaller output is likely still in cache when the
# caller reads it. (Half the L3 size that sysconf reports is no guide: a virtual machine
# may report 256 MiB for a 32 MiB L3, and then large outputs are not streamed.)
cdef enum:
    STREAM_MIN_BYTES = 8 << 20


cdef inline bint use_streaming(const void* output, const void* input_a, const void* input_b,
                               int64_t n_bytes) noexcept nogil:
    """Write an output of n_bytes with streaming stores (see _elementwise.h): when it is
    larger than STREAM_MIN_BYTES, so it would not stay in cache anyway, and is neither
    input (a pass in place reads each line before writing it)."""
    return n_bytes >= STREAM_MIN_BYTES and output != input_a and output != input_b


# Gradient sums of float64 rows (row_norm.pyx's piece_grad_sums; float32 rows go
# through _float32_sums.h). gcc vectorizes a loop that keeps one sum in eight
# independent accumulators (added in a fixed tree, as sum_span), but leaves a loop
# that keeps two sums at once scalar: so one sum per loop, the second loop reading the
# piece from cache.
cdef inline double sum_dy_weight(const real* dy, const real* weight,
                                 int64_t length) noexcept nogil:
    """Σ dy·weight (Σ dy when weight is NULL)."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef int64_t k, stop = length - length % 8
    if weight == NULL:
        return sum_span(dy, length)
    for k in range(0, stop, 8):
        a0 += <double>dy[k] * weight[k]
        a1 += <double>dy[k + 1] * weight[k + 1]
        a2 += <double>dy[k + 2] * weight[k + 2]
        a3 += <double>dy[k + 3] * weight[k + 3]
        a4 += <double>dy[k + 4] * weight[k + 4]
        a5 += <double>dy[k + 5] * weight[k + 5]
        a6 += <double>dy[k + 6] * weight[k + 6]
        a7 += <double>dy[k + 7] * weight[k + 7]
    for k in range(stop, length):
        a0 += <double>dy[k] * weight[k]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


cdef inline double sum_dy_weight_xmu(const real* dy, const real* weight, const real* x,
                                     int64_t length, double mean) noexcept nogil:
    """Σ dy·weight·(x - mean) (without the weight when it is NULL)."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef int64_t k, stop = length - length % 8
    if weight == NULL:
        for k in range(0, stop, 8):
            a0 += dy[k] * (<double>x[k] - mean)
            a1 += dy[k + 1] * (<double>x[k + 1] - mean)
            a2 += dy[k + 2] * (<double>x[k + 2] - mean)
            a3 += dy[k + 3] * (<double>x[k + 3] - mean)
            a4 += dy[k + 4] * (<double>x[k + 4] - mean)
            a5 += dy[k + 5] * (<double>x[k + 5] - mean)
            a6 += dy[k + 6] * (<double>x[k + 6] - mean)
            a7 += dy[k + 7] * (<double>x[k + 7] - mean)
        for k in range(stop, length):
            a0 += dy[k] * (<double>x[k] - mean)
    else:
        for k in range(0, stop, 8):
            a0 += <double>dy[k] * weight[k] * (<double>x[k] - mean)
            a1 += <double>dy[k + 1] * weight[k + 1] * (<double>x[k + 1] - mean)
            a2 += <double>dy[k + 2] * weight[k + 2] * (<double>x[k + 2] - mean)
            a3 += <double>dy[k + 3] * weight[k + 3] * (<double>x[k + 3] - mean)
            a4 += <double>dy[k + 4] * weight[k + 4] * (<double>x[k + 4] - mean)
            a5 += <double>dy[k + 5] * weight[k + 5] * (<double>x[k + 5] - mean)
            a6 += <double>dy[k + 6] * weight[k + 6] * (<double>x[k + 6] - mean)
            a7 += <double>dy[k + 7] * weight[k + 7] * (<double>x[k + 7] - mean)
        for k in range(stop, length):
            a0 += <double>dy[k] * weight[k] * (<double>x[k] - mean)
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
