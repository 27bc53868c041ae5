"""The Python-callable kernel wrappers: one per kernel, compiled once (not per ISA build),
each calling the C API table that bncpu._dispatch filled with the chosen build.

The arrays come validated by bncpu._validate (C-contiguous, one float dtype, right
sizes; None for an absent optional array). Every wrapper releases the GIL for the call
and returns the kernel's bncpu_status. The dtype picks the table member (_f32 or _f64)
through the fused type ``real``; the member's pointer is typed, so a wrapper whose
arguments disagree with the header does not compile.

Two namespaces keep the names the Python layers call: ``batch_norm`` (forward_train,
forward_eval, backward, stats, gather_stats, elemt, backward_reduce, backward_elemt)
and ``row_norm`` (forward, backward).
"""
from types import SimpleNamespace

from libc.stdint cimport int64_t
cimport numpy as cnp

from bncpu import _dispatch   # fills the table before api_table() is read below
from bncpu._capi cimport api_table
from bncpu._kernels._api_table cimport bncpu_api

cnp.import_array()

ctypedef fused real:
    float
    double

cdef const bncpu_api* API = api_table()


cdef inline void* ptr(object array):
    """Data pointer of a validated ndarray, NULL for None."""
    if array is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline bint is_float32(object array):
    return cnp.PyArray_TYPE(<cnp.ndarray>array) == cnp.NPY_FLOAT32


# ----------------------------------------------------------------------------------
# Batch norm. In each helper, `kind` (a NULL real*) only selects the specialization.
# ----------------------------------------------------------------------------------
cdef int _forward_train(real* kind, x, y, int64_t n, int64_t c, int64_t s, weight, bias,
                        running_mean, running_var, double momentum, double eps, save_mean,
                        save_invstd, bint unbiased):
    cdef int (*fn)(const real*, real*, int64_t, int64_t, int64_t, const real*, const real*,
                   real*, real*, double, double, real*, real*, int) noexcept nogil
    cdef void* a[8]
    cdef int status
    if real is float:
        fn = API.batch_norm_forward_train_f32
    else:
        fn = API.batch_norm_forward_train_f64
    a[:] = [ptr(x), ptr(y), ptr(weight), ptr(bias), ptr(running_mean), ptr(running_var),
            ptr(save_mean), ptr(save_invstd)]
    with nogil:
        status = fn(<const real*>a[0], <real*>a[1], n, c, s, <const real*>a[2],
                    <const real*>a[3], <real*>a[4], <real*>a[5], momentum, eps, <real*>a[6],
                    <real*>a[7], unbiased)
    return status


def bn_forward_train(x, y, int64_t n, int64_t c, int64_t s, weight, bias, running_mean,
                     running_var, double momentum, double eps, save_mean, save_invstd,
                     bint unbiased=True):
    if is_float32(x):
        return _forward_train(<float*>NULL, x, y, n, c, s, weight, bias, running_mean,
                              running_var, momentum, eps, save_mean, save_invstd, unbiased)
    return _forward_train(<double*>NULL, x, y, n, c, s, weight, bias, running_mean,
                          running_var, momentum, eps, save_mean, save_invstd, unbiased)


cdef int _forward_eval(real* kind, x, y, int64_t n, int64_t c, int64_t s, weight, bias,
                       running_mean, running_var, double eps):
    cdef int (*fn)(const real*, real*, int64_t, int64_t, int64_t, const real*, const real*,
                   const real*, const real*, double) noexcept nogil
    cdef void* a[6]
    cdef int status
    if real is float:
        fn = API.batch_norm_forward_eval_f32
    else:
        fn = API.batch_norm_forward_eval_f64
    a[:] = [ptr(x), ptr(y), ptr(weight), ptr(bias), ptr(running_mean), ptr(running_var)]
    with nogil:
        status = fn(<const real*>a[0], <real*>a[1], n, c, s, <const real*>a[2],
                    <const real*>a[3], <const real*>a[4], <const real*>a[5], eps)
    return status


