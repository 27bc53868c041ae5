"""The one list of bncpu's kernels: instruction-set levels, kernel families, C API entries.

setup.py compiles every family once per ISA level and generates, from ENTRIES, the
Cython view of the C API table (``_api_table.pxd``, its typed function pointers) and
each family's ``_fill_<family>.pxi`` (the code that writes the family's kernels into
the table); bncpu._dispatch picks the level at import; include/bncpu.h declares the
same entries, in the same order, with their documentation, and its block of
``bncpu_<entry>`` macros is the text of ``header_macros()`` (tests/test_contract.py
checks both).

Adding a kernel: write it in its family's .pyx (a ``cdef int <kernel>(...) noexcept
nogil`` over the fused type ``real``), add an Entry here, and add the member with its
doc comment to ``bncpu_api`` in include/bncpu.h (then run
``python bncpu/_kernels/manifest.py --header`` to refresh the macros). A member whose
type differs from the kernel's signature fails the build (the table is typed, and
setup.py compiles with -Werror=incompatible-pointer-types).

Run as ``python bncpu/_kernels/manifest.py --header`` it rewrites the macro block of
include/bncpu.h; ``--check`` exits 1 when the header does not follow the manifest;
``--sources`` writes the generated Cython files (as setup.py does).
This module imports nothing but the standard library: setup.py reads it before
anything is built.
"""
import collections
import os
import re
import sys

