"""Every C entry, in every dtype, called with each fault it can have: the status that
include/bncpu.h names, the same for the same fault in every entry, and nothing written.

The entries are called as a C program reaches them: through the function table behind
the capsule bncpu._capi._C_API, with ctypes. The table's layout is read from the header
and its kernel members, with their parameters, from the manifest, so a new entry is
tested without a line here unless it brings a new parameter name.
"""
import ctypes
import itertools
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bncpu
from bncpu import _capi
from bncpu._kernels import manifest

HEADER = Path(bncpu.get_include()) / "bncpu.h"
TESTS = Path(__file__).resolve().parent


def status_code(name):
    """A bncpu_status value, read from include/bncpu.h."""
    return int(re.search(rf"\b{name}\s*=\s*(\d+)", HEADER.read_text()).group(1))


OK = status_code("BNCPU_OK")
NULL_POINTER = status_code("BNCPU_ERR_NULL_POINTER")
BAD_SIZE = status_code("BNCPU_ERR_BAD_SIZE")
ONE_VALUE = status_code("BNCPU_ERR_ONE_VALUE")
BAD_EPS = status_code("BNCPU_ERR_BAD_EPS")
BAD_MOMENTUM = status_code("BNCPU_ERR_BAD_MOMENTUM")
ALIASED_STATS = status_code("BNCPU_ERR_ALIASED_STATS")
BAD_GROUPS = status_code("BNCPU_ERR_BAD_GROUPS")
ALIASED = status_code("BNCPU_ERR_ALIASED")


# ----------------------------------------------------------------------------------
# The table, as C sees it
# ----------------------------------------------------------------------------------
def _table_type():
    """A ctypes Structure laid out as the header's bncpu_api: every function pointer a
    void pointer, every other field as declared (int, pointers)."""
    text = HEADER.read_text()
    start = text.index("typedef struct bncpu_api {") + len("typedef struct bncpu_api {")
    body = re.sub(r"/\*.*?\*/", "", text[start:text.index("} bncpu_api;")], flags=re.S)
    fields = []
    for declaration in body.split(";"):
        declaration = " ".join(declaration.split())
        if not declaration:
            continue
        function = re.search(r"\(\s*\*\s*(\w+)\s*\)", declaration)
        if function:
            fields.append((function.group(1), ctypes.c_void_p))
            continue
        name = re.search(r"(\w+)$", declaration).group(1)
        if "*" in declaration:
            fields.append((name, ctypes.c_void_p))
        elif declaration.startswith(("int64_t", "uint64_t", "size_t")):
            fields.append((name, ctypes.c_int64))
        else:
            assert re.match(r"(unsigned )?int \w+$", declaration), declaration
            fields.append((name, ctypes.c_int))
    return type("bncpu_api", (ctypes.Structure,), {"_fields_": fields})


def _table():
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(_capi._C_API, b"bncpu._capi._C_API")
    return _table_type().from_address(address)


TABLE = _table()
C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "double": ctypes.c_double}


def parameters(entry):
    """[(name, kind)] of an entry: kind is the element type of a pointer ("T" data, "P"
    parameters and statistics, "double", "int64_t"), with "const" when it is read only,
    or the C type of a scalar."""
    return [(param.name, ("const " if param.const else "") + param.base
             + ("*" if param.pointer else "")) for param in manifest.params(entry)]


def kernel(member, entry):
    argtypes = [ctypes.c_void_p if kind.endswith("*") else C_TYPES[kind]
                for _, kind in parameters(entry)]
    return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(getattr(TABLE, member))


