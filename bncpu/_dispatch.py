"""Pick the instruction-set build of each kernel family at import time, and publish
the C API table filled with it.

setup.py compiles every kernel family (bncpu/_kernels/<family>.pyx) once portable
(SSE2, module <family>) and again with AVX2+FMA (<family>_avx2) and AVX-512
(<family>_avx512). The best build this CPU runs is used; set the environment variable
BNCPU_ISA=baseline|avx2|avx512 to force one (an unsupported choice is an error).
"""
import importlib
import os

from bncpu import _capi

FAMILIES = ("batch_norm", "row_norm")
_SUFFIX = {"baseline": "", "avx2": "_avx2", "avx512": "_avx512"}


def _load(family, isa):
    try:
        return importlib.import_module(f"bncpu._kernels.{family}{_SUFFIX[isa]}")
    except ImportError:
        return None


def select():
    """Return (isa name, {family: module}) for the best available build."""
    supported = _capi.cpu_isas()
    forced = os.environ.get("BNCPU_ISA", "").strip().lower()
    if forced:
        if forced not in _SUFFIX:
            raise ValueError(f"BNCPU_ISA must be one of {sorted(_SUFFIX)}, got {forced!r}")
        if forced not in supported:
            raise ValueError(f"BNCPU_ISA={forced} but this CPU supports only {supported}")
        candidates = [forced]
    else:
        candidates = supported
    for isa in candidates:
        modules = {family: _load(family, isa) for family in FAMILIES}
        if all(module is not None for module in modules.values()):
            return isa, modules
    raise ImportError(f"no build of the bncpu kernels could be loaded for {candidates}")


ISA, KERNELS = select()


def _build_c_api():
    """Fill the C API table (bncpu._capi) with the selected kernels and publish it."""
    table = _capi._new_table(ISA)
    for module in KERNELS.values():
        module._fill_api(table)
    _capi._publish()


_build_c_api()
