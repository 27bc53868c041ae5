"""Half-precision data (float16, bfloat16) with float32 arithmetic.

The kernels' oracle: a half kernel computes what the float32 kernel computes on the
widened data, so its statistics (and every float32 result) equal the float32 kernel's bit
for bit, and its half output is the float32 output rounded once to the data's format, at
any number of threads and in every instruction-set build.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import bncpu
from bncpu import _ops
from conftest import num_threads

ml_dtypes = pytest.importorskip("ml_dtypes")

HALF_DTYPES = pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16],
                                      ids=["float16", "bfloat16"])

# (n, c, s) reaching every way the float32 kernels cut the work: column mode (s <= 224,
# one value per row included), short rows summed in blocks of whole rows, long rows
# folded piece by piece (split mode's shapes: few channels, rows of several pieces),
# tails of every vector width.
SHAPES = [(67, 13, 15), (301, 131, 1), (5, 7, 300), (4, 3, 4096), (4, 1, 90000),
          (9, 2, 2048), (3, 5, 2), (2, 3, 17), (1, 2, 7)]


def bits(array):
    return np.ascontiguousarray(array).view(np.uint8)


def assert_same_bits(actual, expected, what):
    np.testing.assert_array_equal(bits(actual), bits(expected), err_msg=what)


def data(shape, dtype, seed=0, spread=2.0, center=5.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * spread + center).astype(dtype)


def params(c, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)


def forward_train(x, residual, relu, weight, bias):
    """The training forward's results through the C table: y, save_mean, save_invstd and
    the updated running statistics."""
    n, c, s = x.shape
    y = np.empty_like(x)
    save_mean, save_invstd = np.empty(c, np.float32), np.empty(c, np.float32)
    running_mean, running_var = np.full(c, 0.5, np.float32), np.full(c, 2.0, np.float32)
    if relu:
        status = _ops.bn_relu_forward_train(x, residual, y, n, c, s, weight, bias, running_mean,
                                            running_var, 0.1, 1e-5, save_mean, save_invstd)
    else:
        status = _ops.bn_forward_train(x, y, n, c, s, weight, bias, running_mean, running_var,
                                       0.1, 1e-5, save_mean, save_invstd)
    assert status == 0
    return y, save_mean, save_invstd, running_mean, running_var


def forward_eval(x, residual, relu, weight, bias):
    n, c, s = x.shape
    y = np.empty_like(x)
    running_mean = np.linspace(-1, 6, c).astype(np.float32)
    running_var = np.linspace(0.5, 3, c).astype(np.float32)
    if relu:
        status = _ops.bn_relu_forward_eval(x, residual, y, n, c, s, weight, bias, running_mean,
                                           running_var, 1e-5)
    else:
        status = _ops.bn_forward_eval(x, y, n, c, s, weight, bias, running_mean, running_var,
                                      1e-5)
    assert status == 0
    return (y,)


def backward(x, dy, training, weight, bias):
    """dx, dweight, dbias through the C table, with the statistics of x (float32, as
    the forward saves them) or running statistics."""
    n, c, s = x.shape
    x32 = x.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):   # inf and NaN data
        save_mean = x32.mean(axis=(0, 2)).astype(np.float32)
        save_invstd = (1 / np.sqrt(x32.var(axis=(0, 2)) + 1e-5)).astype(np.float32)
    running_mean = np.linspace(-1, 6, c).astype(np.float32)
    running_var = np.linspace(0.5, 3, c).astype(np.float32)
    dx = np.empty_like(x)
    dweight, dbias = np.empty(c, np.float32), np.empty(c, np.float32)
    status = _ops.bn_backward(dy, x, dx, n, c, s, weight, running_mean, running_var, save_mean,
                              save_invstd, training, 1e-5, dweight, dbias)
    assert status == 0
    return dx, dweight, dbias


def check_against_float32(function, x, residual, relu, weight, bias):
    """function's half results equal the float32 kernel's on the widened data: the half
    output rounded once, every float32 result bit for bit."""
    half = function(x, residual, relu, weight, bias)
    wide = function(x.astype(np.float32), None if residual is None
                    else residual.astype(np.float32), relu, weight, bias)
    with np.errstate(over="ignore"):   # outputs past the format's range round to ±inf
        rounded = wide[0].astype(x.dtype)
    assert_same_bits(half[0], rounded, "output")
    for index, (got, want) in enumerate(zip(half[1:], wide[1:])):
        assert_same_bits(got, want, f"float32 result {index}")


@HALF_DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("function", [forward_train, forward_eval])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_compute_the_float32_kernels_results(dtype, shape, function, relu, threads):
    x = data(shape, dtype)
    residual = data(shape, dtype, seed=3, center=0.0) if relu else None
    weight, bias = params(shape[1])
    with num_threads(threads):
        check_against_float32(function, x, residual, relu, weight, bias)


@HALF_DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("threads", [1, 2])
def test_backward_computes_the_float32_kernels_results(dtype, shape, training, threads):
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=4, spread=1.0, center=0.5)
    weight, _ = params(shape[1])
    with num_threads(threads):
        check_against_float32(backward, x, dy, training, weight, None)


@HALF_DTYPES
@pytest.mark.parametrize("function", [forward_train, forward_eval])
def test_kernels_without_weight_and_bias(dtype, function):
    x = data((6, 4, 37), dtype)
    check_against_float32(function, x, None, False, None, None)


@HALF_DTYPES
@pytest.mark.parametrize("shape", [(5, 3, 40), (200, 8, 1), (3, 2, 3000)], ids=str)
def test_special_values(dtype, shape):
    """NaN, ±inf, subnormals of the format and values whose normalized output overflows
    it: still the float32 kernel's results."""
    x = data(shape, np.float32, spread=1.0, center=0.0)
    info = np.finfo(dtype) if dtype is np.float16 else ml_dtypes.finfo(dtype)
    flat = x.reshape(-1)
    flat[::7] = float(info.smallest_subnormal) * 3
    flat[1::11] = -float(info.smallest_subnormal)
    x = x.astype(dtype)
    weight = np.full(shape[1], float(info.max) / 4, np.float32)   # outputs past the max
    bias = np.zeros(shape[1], np.float32)
    for function in (forward_train, forward_eval):
        check_against_float32(function, x, None, False, weight, bias)
    dy = data(shape, dtype, seed=4, spread=float(info.max) / 8, center=0.0)
    for training in (True, False):
        check_against_float32(backward, x, dy, training, weight, None)
    special = x.copy()
    special.reshape(-1)[[0, 5, 9]] = np.array([np.nan, np.inf, -np.inf], dtype)
    for function in (forward_train, forward_eval):
        check_against_float32(function, special, None, True, *params(shape[1]))
    for training in (True, False):
        check_against_float32(backward, special, dy, training, weight, None)


