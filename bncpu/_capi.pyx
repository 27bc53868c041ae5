"""The C API's function table, handed to C code through a capsule.

bncpu._dispatch fills the table at import: each kernel family module (in the
instruction-set build it chose) writes its entries, then the table is published as
``bncpu._capi._C_API``, a capsule named "bncpu._capi._C_API" that include/bncpu.h's
bncpu_import() reads, and bncpu._ops calls the kernels through it (api_table()). Its
type comes from _kernels/_api_table.pxd, which setup.py generates from the manifest.
The table lives as long as the process.
"""
from cpython.pycapsule cimport PyCapsule_New
from libc.string cimport memset

from bncpu._kernels._api_table cimport bncpu_api

cdef extern from *:
    """
    #include "bncpu.h"
    static bncpu_api bncpu_table;
    static char bncpu_isa_name[32];
    """
    int BNCPU_API_VERSION_MAJOR
    int BNCPU_API_VERSION_MINOR
    int BNCPU_ERR_NO_MEMORY
    const char* BNCPU_VERSION_STRING
    bncpu_api bncpu_table
    char bncpu_isa_name[32]
    const char* bncpu_strerror(int status) noexcept nogil

from bncpu._threads cimport c_get_num_threads, c_set_num_threads


def _new_table(str isa):
    """Reset the table and return a capsule the kernel modules write into."""
    cdef bytes name = isa.encode()[:31]
    memset(&bncpu_table, 0, sizeof(bncpu_table))
    memset(bncpu_isa_name, 0, sizeof(bncpu_isa_name))
    for i in range(len(name)):
        bncpu_isa_name[i] = name[i]
    bncpu_table.api_version_major = BNCPU_API_VERSION_MAJOR
    bncpu_table.api_version_minor = BNCPU_API_VERSION_MINOR
    bncpu_table.version = BNCPU_VERSION_STRING
    bncpu_table.isa = bncpu_isa_name
    bncpu_table.strerror = bncpu_strerror
    bncpu_table.get_num_threads = c_get_num_threads
    bncpu_table.set_num_threads = c_set_num_threads
    return PyCapsule_New(&bncpu_table, "bncpu._capi.table", NULL)


cdef const bncpu_api* api_table() noexcept nogil:
    """The table, for bncpu._ops (complete once bncpu._dispatch has been imported)."""
    return &bncpu_table


def _publish():
    """The capsule bncpu_import() reads: call once the table is complete."""
    global _C_API
    _C_API = PyCapsule_New(&bncpu_table, "bncpu._capi._C_API", NULL)


# The status that bncpu._status.raise_for_status turns into MemoryError.
ERR_NO_MEMORY = BNCPU_ERR_NO_MEMORY


def strerror(int status):
    """The message of a bncpu_status code."""
    return bncpu_strerror(status).decode()


cdef extern from *:
    """
    static int bncpu_cpu_supports_avx2(void) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        /* The avx2 build converts float16 with F16C (-mf16c). */
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("f16c");
    #else
        return 0;
    #endif
    }
    static int bncpu_cpu_supports_avx512(void) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
            && __builtin_cpu_supports("fma");
    #else
        return 0;
    #endif
    }
    """
    int bncpu_cpu_supports_avx2() noexcept nogil
    int bncpu_cpu_supports_avx512() noexcept nogil


def cpu_isas():
    """Instruction-set levels this CPU runs, best first (always ends with 'baseline')."""
    levels = []
    if bncpu_cpu_supports_avx512():
        levels.append("avx512")
    if bncpu_cpu_supports_avx2():
        levels.append("avx2")
    levels.append("baseline")
    return levels
