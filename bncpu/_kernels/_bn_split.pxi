# Batch norm, split mode: included by batch_norm.pyx, so it compiles inside each ISA build.
#
# Fewer channels than threads (e.g. (4, 1, 512, 512)): the pieces of every channel row
# (BN_PIECE values) are the tasks, spread over the threads; their partials are merged
# per channel in (row, piece) order, as channel mode folds them, so both modes give the
# same bits.


cdef inline bint use_split_mode(int64_t c, int64_t s, int n_threads) noexcept nogil:
    return n_threads > 1 and s >= SPLIT_MIN_S and c < 2 * n_threads


cdef inline void piece_bounds(int64_t task, int64_t n, int64_t c, int64_t s,
                              int64_t* channel, int64_t* offset, int64_t* length) noexcept nogil:
    """Task t covers piece p of row i of channel j, t = (j·N + i)·P + p."""
    cdef int64_t per_row = pieces_per_row(s)
    cdef int64_t p = task % per_row
    cdef int64_t i = (task // per_row) % n
    channel[0] = task // (per_row * n)
    offset[0] = (i * c + channel[0]) * s + p * BN_PIECE
    length[0] = piece_length(s, p)


cdef void piece_stats_task(const real* x, int64_t task, int64_t n, int64_t c, int64_t s,
                           double* partials) noexcept nogil:
    """Split mode: (count, mean, M2) of one piece into partials[3·task:3·task+3]."""
    cdef int64_t j, offset, length
    piece_bounds(task, n, c, s, &j, &offset, &length)
    partials[3 * task] = 0
    partials[3 * task + 1] = 0
    partials[3 * task + 2] = 0
    span_stats(x + offset, length, &partials[3 * task], &partials[3 * task + 1], &partials[3 * task + 2])


cdef void piece_grad_sums_task(const real* dy, const real* mask, const real* x, int64_t task,
                               int64_t n, int64_t c, int64_t s, const double* mean,
                               double* partials) noexcept nogil:
    """Split mode: Σdy and Σdy·(x - mean) of one piece into partials[2·task:2·task+2]
    (dy masked by mask, may be NULL: see Pass)."""
    cdef int64_t j, offset, length
    piece_bounds(task, n, c, s, &j, &offset, &length)
    partials[2 * task] = 0
    partials[2 * task + 1] = 0
    sum_dy_xmu_span(dy + offset, mask + offset if mask != NULL else NULL, x + offset, length,
                    mean[j], &partials[2 * task], &partials[2 * task + 1])
