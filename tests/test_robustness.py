"""Odd and hostile input that is not an error: any memory layout, read-only and mapped
arrays, out= overlapping the inputs, NaN/inf, eps = 0, ndarray subclasses, empty batches.
Each gives the correct result or a clear error, never a silently wrong one."""
import copy
import math

import numpy as np
import pytest

import bncpu
from bncpu import reference as ref
from conftest import (DTYPES, LAYOUTS, assert_all_bitwise_equal, assert_bitwise_equal,
                      channel_params, num_threads, random_input, running_stats)

EPS = 1e-5
MOMENTUM = 0.1


class Inputs:
    """Every array the batch-norm functions read, for an input of ``shape``."""

    def __init__(self, shape, dtype=np.float64):
        c = shape[1]
        self.x = random_input(shape, dtype)
        self.dy = random_input(shape, dtype, seed=3, loc=0.0, scale=1.0)
        self.weight, self.bias = channel_params(c, dtype)
        self.running_mean, self.running_var = running_stats(c, dtype)
        _, self.save_mean, self.save_invstd = bncpu.batch_norm_forward(
            self.x, None, None, None, None, True, MOMENTUM, EPS)
        self.mean, self.m2, self.count = bncpu.batch_norm_stats(self.x)

    def relaid(self, layout):
        """A copy with every array in another layout, its values unchanged."""
        other = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, np.ndarray):
                setattr(other, name, layout(value))
        return other


def all_results(k):
    """Every function's results on the inputs k (whose running statistics are only read)."""
    trained_mean, trained_var = running_stats(k.x.shape[1], np.dtype(k.x.dtype.type))
    results = list(bncpu.batch_norm_forward(k.x, k.weight, k.bias, trained_mean, trained_var, True,
                                            MOMENTUM, EPS))
    results += [trained_mean, trained_var]
    results.append(bncpu.batch_norm(k.x, k.running_mean, k.running_var, k.weight, k.bias))
    results += bncpu.batch_norm_backward(k.dy, k.x, k.weight, None, None, k.save_mean,
                                         k.save_invstd, True, EPS)
    results += bncpu.batch_norm_backward(k.dy, k.x, k.weight, k.running_mean, k.running_var, None,
                                         None, False, EPS)
    results += bncpu.batch_norm_stats(k.x)[:2]
    results.append(bncpu.batch_norm_elemt(k.x, k.weight, k.bias, k.mean, k.save_invstd))
    sums = bncpu.batch_norm_backward_reduce(k.dy, k.x, k.mean, k.save_invstd, k.weight)
    results += sums
    results.append(bncpu.batch_norm_backward_elemt(k.dy, k.x, k.mean, k.save_invstd, k.weight,
                                                   sums[0], sums[1], k.count))
    return results


# ----------------------------------------------------------------------------------
# Layouts, read-only and mapped inputs
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (7, 5), (3, 2, 700)])
def test_any_layout_gives_the_result_of_a_contiguous_array(shape, layout, dtype):
    inputs = Inputs(shape, dtype)
    assert_all_bitwise_equal(all_results(inputs.relaid(LAYOUTS[layout])), all_results(inputs))


def test_zero_strides_give_the_result_of_a_contiguous_copy():
    inputs = Inputs((6, 3, 4, 5))
    broadcast = copy.copy(inputs)
    broadcast.x = np.broadcast_to(inputs.x[:1], inputs.x.shape)            # one sample, repeated
    broadcast.dy = np.broadcast_to(inputs.dy[:, :, :1, :], inputs.dy.shape)  # rows repeated
    broadcast.weight = np.broadcast_to(np.float64(1.5), (3,))
    assert 0 in broadcast.x.strides and 0 in broadcast.dy.strides
    assert broadcast.weight.strides == (0,)
    contiguous = broadcast.relaid(np.ascontiguousarray)
    assert_all_bitwise_equal(all_results(broadcast), all_results(contiguous))


def test_read_only_memmap_input(tmp_path):
    inputs = Inputs((6, 3, 4, 5))
    path = tmp_path / "x.npy"
    np.save(path, inputs.x)
    mapped = copy.copy(inputs)
    mapped.x = np.load(path, mmap_mode="r")
    assert isinstance(mapped.x, np.memmap) and not mapped.x.flags.writeable
    assert_all_bitwise_equal(all_results(mapped), all_results(inputs))

    raw = tmp_path / "raw.bin"
    inputs.dy.tofile(raw)
    mapped.dy = np.memmap(raw, dtype=np.float64, mode="r", shape=inputs.dy.shape)
    assert_all_bitwise_equal(all_results(mapped), all_results(inputs))