def bn_forward_eval(x, y, int64_t n, int64_t c, int64_t s, weight, bias, running_mean,
                    running_var, double eps):
    if is_float32(x):
        return _forward_eval(<float*>NULL, x, y, n, c, s, weight, bias, running_mean,
                             running_var, eps)
    return _forward_eval(<double*>NULL, x, y, n, c, s, weight, bias, running_mean,
                         running_var, eps)


cdef int _backward(real* kind, dy, x, dx, int64_t n, int64_t c, int64_t s, weight,
                   running_mean, running_var, save_mean, save_invstd, bint training,
                   double eps, dweight, dbias):
    cdef int (*fn)(const real*, const real*, real*, int64_t, int64_t, int64_t, const real*,
                   const real*, const real*, const real*, const real*, int, double, real*,
                   real*) noexcept nogil
    cdef void* a[10]
    cdef int status
    if real is float:
        fn = API.batch_norm_backward_f32
    else:
        fn = API.batch_norm_backward_f64
    a[:] = [ptr(dy), ptr(x), ptr(dx), ptr(weight), ptr(running_mean), ptr(running_var),
            ptr(save_mean), ptr(save_invstd), ptr(dweight), ptr(dbias)]
    with nogil:
        status = fn(<const real*>a[0], <const real*>a[1], <real*>a[2], n, c, s,
                    <const real*>a[3], <const real*>a[4], <const real*>a[5], <const real*>a[6],
                    <const real*>a[7], training, eps, <real*>a[8], <real*>a[9])
    return status


def bn_backward(dy, x, dx, int64_t n, int64_t c, int64_t s, weight, running_mean, running_var,
                save_mean, save_invstd, bint training, double eps, dweight, dbias):
    if is_float32(dy):
        return _backward(<float*>NULL, dy, x, dx, n, c, s, weight, running_mean, running_var,
                         save_mean, save_invstd, training, eps, dweight, dbias)
    return _backward(<double*>NULL, dy, x, dx, n, c, s, weight, running_mean, running_var,
                     save_mean, save_invstd, training, eps, dweight, dbias)


cdef int _stats(real* kind, x, int64_t n, int64_t c, int64_t s, mean, m2):
    cdef int (*fn)(const real*, int64_t, int64_t, int64_t, double*, double*) noexcept nogil
    cdef const real* px = <const real*>ptr(x)
    cdef double* pmean = <double*>ptr(mean)
    cdef double* pm2 = <double*>ptr(m2)
    cdef int status
    if real is float:
        fn = API.batch_norm_stats_f32
    else:
        fn = API.batch_norm_stats_f64
    with nogil:
        status = fn(px, n, c, s, pmean, pm2)
    return status


def bn_stats(x, int64_t n, int64_t c, int64_t s, mean, m2):
    if is_float32(x):
        return _stats(<float*>NULL, x, n, c, s, mean, m2)
    return _stats(<double*>NULL, x, n, c, s, mean, m2)


cdef int _gather_stats(real* kind, int64_t p, int64_t c, mean, m2, counts, running_mean,
                       running_var, double momentum, double eps, mean_out, invstd_out,
                       bint unbiased):
    cdef int (*fn)(int64_t, int64_t, const double*, const double*, const int64_t*, real*,
                   real*, double, double, double*, double*, int) noexcept nogil
    cdef void* a[7]
    cdef int status
    if real is float:
        fn = API.batch_norm_gather_stats_f32
    else:
        fn = API.batch_norm_gather_stats_f64
    a[:] = [ptr(mean), ptr(m2), ptr(counts), ptr(running_mean), ptr(running_var),
            ptr(mean_out), ptr(invstd_out)]
    with nogil:
        status = fn(p, c, <const double*>a[0], <const double*>a[1], <const int64_t*>a[2],
                    <real*>a[3], <real*>a[4], momentum, eps, <double*>a[5], <double*>a[6],
                    unbiased)
    return status


