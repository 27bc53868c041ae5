"""What every function must do, driven by bncpu._registry (a new function added there
gets all of these tests; the math of each family is tested in its own file):

* agree with its NumPy twin (bncpu.reference), results and in-place updates alike,
  and with PyTorch's CPU kernel where there is one;
* raise on every spoiled call, together with the twin where the twin checks that
  argument, and then have written nothing (neither out= nor the arguments it updates
  in place);
* give bitwise-identical results at 1, 2 and 3 threads, and in every instruction-set
  build the CPU runs (BNCPU_ISA, in a subprocess);
* follow the C API's manifest: include/bncpu.h declares its table as
  bncpu/_kernels/manifest.py lists it.
"""
import ctypes
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import bncpu
from bncpu import _capi
from bncpu._kernels import manifest
from bncpu._registry import FUNCTIONS
from conftest import CHILD_CWD, DTYPES, assert_all_bitwise_equal, assert_close, num_threads

CASES = [(name, shape) for name, spec in FUNCTIONS.items() for shape in spec.shapes]
IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, shape in CASES]


def _assert_results_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        if e is None or (np.ndim(e) and np.size(e) == 0):
            assert a is None or np.size(a) == 0, f"result {index}"
            continue
        a = np.asarray(a)
        e = np.asarray(e, dtype=np.float64)
        assert a.size == e.size, f"result {index}: {a.shape} vs {e.shape}"
        assert_close(a.reshape(e.shape), e, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape", CASES, ids=IDS)
def test_agrees_with_the_twin(name, shape, dtype):
    spec = FUNCTIONS[name]
    args = spec.inputs(shape, dtype)
    ours, theirs = spec.copy_args(args), spec.copy_args(args)
    _assert_results_close(spec.call(ours), spec.call_twin(theirs), dtype)
    for written in spec.written:
        assert_close(ours[written], theirs[written], dtype)


@pytest.mark.parametrize("name, shape", CASES, ids=IDS)
def test_agrees_with_torch(name, shape, torch):
    spec = FUNCTIONS[name]
    if spec.torch is None:
        pytest.skip(f"PyTorch has no CPU kernel for {name}")
    args = spec.inputs(shape, np.float64)
    ours, theirs = spec.copy_args(args), spec.copy_args(args)
    expected = spec.torch_results(torch, theirs)
    actual = spec.call(ours)[:len(expected)]
    _assert_results_close(actual, expected, np.float64)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_both_raise_and_nothing_is_written(name):
    spec = FUNCTIONS[name]
    args = spec.inputs(spec.shapes[1], np.float32)
    bad_calls = spec.bad(args)
    assert bad_calls, "every function has bad calls to check"
    expected_shape = spec.call(spec.copy_args(args))[0].shape
    for what, bad, twin_raises in bad_calls:
        ours = spec.copy_args(bad)
        before = {k: ours[k].copy() for k in spec.written if ours.get(k) is not None}
        out = np.full(expected_shape, 7.0, np.float32) if spec.has_out else None
        with pytest.raises((ValueError, TypeError)):
            spec.call(ours, out=out)
        if twin_raises:
            with pytest.raises((ValueError, TypeError)):
                spec.call_twin(spec.copy_args(bad))
        for k, value in before.items():
            assert ours[k].tobytes() == value.tobytes(), f"{what}: {k} was written"
        if out is not None:
            assert (out == 7.0).all(), f"{what}: out was written"


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_thread_count_changes_no_bit(name):
    spec = FUNCTIONS[name]
    for shape in spec.shapes:
        for dtype in DTYPES:
            args = spec.inputs(shape, dtype)
            results = []
            for n in (1, 2, 3):
                call_args = spec.copy_args(args)
                with num_threads(n):
                    results.append(list(spec.call(call_args))
                                   + [call_args[k] for k in spec.written])
            assert_all_bitwise_equal(results[1], results[0])
            assert_all_bitwise_equal(results[2], results[0])


def _all_results():
    """Every registry function on its third shape, float32 and float64: SHA-256 per result."""
    found = {}
    for name, spec in FUNCTIONS.items():
        for dtype in DTYPES:
            args = spec.copy_args(spec.inputs(spec.shapes[2], dtype))
            results = list(spec.call(args)) + [args[k] for k in spec.written]
            found[f"{name} {np.dtype(dtype).name}"] = [
                None if r is None else hashlib.sha256(np.ascontiguousarray(r).tobytes()).hexdigest()
                for r in results]
    return found


@pytest.mark.parametrize("isa", _capi.cpu_isas())
def test_every_isa_build_gives_the_same_bits(isa):
    if isa == bncpu.isa():
        pytest.skip("the build in use is the reference of this comparison")
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_contract; "
              "print(json.dumps(test_contract._all_results()))")
    result = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)],
                            env={**os.environ, "BNCPU_ISA": isa}, capture_output=True, text=True,
                            timeout=600, cwd=CHILD_CWD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == _all_results()