# ----------------------------------------------------------------------------------
# A valid call of every entry
# ----------------------------------------------------------------------------------
SIZES = dict(n=3, c=4, s=5, rows=3, d=4, groups=2, p=2)
DATA = {"x", "y", "dy", "dx", "residual", "dresidual"}
# Pointers the header says may be NULL. running_mean and running_var go together (both
# or neither): one alone is a missing pointer, so they count as required here.
OPTIONAL = {
    "batch_norm_forward_train": {"weight", "bias", "save_mean", "save_invstd"},
    "batch_norm_forward_eval": {"weight", "bias"},
    "batch_norm_backward": {"dx", "weight", "running_mean", "running_var", "dweight", "dbias"},
    "batch_norm_stats": set(),
    "batch_norm_gather_stats": set(),
    "batch_norm_elemt": {"weight", "bias"},
    "batch_norm_backward_reduce": set(),
    "batch_norm_backward_elemt": {"weight"},
    "batch_norm_relu_forward_train": {"residual", "weight", "bias", "save_mean",
                                      "save_invstd"},
    "batch_norm_relu_forward_eval": {"residual", "weight", "bias"},
    "batch_norm_relu_backward": {"weight", "running_mean", "running_var", "dweight", "dbias",
                                 "dresidual"},
    "layer_norm_forward": {"weight", "bias", "save_mean", "save_rstd"},
    "layer_norm_backward": {"dx", "weight", "dweight", "dbias"},
    "group_norm_forward": {"weight", "bias", "save_mean", "save_rstd"},
    "group_norm_backward": {"dx", "weight", "dweight", "dbias"},
    "group_norm_channels_last_forward": {"weight", "bias", "save_mean", "save_rstd"},
    "group_norm_channels_last_backward": {"dx", "weight", "dweight", "dbias"},
    "rms_norm_forward": {"weight", "save_rstd"},
    "rms_norm_backward": {"dx", "weight", "dweight"},
}
# Inputs the valid call does not read (training = 1 reads the saved statistics): they
# may share memory with anything.
UNREAD = {"batch_norm_backward": {"running_mean", "running_var"},
          "batch_norm_relu_backward": {"running_mean", "running_var"}}
SCALARS = dict(momentum=0.1, eps=1e-5, unbiased=1, training=1)
POSITIVE = {"running_var", "save_invstd", "invstd", "rstd", "m2", "save_rstd"}
CAPACITY = 1024   # bytes of every buffer: more than any array here, so that a call that
                  # should have been refused still writes inside memory the test owns


def length(entry, name):
    """Elements of the array `name` in the valid call of `entry`."""
    n, c, s, groups, p = (SIZES[k] for k in ("n", "c", "s", "groups", "p"))
    per_row_family = entry.family == "row_norm"
    if "rows" in dict(parameters(entry)):   # layer and RMS norm: (rows, d)
        n, c, s, groups = SIZES["rows"], SIZES["d"], 1, 1
    if name in DATA:
        return n * c * s
    if name == "counts":
        return p
    if entry.name == "batch_norm_gather_stats" and name in ("mean", "m2"):
        return p * c
    if per_row_family and name in ("save_mean", "save_rstd", "mean", "rstd"):
        return n * groups
    return c


class Into:
    """A pointer `elements` elements into another array of the same call."""

    def __init__(self, name, elements=0):
        self.name, self.elements = name, elements


class Filled:
    """The same array, filled with other values before the call."""

    def __init__(self, values):
        self.values = values