@HALF_DTYPES
@pytest.mark.parametrize("outputs", ["dx", "dweight", "dbias"])
def test_backward_computes_what_is_asked(dtype, outputs):
    """dx, dweight and dbias may each be absent (evaluation without parameter gradients:
    no sums at all); the others are unchanged."""
    x = data((6, 5, 40), dtype)
    dy = data((6, 5, 40), dtype, seed=4)
    weight, _ = params(5)
    n, c, s = x.shape
    mean, invstd = np.zeros(c, np.float32), np.ones(c, np.float32)
    for training in (True, False):
        full = backward(x, dy, training, weight, None)
        dx = np.empty_like(x) if outputs == "dx" else None
        dweight = np.empty(c, np.float32) if outputs == "dweight" else None
        dbias = np.empty(c, np.float32) if outputs == "dbias" else None
        x32 = x.astype(np.float32)
        mean[:] = x32.mean(axis=(0, 2))
        invstd[:] = 1 / np.sqrt(x32.var(axis=(0, 2)) + 1e-5)
        running_mean = np.linspace(-1, 6, c).astype(np.float32)
        running_var = np.linspace(0.5, 3, c).astype(np.float32)
        assert _ops.bn_backward(dy, x, dx, n, c, s, weight, running_mean, running_var, mean,
                                invstd, training, 1e-5, dweight, dbias) == 0
        got = {"dx": dx, "dweight": dweight, "dbias": dbias}[outputs]
        assert_same_bits(got, full[["dx", "dweight", "dbias"].index(outputs)], outputs)


