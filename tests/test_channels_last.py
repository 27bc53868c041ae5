"""axis=: the channel axis of batch, group and instance norm (functions and reference).

Channels-last results against torch on the permuted data and against the reference; bit
for bit against the computation they are the same arithmetic as; layouts, out=, threads
and errors."""
import numpy as np
import pytest

import bncpu
import bncpu.reference as reference
from conftest import (DTYPES, assert_all_bitwise_equal, assert_bitwise_equal, assert_close,
                      channel_params, num_threads, random_input, running_stats)

# (shape, axis): odd sizes, C = 1, N = 1, primes, empty batches and empty spatial dims.
CASES = [((4, 5, 6, 3), -1), ((3, 7, 5), -1), ((2, 3, 2, 4, 5), -1), ((1, 6, 5, 1), -1),
         ((5, 2, 13), -1), ((4, 3, 5, 2), 2), ((0, 4, 3), -1), ((2, 0, 3), -1), ((6, 7), -1)]


def first(array, axis):
    """The channels-first (N, C, *) copy of channels-along-``axis`` data."""
    return np.ascontiguousarray(np.moveaxis(array, axis, 1))


def back(array, axis):
    return np.moveaxis(array, 1, axis)


def close_all(actual, expected, dtype):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, dtype)


# ----------------------------------------------------------------------------------
# Against the reference (which moves the axis) and the channels-first functions
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_batch_norm_axis(shape, axis, dtype):
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=7)
    c = shape[axis]
    weight, bias = channel_params(c, dtype)
    count = x.size // c if c else 0
    for training in ([True, False] if count > 1 else [False]):
        running = running_stats(c, dtype)
        expected_running = [r.astype(np.float64) for r in running]
        result = bncpu.batch_norm_forward(x, weight, bias, *running, training, 0.2, 1e-5,
                                          axis=axis)
        expected = reference.batch_norm_forward(x, weight, bias, *expected_running, training,
                                                0.2, 1e-5, axis=axis)
        close_all(result, expected, dtype)
        close_all(running, expected_running, dtype)
        assert result[0].flags.c_contiguous and result[0].shape == shape
        close_all(bncpu.batch_norm_backward(dy, x, weight, *running, result[1], result[2],
                                            training, 1e-5, axis=axis),
                  reference.batch_norm_backward(dy, x, weight, *running, result[1], result[2],
                                                training, 1e-5, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES)
def test_split_phase_axis(shape, axis, dtype):
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=7)
    c = shape[axis]
    weight, bias = channel_params(c, dtype)
    mean, m2, count = bncpu.batch_norm_stats(x, axis=axis)
    expected = reference.batch_norm_stats(x, axis=axis)
    close_all((mean, m2), expected[:2], np.float64 if dtype == np.float64 else dtype)
    assert count == expected[2]
    invstd = 1.0 / np.sqrt(m2 / max(count, 1) + 1e-5)
    close_all([bncpu.batch_norm_elemt(x, weight, bias, mean, invstd, axis=axis)],
              [reference.batch_norm_elemt(x, weight, bias, mean, invstd, axis=axis)], dtype)
    reduced = bncpu.batch_norm_backward_reduce(dy, x, mean, invstd, weight, axis=axis)
    close_all(reduced, reference.batch_norm_backward_reduce(dy, x, mean, invstd, weight, axis=axis),
              dtype)
    close_all([bncpu.batch_norm_backward_elemt(dy, x, mean, invstd, weight, reduced[0],
                                               reduced[1], max(count, 1), axis=axis)],
              [reference.batch_norm_backward_elemt(dy, x, mean, invstd, weight, reduced[0],
                                                   reduced[1], max(count, 1), axis=axis)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("shape,axis", [case for case in CASES if len(case[0]) > 2])
def test_group_and_instance_norm_axis(shape, axis, affine, dtype):
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=7)
    c = shape[axis]
    weight, bias = channel_params(c, dtype, affine)
    if x.size == 0 and shape[0] * c > 0:
        # Empty groups: the reference's 0/0 statistics are nan, the kernels' 0 and
        # 1/sqrt(eps); channels last gives what channels first gives.
        check_empty_groups(x, axis, weight, bias, dtype)
        return
    for groups in sorted({g for g in (1, c) if g}):
        result = bncpu.group_norm_forward(x, groups, weight, bias, 1e-5, axis=axis)
        close_all(result, reference.group_norm_forward(x, groups, weight, bias, 1e-5, axis=axis),
                  dtype)
        close_all(bncpu.group_norm_backward(dy, x, groups, result[1], result[2], weight,
                                            axis=axis),
                  reference.group_norm_backward(dy, x, groups, result[1], result[2], weight,
                                                axis=axis), dtype)
    if x.size // max(c, 1) // max(shape[0], 1) > 1 or x.size == 0:
        running = running_stats(c, dtype)
        expected_running = [r.astype(np.float64) for r in running]
        result = bncpu.instance_norm_forward(x, weight, bias, *running, True, 0.3, 1e-5,
                                             axis=axis)
        close_all(result, reference.instance_norm_forward(x, weight, bias, *expected_running,
                                                          True, 0.3, 1e-5, axis=axis), dtype)
        close_all(running, expected_running, dtype)
        close_all(bncpu.instance_norm_backward(dy, x, result[1], result[2], weight, axis=axis),
                  reference.instance_norm_backward(dy, x, result[1], result[2], weight,
                                                   axis=axis), dtype)
        close_all([bncpu.instance_norm(x, *running, weight, bias, use_input_stats=False,
                                       axis=axis)],
                  [reference.instance_norm(x, *running, weight, bias, use_input_stats=False,
                                           axis=axis)], dtype)


def check_empty_groups(x, axis, weight, bias, dtype):
    c = x.shape[axis]
    for groups in (1, c):
        last = bncpu.group_norm_forward(x, groups, weight, bias, 1e-5, axis=axis)
        channels_first = bncpu.group_norm_forward(first(x, axis), groups, weight, bias, 1e-5)
        close_all([first(last[0], axis)] + list(last[1:]), channels_first, dtype)
    last = bncpu.instance_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5, axis=axis)
    channels_first = bncpu.instance_norm_forward(first(x, axis), weight, bias, None, None, True,
                                                 0.1, 1e-5)
    close_all([first(last[0], axis)] + list(last[1:]), channels_first, dtype)


