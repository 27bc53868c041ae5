"""Batch-norm kernels on C-contiguous (N, C, S) buffers, float32 or float64.

Per channel j over its M = N·S values:
    mean = Σx / M,  var = Σ(x - mean)² / M (biased),  invstd = 1/√(var + eps)
    y = (x - mean)·invstd·weight + bias
Backward (training), x̂ = (x - mean)·invstd:
    dbias = Σdy,  dweight = Σdy·x̂,  dx = weight·invstd·(dy - Σdy/M - x̂·Σ(dy·x̂)/M)

How the work is cut (the same cut for any number of threads, so results are bitwise
identical):
* A channel is the sequence of its N rows x[i, j, :], each cut into pieces of at
  most BN_PIECE values. Statistics fold the pieces in (row, piece) order; each piece is
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

Files: this one holds the constants, the entry points and the dispatch between the
modes; _bn_column.pxi, _bn_channel.pxi and _bn_split.pxi one work mode each;
_bn_passes.pxi the elementwise passes. They are included (`include`), not cimported:
Cython allows only inline functions in a .pxd, and each ISA build must compile all of
them with its own flags.
"""
from cython.parallel cimport prange
from libc.math cimport isfinite, sqrt
from libc.stdint cimport int64_t
from libc.stdlib cimport free

from bncpu._threads cimport threads_begin, threads_end
from bncpu._kernels._common cimport (
    BNCPU_OK, BNCPU_ERR_NULL_POINTER, BNCPU_ERR_BAD_SIZE, BNCPU_ERR_ONE_VALUE,
    BNCPU_ERR_ALIASED_STATS, BNCPU_ERR_NO_MEMORY, Region, region, check_aliasing,
    alloc_values, check_sizes, check_eps, check_momentum)
from bncpu._kernels._primitives cimport (
    real, LANES, STATS_BLOCK, span_stats, block_stats, merge_stats, sum_dy_xmu_span, split_center,
    zero_lanes, sum_lanes, add_span, add_dev_span, add_dev_span_f64, finish_dev,
    add_dy_xmu_span, finish_dy_xmu, f32_add_column_sums, f32_add_column_dev_sums,
    f32_add_column_grad_sums, add_grad_sums_f64, affine_span, affine_relu_span, scale_span,
    backward_span, masked,
    use_streaming, STREAM_MIN_SPAN_BYTES)

cdef enum:
    BN_PIECE = 65536       # values per piece of a row (a unit of parallel work)
    SPLIT_MIN_S = 4096     # split mode only when rows are at least this long
    SHORT_ROW = 224        # rows up to this long: column mode (S = 256 measured slower)
    PASS_SHORT_ROW = 64    # rows shorter than this: elementwise passes along matrix rows,
    COLUMN_COEFS_MAX = 8192   # ... when C·S is at most this (the coefficients, repeated
                              # per column, then stay in L2 cache)
    TILE_COLUMNS = 512     # column mode: matrix columns per tile, at most
    TILE_VALUES = 32768    # column mode: values per tile, about
    TILE_HEAD_ROWS = 8     # column mode, float32: rows whose mean centers a one-pass try
    PASS_VALUES = 65536    # column mode: values per task of the elementwise passes, about
    SEGMENT_VALUES = 32768 # short rows: values per task of the elementwise passes, about
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

# The passes: PASS_AFFINE and PASS_AFFINE_RELU (y = relu(affine(x) + residual), batch
# norm + (add +) ReLU fused) forward; PASS_BACKWARD and PASS_SCALE backward, of g = dy
# or, given the fused forward's output as `mask`, of g = dy where it passed the ReLU,
# else 0 (then g is also written to g_out when given: grad_residual).
cdef enum Pass:
    PASS_AFFINE
    PASS_AFFINE_RELU
    PASS_BACKWARD
    PASS_SCALE


# --------------------------------------------------------------------------------
# Work layout helpers
# --------------------------------------------------------------------------------
cdef inline int64_t pieces_per_row(int64_t s) noexcept nogil:
    """Pieces a row of s values is cut into: BN_PIECE values each, the last shorter."""
    return (s + BN_PIECE - 1) // BN_PIECE if s > 0 else 0


cdef inline int64_t piece_length(int64_t s, int64_t piece) noexcept nogil:
    """Values in piece number `piece` of a row of s values (it starts at piece·BN_PIECE)."""
    return min(<int64_t>BN_PIECE, s - piece * BN_PIECE)


