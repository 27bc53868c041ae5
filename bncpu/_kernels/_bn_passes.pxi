# Batch norm, the elementwise passes with per-channel coefficients (forward, backward,
# evaluation backward) and the coefficients' formulas: included by batch_norm.pyx, so
# it compiles inside each ISA build.


cdef void pass_span(Pass kind, const real* a, const real* b, const real* mask, real* out,
                    real* g_out, int64_t length, const real* coefs, int64_t c, int64_t j,
                    bint stream) noexcept nogil:
    """One span of a pass (see Pass): a is x or dy, b the residual (may be NULL) or x."""
    if kind == PASS_AFFINE:
        affine_span(a, out, length, coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                    coefs[COEF_SCALE * c + j], coefs[COEF_OFFSET * c + j], stream)
    elif kind == PASS_AFFINE_RELU:
        affine_relu_span(a, b, out, length, coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                         coefs[COEF_SCALE * c + j], coefs[COEF_OFFSET * c + j], stream)
    elif kind == PASS_BACKWARD:
        backward_span(a, mask, b, out, g_out, length, coefs[COEF_HI * c + j],
                      coefs[COEF_LO * c + j], coefs[COEF_K * c + j], coefs[COEF_OFFSET * c + j],
                      coefs[COEF_SCALE * c + j], stream)
    else:
        scale_span(a, mask, out, g_out, length, coefs[COEF_SCALE * c + j], stream)


cdef void pass_piece_task(Pass kind, const real* a, const real* b, const real* mask, real* out,
                          real* g_out, int64_t task, int64_t c, int64_t s, int64_t per_row,
                          const real* coefs, bint stream) noexcept nogil:
    """Piece p of segment t = i·C + j (memory order), task = t·per_row + p."""
    cdef int64_t segment = task // per_row if per_row > 1 else task
    cdef int64_t piece = task - segment * per_row
    cdef int64_t offset = segment * s + piece * BN_PIECE
    pass_span(kind, a + offset, b + offset if b != NULL else NULL,
              mask + offset if mask != NULL else NULL, out + offset,
              g_out + offset if g_out != NULL else NULL, piece_length(s, piece), coefs, c,
              segment % c, stream)


cdef inline bint use_segment_pass(int64_t s, size_t itemsize) noexcept nogil:
    """Rows too short to stream (under BNCPU_STREAM_MIN_SPAN_BYTES): their passes run
    row after row (pass_segments)."""
    return s * <int64_t>itemsize < STREAM_MIN_SPAN_BYTES


cdef void pass_segments(Pass kind, const real* a, const real* b, const real* mask, real* out,
                        real* g_out, int64_t t0, int64_t t1, int64_t c, int64_t s,
                        const real* coefs) noexcept nogil:
    """Segments t0..t1 of a pass (segment t = i·C + j: row i of channel j, S values; the
    segments lie one after another in memory) with short rows (use_segment_pass), the
    channel counted along instead of divided out per row, stored normally.

    (Rows this short share their first and last cache lines with their neighbours, so
    streaming them means computing whole rows into a buffer in L1 at the output's line
    offset and streaming from there: slower than ordinary stores.)"""
    cdef int64_t t, offset, j = t0 % c
    for t in range(t0, t1):
        offset = t * s
        pass_span(kind, a + offset, b + offset if b != NULL else NULL,
                  mask + offset if mask != NULL else NULL, out + offset,
                  g_out + offset if g_out != NULL else NULL, s, coefs, c, j, False)
        j += 1
        if j == c:
            j = 0


