# Batch norm, channel mode: included by batch_norm.pyx, so it compiles inside each ISA build.
#
# One thread owns a channel (or a run of adjacent channels, read row by row in runs of
# at least RUN_BYTES): its statistics or gradient sums, then, while it is still in
# cache, its elementwise pass.


cdef inline int64_t channel_run(int64_t c, int64_t s, size_t itemsize, int n_threads) noexcept nogil:
    """Adjacent channels per task in channel mode: runs of RUN_BYTES, at most
    CHANNEL_RUN channels, and enough tasks to keep every thread busy."""
    cdef int64_t run = (RUN_BYTES + s * itemsize - 1) // (s * itemsize)
    run = min(run, <int64_t>CHANNEL_RUN)
    run = min(run, max(<int64_t>1, c // (2 * n_threads)))
    return max(run, <int64_t>1)


cdef inline void fold_row_pieces(const real* row, int64_t s, double* count, double* mean,
                                 double* m2) noexcept nogil:
    """Merge the statistics of one channel row into (count, mean, m2), one piece (split
    mode's unit of work) at a time, each piece summarized on its own."""
    cdef int64_t start, piece
    cdef double piece_count, piece_mean, piece_m2
    for piece in range(pieces_per_row(s)):
        start = piece * BN_PIECE
        piece_count = 0
        piece_mean = 0
        piece_m2 = 0
        span_stats(row + start, piece_length(s, piece), &piece_count, &piece_mean, &piece_m2)
        merge_stats(count, mean, m2, piece_count, piece_mean, piece_m2)


cdef void channel_stats(const real* x, int64_t n, int64_t c, int64_t s, int64_t j,
                        double* mean, double* m2) noexcept nogil:
    """Mean and M2 of channel j.

    Long rows (s >= STATS_BLOCK): each piece of a row is summarized by span_stats and
    the pieces merged in (row, piece) order, exactly as split mode does. Short rows:
    blocks of whole consecutive rows (at most STATS_BLOCK values), each summarized
    two-pass with its lanes running across the rows, merged in row order.
    """
    cdef int64_t i, rows_per_block, block, r0, r1
    cdef double count = 0, block_mean, block_m2, sum_dev, sum_sq
    cdef double lanes[LANES]
    cdef double sq_lanes[LANES]
    cdef real center
    mean[0] = 0
    m2[0] = 0
    if s >= STATS_BLOCK:
        for i in range(n):
            fold_row_pieces(x + (i * c + j) * s, s, &count, mean, m2)
        return
    rows_per_block = STATS_BLOCK // s
    for block in range((n + rows_per_block - 1) // rows_per_block):
        r0 = block * rows_per_block
        r1 = min(r0 + rows_per_block, n)
        zero_lanes(lanes)
        for i in range(r0, r1):
            add_span(lanes, x + (i * c + j) * s, s)
        center = <real>(sum_lanes(lanes) / ((r1 - r0) * s))
        zero_lanes(lanes)
        zero_lanes(sq_lanes)
        for i in range(r0, r1):
            add_dev_span(lanes, sq_lanes, x + (i * c + j) * s, s, center)
        sum_dev = sum_lanes(lanes)
        sum_sq = sum_lanes(sq_lanes)
        if real is float:
            if not (isfinite(sum_sq) and isfinite(sum_dev)) and isfinite(center):
                # float32 squares overflow (spread beyond ~1e19): float64 sums instead
                sum_dev = 0
                sum_sq = 0
                for i in range(r0, r1):
                    add_dev_span_f64(x + (i * c + j) * s, s, center, &sum_dev, &sum_sq)
        finish_dev(<double>((r1 - r0) * s), center, sum_dev, sum_sq, &block_mean, &block_m2)
        merge_stats(&count, mean, m2, <double>((r1 - r0) * s), block_mean, block_m2)


cdef inline void row_grad_sums(const real* dy, const real* mask, const real* x, int64_t s,
                               double mean, real center, double* dy_lanes, double* dy_xmu_lanes,
                               double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    """One channel row's share of Σdy and Σdy·(x - mean). Rows that split mode cuts
    (s >= SPLIT_MIN_S) are summed per piece, each piece added to sum_dy/sum_dy_xmu as
    split mode does; shorter rows add into the channel's lanes (finished by
    finish_grad_sums), which thus run across all its rows."""
    cdef int64_t start, piece
    if s >= SPLIT_MIN_S:
        for piece in range(pieces_per_row(s)):
            start = piece * BN_PIECE
            sum_dy_xmu_span(dy + start, mask + start if mask != NULL else NULL, x + start,
                            piece_length(s, piece), mean, sum_dy, sum_dy_xmu)
    else:
        add_dy_xmu_span(dy_lanes, dy_xmu_lanes, dy, mask, x, s, center)


cdef inline void finish_grad_sums(int64_t s, double mean, real center, const double* dy_lanes,
                                  const double* dy_xmu_lanes, double* sum_dy,
                                  double* sum_dy_xmu) noexcept nogil:
    if s < SPLIT_MIN_S:
        sum_dy[0] = sum_lanes(dy_lanes)
        sum_dy_xmu[0] = finish_dy_xmu(sum_dy[0], sum_lanes(dy_xmu_lanes), mean, center)


cdef void channel_grad_sums(const real* dy, const real* mask, const real* x, int64_t n,
                            int64_t c, int64_t s, int64_t j0, int64_t j1, const double* mean,
                            double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    """Σdy and Σdy·(x - mean) of the adjacent channels j0..j1 (at most CHANNEL_RUN),
    walked row by row: memory is read in runs of (j1 - j0)·S values. Each channel adds
    its rows in row order, so the sums do not depend on the run. dy masked by mask (may
    be NULL: see Pass)."""
    cdef double dy_lanes[CHANNEL_RUN * LANES]
    cdef double dy_xmu_lanes[CHANNEL_RUN * LANES]
    cdef real center[CHANNEL_RUN]
    cdef double sum_dev
    cdef int64_t i, j, offset
    for j in range(j0, j1):
        center[j - j0] = <real>mean[j]
        zero_lanes(dy_lanes + (j - j0) * LANES)
        zero_lanes(dy_xmu_lanes + (j - j0) * LANES)
        sum_dy[j] = 0
        sum_dy_xmu[j] = 0
    for i in range(n):
        for j in range(j0, j1):
            offset = (i * c + j) * s
            row_grad_sums(dy + offset, mask + offset if mask != NULL else NULL, x + offset, s,
                          mean[j], center[j - j0],
                          dy_lanes + (j - j0) * LANES, dy_xmu_lanes + (j - j0) * LANES,
                          &sum_dy[j], &sum_dy_xmu[j])
    for j in range(j0, j1):
        finish_grad_sums(s, mean[j], center[j - j0], dy_lanes + (j - j0) * LANES,
                         dy_xmu_lanes + (j - j0) * LANES, &sum_dy[j], &sum_dy_xmu[j])
        if real is float:
            if s < SPLIT_MIN_S and not (isfinite(sum_dy[j]) and isfinite(sum_dy_xmu[j])):
                # float32 products overflow (see add_grad_sums_f64): float64 sums instead
                sum_dy[j] = 0
                sum_dev = 0
                for i in range(n):
                    offset = (i * c + j) * s
                    add_grad_sums_f64(dy + offset, NULL, mask + offset if mask != NULL else NULL,
                                      x + offset, s, 1, center[j - j0], &sum_dy[j], &sum_dev)
                sum_dy_xmu[j] = finish_dy_xmu(sum_dy[j], sum_dev, mean[j], center[j - j0])


cdef void train_channel(Pass kind, const real* x, const real* residual, real* y, int64_t n,
                        int64_t c, int64_t s, int64_t j, const real* weight, const real* bias,
                        double eps, double* mean, double* var, real* coefs,
                        bint stream) noexcept nogil:
    """Channel j: its statistics, then its pass `kind` (PASS_AFFINE, or PASS_AFFINE_RELU
    with the residual, may be NULL)."""
    cdef double m2
    cdef int64_t i, start, piece, offset
    channel_stats(x, n, c, s, j, &mean[j], &m2)
    var[j] = m2 / (n * s)
    set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
    for i in range(n):
        for piece in range(pieces_per_row(s)):
            start = piece * BN_PIECE
            offset = (i * c + j) * s + start
            pass_span(kind, x + offset, residual + offset if residual != NULL else NULL, NULL,
                      y + offset, NULL, piece_length(s, piece), coefs, c, j, stream)


cdef void channel_run_stats(const real* x, int64_t n, int64_t c, int64_t s, int64_t j0,
                            int64_t j1, double* mean, double* m2) noexcept nogil:
    """channel_stats of the adjacent channels j0..j1 (long rows, at most CHANNEL_RUN),
    with the loops turned so memory is read in runs of (j1 - j0)·S values rather than
    S. Each channel still folds its (row, piece) statistics in the same order, so the
    result is bit for bit channel_stats's."""
    cdef double count[CHANNEL_RUN]
    cdef int64_t i, j
    for j in range(j0, j1):
        count[j - j0] = 0
        mean[j] = 0
        m2[j] = 0
    for i in range(n):
        for j in range(j0, j1):
            fold_row_pieces(x + (i * c + j) * s, s, &count[j - j0], &mean[j], &m2[j])


cdef void train_channel_run(Pass kind, const real* x, const real* residual, real* y, int64_t n,
                            int64_t c, int64_t s, int64_t j0, int64_t j1, const real* weight,
                            const real* bias, double eps, double* mean, double* var,
                            real* coefs, bint stream) noexcept nogil:
    """Channels j0..j1 (adjacent, long rows): train_channel's work, memory read in
    runs of (j1 - j0)·S values (see channel_run_stats)."""
    cdef int64_t i, j, start, piece, offset
    channel_run_stats(x, n, c, s, j0, j1, mean, var)
    for j in range(j0, j1):
        var[j] = var[j] / (n * s)
        set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
    for i in range(n):
        for j in range(j0, j1):
            for piece in range(pieces_per_row(s)):
                start = piece * BN_PIECE
                offset = (i * c + j) * s + start
                pass_span(kind, x + offset, residual + offset if residual != NULL else NULL,
                          NULL, y + offset, NULL, piece_length(s, piece), coefs, c, j, stream)


cdef void backward_channels(const real* dy, const real* mask, const real* x, real* dx,
                            real* g_out, int64_t n, int64_t c, int64_t s, int64_t j0, int64_t j1,
                            const double* mean, const double* invstd, const real* weight,
                            bint training, double* sum_dy, double* sum_dy_xmu, real* coefs,
                            bint stream) noexcept nogil:
    """Adjacent channels j0..j1: their sums, then the elementwise pass, row by row (dy
    masked by mask, may be NULL, and g_out: see Pass)."""
    cdef int64_t i, j, start, piece, offset
    channel_grad_sums(dy, mask, x, n, c, s, j0, j1, mean, sum_dy, sum_dy_xmu)
    if dx == NULL:
        return
    if training:
        for j in range(j0, j1):
            set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j],
                               sum_dy_xmu[j], <double>(n * s))
    for i in range(n):
        for j in range(j0, j1):
            for piece in range(pieces_per_row(s)):
                start = piece * BN_PIECE
                offset = (i * c + j) * s + start
                pass_span(PASS_BACKWARD if training else PASS_SCALE, dy + offset, x + offset,
                          mask + offset if mask != NULL else NULL, dx + offset,
                          g_out + offset if g_out != NULL else NULL, piece_length(s, piece),
                          coefs, c, j, stream)
