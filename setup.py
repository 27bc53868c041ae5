"""Build bncpu: cythonize the kernels with portable OpenMP flags.

Environment variables (all optional):
  BNCPU_NATIVE=1     add -march=native (fastest on the build machine; the wheel then
                     only runs on CPUs with the same instruction sets).
  BNCPU_NO_OPENMP=1  build serial kernels even when the compiler supports OpenMP.

The default build is portable x86-64 (SSE2); faster instruction sets are chosen at run
time: each kernel family is compiled once per ISA level of bncpu/_kernels/manifest.py
(SSE2, AVX2+FMA, AVX-512) and bncpu picks the best one the CPU supports (see
bncpu/_dispatch.py). Off x86, or with BNCPU_NATIVE, there is one build per family.
From the manifest this file also generates the typed Cython view of the C API table
(bncpu/_kernels/_api_table.pxd) and each family's table-filling code
(bncpu/_kernels/_fill_<family>.pxi).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
OPENMP_TEST = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def compiler_command():
    return (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()


def openmp_flags():
    """Return (compile_args, link_args) for OpenMP, or ([], []) with a warning."""
    if os.environ.get("BNCPU_NO_OPENMP"):
        return [], []
    candidates = ["-fopenmp", "-qopenmp", "-Xpreprocessor -fopenmp"]
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp_test.c")
        with open(source, "w") as f:
            f.write(OPENMP_TEST)
        for flag in candidates:
            args = flag.split()
            cmd = compiler_command() + args + [source, "-o", os.path.join(tmp, "a.out")]
            try:
                ok = subprocess.run(cmd, capture_output=True).returncode == 0
            except OSError:
                ok = False
            if ok:
                return args, args
    warnings.warn(
        "The C compiler does not support OpenMP: bncpu is built with serial kernels "
        "(correct results, one thread only)."
    )
    return [], []


def copy_header():
    """Ship include/bncpu.h inside the package so bncpu.get_include() finds it."""
    target = os.path.join(HERE, "bncpu", "include")
    os.makedirs(target, exist_ok=True)
    shutil.copy2(os.path.join(HERE, "include", "bncpu.h"), target)


omp_compile, omp_link = openmp_flags()
# -ffp-contract=off: gcc would fuse a*b + c into one FMA in some inlined copies of a
# shared helper and not in others (e.g. channel mode vs split mode), changing the last
# bit between thread counts; without contraction every copy rounds the same way.
base_compile = ["-O3", "-fno-math-errno", "-ffp-contract=off"] + omp_compile
if os.environ.get("BNCPU_NATIVE"):
    base_compile.append("-march=native")
if sys.platform == "win32":
    base_compile = [a for a in base_compile if a != "-fno-math-errno"]

# A table member whose type differs from the kernel written into it must fail the build
# (gcc before 14 only warns).
if sys.platform != "win32":
    base_compile.append("-Werror=incompatible-pointer-types")


def load_manifest():
    """bncpu/_kernels/manifest.py, read without importing bncpu (not built yet)."""
    spec = importlib.util.spec_from_file_location(
        "bncpu_manifest", os.path.join(HERE, "bncpu", "_kernels", "manifest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MANIFEST = load_manifest()
IS_X86 = any(m in (sysconfig.get_platform() + os.uname().machine if hasattr(os, "uname") else "")
             for m in ("x86_64", "amd64", "i686"))
# ISA levels built: suffix -> flags.
ISA_LEVELS = {suffix: flags for suffix, flags in MANIFEST.ISA_LEVELS.values()}
if os.environ.get("BNCPU_NATIVE") or not IS_X86:
    ISA_LEVELS = {"": []}


def write_if_changed(path, text):
    """Write a generated file, leaving it (and its timestamp) alone when unchanged."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


def generate_sources():
    """The files generated from the manifest (see the module docstring)."""
    kernels = os.path.join(HERE, "bncpu", "_kernels")
    write_if_changed(os.path.join(kernels, "_api_table.pxd"), MANIFEST.cython_table())
    for family in MANIFEST.FAMILIES:
        write_if_changed(os.path.join(kernels, f"_fill_{family}.pxi"),
                         MANIFEST.fill_source(family))


def kernel_extensions():
    exts = []
    for family in MANIFEST.FAMILIES:
        for suffix, isa_flags in ISA_LEVELS.items():
            source = f"bncpu/_kernels/{family}.pyx"
            if suffix:
                # The same source, compiled under another module name with wider vectors.
                source = f"bncpu/_kernels/{family}{suffix}.pyx"
                write_if_changed(source, f'# Generated by setup.py: {family}.pyx compiled with '
                                         f'{" ".join(isa_flags)}.\n'
                                         f'include "{family}.pyx"\n')
            exts.append(Extension(
                f"bncpu._kernels.{family}{suffix}", [source],
                include_dirs=[np.get_include(), os.path.join(HERE, "include"),
                              os.path.join(HERE, "bncpu", "_kernels")],
                extra_compile_args=base_compile + isa_flags,
                extra_link_args=omp_link,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            ))
    return exts


def extensions():
    common = dict(
        include_dirs=[np.get_include(), os.path.join(HERE, "include")],
        extra_compile_args=base_compile,
        extra_link_args=omp_link,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    exts = [
        Extension("bncpu._threads", ["bncpu/_threads.pyx"], **common),
        Extension("bncpu._capi", ["bncpu/_capi.pyx"], **common),
        Extension("bncpu._ops", ["bncpu/_ops.pyx"], **common),
    ]
    return exts + kernel_extensions()


copy_header()
generate_sources()
setup(
    ext_modules=cythonize(
        extensions(),
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    ),
)