# ----------------------------------------------------------------------------------
# Bit for bit where the arithmetic is the same
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (2, 3, 2, 4, 5), (8, 9, 9, 64)])
def test_channels_last_batch_norm_is_the_2d_kernel(shape, dtype):
    """(N, *spatial, C) with axis=-1 is the (N·S, C) matrix: the same bits as that 2-D call."""
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=3)
    c = shape[-1]
    weight, bias = channel_params(c, dtype)
    matrix, dy_matrix = x.reshape(-1, c), dy.reshape(-1, c)
    last_stats, flat_stats = running_stats(c, dtype), running_stats(c, dtype)
    last = bncpu.batch_norm_forward(x, weight, bias, *last_stats, True, 0.1, 1e-5, axis=-1)
    flat = bncpu.batch_norm_forward(matrix, weight, bias, *flat_stats, True, 0.1, 1e-5)
    assert_all_bitwise_equal([last[0].reshape(-1, c), *last[1:], *last_stats],
                             [*flat, *flat_stats])
    assert_all_bitwise_equal(
        [r.reshape(-1, c) if r.ndim > 1 else r for r in bncpu.batch_norm_backward(
            dy, x, weight, None, None, last[1], last[2], True, 1e-5, axis=-1)],
        bncpu.batch_norm_backward(dy_matrix, matrix, weight, None, None, flat[1], flat[2], True,
                                  1e-5))
    assert_bitwise_equal(
        bncpu.batch_norm(x, *last_stats, weight, bias, axis=-1).reshape(-1, c),
        bncpu.batch_norm(matrix, *flat_stats, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
def test_axis_minus_one_of_2d_input_is_axis_one(dtype):
    x = random_input((9, 5), dtype)
    weight, bias = channel_params(5, dtype)
    assert_all_bitwise_equal(
        bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5, axis=-1),
        bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5))
    assert_all_bitwise_equal(bncpu.group_norm_forward(x, 5, weight, bias, 1e-5, axis=-1),
                             bncpu.group_norm_forward(x, 5, weight, bias, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_channels_last_group_norm_is_the_channels_first_one(groups, dtype):
    """Group norm channels last (its own kernel, sums in another order; bit for bit in
    tests/test_group_norm_channels_last.py where the arithmetic is the same) gives the
    channels-first results to rounding."""
    x = random_input((3, 5, 7, 8), dtype)
    dy = random_input(x.shape, dtype, seed=4)
    weight, bias = channel_params(8, dtype)
    last = bncpu.group_norm_forward(x, groups, weight, bias, 1e-5, axis=-1)
    ref = bncpu.group_norm_forward(first(x, -1), groups, weight, bias, 1e-5)
    close_all([first(last[0], -1)] + list(last[1:]), ref, dtype)
    grads = bncpu.group_norm_backward(dy, x, groups, last[1], last[2], weight, axis=-1)
    ref_grads = bncpu.group_norm_backward(first(dy, -1), first(x, -1), groups, last[1], last[2],
                                          weight)
    close_all([first(grads[0], -1)] + list(grads[1:]), ref_grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_instance_norm_is_batch_norm_per_sample(dtype):
    x = random_input((3, 6, 5, 4), dtype)
    weight, bias = channel_params(4, dtype)
    output, mean, rstd = bncpu.instance_norm_forward(x, weight, bias, None, None, True, 0.1,
                                                     1e-5, axis=-1)
    for i in range(3):
        y, m, s = bncpu.batch_norm_forward(x[i], weight, bias, None, None, True, 0.1, 1e-5,
                                           axis=-1)
        assert_all_bitwise_equal([output[i], mean[i], rstd[i]], [y, m, s])


@pytest.mark.parametrize("function", ["batch_norm", "group_norm", "instance_norm"])
def test_channels_last_results_do_not_depend_on_thread_count(function):
    x = random_input((16, 12, 12, 32), np.float32)
    dy = random_input(x.shape, np.float32, seed=1)
    weight, bias = channel_params(32, np.float32)

    def run():
        if function == "batch_norm":
            y, m, s = bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5,
                                               axis=-1)
            return [y, m, s, *bncpu.batch_norm_backward(dy, x, weight, None, None, m, s, True,
                                                        1e-5, axis=-1)]
        forward = getattr(bncpu, function + "_forward")
        backward = getattr(bncpu, function + "_backward")
        if function == "group_norm":
            y, m, s = forward(x, 4, weight, bias, 1e-5, axis=-1)
            return [y, m, s, *backward(dy, x, 4, m, s, weight, axis=-1)]
        y, m, s = forward(x, weight, bias, None, None, True, 0.1, 1e-5, axis=-1)
        return [y, m, s, *backward(dy, x, m, s, weight, axis=-1)]

    with num_threads(1):
        single = run()
    with num_threads(2):
        assert_all_bitwise_equal(run(), single)


# ----------------------------------------------------------------------------------
# Against torch on the permuted data
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_channels_last_against_torch(torch, dtype):
    x = random_input((4, 6, 5, 8), dtype)           # (N, H, W, C)
    dy = random_input(x.shape, dtype, seed=2)
    weight, bias = channel_params(8, dtype)
    running = running_stats(8, dtype)
    t_running = [torch.tensor(r) for r in running]
    xt = torch.tensor(first(x, -1)).contiguous(memory_format=torch.channels_last)
    xt.requires_grad_(True)
    wt, bt = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, *t_running, wt, bt, True, 0.1, 1e-5)
    yt.backward(torch.tensor(first(dy, -1)))
    y, mean, invstd = bncpu.batch_norm_forward(x, weight, bias, *running, True, 0.1, 1e-5,
                                               axis=-1)
    grads = bncpu.batch_norm_backward(dy, x, weight, None, None, mean, invstd, True, 1e-5,
                                      axis=-1)
    assert_close(y, back(yt.detach().numpy(), -1), dtype)
    assert_close(grads[0], back(xt.grad.numpy(), -1), dtype)
    assert_close(grads[1], wt.grad.numpy(), dtype)
    assert_close(grads[2], bt.grad.numpy(), dtype)
    for ours, theirs in zip(running, t_running):
        assert_close(ours, theirs.numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 3, 12])
