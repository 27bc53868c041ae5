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
from bncpu import reference
from bncpu import _ops
from conftest import num_threads, runs_under_every_isa

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


def split_phase(x, dy, _, weight, bias):
    """The split-phase entries in a row, as one process of synchronized batch norm runs
    them: stats, elemt, backward_reduce, backward_elemt (global statistics: its own)."""
    n, c, s = x.shape
    mean, m2 = np.empty(c), np.empty(c)
    assert _ops.bn_stats(x, n, c, s, mean, m2) == 0
    invstd = 1 / np.sqrt(m2 / (n * s) + 1e-5)
    y, dx = np.empty_like(x), np.empty_like(x)
    assert _ops.bn_elemt(x, y, n, c, s, mean, invstd, weight, bias) == 0
    sum_dy, sum_dy_xmu = np.empty(c), np.empty(c)
    assert _ops.bn_backward_reduce(dy, x, n, c, s, mean, sum_dy, sum_dy_xmu) == 0
    assert _ops.bn_backward_elemt(dy, x, dx, n, c, s, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                  n * s) == 0
    return y, dx.astype(np.float32), mean, m2, sum_dy, sum_dy_xmu


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
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_split_phase_computes_the_float32_kernels_results(dtype, shape, threads):
    """dx is compared widened: it is the float32 kernel's dx rounded once, as y is."""
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=4, spread=1.0, center=0.5)
    weight, bias = params(shape[1])
    with num_threads(threads):
        half = split_phase(x, dy, None, weight, bias)
        wide = split_phase(x.astype(np.float32), dy.astype(np.float32), None, weight, bias)
    assert_same_bits(half[0], wide[0].astype(dtype), "output")
    assert_same_bits(half[1], wide[1].astype(dtype).astype(np.float32), "grad_input")
    for index, (got, want) in enumerate(zip(half[2:], wide[2:])):
        assert_same_bits(got, want, f"float64 result {index}")


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
from bncpu import reference
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
        m, m2 = np.empty(c), np.empty(c)
        assert _ops.bn_stats(x, n, c, s, m, m2) == 0
        sum_dy, sum_dy_xmu = np.empty(c), np.empty(c)
        assert _ops.bn_backward_reduce(r, x, n, c, s, m, sum_dy, sum_dy_xmu) == 0
        arrays += [m, m2, sum_dy, sum_dy_xmu]
        results[f"{np.dtype(dtype).name}{shape}"] = np.concatenate(
            [a.reshape(-1).view(np.uint8) for a in arrays])