# Instruction-set levels, best last: name -> (module suffix, compiler flags). The
# "baseline" build is portable x86-64 (SSE2), or the only build off x86.
ISA_LEVELS = collections.OrderedDict([
    ("baseline", ("", [])),
    ("avx2", ("_avx2", ["-mavx2", "-mfma"])),
    ("avx512", ("_avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                            "-mprefer-vector-width=512"])),
])

# Kernel families: each is bncpu/_kernels/<family>.pyx, compiled once per ISA level.
FAMILIES = ("batch_norm", "row_norm")

# One C API entry: the table member <name>_f32 / <name>_f64 is the fused kernel
# <kernel>[float] / [double] of <family>. In `params`, T is float or double.
Entry = collections.namedtuple("Entry", "name family kernel params")

ENTRIES = (
    Entry("batch_norm_forward_train", "batch_norm", "bn_forward_train",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, const T* weight, const T* bias, "
          "T* running_mean, T* running_var, double momentum, double eps, T* save_mean, "
          "T* save_invstd, int unbiased"),
    Entry("batch_norm_forward_eval", "batch_norm", "bn_forward_eval",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, const T* weight, const T* bias, "
          "const T* running_mean, const T* running_var, double eps"),
    Entry("batch_norm_backward", "batch_norm", "bn_backward",
          "const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t s, const T* weight, "
          "const T* running_mean, const T* running_var, const T* save_mean, "
          "const T* save_invstd, int training, double eps, T* dweight, T* dbias"),
    Entry("batch_norm_stats", "batch_norm", "bn_stats",
          "const T* x, int64_t n, int64_t c, int64_t s, double* mean, double* m2"),
    Entry("batch_norm_gather_stats", "batch_norm", "bn_gather_stats",
          "int64_t p, int64_t c, const double* mean, const double* m2, const int64_t* counts, "
          "T* running_mean, T* running_var, double momentum, double eps, double* mean_out, "
          "double* invstd_out, int unbiased"),
    Entry("batch_norm_elemt", "batch_norm", "bn_elemt",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, const double* mean, "
          "const double* invstd, const T* weight, const T* bias"),
    Entry("batch_norm_backward_reduce", "batch_norm", "bn_backward_reduce",
          "const T* dy, const T* x, int64_t n, int64_t c, int64_t s, const double* mean, "
          "double* sum_dy, double* sum_dy_xmu"),
    Entry("batch_norm_backward_elemt", "batch_norm", "bn_backward_elemt",
          "const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t s, const double* mean, "
          "const double* invstd, const T* weight, const double* sum_dy, "
          "const double* sum_dy_xmu, int64_t count"),
    Entry("batch_norm_relu_forward_train", "batch_norm", "bn_relu_forward_train",
          "const T* x, const T* residual, T* y, int64_t n, int64_t c, int64_t s, "
          "const T* weight, const T* bias, T* running_mean, T* running_var, double momentum, "
          "double eps, T* save_mean, T* save_invstd, int unbiased"),
    Entry("batch_norm_relu_forward_eval", "batch_norm", "bn_relu_forward_eval",
          "const T* x, const T* residual, T* y, int64_t n, int64_t c, int64_t s, "
          "const T* weight, const T* bias, const T* running_mean, const T* running_var, "
          "double eps"),
    Entry("batch_norm_relu_backward", "batch_norm", "bn_relu_backward",
          "const T* dy, const T* y, const T* x, T* dx, int64_t n, int64_t c, int64_t s, "
          "const T* weight, const T* running_mean, const T* running_var, "
          "const T* save_mean, const T* save_invstd, int training, double eps, T* dweight, "
          "T* dbias, T* dresidual"),
    Entry("layer_norm_forward", "row_norm", "layer_norm_forward",
          "const T* x, T* y, int64_t rows, int64_t d, const T* weight, const T* bias, double eps, "
          "T* save_mean, T* save_rstd"),
    Entry("layer_norm_backward", "row_norm", "layer_norm_backward",
          "const T* dy, const T* x, T* dx, int64_t rows, int64_t d, const T* mean, "
          "const T* rstd, const T* weight, T* dweight, T* dbias"),
    Entry("group_norm_forward", "row_norm", "group_norm_forward",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, int64_t groups, const T* weight, "
          "const T* bias, double eps, T* save_mean, T* save_rstd"),
    Entry("group_norm_backward", "row_norm", "group_norm_backward",
          "const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t s, int64_t groups, "
          "const T* mean, const T* rstd, const T* weight, T* dweight, T* dbias"),
    Entry("group_norm_channels_last_forward", "row_norm", "group_norm_channels_last_forward",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, int64_t groups, const T* weight, "
          "const T* bias, double eps, T* save_mean, T* save_rstd"),
    Entry("group_norm_channels_last_backward", "row_norm", "group_norm_channels_last_backward",
          "const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t s, int64_t groups, "
          "const T* mean, const T* rstd, const T* weight, T* dweight, T* dbias"),
    Entry("rms_norm_forward", "row_norm", "rms_norm_forward",
          "const T* x, T* y, int64_t rows, int64_t d, const T* weight, double eps, "
          "T* save_rstd"),
    Entry("rms_norm_backward", "row_norm", "rms_norm_backward",
          "const T* dy, const T* x, T* dx, int64_t rows, int64_t d, const T* rstd, "
          "const T* weight, T* dweight"),
)

SUFFIXES = (("_f32", "float"), ("_f64", "double"))


def members():
    """Every table member, in table order: (member name, entry, C element type)."""
    return [(entry.name + suffix, entry, ctype) for entry in ENTRIES for suffix, ctype in SUFFIXES]


def _params(entry, ctype):
    return re.sub(r"\bT\b", ctype, entry.params)


def cython_table():
    """_api_table.pxd: the Cython view of include/bncpu.h's bncpu_api, typed."""
    lines = ["# Generated by setup.py from bncpu/_kernels/manifest.py: do not edit.",
             "from libc.stdint cimport int64_t", "",
             'cdef extern from "bncpu.h":',
             "    ctypedef struct bncpu_api:",
             "        int api_version",
             "        const char* version",
             "        const char* isa",
             "        const char* (*strerror)(int) noexcept nogil",
             "        int (*get_num_threads)() noexcept nogil",
             "        void (*set_num_threads)(int) noexcept nogil"]
    for member, entry, ctype in members():
        lines.append(f"        int (*{member})({_params(entry, ctype)}) noexcept nogil")
    return "\n".join(lines) + "\n"


def fill_source(family):
    """_fill_<family>.pxi: writes the family's kernels into the table (typed: a kernel
    whose signature differs from the member's is a compile error)."""
    lines = ["# Generated by setup.py from bncpu/_kernels/manifest.py: do not edit.",
             "from cpython.pycapsule cimport PyCapsule_GetPointer",
             "from bncpu._kernels._api_table cimport bncpu_api", "", "",
             "def _fill_api(object table_capsule):",
             '    """Write this module\'s kernels into the C API table held by the capsule."""',
             "    cdef bncpu_api* table = <bncpu_api*>PyCapsule_GetPointer(table_capsule, "
             '"bncpu._capi.table")']
    for member, entry, ctype in members():
        if entry.family == family:
            lines.append(f"    table.{member} = {entry.kernel}[{ctype}]")
    return "\n".join(lines) + "\n"


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


def write_sources(kernels_dir=None):
    """Write _api_table.pxd and every _fill_<family>.pxi into bncpu/_kernels."""
    kernels_dir = kernels_dir or os.path.dirname(os.path.abspath(__file__))
    write_if_changed(os.path.join(kernels_dir, "_api_table.pxd"), cython_table())
    for family in FAMILIES:
        write_if_changed(os.path.join(kernels_dir, f"_fill_{family}.pxi"), fill_source(family))


MACROS_BEGIN = "/* ---- the kernels' macros: generated from bncpu/_kernels/manifest.py ---- */"
MACROS_END = "/* ---- end of the generated macros ---- */"


def header_macros():
    """The block of include/bncpu.h between MACROS_BEGIN and MACROS_END."""
    lines = [MACROS_BEGIN]
    for member, _, _ in members():
        lines.append(f"#define bncpu_{member}(...) BNCPU_CALL_({member}, __VA_ARGS__)")
    lines.append(MACROS_END)
    return "\n".join(lines)


def header_members(header_text):
    """The kernel members of bncpu_api in the header text, in order, with their types
    normalized to the manifest's spelling: [(member name, parameter text)]."""
    struct = header_text[header_text.index("typedef struct bncpu_api {"):]
    struct = struct[:struct.index("} bncpu_api;")]
    struct = re.sub(r"/\*.*?\*/", "", struct, flags=re.S)
    found = []
    for match in re.finditer(r"int\s*\(\*(\w+_f(?:32|64))\)\s*\(([^)]*)\)\s*;", struct):
        params = re.sub(r"\s+", " ", match.group(2)).strip()
        params = re.sub(r"\s*\*\s*", "* ", params).replace("* ,", "*,")
        found.append((match.group(1), params))
    return found


def check_header(header_text):
    """Problems of the header against the manifest ([] when it follows it)."""
    problems = []
    expected = [(member, re.sub(r"\s*\*\s*", "* ", _params(entry, ctype)))
                for member, entry, ctype in members()]
    actual = header_members(header_text)
    if [m for m, _ in actual] != [m for m, _ in expected]:
        problems.append(f"bncpu_api members {[m for m, _ in actual]} are not the manifest's "
                        f"{[m for m, _ in expected]} in order")
    else:
        for (member, got), (_, want) in zip(actual, expected):
            if got != want:
                problems.append(f"{member}: the header has ({got}), the manifest ({want})")
    if header_macros() not in header_text:
        problems.append("the macro block differs from header_macros(): run "
                        "python bncpu/_kernels/manifest.py --header")
    return problems


def _header_path():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "include",
                        "bncpu.h")


def main(argv):
    path = _header_path()
    with open(path) as f:
        text = f.read()
    if argv == ["--header"]:
        start = text.index(MACROS_BEGIN)
        stop = text.index(MACROS_END) + len(MACROS_END)
        with open(path, "w") as f:
            f.write(text[:start] + header_macros() + text[stop:])
        return 0
    if argv == ["--sources"]:
        write_sources()
        return 0
    if argv == ["--check"]:
        problems = check_header(text)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    print("usage: python bncpu/_kernels/manifest.py --header | --check | --sources",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
