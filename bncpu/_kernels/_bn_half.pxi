# Batch norm on half-precision data (bfloat16, float16): included by batch_norm.pyx, so
# it compiles inside each ISA build.
#
# The data are bfloat16 or float16; the arithmetic, the parameters (weight, bias,
# running statistics), the statistics and the coefficients are float32, computed as the
# float32 kernels compute them, so the results are the float32 kernel's on the widened
# data (the output rounded once to the data's format), at any number of threads and in
# every ISA build:
# * The elementwise passes widen values as they load them and narrow results as they
#   store them, in registers (_half_passes.h).
# * The statistics are sums the float32 kernels take over units cut from the shape
#   alone, each summarized on its own (a block of at most STATS_BLOCK values, a block
#   of whole short rows, a column-mode tile) and merged in a fixed order. Each unit is
#   widened into a small float32 buffer (at most STATS_BLOCK values on the stack, or a
#   tile of at most TILE_VALUES per thread, in cache) and summarized by the float32
#   code itself; the merges are the float32 kernels'. No float32 copy of the data is
#   made. Channel and split mode give the same bits in the float32 kernel, so here one
#   thread takes a channel in both, and then its pass (one parallel region: on a busy
#   machine each region's start and end wait for every thread to get a core).
from cython.parallel cimport threadid
from libc.stdint cimport uint16_t

cdef extern from "_half.h":
    void bf16_widen "bncpu_bf16_widen"(const uint16_t* src, float* dst,
                                       int64_t n) noexcept nogil
    void f16_widen "bncpu_f16_widen"(const uint16_t* src, float* dst,
                                     int64_t n) noexcept nogil

cdef extern from "_half_passes.h":
    ctypedef struct bncpu_bf16_lane:
        uint16_t bits
    ctypedef struct bncpu_f16_lane:
        uint16_t bits
    enum:
        HALF_AFFINE "BNCPU_HALF_AFFINE"
        HALF_BACKWARD "BNCPU_HALF_BACKWARD"
        HALF_SCALE "BNCPU_HALF_SCALE"
    void half_pass_bf16 "bncpu_half_pass_bf16"(
        int kind, const bncpu_bf16_lane* a, const bncpu_bf16_lane* b, bncpu_bf16_lane* out,
        int64_t length, float hi, float lo, float scale, float offset, float k,
        int relu) noexcept nogil
    void half_pass_f16 "bncpu_half_pass_f16"(
        int kind, const bncpu_f16_lane* a, const bncpu_f16_lane* b, bncpu_f16_lane* out,
        int64_t length, float hi, float lo, float scale, float offset, float k,
        int relu) noexcept nogil
    void half_pass_rows_bf16 "bncpu_half_pass_rows_bf16"(
        int kind, const bncpu_bf16_lane* a, const bncpu_bf16_lane* b, bncpu_bf16_lane* out,
        int64_t t0, int64_t t1, int64_t c, int64_t s, const float* hi, const float* lo,
        const float* scale, const float* offset, const float* k, int relu) noexcept nogil
    void half_pass_rows_f16 "bncpu_half_pass_rows_f16"(
        int kind, const bncpu_f16_lane* a, const bncpu_f16_lane* b, bncpu_f16_lane* out,
        int64_t t0, int64_t t1, int64_t c, int64_t s, const float* hi, const float* lo,
        const float* scale, const float* offset, const float* k, int relu) noexcept nogil

ctypedef fused half:
    bncpu_bf16_lane
    bncpu_f16_lane

cdef enum:
    HALF_SHORT_ROW = 64    # rows shorter than this: one scalar loop over many rows


