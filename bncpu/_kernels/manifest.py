"""The one list of bncpu's kernels: instruction-set levels, data dtypes, kernel families
and C API entries. Everything mechanical is generated from it:

* include/bncpu.h, between its marker comments: the API version, the ``bncpu_api``
  struct (each member documented by its entry's ``doc``) and the ``bncpu_<member>``
  macros;
* bncpu/_ops.pyi, between its marker comments: the stubs of the generated wrappers;
* at build time (setup.py; ignored files): the Cython view of the table
  (``_api_table.pxd``), each family's table-filling code (``_fill_<family>.pxi``) and
  the dtype-dispatching Python wrappers of bncpu._ops (``bncpu/_ops_entries.pxi``).

Adding a kernel entry: write the kernel in its family's .pyx (a ``cdef int <kernel>(...)
noexcept nogil`` over the family's fused type), append an ``Entry`` to ENTRIES with
``since`` = the next minor version (API_VERSION_MINOR + 1), and run
``python bncpu/_kernels/manifest.py --write``. A kernel whose signature differs from its
member fails the build (the table is typed, and setup.py compiles with
-Werror=incompatible-pointer-types).
Adding a data dtype: instantiate the kernels for it, append a ``Dtype`` to DTYPES with
``since`` = the next minor version, and run ``--write``. A dtype whose data type is not
its arithmetic type (bfloat16, float16: float32 arithmetic) has its own kernel variant,
``<kernel><Dtype.kernels>`` (``bn_forward_train_half``); the entries that have it list the
variant in ``Entry.kernels``, so the table has a member exactly where a kernel exists.

API versions (as NumPy's C API): the table only grows. Members are never removed,
reordered or retyped; new ones are appended, grouped by the minor version that added
them (``since``), so a table of a later minor starts with the whole table of an earlier
one. BNCPU_API_VERSION_MINOR is the highest ``since``; bncpu_import() accepts a package
whose table has the same major version and a minor version >= the header's, so a C
program keeps working with every later package of the same major version. Anything
else that changes the table (removing, reordering or changing a member) increments
API_VERSION_MAJOR and resets every ``since`` to 0; old programs then get a clear
refusal instead of a crash.

``python bncpu/_kernels/manifest.py --write`` rewrites the generated blocks of the
header and the stub; ``--check`` exits 1 (naming the problem) when they differ from the
manifest; ``--sources`` writes the build-time files (as setup.py does).
This module imports nothing but the standard library (setup.py reads it before anything
is built, and bncpu._dispatch on the C start-up path).
"""
import collections
import os
import sys

