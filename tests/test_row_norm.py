"""bncpu's layer, group, instance and RMS norm against bncpu.reference (the float64 NumPy
twin), against central finite differences, against a float64 ground truth on hard data,
for thread-count invariance and bad input, and against PyTorch when it is importable."""
import re

import numpy as np
import pytest

import bncpu
from bncpu import reference as ref
from conftest import (central_differences, AFFINE, DTYPES, LAYOUTS, assert_all_bitwise_equal, assert_bitwise_equal,
                      assert_close, num_threads, random_input, running_stats, to_torch)

EPS = 1e-5
MOMENTUM = 0.1


# ----------------------------------------------------------------------------------
# The four normalizations, called the same way on bncpu and on the reference
# ----------------------------------------------------------------------------------
class Norm:
    """One normalization. ``arg`` is what it needs besides the input (normalized_shape,
    num_groups, or None for instance norm); ``forward(lib, x, arg, w, b)`` returns
    (output, *statistics) and ``backward(lib, dy, x, arg, stats, w)`` the gradients of
    the input and of the parameters; ``lib`` is bncpu or bncpu.reference, and keyword
    arguments (out=) go to bncpu only."""

    def __init__(self, param_shape, forward, backward, has_bias=True, centered=True):
        self.param_shape = param_shape
        self.forward = forward
        self.backward = backward
        self.has_bias = has_bias
        self.centered = centered

    def params(self, shape, arg, dtype, affine, seed=1):
        """(weight, bias) of the right shape, each None unless ``affine`` asks for it."""
        rng = np.random.default_rng(seed)
        has_weight, has_bias = AFFINE[affine]
        param_shape = self.param_shape(shape, arg)
        weight = rng.uniform(0.5, 1.5, size=param_shape).astype(dtype) if has_weight else None
        bias = (rng.normal(size=param_shape).astype(dtype)
                if has_bias and self.has_bias else None)
        return weight, bias


