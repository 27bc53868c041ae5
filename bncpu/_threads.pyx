"""Thread control: the only place that talks to the OpenMP runtime.

Policy
------
* ``set_num_threads(n)`` (n >= 1) fixes the team size of every later kernel call;
  ``set_num_threads(0)`` returns to the default, which is ``omp_get_max_threads()`` of
  the calling thread. That default honours ``OMP_NUM_THREADS`` and threadpoolctl's
  ``threadpool_limits(n, "openmp")``.
* Inputs smaller than ``SMALL_INPUT`` elements run on the calling thread: no OpenMP
  region is entered, so small calls pay no fork/join cost.
* No oversubscription: while one call runs a parallel team, a call arriving from
  another thread runs on its own thread only. Any number of concurrent callers
  therefore use at most (callers + team size - 1) threads.
* Results never depend on the team size: the kernels split work into pieces fixed by
  the shape alone and merge partial results in a fixed order.
"""
from libc.stdint cimport int64_t

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNCPU_HAVE_OPENMP 1
    #else
    static int omp_get_max_threads(void) { return 1; }
    #define BNCPU_HAVE_OPENMP 0
    #endif
    static int bncpu_requested_threads = 0;   /* 0: follow omp_get_max_threads() */
    static int bncpu_active_teams = 0;        /* calls currently running a team */
    static int bncpu_try_claim_team(void) {
        int expected = 0;
        return __atomic_compare_exchange_n(&bncpu_active_teams, &expected, 1, 0,
                                           __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    static void bncpu_release_team(void) {
        __atomic_store_n(&bncpu_active_teams, 0, __ATOMIC_RELEASE);
    }
    static int bncpu_load_requested(void) {
        return __atomic_load_n(&bncpu_requested_threads, __ATOMIC_RELAXED);
    }
    static void bncpu_store_requested(int n) {
        __atomic_store_n(&bncpu_requested_threads, n, __ATOMIC_RELAXED);
    }
    """
    int omp_get_max_threads() noexcept nogil
    int BNCPU_HAVE_OPENMP
    int bncpu_try_claim_team() noexcept nogil
    void bncpu_release_team() noexcept nogil
    int bncpu_load_requested() noexcept nogil
    void bncpu_store_requested(int n) noexcept nogil

# Below this many elements a call stays on the calling thread (a fork/join costs a few
# microseconds, as much as normalizing ~50k floats on one core).
SMALL_INPUT = 1 << 16
cdef int64_t _small_input = SMALL_INPUT


cdef inline int configured_threads() noexcept nogil:
    cdef int n = bncpu_load_requested()
    if n <= 0:
        n = omp_get_max_threads()
    return n if n > 0 else 1


cdef int threads_begin(int64_t n_elements) noexcept nogil:
    """Team size for one kernel call; pair every call with threads_end(result)."""
    cdef int n = configured_threads()
    if n <= 1 or n_elements < _small_input:
        return 1
    if not bncpu_try_claim_team():
        return 1
    return n


cdef void threads_end(int n_threads) noexcept nogil:
    if n_threads > 1:
        bncpu_release_team()


cdef int c_get_num_threads() noexcept nogil:
    return configured_threads()


# More threads than this is a mistake, not a machine: cap it rather than ask OpenMP.
cdef int MAX_THREADS = 1 << 16


cdef void c_set_num_threads(int n) noexcept nogil:
    bncpu_store_requested(min(max(n, 0), MAX_THREADS))


def get_num_threads():
    """Number of threads the next large kernel call will use."""
    return configured_threads()


def set_num_threads(n):
    """Use ``n`` threads in every later call (``0`` restores the OpenMP default)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"number of threads must be >= 0, got {n}")
    c_set_num_threads(min(n, MAX_THREADS))


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(BNCPU_HAVE_OPENMP)