np.savez(sys.argv[1], **results)
"""


def test_every_instruction_set_build_gives_the_same_bits(tmp_path):
    runs = runs_under_every_isa(ISA_SCRIPT, tmp_path)
    isas = list(runs)
    first = runs[isas[0]]
    for isa in isas[1:]:
        for key in first.files:
            if key != "isa":
                np.testing.assert_array_equal(runs[isa][key], first[key],
                                              err_msg=f"{key}: {isa} vs {isas[0]}")


# ----------------------------------------------------------------------------------
# The NumPy API
# ----------------------------------------------------------------------------------
@HALF_DTYPES
@pytest.mark.parametrize("axis", [1, -1])
def test_the_api_keeps_the_dtype_and_rounds_once(dtype, axis):
    """Output and grad_input in the input's dtype, the float32 computation's results rounded
    once; statistics and parameter gradients float32."""
    shape = (6, 5, 7, 3) if axis == 1 else (6, 7, 3, 5)
    x = data(shape, dtype)
    dy = data(shape, dtype, seed=4, center=0.0)
    weight, bias = params(5)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    for training in (True, False):
        rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
        rm32, rv32 = rm.copy(), rv.copy()
        y, mean, invstd = bncpu.batch_norm_forward(x, weight, bias, rm, rv, training, 0.1, 1e-5,
                                                   axis=axis)
        y32, mean32, invstd32 = bncpu.batch_norm_forward(x32, weight, bias, rm32, rv32, training,
                                                         0.1, 1e-5, axis=axis)
        assert y.dtype == dtype and mean.dtype == invstd.dtype == np.float32
        assert_same_bits(y, y32.astype(dtype), "output")
        for got, want in [(mean, mean32), (invstd, invstd32), (rm, rm32), (rv, rv32)]:
            assert_same_bits(got, want, "statistics")
        saved = (mean, invstd) if training else (None, None)
        saved32 = (mean32, invstd32) if training else (None, None)
        grads = bncpu.batch_norm_backward(dy, x, weight, rm, rv, *saved, training, 1e-5,
                                          axis=axis)
        grads32 = bncpu.batch_norm_backward(dy32, x32, weight, rm32, rv32, *saved32, training,
                                            1e-5, axis=axis)
        assert grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == np.float32
        assert_same_bits(grads[0], grads32[0].astype(dtype), "grad_input")
        assert_same_bits(grads[1], grads32[1], "grad_weight")
        assert_same_bits(grads[2], grads32[2], "grad_bias")


@HALF_DTYPES
def test_parameters_may_have_the_inputs_dtype(dtype):
    """weight and bias, and the running statistics in evaluation, as the input's dtype:
    the same as their float32 values."""
    x = data((4, 3, 9), dtype)
    weight, bias = params(3)
    weight, bias = weight.astype(dtype), bias.astype(dtype)
    rm, rv = np.array([1, 2, 3], dtype), np.array([0.5, 1, 2], dtype)
    as32 = [a.astype(np.float32) for a in (weight, bias, rm, rv)]
    assert_same_bits(bncpu.batch_norm(x, rm, rv, weight, bias),
                     bncpu.batch_norm(x, as32[2], as32[3], as32[0], as32[1]), "evaluation")
    running = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    assert_same_bits(bncpu.batch_norm(x, *running, weight, bias, training=True),
                     bncpu.batch_norm(x, None, None, as32[0], as32[1], training=True),
                     "training")


@HALF_DTYPES
def test_running_statistics_updated_in_place_must_be_float32(dtype):
    x = data((4, 3, 9), dtype)
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    with pytest.raises(TypeError, match="running_mean has dtype .* computed as float32"):
        bncpu.batch_norm(x, rm, rv, training=True)
    assert not rm.any() and (rv == 1).all()


@HALF_DTYPES
def test_out_receives_the_half_result(dtype):
    x = data((4, 3, 9), dtype)
    expected = bncpu.batch_norm(x, None, None, training=True)
    out = np.empty((4, 3, 9), np.float32)
    assert bncpu.batch_norm(x, None, None, training=True, out=out) is out
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    assert bncpu.batch_norm(x, None, None, training=True, out=x) is x
    assert_same_bits(x, expected, "in place")


def test_bncpu_imports_without_ml_dtypes_and_takes_bfloat16_once_imported():
    script = ("import sys, numpy as np, bncpu\n"
              "assert 'ml_dtypes' not in sys.modules\n"
              "x = np.arange(24, dtype=np.float16).reshape(2, 3, 4)\n"
              "assert bncpu.batch_norm(x, None, None, training=True).dtype == np.float16\n"
              "import ml_dtypes\n"
              "y = bncpu.batch_norm(x.astype(ml_dtypes.bfloat16), None, None, training=True)\n"
              "assert y.dtype == ml_dtypes.bfloat16\n")
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bncpu.__file__)))
    from conftest import CHILD_CWD   # not the repository root: its source tree is unbuilt
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": package_parent}, timeout=120,
                            cwd=CHILD_CWD)
    assert result.returncode == 0, result.stderr


def test_other_functions_compute_bfloat16_as_float32():
    """Where no half-precision kernel exists, bfloat16 is computed and returned as float32,
    as float16 is."""
    x = data((4, 6, 5), ml_dtypes.bfloat16)
    expected = bncpu.group_norm(x.astype(np.float32), 2)
    assert_same_bits(bncpu.group_norm(x, 2), expected, "group norm")


# ----------------------------------------------------------------------------------
# Accuracy against the float64 truth (bncpu.reference)
# ----------------------------------------------------------------------------------
def ordered(array):
    """The half values' bits as integers ordered as the values (so two values are k ulps
    apart when these differ by k; ±0 are one value)."""
    bits_ = np.ascontiguousarray(array).view(np.uint16).astype(np.int32)
    return np.where(bits_ & 0x8000, -(bits_ & 0x7FFF), bits_)


def ulp(value, dtype):
    """The spacing of the dtype's values at |value| (float64)."""
    rounded = abs(np.float64(value)).astype(dtype)
    above = (ordered(np.array([rounded], dtype)) + 1).astype(np.uint16).view(dtype)
    return float(np.float64(above[0].astype(np.float64)) - np.float64(rounded.astype(np.float64)))