def test_read_only_running_stats_are_accepted_where_they_are_only_read():
    inputs = Inputs((6, 3, 5))
    frozen = inputs.relaid(LAYOUTS["read-only"])
    assert not frozen.running_mean.flags.writeable
    expected = bncpu.batch_norm(inputs.x, inputs.running_mean, inputs.running_var)
    assert_bitwise_equal(bncpu.batch_norm(inputs.x, frozen.running_mean, frozen.running_var),
                         expected)
    with pytest.raises(ValueError, match="read-only"):
        bncpu.batch_norm(inputs.x, frozen.running_mean, frozen.running_var, training=True)


# ----------------------------------------------------------------------------------
# out= aliasing an input, exactly or in part
# ----------------------------------------------------------------------------------
# Each call writes an input-shaped result to out; "reads" names the arrays it reads that
# out may alias.
ALIASING_CALLS = {
    "forward-training": (("x",), lambda k, out: bncpu.batch_norm_forward(
        k.x, k.weight, k.bias, None, None, True, MOMENTUM, EPS, out=out)[0]),
    "forward-eval": (("x",), lambda k, out: bncpu.batch_norm(
        k.x, k.running_mean, k.running_var, k.weight, k.bias, out=out)),
    "backward-training": (("dy", "x"), lambda k, out: bncpu.batch_norm_backward(
        k.dy, k.x, k.weight, None, None, k.save_mean, k.save_invstd, True, EPS, out=out)[0]),
    "backward-eval": (("dy", "x"), lambda k, out: bncpu.batch_norm_backward(
        k.dy, k.x, k.weight, k.running_mean, k.running_var, None, None, False, EPS, out=out)[0]),
    "elemt": (("x",), lambda k, out: bncpu.batch_norm_elemt(
        k.x, k.weight, k.bias, k.mean, k.save_invstd, out=out)),
    "backward_elemt": (("dy", "x"), lambda k, out: bncpu.batch_norm_backward_elemt(
        k.dy, k.x, k.mean, k.save_invstd, k.weight, k.mean, k.m2, k.count, out=out)),
}
ALIASES = [(call, name) for call, (reads, _) in ALIASING_CALLS.items() for name in reads]