def _trailing(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


NORMS = {
    "layer_norm": Norm(
        lambda shape, ns: _trailing(ns),
        lambda lib, x, ns, w, b, **kw: lib.layer_norm_forward(x, ns, w, b, EPS, **kw),
        lambda lib, dy, x, ns, stats, w, **kw: lib.layer_norm_backward(dy, x, ns, *stats, w, **kw)),
    "group_norm": Norm(
        lambda shape, groups: (shape[1],),
        lambda lib, x, groups, w, b, **kw: lib.group_norm_forward(x, groups, w, b, EPS, **kw),
        lambda lib, dy, x, groups, stats, w, **kw: lib.group_norm_backward(dy, x, groups, *stats, w,
                                                                           **kw)),
    "instance_norm": Norm(
        lambda shape, _: (shape[1],),
        lambda lib, x, _, w, b, **kw: lib.instance_norm_forward(x, w, b, None, None, True,
                                                                MOMENTUM, EPS, **kw),
        lambda lib, dy, x, _, stats, w, **kw: lib.instance_norm_backward(dy, x, *stats, w, **kw)),
    "rms_norm": Norm(
        lambda shape, ns: _trailing(ns),
        lambda lib, x, ns, w, b, **kw: lib.rms_norm_forward(x, ns, w, EPS, **kw),
        lambda lib, dy, x, ns, stats, w, **kw: lib.rms_norm_backward(dy, x, ns, *stats, w, **kw),
        has_bias=False, centered=False),
}

# (norm, input shape, arg): several trailing dims; normalized size 1; one channel per group
# and one value per group; a single sample; prime sizes, so that no mix-up of axes hides.
CASES = [
    ("layer_norm", (4, 3), (3,)),
    ("layer_norm", (2, 3, 5), 5),
    ("layer_norm", (2, 3, 5), (3, 5)),
    ("layer_norm", (7,), (7,)),
    ("layer_norm", (3, 1), (1,)),
    ("layer_norm", (2, 3, 4, 5), (3, 4, 5)),
    ("group_norm", (4, 6), 3),
    ("group_norm", (2, 6, 5), 2),
    ("group_norm", (3, 4, 7, 11), 4),
    ("group_norm", (2, 3, 5), 3),
    ("group_norm", (2, 4, 1), 4),
    ("group_norm", (1, 6, 2, 3), 1),
    ("instance_norm", (2, 3, 5), None),
    ("instance_norm", (3, 1, 4, 4), None),
    ("instance_norm", (1, 4, 2, 3, 5), None),
    ("rms_norm", (4, 3), (3,)),
    ("rms_norm", (2, 3, 5), (3, 5)),
    ("rms_norm", (3, 1), 1),
    ("rms_norm", (6,), 6),
]
CASE_IDS = [f"{name}-{shape}-{arg}" for name, shape, arg in CASES]


def backward_scales(name, x, dy, stats, weight):
    """Magnitudes the backward's rounding errors scale with: those of the terms of
    dx = rstd·(g - mean(g) - x̂·mean(g·x̂)) and of the sums Σdy·x̂, Σdy, not of the
    results, which may cancel to near 0."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    norm = NORMS[name]
    rstd = np.asarray(stats[-1], np.float64)
    mean = np.asarray(stats[0], np.float64) if norm.centered else np.zeros_like(rstd)
    if name in ("layer_norm", "rms_norm"):
        rows = (x.reshape(rstd.size, -1) - mean.reshape(-1, 1)) * rstd.reshape(-1, 1)
        xhat = rows.reshape(x.shape)
    else:
        groups = rstd.shape[1]
        grouped = x.reshape(x.shape[0], groups, -1)
        xhat = ((grouped - mean.reshape(x.shape[0], groups, 1))
                * rstd.reshape(x.shape[0], groups, 1)).reshape(x.shape)
    w = 1.0 if weight is None else np.max(np.abs(weight))
    input_scale = 3 * np.max(np.abs(dy), initial=0) * w * np.max(np.abs(rstd), initial=0) * (
        1 + np.max(np.abs(xhat), initial=0) ** 2)
    param_scale = np.sum(np.abs(dy) * (1 + np.abs(xhat)))
    return max(1.0, float(input_scale)), max(1.0, float(param_scale))


def make_inputs(name, shape, arg, dtype, affine="weight+bias", loc=0.5, scale=2.0):
    x = random_input(shape, dtype, loc=loc, scale=scale)
    dy = random_input(shape, dtype, seed=3, loc=0.2, scale=1.0)
    weight, bias = NORMS[name].params(shape, arg, dtype, affine)
    return x, dy, weight, bias


# ----------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("name, shape, arg", CASES, ids=CASE_IDS)
def test_forward_matches_reference(name, shape, arg, affine, dtype):
    x, _, weight, bias = make_inputs(name, shape, arg, dtype, affine)
    norm = NORMS[name]
    results = norm.forward(bncpu, x, arg, weight, bias)
    expected = norm.forward(ref, x, arg, weight, bias)
    assert len(results) == len(expected)
    for result, expected_result in zip(results, expected):
        assert result.dtype == dtype
        assert result.shape == expected_result.shape
        assert_close(result, expected_result, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("name, shape, arg", CASES, ids=CASE_IDS)
def test_backward_matches_reference(name, shape, arg, has_weight, dtype):
    x, dy, weight, bias = make_inputs(name, shape, arg, dtype,
                                      "weight+bias" if has_weight else "none")
    norm = NORMS[name]
    stats = norm.forward(bncpu, x, arg, weight, bias)[1:]
    grads = norm.backward(bncpu, dy, x, arg, stats, weight)
    expected = norm.backward(ref, dy, x, arg, stats, weight)
    input_scale, param_scale = backward_scales(name, x, dy, stats, weight)
    assert len(grads) == len(expected)
    assert grads[0].dtype == dtype
    assert_close(grads[0], expected[0], dtype, scale=input_scale)
    for grad, expected_grad in zip(grads[1:], expected[1:]):
        if weight is None:
            assert grad is None and expected_grad is None
        else:
            assert grad.dtype == dtype and grad.shape == weight.shape
            assert_close(grad, expected_grad, dtype, scale=param_scale)


FINITE_DIFFERENCE_CASES = [
    ("layer_norm", (3, 4), (4,)), ("layer_norm", (2, 2, 3), (2, 3)), ("group_norm", (2, 4, 3), 2),
    ("group_norm", (2, 6), 3), ("instance_norm", (2, 3, 4), None), ("rms_norm", (3, 5), 5),
    ("rms_norm", (2, 2, 3), (2, 3)),
]


@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("name, shape, arg", FINITE_DIFFERENCE_CASES,
                         ids=[f"{n}-{s}-{a}" for n, s, a in FINITE_DIFFERENCE_CASES])
def test_backward_matches_finite_differences(name, shape, arg, has_weight):
    """The gradient of the scalar loss L = Σ y·g, y = norm(x, weight, bias)."""
    norm = NORMS[name]
    x = random_input(shape, seed=5)
    g = random_input(shape, seed=6, loc=0.0, scale=1.0)
    weight, bias = norm.params(shape, arg, np.float64, "weight+bias")
    weight = weight if has_weight else None

    def loss():
        return float(np.sum(norm.forward(bncpu, x, arg, weight, bias)[0] * g))

    stats = norm.forward(bncpu, x, arg, weight, bias)[1:]
    grads = norm.backward(bncpu, g, x, arg, stats, weight)
    tolerance = dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads[0], central_differences(loss, x), **tolerance)
    if has_weight:
        np.testing.assert_allclose(grads[1], central_differences(loss, weight), **tolerance)
        if bias is not None:
            np.testing.assert_allclose(grads[2], central_differences(loss, bias), **tolerance)
    else:
        assert all(grad is None for grad in grads[1:])


def test_public_functions_are_their_forwards_output():
    x, _, weight, bias = make_inputs("group_norm", (3, 4, 5), 2, np.float32)
    layer_weight = np.outer(weight, np.ones(5, np.float32))
    assert_bitwise_equal(bncpu.layer_norm(x, (4, 5), layer_weight),
                         bncpu.layer_norm_forward(x, (4, 5), layer_weight, None, 1e-5)[0])
    assert_bitwise_equal(bncpu.group_norm(x, 2, weight, bias),
                         bncpu.group_norm_forward(x, 2, weight, bias, 1e-5)[0])
    assert_bitwise_equal(bncpu.instance_norm(x, weight=weight, bias=bias),
                         bncpu.instance_norm_forward(x, weight, bias, None, None, True, 0.1,
                                                     1e-5)[0])
    # eps=None is the dtype's machine epsilon.
    assert_bitwise_equal(bncpu.rms_norm(x, 5), bncpu.rms_norm_forward(
        x, (5,), None, float(np.finfo(np.float32).eps))[0])
    assert_bitwise_equal(bncpu.rms_norm(x.astype(np.float64), 5), bncpu.rms_norm_forward(
        x.astype(np.float64), (5,), None, float(np.finfo(np.float64).eps))[0])


def test_statistics_shapes_follow_torch():
    x = random_input((2, 3, 4, 5))
    assert [a.shape for a in bncpu.layer_norm_forward(x, (4, 5), None, None, EPS)] == [
        x.shape, (2, 3), (2, 3)]
    assert [a.shape for a in bncpu.group_norm_forward(x, 3, None, None, EPS)] == [
        x.shape, (2, 3), (2, 3)]
    assert [a.shape for a in bncpu.instance_norm_forward(x, None, None, None, None, True, 0.1,
                                                         EPS)] == [x.shape, (2, 3), (2, 3)]
    assert [a.shape for a in bncpu.rms_norm_forward(x, 5, None, None)] == [x.shape, (2, 3, 4)]
    # The backward also takes PyTorch's statistics, which keep the normalized dims as 1s.
    _, mean, rstd = bncpu.layer_norm_forward(x, (4, 5), None, None, EPS)
    dy = random_input(x.shape, seed=3)
    assert_bitwise_equal(bncpu.layer_norm_backward(dy, x, (4, 5), mean, rstd, None)[0],
                         bncpu.layer_norm_backward(dy, x, (4, 5), mean[..., None, None],
                                                   rstd[..., None, None], None)[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_memory_layout_gives_the_same_results(layout):
    x, dy, weight, bias = make_inputs("layer_norm", (4, 6, 5), (6, 5), np.float32)
    for name, arg in (("layer_norm", (6, 5)), ("group_norm", 3), ("instance_norm", None),
                      ("rms_norm", 5)):
        norm = NORMS[name]
        w, b = norm.params(x.shape, arg, np.float32, "weight+bias")
        expected = norm.forward(bncpu, x, arg, w, b)
        results = norm.forward(bncpu, LAYOUTS[layout](x), arg, w, b)
        assert_all_bitwise_equal(results, expected)
        assert_all_bitwise_equal(
            norm.backward(bncpu, LAYOUTS[layout](dy), LAYOUTS[layout](x), arg, expected[1:], w),
            norm.backward(bncpu, dy, x, arg, expected[1:], w))


@pytest.mark.parametrize("input_dtype", [np.bool_, np.int32, np.uint8])
def test_integer_and_bool_input_give_float64(input_dtype):
    x = np.random.default_rng(0).integers(0, 2 if input_dtype is np.bool_ else 50,
                                          size=(4, 6, 3)).astype(input_dtype)
    for name, arg in (("layer_norm", (6, 3)), ("group_norm", 2), ("instance_norm", None),
                      ("rms_norm", 3)):
        results = NORMS[name].forward(bncpu, x, arg, None, None)
        expected = NORMS[name].forward(bncpu, x.astype(np.float64), arg, None, None)
        assert_all_bitwise_equal(results, expected)


def test_float16_is_computed_as_float32_with_float32_eps_for_rms_norm():
    x = random_input((3, 8), np.float16)
    assert_bitwise_equal(bncpu.layer_norm(x, 8), bncpu.layer_norm(x.astype(np.float32), 8))
    assert_bitwise_equal(bncpu.rms_norm(x, 8), bncpu.rms_norm(x.astype(np.float32), 8))


def test_array_likes_are_accepted():
    x = random_input((3, 4)).tolist()
    assert_bitwise_equal(bncpu.layer_norm(x, [4], [1.0, 2.0, 3.0, 4.0], (0.0, 0.5, 1.0, 1.5)),
                         bncpu.layer_norm(np.array(x), (4,), np.array([1.0, 2.0, 3.0, 4.0]),
                                          np.array([0.0, 0.5, 1.0, 1.5])))
    assert_bitwise_equal(bncpu.group_norm(x, np.int64(2)), bncpu.group_norm(np.array(x), 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_inputs(dtype):
    # No rows: empty results.
    output, mean, rstd = bncpu.layer_norm_forward(np.zeros((0, 5), dtype), 5, None, None, EPS)
    assert output.shape == (0, 5) and mean.shape == rstd.shape == (0,)
    grads = bncpu.group_norm_backward(np.zeros((0, 4, 3), dtype), np.zeros((0, 4, 3), dtype), 2,
                                      np.zeros((0, 2)), np.zeros((0, 2)), np.ones(4, dtype))
    assert grads[0].shape == (0, 4, 3)
    assert_all_bitwise_equal(grads[1:], (np.zeros(4, dtype), np.zeros(4, dtype)))
    # Rows of no values: mean 0 and rstd NaN, as in PyTorch.
    output, mean, rstd = bncpu.group_norm_forward(np.zeros((2, 4, 0), dtype), 2, None, None, EPS)
    assert output.shape == (2, 4, 0)
    assert (mean == 0).all() and np.isnan(rstd).all()
    # An empty batch leaves the running statistics of instance norm unchanged.
    running = running_stats(3, dtype)
    expected = tuple(s.copy() for s in running)
    bncpu.instance_norm(np.zeros((0, 3, 4), dtype), *running)
    assert_all_bitwise_equal(running, expected)


def test_nan_stays_in_its_row():
    x = random_input((4, 6, 5))
    x[1, 2, 3] = np.nan
    # Group 1 of sample 1 (channels 2 and 3) holds the NaN; no other group sees it.
    nan_groups = np.isnan(bncpu.group_norm(x, 3).reshape(4, 3, 10))
    assert nan_groups[1, 1].all() and nan_groups.sum() == 10
    output = bncpu.layer_norm(x, (6, 5))
    assert np.isnan(output[1]).all() and not np.isnan(output[[0, 2, 3]]).any()


# ----------------------------------------------------------------------------------
# Instance norm's running statistics and evaluation mode
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 2, 3, 3), (1, 3, 2)])
def test_instance_norm_running_stats_over_several_steps(shape, dtype, momentum):
    running = running_stats(shape[1], dtype)
    ref_running = tuple(s.astype(np.float64) for s in running)
    initial = tuple(s.copy() for s in running)
    for step in range(4):
        x = random_input(shape, dtype, seed=10 + step, loc=step, scale=1.0 + step)
        bncpu.instance_norm(x, *running, momentum=momentum)
        ref.instance_norm(x, *ref_running, momentum=momentum)
        for ours, expected in zip(running, ref_running):
            assert_close(ours, expected, dtype)
    if momentum == 0.0:
        assert_all_bitwise_equal(running, initial)
    x = random_input(shape, dtype, seed=99)
    assert_close(bncpu.instance_norm(x, *running, use_input_stats=False),
                 ref.instance_norm(x, *ref_running, use_input_stats=False), dtype)
    results = bncpu.instance_norm_forward(x, None, None, *running, False, MOMENTUM, EPS)
    assert results[1].shape == results[2].shape == (0,)


# ----------------------------------------------------------------------------------
# out= and in place
# ----------------------------------------------------------------------------------
OUT_CASES = [("layer_norm", (5, 3, 7), (3, 7)), ("group_norm", (5, 6, 7), 3),
             ("instance_norm", (5, 3, 7), None), ("rms_norm", (5, 3, 7), 7)]


def out_calls(name, arg, dtype):
    """{label: call(out) -> the result written to out} for the forward and the backward."""
    shape = dict((n, s) for n, s, _ in OUT_CASES)[name]
    norm = NORMS[name]
    x, dy, weight, bias = make_inputs(name, shape, arg, dtype)
    stats = norm.forward(bncpu, x, arg, weight, bias)[1:]
    return x, dy, {
        "forward": lambda out: norm.forward(bncpu, x, arg, weight, bias, out=out)[0],
        "backward": lambda out: norm.backward(bncpu, dy, x, arg, stats, weight, out=out)[0],
    }


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, arg", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_out_receives_the_result_and_is_returned(name, shape, arg, dtype, direction):
    x, _, calls = out_calls(name, arg, dtype)
    call = calls[direction]
    expected = call(None)
    for out in (np.full_like(x, 7.0), np.full(x.shape, 7.0, dtype, order="F")):
        assert call(out) is out
        assert_bitwise_equal(out, expected)
    buffer = np.full(x.shape[:-1] + (2 * x.shape[-1],), 7.0, dtype)
    out = buffer[..., ::2]
    assert call(out) is out
    assert_bitwise_equal(out, expected)
    assert (buffer[..., 1::2] == 7.0).all()
    other = np.float64 if dtype == np.float32 else np.float32
    out = np.zeros(x.shape, other)
    assert call(out) is out
    assert_bitwise_equal(out, expected.astype(other))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, arg", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_in_place(name, shape, arg, dtype):
    x, dy, calls = out_calls(name, arg, dtype)
    expected_forward = calls["forward"](None)
    expected_backward = calls["backward"](None)
    x_copy, dy_copy = x.copy(), dy.copy()
    # Backward into grad_output, then into input, then the forward into input.
    assert calls["backward"](dy) is dy
    assert_bitwise_equal(dy, expected_backward)
    dy[...] = dy_copy
    assert calls["backward"](x) is x
    assert_bitwise_equal(x, expected_backward)
    x[...] = x_copy
    assert calls["forward"](x) is x
    assert_bitwise_equal(x, expected_forward)


# ----------------------------------------------------------------------------------
# Threads: bitwise the same results for 1, 2 and 3 threads, in row mode and in piece
# mode (fewer rows than twice the threads, cut into pieces spread over the threads)
# ----------------------------------------------------------------------------------
THREAD_CASES = [
    ("layer_norm", (300, 1024), 1024),          # many rows
    ("layer_norm", (2, 150_001), 150_001),      # fewer rows than 2 threads x 2: pieces
    ("layer_norm", (3, 7, 10_000), (7, 10_000)),
    ("layer_norm", (70, 17_000), 17_000),       # groups of many rows of two pieces
    ("layer_norm", (7, 100_001), 100_001),      # two groups of rows, a short last run
    ("layer_norm", (130, 2_000), 2_000),        # blocks of rows of one piece
    ("rms_norm", (2, 150_001), 150_001),
    ("rms_norm", (96, 2048), 2048),
    ("group_norm", (1, 4, 40_000), 2),          # channels of more than one piece
    ("group_norm", (1, 12, 3, 2_000), 3),       # pieces of whole channels
    ("group_norm", (1, 80_000, 1), 2),          # one value per channel, long rows
    ("group_norm", (5, 60_000, 1), 3),          # ... of several groups and samples
    ("group_norm", (64, 32, 64), 8),
    ("group_norm", (40, 4, 9_000), 2),
    ("instance_norm", (1, 2, 70_000), None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, arg", THREAD_CASES,
                         ids=[f"{n}-{s}" for n, s, _ in THREAD_CASES])
def test_results_do_not_depend_on_the_number_of_threads(name, shape, arg, dtype):
    norm = NORMS[name]
    x, dy, weight, bias = make_inputs(name, shape, arg, dtype, loc=100.0, scale=1.0)

    def run():
        results = norm.forward(bncpu, x, arg, weight, bias)
        return results + tuple(norm.backward(bncpu, dy, x, arg, results[1:], weight))

    with num_threads(1):
        single = run()
    for n_threads in (2, 3):
        with num_threads(n_threads):
            assert_all_bitwise_equal(run(), single)


# ----------------------------------------------------------------------------------
# Bad input: a clear error, and nothing written
# ----------------------------------------------------------------------------------
def _x(shape, dtype=np.float64):
    return random_input(shape, dtype)


BAD_CALLS = {
    "normalized_shape-mismatch": (
        (2, 3, 5), lambda x, out: bncpu.layer_norm(x, (3, 4), out=out), ValueError,
        re.escape("Given normalized_shape=[3, 4], expected input with shape [*, 3, 4], "
                  "but got input of size [2, 3, 5]")),
    "normalized_shape-too-long": (
        (3, 5), lambda x, out: bncpu.rms_norm(x, (2, 3, 5), out=out), ValueError,
        "Given normalized_shape"),
    "normalized_shape-empty": (
        (3, 5), lambda x, out: bncpu.layer_norm(x, (), out=out), ValueError, "at least 1-dim"),
    "normalized_shape-float": (
        (3, 5), lambda x, out: bncpu.layer_norm(x, 5.0, out=out), TypeError, "normalized_shape"),
    "layer-weight-shape": (
        (2, 3), lambda x, out: bncpu.layer_norm(x, 3, np.ones(4), out=out), ValueError,
        re.escape("Expected weight to be of same shape as normalized_shape, but got weight of "
                  "shape [4] and normalized_shape = [3]")),
    "layer-bias-shape": (
        (2, 3), lambda x, out: bncpu.layer_norm(x, 3, None, np.ones((1, 3)), out=out), ValueError,
        "bias"),
    "rms-weight-shape": (
        (2, 3), lambda x, out: bncpu.rms_norm(x, 3, np.ones(2), out=out), ValueError, "weight"),
    "groups-not-dividing": (
        (2, 6, 4), lambda x, out: bncpu.group_norm(x, 4, out=out), ValueError,
        re.escape("Expected number of channels in input to be divisible by num_groups, but got "
                  "input of shape [2, 6, 4] and num_groups=4")),
    "groups-zero": ((2, 6, 4), lambda x, out: bncpu.group_norm(x, 0, out=out), ValueError,
                    "num_groups"),
    "groups-float": ((2, 6, 4), lambda x, out: bncpu.group_norm(x, 2.0, out=out), TypeError,
                     "num_groups"),
    "group-input-1d": ((6,), lambda x, out: bncpu.group_norm(x, 2, out=out), ValueError,
                       "at least 2 dimensions"),
    "group-weight-length": (
        (2, 6, 4), lambda x, out: bncpu.group_norm(x, 2, np.ones(5), out=out), ValueError,
        "weight should contain 6 elements not 5"),
    "group-bias-2d": (
        (2, 6, 4), lambda x, out: bncpu.group_norm(x, 2, None, np.ones((6, 1)), out=out),
        ValueError, "bias"),
    "instance-one-spatial-value": (
        (2, 3, 1), lambda x, out: bncpu.instance_norm(x, out=out), ValueError,
        re.escape("Expected more than 1 spatial element when training, got input size (2, 3, 1)")),
    "instance-2d": ((2, 3), lambda x, out: bncpu.instance_norm(x, out=out), ValueError,
                    "Expected more than 1 spatial element"),
    "instance-weight-length": (
        (2, 3, 4), lambda x, out: bncpu.instance_norm(x, weight=np.ones(2), out=out), ValueError,
        "weight should contain 3 elements not 2"),
    "instance-momentum": (
        (2, 3, 4), lambda x, out: bncpu.instance_norm(x, *running_stats(3), momentum=1.5, out=out),
        ValueError, "momentum"),
    "instance-eval-without-stats": (
        (2, 3, 4), lambda x, out: bncpu.instance_norm(x, use_input_stats=False, out=out),
        ValueError, "running_mean and running_var"),
    "eps-negative": ((2, 3), lambda x, out: bncpu.layer_norm(x, 3, eps=-1.0, out=out),
                     ValueError, "eps"),
    "eps-nan": ((2, 6, 4), lambda x, out: bncpu.group_norm(x, 2, eps=np.nan, out=out),
                ValueError, "eps"),
    "eps-string": ((2, 3), lambda x, out: bncpu.rms_norm(x, 3, eps="1e-5", out=out), TypeError,
                   "eps"),
    "complex-input": ((2, 3), lambda x, out: bncpu.layer_norm(x.astype(complex), 3, out=out),
                      TypeError, "complex128"),
    "out-wrong-shape": ((2, 3), lambda x, out: bncpu.layer_norm(x, 3, out=out[:1]), ValueError,
                        "out has shape"),
    "out-int": ((2, 3), lambda x, out: bncpu.layer_norm(x, 3, out=out.view(np.int64)), TypeError,
                "same_kind"),
    "out-list": ((2, 3), lambda x, out: bncpu.layer_norm(x, 3, out=[[0.0] * 3] * 2), TypeError,
                 "ndarray"),
    "backward-grad-shape": (
        (2, 3), lambda x, out: bncpu.layer_norm_backward(x[:, :2], x, 3, np.zeros(2), np.ones(2),
                                                         None, out=out), ValueError,
        "grad_output has shape"),
    "backward-mean-shape": (
        (2, 3), lambda x, out: bncpu.layer_norm_backward(x, x, 3, np.zeros(3), np.ones(2), None,
                                                         out=out), ValueError, "mean has shape"),
    "backward-rstd-shape": (
        (2, 6, 4), lambda x, out: bncpu.group_norm_backward(x, x, 2, np.zeros((2, 2)),
                                                            np.ones((2, 3)), None, out=out),
        ValueError, "rstd has shape"),
    "backward-instance-stats": (
        (2, 3, 4), lambda x, out: bncpu.instance_norm_backward(x, x, np.zeros((2, 2)),
                                                               np.ones((2, 3)), None, out=out),
        ValueError, "mean has shape"),
    "backward-rms-weight": (
        (2, 3), lambda x, out: bncpu.rms_norm_backward(x, x, 3, np.ones(2), np.ones(4), out=out),
        ValueError, "weight"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_and_writes_nothing(case):
    shape, call, error, message = BAD_CALLS[case]
    x = _x(shape)
    x_before = x.copy()
    out = np.full(shape, 7.0)
    with pytest.raises(error, match=message):
        call(x, out)
    assert (out == 7.0).all()
    assert_bitwise_equal(x, x_before)


@pytest.mark.parametrize("problem", ["dtype", "read-only", "strided", "length", "list"])
def test_bad_running_stats_of_instance_norm_raise_and_write_nothing(problem):
    x = _x((2, 3, 4))
    running_mean, running_var = running_stats(3)
    if problem == "dtype":
        running_var = running_var.astype(np.float32)
    elif problem == "read-only":
        running_var.flags.writeable = False
    elif problem == "strided":
        running_var = np.repeat(running_var, 2)[::2]
    elif problem == "length":
        running_var = np.ones(4)
    else:
        running_var = running_var.tolist()
    before = running_mean.copy(), np.array(running_var)
    out = np.full(x.shape, 7.0)
    with pytest.raises((TypeError, ValueError), match="running_var"):
        bncpu.instance_norm(x, running_mean, running_var, out=out)
    assert (out == 7.0).all()
    assert_all_bitwise_equal((running_mean, np.array(running_var)), before)


# ----------------------------------------------------------------------------------
# Accuracy: float32 data whose mean is 10^4 times its spread
# ----------------------------------------------------------------------------------
HARD_CASES = [("layer_norm", (16, 4096), 4096), ("group_norm", (4, 8, 32, 32), 2),
              ("instance_norm", (4, 8, 512), None), ("layer_norm", (2, 3, 40_000), (3, 40_000))]


def hard_results(name, shape, arg, seed):
    """(float32 results, float64 truth from the same float32 values, the float32 input)."""
    x = random_input(shape, np.float32, seed=seed, loc=2000.0, scale=0.2)
    norm = NORMS[name]
    ours = norm.forward(bncpu, x, arg, None, None)
    truth = norm.forward(ref, x, arg, None, None)
    return ours, truth, x


def relative_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected) / np.abs(expected)))


@pytest.mark.parametrize("name, shape, arg", HARD_CASES, ids=[c[0] for c in HARD_CASES])
def test_float32_results_of_a_large_mean_are_accurate(name, shape, arg):
    (output, mean, rstd), (true_output, true_mean, true_rstd), _ = hard_results(name, shape, arg, 0)
    # Correctly rounded statistics are within half an ulp: 2^-24; rstd also rounds once.
    assert relative_error(mean, true_mean) <= 2.0**-24
    assert relative_error(rstd, true_rstd) <= 2.0**-23
    # Normalized values are O(1): their error is a few float32 ulps of 1.
    assert np.max(np.abs(output - true_output)) < 4 * 2.0**-23


TORCH_FORWARDS = {
    "layer_norm": lambda torch, x, arg: torch.nn.functional.layer_norm(x, _trailing(arg), eps=EPS),
    "group_norm": lambda torch, x, arg: torch.nn.functional.group_norm(x, arg, eps=EPS),
    "instance_norm": lambda torch, x, arg: torch.nn.functional.instance_norm(x, eps=EPS),
}


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("name, shape, arg", HARD_CASES, ids=[c[0] for c in HARD_CASES])
def test_float32_results_of_a_large_mean_are_no_worse_than_torch(torch, name, shape, arg, seed):
    (output, _, _), (true_output, _, _), x = hard_results(name, shape, arg, seed)
    their_output = TORCH_FORWARDS[name](torch, torch.from_numpy(x), arg).numpy()
    their_error = np.max(np.abs(their_output - true_output))
    # Two correctly rounded results may differ by rounding: an ulp of 1 is the floor.
    assert np.max(np.abs(output - true_output)) <= max(their_error, 2.0**-23)


# ----------------------------------------------------------------------------------
# Against PyTorch: forward, running statistics and autograd gradients
# ----------------------------------------------------------------------------------
def torch_call(torch, name, x, arg, weight, bias, running=(None, None)):
    functional = torch.nn.functional
    if name == "layer_norm":
        return functional.layer_norm(x, _trailing(arg), weight, bias, EPS)
    if name == "group_norm":
        return functional.group_norm(x, arg, weight, bias, EPS)
    if name == "instance_norm":
        return functional.instance_norm(x, *running, weight, bias, True, MOMENTUM, EPS)
    return functional.rms_norm(x, _trailing(arg), weight, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("name, shape, arg", CASES, ids=CASE_IDS)
def test_forward_and_gradients_match_torch(torch, name, shape, arg, affine, dtype):
    norm = NORMS[name]
    x, dy, weight, bias = make_inputs(name, shape, arg, dtype, affine)
    running = running_stats(shape[1], dtype) if name == "instance_norm" else (None, None)
    torch_running = tuple(to_torch(torch, s) for s in running)
    tensors = [to_torch(torch, a) for a in (x, weight, bias)]
    for tensor in tensors:
        if tensor is not None:
            tensor.requires_grad_(True)
    their_output = torch_call(torch, name, *tensors[:1], arg, *tensors[1:], torch_running)
    their_output.backward(to_torch(torch, dy))

    if name == "instance_norm":
        results = bncpu.instance_norm_forward(x, weight, bias, *running, True, MOMENTUM, EPS)
        for ours, theirs in zip(running, torch_running):
            assert_close(ours, theirs.numpy(), dtype)
    else:
        results = norm.forward(bncpu, x, arg, weight, bias)
    # PyTorch computes in the input's dtype: its rounding errors grow with |x|·rstd (e.g.
    # rstd = 1/sqrt(eps) for groups of one value).
    forward_scale = np.max(np.abs(x)) * np.max(results[-1]) * (
        1.0 if weight is None else np.max(np.abs(weight)))
    assert_close(results[0], their_output.detach().numpy(), dtype, scale=max(1.0, forward_scale))
    grads = norm.backward(bncpu, dy, x, arg, results[1:], weight)
    input_scale, param_scale = backward_scales(name, x, dy, results[1:], weight)
    assert_close(grads[0], tensors[0].grad.numpy(), dtype, scale=input_scale)
    if weight is not None:
        assert_close(grads[1], tensors[1].grad.numpy(), dtype, scale=param_scale)
    if weight is not None and bias is not None:
        assert_close(grads[2], tensors[2].grad.numpy(), dtype, scale=param_scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_default_eps_matches_torch(torch, dtype):
    x = random_input((4, 6), dtype, loc=0.0, scale=1e-5)
    expected = torch.nn.functional.rms_norm(to_torch(torch, x), (6,)).numpy()
    assert_close(bncpu.rms_norm(x, 6), expected, dtype)


@pytest.mark.parametrize("name, shape, arg", [("layer_norm", (3, 4), (4,)),
                                              ("group_norm", (2, 6, 3), 4),
                                              ("instance_norm", (2, 3, 1), None)])
def test_errors_agree_with_torch(torch, name, shape, arg):
    x = random_input(shape)
    with pytest.raises(Exception) as theirs:
        torch_call(torch, name, to_torch(torch, x), (5,) if name == "layer_norm" else arg,
                   None, None)
    with pytest.raises(ValueError) as ours:
        NORMS[name].forward(bncpu, x, (5,) if name == "layer_norm" else arg, None, None)
    # Same first words (PyTorch prints sizes slightly differently).
    assert str(ours.value).split(",")[0][:40] == str(theirs.value).split(",")[0][:40]
