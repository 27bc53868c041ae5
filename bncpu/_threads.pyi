# Type stub of the compiled module bncpu/_threads.pyx (Cython would treat annotations in
# the .pyx as C types, so they live here).
SMALL_INPUT: int
MAX_THREADS_PER_CPU: int
MIN_THREADS_CAP: int
MAX_THREADS: int

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def openmp_enabled() -> bool: ...
