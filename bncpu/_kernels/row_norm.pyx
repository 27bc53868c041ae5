"""Row-normalization kernels: layer norm, group norm (instance norm is group norm with
one channel per group) and RMS norm, on C-contiguous buffers, float32 or float64.

All of them normalize rows of contiguous values, each row on its own. The input is
seen as (n, c, s) with its c channels in `groups` groups of cpg = c/groups contiguous
channels; a row is one (sample, group): L = cpg·s contiguous values, and the value at
offset k of the row belongs to channel p = k // s of the group, whose weight[p] and
bias[p] apply.
    group norm (n, c, s, groups);  instance norm: groups = c
    layer norm (rows, d)  = (n = rows, c = d, s = 1, groups = 1): one channel per column
    RMS norm (rows, d)    = layer norm without centering and without bias

Forward, per row (RMS norm: mean = 0 and var is the mean square):
    mean = Σx / L,  var = Σ(x - mean)² / L,  rstd = 1/√(var + eps)
    y = ((x - hi) - lo)·rstd·weight[p] + bias[p],  hi + lo = mean (see split_center)
Backward, centered, xmu = x - mean, g = dy·weight[p]:
    dx = rstd·(g - Σg/L - xmu·rstd²·Σ(g·xmu)/L)      (RMS norm: no Σg/L term)
    dweight[p] = Σ dy·xmu·rstd,  dbias[p] = Σ dy      (over every row and value of p)

How the work is cut (fixed by the shape alone, so results are bitwise identical for
any number of threads):
* A row is cut into pieces: runs of whole channels of at most ROW_NORM_PIECE values, or, when
  a channel is longer than ROW_NORM_PIECE, pieces of ROW_NORM_PIECE values inside one channel. Row
  statistics and gradient sums are folded piece by piece in piece order; inside a
  piece, a channel's values (s > 1) are summed as one span.
* Row mode: one thread owns a row: statistics, then the elementwise pass while the
  row is in cache (one read from memory, one write).
* Piece mode (forward: fewer rows than twice the threads, rows of several pieces, e.g.
  (2, 3_000_000); and inputs of at most CACHED_BYTES, which stay in cache, where two
  passes over the whole input stream better than alternating per row: measured on
  group norm (8, 256, 28, 28)): the pieces of all rows are spread over the threads,
  their partials folded per row in piece order, then a parallel elementwise pass over
  the pieces.
  Row and piece mode run the same per-piece code and fold in the same order, so the
  choice, which depends on the thread count, never changes a bit.
* Backward, channels of several values (s > 1: group and instance norm): a channel
  span's Σdy and Σdy·xmu come with the row's reduction. Rows are grouped in blocks fixed
  by the shape; each block adds its rows' dweight/dbias shares, in row order, into its
  own partial arrays, which are added in block order. Row mode runs block by block;
  rows of several pieces, which leave the cache between the reduction and the
  elementwise pass anyway, run in piece mode when there are threads to share them.
* Backward, one value per channel (s == 1: layer and RMS norm): dweight and dbias have
  a value per column, so they are summed down the columns, each row block into its own
  partial arrays. Rows of one piece: a task per block of rows reduces each row and
  passes over it while it is in cache. Longer rows go in groups of about REREAD_BYTES
  per array: the group is reduced in piece mode, then passed over while still in cache
  (L3) by tasks of columns, each going down the group's rows in order, writing dx and
  adding into the one partial array.

Every kernel checks its arguments first and returns a bncpu_status; nothing is
written unless the arguments are valid.
"""
from cython.parallel cimport prange, threadid
from libc.math cimport isfinite, sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport free

from bncpu._threads cimport threads_begin, threads_end
from bncpu._kernels._common cimport (
    BNCPU_OK, BNCPU_ERR_NULL_POINTER, BNCPU_ERR_BAD_GROUPS, BNCPU_ERR_NO_MEMORY, Region,
    region, check_aliasing, alloc_values, check_sizes, check_eps)
from bncpu._kernels._primitives cimport (
    real, span_stats, merge_stats, sum_sq_span, sum_dy_xmu_span, split_center,
    sum_dy_weight, sum_dy_weight_xmu,
    affine_span, affine_each_span, use_streaming, sum_g_xmu_span_f32, row_backward_f32,
    widen_f32, rows_span_backward_f32, prefetch, prefetch_write)

cdef enum:
    ROW_NORM_PIECE = 16384     # values per piece of a row (a unit of parallel work)
    MAX_BLOCKS = 64            # row blocks of the dweight/dbias partial sums, at most
    TILE = 2048                # columns per task of the long rows' pass (s == 1), at most
    REREAD_BYTES = 2 << 20     # bytes per array of a group of long rows reduced, then read
                               # from cache (L3; a larger group no longer fits there)
    WIDEN_ROWS = 8             # float32 rows whose column sums are added before widening
    ACC_GAP = 80               # floats between float32 accumulator arrays: rows of 4 KiB
                               # would otherwise put both at the same offset in a page,
                               # and a store to one delays the next load from the other
    PARTIALS_BUDGET = 1 << 20  # ... and at most this many partial values per array
    CACHED_BYTES = 8 << 20     # inputs of at most this many bytes per array: piece mode


cdef struct Layout:
    int64_t rows               # n·groups
    int64_t length             # L = cpg·s values per row
    int64_t seg                # s: values per channel
    int64_t groups
    int64_t channels           # cpg: channels per row
    int64_t params             # c: length of weight, bias, dweight, dbias
    int64_t piece              # values per piece when seg <= ROW_NORM_PIECE (whole channels)
    int64_t pieces_per_seg     # pieces per channel when seg > ROW_NORM_PIECE, else 0
    int64_t pieces             # pieces per row
    bint stream                # write y (forward) or dx (backward, one-piece rows of layer and
                               # RMS norm) with streaming stores (use_streaming)


