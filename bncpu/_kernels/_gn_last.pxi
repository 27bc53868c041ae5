# Group norm on channels-last data: included by row_norm.pyx, so it compiles inside each
# ISA build.
#
# The input is C-contiguous (n, s, c): sample i, position j, channel k at (i·s + j)·c + k,
# its c channels in `groups` groups of cpg = c/groups adjacent channels. Group g of
# sample i is s runs of cpg contiguous values, c apart. The formulas are row_norm.pyx's
# with L = cpg·s values per (sample, group):
#     forward  y = ((x - hi) - lo)·scale[k] + shift[k],  scale[k] = rstd·weight[k],
#              shift[k] = bias[k],  hi + lo = mean (split_center)
#     backward g = dy·weight[k],  dx = (g - Σg/L - ((x - hi) - lo)·k_g)·rstd,
#              k_g = rstd²·Σ(g·xmu)/L;  dweight[k] = Σ dy·xmu·rstd,  dbias[k] = Σ dy
# so, given the same mean and rstd, the elementwise passes give the channels-first
# kernel's bits (the same operations on each value; no contraction into FMA, setup.py).
# The sums run in a different order (column by column), so mean, rstd and the gradient
# sums agree with channels-first to rounding. With s == 1 the buffer is the
# channels-first one: the channels-first kernels run, bit for bit.
#
# How the work is cut (from the shape alone): a sample's positions in pieces of `rows`
# positions (whole rows of c values, about ROW_NORM_PIECE values, a multiple of 8: the
# float32 runs of _float32_sums.h). A piece is summed column by column (each channel
# along the rows: contiguous loads, float64 accumulation), then the channels of a group
# are added in channel order; the pieces of a sample are folded in piece order.
# * Sample mode: a thread owns a sample: its pieces' sums, then its elementwise pass
#   (from cache when the sample fits).
# * Piece mode (fewer samples than twice the threads, or inputs of at most CACHED_BYTES,
#   as row_norm's piece mode): every piece's sums in parallel, the folds, then every
#   piece's pass in parallel.
# Both run the same per-piece code and fold in the same order, so the choice, which
# depends on the thread count, never changes a bit.
# Each thread has its own scratch: per-column sums (4·c doubles), per-group partials
# (6·groups doubles), per-column centers and coefficients (7·c values).

from bncpu._kernels._primitives cimport (
    finish_dev, finish_dy_xmu, f32_add_column_sums, f32_add_column_dev_sums,
    f32_add_column_grad_sums, add_grad_sums_f64)


cdef struct LastLayout:
    int64_t n                  # samples
    int64_t s                  # positions per sample
    int64_t c                  # channels (values per position)
    int64_t groups
    int64_t cpg                # channels per group
    int64_t rows               # positions per piece
    int64_t pieces             # pieces per sample


cdef enum:
    LAST_COEFS = 6             # per-column coefficient rows of the elementwise passes
    LAST_HI = 0
    LAST_LO = 1
    LAST_SCALE = 2
    LAST_SHIFT = 3             # forward: bias; backward: mean_g
    LAST_WEIGHT = 4            # backward
    LAST_K = 5                 # backward
    LAST_HINT_ROWS = 8         # float32 pieces: rows whose group means center a one-pass try