# --------------------------------------------------------------------------------
# The work modes (each file says how it cuts the work)
# --------------------------------------------------------------------------------
include "_bn_column.pxi"
include "_bn_channel.pxi"
include "_bn_split.pxi"
include "_bn_passes.pxi"
include "_bn_half.pxi"

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
        partials = <double*>alloc_values(2 * tiles.n_blocks, c, sizeof(double), False)
        if partials == NULL:
            return BNCPU_ERR_NO_MEMORY
        for task in prange(tiles.n_blocks * tiles.n_chunks, schedule='static',
                           num_threads=n_threads):
            stats_tile_task(x, &tiles, task, partials)
        merge_tile_stats(&tiles, partials, partials + tiles.n_blocks * c, mean, m2)
        free(partials)
    elif use_split_mode(c, s, n_threads):
        n_tasks = c * n * pieces_per_row(s)
        partials = <double*>alloc_values(3, n_tasks, sizeof(double), False)
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


cdef int all_channel_grad_sums(const real* dy, const real* mask, const real* x, int64_t n,
                               int64_t c, int64_t s, const double* mean, int n_threads,
                               double* sum_dy, double* sum_dy_xmu,
                               real* scaled=NULL, real* g_out=NULL,
                               const real* coefs=NULL) noexcept nogil:
    """Per-channel Σdy and Σdy·(x - mean) in any mode, dy masked by mask (may be NULL,
    see Pass); returns a status.

    Column mode only: if `scaled` is given, also scaled = dy·scale (the evaluation
    backward's dx, PASS_SCALE with `coefs` and g_out), tile by tile while dy is in
    cache."""
    cdef int64_t j, task, n_tasks, chunk, t, run
    cdef Tiles tiles
    cdef double* partials
    cdef real* center
    cdef real* by_column = NULL
    cdef int64_t k
    if use_column_mode(s):
        tiles = tiles_of(n, c, s)
        partials = <double*>alloc_values(2 * tiles.n_blocks, c, sizeof(double), False)
        center = <real*>alloc_values(c, s, sizeof(real), False)
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
            grad_sums_tile_task(dy, mask, x, &tiles, task, center, partials, scaled, g_out,
                                by_column)
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
        partials = <double*>alloc_values(2, n_tasks, sizeof(double), False)
        if partials == NULL:
            return BNCPU_ERR_NO_MEMORY
        for task in prange(n_tasks, schedule='static', num_threads=n_threads):
            piece_grad_sums_task(dy, mask, x, task, n, c, s, mean, partials)
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
            channel_grad_sums(dy, mask, x, n, c, s, chunk * run, min(chunk * run + run, c),
                              mean, sum_dy, sum_dy_xmu)
    return BNCPU_OK


# --------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------
cdef int train_status(const void* x, const void* residual, const void* y, int64_t n,
                      int64_t c, int64_t s, const void* weight, const void* bias,
                      const void* running_mean, const void* running_var, double momentum,
                      double eps, const void* save_mean, const void* save_invstd,
                      size_t data_size, size_t param_size) noexcept nogil:
    """The training forward's argument checks, data of data_size bytes a value and
    parameters and statistics of param_size: a status."""
    cdef int status = check_sizes(n, c, s)
    cdef Region outputs[5]
    cdef Region inputs[4]
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
    if n * s == 1:
        return BNCPU_ERR_ONE_VALUE
    outputs[0] = region(y, n * c * s, data_size, True)
    outputs[1] = region(running_mean, c, param_size, False)
    outputs[2] = region(running_var, c, param_size, False)
    outputs[3] = region(save_mean, c, param_size, False)
    outputs[4] = region(save_invstd, c, param_size, False)
    inputs[0] = region(x, n * c * s, data_size, True)
    inputs[1] = region(residual, n * c * s, data_size, True)
    inputs[2] = region(weight, c, param_size, False)
    inputs[3] = region(bias, c, param_size, False)
    return check_aliasing(outputs, 5, inputs, 4)


