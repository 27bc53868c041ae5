"""The Python-callable kernel wrappers, compiled once (not per ISA build), calling the C
API table that bncpu._dispatch filled with the chosen build.

The arrays come validated by bncpu._validate (C-contiguous, one float dtype, right
sizes; None for an absent optional array). The wrappers are generated from
bncpu/_kernels/manifest.py into _ops_entries.pxi (included below): for each entry,
``call_<entry>(typenum, ...)`` picks the table member of the data's dtype, releases the
GIL for the call and returns the kernel's bncpu_status; an entry with a Python name gets
a ``def`` wrapper taking its dtype from its first data array. The members' pointers are
typed, so a wrapper whose arguments disagree with the header does not compile.

Two namespaces keep the names the Python layers call: ``batch_norm`` (the generated
wrappers of the batch-norm family, and gather_stats) and ``row_norm`` (forward,
backward), which route group, layer, instance and RMS norm to their entries.
"""
import sys
from types import SimpleNamespace

import numpy

from libc.stdint cimport int64_t
cimport numpy as cnp

from bncpu import _dispatch   # fills the table before api_table() is read below
from bncpu._capi cimport api_table
from bncpu._kernels._api_table cimport bncpu_api

cnp.import_array()

cdef const bncpu_api* API = api_table()


cdef inline void* data_pointer(object array):
    """Data pointer of a validated ndarray, NULL for None."""
    if array is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>array)


cdef int typenum_of(str scalar_type) except -2:
    """NumPy's type number of a dtype named "module.name" (numpy.float32,
    ml_dtypes.bfloat16), or -1 (no array matches it) while the module is not imported:
    bncpu imports no module but NumPy for its dtypes."""
    module, name = scalar_type.rsplit(".", 1)
    if module not in sys.modules:
        return -1
    return numpy.dtype(getattr(sys.modules[module], name)).num


include "_ops_entries.pxi"


def bn_gather_stats(int64_t p, int64_t c, mean, m2, counts, running_mean, running_var,
                    double momentum, double eps, mean_out, invstd_out, bint is_f32,
                    bint unbiased=True):
    """is_f32: the running statistics' dtype (they may be absent)."""
    return call_batch_norm_gather_stats(TYPENUM_F32 if is_f32 else TYPENUM_F64, p, c, mean, m2,
                                        counts, running_mean, running_var, momentum, eps,
                                        mean_out, invstd_out, unbiased)


# ----------------------------------------------------------------------------------
# Row norms: (n, c, s, groups); layer and RMS norm pass (rows, d, 1, 1). centered=True
# is group norm's entry (layer norm is group norm of one group of s = 1), False is RMS
# norm's, which takes rows of d values and no bias or mean.
# ----------------------------------------------------------------------------------
cdef int _check_rows(int64_t s, int64_t groups, bint centered, bint channels_last, bias,
                     mean) except -1:
    if channels_last and not centered:
        raise ValueError("channels last is group norm's (centered) entry")
    if not centered and (s != 1 or groups != 1 or bias is not None or mean is not None):
        raise ValueError("RMS norm takes (rows, d, 1, 1) and neither bias nor mean")
    return 0


def rows_forward(x, y, int64_t n, int64_t c, int64_t s, int64_t groups, weight, bias, double eps,
                 bint centered, save_mean, save_rstd, bint channels_last=False):
    """channels_last: x and y are (n, s, c) (group norm's channels-last entry)."""
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    _check_rows(s, groups, centered, channels_last, bias, save_mean)
    if not centered:
        return call_rms_norm_forward(typenum, x, y, n, c, weight, eps, save_rstd)
    if channels_last:
        return call_group_norm_channels_last_forward(typenum, x, y, n, c, s, groups, weight,
                                                     bias, eps, save_mean, save_rstd)
    return call_group_norm_forward(typenum, x, y, n, c, s, groups, weight, bias, eps, save_mean,
                                   save_rstd)


def rows_backward(dy, x, dx, int64_t n, int64_t c, int64_t s, int64_t groups, mean, rstd, weight,
                  bint centered, dweight, dbias, bint channels_last=False):
    """channels_last: dy, x and dx are (n, s, c) (group norm's channels-last entry)."""
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>x)
    _check_rows(s, groups, centered, channels_last, dbias, mean)
    if not centered:
        return call_rms_norm_backward(typenum, dy, x, dx, n, c, rstd, weight, dweight)
    if channels_last:
        return call_group_norm_channels_last_backward(typenum, dy, x, dx, n, c, s, groups, mean,
                                                      rstd, weight, dweight, dbias)
    return call_group_norm_backward(typenum, dy, x, dx, n, c, s, groups, mean, rstd, weight,
                                    dweight, dbias)


batch_norm = SimpleNamespace(**_WRAPPERS["batch_norm"], gather_stats=bn_gather_stats)
row_norm = SimpleNamespace(forward=rows_forward, backward=rows_backward)