cdef LastLayout make_last_layout(int64_t n, int64_t c, int64_t s,
                                 int64_t groups) noexcept nogil:
    cdef LastLayout lay
    lay.n = n
    lay.s = s
    lay.c = c
    lay.groups = groups
    lay.cpg = c // groups
    lay.rows = max(<int64_t>8, (ROW_NORM_PIECE // c) // 8 * 8)
    lay.pieces = (s + lay.rows - 1) // lay.rows
    return lay


cdef inline int64_t last_piece_rows(const LastLayout* lay, int64_t q) noexcept nogil:
    return min(lay.rows, lay.s - q * lay.rows)


cdef inline int64_t last_offset(const LastLayout* lay, int64_t i, int64_t q) noexcept nogil:
    """Offset of the first value of piece q of sample i."""
    return (i * lay.s + q * lay.rows) * lay.c


cdef struct LastScratch:
    double* col_a              # c per-column sums
    double* col_b              # c
    double* piece              # 2·c: a piece's per-channel gradient sums
    double* partial            # 3·groups: a piece's (count, mean, M2) per group
    double* total              # 3·groups: their fold
    void* center               # c values (real): per-column centers
    void* coefs                # LAST_COEFS·c values (real)


cdef inline int64_t last_scratch_doubles(const LastLayout* lay) noexcept nogil:
    return 4 * lay.c + 6 * lay.groups


cdef inline int64_t last_scratch_values(const LastLayout* lay) noexcept nogil:
    return (1 + LAST_COEFS) * lay.c


cdef LastScratch last_scratch(const LastLayout* lay, double* doubles, char* values,
                              int64_t itemsize, int t) noexcept nogil:
    """Thread t's scratch inside the two blocks of n_threads scratches."""
    cdef LastScratch sc
    doubles += t * last_scratch_doubles(lay)
    values += t * last_scratch_values(lay) * itemsize
    sc.col_a = doubles
    sc.col_b = doubles + lay.c
    sc.piece = doubles + 2 * lay.c
    sc.partial = doubles + 4 * lay.c
    sc.total = doubles + 4 * lay.c + 3 * lay.groups
    sc.center = values
    sc.coefs = values + lay.c * itemsize
    return sc


# --------------------------------------------------------------------------------
# Sums of a piece: its rows of c values, column by column
# --------------------------------------------------------------------------------
cdef inline void zero_doubles(double* a, int64_t length) noexcept nogil:
    cdef int64_t k
    for k in range(length):
        a[k] = 0


cdef void last_column_sums(const real* x, int64_t rows, int64_t c,
                           double* sums) noexcept nogil:
    """sums[k] = Σ_r x[r·c + k]."""
    cdef int64_t r, k
    cdef const real* row
    zero_doubles(sums, c)
    if real is float:
        f32_add_column_sums(sums, x, rows, c, c)
    else:
        for r in range(rows):
            row = x + r * c
            for k in range(c):
                sums[k] += row[k]


cdef void last_group_centers(const LastLayout* lay, const double* col_sum, double count,
                             real* center) noexcept nogil:
    """center[k] = the mean of k's group from the column sums (count values per group),
    rounded to the data's precision."""
    cdef int64_t g, k
    cdef double total
    cdef real group_center
    for g in range(lay.groups):
        total = 0
        for k in range(g * lay.cpg, g * lay.cpg + lay.cpg):
            total += col_sum[k]
        group_center = <real>(total / count)
        for k in range(g * lay.cpg, g * lay.cpg + lay.cpg):
            center[k] = group_center


cdef bint last_dev_stats(const real* block, const LastLayout* lay, int64_t rows,
                         LastScratch* sc, double* partial) noexcept nogil:
    """partial[3g:3g+3] = (count, mean, M2) of group g over `rows` rows of c values
    from the columns' deviations from sc.center (see add_dev_span and finish_dev), the
    columns of a group added in channel order. True when every group's center was
    within a standard deviation of its mean (Σd² <= 2·M2, false for NaN)."""
    cdef int64_t g, k, r, c = lay.c, cpg = lay.cpg
    cdef const real* row
    cdef real* center = <real*>sc.center
    cdef double* col_sum = sc.col_a
    cdef double* col_sq = sc.col_b
    cdef double count = <double>(rows * cpg)
    cdef double sum_dev, sum_sq, d
    cdef bint close = True
    zero_doubles(col_sum, c)
    zero_doubles(col_sq, c)
    if real is float:
        f32_add_column_dev_sums(col_sum, col_sq, block, rows, c, c, center)
        for k in range(c):
            if not (isfinite(col_sq[k]) and isfinite(col_sum[k])) and isfinite(center[k]):
                # float32 squares overflow (spread beyond ~1e19): float64 sums instead
                col_sum[k] = 0
                col_sq[k] = 0
                for r in range(rows):
                    d = block[r * c + k] - <double>center[k]
                    col_sum[k] += d
                    col_sq[k] += d * d
    else:
        # float64: the deviations' sum too (a group's center, rounded from a sum of
        # columns, may be an ulp off its mean; finish_dev corrects it).
        for r in range(rows):
            row = block + r * c
            for k in range(c):
                d = row[k] - center[k]
                col_sum[k] += d
                col_sq[k] += d * d
    for g in range(lay.groups):
        sum_dev = 0
        sum_sq = 0
        for k in range(g * cpg, g * cpg + cpg):
            sum_dev += col_sum[k]
            sum_sq += col_sq[k]
        partial[3 * g] = count
        finish_dev(count, center[g * cpg], sum_dev, sum_sq, &partial[3 * g + 1],
                   &partial[3 * g + 2])
        if not (sum_sq <= 2 * partial[3 * g + 2]):
            close = False
    return close


cdef void last_piece_stats(const real* x, const LastLayout* lay, int64_t i, int64_t q,
                           LastScratch* sc, double* partial) noexcept nogil:
    """partial[3g:3g+3] = (count, mean, M2) of group g over piece q of sample i.

    float32 pieces of at least 2·LAST_HINT_ROWS rows first try one pass, around the
    group means of their first LAST_HINT_ROWS rows, kept when each is within a
    standard deviation of its group's mean (as block_stats); otherwise, and for float64
    data, two passes: the group means, then the deviations from them."""
    cdef int64_t g, k, rows = last_piece_rows(lay, q)
    cdef const real* block = x + last_offset(lay, i, q)
    cdef real* center = <real*>sc.center
    if real is float:
        if rows >= 2 * LAST_HINT_ROWS:
            last_column_sums(block, LAST_HINT_ROWS, lay.c, sc.col_a)
            last_group_centers(lay, sc.col_a, <double>(LAST_HINT_ROWS * lay.cpg), center)
            if last_dev_stats(block, lay, rows, sc, partial):
                return
            # Again around the means just found (a second pass, as block_stats').
            for g in range(lay.groups):
                for k in range(g * lay.cpg, g * lay.cpg + lay.cpg):
                    center[k] = <real>partial[3 * g + 1]
            last_dev_stats(block, lay, rows, sc, partial)
            return
    last_column_sums(block, rows, lay.c, sc.col_a)
    last_group_centers(lay, sc.col_a, <double>(rows * lay.cpg), center)
    last_dev_stats(block, lay, rows, sc, partial)


cdef void last_piece_grad_sums(const real* dy, const real* x, const LastLayout* lay,
                               int64_t i, int64_t q, const real* mean, LastScratch* sc,
                               double* sums) noexcept nogil:
    """sums[k] = Σdy and sums[c + k] = Σdy·(x - mean) of channel k over piece q of
    sample i (mean: its group's, from save_mean)."""
    cdef int64_t rows = last_piece_rows(lay, q), c = lay.c, cpg = lay.cpg
    cdef int64_t offset = last_offset(lay, i, q)
    cdef const real* dy_row
    cdef const real* x_row
    cdef real* center = <real*>sc.center
    cdef double* col_dy = sc.col_a
    cdef double* col_dev = sc.col_b
    cdef int64_t g, k, r
    for k in range(c):
        center[k] = mean[i * lay.groups + k // cpg]
    zero_doubles(col_dy, c)
    zero_doubles(col_dev, c)
    if real is float:
        f32_add_column_grad_sums(col_dy, col_dev, dy + offset, NULL, x + offset, rows, c, c,
                                 center)
        for k in range(c):
            if not (isfinite(col_dy[k]) and isfinite(col_dev[k])):
                # float32 products overflow (see add_grad_sums_f64): float64 sums instead
                col_dy[k] = 0
                col_dev[k] = 0
                add_grad_sums_f64(dy + offset + k, NULL, NULL, x + offset + k, rows, c,
                                  center[k], &col_dy[k], &col_dev[k])
    else:
        for r in range(rows):
            dy_row = dy + offset + r * c
            x_row = x + offset + r * c
            # One sum per loop: gcc vectorizes these, not a loop updating both arrays.
            for k in range(c):
                col_dy[k] += dy_row[k]
            for k in range(c):
                col_dev[k] += dy_row[k] * (<double>x_row[k] - center[k])
    for k in range(c):
        sums[k] = col_dy[k]
        sums[c + k] = finish_dy_xmu(col_dy[k], col_dev[k], mean[i * lay.groups + k // cpg],
                                    center[k])


# --------------------------------------------------------------------------------
# Elementwise passes, per piece, with per-column coefficients of the piece's sample
# --------------------------------------------------------------------------------
cdef void last_forward_coefs(const LastLayout* lay, int64_t i, const double* row_stats,
                             const real* weight, const real* bias, real* coefs) noexcept nogil:
    """Sample i's (hi, lo, scale, shift) per column; row_stats holds (mean, rstd) per
    (sample, group)."""
    cdef int64_t k, c = lay.c
    cdef double mean, rstd
    cdef real hi, lo
    for k in range(c):
        mean = row_stats[2 * (i * lay.groups + k // lay.cpg)]
        rstd = row_stats[2 * (i * lay.groups + k // lay.cpg) + 1]
        split_center(mean, &hi, &lo)
        coefs[LAST_HI * c + k] = hi
        coefs[LAST_LO * c + k] = lo
        coefs[LAST_SCALE * c + k] = <real>(rstd * (weight[k] if weight != NULL else 1.0))
        coefs[LAST_SHIFT * c + k] = bias[k] if bias != NULL else 0


cdef void last_piece_forward(const real* x, real* y, const LastLayout* lay, int64_t i,
                             int64_t q, const real* coefs) noexcept nogil:
    """y = ((x - hi) - lo)·scale + shift over piece q of sample i; y may be x."""
    cdef int64_t c = lay.c, r, k, row
    cdef int64_t offset = last_offset(lay, i, q)
    cdef const real* hi = coefs + LAST_HI * c
    cdef const real* lo = coefs + LAST_LO * c
    cdef const real* scale = coefs + LAST_SCALE * c
    cdef const real* shift = coefs + LAST_SHIFT * c
    for r in range(last_piece_rows(lay, q)):
        row = offset + r * c
        for k in range(c):
            y[row + k] = ((x[row + k] - hi[k]) - lo[k]) * scale[k] + shift[k]


cdef void last_backward_coefs(const LastLayout* lay, int64_t i, const real* mean,
                              const real* rstd, const double* row_coefs, const real* weight,
                              real* coefs) noexcept nogil:
    """Sample i's (hi, lo, rstd, mean_g, weight, k) per column; row_coefs holds (mean_g, k)
    per (sample, group)."""
    cdef int64_t k, r, c = lay.c
    cdef real hi, lo
    for k in range(c):
        r = i * lay.groups + k // lay.cpg
        split_center(mean[r], &hi, &lo)
        coefs[LAST_HI * c + k] = hi
        coefs[LAST_LO * c + k] = lo
        coefs[LAST_SCALE * c + k] = rstd[r]
        coefs[LAST_SHIFT * c + k] = <real>row_coefs[2 * r]
        coefs[LAST_WEIGHT * c + k] = weight[k] if weight != NULL else 1
        coefs[LAST_K * c + k] = <real>row_coefs[2 * r + 1]


cdef void last_piece_backward(const real* dy, const real* x, real* dx, const LastLayout* lay,
                              int64_t i, int64_t q, const real* coefs) noexcept nogil:
    """dx = (dy·weight - mean_g - ((x - hi) - lo)·k)·rstd over piece q of sample i; dx may
    be dy or x."""
    cdef int64_t c = lay.c, r, k, row
    cdef int64_t offset = last_offset(lay, i, q)
    cdef const real* hi = coefs + LAST_HI * c
    cdef const real* lo = coefs + LAST_LO * c
    cdef const real* scale = coefs + LAST_SCALE * c
    cdef const real* mean_g = coefs + LAST_SHIFT * c
    cdef const real* w = coefs + LAST_WEIGHT * c
    cdef const real* kk = coefs + LAST_K * c
    for r in range(last_piece_rows(lay, q)):
        row = offset + r * c
        for k in range(c):
            dx[row + k] = (dy[row + k] * w[k] - mean_g[k]
                           - ((x[row + k] - hi[k]) - lo[k]) * kk[k]) * scale[k]


# --------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------
cdef void last_fold_stats(const LastLayout* lay, int64_t i, const double* total, double eps,
                          double* row_stats, real* save_mean, real* save_rstd) noexcept nogil:
    """Sample i's (mean, rstd) per group from its folded (count, mean, M2)."""
    cdef int64_t g, r
    for g in range(lay.groups):
        r = i * lay.groups + g
        row_stats[2 * r] = total[3 * g + 1]
        row_stats[2 * r + 1] = rstd_of(&total[3 * g], eps)
        if save_mean != NULL:
            save_mean[r] = <real>row_stats[2 * r]
        if save_rstd != NULL:
            save_rstd[r] = <real>row_stats[2 * r + 1]


cdef void last_merge_piece(const LastLayout* lay, double* total,
                           const double* partial) noexcept nogil:
    """Folds a piece's (count, mean, M2) per group into total."""
    cdef int64_t g
    for g in range(lay.groups):
        merge_stats(&total[3 * g], &total[3 * g + 1], &total[3 * g + 2], partial[3 * g],
                    partial[3 * g + 1], partial[3 * g + 2])


cdef void last_forward_sample(const real* x, real* y, const LastLayout* lay, int64_t i,
                              const real* weight, const real* bias, double eps,
                              double* row_stats, real* save_mean, real* save_rstd,
                              LastScratch sc) noexcept nogil:
    """Sample mode: sample i's statistics, then its elementwise pass."""
    cdef int64_t q
    zero_doubles(sc.total, 3 * lay.groups)
    for q in range(lay.pieces):
        last_piece_stats(x, lay, i, q, &sc, sc.partial)
        last_merge_piece(lay, sc.total, sc.partial)
    last_fold_stats(lay, i, sc.total, eps, row_stats, save_mean, save_rstd)
    last_forward_coefs(lay, i, row_stats, weight, bias, <real*>sc.coefs)
    for q in range(lay.pieces):
        last_piece_forward(x, y, lay, i, q, <real*>sc.coefs)


cdef int last_forward_pieces(const real* x, real* y, const LastLayout* lay, const real* weight,
                             const real* bias, double eps, double* row_stats,
                             real* save_mean, real* save_rstd, double* doubles, char* values,
                             int n_threads) noexcept nogil:
    """Piece mode: every piece's statistics, the folds, every piece's pass."""
    cdef int64_t task, i, q, n_tasks = lay.n * lay.pieces
    cdef int64_t width = 3 * lay.groups
    cdef LastScratch sc
    cdef double* partials = <double*>alloc_values(n_tasks, width, sizeof(double), False)
    if partials == NULL:
        return BNCPU_ERR_NO_MEMORY
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        sc = last_scratch(lay, doubles, values, sizeof(real), threadid())
        last_piece_stats(x, lay, task // lay.pieces, task % lay.pieces, &sc,
                         partials + task * width)
    sc = last_scratch(lay, doubles, values, sizeof(real), 0)
    for i in range(lay.n):
        zero_doubles(sc.total, width)
        for q in range(lay.pieces):
            last_merge_piece(lay, sc.total, partials + (i * lay.pieces + q) * width)
        last_fold_stats(lay, i, sc.total, eps, row_stats, save_mean, save_rstd)
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        sc = last_scratch(lay, doubles, values, sizeof(real), threadid())
        last_forward_coefs(lay, task // lay.pieces, row_stats, weight, bias, <real*>sc.coefs)
        last_piece_forward(x, y, lay, task // lay.pieces, task % lay.pieces, <real*>sc.coefs)
    free(partials)
    return BNCPU_OK


cdef int last_rows_forward(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                           int64_t groups, const real* weight, const real* bias, double eps,
                           real* save_mean, real* save_rstd) noexcept nogil:
    cdef int status = check_forward(x, y, n, c, s, groups, weight, bias, eps, save_mean,
                                    save_rstd)
    cdef int n_threads
    cdef int64_t i
    cdef LastLayout lay
    cdef double* row_stats
    cdef double* doubles
    cdef char* values
    if status != BNCPU_OK:
        return status
    if s <= 1 or n * c * s == 0:
        # The same buffer as channels first (or no values): its kernel, its bits.
        return rows_forward(x, y, n, c, s, groups, weight, bias, eps, True, save_mean,
                            save_rstd)
    lay = make_last_layout(n, c, s, groups)
    n_threads = threads_begin(n * c * s)
    row_stats = <double*>alloc_values(2 * n, groups, sizeof(double), False)
    doubles = <double*>alloc_values(n_threads, last_scratch_doubles(&lay), sizeof(double),
                                    False)
    values = <char*>alloc_values(n_threads, last_scratch_values(&lay), sizeof(real), False)
    if row_stats == NULL or doubles == NULL or values == NULL:
        status = BNCPU_ERR_NO_MEMORY
    elif n_threads > 1 and (n < 2 * n_threads
                            or n * c * s * <int64_t>sizeof(real) <= CACHED_BYTES):
        status = last_forward_pieces(x, y, &lay, weight, bias, eps, row_stats, save_mean,
                                     save_rstd, doubles, values, n_threads)
    elif n_threads > 1:
        for i in prange(n, schedule='static', num_threads=n_threads):
            last_forward_sample(x, y, &lay, i, weight, bias, eps, row_stats, save_mean,
                                save_rstd, last_scratch(&lay, doubles, values, sizeof(real),
                                                        threadid()))
    else:
        for i in range(n):
            last_forward_sample(x, y, &lay, i, weight, bias, eps, row_stats, save_mean,
                                save_rstd, last_scratch(&lay, doubles, values, sizeof(real), 0))
    threads_end(n_threads)
    free(row_stats)
    free(doubles)
    free(values)
    return status


# --------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------
cdef void last_sample_coefs(const LastLayout* lay, int64_t i, const real* rstd,
                            const real* weight, const double* channel_sums,
                            double* row_coefs) noexcept nogil:
    """Sample i's (mean_g, k) per group from its per-channel (Σdy, Σdy·xmu), sample i's
    row of channel_sums: Σg = Σ weight[k]·Σdy, Σg·xmu = Σ weight[k]·Σdy·xmu, channels
    in order."""
    cdef int64_t g, k, r, c = lay.c
    cdef const double* sums = channel_sums + 2 * c * i
    cdef double w, sum_g, sum_g_xmu
    for g in range(lay.groups):
        r = i * lay.groups + g
        sum_g = 0
        sum_g_xmu = 0
        for k in range(g * lay.cpg, g * lay.cpg + lay.cpg):
            w = weight[k] if weight != NULL else 1.0
            sum_g += w * sums[k]
            sum_g_xmu += w * sums[c + k]
        backward_coefs(sum_g, sum_g_xmu, rstd[r], lay.cpg * lay.s, True, &row_coefs[2 * r],
                       &row_coefs[2 * r + 1])


cdef inline void add_doubles(double* total, const double* part, int64_t length) noexcept nogil:
    cdef int64_t k
    for k in range(length):
        total[k] += part[k]


cdef void last_backward_sample(const real* dy, const real* x, real* dx, const LastLayout* lay,
                               int64_t i, const real* mean, const real* rstd,
                               const real* weight, double* channel_sums, double* row_coefs,
                               LastScratch sc) noexcept nogil:
    """Sample mode: sample i's gradient sums, piece by piece, then its pass (if dx)."""
    cdef int64_t q
    zero_doubles(channel_sums + 2 * lay.c * i, 2 * lay.c)
    for q in range(lay.pieces):
        last_piece_grad_sums(dy, x, lay, i, q, mean, &sc, sc.piece)
        add_doubles(channel_sums + 2 * lay.c * i, sc.piece, 2 * lay.c)
    last_sample_coefs(lay, i, rstd, weight, channel_sums, row_coefs)
    if dx != NULL:
        last_backward_coefs(lay, i, mean, rstd, row_coefs, weight, <real*>sc.coefs)
        for q in range(lay.pieces):
            last_piece_backward(dy, x, dx, lay, i, q, <real*>sc.coefs)


cdef int last_backward_pieces(const real* dy, const real* x, real* dx, const LastLayout* lay,
                              const real* mean, const real* rstd, const real* weight,
                              double* channel_sums, double* row_coefs, double* doubles,
                              char* values, int n_threads) noexcept nogil:
    """Piece mode: every piece's gradient sums, the folds, every piece's pass (if dx)."""
    cdef int64_t task, i, q, n_tasks = lay.n * lay.pieces
    cdef int64_t width = 2 * lay.c
    cdef LastScratch sc
    cdef double* partials = <double*>alloc_values(n_tasks, width, sizeof(double), False)
    if partials == NULL:
        return BNCPU_ERR_NO_MEMORY
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        sc = last_scratch(lay, doubles, values, sizeof(real), threadid())
        last_piece_grad_sums(dy, x, lay, task // lay.pieces, task % lay.pieces, mean, &sc,
                             partials + task * width)
    for i in range(lay.n):
        zero_doubles(channel_sums + width * i, width)
        for q in range(lay.pieces):
            add_doubles(channel_sums + width * i, partials + (i * lay.pieces + q) * width, width)
        last_sample_coefs(lay, i, rstd, weight, channel_sums, row_coefs)
    if dx != NULL:
        for task in prange(n_tasks, schedule='static', num_threads=n_threads):
            sc = last_scratch(lay, doubles, values, sizeof(real), threadid())
            last_backward_coefs(lay, task // lay.pieces, mean, rstd, row_coefs, weight,
                                <real*>sc.coefs)
            last_piece_backward(dy, x, dx, lay, task // lay.pieces, task % lay.pieces,
                                <real*>sc.coefs)
    free(partials)
    return BNCPU_OK


cdef void last_param_grads(const LastLayout* lay, const real* rstd, const double* channel_sums,
                           real* dweight, real* dbias, double* acc_w,
                           double* acc_b) noexcept nogil:
    """dweight[k] = Σ_i Σdy·xmu·rstd and dbias[k] = Σ_i Σdy, samples in order (acc_w,
    acc_b: c doubles of scratch)."""
    cdef int64_t i, k, c = lay.c
    zero_doubles(acc_w, c)
    zero_doubles(acc_b, c)
    for i in range(lay.n):
        for k in range(c):
            acc_w[k] += channel_sums[2 * c * i + c + k] * rstd[i * lay.groups + k // lay.cpg]
            acc_b[k] += channel_sums[2 * c * i + k]
    for k in range(c):
        if dweight != NULL:
            dweight[k] = <real>acc_w[k]
        if dbias != NULL:
            dbias[k] = <real>acc_b[k]


cdef int last_rows_backward(const real* dy, const real* x, real* dx, int64_t n, int64_t c,
                            int64_t s, int64_t groups, const real* mean, const real* rstd,
                            const real* weight, real* dweight, real* dbias) noexcept nogil:
    cdef int status = check_backward(dy, x, dx, n, c, s, groups, mean, rstd, weight, True,
                                     dweight, dbias)
    cdef int n_threads
    cdef int64_t i
    cdef LastLayout lay
    cdef LastScratch sc
    cdef double* channel_sums
    cdef double* row_coefs
    cdef double* doubles
    cdef char* values
    if status != BNCPU_OK:
        return status
    if s <= 1 or n * c * s == 0 or (dx == NULL and dweight == NULL and dbias == NULL):
        # The same buffer as channels first, no values, or nothing asked for: its kernel.
        return rows_backward(dy, x, dx, n, c, s, groups, mean, rstd, weight, True, dweight,
                             dbias)
    lay = make_last_layout(n, c, s, groups)
    n_threads = threads_begin(n * c * s)
    channel_sums = <double*>alloc_values(2 * n, c, sizeof(double), False)
    row_coefs = <double*>alloc_values(2 * n, groups, sizeof(double), False)
    doubles = <double*>alloc_values(n_threads, last_scratch_doubles(&lay), sizeof(double),
                                    False)
    values = <char*>alloc_values(n_threads, last_scratch_values(&lay), sizeof(real), False)
    if channel_sums == NULL or row_coefs == NULL or doubles == NULL or values == NULL:
        status = BNCPU_ERR_NO_MEMORY
    elif n_threads > 1 and (n < 2 * n_threads
                            or n * c * s * <int64_t>sizeof(real) <= CACHED_BYTES):
        status = last_backward_pieces(dy, x, dx, &lay, mean, rstd, weight, channel_sums,
                                      row_coefs, doubles, values, n_threads)
    elif n_threads > 1:
        for i in prange(n, schedule='static', num_threads=n_threads):
            last_backward_sample(dy, x, dx, &lay, i, mean, rstd, weight, channel_sums,
                                 row_coefs, last_scratch(&lay, doubles, values, sizeof(real),
                                                         threadid()))
    else:
        for i in range(n):
            last_backward_sample(dy, x, dx, &lay, i, mean, rstd, weight, channel_sums,
                                 row_coefs, last_scratch(&lay, doubles, values, sizeof(real), 0))
    threads_end(n_threads)
    if status == BNCPU_OK:
        sc = last_scratch(&lay, doubles, values, sizeof(real), 0)
        last_param_grads(&lay, rstd, channel_sums, dweight, dbias, sc.col_a, sc.col_b)
    free(channel_sums)
    free(row_coefs)
    free(doubles)
    free(values)
    return status


# The C API's entry points (signatures of include/bncpu.h).
cdef int group_norm_channels_last_forward(const real* x, real* y, int64_t n, int64_t c,
                                          int64_t s, int64_t groups, const real* weight,
                                          const real* bias, double eps, real* save_mean,
                                          real* save_rstd) noexcept nogil:
    return last_rows_forward(x, y, n, c, s, groups, weight, bias, eps, save_mean, save_rstd)


cdef int group_norm_channels_last_backward(const real* dy, const real* x, real* dx, int64_t n,
                                           int64_t c, int64_t s, int64_t groups,
                                           const real* mean, const real* rstd,
                                           const real* weight, real* dweight,
                                           real* dbias) noexcept nogil:
    return last_rows_backward(dy, x, dx, n, c, s, groups, mean, rstd, weight, dweight, dbias)
