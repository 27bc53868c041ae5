# Batch norm, column mode: included by batch_norm.pyx, so it compiles inside each ISA build.
#
# Short rows (S <= SHORT_ROW): the buffer is seen as an (N, C·S) matrix cut into tiles
# of whole channels (tiles_of), read along contiguous memory; each tile is summarized
# column by column, the tiles of a channel merged in row order.

cdef extern from "_column_passes.h":
    # Whole rows of the elementwise passes with streaming stores (see there).
    enum:
        COLUMNS_AFFINE "BNCPU_COLUMNS_AFFINE"
        COLUMNS_BACKWARD "BNCPU_COLUMNS_BACKWARD"
        COLUMNS_SCALE "BNCPU_COLUMNS_SCALE"
    bint columns_stream_ok "bncpu_columns_stream_ok"(const void* out, int64_t cols,
                                                     int64_t itemsize) noexcept nogil
    void columns_stream_f32 "bncpu_columns_stream_f32"(
        int kind, const float* a, const float* b, float* out, int64_t rows, int64_t cols,
        const float* hi, const float* lo, const float* scale, const float* offset,
        const float* k) noexcept nogil
    void columns_stream_f64 "bncpu_columns_stream_f64"(
        int kind, const double* a, const double* b, double* out, int64_t rows, int64_t cols,
        const double* hi, const double* lo, const double* scale, const double* offset,
        const double* k) noexcept nogil


cdef inline bint use_column_mode(int64_t s) noexcept nogil:
    return s <= SHORT_ROW


cdef inline bint use_column_pass(int64_t c, int64_t s) noexcept nogil:
    """Elementwise passes along the (N, C·S) matrix rows, coefficients per column (S = 1:
    always). Measured against passes over channel rows: faster for S = 9 and 16, the
    same for S = 64, slower for S = 100 (five values read per value written). (Passes
    tile by tile, with the coefficients of a tile's channels, are slower than channel
    rows: each thread reads a few KB of every few hundred instead of one contiguous
    part of the buffer.)"""
    return s == 1 or (s < PASS_SHORT_ROW and c * s <= COLUMN_COEFS_MAX)


cdef struct Tiles:
    # Column mode's cut of an (N, C, S) buffer seen as an (N, C·S) matrix: tile
    # t = block·n_chunks + chunk covers matrix rows block·rows.. and channels
    # chunk·width.. (the tiles of a row block are adjacent tasks).
    int64_t n, c, s, rows, n_blocks, width, n_chunks