class Call:
    """Arguments of one call of a table member: buffers (CAPACITY bytes each) viewed as
    the arrays the entry reads and writes, and the scalars."""

    def __init__(self, member, entry, dtype, param_dtype):
        self.member, self.entry, self.dtype = member, entry, dtype
        self.params = parameters(entry)
        self.buffers, self.arrays, self.values = {}, {}, {}
        rng = np.random.default_rng(0)
        for name, kind in self.params:
            if kind.endswith("*"):
                element = {"T": dtype, "P": param_dtype, "double": np.float64,
                           "int64_t": np.int64}[
                    kind.split()[-1][:-1]]
                buffer = np.zeros(CAPACITY, np.uint8)
                array = buffer[:length(entry, name) * np.dtype(element).itemsize].view(element)
                if name == "counts":
                    array[:] = SIZES["n"] * SIZES["s"]
                elif name in POSITIVE:
                    array[:] = rng.uniform(0.5, 2.0, array.size)
                else:
                    array[:] = rng.normal(size=array.size)
                self.buffers[name], self.arrays[name] = buffer, array
                self.values[name] = array.ctypes.data
            elif name in SIZES:
                self.values[name] = SIZES[name]
            elif name == "count":
                self.values[name] = SIZES["n"] * SIZES["s"] * SIZES["p"]
            else:
                self.values[name] = SCALARS[name]

    def pointers(self):
        return [name for name, kind in self.params if kind.endswith("*")]

    def outputs(self):
        return [name for name, kind in self.params
                if kind.endswith("*") and not kind.startswith("const")]

    def inputs(self):
        return [name for name, kind in self.params if kind.startswith("const")
                and name not in UNREAD.get(self.entry.name, ())]

    def run(self, **changes):
        """The status of the call with some arguments changed: a value, or Into(name,
        elements) for a pointer into this call's array `name`."""
        values = dict(self.values)
        for name, value in changes.items():
            if isinstance(value, Filled):
                continue
            if isinstance(value, Into):
                value = self.values[value.name] + value.elements * self.arrays[value.name].itemsize
            values[name] = value
        return kernel(self.member, self.entry)(*(values[name] for name, _ in self.params))

    def snapshot(self):
        return {name: buffer.copy() for name, buffer in self.buffers.items()}


MEMBERS = [(member.name, member.entry, member.dtype.data)
           for member in manifest.members()]
IDS = [member for member, _, _ in MEMBERS]


# The NumPy storage of a member's data (T) and parameters (P). Half data is stored as
# float16 bits for both 16-bit formats: read as bfloat16 they are finite values too.
DATA_STORAGE = {"float": np.float32, "double": np.float64, "bncpu_bf16": np.float16,
                "bncpu_f16": np.float16}


def make_call(member, entry, ctype):
    param = np.float64 if ctype == "double" else np.float32
    return Call(member, entry, DATA_STORAGE[ctype], param)


@pytest.mark.parametrize("member, entry, ctype", MEMBERS, ids=IDS)
def test_the_valid_call_succeeds(member, entry, ctype):
    call = make_call(member, entry, ctype)
    assert call.run() == OK
    assert set(OPTIONAL[entry.name]) <= set(call.pointers()), "OPTIONAL names no parameter"


# ----------------------------------------------------------------------------------
# The faults
# ----------------------------------------------------------------------------------
def faults(call):
    """(description, changes to the valid call, expected status) of every fault the
    entry can have."""
    names = dict(call.params)
    for name, kind in call.params:
        if kind == "int64_t" and (name in SIZES or name == "count"):
            yield f"{name} = -1", {name: -1}, BAD_GROUPS if name == "groups" else BAD_SIZE
    for name in call.pointers():
        if name not in OPTIONAL[call.entry.name]:
            yield f"{name} NULL", {name: None}, NULL_POINTER
    if "eps" in names:
        for eps in (-1.0, math.nan, math.inf):
            yield f"eps = {eps}", {"eps": eps}, BAD_EPS
    if "momentum" in names:
        for momentum in (-0.1, 1.5, math.nan):
            yield f"momentum = {momentum}", {"momentum": momentum}, BAD_MOMENTUM
    if "groups" in names:
        for groups in (0, 3):   # c = 4
            yield f"groups = {groups}", {"groups": groups}, BAD_GROUPS
    if "unbiased" in names and "n" in names:   # the training forwards
        yield "one value per channel", {"n": 1, "s": 1}, ONE_VALUE
    if "counts" in names:
        yield "one value per channel", {"counts": Filled([1] + [0] * (SIZES["p"] - 1))}, ONE_VALUE
    stats = {"running_mean", "running_var"}
    if stats <= set(call.outputs()):
        yield "running_var is running_mean", {"running_var": Into("running_mean")}, ALIASED_STATS
    for a, b in itertools.combinations(call.outputs(), 2):
        if {a, b} != stats:
            yield f"{b} is {a}", {b: Into(a)}, ALIASED
    for output in call.outputs():
        for source in call.inputs():
            if output in DATA and source in DATA:
                # In place is allowed; one element off is not.
                yield f"{output} one element past {source}", {output: Into(source, 1)}, ALIASED
            else:
                yield f"{output} is {source}", {output: Into(source)}, ALIASED


