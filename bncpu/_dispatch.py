"""Pick the instruction-set build of the kernel families at import time, and fill and
publish the C API table with it.

setup.py compiles every kernel family of bncpu/_kernels/manifest.py once per ISA level
(module <family><suffix>: portable SSE2 without suffix, then AVX2+FMA and AVX-512 on
x86). The best level this CPU runs whose modules all load is used; set the environment
variable BNCPU_ISA=baseline|avx2|avx512 to force one (an unsupported choice is an
error). Everything calls the kernels through the table: Python through bncpu._ops, C
through include/bncpu.h.

A standalone C program's bncpu_import() loads this module without the package's
__init__.py (see include/bncpu.h): this module, bncpu._capi, bncpu._threads, the
manifest and the kernel modules import neither NumPy nor the rest of bncpu, which keeps
that start-up short.
"""
import importlib
import os

from bncpu import _capi
from bncpu._kernels.manifest import FAMILIES, ISA_LEVELS


def _load(family, isa):
    suffix = ISA_LEVELS[isa][0]
    try:
        return importlib.import_module(f"bncpu._kernels.{family}{suffix}")
    except ImportError:
        return None


def select():
    """Return (isa name, {family: module}) for the best available build."""
    supported = _capi.cpu_isas()
    forced = os.environ.get("BNCPU_ISA", "").strip().lower()
    if forced:
        if forced not in ISA_LEVELS:
            raise ValueError(f"BNCPU_ISA must be one of {sorted(ISA_LEVELS)}, got {forced!r}")
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