# Small, and large enough for several threads in each way the kernels cut the work.
ALIASING_SHAPES = [(5, 3, 7), (8, 16, 32, 32), (2, 3, 150, 150), (70000, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ALIASING_SHAPES)
@pytest.mark.parametrize("call, alias", ALIASES)
def test_out_may_be_an_input(call, alias, shape, dtype):
    inputs = Inputs(shape, dtype)
    function = ALIASING_CALLS[call][1]
    expected = function(inputs, None)
    out = getattr(inputs, alias)
    with num_threads(2):
        assert function(inputs, out) is out
    assert_bitwise_equal(out, expected)


def overlapping_pair(shape, dtype, shift):
    """Two arrays of ``shape`` in one buffer, the second ``shift`` elements after the first."""
    size = math.prod(shape)
    buffer = np.zeros(size + abs(shift), dtype)
    first, second = buffer[:size], buffer[abs(shift):]
    return (first, second) if shift > 0 else (second, first)


@pytest.mark.parametrize("shift", [1, -1, 7, -40])
@pytest.mark.parametrize("call, alias", ALIASES)
def test_out_partially_overlapping_an_input(call, alias, shift):
    shape = (5, 3, 7)
    inputs = Inputs(shape)
    function = ALIASING_CALLS[call][1]
    expected = function(inputs, None)
    read, out = (a.reshape(shape) for a in overlapping_pair(shape, np.float64, shift))
    read[...] = getattr(inputs, alias)
    setattr(inputs, alias, read)
    assert np.shares_memory(read, out)
    assert function(inputs, out) is out
    assert_bitwise_equal(out, expected)


@pytest.mark.parametrize("call", ALIASING_CALLS)
def test_out_overlapping_the_weight(call):
    shape = (5, 3, 7)
    inputs = Inputs(shape)
    function = ALIASING_CALLS[call][1]
    expected = function(inputs, None)
    buffer = np.zeros(math.prod(shape))
    buffer[:3] = inputs.weight
    inputs.weight = buffer[:3]
    out = buffer.reshape(shape)
    assert function(inputs, out) is out
    assert_bitwise_equal(out, expected)


def test_out_transposed_view_of_the_input():
    x = random_input((6, 6))
    expected = bncpu.batch_norm(x, None, None, training=True)
    expected_of_transpose = bncpu.batch_norm(x.T.copy(), None, None, training=True)
    assert bncpu.batch_norm(x.T, None, None, training=True, out=x) is x
    assert_bitwise_equal(x, expected_of_transpose)
    assert not np.array_equal(expected, expected_of_transpose)


# ----------------------------------------------------------------------------------
# NaN and inf stay in their channel; eps = 0
# ----------------------------------------------------------------------------------
NAN_SHAPES = [(6, 4, 5), (8, 16, 32, 32), (2, 3, 150, 150), (70000, 3), (2048, 130)]


def poisoned(array, value, channel=1):
    """A copy with ``value`` at one element of ``channel``."""
    array = array.copy()
    array[(array.shape[0] // 2, channel) + tuple(d // 3 for d in array.shape[2:])] = value
    return array


def channel(array, j):
    return array[:, j] if array.ndim > 1 else array[j]


def other_channels(array, j=1):
    return np.delete(array, j, axis=1 if array.ndim > 1 else 0)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NAN_SHAPES)
def test_non_finite_input_spoils_only_its_channel_in_training(shape, dtype, value):
    inputs = Inputs(shape, dtype)
    clean = list(bncpu.batch_norm_forward(inputs.x, inputs.weight, inputs.bias,
                                          *running_stats(shape[1], dtype), True, MOMENTUM, EPS))
    running = running_stats(shape[1], dtype)
    dirty = list(bncpu.batch_norm_forward(poisoned(inputs.x, value), inputs.weight, inputs.bias,
                                          *running, True, MOMENTUM, EPS))
    clean_running = running_stats(shape[1], dtype)
    bncpu.batch_norm(inputs.x, *clean_running, training=True)
    for result, expected in zip(dirty + list(running), clean + list(clean_running)):
        assert not np.isfinite(channel(result, 1)).any()
        assert_bitwise_equal(other_channels(result), other_channels(expected))

    mean, m2, _ = bncpu.batch_norm_stats(poisoned(inputs.x, value))
    clean_mean, clean_m2, _ = bncpu.batch_norm_stats(inputs.x)
    assert not np.isfinite(mean[1]) or not np.isfinite(m2[1])
    assert_bitwise_equal(other_channels(mean), other_channels(clean_mean))
    assert_bitwise_equal(other_channels(m2), other_channels(clean_m2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NAN_SHAPES)
def test_nan_input_spoils_only_its_element_in_evaluation(shape, dtype):
    inputs = Inputs(shape, dtype)
    parameters = inputs.running_mean, inputs.running_var, inputs.weight, inputs.bias
    clean = bncpu.batch_norm(inputs.x, *parameters)
    dirty_x = poisoned(inputs.x, np.nan)
    dirty = bncpu.batch_norm(dirty_x, *parameters)
    assert_bitwise_equal(np.isnan(dirty), np.isnan(dirty_x))
    assert_bitwise_equal(dirty[~np.isnan(dirty_x)], clean[~np.isnan(dirty_x)])


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NAN_SHAPES)
def test_nan_gradient_spoils_only_its_channel(shape, dtype, training):
    k = Inputs(shape, dtype)
    if training:
        stats = None, None, k.save_mean, k.save_invstd
    else:
        stats = k.running_mean, k.running_var, None, None
    clean = bncpu.batch_norm_backward(k.dy, k.x, k.weight, *stats, training, EPS)
    dirty_dy = poisoned(k.dy, np.nan)
    dirty = bncpu.batch_norm_backward(dirty_dy, k.x, k.weight, *stats, training, EPS)
    if training:
        assert np.isnan(channel(dirty[0], 1)).all()
    else:
        assert_bitwise_equal(np.isnan(dirty[0]), np.isnan(dirty_dy))
    for result, expected in zip(dirty, clean):
        assert_bitwise_equal(other_channels(result), other_channels(expected))
    assert np.isnan(dirty[1][1]) and np.isnan(dirty[2][1])

    sum_dy, sum_dy_xmu = bncpu.batch_norm_backward_reduce(dirty_dy, k.x, k.mean, k.save_invstd)[:2]
    assert np.isnan(sum_dy[1]) and np.isnan(sum_dy_xmu[1])
    assert np.isfinite(other_channels(sum_dy)).all()
    assert np.isfinite(other_channels(sum_dy_xmu)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 4, 5), (70000, 3), (2, 3, 150, 150)])