# Instruction-set levels, best last: name -> (module suffix, compiler flags). The
# "baseline" build is portable x86-64 (SSE2), or the only build off x86.
ISA_LEVELS = collections.OrderedDict([
    ("baseline", ("", [])),
    ("avx2", ("_avx2", ["-mavx2", "-mfma", "-mf16c"])),
    ("avx512", ("_avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                            "-mprefer-vector-width=512"])),
])

# Kernel families: each is bncpu/_kernels/<family>.pyx, compiled once per ISA level.
FAMILIES = ("batch_norm", "row_norm")

API_VERSION_MAJOR = 3

# One data dtype of the table: member <entry><suffix> takes data (x, y, dy, dx, residual:
# `T` in Entry.params) of C type `data` and parameters and statistics (weight, bias,
# running and saved statistics, their gradients: `P`) of C type `param`; the kernel
# written into it is <kernel><kernels>[<fused>]; `numpy` is the NumPy scalar type of the data
# ("module.name": numpy.float32, ml_dtypes.bfloat16).
# A half-precision dtype has a uint16_t data type (bncpu_bf16, bncpu_f16, declared in
# include/bncpu.h) and float parameters; its kernels are the family's half-precision
# kernels, <kernel>_half, fused over the one-member structs bncpu_bf16_lane and
# bncpu_f16_lane (distinct types, unlike the two uint16_t typedefs).
Dtype = collections.namedtuple("Dtype", "suffix data param kernels fused numpy since")

DTYPES = (
    Dtype("_f32", "float", "float", "", "float", "numpy.float32", 0),
    Dtype("_f64", "double", "double", "", "double", "numpy.float64", 0),
    Dtype("_bf16", "bncpu_bf16", "float", "_half", "bncpu_bf16_lane", "ml_dtypes.bfloat16", 1),
    Dtype("_f16", "bncpu_f16", "float", "_half", "bncpu_f16_lane", "numpy.float16", 1),
)

# One C API entry: a table member per dtype, <name><suffix>, filled with the kernel
# <kernel><Dtype.kernels>[<Dtype.fused>] of <family>.
# params: the C parameters, T the data type and P the parameter type of the dtype; a
#   pointer whose name ends in "?" may be NULL (NULL is None in Python; the header says
#   so in the doc).
# doc: the member's documentation in include/bncpu.h ("" when the previous entry's
#   covers it); section: a heading above it, or None.
# python: the bncpu._ops wrapper generated for it, "<prefix>_<op>" (listed as
#   bncpu._ops.<family>.<op>; its dtype is that of the first non-optional T array),
#   or None where bncpu._ops routes the entry by hand.
# since: the API minor version that added the entry.
# kernels: the variants of its kernel that its family defines, as Dtype.kernels names
#   them ("": <kernel>, "_half": <kernel>_half); the table has a member <name><suffix>
#   for every dtype whose variant is among them. A member belongs to the minor version
#   max(entry since, dtype since): give an entry a new variant only while that minor
#   version is unreleased (the table only grows, see below).
Entry = collections.namedtuple("Entry", "name family kernel params doc section python since "
                                        "kernels", defaults=(("", "_half"),))

# The entries without a half-precision kernel (yet).
FULL_PRECISION = ("",)

ENTRIES = (
    Entry("batch_norm_forward_train", "batch_norm", "bn_forward_train",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, const P* weight?, "
          "const P* bias?, P* running_mean?, P* running_var?, double momentum, double eps, "
          "P* save_mean?, P* save_invstd?, int unbiased",
          """\
Training forward. Per channel j over its M = n*s values: mean, biased var,
invstd = 1/sqrt(var + eps), y = (x - mean)*invstd*weight[j] + bias[j].
If running_mean/running_var are given (both or neither; may be NULL) and M > 0:
  running_mean = (1-momentum)*running_mean + momentum*mean
  running_var  = (1-momentum)*running_var  + momentum*var*M/(M-1)
(unbiased != 0, PyTorch's convention), or momentum*var (unbiased == 0: the biased
batch variance, as Keras and d2l keep it).
save_mean/save_invstd (c values each, may be NULL) receive mean and invstd.
weight/bias may be NULL (1 and 0). y may be x. M == 1 is BNCPU_ERR_ONE_VALUE;
M == 0 writes nothing but save_mean = 0, save_invstd = 1/sqrt(eps) (nan-free).""",
          "batch norm: fused", "bn_forward_train", 0),
    Entry("batch_norm_forward_eval", "batch_norm", "bn_forward_eval",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, const P* weight?, "
          "const P* bias?, const P* running_mean, const P* running_var, double eps",
          "Inference forward: y = (x - running_mean)/sqrt(running_var + eps)*weight + bias.",
          None, "bn_forward_eval", 0),
    Entry("batch_norm_backward", "batch_norm", "bn_backward",
          "const T* dy, const T* x?, T* dx?, int64_t n, int64_t c, int64_t s, "
          "const P* weight?, const P* running_mean?, const P* running_var?, "
          "const P* save_mean?, const P* save_invstd?, int training, double eps, "
          "P* dweight?, P* dbias?",
          """\
Backward. training != 0: mean = save_mean, invstd = save_invstd (from the forward),
  xhat = (x - mean)*invstd, dbias = Σ dy, dweight = Σ dy*xhat,
  dx = weight*invstd*(dy - Σdy/M - xhat*Σ(dy*xhat)/M).
training == 0: mean = running_mean, invstd = 1/sqrt(running_var + eps),
  dx = dy*weight*invstd, dweight = Σ dy*(x - mean)*invstd, dbias = Σ dy.
dx, dweight, dbias may each be NULL (not computed); dx may be dy or x.
The statistics not used by the chosen mode may be NULL. eps is checked in both modes.""",
          None, "bn_backward", 0),
    Entry("batch_norm_stats", "batch_norm", "bn_stats",
          "const T* x, int64_t n, int64_t c, int64_t s, double* mean, double* m2",
          """\
Local statistics: per channel mean and m2 = Σ (x - mean)² over the n*s values
(count = n*s; count 0 gives 0 and 0).""",
          "batch norm: split phase (synchronized batch norm across processes)", "bn_stats", 0),
    Entry("batch_norm_gather_stats", "batch_norm", "bn_gather_stats",
          "int64_t p, int64_t c, const double* mean, const double* m2, const int64_t* counts, "
          "P* running_mean?, P* running_var?, double momentum, double eps, double* mean_out, "
          "double* invstd_out, int unbiased",
          """\
Merge p partials (mean and m2 are p*c row-major, counts has p entries) into the
global mean and invstd = 1/sqrt(M2/count + eps), and update the running statistics
(may be NULL) as the training forward does, with the total count (unbiased as
there). A total count of 0 leaves everything unchanged and gives mean 0,
invstd 1/sqrt(eps).""",
          None, None, 0, FULL_PRECISION),
    Entry("batch_norm_elemt", "batch_norm", "bn_elemt",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, const double* mean, "
          "const double* invstd, const P* weight?, const P* bias?",
          "Normalize with given statistics: y = (x - mean)*invstd*weight + bias.",
          None, "bn_elemt", 0),
    Entry("batch_norm_backward_reduce", "batch_norm", "bn_backward_reduce",
          "const T* dy, const T* x, int64_t n, int64_t c, int64_t s, const double* mean, "
          "double* sum_dy, double* sum_dy_xmu",
          "Backward reduce: sum_dy = Σ dy, sum_dy_xmu = Σ dy*(x - mean), per channel.",
          None, "bn_backward_reduce", 0),
    Entry("batch_norm_backward_elemt", "batch_norm", "bn_backward_elemt",
          "const T* dy, const T* x, T* dx, int64_t n, int64_t c, int64_t s, const double* mean, "
          "const double* invstd, const P* weight?, const double* sum_dy, "
          "const double* sum_dy_xmu, int64_t count",
          """\
Backward elementwise, with the global sums and count of all processes:
dx = weight*invstd*(dy - sum_dy/count - (x - mean)*invstd²*sum_dy_xmu/count).""",
          None, "bn_backward_elemt", 0),
    Entry("batch_norm_relu_forward_train", "batch_norm", "bn_relu_forward_train",
          "const T* x, const T* residual?, T* y, int64_t n, int64_t c, int64_t s, "
          "const P* weight?, const P* bias?, P* running_mean?, P* running_var?, "
          "double momentum, double eps, P* save_mean?, P* save_invstd?, int unbiased",
          """\
Training and inference forward of y = relu(batch_norm(x) + residual), relu(v) = 0
where v < 0, else v (NaN kept): the arguments and statistics of the batch-norm
forwards above, and residual (n*c*s values, may be NULL: no add). After the
statistics, one pass over x and the residual. y may be x or residual.""",
          "batch norm + (add +) ReLU, fused", "bn_relu_forward_train", 0),
    Entry("batch_norm_relu_forward_eval", "batch_norm", "bn_relu_forward_eval",
          "const T* x, const T* residual?, T* y, int64_t n, int64_t c, int64_t s, "
          "const P* weight?, const P* bias?, const P* running_mean, const P* running_var, "
          "double eps",
          "", None, "bn_relu_forward_eval", 0),
    Entry("batch_norm_relu_backward", "batch_norm", "bn_relu_backward",
          "const T* dy, const T* y, const T* x?, T* dx?, int64_t n, int64_t c, int64_t s, "
          "const P* weight?, const P* running_mean?, const P* running_var?, "
          "const P* save_mean?, const P* save_invstd?, int training, double eps, "
          "P* dweight?, P* dbias?, T* dresidual?",
          """\
Backward of those, y their output: g = dy where y passed the ReLU (!(y <= 0): a NaN
output passes), else 0, applied as dy is read; dx, dweight, dbias are
batch_norm_backward's for g (training or not, as there), and dresidual = g
(may be NULL: not written). dx is required and may be dy, y or x; dresidual must
not alias dx.""",
          None, "bn_relu_backward", 0, FULL_PRECISION),
    Entry("layer_norm_forward", "row_norm", "layer_norm_forward",
          "const T* x, T* y, int64_t rows, int64_t d, const P* weight?, const P* bias?, "
          "double eps, P* save_mean?, P* save_rstd?",
          """\
y = (x - mean_r)*rstd_r*weight[k] + bias[k], mean_r and rstd_r = 1/sqrt(var_r + eps)
over each row r; weight/bias (d values) may be NULL; save_mean/save_rstd (rows
values) may be NULL.""",
          "layer norm: rows of d values", None, 0, FULL_PRECISION),
    Entry("layer_norm_backward", "row_norm", "layer_norm_backward",
          "const T* dy, const T* x, T* dx?, int64_t rows, int64_t d, const P* mean, "
          "const P* rstd, const P* weight?, P* dweight?, P* dbias?",
          """\
xhat = (x - mean)*rstd, g = dy*weight:
dx = rstd*(g - mean_k(g) - xhat*mean_k(g*xhat)); dweight = Σ_r dy*xhat; dbias = Σ_r dy.
dx, dweight, dbias may be NULL.""",
          None, None, 0, FULL_PRECISION),
    Entry("group_norm_forward", "row_norm", "group_norm_forward",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, int64_t groups, "
          "const P* weight?, const P* bias?, double eps, P* save_mean?, P* save_rstd?",
          """\
Statistics per (sample, group) over (c/groups)*s values; weight/bias per channel.
save_mean/save_rstd hold n*groups values. groups == c is instance norm.""",
          "group norm: (n, c, s), groups of c/groups contiguous channels", None, 0, FULL_PRECISION),
    Entry("group_norm_backward", "row_norm", "group_norm_backward",
          "const T* dy, const T* x, T* dx?, int64_t n, int64_t c, int64_t s, int64_t groups, "
          "const P* mean, const P* rstd, const P* weight?, P* dweight?, P* dbias?",
          "", None, None, 0, FULL_PRECISION),
    Entry("group_norm_channels_last_forward", "row_norm", "group_norm_channels_last_forward",
          "const T* x, T* y, int64_t n, int64_t c, int64_t s, int64_t groups, "
          "const P* weight?, const P* bias?, double eps, P* save_mean?, P* save_rstd?",
          """\
Channels last: the same arguments and results as group_norm_forward/_backward
(n, c, s, groups; save_mean/save_rstd and mean/rstd n*groups values, weight, bias,
dweight, dbias c values), with x, y, dy, dx laid out (n, s, c): value (i, k, j) of
sample i, position k, channel j at [(i*s + k)*c + j]. No copy is made; y may be x,
dx may be dy or x. The results equal those of group_norm_* on the same values
laid out channels first to rounding (the sums run in another order; bit for bit
when s <= 1, where the two layouts are one), and are bitwise identical for any
number of threads. groups == c is instance norm.""",
          None, None, 0, FULL_PRECISION),
    Entry("group_norm_channels_last_backward", "row_norm", "group_norm_channels_last_backward",
          "const T* dy, const T* x, T* dx?, int64_t n, int64_t c, int64_t s, int64_t groups, "
          "const P* mean, const P* rstd, const P* weight?, P* dweight?, P* dbias?",
          "", None, None, 0, FULL_PRECISION),
    Entry("rms_norm_forward", "row_norm", "rms_norm_forward",
          "const T* x, T* y, int64_t rows, int64_t d, const P* weight?, double eps, "
          "P* save_rstd?",
          """\
y = x*rstd_r*weight[k], rstd_r = 1/sqrt(mean_k(x²) + eps); weight and save_rstd
may be NULL. Backward: g = dy*weight, dx = rstd*(g - x*rstd²*mean_k(g*x)),
dweight = Σ_r dy*x*rstd.""",
          "RMS norm: rows of d values", None, 0, FULL_PRECISION),
    Entry("rms_norm_backward", "row_norm", "rms_norm_backward",
          "const T* dy, const T* x, T* dx?, int64_t rows, int64_t d, const P* rstd, "
          "const P* weight?, P* dweight?",
          "", None, None, 0, FULL_PRECISION),
)

API_VERSION_MINOR = max(row.since for row in DTYPES + ENTRIES)

# The members before the kernels: (C declaration, Cython declaration, comment).
HEAD = (
    ("int api_version_major", "int api_version_major",
     "BNCPU_API_VERSION_MAJOR of the package"),
    ("int api_version_minor", "int api_version_minor",
     "BNCPU_API_VERSION_MINOR of the package"),
    ("const char *version", "const char* version", "the package's version, e.g. \"0.1.0\""),
    ("const char *isa", "const char* isa", "instruction set in use, e.g. \"avx2\""),
    ("const char *(*strerror)(int status)", "const char* (*strerror)(int) noexcept nogil",
     "the message of a status"),
    ("int (*get_num_threads)(void)", "int (*get_num_threads)() noexcept nogil",
     "threads a large call uses"),
    ("void (*set_num_threads)(int n)", "void (*set_num_threads)(int) noexcept nogil",
     "0 = OpenMP default"),
)

# Data types of half-precision dtypes: (name, C type, the layout of the bits).
C_TYPEDEFS = (
    ("bncpu_bf16", "uint16_t", "Half-precision data, as bits. bfloat16: sign, 8 exponent and 7\n"
                               "fraction bits, the upper half of a float32 of the same sign and\n"
                               "exponent."),
    ("bncpu_f16", "uint16_t", "IEEE 754 binary16: sign, 5 exponent and 10 fraction bits."),
)

# Python defaults of the generated wrappers' scalar parameters.
PYTHON_DEFAULTS = {"unbiased": "True"}

Member = collections.namedtuple("Member", "name entry dtype since")
Param = collections.namedtuple("Param", "const base pointer name optional")


def members():
    """Every kernel member of the table, in table order: entries and dtypes of a minor
    version after those of every earlier one (the table only grows), entry by entry."""
    rows = [Member(entry.name + dtype.suffix, entry, dtype, max(entry.since, dtype.since))
            for entry in ENTRIES for dtype in DTYPES if instantiated(entry, dtype)]
    return sorted(rows, key=lambda member: member.since)


def instantiated(entry, dtype):
    """Whether the entry has a kernel for the dtype (see Entry.kernels)."""
    return dtype.kernels in entry.kernels


def params(entry):
    """The entry's parameters, parsed: [Param]."""
    found = []
    for text in entry.params.split(","):
        words = text.replace("*", " * ").split()
        const = words[0] == "const"
        words = words[const:]
        name = words[-1]
        found.append(Param(const, words[0], "*" in words, name.rstrip("?"), name.endswith("?")))
    return found


def _ctype(param, dtype, data):
    return {"T": data or dtype.data, "P": dtype.param}.get(param.base, param.base)


def c_params(entry, dtype, style="c", data=None):
    """The member's parameter list: C style ("const float *x") or Cython ("const float* x"),
    the data typed `data` when given (default: the dtype's C type)."""
    out = []
    for param in params(entry):
        ctype = ("const " if param.const else "") + _ctype(param, dtype, data)
        if param.pointer:
            out.append(f"{ctype} *{param.name}" if style == "c" else f"{ctype}* {param.name}")
        else:
            out.append(f"{ctype} {param.name}")
    return out


def _wrap(head, items, tail, indent, width=96):
    """head + items joined by ", " + tail, broken into lines of at most `width`."""
    lines, line = [], head
    for index, item in enumerate(items):
        piece = item + (", " if index < len(items) - 1 else tail)
        # Break before a piece that would pass the width, unless the line holds nothing
        # yet (only the head, or only the indent).
        if len(line) + len(piece.rstrip()) > width and line.strip() not in ("", head.strip()):
            lines.append(line.rstrip())
            line = indent
        line += piece
    lines.append(line.rstrip())
    return lines


# ----------------------------------------------------------------------------------
# include/bncpu.h
# ----------------------------------------------------------------------------------
TABLE_BEGIN = "/* ---- the API table: generated from bncpu/_kernels/manifest.py ---- */"
TABLE_END = "/* ---- end of the generated table ---- */"
MACROS_BEGIN = "/* ---- the kernels' macros: generated from bncpu/_kernels/manifest.py ---- */"
MACROS_END = "/* ---- end of the generated macros ---- */"


def _comment(text, indent):
    lines = text.splitlines()
    if len(lines) == 1:
        return [f"{indent}/* {lines[0]} */"]
    return ([f"{indent}/* {lines[0]}"] + [f"{indent} * {line}".rstrip() for line in lines[1:-1]]
            + [f"{indent} * {lines[-1]} */"])


def header_table(rows=None):
    """The block of include/bncpu.h between TABLE_BEGIN and TABLE_END: the API version,
    the half-precision data types and the struct bncpu_api (of `rows`, default
    members())."""
    rows = members() if rows is None else rows
    minor = max([0] + [member.since for member in rows])
    lines = [TABLE_BEGIN,
             f"#define BNCPU_API_VERSION_MAJOR {API_VERSION_MAJOR}",
             f"#define BNCPU_API_VERSION_MINOR {minor}", ""]
    for name, ctype, layout in C_TYPEDEFS:
        lines += _comment(layout, "") + [f"typedef {ctype} {name};"]
    lines += ["", "typedef struct bncpu_api {"]
    for c_declaration, _, comment in HEAD:
        lines.append(f"    {c_declaration + ';':<40} /* {comment} */")
    documented, since = set(), None
    for member in rows:
        entry = member.entry
        if member.since != since:
            since = member.since
            lines += ["", f"    /* ==== members of API version {API_VERSION_MAJOR}.{since} ==== */"]
        if entry.name not in documented:
            documented.add(entry.name)
            if entry.section:
                lines += ["", f"    /* ---- {entry.section} {'-' * (76 - len(entry.section))} */"]
            if entry.doc:
                lines += _comment(entry.doc, "    ")
        lines += _wrap(f"    int (*{member.name})(", c_params(entry, member.dtype), ");",
                       " " * 8)
    lines += ["} bncpu_api;", TABLE_END]
    return "\n".join(lines)


def header_macros(rows=None):
    """The block of include/bncpu.h between MACROS_BEGIN and MACROS_END (of `rows`,
    default members())."""
    lines = [MACROS_BEGIN]
    for member in members() if rows is None else rows:
        lines.append(f"#define bncpu_{member.name}(...) BNCPU_CALL_({member.name}, __VA_ARGS__)")
    lines.append(MACROS_END)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# bncpu/_ops.pyi: the stubs of the generated wrappers
# ----------------------------------------------------------------------------------
STUBS_BEGIN = "# ---- generated from bncpu/_kernels/manifest.py: python manifest.py --write ----"
STUBS_END = "# ---- end of the generated stubs ----"
_STUB_TYPES = {("T", True): "_Data", ("P", True): "_Param", ("double", True): "_Stats",
               ("int64_t", True): "NDArray[np.int64]", ("int64_t", False): "int",
               ("double", False): "float", ("int", False): "bool"}
_PARAM_TYPES = {"float": "np.float32", "double": "np.float64"}


def _numpy_type(dtype):
    """'np.float32' for numpy.float32, else the dotted name (e.g. ml_dtypes.bfloat16)."""
    return "np." + dtype.numpy[len("numpy."):] if dtype.numpy.startswith("numpy.") \
        else dtype.numpy


def _union(types):
    return " | ".join(f"NDArray[{t}]" for t in dict.fromkeys(types))


def stubs():
    """The block of bncpu/_ops.pyi between STUBS_BEGIN and STUBS_END."""
    modules = sorted({d.numpy.rsplit(".", 1)[0] for d in DTYPES} - {"numpy"})
    lines = [STUBS_BEGIN] + [f"import {module}" for module in modules]
    lines += [f"_Data = {_union(_numpy_type(d) for d in DTYPES)}",
              f"_Param = {_union(_PARAM_TYPES[d.param] for d in DTYPES)}",
              "_Stats = NDArray[np.float64]", ""]
    for entry in ENTRIES:
        if entry.python is None:
            continue
        items = []
        for param in params(entry):
            annotation = _STUB_TYPES[(param.base, param.pointer)]
            if param.optional:
                annotation += " | None"
            default = PYTHON_DEFAULTS.get(param.name)
            items.append(f"{param.name}: {annotation}" + (f" = {default}" if default else ""))
        lines += _wrap(f"def {entry.python}(", items, ") -> int: ...",
                       " " * (len(entry.python) + 5))
    lines.append(STUBS_END)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Build-time Cython sources
# ----------------------------------------------------------------------------------
GENERATED = "# Generated by setup.py from bncpu/_kernels/manifest.py: do not edit."


def cython_table():
    """_api_table.pxd: the Cython view of include/bncpu.h's bncpu_api, typed."""
    lines = [GENERATED, "from libc.stdint cimport int64_t, uint16_t", "",
             'cdef extern from "bncpu.h":']
    lines += [f"    ctypedef {ctype} {name}" for name, ctype, _ in C_TYPEDEFS]
    lines += ["    ctypedef struct bncpu_api:"]
    lines += [f"        {cython_declaration}" for _, cython_declaration, _ in HEAD]
    for member in members():
        lines.append(f"        int (*{member.name})("
                     f"{', '.join(c_params(member.entry, member.dtype, 'cython'))}) noexcept nogil")
    # The members' pointer types where a kernel's data type differs (fill_source's casts).
    lines.append("")
    for member in _cast_members():
        lines.append(f"ctypedef int (*{member.name}_t)("
                     f"{', '.join(c_params(member.entry, member.dtype, 'cython'))}) "
                     "noexcept nogil")
    return "\n".join(lines) + "\n"


def _cast_members():
    """The members whose kernel takes its data as a lane struct, not the member's type."""
    return [member for member in members() if member.dtype.fused != member.dtype.data]


def fill_source(family):
    """_fill_<family>.pxi: writes the family's kernels into the table (typed: a kernel
    whose signature differs from the member's is a compile error)."""
    lines = [GENERATED,
             "from cpython.pycapsule cimport PyCapsule_GetPointer",
             "from bncpu._kernels._api_table cimport "
             + ", ".join(["bncpu_api"] + [f"{m.name}_t" for m in _cast_members()
                                         if m.entry.family == family]), "", "",
             "def _fill_api(object table_capsule):",
             '    """Write this module\'s kernels into the C API table held by the capsule."""',
             "    cdef bncpu_api* table = <bncpu_api*>PyCapsule_GetPointer(table_capsule, "
             '"bncpu._capi.table")']
    casts = []
    for member in members():
        if member.entry.family != family:
            continue
        kernel = f"{member.entry.kernel}{member.dtype.kernels}[{member.dtype.fused}]"
        if member.dtype.fused == member.dtype.data:
            lines.append(f"    table.{member.name} = {kernel}")
        else:
            # Typed as the kernel (a signature that drifts fails to compile), then cast
            # to the member's bits-typed pointer.
            lines += [f"    cdef {member.name}_kernel {member.name} = {kernel}",
                      f"    table.{member.name} = <{member.name}_t>{member.name}"]
            casts += _wrap(f"ctypedef int (*{member.name}_kernel)(",
                           c_params(member.entry, member.dtype, "cython", member.dtype.fused),
                           ") noexcept nogil", " " * 4)
    if casts:
        lines[5:5] = casts + ["", ""]
    return "\n".join(lines) + "\n"


def _typenum_name(dtype):
    return "TYPENUM" + dtype.suffix.upper()


def ops_wrappers():
    """bncpu/_ops_entries.pxi, included by bncpu/_ops.pyx: for every entry, the cdef
    function call_<entry>(typenum, arguments...) that calls the member of the data's
    dtype with the GIL released, and the Python wrapper of each entry with a
    `python` name; _WRAPPERS lists those by family and operation."""
    lines = [GENERATED,
             "from bncpu._kernels._api_table cimport "
             + ", ".join(name for name, _, _ in C_TYPEDEFS), ""]
    for dtype in DTYPES:
        lines.append(f'cdef int {_typenum_name(dtype)} = typenum_of("{dtype.numpy}")')
    # A dtype of another module (ml_dtypes.bfloat16) has a type number once that module
    # is imported, which bncpu leaves to its user (the import is slow): until then no
    # array has that dtype, and a call that finds no kernel looks again.
    user = [dtype for dtype in DTYPES if not dtype.numpy.startswith("numpy.")]
    lines += ["", "", "cdef bint refresh_typenums() except -1:",
              '    """Look again for the type numbers of dtypes of other modules: whether one '
              'changed."""']
    if user:
        lines.append("    global " + ", ".join(_typenum_name(dtype) for dtype in user))
        lines.append("    cdef bint changed = False")
        for dtype in user:
            lines += [f'    if {_typenum_name(dtype)} != typenum_of("{dtype.numpy}"):',
                      f'        {_typenum_name(dtype)} = typenum_of("{dtype.numpy}")',
                      "        changed = True"]
        lines.append("    return changed")
    else:
        lines.append("    return False")
    wrappers = collections.defaultdict(list)
    for entry in ENTRIES:
        entry_params = params(entry)
        arguments = [p.name if p.pointer else f"{'int' if p.base == 'int' else p.base} {p.name}"
                     for p in entry_params]
        lines += ["", ""]
        lines += _wrap(f"cdef inline int call_{entry.name}(", ["int typenum"] + arguments,
                       ") except -1:", " " * (len(entry.name) + 21))
        for p in entry_params:
            if p.pointer:
                lines.append(f"    cdef void* {p.name}_ = data_pointer({p.name})")
        lines.append("    cdef int status")
        for dtype in DTYPES:
            if not instantiated(entry, dtype):
                continue
            casts = []
            for p, text in zip(entry_params, c_params(entry, dtype, "cython")):
                if p.pointer:
                    casts.append(f"<{text[:text.rindex('*') + 1]}>{p.name}_")
                else:
                    casts.append(p.name)
            lines.append(f"    if typenum == {_typenum_name(dtype)}:")
            lines.append("        with nogil:")
            lines += _wrap(f"            status = API.{entry.name}{dtype.suffix}(", casts, ")",
                           " " * 16)
            lines.append("        return status")
        lines.append("    if refresh_typenums():")
        lines += _wrap(f"        return call_{entry.name}(",
                       ["typenum"] + [p.name for p in entry_params], ")", " " * 12)
        lines += [f'    raise TypeError(f"{entry.name}: no kernel for data of "',
                  '                    f"NumPy type number {typenum}")']
        if entry.python is None:
            continue
        family_prefix, operation = entry.python.split("_", 1)
        wrappers[entry.family].append((operation, entry.python))
        first_data = next(p.name for p in entry_params if p.base == "T" and not p.optional)
        signature = []
        for p in entry_params:
            if not p.pointer:
                kind = "bint" if p.base == "int" else p.base
                default = PYTHON_DEFAULTS.get(p.name)
                signature.append(f"{kind} {p.name}" + (f"={default}" if default else ""))
            else:
                signature.append(p.name)
        lines += ["", ""] + _wrap(f"def {entry.python}(", signature, "):",
                                  " " * (len(entry.python) + 5))
        lines += _wrap(f"    return call_{entry.name}(",
                       [f"cnp.PyArray_TYPE(<cnp.ndarray>{first_data})"]
                       + [p.name for p in entry_params], ")", " " * 8)
    lines += ["", "", "_WRAPPERS = {"]
    for family, operations in wrappers.items():
        lines.append(f'    "{family}": {{')
        lines += [f'        "{operation}": {python},' for operation, python in operations]
        lines.append("    },")
    lines.append("}")
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


def _package_dir():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_sources(package_dir=None):
    """Write the build-time sources: bncpu/_kernels/_api_table.pxd, every
    bncpu/_kernels/_fill_<family>.pxi and bncpu/_ops_entries.pxi."""
    package_dir = package_dir or _package_dir()
    kernels_dir = os.path.join(package_dir, "_kernels")
    write_if_changed(os.path.join(kernels_dir, "_api_table.pxd"), cython_table())
    for family in FAMILIES:
        write_if_changed(os.path.join(kernels_dir, f"_fill_{family}.pxi"), fill_source(family))
    write_if_changed(os.path.join(package_dir, "_ops_entries.pxi"), ops_wrappers())


# ----------------------------------------------------------------------------------
# The committed files' generated blocks
# ----------------------------------------------------------------------------------
def _blocks():
    """(path, [(begin, end, text)]) of every committed file with generated blocks."""
    root = os.path.dirname(_package_dir())
    return [(os.path.join(root, "include", "bncpu.h"),
             [(TABLE_BEGIN, TABLE_END, header_table()),
              (MACROS_BEGIN, MACROS_END, header_macros())]),
            (os.path.join(_package_dir(), "_ops.pyi"), [(STUBS_BEGIN, STUBS_END, stubs())])]


def _replace_block(text, begin, end, block):
    start = text.index(begin)
    stop = text.index(end, start) + len(end)
    return text[:start] + block + text[stop:]


def check_text(text, generated):
    """Problems of a file's text against its generated blocks ([] when it follows them)."""
    problems = []
    for begin, end, block in generated:
        if begin not in text or end not in text:
            problems.append(f"the markers {begin!r} ... {end!r} are missing")
            continue
        start = text.index(begin)
        found = text[start:text.index(end, start) + len(end)]
        if found != block:
            for number, (got, want) in enumerate(zip(found.splitlines() + [""] * 999,
                                                     block.splitlines()), 1):
                if got != want:
                    problems.append(f"generated block {begin[:40]!r}, line {number}: "
                                    f"{got!r} should be {want!r}")
                    break
            else:
                problems.append(f"generated block {begin[:40]!r} has extra lines")
    return problems


def check_header(header_text):
    """Problems of include/bncpu.h's text against the manifest ([] when it follows it)."""
    return check_text(header_text, _blocks()[0][1])


def main(argv):
    if argv == ["--write"]:
        for path, generated in _blocks():
            with open(path) as f:
                text = f.read()
            for begin, end, block in generated:
                text = _replace_block(text, begin, end, block)
            write_if_changed(path, text)
        return 0
    if argv == ["--sources"]:
        write_sources()
        return 0
    if argv == ["--check"]:
        problems = []
        for path, generated in _blocks():
            with open(path) as f:
                problems += [f"{path}: {problem}" for problem in check_text(f.read(), generated)]
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run python bncpu/_kernels/manifest.py --write", file=sys.stderr)
        return 1 if problems else 0
    print("usage: python bncpu/_kernels/manifest.py --write | --check | --sources",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
