# The only module that touches the OpenMP runtime; kernels ask it how many threads to use.
from libc.stdint cimport int64_t

cdef int threads_begin(int64_t n_elements) noexcept nogil
cdef void threads_end(int n_threads) noexcept nogil
cdef int c_get_num_threads() noexcept nogil
cdef void c_set_num_threads(int n) noexcept nogil