def test_eps_zero_with_a_constant_channel_gives_what_the_math_says(shape, dtype):
    x = random_input(shape, dtype)
    x[:, 1] = 3.0
    running = running_stats(shape[1], dtype)
    ref_running = tuple(s.astype(np.float64) for s in running)
    output, save_mean, save_invstd = bncpu.batch_norm_forward(x, None, None, *running, True,
                                                              MOMENTUM, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = ref.batch_norm_forward(x, None, None, *ref_running, True, MOMENTUM, 0.0)
    # var = 0: invstd = 1/0 = inf, and (x - mean)·invstd = 0·inf = NaN.
    assert save_mean[1] == 3.0 and save_invstd[1] == np.inf
    assert np.isnan(channel(output, 1)).all()
    for result, expected_result in zip((output, save_mean, save_invstd) + running,
                                       expected + ref_running):
        # atol: outputs near 0 carry float32's absolute rounding of unit-sized values.
        np.testing.assert_allclose(result, expected_result, rtol=1e-5, atol=1e-7)

    # Evaluation with a zero running variance: ±inf where x ≠ running_mean, NaN where equal.
    running_var = np.ones(shape[1], dtype)
    running_var[1] = 0
    running_mean = np.zeros(shape[1], dtype)
    running_mean[1] = 3.0
    x[(0, 1) + (0,) * (x.ndim - 2)] = 5.0
    output = bncpu.batch_norm(x, running_mean, running_var, eps=0.0)
    assert channel(output, 1).flat[0] == np.inf and np.isnan(channel(output, 1).flat[1:]).all()
    grad_input = bncpu.batch_norm_backward(np.ones_like(x), x, None, running_mean, running_var,
                                           None, None, False, 0.0)[0]
    assert (channel(grad_input, 1) == np.inf).all()
    assert np.isfinite(other_channels(grad_input)).all()


# ----------------------------------------------------------------------------------
# ndarray subclasses
# ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_matrix_input_is_computed_as_a_plain_array():
    x = np.matrix(random_input((6, 3)))
    output = bncpu.batch_norm(x, None, None, training=True)
    assert type(output) is np.ndarray
    assert_bitwise_equal(output, bncpu.batch_norm(np.asarray(x), None, None, training=True))
    grad_input = bncpu.batch_norm_backward(np.matrix(np.ones((6, 3))), x, None, None, None,
                                           np.zeros(3), np.ones(3), True, EPS)[0]
    assert type(grad_input) is np.ndarray


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_matrix_weight_is_not_one_dimensional():
    with pytest.raises(ValueError, match=r"weight has shape \(1, 3\) but must have shape \(3,\)"):
        bncpu.batch_norm(random_input((6, 3)), None, None, np.matrix(np.ones(3)), training=True)


MASKED_CALLS = {
    "batch_norm input": lambda m, k: bncpu.batch_norm(m(k.x), None, None, training=True),
    "batch_norm weight": lambda m, k: bncpu.batch_norm(k.x, None, None, m(k.weight), training=True),
    "batch_norm bias": lambda m, k: bncpu.batch_norm(k.x, None, None, None, m(k.bias),
                                                     training=True),
    "backward grad_output": lambda m, k: bncpu.batch_norm_backward(
        m(k.dy), k.x, k.weight, None, None, k.save_mean, k.save_invstd, True, EPS),
    "backward save_invstd": lambda m, k: bncpu.batch_norm_backward(
        k.dy, k.x, k.weight, None, None, k.save_mean, m(k.save_invstd), True, EPS),
    "stats input": lambda m, k: bncpu.batch_norm_stats(m(k.x)),
    "gather mean": lambda m, k: bncpu.batch_norm_gather_stats(m(k.mean), k.m2, k.count),
    "elemt invstd": lambda m, k: bncpu.batch_norm_elemt(k.x, None, None, k.mean, m(k.save_invstd)),
    "backward_reduce input": lambda m, k: bncpu.batch_norm_backward_reduce(
        k.dy, m(k.x), k.mean, k.save_invstd),
    "backward_elemt sum_dy": lambda m, k: bncpu.batch_norm_backward_elemt(
        k.dy, k.x, k.mean, k.save_invstd, None, m(k.mean), k.m2, k.count),
}


@pytest.mark.parametrize("call", MASKED_CALLS)
def test_masked_arrays_raise_type_error(call):
    inputs = Inputs((6, 3, 4))
    with pytest.raises(TypeError, match="masked array"):
        MASKED_CALLS[call](lambda a: np.ma.masked_array(a, mask=np.zeros(a.shape, bool)), inputs)


# ----------------------------------------------------------------------------------
# Empty batches and empty channels
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0), (0, 3, 0, 2)])
def test_empty_batch_gives_an_empty_output_and_keeps_running_stats(shape, dtype):
    x = np.empty(shape, dtype)
    running = running_stats(3, dtype)
    initial = tuple(s.copy() for s in running)
    output, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, *channel_params(3, dtype), *running, True, MOMENTUM, EPS)
    assert output.shape == shape and output.dtype == dtype
    assert_all_bitwise_equal(running, initial)
    expected = ref.batch_norm_forward(x, None, None, None, None, True, MOMENTUM, EPS)
    np.testing.assert_array_equal(save_mean, expected[1])
    np.testing.assert_allclose(save_invstd, expected[2], rtol=1e-6)
    assert bncpu.batch_norm(x, *running).shape == shape

    grad_input, grad_weight, grad_bias = bncpu.batch_norm_backward(
        x, x, np.ones(3, dtype), None, None, save_mean, save_invstd, True, EPS)
    assert grad_input.shape == shape
    assert_bitwise_equal(grad_weight, np.zeros(3, dtype))
    assert_bitwise_equal(grad_bias, np.zeros(3, dtype))


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)])
def test_empty_batch_joins_a_synchronized_step(shape):
    x = np.empty(shape)
    mean, m2, count = bncpu.batch_norm_stats(x)
    assert count == 0
    assert_bitwise_equal(mean, np.zeros(3))
    assert_bitwise_equal(m2, np.zeros(3))

    other = random_input((4, 3, 5))   # the other process's part of the batch
    other_stats = bncpu.batch_norm_stats(other)
    running = running_stats(3)
    alone_running = tuple(s.copy() for s in running)
    together = bncpu.batch_norm_gather_stats(np.stack([mean, other_stats[0]]),
                                             np.stack([m2, other_stats[1]]),
                                             [count, other_stats[2]], *running)
    alone = bncpu.batch_norm_gather_stats(*other_stats, *alone_running)
    assert_all_bitwise_equal(together, alone)
    assert_all_bitwise_equal(running, alone_running)

    sum_dy, sum_dy_xmu, _, _ = bncpu.batch_norm_backward_reduce(x, x, together[0], together[1])
    assert_bitwise_equal(sum_dy, np.zeros(3))
    assert_bitwise_equal(sum_dy_xmu, np.zeros(3))
    grad_input = bncpu.batch_norm_backward_elemt(x, x, together[0], together[1], None, sum_dy,
                                                 sum_dy_xmu, other_stats[2])
    assert grad_input.shape == shape
    assert bncpu.batch_norm_backward_elemt(x, x, together[0], together[1], None, sum_dy, sum_dy_xmu,
                                           0).shape == shape


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_no_channels(training):
    x = np.empty((4, 0, 5))
    running = np.empty(0), np.empty(0)
    output, save_mean, save_invstd = bncpu.batch_norm_forward(x, None, None, *running, training,
                                                              MOMENTUM, EPS)
    assert output.shape == x.shape
    assert save_mean.shape == save_invstd.shape == (0,)
    assert all(a.shape == (0,) for a in bncpu.batch_norm_stats(x)[:2])