ACCURACY_SHAPES = [(8, 3, 33), (64, 5, 1), (3, 2, 2500), (5, 4, 5000), (2, 3, 11)]


@HALF_DTYPES
@pytest.mark.parametrize("shape", ACCURACY_SHAPES, ids=str)
@pytest.mark.parametrize("center, spread", [(0.0, 1.0), (300.0, 2.0), (-1e-3, 1e-4)],
                         ids=["centered", "offset", "small"])
def test_accuracy(dtype, shape, center, spread):
    x = data(shape, dtype, center=center, spread=spread)
    dy = data(shape, dtype, seed=4, center=0.1, spread=1.0)
    weight, bias = params(shape[1])
    y, mean, invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5)
    truth, truth_mean, truth_invstd = reference.batch_norm_forward(
        x.astype(np.float64), weight, bias, None, None, True, 0.1, 1e-5)
    assert reference.batch_norm_forward(x, weight, bias, None, None, True, 0.1,
                                              1e-5)[0].dtype == dtype
    # The output: within 1 ulp of the truth rounded to the dtype.
    assert np.abs(ordered(y) - ordered(truth.astype(dtype))).max() <= 1
    # The statistics: within 4 float32 epsilons of the scale.
    eps32 = np.finfo(np.float32).eps
    scale = np.abs(truth_mean) + 1 / truth_invstd
    assert (np.abs(mean - truth_mean) <= 4 * eps32 * scale).all()
    assert (np.abs(invstd - truth_invstd) <= 4 * eps32 * truth_invstd).all()
    for training in (True, False):
        rm, rv = truth_mean.astype(np.float32), (1 / truth_invstd**2).astype(np.float32)
        saved = (mean, invstd) if training else (None, None)
        dx, dweight, dbias = bncpu.batch_norm_backward(dy, x, weight, rm, rv, *saved, training,
                                                       1e-5)
        true_dx, true_dweight, true_dbias = reference.batch_norm_backward(
            dy.astype(np.float64), x.astype(np.float64), weight, rm, rv, *saved, training, 1e-5)
        # dx: within 2 ulps of max|dx|.
        assert np.abs(dx.astype(np.float64) - true_dx).max() <= 2 * ulp(np.abs(true_dx).max(),
                                                                        dtype)
        # dweight and dbias: within 1e-5 of the size of their sums.
        xhat = (x.astype(np.float64) - (mean if training else rm)[:, None]) * \
            (invstd if training else 1 / np.sqrt(rv + 1e-5))[:, None]
        size_w = np.abs(dy.astype(np.float64) * xhat).sum(axis=(0, 2))
        size_b = np.abs(dy.astype(np.float64)).sum(axis=(0, 2))
        assert (np.abs(dweight - true_dweight) <= 1e-5 * size_w).all()
        assert (np.abs(dbias - true_dbias) <= 1e-5 * size_b).all()
