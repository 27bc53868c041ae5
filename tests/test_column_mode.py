"""Column mode (short rows, channels-last data): the one-pass float32 statistics and the
streamed elementwise passes.

float32 tiles first try one pass around the mean of their first rows and fall back to
two passes when that center is not within a standard deviation of the tile's mean;
these tests give tiles whose first rows are not typical (rows sorted along the batch
axis, a step, an outlier head) and check the statistics against float64. The passes
over whole rows write with streaming stores when the output is aligned and large:
the results must be the same bits whatever the output's alignment, in place or not,
and at any thread count.
"""
import numpy as np
import pytest

import bncpu
from conftest import assert_bitwise_equal, num_threads

EPS = 1e-5
# Column mode: (N, C), (N, C, 3, 3), NHWC (the (N·H·W, C) matrix), several tiles each.
SHAPES = [((4096, 16), 1), ((2000, 8, 3, 3), 1), ((64, 14, 14, 32), -1)]


def float64_stats(x, axis):
    truth = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    return truth.mean(axis=0), truth.var(axis=0)


def ordered(x, axis, order):
    """x with its rows along the batch axis made untypical of their tiles."""
    rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    if order == "sorted":
        rows = np.sort(rows, axis=0)
    elif order == "steps":
        rows = rows.copy()
        rows[rows.shape[0] // 3:] += 1000
    else:   # "head": the first rows of every tile far from the rest
        rows = rows.copy()
        rows[np.arange(rows.shape[0]) % 512 < 8] += 300
    last = rows.reshape(np.moveaxis(x, axis, -1).shape)
    return np.ascontiguousarray(np.moveaxis(last, -1, axis))


@pytest.mark.parametrize("order", ["random", "sorted", "steps", "head"])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_float32_column_statistics_of_hard_data_are_accurate(shape, axis, order):
    x = (np.random.default_rng(3).normal(size=shape) + 1e4).astype(np.float32)
    if order != "random":
        x = ordered(x, axis, order)
    mean, var = float64_stats(x, axis)
    ours_mean, m2, count = bncpu.batch_norm_stats(x, axis=axis)
    assert np.max(np.abs(ours_mean - mean) / np.abs(mean)) < 2.0**-23
    assert np.max(np.abs(m2 / count - var) / var) < 2.0**-20
    _, saved_mean, invstd = bncpu.batch_norm_forward(x, None, None, None, None, True, 0.1, EPS,
                                                     axis=axis)
    assert np.max(np.abs(saved_mean - mean) / np.abs(mean)) < 2.0**-23
    truth = 1 / np.sqrt(var + EPS)
    assert np.max(np.abs(invstd - truth) / truth) < 2.0**-23


def test_a_non_finite_value_spoils_only_its_channel():
    x = np.random.default_rng(4).normal(size=(3000, 24)).astype(np.float32)
    x[1500, 5] = np.nan   # (an infinity's statistics are the `arch` work's: not tested here)
    mean, m2, _ = bncpu.batch_norm_stats(x)
    assert np.isnan(mean[5]) and np.isnan(m2[5])
    finite = np.setdiff1d(np.arange(24), [5])
    truth_mean, truth_var = float64_stats(x[:, finite], 1)
    np.testing.assert_allclose(mean[finite], truth_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(m2[finite] / 3000, truth_var, rtol=1e-5)


def outputs(n_elements, dtype, misalign):
    """An output buffer of n_elements, its address `misalign` elements past a 64-byte
    boundary."""
    item = np.dtype(dtype).itemsize
    buffer = np.empty(n_elements + 64 // item + misalign, dtype)
    start = (-(buffer.ctypes.data % 64) // item) % (64 // item) + misalign
    return buffer[start:start + n_elements]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [64, 24, 3])
def test_streamed_column_passes_give_the_same_bits(c, dtype):
    # Outputs over 8 MB: streamed when the rows and the output allow, else not.
    n = (9 << 20) // (c * np.dtype(dtype).itemsize) + 5
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, c)).astype(dtype)
    dy = rng.normal(size=(n, c)).astype(dtype)
    weight, bias = rng.uniform(0.5, 1.5, c).astype(dtype), rng.normal(size=c).astype(dtype)
    mean, invstd = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    sum_dy, sum_dy_xmu = rng.normal(size=c), rng.normal(size=c)

    def run(out, threads):
        with num_threads(threads):
            y = bncpu.batch_norm_elemt(x, weight, bias, mean, invstd, out=out[0])
            dx = bncpu.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy,
                                                 sum_dy_xmu, n, out=out[1])
            return y.copy(), dx.copy()

    def fresh(misalign):
        return [outputs(n * c, dtype, misalign).reshape(n, c) for _ in range(2)]

    expected = run(fresh(0), 1)
    for misalign, threads in [(1, 1), (0, 2), (1, 2), (0, 3)]:
        for got, want in zip(run(fresh(misalign), threads), expected):
            assert_bitwise_equal(got, want)
    # In place (no streaming: the output is an input).
    y_in = x.copy()
    bncpu.batch_norm_elemt(y_in, weight, bias, mean, invstd, out=y_in)
    assert_bitwise_equal(y_in, expected[0])
    dx_in = dy.copy()
    bncpu.batch_norm_backward_elemt(dx_in, x, mean, invstd, weight, sum_dy, sum_dy_xmu, n,
                                    out=dx_in)
    assert_bitwise_equal(dx_in, expected[1])


def test_channels_last_training_is_the_same_bits_at_any_thread_count():
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(8, 28, 28, 64)) + 50).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    weight, bias = rng.uniform(0.5, 1.5, 64).astype(np.float32), rng.normal(size=64).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            y, mean, invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1,
                                                       EPS, axis=-1)
            grads = bncpu.batch_norm_backward(dy, x, weight, None, None, mean, invstd, True,
                                              EPS, axis=-1)
        results.append((y, mean, invstd) + tuple(grads))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert_bitwise_equal(got, want)
