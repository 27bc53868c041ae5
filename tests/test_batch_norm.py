"""bncpu's batch-norm functions against bncpu.reference (the float64 NumPy twin), against
central finite differences, against a float64 ground truth on hard data, and against
PyTorch when it is importable."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import bncpu
from bncpu import reference as ref
from conftest import (central_differences, AFFINE, DTYPES, LAYOUTS, RTOL, assert_all_bitwise_equal, assert_bitwise_equal,
                      assert_close, channel_params, num_threads, random_input, running_stats,
                      to_torch)

EPS = 1e-5
MOMENTUM = 0.1

# 2-D to 5-D; one channel; one value per sample and channel (S = 1, also as trailing 1s);
# prime sizes, so that no mix-up of axes can hide; (N, C) and short rows cut into
# several column-mode tiles both ways, with partial tiles and leftover rows and channels;
# column-mode rows 4 KiB apart (float32), read two at a time.
SHAPES = [(4, 3), (7, 1), (5, 2, 1), (2, 3, 5), (3, 5, 7, 11), (2, 1, 3, 4, 5), (4, 3, 1, 1),
          (2, 3, 2, 3, 5), (301, 1031), (67, 130, 3, 5), (43, 16, 8, 8)]
# A single sample is a valid batch in evaluation, and in training when S > 1.
SINGLE_SAMPLE_SHAPES = [(1, 3), (1, 1), (1, 4, 5)]


def reduced_count(shape):
    """M = N·S, the number of values each channel is normalized over."""
    return shape[0] * math.prod(shape[2:])


def forward_cases():
    shapes = SHAPES + SINGLE_SAMPLE_SHAPES
    return ([pytest.param(shape, True, id=f"{shape}-training")
             for shape in shapes if reduced_count(shape) > 1]
            + [pytest.param(shape, False, id=f"{shape}-eval") for shape in shapes])


# ----------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------
def assert_forward_close(results, expected, x, weight, dtype):
    """(output, save_mean, save_invstd) against the reference's. The output has rounding
    errors of its dtype, relative to |y|, and in training those of the float64 batch mean,
    which x - mean magnifies by |x|·invstd when the mean dwarfs the spread."""
    scale = max(1.0, float(np.max(np.abs(expected[0]), initial=0.0)))
    if expected[2].size:
        w = 1.0 if weight is None else np.abs(np.asarray(weight, np.float64))
        magnified = np.max(np.abs(x), initial=0.0) * np.max(expected[2] * w)
        scale += float(magnified) * RTOL[np.dtype(np.float64)] / RTOL[np.dtype(dtype)]
    for result in results:
        assert result.dtype == dtype
    assert_close(results[0], expected[0], dtype, scale=scale)
    assert_close(results[1], expected[1], dtype)
    assert_close(results[2], expected[2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape, training", forward_cases())
def test_forward_matches_reference(shape, training, affine, dtype):
    x = random_input(shape, dtype)
    weight, bias = channel_params(shape[1], dtype, affine)
    running_mean, running_var = running_stats(shape[1], dtype)
    ref_running_mean, ref_running_var = (s.astype(np.float64) for s in (running_mean, running_var))

    output, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training, MOMENTUM, EPS)
    expected = ref.batch_norm_forward(x, weight, bias, ref_running_mean, ref_running_var,
                                      training, MOMENTUM, EPS)

    assert_forward_close((output, save_mean, save_invstd), expected, x, weight, dtype)
    assert save_mean.shape == ((shape[1],) if training else (0,))
    assert_close(running_mean, ref_running_mean, dtype)
    assert_close(running_var, ref_running_var, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_is_the_output_of_batch_norm_forward(dtype, training):
    x = random_input((6, 3, 5), dtype)
    weight, bias = channel_params(3, dtype)
    stats_a = running_stats(3, dtype)
    stats_b = tuple(s.copy() for s in stats_a)

    output = bncpu.batch_norm(x, *stats_a, weight, bias, training, MOMENTUM, EPS)
    expected = bncpu.batch_norm_forward(x, weight, bias, *stats_b, training, MOMENTUM, EPS)[0]
    assert_bitwise_equal(output, expected)
    assert_all_bitwise_equal(stats_a, stats_b)


def test_batch_norm_defaults_are_evaluation_with_torchs_momentum_and_eps():
    x = random_input((6, 3, 5))
    running_mean, running_var = running_stats(3)
    expected = ref.batch_norm(x, running_mean.copy(), running_var.copy(), None, None, False, 0.1,
                              1e-5)
    assert_close(bncpu.batch_norm(x, running_mean, running_var), expected, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_without_running_stats_normalizes_each_channel(dtype):
    x = random_input((16, 3, 9), dtype, loc=40.0, scale=5.0)
    output = bncpu.batch_norm(x, None, None, training=True, eps=0.0)
    assert output.dtype == dtype
    assert_close(output.mean(axis=(0, 2), dtype=np.float64), np.zeros(3), dtype)
    assert_close(output.var(axis=(0, 2), dtype=np.float64), np.ones(3), dtype)
    assert_close(output, ref.batch_norm(x, None, None, training=True, eps=0.0), dtype)


@pytest.mark.parametrize("input_dtype",
                         [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.uint64])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_integer_and_bool_input_give_float64(input_dtype, training):
    x = np.random.default_rng(0).integers(0, 2 if input_dtype is np.bool_ else 100,
                                          size=(8, 3, 4)).astype(input_dtype)
    stats = running_stats(3)
    expected = bncpu.batch_norm(x.astype(np.float64), *(s.copy() for s in stats), training=training)
    output = bncpu.batch_norm(x, *stats, training=training)
    assert_bitwise_equal(output, expected)


def test_array_likes_are_accepted():
    x = random_input((4, 3)).tolist()
    assert_bitwise_equal(bncpu.batch_norm(x, None, None, [1.0, 2.0, 3.0], (0.0, 0.5, 1.0), True),
                         bncpu.batch_norm(np.array(x), None, None, np.array([1.0, 2.0, 3.0]),
                                          np.array([0.0, 0.5, 1.0]), True))


def test_float16_is_the_float32_result_rounded_once():
    x = random_input((6, 3, 5), np.float16)
    output = bncpu.batch_norm(x, None, None, training=True)
    assert output.dtype == np.float16
    expected = bncpu.batch_norm(x.astype(np.float32), None, None, training=True)
    assert_bitwise_equal(output, expected.astype(np.float16))


# ----------------------------------------------------------------------------------
# out=
# ----------------------------------------------------------------------------------
class Case:
    """Inputs of every function, float64 or float32, with the training statistics."""

    def __init__(self, dtype, shape=(5, 3, 7)):
        c = shape[1]
        self.x = random_input(shape, dtype)
        self.dy = random_input(shape, dtype, seed=3, loc=0.0, scale=1.0)
        self.weight, self.bias = channel_params(c, dtype)
        self.running_mean, self.running_var = running_stats(c, dtype)
        self.mean, self.m2, self.count = ref.batch_norm_stats(self.x)
        self.invstd = 1.0 / np.sqrt(self.m2 / self.count + EPS)
        self.sum_dy, self.sum_dy_xmu = ref.batch_norm_backward_reduce(self.dy, self.x, self.mean,
                                                                      self.invstd)[:2]


# Every function whose main result has the input's shape, called with out=.
OUT_CALLS = {
    "batch_norm-training": lambda k, out: bncpu.batch_norm(
        k.x, None, None, k.weight, k.bias, True, out=out),
    "batch_norm-eval": lambda k, out: bncpu.batch_norm(
        k.x, k.running_mean, k.running_var, k.weight, k.bias, False, out=out),
    "batch_norm_forward": lambda k, out: bncpu.batch_norm_forward(
        k.x, k.weight, k.bias, None, None, True, MOMENTUM, EPS, out=out)[0],
    "batch_norm_backward-training": lambda k, out: bncpu.batch_norm_backward(
        k.dy, k.x, k.weight, None, None, k.mean.astype(k.x.dtype), k.invstd.astype(k.x.dtype),
        True, EPS, out=out)[0],
    "batch_norm_backward-eval": lambda k, out: bncpu.batch_norm_backward(
        k.dy, k.x, k.weight, k.running_mean, k.running_var, None, None, False, EPS, out=out)[0],
    "batch_norm_elemt": lambda k, out: bncpu.batch_norm_elemt(
        k.x, k.weight, k.bias, k.mean, k.invstd, out=out),
    "batch_norm_backward_elemt": lambda k, out: bncpu.batch_norm_backward_elemt(
        k.dy, k.x, k.mean, k.invstd, k.weight, k.sum_dy, k.sum_dy_xmu, k.count, out=out),
}


def strided_out(shape, dtype):
    """A non-contiguous out (every other element of a buffer) and the buffer."""
    buffer = np.full(shape[:-1] + (2 * shape[-1],), 7.0, dtype=dtype)
    return buffer[..., ::2], buffer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("call", OUT_CALLS)
def test_out_receives_the_result_and_is_returned(call, dtype):
    case = Case(dtype)
    expected = OUT_CALLS[call](case, None)
    assert expected.dtype == dtype

    out = np.full_like(case.x, 7.0)
    assert OUT_CALLS[call](case, out) is out
    assert_bitwise_equal(out, expected)

    out = np.full(case.x.shape, 7.0, dtype=dtype, order="F")
    assert OUT_CALLS[call](case, out) is out
    assert_bitwise_equal(out, expected)

    out, buffer = strided_out(case.x.shape, dtype)
    assert OUT_CALLS[call](case, out) is out
    assert_bitwise_equal(out, expected)
    assert (buffer[..., 1::2] == 7.0).all()


@pytest.mark.parametrize("dtype, out_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                              (np.float64, np.float16)])
@pytest.mark.parametrize("call", OUT_CALLS)
def test_out_of_another_float_dtype_gets_the_cast_result(call, dtype, out_dtype):
    case = Case(dtype)
    expected = OUT_CALLS[call](case, None).astype(out_dtype)
    out = np.zeros(case.x.shape, out_dtype)
    assert OUT_CALLS[call](case, out) is out
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_in_place_normalization(dtype, training):
    x = random_input((6, 3, 5, 2), dtype)
    weight, bias = channel_params(3, dtype)
    stats = running_stats(3, dtype)
    expected_stats = tuple(s.copy() for s in stats)
    expected = bncpu.batch_norm(x, *expected_stats, weight, bias, training)
    assert bncpu.batch_norm(x, *stats, weight, bias, training, out=x) is x
    assert_bitwise_equal(x, expected)
    assert_all_bitwise_equal(stats, expected_stats)


def test_in_place_elemt():
    case = Case(np.float64)
    expected = bncpu.batch_norm_elemt(case.x, case.weight, case.bias, case.mean, case.invstd)
    assert bncpu.batch_norm_elemt(case.x, case.weight, case.bias, case.mean, case.invstd,
                                  out=case.x) is case.x
    assert_bitwise_equal(case.x, expected)


# ----------------------------------------------------------------------------------
# Running statistics
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 6), (2, 5, 3, 4)])
def test_running_stats_over_several_steps(shape, dtype, momentum):
    running_mean, running_var = running_stats(shape[1], dtype)
    ref_running_mean, ref_running_var = (s.astype(np.float64) for s in (running_mean, running_var))
    initial = running_mean.copy(), running_var.copy()
    for step in range(5):
        x = random_input(shape, dtype, seed=10 + step, loc=step, scale=1.0 + step)
        bncpu.batch_norm(x, running_mean, running_var, training=True, momentum=momentum)
        ref.batch_norm(x, ref_running_mean, ref_running_var, training=True, momentum=momentum)
        assert_close(running_mean, ref_running_mean, dtype)
        assert_close(running_var, ref_running_var, dtype)
    if momentum == 0.0:
        assert_all_bitwise_equal((running_mean, running_var), initial)
    if momentum == 1.0:
        # The last batch's mean and unbiased variance.
        axes = (0,) + tuple(range(2, x.ndim))
        assert_close(running_mean, x.astype(np.float64).mean(axis=axes), dtype)
        assert_close(running_var, x.astype(np.float64).var(axis=axes, ddof=1), dtype)

    x = random_input(shape, dtype, seed=99)
    assert_close(bncpu.batch_norm(x, running_mean, running_var),
                 ref.batch_norm(x, ref_running_mean, ref_running_var), dtype)


# ----------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------
def backward_scales(x, dy, weight, mean, invstd):
    """The magnitudes the backward's rounding errors scale with: those of the terms of
    grad_input = w·invstd·(dy - mean(dy) - x̂·mean(dy·x̂)) and of the sums Σdy, Σdy·x̂,
    not those of the results, which may cancel to near 0."""
    if x.size == 0:
        return 1.0, 1.0
    channels = (1, -1) + (1,) * (x.ndim - 2)
    w = np.ones(x.shape[1]) if weight is None else np.asarray(weight, np.float64)
    invstd = np.asarray(invstd, np.float64)
    xhat = np.abs((x - np.asarray(mean, np.float64).reshape(channels)) * invstd.reshape(channels))
    abs_dy = np.abs(np.asarray(dy, np.float64))
    input_scale = (3 * np.max(abs_dy, initial=0.0) * (1 + np.max(xhat, initial=0.0) ** 2)
                   * np.max(np.abs(w * invstd), initial=0.0))
    reduce_scale = np.sum(abs_dy * (1 + xhat))
    return max(1.0, float(input_scale)), max(1.0, float(reduce_scale))


def assert_backward_close(grads, expected, x, dy, weight, mean, invstd, dtype):
    input_scale, reduce_scale = backward_scales(x, dy, weight, mean, invstd)
    assert grads[0].dtype == dtype
    assert_close(grads[0], expected[0], dtype, scale=input_scale)
    if weight is None:
        assert grads[1] is None and grads[2] is None
        return
    for grad, expected_grad in zip(grads[1:], expected[1:]):
        assert grad.dtype == dtype and grad.shape == (x.shape[1],)
        assert_close(grad, expected_grad, dtype, scale=reduce_scale)


def used_statistics(training, save_mean, save_invstd, running_mean, running_var, eps):
    """(mean, invstd) a backward call normalizes with."""
    if training:
        return save_mean, save_invstd
    return running_mean, 1 / np.sqrt(np.asarray(running_var, np.float64) + eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape, training", forward_cases())
def test_backward_matches_reference(shape, training, has_weight, dtype):
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=3, loc=0.2, scale=1.0)
    weight, _ = channel_params(shape[1], dtype, "weight" if has_weight else "none")
    running_mean, running_var = running_stats(shape[1], dtype)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, None, None, None, True,
                                                         MOMENTUM, EPS) if training else (None,) * 3

    grads = bncpu.batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
                                      save_invstd, training, EPS)
    expected = ref.batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
                                       save_invstd, training, EPS)
    assert_backward_close(grads, expected, x, dy, weight, *used_statistics(
        training, save_mean, save_invstd, running_mean, running_var, EPS), dtype)


@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4), (3, 2, 2, 3), (2, 1, 2, 2, 2)])
def test_backward_matches_finite_differences(shape, training, has_weight):
    """The gradient of the scalar loss L = Σ y·g, y = batch_norm(x, ...)."""
    x = random_input(shape, seed=5)
    g = random_input(shape, seed=6, loc=0.0, scale=1.0)
    weight, bias = channel_params(shape[1], np.float64, "weight+bias")
    weight = weight if has_weight else None
    running_mean, running_var = running_stats(shape[1])

    def loss():
        # Running statistics are inputs of the loss only in evaluation; in training they
        # receive updates, which must not leak from one evaluation of the loss to the next.
        stats = (running_mean, running_var) if not training else (None, None)
        return float(np.sum(bncpu.batch_norm(x, *stats, weight, bias, training, 0.1, EPS) * g))

    _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1,
                                                         EPS)
    grad_input, grad_weight, grad_bias = bncpu.batch_norm_backward(
        g, x, weight, running_mean, running_var, save_mean, save_invstd, training, EPS)

    tolerance = dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_input, central_differences(loss, x), **tolerance)
    if has_weight:
        np.testing.assert_allclose(grad_weight, central_differences(loss, weight), **tolerance)
        np.testing.assert_allclose(grad_bias, central_differences(loss, bias), **tolerance)
    else:
        assert grad_weight is None and grad_bias is None


# ----------------------------------------------------------------------------------
# Split phase
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4), (3, 2, 0)])
def test_stats_match_reference(shape, dtype):
    x = random_input(shape, dtype)
    mean, m2, count = bncpu.batch_norm_stats(x)
    expected_mean, expected_m2, expected_count = ref.batch_norm_stats(x)
    assert count == expected_count and isinstance(count, int)
    assert mean.dtype == m2.dtype == np.float64
    assert_close(mean, expected_mean, dtype)
    assert_close(m2, expected_m2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", SHAPES)
def test_split_phase_forward_composes_to_the_fused_forward(shape, affine, dtype):
    x = random_input(shape, dtype)
    weight, bias = channel_params(shape[1], dtype, affine)
    fused_stats = running_stats(shape[1], dtype)
    split_stats = tuple(s.copy() for s in fused_stats)

    output, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, *fused_stats, True,
                                                              MOMENTUM, EPS)
    mean, m2, count = bncpu.batch_norm_stats(x)
    global_mean, global_invstd = bncpu.batch_norm_gather_stats(mean, m2, count, *split_stats,
                                                               MOMENTUM, EPS)
    assert global_mean.dtype == global_invstd.dtype == np.float64
    assert_bitwise_equal(global_mean.astype(dtype), save_mean)
    assert_bitwise_equal(global_invstd.astype(dtype), save_invstd)
    assert_all_bitwise_equal(split_stats, fused_stats)
    assert_bitwise_equal(bncpu.batch_norm_elemt(x, weight, bias, global_mean, global_invstd),
                         output)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape", SHAPES)
def test_split_phase_backward_composes_to_the_fused_backward(shape, has_weight, dtype):
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=3, loc=0.0, scale=1.0)
    weight, _ = channel_params(shape[1], dtype, "weight" if has_weight else "none")
    _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, None, None, None, True,
                                                         MOMENTUM, EPS)
    expected = bncpu.batch_norm_backward(dy, x, weight, None, None, save_mean, save_invstd, True,
                                         EPS)

    sum_dy, sum_dy_xmu, grad_weight, grad_bias = bncpu.batch_norm_backward_reduce(
        dy, x, save_mean, save_invstd, weight)
    assert sum_dy.dtype == sum_dy_xmu.dtype == np.float64
    expected_sums = ref.batch_norm_backward_reduce(dy, x, save_mean, save_invstd)[:2]
    assert_close(sum_dy, expected_sums[0], dtype, scale=np.sum(np.abs(dy)))
    assert_close(sum_dy_xmu, expected_sums[1], dtype, scale=np.sum(np.abs(dy * x)))
    grad_input = bncpu.batch_norm_backward_elemt(dy, x, save_mean, save_invstd, weight, sum_dy,
                                                 sum_dy_xmu, reduced_count(shape))
    assert_all_bitwise_equal((grad_input, grad_weight, grad_bias), expected)


def split_batch(x, part_sizes):
    """x cut along N into consecutive parts, as processes of a synchronized step hold it."""
    return np.split(x, np.cumsum(part_sizes)[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("part_sizes", [(3, 5, 2), (4, 0, 6), (0, 10), (1,) * 10])
def test_gathered_chunk_statistics_are_the_whole_batch_statistics(part_sizes, dtype):
    # Chunks with very different means: the merge's correction term carries the weight.
    x = random_input((sum(part_sizes), 4, 3, 5), dtype)
    x += np.arange(x.shape[0], dtype=dtype).reshape(-1, 1, 1, 1) * 10
    parts = [bncpu.batch_norm_stats(part) for part in split_batch(x, part_sizes)]
    means, m2s, counts = (np.array(values) for values in zip(*parts))
    assert counts.tolist() == [15 * size for size in part_sizes]
    for mean, m2, count in parts:
        if count == 0:
            assert_bitwise_equal(mean, np.zeros(4))
            assert_bitwise_equal(m2, np.zeros(4))

    running = running_stats(4, dtype)
    whole_running = tuple(s.copy() for s in running)
    mean, invstd = bncpu.batch_norm_gather_stats(means, m2s, counts, *running, MOMENTUM, EPS)
    _, whole_mean, whole_invstd = bncpu.batch_norm_forward(x, None, None, *whole_running, True,
                                                           MOMENTUM, EPS)
    assert_close(mean, whole_mean.astype(np.float64), dtype)
    assert_close(invstd, whole_invstd.astype(np.float64), dtype)
    for running_stat, whole_running_stat in zip(running, whole_running):
        assert_close(running_stat, whole_running_stat.astype(np.float64), dtype)
    expected = ref.batch_norm_gather_stats(means, m2s, counts, eps=EPS)
    assert_close(mean, expected[0], np.float64)
    assert_close(invstd, expected[1], np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_backward_is_the_whole_batch_backward(dtype):
    part_sizes = (3, 0, 4, 2)
    x = random_input((sum(part_sizes), 3, 5), dtype)
    dy = random_input(x.shape, dtype, seed=3, loc=0.0, scale=1.0)
    weight, _ = channel_params(3, dtype)
    _, mean, invstd = bncpu.batch_norm_forward(x, weight, None, None, None, True, MOMENTUM, EPS)
    expected = bncpu.batch_norm_backward(dy, x, weight, None, None, mean, invstd, True, EPS)

    x_parts, dy_parts = split_batch(x, part_sizes), split_batch(dy, part_sizes)
    reductions = [bncpu.batch_norm_backward_reduce(d, p, mean, invstd, weight)
                  for d, p in zip(dy_parts, x_parts)]
    sum_dy = sum(r[0] for r in reductions)
    sum_dy_xmu = sum(r[1] for r in reductions)
    input_scale, reduce_scale = backward_scales(x, dy, weight, mean, invstd)
    assert_close(sum_dy, expected[2], dtype, scale=reduce_scale)
    assert_close(sum_dy_xmu * invstd, expected[1], dtype, scale=reduce_scale)
    grad_input = np.concatenate([
        bncpu.batch_norm_backward_elemt(d, p, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                        x.shape[0] * 5)
        for d, p in zip(dy_parts, x_parts)])
    assert_close(grad_input, expected[0], dtype, scale=input_scale)


def test_gather_of_one_process_accepts_1d_partials_and_list_counts():
    x = random_input((6, 3, 4))
    mean, m2, count = bncpu.batch_norm_stats(x)
    expected = bncpu.batch_norm_gather_stats(mean[None], m2[None], np.array([count]))
    assert_all_bitwise_equal(bncpu.batch_norm_gather_stats(mean, m2, count), expected)
    assert_all_bitwise_equal(bncpu.batch_norm_gather_stats(mean, m2, [count]), expected)


def test_gather_of_empty_processes_only_leaves_running_stats():
    running = running_stats(3)
    initial = tuple(s.copy() for s in running)
    mean, invstd = bncpu.batch_norm_gather_stats(np.zeros((2, 3)), np.zeros((2, 3)), [0, 0],
                                                 *running, MOMENTUM, EPS)
    assert_bitwise_equal(mean, np.zeros(3))
    assert_close(invstd, np.full(3, 1 / np.sqrt(EPS)), np.float64)
    assert_all_bitwise_equal(running, initial)


# ----------------------------------------------------------------------------------
# Accuracy: float32 data whose mean is 10^4 times its standard deviation
# ----------------------------------------------------------------------------------
# Channel mode, split mode (few channels, long rows, with 2 threads), column mode (S == 1,
# one tile and several).
HARD_SHAPES = [(64, 4, 32, 32), (4, 1, 512, 512), (4096, 16), (301, 1031), (67, 130, 3, 5),
               (16, 3, 7, 11), (43, 16, 8, 8)]


def hard_data(shape, seed):
    x = (np.random.default_rng(seed).normal(size=shape) + 1e4).astype(np.float32)
    truth = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    mean, var = truth.mean(axis=axes), truth.var(axis=axes)
    broadcast = (1, -1) + (1,) * (x.ndim - 2)
    output = (truth - mean.reshape(broadcast)) / np.sqrt(var.reshape(broadcast) + EPS)
    count = reduced_count(shape)
    return x, dict(mean=mean, invstd=1 / np.sqrt(var + EPS), running_var=var * count / (count - 1),
                   output=output)


def relative_error(actual, truth):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - truth) / np.abs(truth)))


def bncpu_hard_results(x):
    running_mean, running_var = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    output, mean, invstd = bncpu.batch_norm_forward(x, None, None, running_mean, running_var, True,
                                                    1.0, EPS)
    return dict(mean=mean, invstd=invstd, running_var=running_var, output=output)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("shape", HARD_SHAPES)
def test_float32_statistics_of_a_large_mean_are_accurate(shape, n_threads):
    x, truth = hard_data(shape, seed=0)
    with num_threads(n_threads):
        ours = bncpu_hard_results(x)
    # Correctly rounded to float32 is at most half an ulp off: 2^-24; allow one ulp.
    for name in ("mean", "invstd", "running_var"):
        assert relative_error(ours[name], truth[name]) < 2.0**-23, name
    # Normalized values are O(1) (up to about 5 with many samples): their rounding error
    # is a few float32 ulps of max(1, |output|).
    scale = np.maximum(1.0, np.abs(truth["output"]))
    assert np.max(np.abs(ours["output"] - truth["output"]) / scale) < 4 * 2.0**-23


@pytest.mark.parametrize("order", ["sorted", "reversed", "steps"])
@pytest.mark.parametrize("shape", [(64, 4, 32, 32), (4, 1, 512, 512), (2, 3, 5000)])
def test_float32_statistics_of_ordered_data_are_accurate(shape, order):
    # Blocks whose first values are not typical of the block (the one-pass try is
    # centered on them): sorted rows, and rows of two levels far apart.
    x, _ = hard_data(shape, seed=0)
    if order == "steps":
        x = x.copy()
        x[..., x.shape[-1] // 3:] += 1000
    else:
        x = np.sort(x, axis=-1)
        if order == "reversed":
            x = np.ascontiguousarray(x[..., ::-1])
    truth = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    mean, var = truth.mean(axis=axes), truth.var(axis=axes)
    ours = bncpu_hard_results(x)
    assert relative_error(ours["mean"], mean) < 2.0**-23
    assert relative_error(ours["invstd"], 1 / np.sqrt(var + EPS)) < 2.0**-23


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", HARD_SHAPES)
def test_float32_statistics_of_a_large_mean_are_no_worse_than_torch(torch, shape, seed):
    x, truth = hard_data(shape, seed)
    ours = bncpu_hard_results(x)
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    output, mean, invstd = torch.ops.aten.native_batch_norm(
        torch.from_numpy(x), None, None, running_mean, running_var, True, 1.0, EPS)
    theirs = dict(mean=mean.numpy(), invstd=invstd.numpy(), running_var=running_var.numpy())
    for name, their_value in theirs.items():
        # Two correctly rounded results may differ by rounding: half an ulp is the floor.
        assert relative_error(ours[name], truth[name]) <= max(
            relative_error(their_value, truth[name]), 2.0**-24), name
    their_error = np.max(np.abs(output.numpy() - truth["output"]))
    assert np.max(np.abs(ours["output"] - truth["output"])) <= max(their_error, 2.0**-23)


# ----------------------------------------------------------------------------------
# Property test: random shapes, dtypes, layouts and parameters against the reference
# ----------------------------------------------------------------------------------
@st.composite
def batch_norm_problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = (draw(st.integers(0, 6)), draw(st.integers(1, 5))) + tuple(
        draw(st.lists(st.integers(0, 4), min_size=ndim - 2, max_size=ndim - 2)))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(sorted(LAYOUTS))),
        affine=draw(st.sampled_from(sorted(AFFINE))),
        training=draw(st.booleans()),
        momentum=draw(st.floats(0.0, 1.0)),
        eps=draw(st.floats(0.0, 0.1)),
        loc=draw(st.floats(-100.0, 100.0)),
        scale=draw(st.floats(0.01, 10.0)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@given(batch_norm_problems())
@np.errstate(divide="ignore", over="ignore", invalid="ignore")   # eps = 0 on an empty batch
def test_property_forward_and_backward_match_reference(problem):
    shape, dtype, training = problem["shape"], problem["dtype"], problem["training"]
    momentum, eps = problem["momentum"], problem["eps"]
    relayout = LAYOUTS[problem["layout"]]
    x = random_input(shape, dtype, problem["seed"], problem["loc"], problem["scale"])
    dy = random_input(shape, dtype, problem["seed"] + 1, 0.0, 1.0)
    weight, bias = channel_params(shape[1], dtype, problem["affine"])
    running_mean, running_var = running_stats(shape[1], dtype)
    ref_running_mean, ref_running_var = (s.astype(np.float64) for s in (running_mean, running_var))
    initial = running_mean.copy(), running_var.copy()

    if training and reduced_count(shape) == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bncpu.batch_norm(relayout(x), running_mean, running_var, weight, bias, True,
                             momentum, eps)
        assert_all_bitwise_equal((running_mean, running_var), initial)
        return

    output, save_mean, save_invstd = bncpu.batch_norm_forward(
        relayout(x), weight, bias, running_mean, running_var, training, momentum, eps)
    expected = ref.batch_norm_forward(x, weight, bias, ref_running_mean, ref_running_var,
                                      training, momentum, eps)
    assert output.shape == shape
    assert_forward_close((output, save_mean, save_invstd), expected, x, weight, dtype)
    assert_close(running_mean, ref_running_mean, dtype)
    assert_close(running_var, ref_running_var, dtype)
    if reduced_count(shape) == 0:
        assert_all_bitwise_equal((running_mean, running_var), initial)

    grads = bncpu.batch_norm_backward(relayout(dy), relayout(x), weight, running_mean, running_var,
                                      save_mean, save_invstd, training, eps)
    expected = ref.batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
                                       save_invstd, training, eps)
    assert_backward_close(grads, expected, x, dy, weight, *used_statistics(
        training, save_mean, save_invstd, running_mean, running_var, eps), dtype)


# ----------------------------------------------------------------------------------
# Differential tests against PyTorch
# ----------------------------------------------------------------------------------
TORCH_SHAPES = [(4, 3), (2, 3, 5), (3, 5, 7, 11), (2, 1, 3, 4, 5), (1, 4, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_native_batch_norm_matches_torch(torch, shape, affine, training, dtype):
    x = random_input(shape, dtype)
    weight, bias = channel_params(shape[1], dtype, affine)
    running_mean, running_var = running_stats(shape[1], dtype)
    torch_running = to_torch(torch, running_mean), to_torch(torch, running_var)

    ours = bncpu.batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                                    MOMENTUM, EPS)
    theirs = torch.ops.aten.native_batch_norm(to_torch(torch, x), to_torch(torch, weight),
                                              to_torch(torch, bias), *torch_running, training,
                                              MOMENTUM, EPS)
    for our_value, their_value in zip(ours, theirs):
        assert our_value.shape == tuple(their_value.shape)
        assert our_value.dtype == their_value.numpy().dtype
        assert_close(our_value, their_value.numpy(), dtype)
    assert_close(running_mean, torch_running[0].numpy(), dtype)
    assert_close(running_var, torch_running[1].numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_functional_batch_norm_matches_torch(torch, shape, track_running_stats, dtype):
    x = random_input(shape, dtype)
    weight, bias = channel_params(shape[1], dtype)
    running = running_stats(shape[1], dtype) if track_running_stats else (None, None)
    torch_running = tuple(to_torch(torch, s) for s in running)

    for step in range(3):
        ours = bncpu.batch_norm(x + step, *running, weight, bias, True, MOMENTUM, EPS)
        theirs = torch.nn.functional.batch_norm(to_torch(torch, x + step), *torch_running,
                                                to_torch(torch, weight), to_torch(torch, bias),
                                                True, MOMENTUM, EPS)
        assert_close(ours, theirs.numpy(), dtype)
    if track_running_stats:
        for ours, theirs in zip(running, torch_running):
            assert_close(ours, theirs.numpy(), dtype)
        assert_close(bncpu.batch_norm(x, *running, weight, bias),
                     torch.nn.functional.batch_norm(to_torch(torch, x), *torch_running,
                                                    to_torch(torch, weight),
                                                    to_torch(torch, bias)).numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape", TORCH_SHAPES)
def test_native_batch_norm_backward_matches_torch(torch, shape, has_weight, training, dtype):
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=3, loc=0.0, scale=1.0)
    weight, _ = channel_params(shape[1], dtype, "weight" if has_weight else "none")
    running_mean, running_var = running_stats(shape[1], dtype)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, weight, None, running_mean.copy(), running_var.copy(), training, MOMENTUM, EPS)

    ours = bncpu.batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
                                     save_invstd, training, EPS)
    theirs = torch.ops.aten.native_batch_norm_backward(
        to_torch(torch, dy), to_torch(torch, x), to_torch(torch, weight),
        to_torch(torch, running_mean), to_torch(torch, running_var), to_torch(torch, save_mean),
        to_torch(torch, save_invstd), training, EPS, [True, has_weight, has_weight])
    assert_backward_close(ours, [t if t is None else t.numpy() for t in theirs], x, dy, weight,
                          *used_statistics(training, save_mean, save_invstd, running_mean,
                                           running_var, EPS), dtype)