def test_group_and_instance_norm_channels_last_against_torch(torch, groups, dtype):
    x = random_input((3, 5, 4, 12), dtype)
    dy = random_input(x.shape, dtype, seed=2)
    weight, bias = channel_params(12, dtype)
    xt = torch.tensor(first(x, -1), requires_grad=True)
    wt, bt = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    yt = torch.nn.functional.group_norm(xt, groups, wt, bt, 1e-5)
    yt.backward(torch.tensor(first(dy, -1)))
    y, mean, rstd = bncpu.group_norm_forward(x, groups, weight, bias, 1e-5, axis=-1)
    grads = bncpu.group_norm_backward(dy, x, groups, mean, rstd, weight, axis=-1)
    assert_close(y, back(yt.detach().numpy(), -1), dtype)
    close_all(grads, [back(xt.grad.numpy(), -1), wt.grad.numpy(), bt.grad.numpy()], dtype)
    if groups == 12:
        running, t_running = running_stats(12, dtype), [torch.tensor(r) for r in running_stats(12, dtype)]
        yt = torch.nn.functional.instance_norm(torch.tensor(first(x, -1)), *t_running,
                                               torch.tensor(weight), torch.tensor(bias), True,
                                               0.1, 1e-5)
        y = bncpu.instance_norm(x, *running, weight, bias, True, 0.1, 1e-5, axis=-1)
        assert_close(y, back(yt.numpy(), -1), dtype)
        close_all(running, [r.numpy() for r in t_running], dtype)


