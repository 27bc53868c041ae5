# Declarations every kernel family shares: the C API's status codes (from
# include/bncpu.h, so the Cython and C views of the ABI cannot drift apart),
# argument checks, and the one allocator of temporaries.
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uintptr_t, INT64_MAX
from libc.stdlib cimport calloc, malloc

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
        BNCPU_ERR_ALIASED

# Parallel loops never release the GIL (Python 3.11's check is wrong once a
# subinterpreter exists): see _parallel_gil.h.
cdef extern from "_parallel_gil.h":
    pass


# The largest size, and product of sizes, an entry accepts: 2^57 - 1 values. No array
# that large can exist (the address space has at most 2^57 bytes), and below it the
# kernels' own arithmetic on sizes (byte counts of 8-byte values, a few values per
# channel or value) cannot overflow int64. Allocations check their products anyway
# (alloc_values).
cdef enum:
    SIZE_BITS = 57


cdef inline int check_sizes(int64_t a, int64_t b, int64_t c) noexcept nogil:
    """Sizes must be >= 0, and each and their product below 2^SIZE_BITS (even when
    another size is 0: an empty batch of 2^62 channels still has per-channel arrays)."""
    cdef int64_t limit = (<int64_t>1 << SIZE_BITS) - 1
    if a < 0 or b < 0 or c < 0:
        return BNCPU_ERR_BAD_SIZE
    if a > limit or b > limit or c > limit:
        return BNCPU_ERR_BAD_SIZE
    if a != 0 and b != 0 and c != 0:
        if b > limit // a or c > limit // (a * b):
            return BNCPU_ERR_BAD_SIZE
    return BNCPU_OK


cdef inline void* alloc_values(int64_t count, int64_t per, size_t itemsize,
                               bint zeroed) noexcept nogil:
    """A temporary of count·per values of itemsize bytes (zeroed: calloc), NULL when out
    of memory or when count·per·itemsize does not fit in int64 (a wrapped product would
    allocate too little). Never malloc(0): an empty temporary is one byte, not NULL."""
    cdef int64_t values
    if count < 0 or per < 0:
        return NULL
    if count != 0 and per > INT64_MAX // count:
        return NULL
    values = count * per
    if values > INT64_MAX // <int64_t>itemsize:
        return NULL
    if zeroed:
        return calloc(values if values > 0 else 1, itemsize)
    return malloc(values * itemsize if values > 0 else 1)


# Aliasing: an entry lists the arrays it writes and those it reads (start, size in
# bytes, and whether it is shaped like the data: x, y, dy, dx, residual), and refuses
# the call before writing when an output shares memory with another output, or with an
# input other than exactly (the same start and size, both shaped like the data: in
# place). Per-channel and per-row arrays are read and written at different times (a
# result may be written before every input value has been read), so no output of theirs
# may share memory with anything.
cdef struct Region:
    const void* start
    int64_t n_bytes
    bint data


cdef inline Region region(const void* start, int64_t count, size_t itemsize,
                          bint data) noexcept nogil:
    cdef Region r
    r.start = start
    r.n_bytes = count * <int64_t>itemsize if start != NULL else 0
    r.data = data
    return r


cdef inline bint overlap(const Region* a, const Region* b) noexcept nogil:
    cdef uintptr_t a0 = <uintptr_t>a.start, b0 = <uintptr_t>b.start
    return (a.n_bytes > 0 and b.n_bytes > 0 and a0 < b0 + <uintptr_t>b.n_bytes
            and b0 < a0 + <uintptr_t>a.n_bytes)


cdef inline int check_aliasing(const Region* outputs, int n_outputs, const Region* inputs,
                               int n_inputs) noexcept nogil:
    """BNCPU_ERR_ALIASED when the rule above is broken, else BNCPU_OK."""
    cdef int i, k
    for i in range(n_outputs):
        for k in range(i + 1, n_outputs):
            if overlap(&outputs[i], &outputs[k]):
                return BNCPU_ERR_ALIASED
        for k in range(n_inputs):
            if overlap(&outputs[i], &inputs[k]) and not (
                    outputs[i].data and inputs[k].data and outputs[i].start == inputs[k].start
                    and outputs[i].n_bytes == inputs[k].n_bytes):
                return BNCPU_ERR_ALIASED
    return BNCPU_OK


cdef inline int check_eps(double eps) noexcept nogil:
    if not (isfinite(eps) and eps >= 0):
        return BNCPU_ERR_BAD_EPS
    return BNCPU_OK


cdef inline int check_momentum(double momentum) noexcept nogil:
    if not (momentum >= 0 and momentum <= 1):   # NaN fails both
        return BNCPU_ERR_BAD_MOMENTUM
    return BNCPU_OK