cdef void empty_batch_stats(int64_t c, double eps, real* save_mean,
                            real* save_invstd) noexcept nogil:
    """Empty batch: nothing to normalize, running statistics untouched; the saved
    statistics are those of mean 0 and variance 0."""
    cdef int64_t j
    for j in range(c if save_mean != NULL or save_invstd != NULL else 0):
        if save_mean != NULL:
            save_mean[j] = 0
        if save_invstd != NULL:
            save_invstd[j] = <real>invstd_of(0.0, eps)


cdef void save_train_stats(int64_t c, const double* mean, const double* var, double count,
                           double eps, real* running_mean, real* running_var,
                           double momentum, int unbiased, real* save_mean,
                           real* save_invstd) noexcept nogil:
    """The training forward's results besides y: the saved and running statistics."""
    cdef int64_t j
    for j in range(c):
        if save_mean != NULL:
            save_mean[j] = <real>mean[j]
        if save_invstd != NULL:
            save_invstd[j] = <real>invstd_of(var[j], eps)
        update_running(running_mean, running_var, j, mean[j], var[j], count, momentum,
                       unbiased)


cdef int forward_train(Pass kind, const real* x, const real* residual, real* y, int64_t n,
                       int64_t c, int64_t s, const real* weight, const real* bias,
                       real* running_mean, real* running_var, double momentum, double eps,
                       real* save_mean, real* save_invstd, int unbiased) noexcept nogil:
    """The training forward, its pass PASS_AFFINE or PASS_AFFINE_RELU (with residual)."""
    cdef int status = train_status(x, residual, y, n, c, s, weight, bias, running_mean,
                                   running_var, momentum, eps, save_mean, save_invstd,
                                   sizeof(real), sizeof(real))
    cdef int n_threads
    cdef int64_t j, chunk, n_chunks, run, count = n * s
    cdef bint stream = use_streaming(y, x, residual, n * c * s * sizeof(real))
    cdef double* mean
    cdef double* var
    cdef real* coefs
    if status != BNCPU_OK or c == 0:
        return status
    if count == 0:
        empty_batch_stats(c, eps, save_mean, save_invstd)
        return BNCPU_OK
    mean = <double*>alloc_values(2, c, sizeof(double), False)
    coefs = <real*>alloc_values(CHANNEL_COEFS, c, sizeof(real), False)
    if mean == NULL or coefs == NULL:
        free(mean)
        free(coefs)
        return BNCPU_ERR_NO_MEMORY
    var = mean + c
    n_threads = threads_begin(n * c * s)
    if use_column_mode(s) or use_split_mode(c, s, n_threads):
        # Statistics (merged across tasks), then a second parallel pass.
        status = all_channel_stats(x, n, c, s, n_threads, mean, var)
        if status == BNCPU_OK:
            for j in range(c):
                var[j] = var[j] / count
                set_affine_coefs(coefs, c, j, mean[j], invstd_of(var[j], eps), weight, bias)
            run_pass(kind, x, residual, NULL, y, NULL, n, c, s, coefs, n_threads)
    elif s >= STATS_BLOCK:
        run = channel_run(c, s, sizeof(real), n_threads)
        for chunk in prange((c + run - 1) // run, schedule='static', num_threads=n_threads):
            train_channel_run(kind, x, residual, y, n, c, s, chunk * run,
                              min(chunk * run + run, c), weight, bias, eps, mean, var,
                              coefs, stream)
    else:
        for j in prange(c, schedule='static', num_threads=n_threads):
            train_channel(kind, x, residual, y, n, c, s, j, weight, bias, eps, mean, var,
                          coefs, stream)
    threads_end(n_threads)
    if status == BNCPU_OK:
        save_train_stats(c, mean, var, <double>count, eps, running_mean, running_var, momentum,
                         unbiased, save_mean, save_invstd)
    free(mean)
    free(coefs)
    return status


cdef int bn_forward_train(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                          const real* weight, const real* bias,
                          real* running_mean, real* running_var,
                          double momentum, double eps,
                          real* save_mean, real* save_invstd, int unbiased) noexcept nogil:
    return forward_train(PASS_AFFINE, x, NULL, y, n, c, s, weight, bias, running_mean,
                         running_var, momentum, eps, save_mean, save_invstd, unbiased)


cdef int bn_relu_forward_train(const real* x, const real* residual, real* y, int64_t n,
                               int64_t c, int64_t s, const real* weight, const real* bias,
                               real* running_mean, real* running_var, double momentum,
                               double eps, real* save_mean, real* save_invstd,
                               int unbiased) noexcept nogil:
    """relu(batch_norm(x) + residual) (residual may be NULL), training: after the
    statistics, one pass over x and the residual, as the batch-norm pass alone."""
    return forward_train(PASS_AFFINE_RELU, x, residual, y, n, c, s, weight, bias,
                         running_mean, running_var, momentum, eps, save_mean, save_invstd,
                         unbiased)


cdef int eval_status(const void* x, const void* residual, const void* y, int64_t n,
                     int64_t c, int64_t s, const void* weight, const void* bias,
                     const void* running_mean, const void* running_var, double eps,
                     size_t data_size, size_t param_size) noexcept nogil:
    """The evaluation forward's argument checks, data of data_size bytes a value and
    parameters of param_size: a status."""
    cdef int status = check_sizes(n, c, s)
    cdef Region output
    cdef Region inputs[6]
    if status == BNCPU_OK:
        status = check_eps(eps)
    if status != BNCPU_OK:
        return status
    if c > 0 and (running_mean == NULL or running_var == NULL):
        return BNCPU_ERR_NULL_POINTER
    if (x == NULL or y == NULL) and n * c * s > 0:
        return BNCPU_ERR_NULL_POINTER
    output = region(y, n * c * s, data_size, True)
    inputs[0] = region(x, n * c * s, data_size, True)
    inputs[1] = region(residual, n * c * s, data_size, True)
    inputs[2] = region(weight, c, param_size, False)
    inputs[3] = region(bias, c, param_size, False)
    inputs[4] = region(running_mean, c, param_size, False)
    inputs[5] = region(running_var, c, param_size, False)
    return check_aliasing(&output, 1, inputs, 6)


cdef int forward_eval(Pass kind, const real* x, const real* residual, real* y, int64_t n,
                      int64_t c, int64_t s, const real* weight, const real* bias,
                      const real* running_mean, const real* running_var,
                      double eps) noexcept nogil:
    """The evaluation forward, its pass PASS_AFFINE or PASS_AFFINE_RELU (with residual)."""
    cdef int status = eval_status(x, residual, y, n, c, s, weight, bias, running_mean,
                                  running_var, eps, sizeof(real), sizeof(real))
    cdef int n_threads
    cdef int64_t j
    cdef real* coefs
    if status != BNCPU_OK or n * c * s == 0:
        return status
    coefs = <real*>alloc_values(CHANNEL_COEFS, c, sizeof(real), False)
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_affine_coefs(coefs, c, j, running_mean[j], invstd_of(running_var[j], eps), weight, bias)
    n_threads = threads_begin(n * c * s)
    run_pass(kind, x, residual, NULL, y, NULL, n, c, s, coefs, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


cdef int bn_forward_eval(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                         const real* weight, const real* bias,
                         const real* running_mean, const real* running_var,
                         double eps) noexcept nogil:
    return forward_eval(PASS_AFFINE, x, NULL, y, n, c, s, weight, bias, running_mean,
                        running_var, eps)


cdef int bn_relu_forward_eval(const real* x, const real* residual, real* y, int64_t n,
                              int64_t c, int64_t s, const real* weight, const real* bias,
                              const real* running_mean, const real* running_var,
                              double eps) noexcept nogil:
    """relu(batch_norm(x) + residual) (residual may be NULL), evaluation: one pass."""
    return forward_eval(PASS_AFFINE_RELU, x, residual, y, n, c, s, weight, bias,
                        running_mean, running_var, eps)


# --------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------
cdef int backward_status(const void* dy, const void* mask, const void* x, const void* dx,
                         const void* g_out, int64_t n, int64_t c, int64_t s,
                         const void* weight, const void* running_mean,
                         const void* running_var, const void* save_mean,
                         const void* save_invstd, int training, double eps,
                         const void* dweight, const void* dbias, size_t data_size,
                         size_t param_size) noexcept nogil:
    """The backward's argument checks, data of data_size bytes a value and parameters
    and statistics of param_size: a status."""
    cdef int status = check_sizes(n, c, s)
    cdef bint need_sums = training or dweight != NULL or dbias != NULL
    cdef Region outputs[4]
    cdef Region inputs[6]
    if status == BNCPU_OK:
        status = check_eps(eps)
    if status != BNCPU_OK:
        return status
    if n * c * s > 0 and (dy == NULL or (x == NULL and need_sums)):
        return BNCPU_ERR_NULL_POINTER
    if c > 0 and training and (save_mean == NULL or save_invstd == NULL):
        return BNCPU_ERR_NULL_POINTER
    if c > 0 and not training and (running_mean == NULL or running_var == NULL):
        return BNCPU_ERR_NULL_POINTER
    outputs[0] = region(dx, n * c * s, data_size, True)
    outputs[1] = region(g_out, n * c * s, data_size, True)
    outputs[2] = region(dweight, c, param_size, False)
    outputs[3] = region(dbias, c, param_size, False)
    inputs[0] = region(dy, n * c * s, data_size, True)
    inputs[1] = region(mask, n * c * s, data_size, True)
    inputs[2] = region(x, n * c * s, data_size, True)
    inputs[3] = region(weight, c, param_size, False)
    # The statistics the mode reads (the others may be anything).
    inputs[4] = region(save_mean if training else running_mean, c, param_size, False)
    inputs[5] = region(save_invstd if training else running_var, c, param_size, False)
    return check_aliasing(outputs, 4, inputs, 6)


cdef void empty_backward(int64_t c, const real* running_var, const real* save_invstd,
                         int training, double eps, real* dweight, real* dbias) noexcept nogil:
    """No values: the sums are empty (0), and dweight = 0·invstd (NaN for an infinite
    invstd, as the formula gives)."""
    cdef int64_t j
    for j in range(c if dweight != NULL or dbias != NULL else 0):
        if dweight != NULL:
            dweight[j] = <real>(0.0 * (save_invstd[j] if training
                                       else invstd_of(running_var[j], eps)))
        if dbias != NULL:
            dbias[j] = 0


cdef void backward_stats(int64_t c, const real* weight, const real* running_mean,
                         const real* running_var, const real* save_mean,
                         const real* save_invstd, int training, double eps, double* mean,
                         double* invstd, double* sum_dy, double* sum_dy_xmu,
                         real* coefs) noexcept nogil:
    """The backward's per-channel mean and invstd (saved, or from the running statistics),
    zeroed sums and, in evaluation, the scale of dx = dy·w·invstd."""
    cdef int64_t j
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


cdef void save_backward_grads(int64_t c, const double* invstd, const double* sum_dy,
                              const double* sum_dy_xmu, real* dweight,
                              real* dbias) noexcept nogil:
    cdef int64_t j
    for j in range(c):
        if dweight != NULL:
            dweight[j] = <real>(sum_dy_xmu[j] * invstd[j])
        if dbias != NULL:
            dbias[j] = <real>sum_dy[j]


cdef int backward(const real* dy, const real* mask, const real* x, real* dx, real* g_out,
                  int64_t n, int64_t c, int64_t s, const real* weight,
                  const real* running_mean, const real* running_var, const real* save_mean,
                  const real* save_invstd, int training, double eps, real* dweight,
                  real* dbias) noexcept nogil:
    """The backward of g = dy, or of g = dy masked by the fused forward's output `mask`
    (g also to g_out when given; see Pass)."""
    cdef int status = backward_status(dy, mask, x, dx, g_out, n, c, s, weight, running_mean,
                                      running_var, save_mean, save_invstd, training, eps,
                                      dweight, dbias, sizeof(real), sizeof(real))
    cdef int n_threads
    cdef int64_t j, chunk, run, count = n * s
    cdef double* mean
    cdef double* invstd
    cdef double* sum_dy
    cdef double* sum_dy_xmu
    cdef real* coefs
    cdef bint need_sums = training or dweight != NULL or dbias != NULL
    cdef bint fused_scale
    if status != BNCPU_OK or c == 0:
        return status
    if count == 0:
        empty_backward(c, running_var, save_invstd, training, eps, dweight, dbias)
        return BNCPU_OK
    mean = <double*>alloc_values(4, c, sizeof(double), False)
    coefs = <real*>alloc_values(CHANNEL_COEFS, c, sizeof(real), False)
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
    if use_column_mode(s) or use_split_mode(c, s, n_threads) or not need_sums:
        # Evaluation in column mode: dx = dy·scale computed with the sums, tile by tile.
        # (use_column_pass implies column mode, whose sums honor `scaled`.)
        fused_scale = use_column_pass(c, s) and need_sums and not training and dx != NULL
        if need_sums:
            status = all_channel_grad_sums(dy, mask, x, n, c, s, mean, n_threads, sum_dy,
                                           sum_dy_xmu, dx if fused_scale else NULL, g_out,
                                           coefs)
        if status == BNCPU_OK and dx != NULL and not fused_scale:
            if training:
                for j in range(c):
                    set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j],
                                       sum_dy_xmu[j], <double>count)
            run_pass(PASS_BACKWARD if training else PASS_SCALE, dy, x, mask, dx, g_out, n, c,
                     s, coefs, n_threads)
    else:
        run = channel_run(c, s, sizeof(real), n_threads)
        for chunk in prange((c + run - 1) // run, schedule='static', num_threads=n_threads):
            backward_channels(dy, mask, x, dx, g_out, n, c, s, chunk * run,
                              min(chunk * run + run, c), mean, invstd, weight, training,
                              sum_dy, sum_dy_xmu, coefs,
                              use_streaming(dx, dy, x, n * c * s * sizeof(real))
                              and <const real*>dx != mask)
    threads_end(n_threads)
    if status == BNCPU_OK:
        save_backward_grads(c, invstd, sum_dy, sum_dy_xmu, dweight, dbias)
    free(mean)
    free(coefs)
    return status


cdef int bn_backward(const real* dy, const real* x, real* dx, int64_t n, int64_t c, int64_t s,
                     const real* weight, const real* running_mean, const real* running_var,
                     const real* save_mean, const real* save_invstd, int training, double eps,
                     real* dweight, real* dbias) noexcept nogil:
    return backward(dy, NULL, x, dx, NULL, n, c, s, weight, running_mean, running_var,
                    save_mean, save_invstd, training, eps, dweight, dbias)


cdef int bn_relu_backward(const real* dy, const real* y, const real* x, real* dx,
                          int64_t n, int64_t c, int64_t s, const real* weight,
                          const real* running_mean, const real* running_var,
                          const real* save_mean, const real* save_invstd, int training,
                          double eps, real* dweight, real* dbias,
                          real* dresidual) noexcept nogil:
    """Backward of bn_relu_forward_*: g = dy where y (the forward's output) passed the
    ReLU, else 0, applied as dy is read in the sums and in the pass; the rest is the
    batch-norm backward of g, and dresidual = g when given (may be NULL)."""
    if check_sizes(n, c, s) == BNCPU_OK and n * c * s > 0 and (y == NULL or dx == NULL):
        return BNCPU_ERR_NULL_POINTER
    return backward(dy, y, x, dx, dresidual, n, c, s, weight, running_mean, running_var,
                    save_mean, save_invstd, training, eps, dweight, dbias)


# --------------------------------------------------------------------------------
# Split phase: the building blocks of synchronized batch norm
# --------------------------------------------------------------------------------
cdef int stats_status(const void* x, int64_t n, int64_t c, int64_t s, const double* mean,
                      const double* m2, size_t data_size) noexcept nogil:
    """batch_norm_stats' argument checks, data of data_size bytes a value: a status."""
    cdef int status = check_sizes(n, c, s)
    cdef Region outputs[2]
    cdef Region data
    if status != BNCPU_OK:
        return status
    if c > 0 and (mean == NULL or m2 == NULL or (x == NULL and n * s > 0)):
        return BNCPU_ERR_NULL_POINTER
    outputs[0] = region(mean, c, sizeof(double), False)
    outputs[1] = region(m2, c, sizeof(double), False)
    data = region(x, n * c * s, data_size, True)
    return check_aliasing(outputs, 2, &data, 1)


cdef void zero_stats(int64_t c, double* a, double* b) noexcept nogil:
    cdef int64_t j
    for j in range(c):
        a[j] = 0
        b[j] = 0


cdef int bn_stats(const real* x, int64_t n, int64_t c, int64_t s,
                  double* mean, double* m2) noexcept nogil:
    cdef int status = stats_status(x, n, c, s, mean, m2, sizeof(real))
    cdef int n_threads
    if status != BNCPU_OK:
        return status
    if n * s == 0:
        zero_stats(c, mean, m2)
        return BNCPU_OK
    n_threads = threads_begin(n * c * s)
    status = all_channel_stats(x, n, c, s, n_threads, mean, m2)
    threads_end(n_threads)
    return status


cdef int bn_gather_stats(int64_t p, int64_t c, const double* mean, const double* m2,
                         const int64_t* counts, real* running_mean, real* running_var,
                         double momentum, double eps,
                         double* mean_out, double* invstd_out, int unbiased) noexcept nogil:
    cdef int status = check_sizes(p, c, 1)
    cdef int64_t j, q
    cdef double count, total_mean, total_m2
    cdef Region outputs[4]
    cdef Region inputs[3]
    if status == BNCPU_OK:
        status = check_eps(eps)
    if status == BNCPU_OK:
        status = check_momentum(momentum)
    if status != BNCPU_OK:
        return status
    if p > 0 and counts == NULL:   # p counts are read even when there are no channels
        return BNCPU_ERR_NULL_POINTER
    if c > 0 and (mean_out == NULL or invstd_out == NULL
                  or (p > 0 and (mean == NULL or m2 == NULL))):
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
    outputs[0] = region(running_mean, c, sizeof(real), False)
    outputs[1] = region(running_var, c, sizeof(real), False)
    outputs[2] = region(mean_out, c, sizeof(double), False)
    outputs[3] = region(invstd_out, c, sizeof(double), False)
    inputs[0] = region(mean, p * c, sizeof(double), False)
    inputs[1] = region(m2, p * c, sizeof(double), False)
    inputs[2] = region(counts, p, sizeof(int64_t), False)
    status = check_aliasing(outputs, 4, inputs, 3)
    if status != BNCPU_OK:
        return status
    for j in range(c):
        count = 0
        total_mean = 0
        total_m2 = 0
        for q in range(p):
            merge_stats(&count, &total_mean, &total_m2, <double>counts[q], mean[q * c + j], m2[q * c + j])
        mean_out[j] = total_mean
        invstd_out[j] = invstd_of(total_m2 / count if count > 0 else 0.0, eps)
        update_running(running_mean, running_var, j, total_mean,
                       total_m2 / count if count > 0 else 0.0, count, momentum, unbiased)
    return BNCPU_OK


cdef int elemt_status(const void* x, const void* y, int64_t n, int64_t c, int64_t s,
                      const double* mean, const double* invstd, const void* weight,
                      const void* bias, size_t data_size, size_t param_size) noexcept nogil:
    """batch_norm_elemt's argument checks (none beyond the sizes for empty data), data of
    data_size bytes a value and parameters of param_size: a status."""
    cdef int status = check_sizes(n, c, s)
    cdef Region output
    cdef Region inputs[5]
    if status != BNCPU_OK or n * c * s == 0:
        return status
    if x == NULL or y == NULL or mean == NULL or invstd == NULL:
        return BNCPU_ERR_NULL_POINTER
    output = region(y, n * c * s, data_size, True)
    inputs[0] = region(x, n * c * s, data_size, True)
    inputs[1] = region(mean, c, sizeof(double), False)
    inputs[2] = region(invstd, c, sizeof(double), False)
    inputs[3] = region(weight, c, param_size, False)
    inputs[4] = region(bias, c, param_size, False)
    return check_aliasing(&output, 1, inputs, 5)


cdef int bn_elemt(const real* x, real* y, int64_t n, int64_t c, int64_t s,
                  const double* mean, const double* invstd,
                  const real* weight, const real* bias) noexcept nogil:
    cdef int status = elemt_status(x, y, n, c, s, mean, invstd, weight, bias, sizeof(real),
                                   sizeof(real))
    cdef int n_threads
    cdef int64_t j
    cdef real* coefs
    if status != BNCPU_OK or n * c * s == 0:
        return status
    coefs = <real*>alloc_values(CHANNEL_COEFS, c, sizeof(real), False)
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_affine_coefs(coefs, c, j, mean[j], invstd[j], weight, bias)
    n_threads = threads_begin(n * c * s)
    run_pass(PASS_AFFINE, x, NULL, NULL, y, NULL, n, c, s, coefs, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


cdef int reduce_status(const void* dy, const void* x, int64_t n, int64_t c, int64_t s,
                       const double* mean, const double* sum_dy, const double* sum_dy_xmu,
                       size_t data_size) noexcept nogil:
    """batch_norm_backward_reduce's argument checks, data of data_size bytes a value: a
    status."""
    cdef int status = check_sizes(n, c, s)
    cdef Region outputs[2]
    cdef Region inputs[3]
    if status != BNCPU_OK:
        return status
    if c > 0 and (mean == NULL or sum_dy == NULL or sum_dy_xmu == NULL
                  or (n * s > 0 and (dy == NULL or x == NULL))):
        return BNCPU_ERR_NULL_POINTER
    outputs[0] = region(sum_dy, c, sizeof(double), False)
    outputs[1] = region(sum_dy_xmu, c, sizeof(double), False)
    inputs[0] = region(dy, n * c * s, data_size, True)
    inputs[1] = region(x, n * c * s, data_size, True)
    inputs[2] = region(mean, c, sizeof(double), False)
    return check_aliasing(outputs, 2, inputs, 3)


cdef int bn_backward_reduce(const real* dy, const real* x, int64_t n, int64_t c, int64_t s,
                            const double* mean, double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    cdef int status = reduce_status(dy, x, n, c, s, mean, sum_dy, sum_dy_xmu, sizeof(real))
    cdef int n_threads
    if status != BNCPU_OK:
        return status
    if n * s == 0:
        zero_stats(c, sum_dy, sum_dy_xmu)
        return BNCPU_OK
    n_threads = threads_begin(n * c * s)
    status = all_channel_grad_sums(dy, NULL, x, n, c, s, mean, n_threads, sum_dy, sum_dy_xmu)
    threads_end(n_threads)
    return status


cdef int backward_elemt_status(const void* dy, const void* x, const void* dx, int64_t n,
                               int64_t c, int64_t s, const double* mean, const double* invstd,
                               const void* weight, const double* sum_dy,
                               const double* sum_dy_xmu, int64_t count, size_t data_size,
                               size_t param_size) noexcept nogil:
    """batch_norm_backward_elemt's argument checks (none beyond the sizes and count for
    empty data), data of data_size bytes a value and the weight of param_size: a
    status."""
    cdef int status = check_sizes(n, c, s)
    cdef Region output
    cdef Region inputs[7]
    if status != BNCPU_OK:
        return status
    if count < 0 or (count == 0 and n * s > 0):
        return BNCPU_ERR_BAD_SIZE
    if n * c * s == 0:
        return BNCPU_OK
    if (dy == NULL or x == NULL or dx == NULL or mean == NULL or invstd == NULL
            or sum_dy == NULL or sum_dy_xmu == NULL):
        return BNCPU_ERR_NULL_POINTER
    output = region(dx, n * c * s, data_size, True)
    inputs[0] = region(dy, n * c * s, data_size, True)
    inputs[1] = region(x, n * c * s, data_size, True)
    inputs[2] = region(mean, c, sizeof(double), False)
    inputs[3] = region(invstd, c, sizeof(double), False)
    inputs[4] = region(weight, c, param_size, False)
    inputs[5] = region(sum_dy, c, sizeof(double), False)
    inputs[6] = region(sum_dy_xmu, c, sizeof(double), False)
    return check_aliasing(&output, 1, inputs, 7)


cdef int bn_backward_elemt(const real* dy, const real* x, real* dx, int64_t n, int64_t c, int64_t s,
                           const double* mean, const double* invstd, const real* weight,
                           const double* sum_dy, const double* sum_dy_xmu,
                           int64_t count) noexcept nogil:
    cdef int status = backward_elemt_status(dy, x, dx, n, c, s, mean, invstd, weight, sum_dy,
                                            sum_dy_xmu, count, sizeof(real), sizeof(real))
    cdef int n_threads
    cdef int64_t j
    cdef real* coefs
    if status != BNCPU_OK or n * c * s == 0:
        return status
    coefs = <real*>alloc_values(CHANNEL_COEFS, c, sizeof(real), False)
    if coefs == NULL:
        return BNCPU_ERR_NO_MEMORY
    for j in range(c):
        set_backward_coefs(coefs, c, j, mean[j], invstd[j], weight, sum_dy[j], sum_dy_xmu[j], <double>count)
    n_threads = threads_begin(n * c * s)
    run_pass(PASS_BACKWARD, dy, x, NULL, dx, NULL, n, c, s, coefs, n_threads)
    threads_end(n_threads)
    free(coefs)
    return BNCPU_OK


# --------------------------------------------------------------------------------
# The C API: this module's entries of the bncpu_api table (generated from the manifest)
# --------------------------------------------------------------------------------
include "_fill_batch_norm.pxi"