cdef void run_pass(Pass kind, const real* a, const real* b, const real* mask, real* out,
                   real* g_out, int64_t n, int64_t c, int64_t s, const real* coefs,
                   int n_threads) noexcept nogil:
    """out = pass(a, b) over the whole (N, C, S) buffer, in parallel (see Pass)."""
    cdef int64_t task, n_tasks, r0, per_row, rows, cols = c * s
    cdef bint stream = (use_streaming(out, a, b, n * c * s * sizeof(real))
                        and <const real*>out != mask)
    cdef real* by_column = NULL
    if use_column_pass(c, s):
        by_column = column_coefs(coefs, c, s)
    if by_column != NULL:
        # Along the rows of the (N, C·S) matrix, PASS_VALUES values per task.
        rows = max(<int64_t>1, PASS_VALUES // cols)
        n_tasks = (n + rows - 1) // rows
        if n_threads > 1:
            for task in prange(n_tasks, schedule='static', num_threads=n_threads):
                r0 = task * rows
                pass_columns(kind, a, b, mask, out, g_out, cols, r0, min(r0 + rows, n), 0,
                             cols, by_column, stream)
        else:
            pass_columns(kind, a, b, mask, out, g_out, cols, 0, n, 0, cols, by_column, stream)
        if by_column != coefs:
            free(by_column)
        return
    if use_segment_pass(s, sizeof(real)):
        # Short rows (and column mode's fallback when out of memory): runs of whole
        # rows, SEGMENT_VALUES values per task, about.
        rows = max(<int64_t>1, SEGMENT_VALUES // s)
        n_tasks = (n * c + rows - 1) // rows
        if n_threads > 1:
            for task in prange(n_tasks, schedule='static', num_threads=n_threads):
                r0 = task * rows
                pass_segments(kind, a, b, mask, out, g_out, r0, min(r0 + rows, n * c), c, s,
                              coefs)
        else:
            pass_segments(kind, a, b, mask, out, g_out, 0, n * c, c, s, coefs)
        return
    # Channel rows, piece by piece.
    per_row = pieces_per_row(s)
    n_tasks = c * n * per_row
    if n_threads > 1:
        for task in prange(n_tasks, schedule='static', num_threads=n_threads):
            pass_piece_task(kind, a, b, mask, out, g_out, task, c, s, per_row, coefs, stream)
    else:
        for task in range(n_tasks):
            pass_piece_task(kind, a, b, mask, out, g_out, task, c, s, per_row, coefs, stream)


cdef inline void set_affine_coefs(real* coefs, int64_t c, int64_t j, double mean, double invstd,
                                  const real* weight, const real* bias) noexcept nogil:
    """y = (x - mean)·invstd·w + b as ((x - hi) - lo)·scale + offset."""
    cdef double w = weight[j] if weight != NULL else 1.0
    cdef double b = bias[j] if bias != NULL else 0.0
    coefs[COEF_SCALE * c + j] = <real>(invstd * w)
    if split_mean(coefs, c, j, mean):
        coefs[COEF_OFFSET * c + j] = <real>b
    else:
        coefs[COEF_OFFSET * c + j] = <real>(b - mean * (invstd * w))


cdef inline void set_backward_coefs(real* coefs, int64_t c, int64_t j, double mean, double invstd,
                                    const real* weight, double sum_dy, double sum_dy_xmu,
                                    double count) noexcept nogil:
    """dx = w·invstd·(dy - Σdy/M - (x - mean)·invstd²·Σdy(x - mean)/M)."""
    cdef double w = weight[j] if weight != NULL else 1.0
    cdef double k = sum_dy_xmu / count * invstd * invstd
    coefs[COEF_SCALE * c + j] = <real>(w * invstd)
    coefs[COEF_K * c + j] = <real>k
    if split_mean(coefs, c, j, mean):
        coefs[COEF_OFFSET * c + j] = <real>(sum_dy / count)
    else:
        coefs[COEF_OFFSET * c + j] = <real>(sum_dy / count - mean * k)


cdef inline bint split_mean(real* coefs, int64_t c, int64_t j, double mean) noexcept nogil:
    """Channel j's mean as hi + lo (see split_center); false, with hi = lo = 0, when that
    split is not finite (a mean that is infinite, NaN or beyond the data's range, e.g.
    1e39 for float32): the caller then folds the mean into the offset in float64, the
    plain formula x·scale + (offset - mean·scale), whose IEEE result is right there
    (-inf for an infinite mean, about -1 for x ~ 1, mean 1e39, invstd 1e-39)."""
    split_center(mean, &coefs[COEF_HI * c + j], &coefs[COEF_LO * c + j])
    if isfinite(coefs[COEF_HI * c + j]) and isfinite(coefs[COEF_LO * c + j]):
        return True
    coefs[COEF_HI * c + j] = 0
    coefs[COEF_LO * c + j] = 0
    return False


cdef inline double invstd_of(double var, double eps) noexcept nogil:
    return 1.0 / sqrt(var + eps)


cdef inline void update_running(real* running_mean, real* running_var, int64_t j,
                                double mean, double var, double count,
                                double momentum, bint unbiased) noexcept nogil:
    """The running variance follows the batch's unbiased variance (PyTorch's convention)
    or, with unbiased false, its biased one (Keras, d2l)."""
    if running_mean == NULL or count == 0:
        return
    running_mean[j] = <real>((1 - momentum) * running_mean[j] + momentum * mean)
    if unbiased:
        running_var[j] = <real>((1 - momentum) * running_var[j]
                                + momentum * var * (count / (count - 1)))
    else:
        running_var[j] = <real>((1 - momentum) * running_var[j] + momentum * var)