# ----------------------------------------------------------------------------------
# Outputs over 8 MB are written with streaming stores (bncpu/_kernels/_elementwise.h):
# whatever the output's alignment, or when it is an input, the values are the same.
# ----------------------------------------------------------------------------------
# 9.4 MB of float32, 4-byte-aligned views below; and 8.8 MB of short (7x7) rows, too
# short to stream (their passes run row after row: pass_segments in _bn_passes.pxi).
STREAMED_SHAPES = ((4, 16, 192, 192), (64, 700, 7, 7))


def misaligned_empty(shape, dtype, shift):
    """An uninitialized array of `shape` starting `shift` elements into a buffer."""
    buffer = np.empty(math.prod(shape) + 16, dtype)
    return buffer[shift:shift + math.prod(shape)].reshape(shape)


STREAMED_CALLS = {
    "train": lambda x, dy, w, out: bncpu.batch_norm_forward(x, w, w, None, None, True, 0.1,
                                                            1e-5, out=out)[0],
    "eval": lambda x, dy, w, out: bncpu.batch_norm(x, w, np.abs(w) + 1, w, w, out=out),
    "backward": lambda x, dy, w, out: bncpu.batch_norm_backward(
        dy, x, w, None, None, *bncpu.batch_norm_forward(x, w, w, None, None, True, 0.1,
                                                        1e-5)[1:], True, 1e-5, out=out)[0],
    "backward_eval": lambda x, dy, w, out: bncpu.batch_norm_backward(
        dy, x, w, w, np.abs(w) + 1, None, None, False, 1e-5, out=out)[0],
    "group_norm": lambda x, dy, w, out: bncpu.group_norm(x, 4, w, w, out=out),
    "layer_norm": lambda x, dy, w, out: bncpu.layer_norm(
        x, x.shape[-1:], np.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype),
        np.linspace(-1, 1, x.shape[-1], dtype=x.dtype), out=out),
    "layer_norm_backward": lambda x, dy, w, out: bncpu.layer_norm_backward(
        dy, x, x.shape[-1:], *bncpu.layer_norm_forward(
            x, x.shape[-1:], np.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype), None,
            1e-5)[1:], np.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype), out=out)[0],
}


