"""bncpu: fast, accurate batch normalization (and its relatives) for NumPy and C.

Functions follow PyTorch's names, argument order and semantics, and NumPy's calling
conventions (array-likes in, ``out=``, dtype rules: see bncpu._validate). Every kernel
releases the GIL and uses OpenMP threads for large inputs; results are bitwise
identical for any number of threads.

The plain-NumPy twin of every function is in ``bncpu.reference``; ``python -m bncpu``
prints the speed report; ``bncpu.get_include()`` locates ``bncpu.h`` for C callers.
"""
import os as _os


def _not_built_message(error: ImportError) -> str:
    """Why the compiled modules did not load: usually a source tree that was never built."""
    from importlib.machinery import EXTENSION_SUFFIXES
    here = _os.path.dirname(_os.path.abspath(__file__))
    if any(name.startswith("_capi") and name.endswith(tuple(EXTENSION_SUFFIXES))
           for name in _os.listdir(here)):
        return f"bncpu's compiled extension modules in {here} cannot be loaded: {error}"
    return (f"bncpu is imported from {here}, which holds its source but not its compiled "
            f"extension modules (this looks like an unbuilt source tree). Build them in place "
            f"with `pip install -e .` or `python setup.py build_ext --inplace` in "
            f"{_os.path.dirname(here)}, or install bncpu (`pip install .`) and run Python from "
            f"another directory so that the installed package is imported.")


try:
    from bncpu import _capi, _threads  # noqa: F401  (the compiled modules every other needs)
except ImportError as _error:
    raise ImportError(_not_built_message(_error)) from _error

from bncpu._dispatch import ISA as _ISA
from bncpu._threads import get_num_threads, openmp_enabled, set_num_threads
from bncpu._batch_norm import (
    batch_norm, batch_norm_forward, batch_norm_backward,
    batch_norm_stats, batch_norm_gather_stats, batch_norm_elemt,
    batch_norm_backward_reduce, batch_norm_backward_elemt,
)
from bncpu._row_norm import (
    layer_norm, layer_norm_forward, layer_norm_backward,
    group_norm, group_norm_forward, group_norm_backward,
    instance_norm, instance_norm_forward, instance_norm_backward,
    rms_norm, rms_norm_forward, rms_norm_backward,
)
from bncpu._fused import (
    batch_norm_relu, batch_norm_relu_forward, batch_norm_relu_backward, fold_batch_norm,
)

__version__ = "0.1.0"

__all__ = [
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "batch_norm_stats", "batch_norm_gather_stats", "batch_norm_elemt",
    "batch_norm_backward_reduce", "batch_norm_backward_elemt",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "batch_norm_relu", "batch_norm_relu_forward", "batch_norm_relu_backward", "fold_batch_norm",
    "get_num_threads", "set_num_threads", "get_include", "isa", "openmp_enabled",
]


def isa() -> str:
    """The instruction set the kernels were compiled for and run with.

    Returns
    -------
    str
        'avx512', 'avx2' or 'baseline' (portable x86-64): the best build this CPU runs,
        or the one the environment variable BNCPU_ISA named before import.
    """
    return _ISA


def get_include() -> str:
    """Directory holding bncpu.h, for compiling C programs and extensions.

    Returns
    -------
    str
        An absolute path, to pass to the C compiler as ``-I``.
    """
    return _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "include")