# ----------------------------------------------------------------------------------
# Layout of the results, out=, errors
# ----------------------------------------------------------------------------------
def test_outputs_keep_the_input_layout_and_honour_out():
    x = random_input((3, 4, 5, 6), np.float32)
    weight, bias = channel_params(6, np.float32)
    expected = bncpu.batch_norm(x, None, None, weight, bias, training=True, axis=-1)
    out = np.empty_like(x)
    assert bncpu.batch_norm(x, None, None, weight, bias, training=True, out=out, axis=-1) is out
    assert_bitwise_equal(out, expected)
    in_place = x.copy()
    bncpu.batch_norm(in_place, None, None, weight, bias, training=True, out=in_place, axis=-1)
    assert_bitwise_equal(in_place, expected)
    fortran = np.asfortranarray(x)      # any layout of the input gives the same numbers
    assert_bitwise_equal(bncpu.batch_norm(fortran, None, None, weight, bias, training=True,
                                          axis=-1), expected)
    grouped = bncpu.group_norm(x, 2, weight, bias, axis=-1)
    out = np.empty_like(x)
    assert bncpu.group_norm(x, 2, weight, bias, out=out, axis=-1) is out
    assert_bitwise_equal(out, grouped)
    in_place = x.copy()
    bncpu.group_norm(in_place, 2, weight, bias, out=in_place, axis=-1)
    assert_bitwise_equal(in_place, grouped)
    instance = bncpu.instance_norm(x, weight=weight, bias=bias, axis=-1)
    in_place = x.copy()
    bncpu.instance_norm(in_place, weight=weight, bias=bias, out=in_place, axis=-1)
    assert_bitwise_equal(in_place, instance)


@pytest.mark.parametrize("function,args", [
    ("batch_norm", (None, None, None, None, True)), ("batch_norm_stats", ()),
    ("group_norm", (2,)), ("instance_norm", ())])
def test_axis_errors(function, args):
    x = np.ones((2, 4, 3), np.float32)
    fast, slow = getattr(bncpu, function), getattr(reference, function)
    for bad in (3, -4):
        for implementation in (fast, slow):
            with pytest.raises(ValueError, match="out of bounds"):
                implementation(x, *args, axis=bad)
    with pytest.raises(TypeError, match="axis must be an integer"):
        fast(x, *args, axis=1.0)
    if function in ("group_norm", "instance_norm"):
        for implementation in (fast, slow):
            with pytest.raises(ValueError, match="batch axis"):
                implementation(x, *args, axis=0)
            with pytest.raises(ValueError, match="batch axis"):
                implementation(x, *args, axis=-3)


def test_errors_write_nothing_in_channels_last_training():
    x = random_input((2, 3, 4), np.float32)
    running_mean, running_var = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="weight should contain 4 elements not 3"):
        bncpu.batch_norm(x, running_mean, running_var, np.ones(3, np.float32), training=True,
                         axis=-1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bncpu.batch_norm(np.ones((1, 1, 4), np.float32), running_mean, running_var,
                         training=True, axis=-1)
    assert (running_mean == 0).all() and (running_var == 1).all()