cdef inline Tiles tiles_of(int64_t n, int64_t c, int64_t s) noexcept nogil:
    """The tiles of (N, C, S), S <= SHORT_ROW, from the shape alone: whole channels,
    at most TILE_COLUMNS columns; rows a multiple of 8 (the float32 runs)."""
    cdef Tiles t
    t.n = n
    t.c = c
    t.s = s
    t.width = max(<int64_t>1, min(c, TILE_COLUMNS // s))
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


cdef bint tile_stats_around(const real* x, const Tiles* t, int64_t r0, int64_t rows,
                            int64_t head, int64_t j0, int64_t width, double* mean,
                            double* m2, bint* centered) noexcept nogil:
    """Column mode: mean[jj] and M2[jj] of channel j0 + jj over matrix rows r0..r0+rows
    from the columns' deviations from a center per channel, the mean of its values in
    the first `head` rows (head = rows: the two-pass, its second pass reading the tile
    from cache). centered[jj] (if not NULL): whether channel jj's center was within a
    standard deviation of its mean (Σd² <= 2·M2, false for NaN), as block_stats asks of
    a one-pass try; returns whether all were. (A channel's results depend on its own
    columns only: summed alone, width 1, it gets the same bits.)
    float64 only with head = rows: its center is then the tile's mean, and the
    deviations' sum is taken as 0."""
    cdef double col_sum[TILE_COLUMNS]
    cdef double col_sq[TILE_COLUMNS]
    cdef real center[TILE_COLUMNS]
    cdef int64_t s = t.s, ld = t.c * t.s, cols = width * t.s
    cdef const real* tile = x + r0 * ld + j0 * s
    cdef const real* row
    cdef double d, sq, count = <double>(rows * s), head_count = <double>(head * s)
    cdef int64_t i, jj, k
    cdef bint all_centered = True
    for k in range(cols):
        col_sum[k] = 0
        col_sq[k] = 0
    if real is float:
        f32_add_column_sums(col_sum, tile, head, ld, cols)
    else:
        for i in range(head):
            row = tile + i * ld
            for k in range(cols):
                col_sum[k] += row[k]
    # float32: a float32 center near the mean, corrected by finish_dev (as add_dev_span).
    # (S == 1 apart: a loop over the channels that vectorizes, divisions included.)
    if s == 1:
        for jj in range(width):
            center[jj] = <real>(col_sum[jj] / head_count)
            col_sum[jj] = 0
    else:
        for jj in range(width):
            center[jj * s] = <real>(add_columns(col_sum + jj * s, s) / head_count)
            for k in range(jj * s + 1, jj * s + s):
                center[k] = center[jj * s]
            for k in range(jj * s, jj * s + s):
                col_sum[k] = 0
    if real is float:
        f32_add_column_dev_sums(col_sum, col_sq, tile, rows, ld, cols, center)
        for k in range(cols):
            if not (isfinite(col_sq[k]) and isfinite(col_sum[k])) and isfinite(center[k]):
                # float32 squares overflow (spread beyond ~1e19): float64 sums instead
                col_sum[k] = 0
                col_sq[k] = 0
                for i in range(rows):
                    d = tile[i * ld + k] - <double>center[k]
                    col_sum[k] += d
                    col_sq[k] += d * d
    else:
        for i in range(rows):
            row = tile + i * ld
            for k in range(cols):
                d = row[k] - center[k]
                col_sq[k] += d * d
    for jj in range(width):
        if s == 1:
            sq = col_sq[jj]
            finish_dev(count, center[jj], col_sum[jj], sq, &mean[jj], &m2[jj])
        else:
            sq = add_columns(col_sq + jj * s, s)
            finish_dev(count, center[jj * s], add_columns(col_sum + jj * s, s), sq,
                       &mean[jj], &m2[jj])
        if centered != NULL:
            centered[jj] = sq <= 2 * m2[jj]
            all_centered = all_centered and centered[jj]
    return all_centered


cdef void tile_stats(const real* x, const Tiles* t, int64_t r0, int64_t rows, int64_t j0,
                     int64_t width, double* mean, double* m2) noexcept nogil:
    """Column mode: mean[jj] and M2[jj] of channel j0 + jj over matrix rows r0..r0+rows.

    float32 tiles of at least 2·TILE_HEAD_ROWS rows first try one pass from memory,
    around the mean of their first TILE_HEAD_ROWS rows, and keep it when every
    channel's center passes block_stats' test (then the float32 deviations carry at
    most twice the rounding of the two-pass's); otherwise (sorted data, a tile whose
    first rows are not typical, a channel holding inf or NaN) the channels that fail are
    summed again, two-pass, from cache, each alone (so the others' bits do not depend on
    them). float64 tiles are two-pass (their column sums are not the bottleneck)."""
    cdef bint centered[TILE_COLUMNS]
    cdef int64_t jj
    if real is float:
        if rows >= 2 * TILE_HEAD_ROWS:
            if not tile_stats_around(x, t, r0, rows, TILE_HEAD_ROWS, j0, width, mean, m2,
                                     centered):
                for jj in range(width):
                    if not centered[jj]:
                        tile_stats_around(x, t, r0, rows, rows, j0 + jj, 1, &mean[jj],
                                          &m2[jj], NULL)
            return
    tile_stats_around(x, t, r0, rows, rows, j0, width, mean, m2, NULL)


cdef void tile_grad_sums(const real* dy, const real* mask, const real* x, const Tiles* t,
                         int64_t r0, int64_t rows, int64_t j0, int64_t width,
                         const real* center, double* sum_dy, double* sum_dy_dev) noexcept nogil:
    """Column mode: Σdy and Σdy·(x - center) of channel j0 + jj over matrix rows
    r0..r0+rows, center[k] (per column) its channel's mean rounded to the data's
    precision (see add_dy_xmu_span); dy masked by mask (may be NULL: see Pass)."""
    cdef double col_dy[TILE_COLUMNS]
    cdef double col_dev[TILE_COLUMNS]
    cdef int64_t s = t.s, ld = t.c * t.s, cols = width * t.s
    cdef int64_t i, jj, k, offset = r0 * ld + j0 * s
    cdef const real* dy_row
    cdef const real* mask_row = NULL
    cdef const real* x_row
    for k in range(cols):
        col_dy[k] = 0
        col_dev[k] = 0
    if real is float:
        f32_add_column_grad_sums(col_dy, col_dev, dy + offset,
                                 mask + offset if mask != NULL else NULL, x + offset, rows, ld,
                                 cols, center)
        for k in range(cols):
            if not (isfinite(col_dy[k]) and isfinite(col_dev[k])):
                # float32 products overflow (see add_grad_sums_f64): float64 sums instead
                col_dy[k] = 0
                col_dev[k] = 0
                add_grad_sums_f64(dy + offset + k, NULL,
                                  mask + offset + k if mask != NULL else NULL, x + offset + k,
                                  rows, ld, center[k], &col_dy[k], &col_dev[k])
    else:
        for i in range(rows):
            dy_row = dy + offset + i * ld
            if mask != NULL:
                mask_row = mask + offset + i * ld
            x_row = x + offset + i * ld
            # One sum per loop: gcc vectorizes these, not a loop updating both arrays.
            for k in range(cols):
                col_dy[k] += masked(dy_row, mask_row, k)
            for k in range(cols):
                col_dev[k] += masked(dy_row, mask_row, k) * (x_row[k] - center[k])
    for jj in range(width):
        sum_dy[jj] = col_dy[jj] if s == 1 else add_columns(col_dy + jj * s, s)
        sum_dy_dev[jj] = col_dev[jj] if s == 1 else add_columns(col_dev + jj * s, s)


cdef void stats_tile_task(const real* x, const Tiles* t, int64_t task,
                          double* partials) noexcept nogil:
    """Tile `task`'s mean and M2 into row `block` of the two (n_blocks, C) partials."""
    cdef int64_t block = tile_block(t, task), j0 = tile_j0(t, task)
    tile_stats(x, t, block * t.rows, tile_row_count(t, block), j0, tile_width(t, task),
               partials + block * t.c + j0, partials + (t.n_blocks + block) * t.c + j0)


cdef void grad_sums_tile_task(const real* dy, const real* mask, const real* x, const Tiles* t,
                              int64_t task, const real* center, double* partials, real* scaled,
                              real* g_out, const real* column_coefs) noexcept nogil:
    """Tile `task`'s Σdy and Σdy·(x - center) into row `block` of the two partials
    (center per column); and if `scaled` is given, its scaled = dy·scale (PASS_SCALE,
    coefficients per column, g_out as there) while dy is in cache. dy masked by mask
    (may be NULL: see Pass)."""
    cdef int64_t block = tile_block(t, task), j0 = tile_j0(t, task)
    cdef int64_t width = tile_width(t, task), rows = tile_row_count(t, block)
    tile_grad_sums(dy, mask, x, t, block * t.rows, rows, j0, width, center + j0 * t.s,
                   partials + block * t.c + j0, partials + (t.n_blocks + block) * t.c + j0)
    if scaled != NULL:
        pass_columns(PASS_SCALE, dy, NULL, mask, scaled, g_out, t.c * t.s, block * t.rows,
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
            if isfinite(delta):
                mean[j] += delta * mean_weight
            else:   # infinite means: the weighted mean, as IEEE evaluates it (see merge_stats)
                mean[j] = mean[j] * (1 - mean_weight) + tile_mean[block * c + j] * mean_weight
            m2[j] += tile_m2[block * c + j] + delta * delta * m2_weight
        count = total


cdef void pass_columns(Pass kind, const real* a, const real* b, const real* mask, real* out,
                       real* g_out, int64_t c, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                       const real* coefs, bint stream=False) noexcept nogil:
    """Column mode: rows r0..r1, columns j0..j1 of an (N, c) matrix (c: C, or C·S with
    coefficients repeated per column, see column_coefs), vectorized along the row; the
    pass `kind` of pass_span. With `stream`, whole rows (j0 = 0, j1 = c) of the plain
    passes (affine, backward, scale; no mask, no g_out) are written with streaming
    stores where the row length and the output's alignment allow (the same values)."""
    cdef const real* hi = coefs + COEF_HI * c
    cdef const real* lo = coefs + COEF_LO * c
    cdef const real* scale = coefs + COEF_SCALE * c
    cdef const real* offset = coefs + COEF_OFFSET * c
    cdef const real* k = coefs + COEF_K * c
    cdef const real* mask_row = NULL
    cdef int64_t i, j, row
    cdef real v, u
    cdef int stream_kind = (COLUMNS_AFFINE if kind == PASS_AFFINE else
                            COLUMNS_BACKWARD if kind == PASS_BACKWARD else
                            COLUMNS_SCALE if kind == PASS_SCALE else -1)
    if (stream and stream_kind >= 0 and mask == NULL and g_out == NULL and j0 == 0
            and j1 == c and r1 > r0 and columns_stream_ok(out, c, sizeof(real))):
        row = r0 * c
        if real is float:
            columns_stream_f32(stream_kind, a + row, b + row if b != NULL else NULL,
                               out + row, r1 - r0, c, hi, lo, scale, offset, k)
        else:
            columns_stream_f64(stream_kind, a + row, b + row if b != NULL else NULL,
                               out + row, r1 - r0, c, hi, lo, scale, offset, k)
        return
    for i in range(r0, r1):
        row = i * c
        if mask != NULL:
            mask_row = mask + row
        if kind == PASS_AFFINE:
            for j in range(j0, j1):
                out[row + j] = ((a[row + j] - hi[j]) - lo[j]) * scale[j] + offset[j]
        elif kind == PASS_AFFINE_RELU:
            for j in range(j0, j1):
                v = ((a[row + j] - hi[j]) - lo[j]) * scale[j] + offset[j]
                if b != NULL:
                    v = v + b[row + j]
                out[row + j] = 0 if v < 0 else v
        elif kind == PASS_BACKWARD:
            # x (b) is read before g_out is written: g_out may be x (in place).
            for j in range(j0, j1):
                v = masked(a + row, mask_row, j)
                u = (v - offset[j] - ((b[row + j] - hi[j]) - lo[j]) * k[j]) * scale[j]
                if g_out != NULL:
                    g_out[row + j] = v
                out[row + j] = u
        else:
            for j in range(j0, j1):
                v = masked(a + row, mask_row, j)
                if g_out != NULL:
                    g_out[row + j] = v
                out[row + j] = v * scale[j]


cdef real* column_coefs(const real* coefs, int64_t c, int64_t s) noexcept nogil:
    """Column mode: the coefficients of channel j repeated for its s columns, as
    pass_columns takes them: coefs itself when s == 1, else a new array (NULL when out
    of memory)."""
    cdef real* wide
    cdef int64_t row, j, k
    if s == 1:
        return <real*>coefs
    wide = <real*>alloc_values(CHANNEL_COEFS * c, s, sizeof(real), False)
    if wide != NULL:
        for row in range(CHANNEL_COEFS):
            for j in range(c):
                for k in range(s):
                    wide[(row * c + j) * s + k] = coefs[row * c + j]
    return wide
