# Declarations every kernel family shares: the C API's status codes (from
# include/bncpu.h, so the Cython and C views of the ABI cannot drift apart),
# and argument checks.
from libc.math cimport isfinite
from libc.stdint cimport int64_t, INT64_MAX

cdef extern from "bncpu.h":
    ctypedef enum bncpu_status:
        BNCPU_OK
        BNCPU_ERR_NULL_POINTER
        BNCPU_ERR_BAD_SIZE
        BNCPU_ERR_ONE_VALUE
        BNCPU_ERR_BAD_EPS
        BNCPU_ERR_BAD_MOMENTUM
        BNCPU_ERR_ALIASED_STATS
        BNCPU_ERR_BAD_GROUPS
        BNCPU_ERR_NO_MEMORY

# Parallel loops never release the GIL (Python 3.11's check is wrong once a
# subinterpreter exists): see _parallel_gil.h.
cdef extern from "_parallel_gil.h":
    pass


cdef inline int check_sizes(int64_t a, int64_t b, int64_t c) noexcept nogil:
    """Sizes must be >= 0 and their product must fit in int64."""
    if a < 0 or b < 0 or c < 0:
        return BNCPU_ERR_BAD_SIZE
    if a != 0 and b != 0 and c != 0:
        if b > INT64_MAX // a or c > INT64_MAX // (a * b):
            return BNCPU_ERR_BAD_SIZE
    return BNCPU_OK


cdef inline int check_eps(double eps) noexcept nogil:
    if not (isfinite(eps) and eps >= 0):
        return BNCPU_ERR_BAD_EPS
    return BNCPU_OK


cdef inline int check_momentum(double momentum) noexcept nogil:
    if not (momentum >= 0 and momentum <= 1):   # NaN fails both
        return BNCPU_ERR_BAD_MOMENTUM
    return BNCPU_OK
