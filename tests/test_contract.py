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
import hashlib
import json
import os
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


def test_header_follows_the_manifest():
    with open(os.path.join(bncpu.get_include(), "bncpu.h")) as f:
        assert manifest.check_header(f.read()) == []


def test_manifest_check_finds_a_drifted_member():
    with open(os.path.join(bncpu.get_include(), "bncpu.h")) as f:
        text = f.read()
    drifted = text.replace("double *mean_out, double *invstd_out, int unbiased);",
                           "double *mean_out, double *invstd_out);", 1)
    assert drifted != text
    problems = manifest.check_header(drifted)
    assert len(problems) == 1 and "batch_norm_gather_stats_f32" in problems[0]


def test_table_is_complete():
    """Every member the manifest lists is filled (the header's macros test for NULL)."""
    assert [member for member, _, _ in manifest.members()] == [
        e.name + s for e in manifest.ENTRIES for s, _ in manifest.SUFFIXES]
    assert set(manifest.FAMILIES) == {e.family for e in manifest.ENTRIES}