cdef void half_pass_segments(int kind, const half* a, const half* b, half* out, int64_t t0,
                             int64_t t1, int64_t c, int64_t s, const float* coefs,
                             bint relu) noexcept nogil:
    """Segments t0..t1 (segment t = i·C + j: row i of channel j, S values, one after
    another in memory) of a pass (see _half_passes.h; b may be NULL)."""
    cdef int64_t t, offset, j
    if s < HALF_SHORT_ROW:
        if half is bncpu_bf16_lane:
            half_pass_rows_bf16(kind, a, b, out, t0, t1, c, s, coefs + COEF_HI * c,
                                coefs + COEF_LO * c, coefs + COEF_SCALE * c,
                                coefs + COEF_OFFSET * c, coefs + COEF_K * c, relu)
        else:
            half_pass_rows_f16(kind, a, b, out, t0, t1, c, s, coefs + COEF_HI * c,
                               coefs + COEF_LO * c, coefs + COEF_SCALE * c,
                               coefs + COEF_OFFSET * c, coefs + COEF_K * c, relu)
        return
    for t in range(t0, t1):
        offset = t * s
        j = t % c
        if half is bncpu_bf16_lane:
            half_pass_bf16(kind, a + offset, b + offset if b != NULL else NULL, out + offset, s,
                           coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                           coefs[COEF_SCALE * c + j], coefs[COEF_OFFSET * c + j],
                           coefs[COEF_K * c + j], relu)
        else:
            half_pass_f16(kind, a + offset, b + offset if b != NULL else NULL, out + offset, s,
                          coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                          coefs[COEF_SCALE * c + j], coefs[COEF_OFFSET * c + j],
                          coefs[COEF_K * c + j], relu)


cdef void half_channel_pass(int kind, const half* a, const half* b, half* out, int64_t n,
                            int64_t c, int64_t s, int64_t j, const float* coefs,
                            bint relu) noexcept nogil:
    """Channel j's rows of a pass."""
    cdef int64_t i
    for i in range(n):
        half_pass_segments(kind, a, b, out, i * c + j, i * c + j + 1, c, s, coefs, relu)