def bn_gather_stats(int64_t p, int64_t c, mean, m2, counts, running_mean, running_var,
                    double momentum, double eps, mean_out, invstd_out, bint is_f32,
                    bint unbiased=True):
    """is_f32: the running statistics' dtype (they may be absent)."""
    if is_f32:
        return _gather_stats(<float*>NULL, p, c, mean, m2, counts, running_mean, running_var,
                             momentum, eps, mean_out, invstd_out, unbiased)
    return _gather_stats(<double*>NULL, p, c, mean, m2, counts, running_mean, running_var,
                         momentum, eps, mean_out, invstd_out, unbiased)


cdef int _elemt(real* kind, x, y, int64_t n, int64_t c, int64_t s, mean, invstd, weight, bias):
    cdef int (*fn)(const real*, real*, int64_t, int64_t, int64_t, const double*, const double*,
                   const real*, const real*) noexcept nogil
    cdef void* a[6]
    cdef int status
    if real is float:
        fn = API.batch_norm_elemt_f32
    else:
        fn = API.batch_norm_elemt_f64
    a[:] = [ptr(x), ptr(y), ptr(mean), ptr(invstd), ptr(weight), ptr(bias)]
    with nogil:
        status = fn(<const real*>a[0], <real*>a[1], n, c, s, <const double*>a[2],
                    <const double*>a[3], <const real*>a[4], <const real*>a[5])
    return status


def bn_elemt(x, y, int64_t n, int64_t c, int64_t s, mean, invstd, weight, bias):
    if is_float32(x):
        return _elemt(<float*>NULL, x, y, n, c, s, mean, invstd, weight, bias)
    return _elemt(<double*>NULL, x, y, n, c, s, mean, invstd, weight, bias)


cdef int _backward_reduce(real* kind, dy, x, int64_t n, int64_t c, int64_t s, mean, sum_dy,
                          sum_dy_xmu):
    cdef int (*fn)(const real*, const real*, int64_t, int64_t, int64_t, const double*,
                   double*, double*) noexcept nogil
    cdef void* a[5]
    cdef int status
    if real is float:
        fn = API.batch_norm_backward_reduce_f32
    else:
        fn = API.batch_norm_backward_reduce_f64
    a[:] = [ptr(dy), ptr(x), ptr(mean), ptr(sum_dy), ptr(sum_dy_xmu)]
    with nogil:
        status = fn(<const real*>a[0], <const real*>a[1], n, c, s, <const double*>a[2],
                    <double*>a[3], <double*>a[4])
    return status


def bn_backward_reduce(dy, x, int64_t n, int64_t c, int64_t s, mean, sum_dy, sum_dy_xmu):
    if is_float32(dy):
        return _backward_reduce(<float*>NULL, dy, x, n, c, s, mean, sum_dy, sum_dy_xmu)
    return _backward_reduce(<double*>NULL, dy, x, n, c, s, mean, sum_dy, sum_dy_xmu)


cdef int _backward_elemt(real* kind, dy, x, dx, int64_t n, int64_t c, int64_t s, mean, invstd,
                         weight, sum_dy, sum_dy_xmu, int64_t count):
    cdef int (*fn)(const real*, const real*, real*, int64_t, int64_t, int64_t, const double*,
                   const double*, const real*, const double*, const double*,
                   int64_t) noexcept nogil
    cdef void* a[8]
    cdef int status
    if real is float:
        fn = API.batch_norm_backward_elemt_f32
    else:
        fn = API.batch_norm_backward_elemt_f64
    a[:] = [ptr(dy), ptr(x), ptr(dx), ptr(mean), ptr(invstd), ptr(weight), ptr(sum_dy),
            ptr(sum_dy_xmu)]
    with nogil:
        status = fn(<const real*>a[0], <const real*>a[1], <real*>a[2], n, c, s,
                    <const double*>a[3], <const double*>a[4], <const real*>a[5],
                    <const double*>a[6], <const double*>a[7], count)
    return status


