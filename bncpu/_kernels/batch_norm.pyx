"""Batch-norm kernels on C-contiguous (N, C, S) buffers, float32 or float64.

Per channel j over its M = N·S values:
    mean = Σx / M,  var = Σ(x - mean)² / M (biased),  invstd = 1/√(var + eps)
    y = (x - mean)·invstd·weight + bias
Backward (training), x̂ = (x - mean)·invstd:
    dbias = Σdy,  dweight = Σdy·x̂,  dx = weight·invstd·(dy - Σdy/M - x̂·Σ(dy·x̂)/M)

How the work is cut (the same cut for any number of threads, so results are bitwise
identical):
* A channel is the sequence of its N rows x[i, j, :], each cut into pieces of at
  most PIECE values. Statistics fold the pieces in (row, piece) order; each piece is
  summarized on its own (see _primitives.span_stats).
* Channel mode (many channels): one thread owns a channel, computes its statistics
  and, while the channel is still in cache, normalizes it: one read from memory, one
  write. A task takes a few adjacent channels and walks them row by row, so memory is
  read in runs of at least RUN_BYTES (a channel's rows lie C·S values apart, and
  reading them one channel at a time costs twice as much on (32, 64, 56, 56)): the
  statistics and training forward with long rows, and the backward.
* Outputs over STREAM_MIN_BYTES that are not an input are written with streaming
  stores (see _elementwise.h): the pass then moves two arrays' worth of bytes, not three.
* Split mode (fewer channels than threads, e.g. (4, 1, 512, 512)): the pieces of all
  channels are spread over the threads, the per-piece partials are merged per
  channel in (row, piece) order, then a second parallel pass normalizes.
* Column mode (short rows, S <= SHORT_ROW, e.g. (N, C) input or 8x8 images): the
  buffer is seen as an (N, C·S) matrix, channel j owning columns j·S..j·S+S, and cut
  into tiles of whole channels, about TILE_VALUES values each (see tiles_of), read row
  by row along contiguous memory. Every tile is summarized on its own (statistics
  two-pass from cache, or gradient sums), column by column and then per channel; the
  tiles of a channel are merged in row order, all channels at once. The elementwise
  passes run along the matrix rows too, with coefficients repeated per column. (Reading
  a channel's short rows one by one, or a strip of 64 channels of an (N, C) matrix,
  reads a few hundred bytes every few kilobytes: too little for the prefetcher.)

Every kernel checks its arguments first and returns a bncpu_status; nothing is
written unless the arguments are valid.
"""
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from cpython.pycapsule cimport PyCapsule_GetPointer
cimport numpy as cnp

from bncpu._threads cimport threads_begin, threads_end
from bncpu._kernels._common cimport (
    BNCPU_OK, BNCPU_ERR_NULL_POINTER, BNCPU_ERR_BAD_SIZE, BNCPU_ERR_ONE_VALUE,
    BNCPU_ERR_ALIASED_STATS, BNCPU_ERR_NO_MEMORY,
    check_sizes, check_eps, check_momentum, data_or_null, is_float32)
from bncpu._kernels._primitives cimport (
    real, LANES, STATS_BLOCK, span_stats, merge_stats, sum_dy_xmu_span, split_center,
    zero_lanes, sum_lanes, add_span, add_dev_span, finish_dev, add_dy_xmu_span,
    finish_dy_xmu, f32_add_column_sums, f32_add_column_dev_sums, f32_add_column_grad_sums,
    affine_span, scale_span, backward_span, use_streaming)

cnp.import_array()

cdef enum:
    PIECE = 65536          # values per piece of a row (a unit of parallel work)
    SPLIT_MIN_S = 4096     # split mode only when rows are at least this long
    SHORT_ROW = 224        # rows up to this long: column mode (S = 256 measured slower)
    PASS_SHORT_ROW = 64    # rows shorter than this: elementwise passes along matrix rows,
    COLUMN_COEFS_MAX = 8192   # ... when C·S is at most this (the coefficients, repeated
                              # per column, then stay in L2 cache)
    COLUMN_CHUNK = 512     # column mode: matrix columns per tile, at most
    TILE_VALUES = 32768    # column mode: values per tile, about
    PASS_VALUES = 65536    # column mode: values per task of the elementwise passes, about
    CHANNEL_RUN = 16       # channel mode, long rows: adjacent channels per task, at most
    RUN_BYTES = 65536      # ... enough of them to read runs of this many bytes

# Per-channel coefficients of the elementwise passes, CHANNEL_COEFS rows of c values:
#   forward:  y  = ((x - hi) - lo)·scale + offset
#   backward: dx = (dy - offset - ((x - hi) - lo)·k)·scale
cdef enum:
    COEF_HI = 0
    COEF_LO = 1
    COEF_SCALE = 2
    COEF_OFFSET = 3
    COEF_K = 4
    CHANNEL_COEFS = 5

cdef enum Pass:
    PASS_AFFINE
    PASS_BACKWARD
    PASS_SCALE


# --------------------------------------------------------------------------------
# Work layout helpers
# --------------------------------------------------------------------------------
cdef inline int64_t pieces_per_row(int64_t s) noexcept nogil:
    return (s + PIECE - 1) // PIECE if s > 0 else 0