def test_header_and_stub_follow_the_manifest():
    with open(os.path.join(bncpu.get_include(), "bncpu.h")) as f:
        assert manifest.check_header(f.read()) == []
    # The repository's manifest, which checks the repository's header and stub (an
    # installed package has no include/ beside it).
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "bncpu", "_kernels", "manifest.py")
    result = subprocess.run([sys.executable, script, "--check"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_manifest_check_finds_a_drifted_member():
    with open(os.path.join(bncpu.get_include(), "bncpu.h")) as f:
        text = f.read()
    drifted = text.replace("double *mean_out, double *invstd_out, int unbiased);",
                           "double *mean_out, double *invstd_out);", 1)
    assert drifted != text
    problems = manifest.check_header(drifted)
    assert len(problems) == 1 and "int unbiased" in problems[0]


def test_table_only_grows():
    """A member added in a later minor version comes after every earlier member, so a
    program compiled against an earlier header sees the same prefix of the table."""
    entry = manifest.ENTRIES[0]._replace(name="later_entry", since=manifest.API_VERSION_MINOR + 1)
    dtype = manifest.DTYPES[0]._replace(suffix="_later", since=manifest.API_VERSION_MINOR + 2)
    original = manifest.members()
    try:
        manifest.ENTRIES += (entry,)
        manifest.DTYPES += (dtype,)
        grown = manifest.members()
    finally:
        manifest.ENTRIES = manifest.ENTRIES[:-1]
        manifest.DTYPES = manifest.DTYPES[:-1]
    assert grown[:len(original)] == original
    assert [m.name for m in grown[len(original):]] == (
        [f"later_entry{d.suffix}" for d in manifest.DTYPES]
        + [f"{e.name}_later" for e in manifest.ENTRIES + (entry,)])


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _header_struct_members():
    """The function-pointer members of bncpu_api in the shipped header, in order."""
    with open(os.path.join(bncpu.get_include(), "bncpu.h")) as f:
        text = f.read()
    struct = text[text.index("typedef struct bncpu_api {"):text.index("} bncpu_api;")]
    return re.findall(r"\(\*(\w+)\)\s*\(", re.sub(r"/\*.*?\*/", "", struct, flags=re.S))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the table with dladdr")
def test_table_is_complete():
    """The live table, read through the capsule C callers use with the header's layout:
    the version members are the header's, and every kernel member points into the
    loaded kernel module of its family, in the instruction-set build in use."""
    functions = _header_struct_members()
    fields = [("api_version_major", ctypes.c_int), ("api_version_minor", ctypes.c_int),
              ("version", ctypes.c_char_p), ("isa", ctypes.c_char_p)]
    table_type = type("Table", (ctypes.Structure,),
                      {"_fields_": fields + [(name, ctypes.c_void_p) for name in functions]})
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                 ctypes.c_char_p]
    table = table_type.from_address(get_pointer(_capi._C_API, b"bncpu._capi._C_API"))
    assert (table.api_version_major, table.api_version_minor) == (
        manifest.API_VERSION_MAJOR, manifest.API_VERSION_MINOR)
    assert table.version.decode() == bncpu.__version__
    assert table.isa.decode() == bncpu.isa()

    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    kernels = functions[3:]   # after strerror, get_num_threads, set_num_threads
    family_of = {m.name: m.entry.family for m in manifest.members()}
    assert kernels == list(family_of)
    suffix = manifest.ISA_LEVELS[bncpu.isa()][0]
    for name in kernels:
        address, info = getattr(table, name), _DlInfo()
        assert address, f"{name} is NULL"
        assert dladdr(address, ctypes.byref(info)), f"{name} points into no loaded module"
        module = os.path.basename(info.dli_fname.decode()).split(".")[0]
        assert module == family_of[name] + suffix, f"{name} points into {module}"


def test_wrappers_refuse_data_without_a_kernel():
    """The dtype wrappers of bncpu._ops pick the member by the data's dtype: data of a dtype
    the table has no member for is a TypeError, and nothing is written (it used to run
    the float64 kernel over the integers' bytes)."""
    from bncpu import _ops
    x = np.arange(8, dtype=np.int64)
    mean, m2 = np.full(2, 7.0), np.full(2, 7.0)
    with pytest.raises(TypeError, match="batch_norm_stats: no kernel"):
        _ops.batch_norm.stats(x, 2, 2, 2, mean, m2)
    y = np.full(8, 7, np.int32)
    with pytest.raises(TypeError, match="group_norm_forward: no kernel"):
        _ops.row_norm.forward(y.copy(), y, 2, 4, 1, 1, None, None, 1e-5, True, None, None)
    assert (mean == 7.0).all() and (m2 == 7.0).all() and (y == 7).all()