CASES = [(member, entry, ctype, description, changes, expected)
         for member, entry, ctype in MEMBERS
         for description, changes, expected in faults(make_call(member, entry, ctype))]


@pytest.mark.parametrize("member, entry, ctype, description, changes, expected", CASES,
                         ids=[f"{case[0]}: {case[3]}" for case in CASES])
def test_a_fault_gives_its_status_and_writes_nothing(member, entry, ctype, description,
                                                     changes, expected):
    call = make_call(member, entry, ctype)
    for name, value in changes.items():
        if isinstance(value, Filled):
            call.arrays[name][:] = value.values
    before = call.snapshot()
    status = call.run(**changes)
    assert status == expected, (f"{member} with {description}: status {status} "
                                f"({_capi.strerror(status)}), expected {expected} "
                                f"({_capi.strerror(expected)})")
    for name, buffer in call.snapshot().items():
        np.testing.assert_array_equal(buffer, before[name], err_msg=f"{name} written")


def test_every_fault_class_is_exercised():
    """The table reaches every status a fault can give."""
    assert {case[5] for case in CASES} == {NULL_POINTER, BAD_SIZE, ONE_VALUE, BAD_EPS,
                                           BAD_MOMENTUM, ALIASED_STATS, BAD_GROUPS, ALIASED}


def test_the_aliased_status_has_its_message():
    assert "share memory" in _capi.strerror(ALIASED)


# ----------------------------------------------------------------------------------
# Sizes no array can have: refused at once (a subprocess: the failure was a hang)
# ----------------------------------------------------------------------------------
HUGE = 2 ** 62


def huge_statuses():
    """Every member called with no values (n or rows 0), 2^62 channels and every pointer
    NULL: [(member, status)]."""
    found = []
    for member, entry, ctype in MEMBERS:
        call = make_call(member, entry, ctype)
        changes = {name: None for name in call.pointers()}
        changes.update({name: 0 for name in ("n", "rows", "p") if name in call.values})
        changes.update({name: HUGE for name in ("c", "d") if name in call.values})
        if "groups" in call.values:
            changes["groups"] = 1
        if "count" in call.values:
            changes["count"] = 0
        found.append((member, call.run(**changes)))
    return found


def test_sizes_beyond_any_array_return_at_once():
    script = f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import test_c_statuses
        for member, status in test_c_statuses.huge_statuses():
            print(member, status)
    """
    from conftest import CHILD_CWD
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                            capture_output=True, text=True, timeout=120, cwd=CHILD_CWD)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = dict(line.split() for line in result.stdout.splitlines())
    assert statuses == {member: str(BAD_SIZE) for member, _, _ in MEMBERS}


# ----------------------------------------------------------------------------------
# In place: an output may be an input shaped like the data
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ctype", ["float", "double"])
@pytest.mark.parametrize("source", ["dy", "y", "x"])
def test_dresidual_in_place_of_an_input(ctype, source):
    """batch_norm_relu_backward with dresidual written over dy, y or x gives the results
    of separate buffers (each value is read before dresidual's is written)."""
    member = "batch_norm_relu_backward_" + ("f32" if ctype == "float" else "f64")
    entry = next(e for m, e, _ in MEMBERS if m == member)
    separate = make_call(member, entry, ctype)
    separate.arrays["y"][::3] = -1   # some values the ReLU stopped
    assert separate.run() == OK
    expected = {name: separate.arrays[name].copy() for name in ("dx", "dweight", "dbias",
                                                               "dresidual")}
    in_place = make_call(member, entry, ctype)
    in_place.arrays["y"][::3] = -1
    assert in_place.run(dresidual=Into(source)) == OK
    for name in ("dx", "dweight", "dbias"):
        np.testing.assert_array_equal(in_place.arrays[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(in_place.arrays[source], expected["dresidual"])