cdef void half_pass(int kind, const half* a, const half* b, half* out, int64_t n, int64_t c,
                    int64_t s, const float* coefs, bint relu, int n_threads) noexcept nogil:
    """A pass over the whole (N, C, S) buffer, in tasks of whole segments, about
    SEGMENT_VALUES values each (one segment when longer)."""
    cdef int64_t task, t0, rows = max(<int64_t>1, SEGMENT_VALUES // s)
    cdef int64_t n_tasks = (n * c + rows - 1) // rows
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        t0 = task * rows
        half_pass_segments(kind, a, b, out, t0, min(t0 + rows, n * c), c, s, coefs, relu)


cdef inline void half_widen(const half* src, float* dst, int64_t n) noexcept nogil:
    if half is bncpu_bf16_lane:
        bf16_widen(<const uint16_t*>src, dst, n)
    else:
        f16_widen(<const uint16_t*>src, dst, n)


cdef void half_span_stats(const half* x, int64_t length, double* count, double* mean,
                          double* m2) noexcept nogil:
    """span_stats of half data: each block widened, then block_stats."""
    cdef float block[STATS_BLOCK]
    cdef int64_t start, start_index, size
    cdef double block_mean, block_m2
    for start_index in range((length + STATS_BLOCK - 1) // STATS_BLOCK):
        start = start_index * STATS_BLOCK
        size = min(<int64_t>STATS_BLOCK, length - start)
        half_widen(x + start, block, size)
        block_stats(<const float*>block, size, &block_mean, &block_m2)
        merge_stats(count, mean, m2, <double>size, block_mean, block_m2)


cdef void half_channel_stats(const half* x, int64_t n, int64_t c, int64_t s, int64_t j,
                             double* mean, double* m2) noexcept nogil:
    """channel_stats of half data: long rows piece by piece (fold_row_pieces), short rows
    in the same blocks of whole rows, each block widened and summarized by channel_stats
    (one block: its results are the block's own, which it merges into nothing)."""
    cdef float rows[STATS_BLOCK]
    cdef int64_t i, piece, rows_per_block, block, r0, r1
    cdef double count = 0, part_count, part_mean, part_m2
    mean[0] = 0
    m2[0] = 0
    if s >= STATS_BLOCK:
        for i in range(n):
            for piece in range(pieces_per_row(s)):
                part_count = 0
                part_mean = 0
                part_m2 = 0
                half_span_stats(x + (i * c + j) * s + piece * BN_PIECE, piece_length(s, piece),
                                &part_count, &part_mean, &part_m2)
                merge_stats(&count, mean, m2, part_count, part_mean, part_m2)
        return
    rows_per_block = STATS_BLOCK // s
    for block in range((n + rows_per_block - 1) // rows_per_block):
        r0 = block * rows_per_block
        r1 = min(r0 + rows_per_block, n)
        for i in range(r0, r1):
            half_widen(x + (i * c + j) * s, rows + (i - r0) * s, s)
        channel_stats(<const float*>rows, r1 - r0, 1, s, 0, &part_mean, &part_m2)
        merge_stats(&count, mean, m2, <double>((r1 - r0) * s), part_mean, part_m2)


cdef void half_stats_tile_task(const half* x, const Tiles* t, int64_t task, float* scratch,
                               double* partials) noexcept nogil:
    """stats_tile_task of half data: the tile widened into scratch (TILE_VALUES floats),
    seen as a tile of its own (the float32 column sums give the same bits at any row
    stride), then tile_stats."""
    cdef int64_t block = tile_block(t, task), j0 = tile_j0(t, task)
    cdef int64_t rows = tile_row_count(t, block), width = tile_width(t, task), i
    cdef int64_t cols = width * t.s
    cdef Tiles tile
    for i in range(rows):
        half_widen(x + (block * t.rows + i) * t.c * t.s + j0 * t.s, scratch + i * cols, cols)
    tile.n = rows
    tile.c = width
    tile.s = t.s
    tile.width = width
    tile.n_chunks = 1
    tile.rows = rows
    tile.n_blocks = 1
    tile_stats(<const float*>scratch, &tile, 0, rows, 0, width, partials + block * t.c + j0,
               partials + (t.n_blocks + block) * t.c + j0)


cdef int half_column_stats(const half* x, int64_t n, int64_t c, int64_t s,
                                int n_threads, double* mean, double* m2) noexcept nogil:
    """all_channel_stats of half data in column mode; returns a status (allocation)."""
    cdef int64_t task
    cdef Tiles tiles
    cdef double* partials
    cdef float* scratch
    tiles = tiles_of(n, c, s)
    partials = <double*>alloc_values(2 * tiles.n_blocks, c, sizeof(double), False)
    scratch = <float*>alloc_values(n_threads, TILE_VALUES, sizeof(float), False)
    if partials == NULL or scratch == NULL:
        free(partials)
        free(scratch)
        return BNCPU_ERR_NO_MEMORY
    for task in prange(tiles.n_blocks * tiles.n_chunks, schedule='static',
                       num_threads=n_threads):
        half_stats_tile_task(x, &tiles, task, scratch + threadid() * TILE_VALUES, partials)
    merge_tile_stats(&tiles, partials, partials + tiles.n_blocks * c, mean, m2)
    free(partials)
    free(scratch)
    return BNCPU_OK


cdef int forward_train_half(bint relu, const half* x, const half* residual, half* y,
                            int64_t n, int64_t c, int64_t s, const float* weight,
                            const float* bias, float* running_mean, float* running_var,
                            double momentum, double eps, float* save_mean,
                            float* save_invstd, int unbiased) noexcept nogil:
    """The training forward (forward_train's checks, statistics and results), with the
    ReLU (and the residual, may be NULL) when relu is true."""
    cdef int status = train_status(x, residual, y, n, c, s, weight, bias, running_mean,
                                   running_var, momentum, eps, save_mean, save_invstd,
                                   sizeof(half), sizeof(float))
    cdef int n_threads
    cdef int64_t j, count = n * s
    cdef double* mean
    cdef double* var
    cdef float* coefs
    if status != BNCPU_OK or c == 0:
        return status
    if count == 0:
        empty_batch_stats(c, eps, save_mean, save_invstd)
        return BNCPU_OK
    mean = <double*>alloc_values(2, c, sizeof(double), False)
    coefs = <float*>alloc_values(CHANNEL_COEFS, c, sizeof(float), True)
    if mean == NULL or coefs == NULL:
        free(mean)
        free(coefs)
        return BNCPU_ERR_NO_MEMORY
    var = mean + c
    n_threads = threads_begin(n * c * s)
    if use_column_mode(s):
        status = half_column_stats(x, n, c, s, n_threads, mean, var)
        if status == BNCPU_OK:
            for j in range(c):
                var[j] = var[j] / count
                set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
            half_pass(HALF_AFFINE, x, residual, y, n, c, s, coefs, relu, n_threads)
    else:
        # One parallel region: a channel's statistics, then its pass while it is in cache.
        for j in prange(c, schedule='static', num_threads=n_threads):
            half_channel_stats(x, n, c, s, j, &mean[j], &var[j])
            var[j] = var[j] / count
            set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
            half_channel_pass(HALF_AFFINE, x, residual, y, n, c, s, j, coefs, relu)
    threads_end(n_threads)
    if status == BNCPU_OK:
        save_train_stats(c, mean, var, <double>count, eps, running_mean, running_var, momentum,
                         unbiased, save_mean, save_invstd)
    free(mean)
    free(coefs)
    return status


cdef int bn_forward_train_half(const half* x, half* y, int64_t n, int64_t c, int64_t s,
                               const float* weight, const float* bias, float* running_mean,
                               float* running_var, double momentum, double eps,
                               float* save_mean, float* save_invstd,
                               int unbiased) noexcept nogil:
    return forward_train_half(False, x, NULL, y, n, c, s, weight, bias, running_mean,
                              running_var, momentum, eps, save_mean, save_invstd, unbiased)


cdef int bn_relu_forward_train_half(const half* x, const half* residual, half* y, int64_t n,
                                    int64_t c, int64_t s, const float* weight,
                                    const float* bias, float* running_mean,
                                    float* running_var, double momentum, double eps,
                                    float* save_mean, float* save_invstd,
                                    int unbiased) noexcept nogil:
    return forward_train_half(True, x, residual, y, n, c, s, weight, bias, running_mean,
                              running_var, momentum, eps, save_mean, save_invstd, unbiased)


cdef int forward_eval_half(bint relu, const half* x, const half* residual, half* y,
                           int64_t n, int64_t c, int64_t s, const float* weight,
                           const float* bias, const float* running_mean,
                           const float* running_var, double eps) noexcept nogil:
    """The evaluation forward (forward_eval's checks and coefficients), with the ReLU
    (and the residual, may be NULL) when relu is true."""
    cdef int status = eval_status(x, residual, y, n, c, s, weight, bias, running_mean,
                                  running_var, eps, sizeof(half), sizeof(float))
    cdef int n_threads
    cdef int64_t j
    cdef float* coefs
    if status != BNCPU_OK or n * c * s == 0:
        return status
    coefs = <float*>alloc_values(CHANNEL_COEFS, c, sizeof(float), True)
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_affine_coefs(coefs, c, j, running_mean[j], invstd_of(running_var[j], eps), weight,
                         bias)
    n_threads = threads_begin(n * c * s)
    half_pass(HALF_AFFINE, x, residual, y, n, c, s, coefs, relu, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


cdef int bn_forward_eval_half(const half* x, half* y, int64_t n, int64_t c, int64_t s,
                              const float* weight, const float* bias,
                              const float* running_mean, const float* running_var,
                              double eps) noexcept nogil:
    return forward_eval_half(False, x, NULL, y, n, c, s, weight, bias, running_mean,
                             running_var, eps)


cdef int bn_relu_forward_eval_half(const half* x, const half* residual, half* y, int64_t n,
                                   int64_t c, int64_t s, const float* weight,
                                   const float* bias, const float* running_mean,
                                   const float* running_var, double eps) noexcept nogil:
    return forward_eval_half(True, x, residual, y, n, c, s, weight, bias, running_mean,
                             running_var, eps)


# --------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------
cdef void half_sum_dy_xmu_span(const half* dy, const half* x, int64_t length, double mean,
                               double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    """sum_dy_xmu_span of half data: its lanes fed STATS_BLOCK values at a time (a
    multiple of the float32 sums' runs of 16 lanes x 8, which then take the same values
    in the same order), and its float64 fallback likewise."""
    cdef float dy_block[STATS_BLOCK]
    cdef float x_block[STATS_BLOCK]
    cdef double dy_lanes[LANES]
    cdef double dy_xmu_lanes[LANES]
    cdef float center = <float>mean
    cdef double span_dy, span_dev
    cdef int64_t start, start_index, size, n_blocks = (length + STATS_BLOCK - 1) // STATS_BLOCK
    zero_lanes(dy_lanes)
    zero_lanes(dy_xmu_lanes)
    for start_index in range(n_blocks):
        start = start_index * STATS_BLOCK
        size = min(<int64_t>STATS_BLOCK, length - start)
        half_widen(dy + start, dy_block, size)
        half_widen(x + start, x_block, size)
        add_dy_xmu_span(dy_lanes, dy_xmu_lanes, <const float*>dy_block, <const float*>NULL,
                        <const float*>x_block, size, center)
    span_dy = sum_lanes(dy_lanes)
    span_dev = sum_lanes(dy_xmu_lanes)
    if not (isfinite(span_dy) and isfinite(span_dev)):
        span_dy = 0
        span_dev = 0
        for start_index in range(n_blocks):
            start = start_index * STATS_BLOCK
            size = min(<int64_t>STATS_BLOCK, length - start)
            half_widen(dy + start, dy_block, size)
            half_widen(x + start, x_block, size)
            add_grad_sums_f64(dy_block, NULL, NULL, x_block, size, 1, center, &span_dy,
                              &span_dev)
    sum_dy[0] += span_dy
    sum_dy_xmu[0] += finish_dy_xmu(span_dy, span_dev, mean, center)


cdef void half_channel_grad_sums(const half* dy, const half* x, int64_t n, int64_t c, int64_t s,
                                 int64_t j, double mean, double* sum_dy,
                                 double* sum_dy_xmu) noexcept nogil:
    """channel_grad_sums of half data, channel j: long rows piece by piece, short rows
    each widened and added into the channel's lanes (the float32 kernel's lanes run
    across the rows the same way), with its float64 fallback."""
    cdef float dy_row[SPLIT_MIN_S]
    cdef float x_row[SPLIT_MIN_S]
    cdef double dy_lanes[LANES]
    cdef double dy_xmu_lanes[LANES]
    cdef float center = <float>mean
    cdef double sum_dev
    cdef int64_t i, piece, offset
    zero_lanes(dy_lanes)
    zero_lanes(dy_xmu_lanes)
    sum_dy[0] = 0
    sum_dy_xmu[0] = 0
    for i in range(n):
        offset = (i * c + j) * s
        if s >= SPLIT_MIN_S:
            for piece in range(pieces_per_row(s)):
                half_sum_dy_xmu_span(dy + offset + piece * BN_PIECE, x + offset + piece * BN_PIECE,
                                     piece_length(s, piece), mean, sum_dy, sum_dy_xmu)
        else:
            half_widen(dy + offset, dy_row, s)
            half_widen(x + offset, x_row, s)
            add_dy_xmu_span(dy_lanes, dy_xmu_lanes, <const float*>dy_row, <const float*>NULL,
                            <const float*>x_row, s, center)
    finish_grad_sums(s, mean, center, dy_lanes, dy_xmu_lanes, sum_dy, sum_dy_xmu)
    if s < SPLIT_MIN_S and not (isfinite(sum_dy[0]) and isfinite(sum_dy_xmu[0])):
        sum_dy[0] = 0
        sum_dev = 0
        for i in range(n):
            offset = (i * c + j) * s
            half_widen(dy + offset, dy_row, s)
            half_widen(x + offset, x_row, s)
            add_grad_sums_f64(dy_row, NULL, NULL, x_row, s, 1, center, sum_dy, &sum_dev)
        sum_dy_xmu[0] = finish_dy_xmu(sum_dy[0], sum_dev, mean, center)


cdef void half_grad_sums_tile_task(const half* dy, const half* x, const Tiles* t, int64_t task,
                                   const float* center, float* scratch,
                                   double* partials) noexcept nogil:
    """grad_sums_tile_task of half data (without its fused scale): dy's and x's tile
    widened into scratch (2·TILE_VALUES floats), seen as a tile of their own (see
    half_stats_tile_task), then tile_grad_sums."""
    cdef int64_t block = tile_block(t, task), j0 = tile_j0(t, task)
    cdef int64_t rows = tile_row_count(t, block), width = tile_width(t, task), i, offset
    cdef int64_t cols = width * t.s
    cdef Tiles tile
    for i in range(rows):
        offset = (block * t.rows + i) * t.c * t.s + j0 * t.s
        half_widen(dy + offset, scratch + i * cols, cols)
        half_widen(x + offset, scratch + TILE_VALUES + i * cols, cols)
    tile.n = rows
    tile.c = width
    tile.s = t.s
    tile.width = width
    tile.n_chunks = 1
    tile.rows = rows
    tile.n_blocks = 1
    tile_grad_sums(<const float*>scratch, <const float*>NULL,
                   <const float*>(scratch + TILE_VALUES), &tile, 0, rows, 0, width,
                   center + j0 * t.s, partials + block * t.c + j0,
                   partials + (t.n_blocks + block) * t.c + j0)


cdef int half_column_grad_sums(const half* dy, const half* x, int64_t n, int64_t c, int64_t s,
                            const double* mean, int n_threads, double* sum_dy,
                            double* sum_dy_xmu) noexcept nogil:
    """all_channel_grad_sums of half data in column mode; returns a status (allocation)."""
    cdef int64_t j, k, t, task
    cdef Tiles tiles
    cdef double* partials
    cdef float* scratch
    cdef float* center
    tiles = tiles_of(n, c, s)
    partials = <double*>alloc_values(2 * tiles.n_blocks, c, sizeof(double), False)
    scratch = <float*>alloc_values(2 * n_threads, TILE_VALUES, sizeof(float), False)
    center = <float*>alloc_values(c, s, sizeof(float), False)
    if partials == NULL or scratch == NULL or center == NULL:
        free(partials)
        free(scratch)
        free(center)
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        for k in range(s):
            center[j * s + k] = <float>mean[j]
    for task in prange(tiles.n_blocks * tiles.n_chunks, schedule='static',
                       num_threads=n_threads):
        half_grad_sums_tile_task(dy, x, &tiles, task, center,
                                 scratch + 2 * threadid() * TILE_VALUES, partials)
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
    free(scratch)
    free(center)
    return BNCPU_OK


cdef int bn_backward_half(const half* dy, const half* x, half* dx, int64_t n, int64_t c,
                          int64_t s, const float* weight, const float* running_mean,
                          const float* running_var, const float* save_mean,
                          const float* save_invstd, int training, double eps, float* dweight,
                          float* dbias) noexcept nogil:
    """The backward (backward's checks, sums and results): the sums, then dx's pass."""
    cdef int status = backward_status(dy, NULL, x, dx, NULL, n, c, s, weight, running_mean,
                                      running_var, save_mean, save_invstd, training, eps,
                                      dweight, dbias, sizeof(half), sizeof(float))
    cdef int n_threads
    cdef int64_t j, count = n * s
    cdef double* mean
    cdef double* invstd
    cdef double* sum_dy
    cdef double* sum_dy_xmu
    cdef float* coefs
    cdef bint need_sums = training or dweight != NULL or dbias != NULL
    cdef int kind = HALF_BACKWARD if training else HALF_SCALE
    if status != BNCPU_OK or c == 0:
        return status
    if count == 0:
        empty_backward(c, running_var, save_invstd, training, eps, dweight, dbias)
        return BNCPU_OK
    mean = <double*>alloc_values(4, c, sizeof(double), False)
    coefs = <float*>alloc_values(CHANNEL_COEFS, c, sizeof(float), True)
    if mean == NULL or coefs == NULL:
        free(mean)
        free(coefs)
        return BNCPU_ERR_NO_MEMORY
    invstd = mean + c
    sum_dy = mean + 2 * c
    sum_dy_xmu = mean + 3 * c
    backward_stats(c, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
                   mean, invstd, sum_dy, sum_dy_xmu, coefs)
    n_threads = threads_begin(n * c * s)
    if use_column_mode(s):
        if need_sums:
            status = half_column_grad_sums(dy, x, n, c, s, mean, n_threads, sum_dy, sum_dy_xmu)
        if status == BNCPU_OK and dx != NULL:
            if training:
                for j in range(c):
                    set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j],
                                       sum_dy_xmu[j], <double>count)
            half_pass(kind, dy, x, dx, n, c, s, coefs, False, n_threads)
    else:
        # One parallel region: a channel's sums, then its pass while it is in cache.
        for j in prange(c, schedule='static', num_threads=n_threads):
            if need_sums:
                half_channel_grad_sums(dy, x, n, c, s, j, mean[j], &sum_dy[j], &sum_dy_xmu[j])
            if dx != NULL:
                if training:
                    set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j],
                                       sum_dy_xmu[j], <double>count)
                half_channel_pass(kind, dy, x, dx, n, c, s, j, coefs, False)
    threads_end(n_threads)
    if status == BNCPU_OK:
        save_backward_grads(c, invstd, sum_dy, sum_dy_xmu, dweight, dbias)
    free(mean)
    free(coefs)
    return status


# --------------------------------------------------------------------------------
# Split phase (synchronized batch norm): the float32 entries' checks and results
# --------------------------------------------------------------------------------
cdef int bn_stats_half(const half* x, int64_t n, int64_t c, int64_t s, double* mean,
                       double* m2) noexcept nogil:
    cdef int status = stats_status(x, n, c, s, mean, m2, sizeof(half))
    cdef int n_threads
    cdef int64_t j
    if status != BNCPU_OK:
        return status
    if n * s == 0:
        zero_stats(c, mean, m2)
        return BNCPU_OK
    n_threads = threads_begin(n * c * s)
    if use_column_mode(s):
        status = half_column_stats(x, n, c, s, n_threads, mean, m2)
    else:
        for j in prange(c, schedule='static', num_threads=n_threads):
            half_channel_stats(x, n, c, s, j, &mean[j], &m2[j])
    threads_end(n_threads)
    return status


cdef int bn_elemt_half(const half* x, half* y, int64_t n, int64_t c, int64_t s,
                       const double* mean, const double* invstd, const float* weight,
                       const float* bias) noexcept nogil:
    cdef int status = elemt_status(x, y, n, c, s, mean, invstd, weight, bias, sizeof(half),
                                   sizeof(float))
    cdef int n_threads
    cdef int64_t j
    cdef float* coefs
    if status != BNCPU_OK or n * c * s == 0:
        return status
    coefs = <float*>alloc_values(CHANNEL_COEFS, c, sizeof(float), True)
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_affine_coefs(coefs, c, j, mean[j], invstd[j], weight, bias)
    n_threads = threads_begin(n * c * s)
    half_pass(HALF_AFFINE, x, NULL, y, n, c, s, coefs, False, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


cdef int bn_backward_reduce_half(const half* dy, const half* x, int64_t n, int64_t c,
                                 int64_t s, const double* mean, double* sum_dy,
                                 double* sum_dy_xmu) noexcept nogil:
    cdef int status = reduce_status(dy, x, n, c, s, mean, sum_dy, sum_dy_xmu, sizeof(half))
    cdef int n_threads
    cdef int64_t j
    if status != BNCPU_OK:
        return status
    if n * s == 0:
        zero_stats(c, sum_dy, sum_dy_xmu)
        return BNCPU_OK
    n_threads = threads_begin(n * c * s)
    if use_column_mode(s):
        status = half_column_grad_sums(dy, x, n, c, s, mean, n_threads, sum_dy, sum_dy_xmu)
    else:
        for j in prange(c, schedule='static', num_threads=n_threads):
            half_channel_grad_sums(dy, x, n, c, s, j, mean[j], &sum_dy[j], &sum_dy_xmu[j])
    threads_end(n_threads)
    return status


cdef int bn_backward_elemt_half(const half* dy, const half* x, half* dx, int64_t n, int64_t c,
                                int64_t s, const double* mean, const double* invstd,
                                const float* weight, const double* sum_dy,
                                const double* sum_dy_xmu, int64_t count) noexcept nogil:
    cdef int status = backward_elemt_status(dy, x, dx, n, c, s, mean, invstd, weight, sum_dy,
                                            sum_dy_xmu, count, sizeof(half), sizeof(float))
    cdef int n_threads
    cdef int64_t j
    cdef float* coefs
    if status != BNCPU_OK or n * c * s == 0:
        return status
    coefs = <float*>alloc_values(CHANNEL_COEFS, c, sizeof(float), True)
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j], sum_dy_xmu[j],
                           <double>count)
    n_threads = threads_begin(n * c * s)
    half_pass(HALF_BACKWARD, dy, x, dx, n, c, s, coefs, False, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK
