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
#   thread takes a channel in both.
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
    void affine_relu_bf16 "bncpu_affine_relu_bf16"(
        const bncpu_bf16_lane* x, const bncpu_bf16_lane* r, bncpu_bf16_lane* y,
        int64_t length, float hi, float lo, float scale, float shift, int relu) noexcept nogil
    void affine_relu_f16 "bncpu_affine_relu_f16"(
        const bncpu_f16_lane* x, const bncpu_f16_lane* r, bncpu_f16_lane* y,
        int64_t length, float hi, float lo, float scale, float shift, int relu) noexcept nogil
    void affine_relu_rows_bf16 "bncpu_affine_relu_rows_bf16"(
        const bncpu_bf16_lane* x, const bncpu_bf16_lane* r, bncpu_bf16_lane* y, int64_t t0,
        int64_t t1, int64_t c, int64_t s, const float* hi, const float* lo,
        const float* scale, const float* shift, int relu) noexcept nogil
    void affine_relu_rows_f16 "bncpu_affine_relu_rows_f16"(
        const bncpu_f16_lane* x, const bncpu_f16_lane* r, bncpu_f16_lane* y, int64_t t0,
        int64_t t1, int64_t c, int64_t s, const float* hi, const float* lo,
        const float* scale, const float* shift, int relu) noexcept nogil

ctypedef fused half:
    bncpu_bf16_lane
    bncpu_f16_lane

cdef enum:
    HALF_SHORT_ROW = 64    # rows shorter than this: one scalar loop over many rows


cdef void half_affine_segments(const half* x, const half* r, half* y, int64_t t0, int64_t t1,
                               int64_t c, int64_t s, const float* coefs,
                               bint relu) noexcept nogil:
    """Segments t0..t1 (segment t = i·C + j: row i of channel j, S values, one after
    another in memory) of y = relu?(affine(x) + r)."""
    cdef int64_t t, offset, j
    if s < HALF_SHORT_ROW:
        if half is bncpu_bf16_lane:
            affine_relu_rows_bf16(x, r, y, t0, t1, c, s, coefs + COEF_HI * c,
                                  coefs + COEF_LO * c, coefs + COEF_SCALE * c,
                                  coefs + COEF_OFFSET * c, relu)
        else:
            affine_relu_rows_f16(x, r, y, t0, t1, c, s, coefs + COEF_HI * c,
                                 coefs + COEF_LO * c, coefs + COEF_SCALE * c,
                                 coefs + COEF_OFFSET * c, relu)
        return
    for t in range(t0, t1):
        offset = t * s
        j = t % c
        if half is bncpu_bf16_lane:
            affine_relu_bf16(x + offset, r + offset if r != NULL else NULL, y + offset, s,
                             coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                             coefs[COEF_SCALE * c + j], coefs[COEF_OFFSET * c + j], relu)
        else:
            affine_relu_f16(x + offset, r + offset if r != NULL else NULL, y + offset, s,
                            coefs[COEF_HI * c + j], coefs[COEF_LO * c + j],
                            coefs[COEF_SCALE * c + j], coefs[COEF_OFFSET * c + j], relu)


cdef void half_affine_pass(const half* x, const half* r, half* y, int64_t n, int64_t c,
                           int64_t s, const float* coefs, bint relu,
                           int n_threads) noexcept nogil:
    """y = relu?(affine(x) + r) over the whole (N, C, S) buffer, in tasks of whole
    segments, about SEGMENT_VALUES values each (one segment when longer)."""
    cdef int64_t task, t0, rows = max(<int64_t>1, SEGMENT_VALUES // s)
    cdef int64_t n_tasks = (n * c + rows - 1) // rows
    for task in prange(n_tasks, schedule='static', num_threads=n_threads):
        t0 = task * rows
        half_affine_segments(x, r, y, t0, min(t0 + rows, n * c), c, s, coefs, relu)


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


cdef int half_all_channel_stats(const half* x, int64_t n, int64_t c, int64_t s,
                                int n_threads, double* mean, double* m2) noexcept nogil:
    """all_channel_stats of half data; returns a status (allocation)."""
    cdef int64_t j, task
    cdef Tiles tiles
    cdef double* partials
    cdef float* scratch
    if not use_column_mode(s):
        for j in prange(c, schedule='static', num_threads=n_threads):
            half_channel_stats(x, n, c, s, j, &mean[j], &m2[j])
        return BNCPU_OK
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
    coefs = <float*>alloc_values(CHANNEL_COEFS, c, sizeof(float), False)
    if mean == NULL or coefs == NULL:
        free(mean)
        free(coefs)
        return BNCPU_ERR_NO_MEMORY
    var = mean + c
    n_threads = threads_begin(n * c * s)
    status = half_all_channel_stats(x, n, c, s, n_threads, mean, var)
    if status == BNCPU_OK:
        for j in range(c):
            var[j] = var[j] / count
            set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
        half_affine_pass(x, residual, y, n, c, s, coefs, relu, n_threads)
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
    coefs = <float*>alloc_values(CHANNEL_COEFS, c, sizeof(float), False)
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_affine_coefs(coefs, c, j, running_mean[j], invstd_of(running_var[j], eps), weight,
                         bias)
    n_threads = threads_begin(n * c * s)
    half_affine_pass(x, residual, y, n, c, s, coefs, relu, n_threads)
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