@HALF_DTYPES
def test_kernels_in_place(dtype):
    """y may be x: the same bits as into a separate output."""
    x = data((4, 3, 50), dtype)
    weight, bias = params(3)
    expected = forward_train(x.copy(), None, False, weight, bias)[0]
    n, c, s = x.shape
    status = _ops.bn_forward_train(x, x, n, c, s, weight, bias, None, None, 0.1, 1e-5, None,
                                   None)
    assert status == 0
    assert_same_bits(x, expected, "in place")


@HALF_DTYPES
def test_kernels_refuse_what_the_float32_kernels_refuse(dtype):
    x = data((1, 3, 1), dtype)
    y = np.empty_like(x)
    weight, bias = params(3)
    one_value = _ops.bn_forward_train(x, y, 1, 3, 1, weight, bias, None, None, 0.1, 1e-5, None,
                                      None)
    assert one_value == _ops.bn_forward_train(x.astype(np.float32), y.astype(np.float32), 1, 3,
                                              1, weight, bias, None, None, 0.1, 1e-5, None, None)
    assert one_value != 0
    bad_eps = _ops.bn_forward_eval(x, y, 1, 3, 1, weight, bias, weight, bias, -1.0)
    assert bad_eps != 0
    assert bad_eps == _ops.bn_forward_eval(x.astype(np.float32), y.astype(np.float32), 1, 3, 1,
                                           weight, bias, weight, bias, -1.0)
    overlapping = _ops.bn_forward_eval(x, y, 1, 3, 1, weight, bias, weight, weight, 1e-5)
    assert overlapping == 0   # inputs may share memory; the output may not
    stats = np.zeros(3, np.float32)
    aliased = _ops.bn_forward_train(x, y, 1, 3, 1, weight, bias, stats, stats, 0.1, 1e-5, None,
                                    None)
    assert aliased != 0


ISA_SCRIPT = r"""
import sys
import ml_dtypes
import numpy as np
import bncpu
from bncpu import _ops

results = {"isa": np.array(bncpu.isa())}
for dtype in (np.float16, ml_dtypes.bfloat16):
    for shape in [(67, 13, 15), (301, 131, 1), (5, 7, 300), (4, 3, 4096), (3, 5, 2)]:
        n, c, s = shape
        rng = np.random.default_rng(7)
        x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
        r = rng.standard_normal(shape).astype(dtype)
        w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
        y, y_eval = np.empty_like(x), np.empty_like(x)
        mean, invstd = np.empty(c, np.float32), np.empty(c, np.float32)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        assert _ops.bn_relu_forward_train(x, r, y, n, c, s, w, b, rm, rv, 0.1, 1e-5, mean,
                                          invstd) == 0
        assert _ops.bn_forward_eval(x, y_eval, n, c, s, w, b, rm, rv, 1e-5) == 0
        arrays = [y, y_eval, mean, invstd, rm, rv]
        for training in (True, False):
            dx = np.empty_like(x)
            dw, db = np.empty(c, np.float32), np.empty(c, np.float32)
            assert _ops.bn_backward(r, x, dx, n, c, s, w, rm, rv, mean, invstd, training, 1e-5,
                                    dw, db) == 0
            arrays += [dx, dw, db]
        results[f"{np.dtype(dtype).name}{shape}"] = np.concatenate(
            [a.reshape(-1).view(np.uint8) for a in arrays])
np.savez(sys.argv[1], **results)
"""


def test_every_instruction_set_build_gives_the_same_bits(tmp_path):
    isas = bncpu._capi.cpu_isas()
    if len(isas) < 2:
        pytest.skip(f"this CPU runs only the {isas[0]} build")
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bncpu.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    runs = {}
    for isa in isas:
        path = tmp_path / f"{isa}.npz"
        result = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(path)], cwd=tmp_path,
                                env={**env, "BNCPU_ISA": isa}, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        runs[isa] = np.load(path)
        assert str(runs[isa]["isa"]) == isa
    first = runs[isas[0]]
    for isa in isas[1:]:
        for key in first.files:
            if key != "isa":
                np.testing.assert_array_equal(runs[isa][key], first[key],
                                              err_msg=f"{key}: {isa} vs {isas[0]}")