cdef Layout make_layout(int64_t n, int64_t c, int64_t s, int64_t groups) noexcept nogil:
    cdef Layout lay
    lay.rows = n * groups
    lay.channels = c // groups
    lay.seg = s
    lay.length = lay.channels * s
    lay.groups = groups
    lay.params = c
    lay.stream = False
    if s <= ROW_NORM_PIECE:
        lay.piece = (ROW_NORM_PIECE // s) * s if s > 0 else ROW_NORM_PIECE
        lay.pieces_per_seg = 0
        lay.pieces = (lay.length + lay.piece - 1) // lay.piece
    else:
        lay.piece = ROW_NORM_PIECE
        lay.pieces_per_seg = (s + ROW_NORM_PIECE - 1) // ROW_NORM_PIECE
        lay.pieces = lay.channels * lay.pieces_per_seg
    return lay


cdef inline void piece_span(const Layout* lay, int64_t q, int64_t* start,
                            int64_t* length) noexcept nogil:
    """Offset and length of piece q inside its row."""
    cdef int64_t within
    if lay.pieces_per_seg == 0:
        start[0] = q * lay.piece
        length[0] = min(lay.piece, lay.length - start[0])
    else:
        within = (q % lay.pieces_per_seg) * ROW_NORM_PIECE
        start[0] = (q // lay.pieces_per_seg) * lay.seg + within
        length[0] = min(<int64_t>ROW_NORM_PIECE, lay.seg - within)


cdef inline int64_t first_param(const Layout* lay, int64_t row) noexcept nogil:
    """Index in weight/bias of the row's first channel."""
    return (row % lay.groups) * lay.channels


cdef inline int64_t spans_per_row(const Layout* lay) noexcept nogil:
    """Channel spans of a row (s > 1): one per channel, or one per piece of a long channel.
    Span number o of a row belongs to channel o, or o // pieces_per_seg."""
    return lay.channels if lay.pieces_per_seg == 0 else lay.pieces


cdef inline int64_t span_channel(const Layout* lay, int64_t span) noexcept nogil:
    return span if lay.pieces_per_seg == 0 else span // lay.pieces_per_seg


cdef inline int64_t row_blocks(const Layout* lay, int64_t* rows_per_block) noexcept nogil:
    """Blocks of the dweight/dbias partial sums: their number, and rows per block.
    Long rows of one value per channel (s == 1) have one block: their tasks are tiles of
    columns (backward_column_params)."""
    cdef int64_t rows = lay.rows
    cdef int64_t budget = max(<int64_t>1, PARTIALS_BUDGET // max(lay.params, <int64_t>1))
    cdef int64_t blocks = min(rows, min(<int64_t>MAX_BLOCKS, budget))
    if lay.seg == 1 and lay.pieces > 1:
        blocks = 1
    rows_per_block[0] = (rows + blocks - 1) // blocks
    return (rows + rows_per_block[0] - 1) // rows_per_block[0]


cdef inline double rstd_of(const double* total, double eps) noexcept nogil:
    """1/√(M2/count + eps); an empty row gives NaN, as in PyTorch."""
    return 1.0 / sqrt(total[2] / total[0] + eps)


# --------------------------------------------------------------------------------
# Per-piece work, shared by row mode and piece mode
# --------------------------------------------------------------------------------
cdef void piece_stats(const real* row, const Layout* lay, int64_t q, bint centered,
                      double* partial) noexcept nogil:
    """partial = (count, mean, M2) of piece q (RMS norm: (count, 0, Σx²))."""
    cdef int64_t start, length
    piece_span(lay, q, &start, &length)
    partial[0] = 0
    partial[1] = 0
    partial[2] = 0
    if centered:
        span_stats(row + start, length, &partial[0], &partial[1], &partial[2])
    else:
        partial[0] = length
        partial[2] = sum_sq_span(row + start, length)


cdef inline void fold_stats(double* total, const double* partial, bint centered) noexcept nogil:
    if centered:
        merge_stats(&total[0], &total[1], &total[2], partial[0], partial[1], partial[2])
    else:
        total[0] += partial[0]
        total[2] += partial[2]


cdef void piece_forward(const real* x, real* y, const Layout* lay, int64_t q, double mean,
                        double rstd, const real* weight, const real* bias) noexcept nogil:
    """y = ((x - hi) - lo)·rstd·weight[p] + bias[p] over piece q of a row; x, y, weight
    and bias point at the row's first value and first channel; y may be x."""
    cdef int64_t start, length, pos, stop, channel, span_stop, k
    cdef real hi, lo
    cdef real scale = <real>rstd
    split_center(mean, &hi, &lo)
    piece_span(lay, q, &start, &length)
    if lay.seg == 1:
        affine_each_span(x + start, y + start, length, hi, lo, scale,
                         weight + start if weight != NULL else NULL,
                         bias + start if bias != NULL else NULL, lay.stream)
        return
    pos = start
    stop = start + length
    while pos < stop:
        channel = pos // lay.seg
        span_stop = min(stop, (channel + 1) * lay.seg)
        affine_span(x + pos, y + pos, span_stop - pos, hi, lo,
                    <real>(rstd * (weight[channel] if weight != NULL else 1.0)),
                    bias[channel] if bias != NULL else 0, lay.stream)
        pos = span_stop


cdef inline void add_channel_grads(double* dweight, double* dbias, int64_t p, double sum_dy,
                                   double sum_dy_xmu, double rstd) noexcept nogil:
    """One channel span's share of dweight[p] and dbias[p] (partials; either may be NULL)."""
    if dweight != NULL:
        dweight[p] += sum_dy_xmu * rstd
    if dbias != NULL:
        dbias[p] += sum_dy


cdef void piece_grad_sums(const real* dy, const real* x, const Layout* lay, int64_t q,
                          double mean, double rstd, const real* weight, double* sums,
                          double* span_sums, double* dweight, double* dbias) noexcept nogil:
    """sums = (Σg, Σg·xmu) over piece q of a row of channels of several values (s > 1),
    g = dy·weight[p], xmu = x - mean.

    The channels are summed span by span; each span's (Σdy, Σdy·xmu) is also stored in
    span_sums (by span number, if not NULL) and added to the dweight/dbias partials (if
    not NULL)."""
    cdef int64_t start, length, pos, stop, channel, span_stop, span
    cdef double w, sum_dy, sum_dy_xmu
    piece_span(lay, q, &start, &length)
    sums[0] = 0
    sums[1] = 0
    pos = start
    stop = start + length
    span = pos // lay.seg if lay.pieces_per_seg == 0 else q
    while pos < stop:
        channel = pos // lay.seg
        span_stop = min(stop, (channel + 1) * lay.seg)
        sum_dy = 0
        sum_dy_xmu = 0
        sum_dy_xmu_span(dy + pos, NULL, x + pos, span_stop - pos, mean, &sum_dy, &sum_dy_xmu)
        w = weight[channel] if weight != NULL else 1.0
        sums[0] += w * sum_dy
        sums[1] += w * sum_dy_xmu
        if span_sums != NULL:
            span_sums[2 * span] = sum_dy
            span_sums[2 * span + 1] = sum_dy_xmu
        add_channel_grads(dweight, dbias, channel, sum_dy, sum_dy_xmu, rstd)
        pos = span_stop
        span += 1


cdef void piece_backward(const real* dy, const real* x, real* dx, const Layout* lay, int64_t q,
                         double mean, double rstd, double mean_g, double k_coef,
                         const real* weight) noexcept nogil:
    """dx = (g - mean_g - ((x - hi) - lo)·k)·rstd over piece q of a row of channels of
    several values (s > 1); dx may be dy or x."""
    cdef int64_t start, length, pos, stop, channel, span_stop, k
    cdef real hi, lo, w
    cdef real scale = <real>rstd
    cdef real mg = <real>mean_g
    cdef real kk = <real>k_coef
    split_center(mean, &hi, &lo)
    piece_span(lay, q, &start, &length)
    pos = start
    stop = start + length
    while pos < stop:
        channel = pos // lay.seg
        span_stop = min(stop, (channel + 1) * lay.seg)
        w = weight[channel] if weight != NULL else 1
        for k in range(pos, span_stop):
            dx[k] = (dy[k] * w - mg - ((x[k] - hi) - lo) * kk) * scale
        pos = span_stop


cdef void row_span_backward(const real* dy, const real* x, real* dx, int64_t length, double mean,
                           double rstd, double mean_g, double k_coef, const real* weight,
                           double* dweight, double* dbias) noexcept nogil:
    """A run of columns of one row of channels of one value (s == 1): dx = (dy·weight -
    mean_g - ((x - hi) - lo)·k)·rstd (if dx is not NULL), and dy·xmu·rstd and dy added to
    the dweight/dbias partials of these columns (if not NULL). dx may be dy or x."""
    cdef int64_t k
    cdef real hi, lo
    cdef real scale = <real>rstd
    cdef real mg = <real>mean_g
    cdef real kk = <real>k_coef
    cdef real dy_k, x_k
    split_center(mean, &hi, &lo)
    # One loop (gcc unswitches it on the NULL tests); dy and x are read before dx,
    # which may be either of them, is written.
    for k in range(length):
        dy_k = dy[k]
        x_k = x[k]
        if dweight != NULL:
            dweight[k] += dy_k * (<double>x_k - mean) * rstd
        if dbias != NULL:
            dbias[k] += dy_k
        if dx != NULL:
            dx[k] = (dy_k * (weight[k] if weight != NULL else 1) - mg
                     - ((x_k - hi) - lo) * kk) * scale


cdef inline void backward_coefs(double sum_g, double sum_g_xmu, double rstd, int64_t length,
                                bint centered, double* mean_g, double* k_coef) noexcept nogil:
    """mean_g = Σg/L (0 for RMS norm), k = rstd²·Σ(g·xmu)/L."""
    mean_g[0] = sum_g / length if centered else 0.0
    k_coef[0] = rstd * rstd * sum_g_xmu / length


# --------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------
cdef void forward_row(const real* x, real* y, Layout lay, int64_t r, const real* weight,
                      const real* bias, double eps, bint centered,
                      real* save_mean, real* save_rstd) noexcept nogil:
    """Row mode: statistics of row r, then its elementwise pass while it is in cache."""
    cdef double total[3]
    cdef double partial[3]
    cdef double rstd
    cdef int64_t q, p0 = first_param(&lay, r)
    total[0] = 0
    total[1] = 0
    total[2] = 0
    x += r * lay.length
    y += r * lay.length
    for q in range(lay.pieces):
        piece_stats(x, &lay, q, centered, partial)
        fold_stats(total, partial, centered)
    rstd = rstd_of(total, eps)
    if save_mean != NULL:
        save_mean[r] = <real>total[1]
    if save_rstd != NULL:
        save_rstd[r] = <real>rstd
    for q in range(lay.pieces):
        piece_forward(x, y, &lay, q, total[1], rstd, weight + p0 if weight != NULL else NULL,
                      bias + p0 if bias != NULL else NULL)


cdef void stats_task(const real* x, Layout lay, int64_t task, bint centered,
                     double* partials) noexcept nogil:
    """Piece mode: partials[3·task:3·task+3] = statistics of piece task % pieces of row
    task // pieces."""
    piece_stats(x + (task // lay.pieces) * lay.length, &lay, task % lay.pieces, centered,
                partials + 3 * task)


cdef void forward_piece_task(const real* x, real* y, Layout lay, int64_t task,
                             const double* row_stats, const real* weight,
                             const real* bias) noexcept nogil:
    """Piece mode: the elementwise pass of one piece; row_stats holds (mean, rstd) per row."""
    cdef int64_t r = task // lay.pieces
    cdef int64_t p0 = first_param(&lay, r)
    piece_forward(x + r * lay.length, y + r * lay.length, &lay, task % lay.pieces,
                  row_stats[2 * r], row_stats[2 * r + 1],
                  weight + p0 if weight != NULL else NULL, bias + p0 if bias != NULL else NULL)


cdef int forward_pieces(const real* x, real* y, Layout lay, const real* weight,
                        const real* bias, double eps, bint centered, real* save_mean,
                        real* save_rstd, int n_threads) noexcept nogil:
    cdef int64_t task, r, q, n_tasks = lay.rows * lay.pieces
    cdef double total[3]
    cdef double* partials = <double*>alloc_values(3, n_tasks, sizeof(double), False)
    cdef double* row_stats = <double*>alloc_values(2, lay.rows, sizeof(double), False)
    if partials == NULL or row_stats == NULL:
        free(partials)
        free(row_stats)
        return BNCPU_ERR_NO_MEMORY
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        stats_task(x, lay, task, centered, partials)
    for r in range(lay.rows):
        total[0] = 0
        total[1] = 0
        total[2] = 0
        for q in range(lay.pieces):
            fold_stats(total, partials + 3 * (r * lay.pieces + q), centered)
        row_stats[2 * r] = total[1]
        row_stats[2 * r + 1] = rstd_of(total, eps)
        if save_mean != NULL:
            save_mean[r] = <real>row_stats[2 * r]
        if save_rstd != NULL:
            save_rstd[r] = <real>row_stats[2 * r + 1]
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        forward_piece_task(x, y, lay, task, row_stats, weight, bias)
    free(partials)
    free(row_stats)
    return BNCPU_OK


cdef int check_groups(int64_t n, int64_t c, int64_t s, int64_t groups) noexcept nogil:
    """The sizes of a row-norm call ((n, c, s) and n·groups rows), then the groups."""
    cdef int status = check_sizes(n, c, s)
    if status == BNCPU_OK and groups >= 1:
        status = check_sizes(n, groups, 1)
    if status == BNCPU_OK and (groups < 1 or c % groups != 0):
        status = BNCPU_ERR_BAD_GROUPS
    return status


cdef int check_forward(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                       int64_t groups, const real* weight, const real* bias, double eps,
                       real* save_mean, real* save_rstd) noexcept nogil:
    """The arguments of a forward, channels first or last: a status."""
    cdef int status = check_groups(n, c, s, groups)
    cdef Region outputs[3]
    cdef Region inputs[3]
    if status == BNCPU_OK:
        status = check_eps(eps)
    if status != BNCPU_OK:
        return status
    if n * c * s > 0 and (x == NULL or y == NULL):
        return BNCPU_ERR_NULL_POINTER
    outputs[0] = region(y, n * c * s, sizeof(real), True)
    outputs[1] = region(save_mean, n * groups, sizeof(real), False)
    outputs[2] = region(save_rstd, n * groups, sizeof(real), False)
    inputs[0] = region(x, n * c * s, sizeof(real), True)
    inputs[1] = region(weight, c, sizeof(real), False)
    inputs[2] = region(bias, c, sizeof(real), False)
    return check_aliasing(outputs, 3, inputs, 3)


cdef int rows_forward(const real* x, real* y, int64_t n, int64_t c, int64_t s, int64_t groups,
                      const real* weight, const real* bias, double eps, bint centered,
                      real* save_mean, real* save_rstd) noexcept nogil:
    cdef int status = check_forward(x, y, n, c, s, groups, weight, bias, eps, save_mean,
                                    save_rstd)
    cdef int n_threads
    cdef int64_t r
    cdef Layout lay
    if status != BNCPU_OK:
        return status
    if n * c * s == 0 and save_mean == NULL and save_rstd == NULL:
        # No values and no statistics asked for: nothing to do, however many empty rows.
        return BNCPU_OK
    lay = make_layout(n, c, s, groups)
    lay.stream = use_streaming(y, x, NULL, n * c * s * sizeof(real))
    n_threads = threads_begin(n * c * s)
    if n_threads > 1 and ((lay.rows < 2 * n_threads and lay.pieces > 1)
                          or n * c * s * <int64_t>sizeof(real) <= CACHED_BYTES):
        status = forward_pieces(x, y, lay, weight, bias, eps, centered, save_mean, save_rstd,
                                n_threads)
    elif n_threads > 1:
        for r in prange(lay.rows, schedule='static', num_threads=n_threads):
            forward_row(x, y, lay, r, weight, bias, eps, centered, save_mean, save_rstd)
    else:
        for r in range(lay.rows):
            forward_row(x, y, lay, r, weight, bias, eps, centered, save_mean, save_rstd)
    threads_end(n_threads)
    return status


# --------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------
cdef inline double* block_partials(double* partials, const Layout* lay, int64_t block,
                                   int64_t r) noexcept nogil:
    """Row r's first channel in block's partial array (NULL stays NULL)."""
    if partials == NULL:
        return NULL
    return partials + block * lay.params + first_param(lay, r)


cdef inline double row_mean(const real* mean, int64_t r) noexcept nogil:
    return mean[r] if mean != NULL else 0.0


cdef void grad_sums_task(const real* dy, const real* x, Layout lay, int64_t first_row,
                         int64_t task, const real* mean, const real* rstd, const real* weight,
                         double* sums, double* span_sums) noexcept nogil:
    """Piece mode: (Σg, Σg·xmu) of piece task % pieces of row first_row + task // pieces
    into sums[2·task:2·task+2]; the spans' sums (s > 1) into span_sums (if not NULL) by
    row and span number."""
    cdef int64_t r = first_row + task // lay.pieces
    cdef int64_t p0 = first_param(&lay, r)
    cdef int64_t start, length
    if lay.seg == 1:
        piece_span(&lay, task % lay.pieces, &start, &length)
        columns_grad_sums(dy + r * lay.length + start, x + r * lay.length + start, length,
                          row_mean(mean, r), weight + p0 + start if weight != NULL else NULL,
                          sums + 2 * task)
        return
    piece_grad_sums(dy + r * lay.length, x + r * lay.length, &lay, task % lay.pieces,
                    row_mean(mean, r), rstd[r], weight + p0 if weight != NULL else NULL,
                    sums + 2 * task,
                    span_sums + 2 * r * spans_per_row(&lay) if span_sums != NULL else NULL,
                    NULL, NULL)


cdef void pieces_coefs(const real* dy, const real* x, Layout lay, int64_t first_row,
                       int64_t last_row, const real* mean, const real* rstd, const real* weight,
                       bint centered, double* row_coefs, double* span_sums, double* sums,
                       int n_threads) noexcept nogil:
    """Piece mode's reduction of rows first_row..last_row-1: their (row, piece) tasks
    spread over the threads, the (Σg, Σg·xmu) folded per row in piece order into
    row_coefs = (mean_g, k) per row. `sums` holds 2·pieces values per row, allocated by
    the caller before it writes anything (an allocation failure then leaves dx as it was)."""
    cdef int64_t task, r, q, t, n_tasks = (last_row - first_row) * lay.pieces
    cdef double sum_g, sum_g_xmu
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        grad_sums_task(dy, x, lay, first_row, task, mean, rstd, weight, sums, span_sums)
    for r in range(first_row, last_row):
        sum_g = 0
        sum_g_xmu = 0
        for q in range(lay.pieces):
            t = (r - first_row) * lay.pieces + q
            sum_g += sums[2 * t]
            sum_g_xmu += sums[2 * t + 1]
        backward_coefs(sum_g, sum_g_xmu, rstd[r], lay.length, centered,
                       &row_coefs[2 * r], &row_coefs[2 * r + 1])


# Channels of one value (s == 1; layer and RMS norm): dweight and dbias have a value per
# column, summed down the columns. Rows are grouped in blocks fixed by the shape, as for
# s > 1; a task goes down the rows of one block in order, adding into the block's own
# partial arrays, so a column adds its rows in row order whatever the number of threads.
# Every pass reads a row's columns contiguously: a pass down the columns of several rows
# 4 KiB apart maps all their lines to one L1 set.


cdef inline void columns_grad_sums(const real* dy, const real* x, int64_t length, double mean,
                                   const real* weight, double* sums) noexcept nogil:
    """sums = (Σg, Σg·xmu) over `length` columns of one row, g = dy·weight."""
    sums[0] = 0
    sums[1] = 0
    if real is float:
        if weight != NULL:
            sum_g_xmu_span_f32(dy, weight, x, length, mean, &sums[0], &sums[1])
        else:
            sum_dy_xmu_span(dy, NULL, x, length, mean, &sums[0], &sums[1])
    else:
        sums[0] = sum_dy_weight(dy, weight, length)
        sums[1] = sum_dy_weight_xmu(dy, weight, x, length, mean)


cdef inline void columns_pass(const real* dy, const real* x, real* dx, int64_t length,
                              double mean, double rstd, double mean_g, double k_coef,
                              const real* weight, double* dweight, double* dbias, float* acc,
                              bint widen, bint stream) noexcept nogil:
    """dx over `length` columns of one row (if dx is not NULL), and the row's shares of
    dweight/dbias added to these columns of the partials (if not NULL).

    float32 rows with accumulators (acc not NULL) add the shares in float32 to
    acc[:length] (dweight's) and acc[length + ACC_GAP:] (dbias's), which are widened
    into the partials and zeroed when `widen` is set: every WIDEN_ROWS rows of a block,
    and at its end; dx's whole cache lines are then streamed when `stream` is set. Other
    rows add them in float64 straight to the partials."""
    cdef real hi, lo
    if real is float:
        if acc != NULL or (dweight == NULL and dbias == NULL):
            split_center(mean, &hi, &lo)
            row_backward_f32(dy, x, dx, length, hi, lo, <float>rstd, <float>mean_g,
                             <float>k_coef, weight, acc if dweight != NULL else NULL,
                             acc + length + ACC_GAP if dbias != NULL else NULL, stream)
            if widen and dweight != NULL:
                widen_f32(acc, dweight, length)
            if widen and dbias != NULL:
                widen_f32(acc + length + ACC_GAP, dbias, length)
            return
    row_span_backward(dy, x, dx, length, mean, rstd, mean_g, k_coef, weight, dweight, dbias)


cdef inline bint widen_after(int64_t r, int64_t first_row, int64_t last_row) noexcept nogil:
    return (r - first_row) % WIDEN_ROWS == WIDEN_ROWS - 1 or r == last_row - 1


cdef void rows_task(const real* dy, const real* x, real* dx, Layout lay, int64_t first_row,
                    int64_t last_row, const real* mean, const real* rstd, const real* weight,
                    bint centered, double* row_coefs, double* dweight, double* dbias,
                    float* acc) noexcept nogil:
    """Rows of one piece, first_row..last_row-1 (one block) in order: each reduced, then
    passed over while in cache; dweight/dbias are the block's partials."""
    cdef int64_t r, offset, p0
    cdef double sums[2]
    cdef double m
    for r in range(first_row, last_row):
        offset = r * lay.length
        p0 = first_param(&lay, r)
        m = row_mean(mean, r)
        if dx != NULL and not lay.stream:
            prefetch_write(dx + offset, lay.length * sizeof(real))
        columns_grad_sums(dy + offset, x + offset, lay.length, m,
                          weight + p0 if weight != NULL else NULL, sums)
        backward_coefs(sums[0], sums[1], rstd[r], lay.length, centered,
                       &row_coefs[2 * r], &row_coefs[2 * r + 1])
        if r + 1 < last_row:
            # The next row comes in from memory while this one is passed over in cache.
            prefetch(dy + offset + lay.length, lay.length * sizeof(real))
            prefetch(x + offset + lay.length, lay.length * sizeof(real))
        columns_pass(dy + offset, x + offset, dx + offset if dx != NULL else NULL, lay.length,
                     m, rstd[r], row_coefs[2 * r], row_coefs[2 * r + 1],
                     weight + p0 if weight != NULL else NULL,
                     dweight + p0 if dweight != NULL else NULL,
                     dbias + p0 if dbias != NULL else NULL, acc,
                     widen_after(r, first_row, last_row), lay.stream)


cdef void tile_task(const real* dy, const real* x, real* dx, Layout lay, int64_t start,
                    int64_t width, int64_t first_row, int64_t last_row, const real* mean,
                    const real* rstd, const real* weight, const double* row_coefs,
                    double* dweight, double* dbias) noexcept nogil:
    """Long rows, already reduced (row_coefs): columns start..start+width-1 of rows
    first_row..last_row-1 in order: dx, and the rows' dweight/dbias shares added to
    these columns of the partials. float32 rows of one group go WIDEN_ROWS rows at a
    time, side by side: each column's shares of these rows are summed in float32 in
    registers and widened once (see _elementwise.h)."""
    cdef float hi[WIDEN_ROWS]
    cdef float lo[WIDEN_ROWS]
    cdef float scale[WIDEN_ROWS]
    cdef float mean_g[WIDEN_ROWS]
    cdef float k[WIDEN_ROWS]
    cdef int64_t r, r0, r1, offset, p
    if real is float:
        if lay.groups == 1:
            r0 = first_row
            while r0 < last_row:
                r1 = min(r0 + WIDEN_ROWS, last_row)
                for r in range(r0, r1):
                    split_center(row_mean(mean, r), &hi[r - r0], &lo[r - r0])
                    scale[r - r0] = <float>rstd[r]
                    mean_g[r - r0] = <float>row_coefs[2 * r]
                    k[r - r0] = <float>row_coefs[2 * r + 1]
                offset = r0 * lay.length + start
                rows_span_backward_f32(dy + offset, x + offset, dx + offset if dx != NULL else NULL,
                                     lay.length, <int>(r1 - r0), width, hi, lo, scale, mean_g,
                                     k, weight + start if weight != NULL else NULL,
                                     dweight + start if dweight != NULL else NULL,
                                     dbias + start if dbias != NULL else NULL)
                r0 = r1
            return
    for r in range(first_row, last_row):
        offset = r * lay.length + start
        p = first_param(&lay, r) + start
        row_span_backward(dy + offset, x + offset, dx + offset if dx != NULL else NULL, width,
                         row_mean(mean, r), rstd[r], row_coefs[2 * r], row_coefs[2 * r + 1],
                         weight + p if weight != NULL else NULL,
                         dweight + p if dweight != NULL else NULL,
                         dbias + p if dbias != NULL else NULL)


cdef int backward_column_params(const real* dy, const real* x, real* dx, Layout lay,
                          int64_t rows_per_block, int64_t n_blocks, const real* mean,
                          const real* rstd, const real* weight, bint centered,
                          double* dweight, double* dbias, double* row_coefs,
                          int n_threads) noexcept nogil:
    """Rows of one piece: a task per block of rows, each row reduced and passed over in
    cache. Longer rows (one block): in groups of rows, reduced in piece mode, then
    passed over by tasks of columns, which write dx and add the dweight/dbias shares."""
    cdef int64_t task, tile, tiles, first, last, rows_per_group
    cdef int64_t width = lay.length
    cdef float* accs = NULL
    cdef double* sums = NULL
    if real is float:
        if lay.pieces == 1 and lay.groups == 1 and (dweight != NULL or dbias != NULL):
            # float32 accumulators, one pair per thread, zero between tasks.
            accs = <float*>alloc_values(2 * (width + ACC_GAP), n_threads, sizeof(float), True)
            if accs == NULL:
                return BNCPU_ERR_NO_MEMORY
    rows_per_group = max(<int64_t>1, REREAD_BYTES // (lay.length * <int64_t>sizeof(real)))
    if lay.pieces > 1:
        sums = <double*>alloc_values(2 * min(rows_per_group, lay.rows), lay.pieces,
                                     sizeof(double), False)
        if sums == NULL:
            free(accs)
            return BNCPU_ERR_NO_MEMORY
    if lay.pieces == 1:
        for task in prange(n_blocks, schedule='static', num_threads=n_threads):
            rows_task(dy, x, dx, lay, task * rows_per_block,
                      min(lay.rows, (task + 1) * rows_per_block), mean, rstd, weight, centered,
                      row_coefs, dweight + task * lay.params if dweight != NULL else NULL,
                      dbias + task * lay.params if dbias != NULL else NULL,
                      accs + 2 * (width + ACC_GAP) * threadid() if accs != NULL else NULL)
    else:
        # Groups of about REREAD_BYTES per array: reduced in piece mode, then passed over
        # while still in cache (L3). Tiles narrow enough for 4 tasks per thread (a
        # column's sums do not depend on the tile it is in).
        tile = min(<int64_t>TILE, max(<int64_t>256, lay.length // (64 * n_threads) * 16))
        tiles = (lay.length + tile - 1) // tile
        first = 0
        while first < lay.rows:
            last = min(lay.rows, first + rows_per_group)
            pieces_coefs(dy, x, lay, first, last, mean, rstd, weight, centered, row_coefs,
                         NULL, sums, n_threads)
            for task in prange(tiles, schedule='static', num_threads=n_threads):
                tile_task(dy, x, dx, lay, task * tile, min(tile, lay.length - task * tile),
                          first, last, mean, rstd, weight, row_coefs, dweight, dbias)
            first = last
    free(accs)
    free(sums)
    return BNCPU_OK


# Channels of several values (s > 1; group and instance norm): a channel span's shares of
# dweight and dbias come with the reduction; the elementwise pass only writes dx.


cdef void backward_piece_task(const real* dy, const real* x, real* dx, Layout lay, int64_t task,
                              const real* mean, const real* rstd, const double* row_coefs,
                              const real* weight) noexcept nogil:
    """dx over piece task % pieces of row task // pieces; row_coefs holds (mean_g, k)."""
    cdef int64_t r = task // lay.pieces
    cdef int64_t offset = r * lay.length
    cdef int64_t p0 = first_param(&lay, r)
    piece_backward(dy + offset, x + offset, dx + offset, &lay, task % lay.pieces,
                   row_mean(mean, r), rstd[r], row_coefs[2 * r], row_coefs[2 * r + 1],
                   weight + p0 if weight != NULL else NULL)


cdef void backward_block(const real* dy, const real* x, real* dx, Layout lay, int64_t block,
                         int64_t rows_per_block, const real* mean, const real* rstd,
                         const real* weight, bint centered, double* dweight, double* dbias,
                         double* row_coefs) noexcept nogil:
    """Row mode: the rows of one block, each reduced, then passed over (while in cache
    if it is one piece)."""
    cdef int64_t r, q, offset, p0
    cdef double sums[2]
    cdef double sum_g, sum_g_xmu, m, rs
    cdef const real* w
    for r in range(block * rows_per_block, min(lay.rows, (block + 1) * rows_per_block)):
        offset = r * lay.length
        p0 = first_param(&lay, r)
        w = weight + p0 if weight != NULL else NULL
        m = row_mean(mean, r)
        rs = rstd[r]
        sum_g = 0
        sum_g_xmu = 0
        if dx != NULL and lay.pieces == 1:
            # dx's lines are fetched while the row is reduced, not when they are stored.
            prefetch_write(dx + offset, lay.length * sizeof(real))
        for q in range(lay.pieces):
            piece_grad_sums(dy + offset, x + offset, &lay, q, m, rs, w, sums, NULL,
                            block_partials(dweight, &lay, block, r),
                            block_partials(dbias, &lay, block, r))
            sum_g += sums[0]
            sum_g_xmu += sums[1]
        backward_coefs(sum_g, sum_g_xmu, rs, lay.length, centered,
                       &row_coefs[2 * r], &row_coefs[2 * r + 1])
        if dx != NULL:
            for q in range(lay.pieces):
                backward_piece_task(dy, x, dx, lay, r * lay.pieces + q, mean, rstd, row_coefs,
                                    weight)


cdef int backward_pieces(const real* dy, const real* x, real* dx, Layout lay,
                         int64_t rows_per_block, const real* mean, const real* rstd,
                         const real* weight, bint centered, double* dweight, double* dbias,
                         double* row_coefs, int n_threads) noexcept nogil:
    cdef int64_t task, r, span
    cdef int64_t n_spans = spans_per_row(&lay)
    cdef bint keep_spans = dweight != NULL or dbias != NULL
    cdef double* span_sums = NULL
    cdef double* sums = <double*>alloc_values(2 * lay.rows, lay.pieces, sizeof(double), False)
    if keep_spans:
        span_sums = <double*>alloc_values(2 * lay.rows, n_spans, sizeof(double), False)
    if sums == NULL or (keep_spans and span_sums == NULL):
        free(sums)
        free(span_sums)
        return BNCPU_ERR_NO_MEMORY
    pieces_coefs(dy, x, lay, 0, lay.rows, mean, rstd, weight, centered, row_coefs, span_sums,
                 sums, n_threads)
    if keep_spans:
        # The spans' shares of dweight/dbias, in the order row mode adds them.
        for r in range(lay.rows):
            for span in range(n_spans):
                add_channel_grads(block_partials(dweight, &lay, r // rows_per_block, r),
                                  block_partials(dbias, &lay, r // rows_per_block, r),
                                  span_channel(&lay, span),
                                  span_sums[2 * (r * n_spans + span)],
                                  span_sums[2 * (r * n_spans + span) + 1], rstd[r])
    if dx != NULL:
        for task in prange(lay.rows * lay.pieces, schedule='static', num_threads=n_threads):
            backward_piece_task(dy, x, dx, lay, task, mean, rstd, row_coefs, weight)
    free(sums)
    free(span_sums)
    return BNCPU_OK


cdef void merge_blocks(double* partials, int64_t n_blocks, int64_t params,
                       real* result) noexcept nogil:
    """result[p] = Σ over blocks of partials[block·params + p], blocks in order (added
    into the first block's array, a block at a time: a loop over p that vectorizes,
    not a chain of dependent additions per p)."""
    cdef int64_t p, block
    for block in range(1, n_blocks):
        for p in range(params):
            partials[p] += partials[block * params + p]
    for p in range(params):
        result[p] = <real>partials[p]


cdef int check_backward(const real* dy, const real* x, real* dx, int64_t n, int64_t c,
                        int64_t s, int64_t groups, const real* mean, const real* rstd,
                        const real* weight, bint centered, real* dweight,
                        real* dbias) noexcept nogil:
    """The arguments of a backward, channels first or last: a status."""
    cdef int status = check_groups(n, c, s, groups)
    cdef Region outputs[3]
    cdef Region inputs[5]
    if status != BNCPU_OK:
        return status
    if n * c * s > 0 and (dy == NULL or x == NULL or rstd == NULL or (centered and mean == NULL)):
        return BNCPU_ERR_NULL_POINTER
    outputs[0] = region(dx, n * c * s, sizeof(real), True)
    outputs[1] = region(dweight, c, sizeof(real), False)
    outputs[2] = region(dbias, c, sizeof(real), False)
    inputs[0] = region(dy, n * c * s, sizeof(real), True)
    inputs[1] = region(x, n * c * s, sizeof(real), True)
    inputs[2] = region(mean if centered else NULL, n * groups, sizeof(real), False)
    inputs[3] = region(rstd, n * groups, sizeof(real), False)
    inputs[4] = region(weight, c, sizeof(real), False)
    return check_aliasing(outputs, 3, inputs, 5)


cdef int rows_backward(const real* dy, const real* x, real* dx, int64_t n, int64_t c, int64_t s,
                       int64_t groups, const real* mean, const real* rstd, const real* weight,
                       bint centered, real* dweight, real* dbias) noexcept nogil:
    cdef int status = check_backward(dy, x, dx, n, c, s, groups, mean, rstd, weight, centered,
                                     dweight, dbias)
    cdef int n_threads
    cdef int64_t p, block, n_blocks, rows_per_block
    cdef double* partial_dweight = NULL
    cdef double* partial_dbias = NULL
    cdef double* row_coefs
    cdef Layout lay
    if status != BNCPU_OK:
        return status
    if n * c * s == 0 or (dx == NULL and dweight == NULL and dbias == NULL):
        # No values (the parameter gradients are empty sums), or nothing asked for.
        for p in range(c if dweight != NULL or dbias != NULL else 0):
            if dweight != NULL:
                dweight[p] = 0
            if dbias != NULL:
                dbias[p] = 0
        return BNCPU_OK
    lay = make_layout(n, c, s, groups)
    # dx's streaming stores: the one-piece rows of layer and RMS norm (rows_task).
    lay.stream = dx != NULL and use_streaming(dx, dy, x, n * c * s * sizeof(real))
    n_blocks = row_blocks(&lay, &rows_per_block)
    row_coefs = <double*>alloc_values(2, lay.rows, sizeof(double), False)
    if dweight != NULL:
        partial_dweight = <double*>alloc_values(n_blocks, lay.params, sizeof(double), True)
    if dbias != NULL:
        partial_dbias = <double*>alloc_values(n_blocks, lay.params, sizeof(double), True)
    if (row_coefs == NULL or (dweight != NULL and partial_dweight == NULL)
            or (dbias != NULL and partial_dbias == NULL)):
        free(row_coefs)
        free(partial_dweight)
        free(partial_dbias)
        return BNCPU_ERR_NO_MEMORY
    n_threads = threads_begin(n * c * s)
    if lay.seg == 1:
        status = backward_column_params(dy, x, dx, lay, rows_per_block, n_blocks, mean, rstd, weight,
                                  centered, partial_dweight, partial_dbias, row_coefs, n_threads)
    elif n_threads > 1 and (lay.pieces > 1
                            or n * c * s * <int64_t>sizeof(real) <= CACHED_BYTES):
        # Rows of several pieces do not stay in cache between the two passes in either
        # mode; piece mode spreads them better over the threads. Small inputs stay in
        # cache (L3) in either mode; there, two passes over the whole input stream
        # better than a reduction and a pass per row.
        status = backward_pieces(dy, x, dx, lay, rows_per_block, mean, rstd, weight, centered,
                                 partial_dweight, partial_dbias, row_coefs, n_threads)
    elif n_threads > 1:
        for block in prange(n_blocks, schedule='static', num_threads=n_threads):
            backward_block(dy, x, dx, lay, block, rows_per_block, mean, rstd, weight, centered,
                           partial_dweight, partial_dbias, row_coefs)
    else:
        for block in range(n_blocks):
            backward_block(dy, x, dx, lay, block, rows_per_block, mean, rstd, weight, centered,
                           partial_dweight, partial_dbias, row_coefs)
    threads_end(n_threads)
    if status == BNCPU_OK:
        if dweight != NULL:
            merge_blocks(partial_dweight, n_blocks, lay.params, dweight)
        if dbias != NULL:
            merge_blocks(partial_dbias, n_blocks, lay.params, dbias)
    free(row_coefs)
    free(partial_dweight)
    free(partial_dbias)
    return status


# --------------------------------------------------------------------------------
# The C API's entry points (signatures of include/bncpu.h)
# --------------------------------------------------------------------------------
cdef int layer_norm_forward(const real* x, real* y, int64_t rows, int64_t d, const real* weight,
                            const real* bias, double eps, real* save_mean,
                            real* save_rstd) noexcept nogil:
    return rows_forward(x, y, rows, d, 1, 1, weight, bias, eps, True, save_mean, save_rstd)


cdef int layer_norm_backward(const real* dy, const real* x, real* dx, int64_t rows, int64_t d,
                             const real* mean, const real* rstd, const real* weight,
                             real* dweight, real* dbias) noexcept nogil:
    return rows_backward(dy, x, dx, rows, d, 1, 1, mean, rstd, weight, True, dweight, dbias)


cdef int group_norm_forward(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                            int64_t groups, const real* weight, const real* bias, double eps,
                            real* save_mean, real* save_rstd) noexcept nogil:
    return rows_forward(x, y, n, c, s, groups, weight, bias, eps, True, save_mean, save_rstd)


cdef int group_norm_backward(const real* dy, const real* x, real* dx, int64_t n, int64_t c,
                             int64_t s, int64_t groups, const real* mean, const real* rstd,
                             const real* weight, real* dweight, real* dbias) noexcept nogil:
    return rows_backward(dy, x, dx, n, c, s, groups, mean, rstd, weight, True, dweight, dbias)


cdef int rms_norm_forward(const real* x, real* y, int64_t rows, int64_t d, const real* weight,
                          double eps, real* save_rstd) noexcept nogil:
    return rows_forward(x, y, rows, d, 1, 1, weight, NULL, eps, False, NULL, save_rstd)


cdef int rms_norm_backward(const real* dy, const real* x, real* dx, int64_t rows, int64_t d,
                           const real* rstd, const real* weight, real* dweight) noexcept nogil:
    return rows_backward(dy, x, dx, rows, d, 1, 1, NULL, rstd, weight, False, dweight, NULL)


# Group norm on channels-last (n, s, c) data.
include "_gn_last.pxi"

# The C API: this module's entries of the bncpu_api table (generated from the manifest).
include "_fill_row_norm.pxi"
