# The C API table (filled by bncpu._dispatch with the chosen ISA build); bncpu._ops calls
# the kernels through it.
from bncpu._kernels._api_table cimport bncpu_api

cdef const bncpu_api* api_table() noexcept nogil