@pytest.mark.parametrize("call", sorted(STREAMED_CALLS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STREAMED_SHAPES, ids=str)
def test_streamed_outputs_do_not_depend_on_alignment_or_aliasing(call, dtype, shape):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = np.linspace(0.5, 1.5, shape[1], dtype=dtype)
    function = STREAMED_CALLS[call]
    expected = function(x, dy, w, None)
    # Every offset within a cache line the dtype allows (the buffer itself starts at 16
    # bytes or more): the streamed part of a span is its whole lines.
    for shift in range(64 // x.itemsize):
        out = misaligned_empty(shape, dtype, shift)
        result = function(x, dy, w, out)
        assert result is out or np.shares_memory(result, out)
        assert_bitwise_equal(out, expected)
    # In place (no streaming): the same values.
    target = (dy if call.startswith("backward") else x).copy()
    if call.startswith("backward"):
        function(x, target, w, target)
    else:
        function(target, dy, w, target)
    assert_bitwise_equal(target, expected)


# ----------------------------------------------------------------------------------
# Counts: every integer form, and per-process counts (summed), as PyTorch takes them
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [20, np.int32(20), np.uint64(20), np.array(20), [8, 12], (20,),
                                   np.array([5, 0, 15], np.int32), np.array([20], np.uint8)],
                         ids=repr)
def test_backward_elemt_takes_the_total_count_or_per_process_counts(count):
    inputs = Inputs((4, 3, 5))
    sums = bncpu.batch_norm_backward_reduce(inputs.dy, inputs.x, inputs.mean, inputs.save_invstd)
    expected = bncpu.batch_norm_backward_elemt(inputs.dy, inputs.x, inputs.mean, inputs.save_invstd,
                                               inputs.weight, sums[0], sums[1], 20)
    result = bncpu.batch_norm_backward_elemt(inputs.dy, inputs.x, inputs.mean, inputs.save_invstd,
                                             inputs.weight, sums[0], sums[1], count)
    assert_bitwise_equal(result, expected)
    twin = ref.batch_norm_backward_elemt(inputs.dy, inputs.x, inputs.mean, inputs.save_invstd,
                                         inputs.weight, sums[0], sums[1], count)
    np.testing.assert_allclose(result, twin, rtol=1e-12, atol=1e-12)