def bn_backward_elemt(dy, x, dx, int64_t n, int64_t c, int64_t s, mean, invstd, weight, sum_dy,
                      sum_dy_xmu, int64_t count):
    if is_float32(dy):
        return _backward_elemt(<float*>NULL, dy, x, dx, n, c, s, mean, invstd, weight, sum_dy,
                               sum_dy_xmu, count)
    return _backward_elemt(<double*>NULL, dy, x, dx, n, c, s, mean, invstd, weight, sum_dy,
                           sum_dy_xmu, count)


# ----------------------------------------------------------------------------------
# Batch norm + (add +) ReLU, fused
# ----------------------------------------------------------------------------------
cdef int _relu_forward_train(real* kind, x, residual, y, int64_t n, int64_t c, int64_t s,
                             weight, bias, running_mean, running_var, double momentum,
                             double eps, save_mean, save_invstd, bint unbiased):
    cdef int (*fn)(const real*, const real*, real*, int64_t, int64_t, int64_t, const real*,
                   const real*, real*, real*, double, double, real*, real*, int) noexcept nogil
    cdef void* a[9]
    cdef int status
    if real is float:
        fn = API.batch_norm_relu_forward_train_f32
    else:
        fn = API.batch_norm_relu_forward_train_f64
    a[:] = [ptr(x), ptr(residual), ptr(y), ptr(weight), ptr(bias), ptr(running_mean),
            ptr(running_var), ptr(save_mean), ptr(save_invstd)]
    with nogil:
        status = fn(<const real*>a[0], <const real*>a[1], <real*>a[2], n, c, s,
                    <const real*>a[3], <const real*>a[4], <real*>a[5], <real*>a[6], momentum,
                    eps, <real*>a[7], <real*>a[8], unbiased)
    return status


def bn_relu_forward_train(x, residual, y, int64_t n, int64_t c, int64_t s, weight, bias,
                          running_mean, running_var, double momentum, double eps, save_mean,
                          save_invstd, bint unbiased=True):
    if is_float32(x):
        return _relu_forward_train(<float*>NULL, x, residual, y, n, c, s, weight, bias,
                                   running_mean, running_var, momentum, eps, save_mean,
                                   save_invstd, unbiased)
    return _relu_forward_train(<double*>NULL, x, residual, y, n, c, s, weight, bias,
                               running_mean, running_var, momentum, eps, save_mean, save_invstd,
                               unbiased)


cdef int _relu_forward_eval(real* kind, x, residual, y, int64_t n, int64_t c, int64_t s,
                            weight, bias, running_mean, running_var, double eps):
    cdef int (*fn)(const real*, const real*, real*, int64_t, int64_t, int64_t, const real*,
                   const real*, const real*, const real*, double) noexcept nogil
    cdef void* a[7]
    cdef int status
    if real is float:
        fn = API.batch_norm_relu_forward_eval_f32
    else:
        fn = API.batch_norm_relu_forward_eval_f64
    a[:] = [ptr(x), ptr(residual), ptr(y), ptr(weight), ptr(bias), ptr(running_mean),
            ptr(running_var)]
    with nogil:
        status = fn(<const real*>a[0], <const real*>a[1], <real*>a[2], n, c, s,
                    <const real*>a[3], <const real*>a[4], <const real*>a[5], <const real*>a[6],
                    eps)
    return status


def bn_relu_forward_eval(x, residual, y, int64_t n, int64_t c, int64_t s, weight, bias,
                         running_mean, running_var, double eps):
    if is_float32(x):
        return _relu_forward_eval(<float*>NULL, x, residual, y, n, c, s, weight, bias,
                                  running_mean, running_var, eps)
    return _relu_forward_eval(<double*>NULL, x, residual, y, n, c, s, weight, bias,
                              running_mean, running_var, eps)