cdef inline int64_t channel_run(int64_t c, int64_t s, size_t itemsize, int n_threads) noexcept nogil:
    """Adjacent channels per task in channel mode: runs of RUN_BYTES, at most
    CHANNEL_RUN channels, and enough tasks to keep every thread busy."""
    cdef int64_t run = (RUN_BYTES + s * itemsize - 1) // (s * itemsize)
    run = min(run, <int64_t>CHANNEL_RUN)
    run = min(run, max(<int64_t>1, c // (2 * n_threads)))
    return max(run, <int64_t>1)


cdef inline bint use_split_mode(int64_t c, int64_t s, int n_threads) noexcept nogil:
    return n_threads > 1 and s >= SPLIT_MIN_S and c < 2 * n_threads


cdef inline void piece_bounds(int64_t task, int64_t n, int64_t c, int64_t s,
                              int64_t* channel, int64_t* offset, int64_t* length) noexcept nogil:
    """Task t covers piece p of row i of channel j, t = (j·N + i)·P + p."""
    cdef int64_t per_row = pieces_per_row(s)
    cdef int64_t p = task % per_row
    cdef int64_t i = (task // per_row) % n
    channel[0] = task // (per_row * n)
    offset[0] = (i * c + channel[0]) * s + p * PIECE
    length[0] = min(<int64_t>PIECE, s - p * PIECE)


cdef void piece_stats_task(const real* x, int64_t task, int64_t n, int64_t c, int64_t s,
                           double* partials) noexcept nogil:
    """Split mode: (count, mean, M2) of one piece into partials[3·task:3·task+3]."""
    cdef int64_t j, offset, length
    piece_bounds(task, n, c, s, &j, &offset, &length)
    partials[3 * task] = 0
    partials[3 * task + 1] = 0
    partials[3 * task + 2] = 0
    span_stats(x + offset, length, &partials[3 * task], &partials[3 * task + 1], &partials[3 * task + 2])


cdef void piece_grad_sums_task(const real* dy, const real* x, int64_t task, int64_t n, int64_t c,
                               int64_t s, const double* mean, double* partials) noexcept nogil:
    """Split mode: Σdy and Σdy·(x - mean) of one piece into partials[2·task:2·task+2]."""
    cdef int64_t j, offset, length
    piece_bounds(task, n, c, s, &j, &offset, &length)
    partials[2 * task] = 0
    partials[2 * task + 1] = 0
    sum_dy_xmu_span(dy + offset, x + offset, length, mean[j], &partials[2 * task], &partials[2 * task + 1])


cdef inline void fold_row_pieces(const real* row, int64_t s, double* count, double* mean,
                                 double* m2) noexcept nogil:
    """Merge the statistics of one channel row into (count, mean, m2), one piece (split
    mode's unit of work) at a time, each piece summarized on its own."""
    cdef int64_t start, start_index
    cdef double piece_count, piece_mean, piece_m2
    for start_index in range((s + PIECE - 1) // PIECE):
        start = start_index * PIECE
        piece_count = 0
        piece_mean = 0
        piece_m2 = 0
        span_stats(row + start, min(<int64_t>PIECE, s - start), &piece_count, &piece_mean, &piece_m2)
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
    cdef double count = 0, block_mean, block_m2
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
        finish_dev(<double>((r1 - r0) * s), center, sum_lanes(lanes), sum_lanes(sq_lanes),
                   &block_mean, &block_m2)
        merge_stats(&count, mean, m2, <double>((r1 - r0) * s), block_mean, block_m2)


cdef inline void row_grad_sums(const real* dy, const real* x, int64_t s, double mean,
                               real center, double* dy_lanes, double* dy_xmu_lanes,
                               double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    """One channel row's share of Σdy and Σdy·(x - mean). Rows that split mode cuts
    (s >= SPLIT_MIN_S) are summed per piece, each piece added to sum_dy/sum_dy_xmu as
    split mode does; shorter rows add into the channel's lanes (finished by
    finish_grad_sums), which thus run across all its rows."""
    cdef int64_t start, start_index
    if s >= SPLIT_MIN_S:
        for start_index in range((s + PIECE - 1) // PIECE):
            start = start_index * PIECE
            sum_dy_xmu_span(dy + start, x + start, min(<int64_t>PIECE, s - start), mean,
                            sum_dy, sum_dy_xmu)
    else:
        add_dy_xmu_span(dy_lanes, dy_xmu_lanes, dy, x, s, center)


cdef inline void finish_grad_sums(int64_t s, double mean, real center, const double* dy_lanes,
                                  const double* dy_xmu_lanes, double* sum_dy,
                                  double* sum_dy_xmu) noexcept nogil:
    if s < SPLIT_MIN_S:
        sum_dy[0] = sum_lanes(dy_lanes)
        sum_dy_xmu[0] = finish_dy_xmu(sum_dy[0], sum_lanes(dy_xmu_lanes), mean, center)


cdef void channel_grad_sums(const real* dy, const real* x, int64_t n, int64_t c, int64_t s,
                            int64_t j0, int64_t j1, const double* mean,
                            double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    """Σdy and Σdy·(x - mean) of the adjacent channels j0..j1 (at most CHANNEL_RUN),
    walked row by row: memory is read in runs of (j1 - j0)·S values. Each channel adds
    its rows in row order, so the sums do not depend on the run."""
    cdef double dy_lanes[CHANNEL_RUN * LANES]
    cdef double dy_xmu_lanes[CHANNEL_RUN * LANES]
    cdef real center[CHANNEL_RUN]
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
            row_grad_sums(dy + offset, x + offset, s, mean[j], center[j - j0],
                          dy_lanes + (j - j0) * LANES, dy_xmu_lanes + (j - j0) * LANES,
                          &sum_dy[j], &sum_dy_xmu[j])
    for j in range(j0, j1):
        finish_grad_sums(s, mean[j], center[j - j0], dy_lanes + (j - j0) * LANES,
                         dy_xmu_lanes + (j - j0) * LANES, &sum_dy[j], &sum_dy_xmu[j])


cdef inline bint use_column_mode(int64_t s) noexcept nogil:
    return s <= SHORT_ROW


cdef inline bint use_column_pass(int64_t c, int64_t s) noexcept nogil:
    """Elementwise passes along the (N, C·S) matrix rows, coefficients per column (S = 1:
    always). Measured against passes over channel rows: faster for S = 9 and 16, the
    same for S = 64, slower for S = 100 (five values read per value written). (Passes
    tile by tile, with the coefficients of a tile's channels, were measured too: on
    (32, 2048, 7, 7) 2x slower than channel rows, each thread reading 2 KB of every
    400 KB instead of one contiguous half of the buffer.)"""
    return s == 1 or (s < PASS_SHORT_ROW and c * s <= COLUMN_COEFS_MAX)


cdef struct Tiles:
    # Column mode's cut of an (N, C, S) buffer seen as an (N, C·S) matrix: tile
    # t = block·n_chunks + chunk covers matrix rows block·rows.. and channels
    # chunk·width.. (the tiles of a row block are adjacent tasks).
    int64_t n, c, s, rows, n_blocks, width, n_chunks


cdef inline Tiles tiles_of(int64_t n, int64_t c, int64_t s) noexcept nogil:
    """The tiles of (N, C, S), S <= SHORT_ROW, from the shape alone: whole channels,
    at most COLUMN_CHUNK columns; rows a multiple of 8 (the float32 runs)."""
    cdef Tiles t
    t.n = n
    t.c = c
    t.s = s
    t.width = max(<int64_t>1, min(c, COLUMN_CHUNK // s))
    t.n_chunks = (c + t.width - 1) // t.width
    t.rows = TILE_VALUES // (t.width * s)
    t.rows -= t.rows % 8
    t.n_blocks = (n + t.rows - 1) // t.rows
    return t


cdef inline int64_t tile_block(const Tiles* t, int64_t task) noexcept nogil:
    return task // t.n_chunks


cdef inline int64_t tile_j0(const Tiles* t, int64_t task) noexcept nogil:
    return (task % t.n_chunks) * t.width


cdef inline int64_t tile_row_count(const Tiles* t, int64_t block) noexcept nogil:
    return min(t.rows, t.n - block * t.rows)


cdef inline int64_t tile_width(const Tiles* t, int64_t task) noexcept nogil:
    return min(t.width, t.c - tile_j0(t, task))


cdef inline double add_columns(const double* sums, int64_t s) noexcept nogil:
    """A channel's total from its s column sums, in column order."""
    cdef double total = 0
    cdef int64_t k
    for k in range(s):
        total += sums[k]
    return total


cdef void tile_stats(const real* x, const Tiles* t, int64_t r0, int64_t rows, int64_t j0,
                     int64_t width, double* mean, double* m2) noexcept nogil:
    """Column mode: mean[jj] and M2[jj] of channel j0 + jj over matrix rows r0..r0+rows,
    two-pass (the second pass reads the tile from cache): column sums, a center per
    channel, then the columns' deviations from it, added per channel."""
    cdef double col_sum[COLUMN_CHUNK]
    cdef double col_sq[COLUMN_CHUNK]
    cdef real center[COLUMN_CHUNK]
    cdef int64_t s = t.s, ld = t.c * t.s, cols = width * t.s
    cdef const real* tile = x + r0 * ld + j0 * s
    cdef const real* row
    cdef double d, count = <double>(rows * s)
    cdef int64_t i, jj, k
    for k in range(cols):
        col_sum[k] = 0
        col_sq[k] = 0
    if real is float:
        f32_add_column_sums(col_sum, tile, rows, ld, cols)
    else:
        for i in range(rows):
            row = tile + i * ld
            for k in range(cols):
                col_sum[k] += row[k]
    # float32: a float32 center near the mean, corrected by finish_dev (as add_dev_span).
    # (S == 1 apart: a loop over the channels that vectorizes, divisions included.)
    if s == 1:
        for jj in range(width):
            center[jj] = <real>(col_sum[jj] / count)
            col_sum[jj] = 0
    else:
        for jj in range(width):
            center[jj * s] = <real>(add_columns(col_sum + jj * s, s) / count)
            for k in range(jj * s + 1, jj * s + s):
                center[k] = center[jj * s]
            for k in range(jj * s, jj * s + s):
                col_sum[k] = 0
    if real is float:
        f32_add_column_dev_sums(col_sum, col_sq, tile, rows, ld, cols, center)
    else:
        for i in range(rows):
            row = tile + i * ld
            for k in range(cols):
                d = row[k] - center[k]
                col_sq[k] += d * d
    if s == 1:
        for jj in range(width):
            finish_dev(count, center[jj], col_sum[jj], col_sq[jj], &mean[jj], &m2[jj])
    else:
        for jj in range(width):
            finish_dev(count, center[jj * s], add_columns(col_sum + jj * s, s),
                       add_columns(col_sq + jj * s, s), &mean[jj], &m2[jj])


cdef void tile_grad_sums(const real* dy, const real* x, const Tiles* t, int64_t r0, int64_t rows,
                         int64_t j0, int64_t width, const real* center,
                         double* sum_dy, double* sum_dy_dev) noexcept nogil:
    """Column mode: Σdy and Σdy·(x - center) of channel j0 + jj over matrix rows
    r0..r0+rows, center[k] (per column) its channel's mean rounded to the data's
    precision (see add_dy_xmu_span)."""
    cdef double col_dy[COLUMN_CHUNK]
    cdef double col_dev[COLUMN_CHUNK]
    cdef int64_t s = t.s, ld = t.c * t.s, cols = width * t.s
    cdef int64_t i, jj, k, offset = r0 * ld + j0 * s
    cdef const real* dy_row
    cdef const real* x_row
    for k in range(cols):
        col_dy[k] = 0
        col_dev[k] = 0
    if real is float:
        f32_add_column_grad_sums(col_dy, col_dev, dy + offset, x + offset, rows, ld, cols,
                                 center)
    else:
        for i in range(rows):
            dy_row = dy + offset + i * ld
            x_row = x + offset + i * ld
            # One sum per loop: gcc vectorizes these, not a loop updating both arrays.
            for k in range(cols):
                col_dy[k] += dy_row[k]
            for k in range(cols):
                col_dev[k] += dy_row[k] * (x_row[k] - center[k])
    for jj in range(width):
        sum_dy[jj] = col_dy[jj] if s == 1 else add_columns(col_dy + jj * s, s)
        sum_dy_dev[jj] = col_dev[jj] if s == 1 else add_columns(col_dev + jj * s, s)


cdef void stats_tile_task(const real* x, const Tiles* t, int64_t task,
                          double* partials) noexcept nogil:
    """Tile `task`'s mean and M2 into row `block` of the two (n_blocks, C) partials."""
    cdef int64_t block = tile_block(t, task), j0 = tile_j0(t, task)
    tile_stats(x, t, block * t.rows, tile_row_count(t, block), j0, tile_width(t, task),
               partials + block * t.c + j0, partials + (t.n_blocks + block) * t.c + j0)


cdef void grad_sums_tile_task(const real* dy, const real* x, const Tiles* t, int64_t task,
                              const real* center, double* partials, real* scaled,
                              const real* column_coefs) noexcept nogil:
    """Tile `task`'s Σdy and Σdy·(x - center) into row `block` of the two partials
    (center per column); and if `scaled` is given, its scaled = dy·scale (PASS_SCALE,
    coefficients per column) while dy is in cache."""
    cdef int64_t block = tile_block(t, task), j0 = tile_j0(t, task)
    cdef int64_t width = tile_width(t, task), rows = tile_row_count(t, block)
    tile_grad_sums(dy, x, t, block * t.rows, rows, j0, width, center + j0 * t.s,
                   partials + block * t.c + j0, partials + (t.n_blocks + block) * t.c + j0)
    if scaled != NULL:
        pass_columns(PASS_SCALE, dy, NULL, scaled, t.c * t.s, block * t.rows,
                     block * t.rows + rows, j0 * t.s, (j0 + width) * t.s, column_coefs)


cdef void merge_tile_stats(const Tiles* t, const double* tile_mean, const double* tile_m2,
                           double* mean, double* m2) noexcept nogil:
    """Column mode: merge_stats of the tiles' partials in row order, all channels at
    once (a row block's count is the same for every channel, so the loop over the
    channels vectorizes; the arithmetic is merge_stats')."""
    cdef int64_t block, j, c = t.c
    cdef double count, block_count, total, mean_weight, m2_weight, delta
    for j in range(c):
        mean[j] = tile_mean[j]
        m2[j] = tile_m2[j]
    count = <double>(tile_row_count(t, 0) * t.s)
    for block in range(1, t.n_blocks):
        block_count = <double>(tile_row_count(t, block) * t.s)
        total = count + block_count
        mean_weight = block_count / total
        m2_weight = count * block_count / total
        for j in range(c):
            delta = tile_mean[block * c + j] - mean[j]
            mean[j] += delta * mean_weight
            m2[j] += tile_m2[block * c + j] + delta * delta * m2_weight
        count = total


# --------------------------------------------------------------------------------
# Elementwise passes with per-channel coefficients
# --------------------------------------------------------------------------------
cdef void pass_span(Pass kind, const real* a, const real* b, real* out, int64_t length,
                    const real* coefs, int64_t c, int64_t j, bint stream) noexcept nogil:
    if kind == PASS_AFFINE:
        affine_span(a, out, length, coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                    coefs[COEF_SCALE * c + j], coefs[COEF_OFFSET * c + j], stream)
    elif kind == PASS_BACKWARD:
        backward_span(a, b, out, length, coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                      coefs[COEF_K * c + j], coefs[COEF_OFFSET * c + j], coefs[COEF_SCALE * c + j],
                      stream)
    else:
        scale_span(a, out, length, coefs[COEF_SCALE * c + j], stream)


cdef void pass_piece_task(Pass kind, const real* a, const real* b, real* out, int64_t task,
                          int64_t c, int64_t s, int64_t per_row, const real* coefs,
                          bint stream) noexcept nogil:
    """Piece p of segment t = i·C + j (memory order), task = t·per_row + p."""
    cdef int64_t segment = task // per_row if per_row > 1 else task
    cdef int64_t start = (task - segment * per_row) * PIECE
    cdef int64_t offset = segment * s + start
    pass_span(kind, a + offset, b + offset if b != NULL else NULL, out + offset,
              min(<int64_t>PIECE, s - start), coefs, c, segment % c, stream)


cdef void pass_columns(Pass kind, const real* a, const real* b, real* out, int64_t c,
                       int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                       const real* coefs) noexcept nogil:
    """Column mode: rows r0..r1, columns j0..j1 of an (N, c) matrix (c: C, or C·S with
    coefficients repeated per column, see column_coefs), vectorized along the row."""
    cdef const real* hi = coefs + COEF_HI * c
    cdef const real* lo = coefs + COEF_LO * c
    cdef const real* scale = coefs + COEF_SCALE * c
    cdef const real* offset = coefs + COEF_OFFSET * c
    cdef const real* k = coefs + COEF_K * c
    cdef int64_t i, j, row
    for i in range(r0, r1):
        row = i * c
        if kind == PASS_AFFINE:
            for j in range(j0, j1):
                out[row + j] = ((a[row + j] - hi[j]) - lo[j]) * scale[j] + offset[j]
        elif kind == PASS_BACKWARD:
            for j in range(j0, j1):
                out[row + j] = (a[row + j] - offset[j] - ((b[row + j] - hi[j]) - lo[j]) * k[j]) * scale[j]
        else:
            for j in range(j0, j1):
                out[row + j] = a[row + j] * scale[j]


cdef real* column_coefs(const real* coefs, int64_t c, int64_t s) noexcept nogil:
    """Column mode: the coefficients of channel j repeated for its s columns, as
    pass_columns takes them: coefs itself when s == 1, else a new array (NULL when out
    of memory)."""
    cdef real* wide
    cdef int64_t row, j, k
    if s == 1:
        return <real*>coefs
    wide = <real*>malloc(CHANNEL_COEFS * c * s * sizeof(real))
    if wide != NULL:
        for row in range(CHANNEL_COEFS):
            for j in range(c):
                for k in range(s):
                    wide[(row * c + j) * s + k] = coefs[row * c + j]
    return wide


cdef void run_pass(Pass kind, const real* a, const real* b, real* out,
                   int64_t n, int64_t c, int64_t s, const real* coefs, int n_threads) noexcept nogil:
    """out = pass(a, b) over the whole (N, C, S) buffer, in parallel."""
    cdef int64_t task, n_tasks, r0, per_row, rows, cols = c * s
    cdef bint stream = use_streaming(out, a, b, n * c * s * sizeof(real))
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
                pass_columns(kind, a, b, out, cols, r0, min(r0 + rows, n), 0, cols, by_column)
        else:
            pass_columns(kind, a, b, out, cols, 0, n, 0, cols, by_column)
        if by_column != coefs:
            free(by_column)
        return
    # Channel rows (and column mode's fallback when out of memory), piece by piece.
    per_row = pieces_per_row(s)
    n_tasks = c * n * per_row
    if n_threads > 1:
        for task in prange(n_tasks, schedule='static', num_threads=n_threads):
            pass_piece_task(kind, a, b, out, task, c, s, per_row, coefs, stream)
    else:
        for task in range(n_tasks):
            pass_piece_task(kind, a, b, out, task, c, s, per_row, coefs, stream)


cdef inline void set_affine_coefs(real* coefs, int64_t c, int64_t j, double mean, double invstd,
                                  const real* weight, const real* bias) noexcept nogil:
    """y = (x - mean)·invstd·w + b as ((x - hi) - lo)·scale + offset."""
    cdef double w = weight[j] if weight != NULL else 1.0
    split_center(mean, &coefs[COEF_HI * c + j], &coefs[COEF_LO * c + j])
    coefs[COEF_SCALE * c + j] = <real>(invstd * w)
    coefs[COEF_OFFSET * c + j] = bias[j] if bias != NULL else 0


cdef inline void set_backward_coefs(real* coefs, int64_t c, int64_t j, double mean, double invstd,
                                    const real* weight, double sum_dy, double sum_dy_xmu,
                                    double count) noexcept nogil:
    """dx = w·invstd·(dy - Σdy/M - (x - mean)·invstd²·Σdy(x - mean)/M)."""
    cdef double w = weight[j] if weight != NULL else 1.0
    split_center(mean, &coefs[COEF_HI * c + j], &coefs[COEF_LO * c + j])
    coefs[COEF_SCALE * c + j] = <real>(w * invstd)
    coefs[COEF_OFFSET * c + j] = <real>(sum_dy / count)
    coefs[COEF_K * c + j] = <real>(sum_dy_xmu / count * invstd * invstd)


cdef inline double invstd_of(double var, double eps) noexcept nogil:
    return 1.0 / sqrt(var + eps)


cdef inline void update_running(real* running_mean, real* running_var, int64_t j,
                                double mean, double var, double count,
                                double momentum) noexcept nogil:
    """PyTorch's convention: the running variance is the unbiased one."""
    if running_mean == NULL or count == 0:
        return
    running_mean[j] = <real>((1 - momentum) * running_mean[j] + momentum * mean)
    running_var[j] = <real>((1 - momentum) * running_var[j]
                            + momentum * var * (count / (count - 1)))


# --------------------------------------------------------------------------------
# Statistics of all channels (shared by the fused and split-phase entry points)
# --------------------------------------------------------------------------------
cdef int all_channel_stats(const real* x, int64_t n, int64_t c, int64_t s, int n_threads,
                           double* mean, double* m2) noexcept nogil:
    """Per-channel mean and M2 of x in any mode; returns a status (allocation)."""
    cdef int64_t j, task, n_tasks, chunk, t, run
    cdef Tiles tiles
    cdef double count
    cdef double* partials
    if use_column_mode(s):
        tiles = tiles_of(n, c, s)
        partials = <double*>malloc(2 * tiles.n_blocks * c * sizeof(double))
        if partials == NULL:
            return BNCPU_ERR_NO_MEMORY
        for task in prange(tiles.n_blocks * tiles.n_chunks, schedule='static',
                           num_threads=n_threads):
            stats_tile_task(x, &tiles, task, partials)
        merge_tile_stats(&tiles, partials, partials + tiles.n_blocks * c, mean, m2)
        free(partials)
    elif use_split_mode(c, s, n_threads):
        n_tasks = c * n * pieces_per_row(s)
        partials = <double*>malloc(3 * n_tasks * sizeof(double) + 1)
        if partials == NULL:
            return BNCPU_ERR_NO_MEMORY
        for task in prange(n_tasks, schedule='static', num_threads=n_threads):
            piece_stats_task(x, task, n, c, s, partials)
        n_tasks = n * pieces_per_row(s)
        for j in range(c):
            count = 0
            mean[j] = 0
            m2[j] = 0
            for t in range(j * n_tasks, (j + 1) * n_tasks):
                merge_stats(&count, &mean[j], &m2[j], partials[3 * t], partials[3 * t + 1],
                            partials[3 * t + 2])
        free(partials)
    elif s >= STATS_BLOCK:
        run = channel_run(c, s, sizeof(real), n_threads)
        for chunk in prange((c + run - 1) // run, schedule='static', num_threads=n_threads):
            channel_run_stats(x, n, c, s, chunk * run, min(chunk * run + run, c), mean, m2)
    else:
        for j in prange(c, schedule='static', num_threads=n_threads):
            channel_stats(x, n, c, s, j, &mean[j], &m2[j])
    return BNCPU_OK


cdef int all_channel_grad_sums(const real* dy, const real* x, int64_t n, int64_t c, int64_t s,
                               const double* mean, int n_threads,
                               double* sum_dy, double* sum_dy_xmu,
                               real* scaled=NULL, const real* coefs=NULL) noexcept nogil:
    """Per-channel Σdy and Σdy·(x - mean) in any mode; returns a status.

    Column mode only: if `scaled` is given, also scaled = dy·scale (the evaluation
    backward's dx, PASS_SCALE with `coefs`), tile by tile while dy is in cache."""
    cdef int64_t j, task, n_tasks, chunk, t, run
    cdef Tiles tiles
    cdef double* partials
    cdef real* center
    cdef real* by_column = NULL
    cdef int64_t k
    if use_column_mode(s):
        tiles = tiles_of(n, c, s)
        partials = <double*>malloc(2 * tiles.n_blocks * c * sizeof(double))
        center = <real*>malloc(c * s * sizeof(real))
        if scaled != NULL:
            by_column = column_coefs(coefs, c, s)
        if partials == NULL or center == NULL or (scaled != NULL and by_column == NULL):
            free(partials)
            free(center)
            if by_column != coefs:
                free(by_column)
            return BNCPU_ERR_NO_MEMORY
        for j in range(c):
            for k in range(s):
                center[j * s + k] = <real>mean[j]
        for task in prange(tiles.n_blocks * tiles.n_chunks, schedule='static',
                           num_threads=n_threads):
            grad_sums_tile_task(dy, x, &tiles, task, center, partials, scaled, by_column)
        for j in range(c):
            sum_dy[j] = 0
            sum_dy_xmu[j] = 0
        for t in range(tiles.n_blocks):
            for j in range(c):
                sum_dy[j] += partials[t * c + j]
                sum_dy_xmu[j] += partials[(tiles.n_blocks + t) * c + j]
        for j in range(c):
            sum_dy_xmu[j] = finish_dy_xmu(sum_dy[j], sum_dy_xmu[j], mean[j], center[j * s])
        free(partials)
        free(center)
        if by_column != coefs:
            free(by_column)
    elif use_split_mode(c, s, n_threads):
        n_tasks = c * n * pieces_per_row(s)
        partials = <double*>malloc(2 * n_tasks * sizeof(double) + 1)
        if partials == NULL:
            return BNCPU_ERR_NO_MEMORY
        for task in prange(n_tasks, schedule='static', num_threads=n_threads):
            piece_grad_sums_task(dy, x, task, n, c, s, mean, partials)
        n_tasks = n * pieces_per_row(s)
        for j in range(c):
            sum_dy[j] = 0
            sum_dy_xmu[j] = 0
            for t in range(j * n_tasks, (j + 1) * n_tasks):
                sum_dy[j] += partials[2 * t]
                sum_dy_xmu[j] += partials[2 * t + 1]
        free(partials)
    else:
        run = channel_run(c, s, sizeof(real), n_threads)
        for chunk in prange((c + run - 1) // run, schedule='static', num_threads=n_threads):
            channel_grad_sums(dy, x, n, c, s, chunk * run, min(chunk * run + run, c), mean,
                              sum_dy, sum_dy_xmu)
    return BNCPU_OK


# --------------------------------------------------------------------------------
# Fused training forward: statistics and normalization per channel while in cache
# --------------------------------------------------------------------------------
cdef void train_channel(const real* x, real* y, int64_t n, int64_t c, int64_t s, int64_t j,
                        const real* weight, const real* bias, double eps,
                        double* mean, double* var, real* coefs, bint stream) noexcept nogil:
    cdef double m2
    cdef int64_t i, start, start_index
    channel_stats(x, n, c, s, j, &mean[j], &m2)
    var[j] = m2 / (n * s)
    set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
    for i in range(n):
        for start_index in range((s + PIECE - 1) // PIECE):
            start = start_index * PIECE
            pass_span(PASS_AFFINE, x + (i * c + j) * s + start, NULL, y + (i * c + j) * s + start,
                      min(<int64_t>PIECE, s - start), coefs, c, j, stream)


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


cdef void train_channel_run(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                            int64_t j0, int64_t j1, const real* weight, const real* bias,
                            double eps, double* mean, double* var, real* coefs,
                            bint stream) noexcept nogil:
    """Channels j0..j1 (adjacent, long rows): train_channel's work, memory read in
    runs of (j1 - j0)·S values (see channel_run_stats)."""
    cdef int64_t i, j, start, start_index, offset
    channel_run_stats(x, n, c, s, j0, j1, mean, var)
    for j in range(j0, j1):
        var[j] = var[j] / (n * s)
        set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
    for i in range(n):
        for j in range(j0, j1):
            for start_index in range((s + PIECE - 1) // PIECE):
                start = start_index * PIECE
                offset = (i * c + j) * s + start
                pass_span(PASS_AFFINE, x + offset, NULL, y + offset, min(<int64_t>PIECE, s - start),
                          coefs, c, j, stream)


cdef int bn_forward_train(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                          const real* weight, const real* bias,
                          real* running_mean, real* running_var,
                          double momentum, double eps,
                          real* save_mean, real* save_invstd) noexcept nogil:
    cdef int status = check_sizes(n, c, s)
    cdef int n_threads
    cdef int64_t j, chunk, n_chunks, run, count = n * s
    cdef bint stream = use_streaming(y, x, NULL, n * c * s * sizeof(real))
    cdef double* mean
    cdef double* var
    cdef real* coefs
    if status == BNCPU_OK:
        status = check_eps(eps)
    if status == BNCPU_OK:
        status = check_momentum(momentum)
    if status != BNCPU_OK:
        return status
    if (x == NULL or y == NULL) and n * c * s > 0:
        return BNCPU_ERR_NULL_POINTER
    if (running_mean == NULL) != (running_var == NULL):
        return BNCPU_ERR_NULL_POINTER
    if running_mean != NULL and running_mean == running_var and c > 0:
        return BNCPU_ERR_ALIASED_STATS
    if count == 1:
        return BNCPU_ERR_ONE_VALUE
    if c == 0:
        return BNCPU_OK
    mean = <double*>malloc(2 * c * sizeof(double))
    coefs = <real*>malloc(CHANNEL_COEFS * c * sizeof(real))
    if mean == NULL or coefs == NULL:
        free(mean)
        free(coefs)
        return BNCPU_ERR_NO_MEMORY
    var = mean + c
    if count == 0:
        # Empty batch: nothing to normalize, running statistics untouched.
        for j in range(c):
            mean[j] = 0
            var[j] = 0
    else:
        n_threads = threads_begin(n * c * s)
        if use_column_mode(s) or use_split_mode(c, s, n_threads):
            # Statistics (merged across tasks), then a second parallel pass.
            status = all_channel_stats(x, n, c, s, n_threads, mean, var)
            if status == BNCPU_OK:
                for j in range(c):
                    var[j] = var[j] / count
                    set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
                run_pass(PASS_AFFINE, x, NULL, y, n, c, s, coefs, n_threads)
        elif s >= STATS_BLOCK:
            run = channel_run(c, s, sizeof(real), n_threads)
            for chunk in prange((c + run - 1) // run, schedule='static', num_threads=n_threads):
                train_channel_run(x, y, n, c, s, chunk * run, min(chunk * run + run, c),
                                  weight, bias, eps, mean, var, coefs, stream)
        else:
            for j in prange(c, schedule='static', num_threads=n_threads):
                train_channel(x, y, n, c, s, j, weight, bias, eps, mean, var, coefs, stream)
        threads_end(n_threads)
    if status == BNCPU_OK:
        for j in range(c):
            if save_mean != NULL:
                save_mean[j] = <real>mean[j]
            if save_invstd != NULL:
                save_invstd[j] = <real>invstd_of(var[j], eps)
            update_running(running_mean, running_var, j, mean[j], var[j], <double>count, momentum)
    free(mean)
    free(coefs)
    return status


cdef int bn_forward_eval(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                         const real* weight, const real* bias,
                         const real* running_mean, const real* running_var,
                         double eps) noexcept nogil:
    cdef int status = check_sizes(n, c, s)
    cdef int n_threads
    cdef int64_t j
    cdef real* coefs
    if status == BNCPU_OK:
        status = check_eps(eps)
    if status != BNCPU_OK:
        return status
    if c > 0 and (running_mean == NULL or running_var == NULL):
        return BNCPU_ERR_NULL_POINTER
    if (x == NULL or y == NULL) and n * c * s > 0:
        return BNCPU_ERR_NULL_POINTER
    if n * c * s == 0:
        return BNCPU_OK
    coefs = <real*>malloc(CHANNEL_COEFS * c * sizeof(real))
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_affine_coefs(coefs, c, j, running_mean[j], invstd_of(running_var[j], eps), weight, bias)
    n_threads = threads_begin(n * c * s)
    run_pass(PASS_AFFINE, x, NULL, y, n, c, s, coefs, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


# --------------------------------------------------------------------------------
# Fused backward: reduce per channel, then the elementwise pass while in cache
# --------------------------------------------------------------------------------
cdef void backward_channels(const real* dy, const real* x, real* dx, int64_t n, int64_t c,
                            int64_t s, int64_t j0, int64_t j1, const double* mean,
                            const double* invstd, const real* weight, bint training,
                            double* sum_dy, double* sum_dy_xmu, real* coefs,
                            bint stream) noexcept nogil:
    """Adjacent channels j0..j1: their sums, then the elementwise pass, row by row."""
    cdef int64_t i, j, start, start_index, offset
    channel_grad_sums(dy, x, n, c, s, j0, j1, mean, sum_dy, sum_dy_xmu)
    if dx == NULL:
        return
    if training:
        for j in range(j0, j1):
            set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j],
                               sum_dy_xmu[j], <double>(n * s))
    for i in range(n):
        for j in range(j0, j1):
            for start_index in range((s + PIECE - 1) // PIECE):
                start = start_index * PIECE
                offset = (i * c + j) * s + start
                pass_span(PASS_BACKWARD if training else PASS_SCALE, dy + offset, x + offset,
                          dx + offset, min(<int64_t>PIECE, s - start), coefs, c, j, stream)


cdef int bn_backward(const real* dy, const real* x, real* dx, int64_t n, int64_t c, int64_t s,
                     const real* weight, const real* running_mean, const real* running_var,
                     const real* save_mean, const real* save_invstd, int training, double eps,
                     real* dweight, real* dbias) noexcept nogil:
    cdef int status = check_sizes(n, c, s)
    cdef int n_threads
    cdef int64_t j, chunk, run, count = n * s
    cdef double* mean
    cdef double* invstd
    cdef double* sum_dy
    cdef double* sum_dy_xmu
    cdef real* coefs
    cdef bint need_sums = training or dweight != NULL or dbias != NULL
    cdef bint fused_scale
    if status == BNCPU_OK and not training:
        status = check_eps(eps)
    if status != BNCPU_OK:
        return status
    if n * c * s > 0 and (dy == NULL or (x == NULL and need_sums)):
        return BNCPU_ERR_NULL_POINTER
    if c > 0 and training and (save_mean == NULL or save_invstd == NULL):
        return BNCPU_ERR_NULL_POINTER
    if c > 0 and not training and (running_mean == NULL or running_var == NULL):
        return BNCPU_ERR_NULL_POINTER
    if c == 0:
        return BNCPU_OK
    mean = <double*>malloc(4 * c * sizeof(double))
    coefs = <real*>malloc(CHANNEL_COEFS * c * sizeof(real))
    if mean == NULL or coefs == NULL:
        free(mean)
        free(coefs)
        return BNCPU_ERR_NO_MEMORY
    invstd = mean + c
    sum_dy = mean + 2 * c
    sum_dy_xmu = mean + 3 * c
    for j in range(c):
        if training:
            mean[j] = save_mean[j]
            invstd[j] = save_invstd[j]
        else:
            mean[j] = running_mean[j]
            invstd[j] = invstd_of(running_var[j], eps)
            # Eval: the statistics are constants, dx = dy·w·invstd.
            coefs[COEF_SCALE * c + j] = <real>(invstd[j] * (weight[j] if weight != NULL else 1.0))
        sum_dy[j] = 0
        sum_dy_xmu[j] = 0
    n_threads = threads_begin(n * c * s)
    if count > 0:
        if use_column_mode(s) or use_split_mode(c, s, n_threads) or not need_sums:
            # Evaluation in column mode: dx = dy·scale computed with the sums, tile by tile.
            # (use_column_pass implies column mode, whose sums honor `scaled`.)
            fused_scale = use_column_pass(c, s) and need_sums and not training and dx != NULL
            if need_sums:
                status = all_channel_grad_sums(dy, x, n, c, s, mean, n_threads, sum_dy, sum_dy_xmu,
                                               dx if fused_scale else NULL, coefs)
            if status == BNCPU_OK and dx != NULL and not fused_scale:
                if training:
                    for j in range(c):
                        set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j],
                                           sum_dy_xmu[j], <double>count)
                run_pass(PASS_BACKWARD if training else PASS_SCALE, dy, x, dx, n, c, s, coefs, n_threads)
        else:
            run = channel_run(c, s, sizeof(real), n_threads)
            for chunk in prange((c + run - 1) // run, schedule='static', num_threads=n_threads):
                backward_channels(dy, x, dx, n, c, s, chunk * run, min(chunk * run + run, c),
                                  mean, invstd, weight, training, sum_dy, sum_dy_xmu, coefs,
                                  use_streaming(dx, dy, x, n * c * s * sizeof(real)))
    threads_end(n_threads)
    if status == BNCPU_OK:
        for j in range(c):
            if dweight != NULL:
                dweight[j] = <real>(sum_dy_xmu[j] * invstd[j])
            if dbias != NULL:
                dbias[j] = <real>sum_dy[j]
    free(mean)
    free(coefs)
    return status


# --------------------------------------------------------------------------------
# Split phase: the building blocks of synchronized batch norm
# --------------------------------------------------------------------------------
cdef int bn_stats(const real* x, int64_t n, int64_t c, int64_t s,
                  double* mean, double* m2) noexcept nogil:
    cdef int status = check_sizes(n, c, s)
    cdef int n_threads
    cdef int64_t j
    if status != BNCPU_OK:
        return status
    if c > 0 and (mean == NULL or m2 == NULL or (x == NULL and n * s > 0)):
        return BNCPU_ERR_NULL_POINTER
    if n * s == 0:
        for j in range(c):
            mean[j] = 0
            m2[j] = 0
        return BNCPU_OK
    n_threads = threads_begin(n * c * s)
    status = all_channel_stats(x, n, c, s, n_threads, mean, m2)
    threads_end(n_threads)
    return status


cdef int bn_gather_stats(int64_t p, int64_t c, const double* mean, const double* m2,
                         const int64_t* counts, real* running_mean, real* running_var,
                         double momentum, double eps,
                         double* mean_out, double* invstd_out) noexcept nogil:
    cdef int status = check_sizes(p, c, 1)
    cdef int64_t j, q
    cdef double count, total_mean, total_m2
    if status == BNCPU_OK:
        status = check_eps(eps)
    if status == BNCPU_OK:
        status = check_momentum(momentum)
    if status != BNCPU_OK:
        return status
    if c > 0 and (mean_out == NULL or invstd_out == NULL
                  or (p > 0 and (mean == NULL or m2 == NULL or counts == NULL))):
        return BNCPU_ERR_NULL_POINTER
    if (running_mean == NULL) != (running_var == NULL):
        return BNCPU_ERR_NULL_POINTER
    if running_mean != NULL and running_mean == running_var and c > 0:
        return BNCPU_ERR_ALIASED_STATS
    for q in range(p):
        if counts[q] < 0:
            return BNCPU_ERR_BAD_SIZE
    count = 0
    for q in range(p):
        count += counts[q]
    if count == 1:
        return BNCPU_ERR_ONE_VALUE
    for j in range(c):
        count = 0
        total_mean = 0
        total_m2 = 0
        for q in range(p):
            merge_stats(&count, &total_mean, &total_m2, <double>counts[q], mean[q * c + j], m2[q * c + j])
        mean_out[j] = total_mean
        invstd_out[j] = invstd_of(total_m2 / count if count > 0 else 0.0, eps)
        update_running(running_mean, running_var, j, total_mean,
                       total_m2 / count if count > 0 else 0.0, count, momentum)
    return BNCPU_OK


cdef int bn_elemt(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                  const double* mean, const double* invstd,
                  const real* weight, const real* bias) noexcept nogil:
    cdef int status = check_sizes(n, c, s)
    cdef int n_threads
    cdef int64_t j
    cdef real* coefs
    if status != BNCPU_OK:
        return status
    if n * c * s == 0:
        return BNCPU_OK
    if x == NULL or y == NULL or mean == NULL or invstd == NULL:
        return BNCPU_ERR_NULL_POINTER
    coefs = <real*>malloc(CHANNEL_COEFS * c * sizeof(real))
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_affine_coefs(coefs, c, j, mean[j], invstd[j], weight, bias)
    n_threads = threads_begin(n * c * s)
    run_pass(PASS_AFFINE, x, NULL, y, n, c, s, coefs, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


cdef int bn_backward_reduce(const real* dy, const real* x, int64_t n, int64_t c, int64_t s,
                            const double* mean, double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    cdef int status = check_sizes(n, c, s)
    cdef int n_threads
    cdef int64_t j
    if status != BNCPU_OK:
        return status
    if c > 0 and (mean == NULL or sum_dy == NULL or sum_dy_xmu == NULL
                  or (n * s > 0 and (dy == NULL or x == NULL))):
        return BNCPU_ERR_NULL_POINTER
    if n * s == 0:
        for j in range(c):
            sum_dy[j] = 0
            sum_dy_xmu[j] = 0
        return BNCPU_OK
    n_threads = threads_begin(n * c * s)
    status = all_channel_grad_sums(dy, x, n, c, s, mean, n_threads, sum_dy, sum_dy_xmu)
    threads_end(n_threads)
    return status


cdef int bn_backward_elemt(const real* dy, const real* x, real* dx, int64_t n, int64_t c, int64_t s,
                           const double* mean, const double* invstd, const real* weight,
                           const double* sum_dy, const double* sum_dy_xmu,
                           int64_t count) noexcept nogil:
    cdef int status = check_sizes(n, c, s)
    cdef int n_threads
    cdef int64_t j
    cdef real* coefs
    if status != BNCPU_OK:
        return status
    if count < 0 or (count == 0 and n * s > 0):
        return BNCPU_ERR_BAD_SIZE
    if n * c * s == 0:
        return BNCPU_OK
    if (dy == NULL or x == NULL or dx == NULL or mean == NULL or invstd == NULL
            or sum_dy == NULL or sum_dy_xmu == NULL):
        return BNCPU_ERR_NULL_POINTER
    coefs = <real*>malloc(CHANNEL_COEFS * c * sizeof(real))
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j], sum_dy_xmu[j], <double>count)
    n_threads = threads_begin(n * c * s)
    run_pass(PASS_BACKWARD, dy, x, dx, n, c, s, coefs, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


# --------------------------------------------------------------------------------
# The C API: this module's entries of the bncpu_api table
# --------------------------------------------------------------------------------
cdef extern from "bncpu.h":
    ctypedef struct bncpu_api_bn "bncpu_api":
        void* batch_norm_forward_train_f32
        void* batch_norm_forward_train_f64
        void* batch_norm_forward_eval_f32
        void* batch_norm_forward_eval_f64
        void* batch_norm_backward_f32
        void* batch_norm_backward_f64
        void* batch_norm_stats_f32
        void* batch_norm_stats_f64
        void* batch_norm_gather_stats_f32
        void* batch_norm_gather_stats_f64
        void* batch_norm_elemt_f32
        void* batch_norm_elemt_f64
        void* batch_norm_backward_reduce_f32
        void* batch_norm_backward_reduce_f64
        void* batch_norm_backward_elemt_f32
        void* batch_norm_backward_elemt_f64


def _fill_api(object table_capsule):
    """Write this module's kernels into the C API table held by the capsule."""
    cdef bncpu_api_bn* table = <bncpu_api_bn*>PyCapsule_GetPointer(table_capsule, "bncpu._capi.table")
    table.batch_norm_forward_train_f32 = <void*>bn_forward_train[float]
    table.batch_norm_forward_train_f64 = <void*>bn_forward_train[double]
    table.batch_norm_forward_eval_f32 = <void*>bn_forward_eval[float]
    table.batch_norm_forward_eval_f64 = <void*>bn_forward_eval[double]
    table.batch_norm_backward_f32 = <void*>bn_backward[float]
    table.batch_norm_backward_f64 = <void*>bn_backward[double]
    table.batch_norm_stats_f32 = <void*>bn_stats[float]
    table.batch_norm_stats_f64 = <void*>bn_stats[double]
    table.batch_norm_gather_stats_f32 = <void*>bn_gather_stats[float]
    table.batch_norm_gather_stats_f64 = <void*>bn_gather_stats[double]
    table.batch_norm_elemt_f32 = <void*>bn_elemt[float]
    table.batch_norm_elemt_f64 = <void*>bn_elemt[double]
    table.batch_norm_backward_reduce_f32 = <void*>bn_backward_reduce[float]
    table.batch_norm_backward_reduce_f64 = <void*>bn_backward_reduce[double]
    table.batch_norm_backward_elemt_f32 = <void*>bn_backward_elemt[float]
    table.batch_norm_backward_elemt_f64 = <void*>bn_backward_elemt[double]


# --------------------------------------------------------------------------------
# Python entry points: arrays already validated by bncpu._validate (C-contiguous,
# one float dtype, right sizes); each releases the GIL and returns the status.
# --------------------------------------------------------------------------------
def forward_train(x, y, int64_t n, int64_t c, int64_t s, weight, bias, running_mean, running_var,
                  double momentum, double eps, save_mean, save_invstd):
    cdef void* px = data_or_null(x)
    cdef void* py = data_or_null(y)
    cdef void* pw = data_or_null(weight)
    cdef void* pb = data_or_null(bias)
    cdef void* prm = data_or_null(running_mean)
    cdef void* prv = data_or_null(running_var)
    cdef void* psm = data_or_null(save_mean)
    cdef void* psi = data_or_null(save_invstd)
    cdef int status
    if is_float32(x):
        with nogil:
            status = bn_forward_train(<const float*>px, <float*>py, n, c, s, <const float*>pw,
                                      <const float*>pb, <float*>prm, <float*>prv, momentum, eps,
                                      <float*>psm, <float*>psi)
    else:
        with nogil:
            status = bn_forward_train(<const double*>px, <double*>py, n, c, s, <const double*>pw,
                                      <const double*>pb, <double*>prm, <double*>prv, momentum, eps,
                                      <double*>psm, <double*>psi)
    return status


def forward_eval(x, y, int64_t n, int64_t c, int64_t s, weight, bias, running_mean, running_var,
                 double eps):
    cdef void* px = data_or_null(x)
    cdef void* py = data_or_null(y)
    cdef void* pw = data_or_null(weight)
    cdef void* pb = data_or_null(bias)
    cdef void* prm = data_or_null(running_mean)
    cdef void* prv = data_or_null(running_var)
    cdef int status
    if is_float32(x):
        with nogil:
            status = bn_forward_eval(<const float*>px, <float*>py, n, c, s, <const float*>pw,
                                     <const float*>pb, <const float*>prm, <const float*>prv, eps)
    else:
        with nogil:
            status = bn_forward_eval(<const double*>px, <double*>py, n, c, s, <const double*>pw,
                                     <const double*>pb, <const double*>prm, <const double*>prv, eps)
    return status


def backward(dy, x, dx, int64_t n, int64_t c, int64_t s, weight, running_mean, running_var,
             save_mean, save_invstd, bint training, double eps, dweight, dbias):
    cdef void* pdy = data_or_null(dy)
    cdef void* px = data_or_null(x)
    cdef void* pdx = data_or_null(dx)
    cdef void* pw = data_or_null(weight)
    cdef void* prm = data_or_null(running_mean)
    cdef void* prv = data_or_null(running_var)
    cdef void* psm = data_or_null(save_mean)
    cdef void* psi = data_or_null(save_invstd)
    cdef void* pdw = data_or_null(dweight)
    cdef void* pdb = data_or_null(dbias)
    cdef int status
    if is_float32(dy):
        with nogil:
            status = bn_backward(<const float*>pdy, <const float*>px, <float*>pdx, n, c, s,
                                 <const float*>pw, <const float*>prm, <const float*>prv,
                                 <const float*>psm, <const float*>psi, training, eps,
                                 <float*>pdw, <float*>pdb)
    else:
        with nogil:
            status = bn_backward(<const double*>pdy, <const double*>px, <double*>pdx, n, c, s,
                                 <const double*>pw, <const double*>prm, <const double*>prv,
                                 <const double*>psm, <const double*>psi, training, eps,
                                 <double*>pdw, <double*>pdb)
    return status


def stats(x, int64_t n, int64_t c, int64_t s, mean, m2):
    cdef void* px = data_or_null(x)
    cdef double* pmean = <double*>data_or_null(mean)
    cdef double* pm2 = <double*>data_or_null(m2)
    cdef int status
    if is_float32(x):
        with nogil:
            status = bn_stats(<const float*>px, n, c, s, pmean, pm2)
    else:
        with nogil:
            status = bn_stats(<const double*>px, n, c, s, pmean, pm2)
    return status


def gather_stats(int64_t p, int64_t c, mean, m2, counts, running_mean, running_var,
                 double momentum, double eps, mean_out, invstd_out, bint is_f32):
    cdef const double* pmean = <const double*>data_or_null(mean)
    cdef const double* pm2 = <const double*>data_or_null(m2)
    cdef const int64_t* pcounts = <const int64_t*>data_or_null(counts)
    cdef void* prm = data_or_null(running_mean)
    cdef void* prv = data_or_null(running_var)
    cdef double* pmo = <double*>data_or_null(mean_out)
    cdef double* pio = <double*>data_or_null(invstd_out)
    cdef int status
    if is_f32:
        with nogil:
            status = bn_gather_stats(p, c, pmean, pm2, pcounts, <float*>prm, <float*>prv,
                                     momentum, eps, pmo, pio)
    else:
        with nogil:
            status = bn_gather_stats(p, c, pmean, pm2, pcounts, <double*>prm, <double*>prv,
                                     momentum, eps, pmo, pio)
    return status


def elemt(x, y, int64_t n, int64_t c, int64_t s, mean, invstd, weight, bias):
    cdef void* px = data_or_null(x)
    cdef void* py = data_or_null(y)
    cdef const double* pmean = <const double*>data_or_null(mean)
    cdef const double* pinv = <const double*>data_or_null(invstd)
    cdef void* pw = data_or_null(weight)
    cdef void* pb = data_or_null(bias)
    cdef int status
    if is_float32(x):
        with nogil:
            status = bn_elemt(<const float*>px, <float*>py, n, c, s, pmean, pinv,
                              <const float*>pw, <const float*>pb)
    else:
        with nogil:
            status = bn_elemt(<const double*>px, <double*>py, n, c, s, pmean, pinv,
                              <const double*>pw, <const double*>pb)
    return status


def backward_reduce(dy, x, int64_t n, int64_t c, int64_t s, mean, sum_dy, sum_dy_xmu):
    cdef void* pdy = data_or_null(dy)
    cdef void* px = data_or_null(x)
    cdef const double* pmean = <const double*>data_or_null(mean)
    cdef double* psdy = <double*>data_or_null(sum_dy)
    cdef double* psdyx = <double*>data_or_null(sum_dy_xmu)
    cdef int status
    if is_float32(dy):
        with nogil:
            status = bn_backward_reduce(<const float*>pdy, <const float*>px, n, c, s, pmean, psdy, psdyx)
    else:
        with nogil:
            status = bn_backward_reduce(<const double*>pdy, <const double*>px, n, c, s, pmean, psdy, psdyx)
    return status


def backward_elemt(dy, x, dx, int64_t n, int64_t c, int64_t s, mean, invstd, weight,
                   sum_dy, sum_dy_xmu, int64_t count):
    cdef void* pdy = data_or_null(dy)
    cdef void* px = data_or_null(x)
    cdef void* pdx = data_or_null(dx)
    cdef const double* pmean = <const double*>data_or_null(mean)
    cdef const double* pinv = <const double*>data_or_null(invstd)
    cdef void* pw = data_or_null(weight)
    cdef const double* psdy = <const double*>data_or_null(sum_dy)
    cdef const double* psdyx = <const double*>data_or_null(sum_dy_xmu)
    cdef int status
    if is_float32(dy):
        with nogil:
            status = bn_backward_elemt(<const float*>pdy, <const float*>px, <float*>pdx, n, c, s,
                                       pmean, pinv, <const float*>pw, psdy, psdyx, count)
    else:
        with nogil:
            status = bn_backward_elemt(<const double*>pdy, <const double*>px, <double*>pdx, n, c, s,
                                       pmean, pinv, <const double*>pw, psdy, psdyx, count)
    return status
