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
* Team size cap: ``MAX_THREADS_PER_CPU`` (4) times the CPUs this process may run on
  (``omp_get_num_procs()``, which honours the affinity mask; read once at import), and at
  least ``MIN_THREADS_CAP`` (16). ``OMP_NUM_THREADS`` or ``set_num_threads`` above it are
  lowered to it: tens of thousands of threads make the OpenMP runtime abort the process,
  and more threads than that bound never run faster.
* After ``fork()`` the child runs every kernel on its calling thread. GNU OpenMP's thread
  pool does not survive a fork (the child would wait forever for the parent's threads),
  so a ``pthread_atfork`` handler marks the child; ``get_num_threads()`` then returns 1
  and ``set_num_threads`` is ignored there. A process started by 'spawn' or
  'forkserver' (multiprocessing) or exec is unaffected.
"""
import operator

from libc.stdint cimport int64_t

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNCPU_HAVE_OPENMP 1
    #else
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_num_procs(void) { return 1; }
    #define BNCPU_HAVE_OPENMP 0
    #endif
    #if defined(__unix__) || defined(__APPLE__)
    #include <pthread.h>
    #define BNCPU_HAVE_ATFORK 1
    #else
    #define BNCPU_HAVE_ATFORK 0
    #endif
    static int bncpu_requested_threads = 0;   /* 0: follow omp_get_max_threads() */
    static int bncpu_active_teams = 0;        /* calls currently running a team */
    static int bncpu_forked = 0;              /* this process is a fork() child */
    static void bncpu_mark_forked_child(void) {
        /* Runs in the child only, which has one thread: plain stores are enough. */
        bncpu_forked = 1;
        bncpu_active_teams = 0;
    }
    static int bncpu_watch_fork(void) {
    #if BNCPU_HAVE_ATFORK
        return pthread_atfork(NULL, NULL, bncpu_mark_forked_child);
    #else
        return 0;
    #endif
    }
    static int bncpu_is_forked(void) {
        return __atomic_load_n(&bncpu_forked, __ATOMIC_RELAXED);
    }
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
    int omp_get_num_procs() noexcept nogil
    int BNCPU_HAVE_OPENMP
    int bncpu_watch_fork() noexcept nogil
    int bncpu_is_forked() noexcept nogil
    int bncpu_try_claim_team() noexcept nogil
    void bncpu_release_team() noexcept nogil
    int bncpu_load_requested() noexcept nogil
    void bncpu_store_requested(int n) noexcept nogil

# Below this many elements a call stays on the calling thread (a fork/join costs a few
# microseconds, as much as normalizing ~50k floats on one core).
SMALL_INPUT = 1 << 16
cdef int64_t _small_input = SMALL_INPUT


# The team never exceeds MAX_THREADS_PER_CPU threads per CPU available to the process, nor
# MIN_THREADS_CAP when that is smaller (so that small machines can still test many threads).
MAX_THREADS_PER_CPU = 4
MIN_THREADS_CAP = 16
cdef int _max_threads = max(MIN_THREADS_CAP, MAX_THREADS_PER_CPU * max(omp_get_num_procs(), 1))
MAX_THREADS = _max_threads

if bncpu_watch_fork() != 0:
    raise ImportError("bncpu: pthread_atfork failed, so a forked child could hang in OpenMP")


cdef inline int configured_threads() noexcept nogil:
    cdef int n
    if bncpu_is_forked():
        return 1
    n = bncpu_load_requested()
    if n <= 0:
        n = omp_get_max_threads()
    return min(n, _max_threads) if n > 0 else 1


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


cdef void c_set_num_threads(int n) noexcept nogil:
    bncpu_store_requested(min(max(n, 0), _max_threads))


def get_num_threads():
    """Number of threads the next large kernel call will use.

    Returns
    -------
    int
        The ``set_num_threads`` setting, else OpenMP's default (``OMP_NUM_THREADS``,
        threadpoolctl's limit or the number of CPUs), lowered to ``MAX_THREADS``; 1 in a
        process created by ``fork()``. (Without OpenMP the kernels run serially whatever
        this says.)
    """
    return configured_threads()


def set_num_threads(n):
    """Use ``n`` threads in every later large kernel call of the process.

    Parameters
    ----------
    n : int
        Team size, >= 0 (a Python or NumPy integer). ``0`` returns to OpenMP's default.
        Values above ``bncpu._threads.MAX_THREADS`` (4 per CPU available to the
        process, at least 16) are lowered to it. Ignored in a process created by
        ``fork()``, which always runs single-threaded.

    Raises
    ------
    TypeError
        ``n`` is not an integer (bool included).
    ValueError
        ``n`` is negative.
    """
    if isinstance(n, bool):   # operator.index accepts bool (not NumPy's bool)
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"number of threads must be >= 0, got {n}")
    c_set_num_threads(min(n, _max_threads))


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(BNCPU_HAVE_OPENMP)