cdef int _relu_backward(real* kind, dy, y, x, dx, int64_t n, int64_t c, int64_t s, weight,
                        running_mean, running_var, save_mean, save_invstd, bint training,
                        double eps, dweight, dbias, dresidual):
    cdef int (*fn)(const real*, const real*, const real*, real*, int64_t, int64_t, int64_t,
                   const real*, const real*, const real*, const real*, const real*, int, double,
                   real*, real*, real*) noexcept nogil
    cdef void* a[12]
    cdef int status
    if real is float:
        fn = API.batch_norm_relu_backward_f32
    else:
        fn = API.batch_norm_relu_backward_f64
    a[:] = [ptr(dy), ptr(y), ptr(x), ptr(dx), ptr(weight), ptr(running_mean), ptr(running_var),
            ptr(save_mean), ptr(save_invstd), ptr(dweight), ptr(dbias), ptr(dresidual)]
    with nogil:
        status = fn(<const real*>a[0], <const real*>a[1], <const real*>a[2], <real*>a[3], n, c,
                    s, <const real*>a[4], <const real*>a[5], <const real*>a[6],
                    <const real*>a[7], <const real*>a[8], training, eps, <real*>a[9],
                    <real*>a[10], <real*>a[11])
    return status


def bn_relu_backward(dy, y, x, dx, int64_t n, int64_t c, int64_t s, weight, running_mean,
                     running_var, save_mean, save_invstd, bint training, double eps, dweight,
                     dbias, dresidual):
    if is_float32(dy):
        return _relu_backward(<float*>NULL, dy, y, x, dx, n, c, s, weight, running_mean,
                              running_var, save_mean, save_invstd, training, eps, dweight, dbias,
                              dresidual)
    return _relu_backward(<double*>NULL, dy, y, x, dx, n, c, s, weight, running_mean,
                          running_var, save_mean, save_invstd, training, eps, dweight, dbias,
                          dresidual)


# ----------------------------------------------------------------------------------
# Row norms: (n, c, s, groups); layer and RMS norm pass (rows, d, 1, 1). centered=True
# is group norm's entry (layer norm is group norm of one group of s = 1), False is RMS
# norm's, which takes rows of d values and no bias or mean.
# ----------------------------------------------------------------------------------
cdef int _check_rms(int64_t s, int64_t groups, bias, mean) except -1:
    if s != 1 or groups != 1 or bias is not None or mean is not None:
        raise ValueError("RMS norm takes (rows, d, 1, 1) and neither bias nor mean")
    return 0


cdef int _rows_forward(real* kind, x, y, int64_t n, int64_t c, int64_t s, int64_t groups,
                       weight, bias, double eps, bint centered, save_mean, save_rstd,
                       bint channels_last):
    cdef int (*group)(const real*, real*, int64_t, int64_t, int64_t, int64_t, const real*,
                      const real*, double, real*, real*) noexcept nogil
    cdef int (*rms)(const real*, real*, int64_t, int64_t, const real*, double,
                    real*) noexcept nogil
    cdef void* a[6]
    cdef int status
    if real is float:
        group = (API.group_norm_channels_last_forward_f32 if channels_last
                 else API.group_norm_forward_f32)
    else:
        group = (API.group_norm_channels_last_forward_f64 if channels_last
                 else API.group_norm_forward_f64)
    if real is float:
        rms = API.rms_norm_forward_f32
    else:
        rms = API.rms_norm_forward_f64
    if not centered:
        _check_rms(s, groups, bias, save_mean)
    a[:] = [ptr(x), ptr(y), ptr(weight), ptr(bias), ptr(save_mean), ptr(save_rstd)]
    with nogil:
        if centered:
            status = group(<const real*>a[0], <real*>a[1], n, c, s, groups, <const real*>a[2],
                           <const real*>a[3], eps, <real*>a[4], <real*>a[5])
        else:
            status = rms(<const real*>a[0], <real*>a[1], n, c, <const real*>a[2], eps,
                         <real*>a[5])
    return status


def rows_forward(x, y, int64_t n, int64_t c, int64_t s, int64_t groups, weight, bias, double eps,
                 bint centered, save_mean, save_rstd, bint channels_last=False):
    """channels_last: x and y are (n, s, c) (group norm's channels-last entry)."""
    if channels_last and not centered:
        raise ValueError("channels last is group norm's (centered) entry")
    if is_float32(x):
        return _rows_forward(<float*>NULL, x, y, n, c, s, groups, weight, bias, eps, centered,
                             save_mean, save_rstd, channels_last)
    return _rows_forward(<double*>NULL, x, y, n, c, s, groups, weight, bias, eps, centered,
                         save_mean, save_rstd, channels_last)


cdef int _rows_backward(real* kind, dy, x, dx, int64_t n, int64_t c, int64_t s, int64_t groups,
                        mean, rstd, weight, bint centered, dweight, dbias, bint channels_last):
    cdef int (*group)(const real*, const real*, real*, int64_t, int64_t, int64_t, int64_t,
                      const real*, const real*, const real*, real*, real*) noexcept nogil
    cdef int (*rms)(const real*, const real*, real*, int64_t, int64_t, const real*,
                    const real*, real*) noexcept nogil
    cdef void* a[8]
    cdef int status
    if real is float:
        group = (API.group_norm_channels_last_backward_f32 if channels_last
                 else API.group_norm_backward_f32)
    else:
        group = (API.group_norm_channels_last_backward_f64 if channels_last
                 else API.group_norm_backward_f64)
    if real is float:
        rms = API.rms_norm_backward_f32
    else:
        rms = API.rms_norm_backward_f64
    if not centered:
        _check_rms(s, groups, dbias, mean)
    a[:] = [ptr(dy), ptr(x), ptr(dx), ptr(mean), ptr(rstd), ptr(weight), ptr(dweight),
            ptr(dbias)]
    with nogil:
        if centered:
            status = group(<const real*>a[0], <const real*>a[1], <real*>a[2], n, c, s, groups,
                           <const real*>a[3], <const real*>a[4], <const real*>a[5],
                           <real*>a[6], <real*>a[7])
        else:
            status = rms(<const real*>a[0], <const real*>a[1], <real*>a[2], n, c,
                         <const real*>a[4], <const real*>a[5], <real*>a[6])
    return status


def rows_backward(dy, x, dx, int64_t n, int64_t c, int64_t s, int64_t groups, mean, rstd, weight,
                  bint centered, dweight, dbias, bint channels_last=False):
    """channels_last: dy, x and dx are (n, s, c) (group norm's channels-last entry)."""
    if channels_last and not centered:
        raise ValueError("channels last is group norm's (centered) entry")
    if is_float32(x):
        return _rows_backward(<float*>NULL, dy, x, dx, n, c, s, groups, mean, rstd, weight,
                              centered, dweight, dbias, channels_last)
    return _rows_backward(<double*>NULL, dy, x, dx, n, c, s, groups, mean, rstd, weight,
                          centered, dweight, dbias, channels_last)


batch_norm = SimpleNamespace(
    forward_train=bn_forward_train, forward_eval=bn_forward_eval, backward=bn_backward,
    stats=bn_stats, gather_stats=bn_gather_stats, elemt=bn_elemt,
    backward_reduce=bn_backward_reduce, backward_elemt=bn_backward_elemt,
    relu_forward_train=bn_relu_forward_train, relu_forward_eval=bn_relu_forward_eval,
    relu_backward=bn_relu_backward)
row_norm = SimpleNamespace(forward=rows_forward, backward=rows_backward)
