"""Fused batch norm + (add +) ReLU and fold_batch_norm.

The fused functions are held to three oracles: the NumPy twin (bncpu.reference), PyTorch's
composition (relu(batch_norm(x) + r) and its autograd), and bncpu's own composition
(batch_norm_forward, add, relu; batch_norm_backward of the masked gradient) bit for bit.
Both layouts (channels on axis 1 and channels last), both dtypes, with and without weights
and residual, values of exactly 0 before the ReLU, NaN, out= and in place, bad input;
every work mode of the kernels at several thread counts, every instruction-set build, and
the C API entries.
"""
import subprocess

import numpy as np
import pytest

import bncpu
from bncpu import reference
from conftest import (AFFINE, DTYPES, assert_all_bitwise_equal, assert_bitwise_equal,
                      assert_close, channel_params, num_threads, random_input, running_stats,
                      runs_under_every_isa)
from test_c_api import compile_c, example_env, toolchain  # noqa: F401 (toolchain: a fixture)

EPS = 1e-5
MOMENTUM = 0.1
# 2-D, 3-D, 4-D and 5-D; a single sample and a single channel; prime sizes.
SHAPES = [(6, 3), (2, 5, 7), (3, 4, 5, 6), (1, 1, 7), (2, 3, 2, 3, 5)]
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
AXES = pytest.mark.parametrize("axis", [1, -1], ids=["channels-first", "channels-last"])


def to_layout(x, axis):
    """A channels-first array laid out for ``axis``: channels last is a C-contiguous copy
    with the channel axis moved to the end."""
    if x is None or axis == 1:
        return x
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def from_layout(x, axis):
    """Back to channels first (a view)."""
    return x if axis == 1 else np.moveaxis(x, -1, 1)


class Case:
    """Arguments of the fused functions: channels-first arrays, ``axis`` picks the layout
    the functions get."""

    def __init__(self, shape, dtype, affine="weight+bias", residual=True, axis=1, seed=0):
        c = shape[1]
        self.axis = axis
        self.x = random_input(shape, dtype, seed)
        self.weight, self.bias = channel_params(c, dtype, affine)
        self.running_mean, self.running_var = running_stats(c, dtype)
        self.residual = (random_input(shape, dtype, seed + 1, loc=0.0, scale=1.0)
                         if residual else None)
        self.dy = random_input(shape, dtype, seed + 2, loc=0.0, scale=1.0)
        self.eps = EPS

    def running(self):
        return self.running_mean.copy(), self.running_var.copy()

    def forward(self, module, training, running, **kwargs):
        """module.batch_norm_relu_forward on this case's layout."""
        return module.batch_norm_relu_forward(
            to_layout(self.x, self.axis), self.weight, self.bias, *running, training, MOMENTUM,
            self.eps, residual=to_layout(self.residual, self.axis), axis=self.axis, **kwargs)

    def backward(self, module, training, output, save_mean, save_invstd, **kwargs):
        return module.batch_norm_relu_backward(
            to_layout(self.dy, self.axis), output, to_layout(self.x, self.axis), self.weight,
            self.running_mean, self.running_var, save_mean, save_invstd, training, self.eps,
            axis=self.axis, **kwargs)


def bncpu_composition(case, training, running):
    """What the fused functions compute, from bncpu's unfused batch norm and NumPy:
    (output, save_mean, save_invstd, grad_input, grad_weight, grad_bias, grad_residual)."""
    x, axis = to_layout(case.x, case.axis), case.axis
    output, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, case.weight, case.bias, *running, training, MOMENTUM, case.eps, axis=axis)
    if case.residual is not None:
        output += to_layout(case.residual, axis)
    np.copyto(output, 0, where=output < 0)
    grad = np.where(output <= 0, 0, to_layout(case.dy, axis)).astype(x.dtype)
    grads = bncpu.batch_norm_backward(grad, x, case.weight, case.running_mean,
                                      case.running_var, save_mean, save_invstd, training,
                                      case.eps, axis=axis)
    return (output, save_mean, save_invstd) + grads + (grad,)


def torch_results(torch, case, training):
    """relu(batch_norm(x) + residual) in PyTorch, channels first, with autograd:
    ((output, grad_input, grad_weight, grad_bias, grad_residual), running statistics),
    NumPy arrays, None for what is absent."""
    def leaf(array):
        return None if array is None else torch.tensor(array, requires_grad=True)

    def numpy(tensor):
        return None if tensor is None else tensor.detach().numpy()

    x, weight, bias, residual = (leaf(a) for a in (case.x, case.weight, case.bias,
                                                   case.residual))
    running = case.running()
    y = torch.nn.functional.batch_norm(x, *map(torch.from_numpy, running), weight, bias,
                                       training, MOMENTUM, case.eps)
    if residual is not None:
        y = y + residual
    output = torch.relu(y)
    output.backward(torch.tensor(case.dy))
    results = (output, x.grad) + tuple(None if t is None else t.grad
                                       for t in (weight, bias, residual))
    return tuple(map(numpy, results)), running


# ----------------------------------------------------------------------------------
# Against PyTorch's composition and its autograd
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@AXES
@TRAINING
@pytest.mark.parametrize("shape", [(6, 3), (3, 4, 5, 6), (2, 3, 2, 3, 5)])
def test_matches_torch_composition_and_autograd(torch, shape, training, axis, affine, residual,
                                                dtype):
    case = Case(shape, dtype, affine, residual, axis)
    (expected, *expected_grads), expected_running = torch_results(torch, case, training)

    running = case.running()
    output, save_mean, save_invstd = case.forward(bncpu, training, running)
    assert output.dtype == dtype
    assert_close(from_layout(output, axis), expected, dtype)
    assert_all_close(running, expected_running, dtype)

    grads = case.backward(bncpu, training, output, save_mean, save_invstd,
                          residual_grad=residual)
    grad_input, grad_weight, grad_bias, grad_residual = grads
    assert_close(from_layout(grad_input, axis), expected_grads[0], dtype)
    assert_all_close((grad_weight, grad_bias), expected_grads[1:3], dtype)
    if residual:
        assert_close(from_layout(grad_residual, axis), expected_grads[3], dtype)
    else:
        assert grad_residual is None


def assert_all_close(actual, expected, dtype):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            assert_close(a, e, dtype)


# ----------------------------------------------------------------------------------
# Against the NumPy twin and bncpu's own composition
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("affine", list(AFFINE))
@AXES
@TRAINING
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_and_the_unfused_composition(shape, training, axis, affine, residual,
                                                       dtype):
    if training and shape[0] * np.prod(shape[2:]) == 1:
        pytest.skip("training needs more than one value per channel")
    case = Case(shape, dtype, affine, residual, axis)
    composed = bncpu_composition(case, training, running := case.running())

    ours_running = case.running()
    output, save_mean, save_invstd = case.forward(bncpu, training, ours_running)
    grads = case.backward(bncpu, training, output, save_mean, save_invstd,
                          residual_grad=residual)
    ours = (output, save_mean, save_invstd) + grads
    assert_all_bitwise_equal(ours, composed if residual else composed[:6] + (None,))
    assert_all_bitwise_equal(ours_running, running)

    ref_running = [r.astype(np.float64) for r in case.running()]
    ref = case.forward(reference, training, ref_running)
    assert_close(output, ref[0], dtype)
    assert_all_close(ours_running, ref_running, dtype)
    # The same output into both backwards: the masks agree even where rounding decides
    # the sign of a value near 0.
    ref_grads = case.backward(reference, training, output, *ref[1:], residual_grad=residual)
    scale = max(1.0, float(np.abs(ref_grads[0]).max()))
    assert_close(grads[0], ref_grads[0], dtype, scale=scale)
    assert_all_close(grads[1:], ref_grads[1:], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@TRAINING
def test_batch_norm_relu_is_the_output_of_the_forward(dtype, training):
    case = Case((4, 3, 5), dtype)
    running = case.running()
    expected = bncpu.batch_norm_relu_forward(case.x, case.weight, case.bias, *running, training,
                                             MOMENTUM, EPS, residual=case.residual)[0]
    ours_running = case.running()
    output = bncpu.batch_norm_relu(case.x, *ours_running, case.weight, case.bias, training,
                                   MOMENTUM, EPS, residual=case.residual)
    assert_bitwise_equal(output, expected)
    assert_all_bitwise_equal(ours_running, running)
    assert_bitwise_equal(reference.batch_norm_relu(case.x, *case.running(), case.weight,
                                                   case.bias, training, MOMENTUM, EPS,
                                                   residual=case.residual),
                         reference.batch_norm_relu_forward(case.x, case.weight, case.bias,
                                                           *case.running(), training, MOMENTUM,
                                                           EPS, residual=case.residual)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@AXES
@pytest.mark.parametrize("unbiased", [True, False])
def test_unbiased_running_var_as_in_batch_norm(unbiased, axis, dtype):
    """The running variance follows the unbiased or the biased batch variance, as
    bncpu.batch_norm_forward's flag of the same name says: same bits, same output."""
    case = Case((4, 3, 5), dtype, axis=axis)
    expected_running = case.running()
    expected, _, _ = bncpu.batch_norm_forward(
        to_layout(case.x, axis), case.weight, case.bias, *expected_running, True, MOMENTUM, EPS,
        axis=axis, unbiased_running_var=unbiased)
    expected = np.maximum(expected + to_layout(case.residual, axis), 0)
    running = case.running()
    output = case.forward(bncpu, True, running, unbiased_running_var=unbiased)[0]
    assert_bitwise_equal(output, expected)
    assert_all_bitwise_equal(running, expected_running)
    wrapped_running = case.running()
    assert_bitwise_equal(bncpu.batch_norm_relu(to_layout(case.x, axis), *wrapped_running,
                                               case.weight, case.bias, True, MOMENTUM, EPS,
                                               residual=to_layout(case.residual, axis),
                                               axis=axis, unbiased_running_var=unbiased),
                         expected)
    assert_all_bitwise_equal(wrapped_running, expected_running)
    default_running = case.running()
    case.forward(bncpu, True, default_running)   # PyTorch's: the unbiased variance
    assert_bitwise_equal(running[0], default_running[0])
    if unbiased:
        assert_bitwise_equal(running[1], default_running[1])
    else:
        assert (running[1] < default_running[1]).all()


def test_defaults_are_evaluation_without_residual():
    case = Case((4, 3, 5), np.float64)
    expected = np.maximum(bncpu.batch_norm(case.x, case.running_mean, case.running_var), 0)
    assert_bitwise_equal(bncpu.batch_norm_relu(case.x, case.running_mean, case.running_var),
                         expected)


# ----------------------------------------------------------------------------------
# The edges of the ReLU: exactly 0, NaN
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@AXES
def test_exact_zeros_before_the_relu_pass_no_gradient(torch, axis, dtype):
    # Evaluation with mean 0, variance 1, eps 0: batch_norm(x) is x exactly, so the residual
    # -x cancels it to exactly 0 where chosen, and x = 0 gives 0 without residual too.
    shape = (4, 3, 5, 2)
    case = Case(shape, dtype, "none", residual=True, axis=axis)
    case.x.reshape(-1)[::3] = 0
    case.residual = case.residual.copy()
    case.residual.reshape(-1)[1::3] = -case.x.reshape(-1)[1::3]
    case.residual.reshape(-1)[::3] = 0
    case.running_mean[...] = 0
    case.running_var[...] = 1
    case.eps = 0.0
    (expected, *expected_grads), _ = torch_results(torch, case, False)
    output, save_mean, save_invstd = case.forward(bncpu, False, case.running())
    grads = case.backward(bncpu, False, output, save_mean, save_invstd, residual_grad=True)
    before_relu = case.x + case.residual
    assert (before_relu == 0).sum() >= 2 * case.x.size // 3
    assert_bitwise_equal(from_layout(output, axis), np.maximum(before_relu, 0))
    assert (from_layout(grads[0], axis)[before_relu == 0] == 0).all()
    assert (from_layout(grads[3], axis)[before_relu == 0] == 0).all()
    assert_close(from_layout(grads[0], axis), expected_grads[0], dtype)
    assert_close(from_layout(grads[3], axis), expected_grads[3], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_zeros_in_training(torch, dtype):
    # Each channel holds -a, 0 and a in equal numbers: mean exactly 0, so x = 0 normalizes
    # to exactly 0 (no bias).
    case = Case((6, 2, 4), dtype, "weight", residual=False)
    values = np.array([-1.5, 0.0, 1.5], dtype)
    case.x = np.tile(values, 16).reshape(6, 2, 4).astype(dtype)
    (expected, *expected_grads), _ = torch_results(torch, case, True)
    output, save_mean, save_invstd = case.forward(bncpu, True, case.running())
    assert (output[case.x == 0] == 0).all()
    assert (save_mean == 0).all()
    grads = case.backward(bncpu, True, output, save_mean, save_invstd)
    assert_close(output, expected, dtype)
    assert_close(grads[0], expected_grads[0], dtype)
    assert_close(grads[1], expected_grads[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@TRAINING
def test_nan_propagates_as_in_torch(torch, training, dtype):
    case = Case((4, 3, 5), dtype, residual=True)
    case.x[1, 0, 2] = np.nan
    (expected, *expected_grads), _ = torch_results(torch, case, training)
    output, save_mean, save_invstd = case.forward(bncpu, training, case.running())
    assert np.isnan(output[1, 0, 2])
    assert_close(output, expected, dtype)
    grads = case.backward(bncpu, training, output, save_mean, save_invstd, residual_grad=True)
    for ours, theirs in zip(grads, expected_grads, strict=True):
        assert_close(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_gradient_where_the_relu_was_off_passes_nothing(torch, dtype):
    case = Case((4, 3, 5), dtype, residual=False)
    output, save_mean, save_invstd = case.forward(bncpu, False, case.running())
    off = output == 0
    assert off.any()
    case.dy[off] = np.nan
    (_, *expected_grads), _ = torch_results(torch, case, False)
    grads = case.backward(bncpu, False, output, save_mean, save_invstd, residual_grad=True)
    assert np.isfinite(grads[0]).all() and np.isfinite(grads[3]).all()
    assert (grads[3][off] == 0).all()
    assert_close(grads[0], expected_grads[0], dtype)


# ----------------------------------------------------------------------------------
# Dtypes, empty input, out= and in place
# ----------------------------------------------------------------------------------
def test_float16_and_integer_inputs_follow_the_dtype_rules():
    x16 = random_input((4, 3), np.float16)
    out = bncpu.batch_norm_relu(x16, None, None, training=True)
    assert out.dtype == np.float32
    assert_bitwise_equal(out, bncpu.batch_norm_relu(x16.astype(np.float32), None, None,
                                                    training=True))
    ints = np.arange(12).reshape(4, 3)
    assert bncpu.batch_norm_relu(ints, None, None, training=True).dtype == np.float64
    # The residual and the gradients take the input's compute dtype.
    out = bncpu.batch_norm_relu(x16, None, None, training=True, residual=np.ones((4, 3)))
    assert out.dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
@TRAINING
def test_empty_batch(dtype, training):
    x = np.empty((0, 3, 4), dtype)
    running = running_stats(3, dtype)
    expected_running = tuple(r.copy() for r in running)
    output, save_mean, save_invstd = bncpu.batch_norm_relu_forward(
        x, None, None, *running, training, MOMENTUM, EPS, residual=np.empty_like(x))
    assert output.shape == x.shape and output.dtype == dtype
    assert_all_bitwise_equal(running, expected_running)
    grad_input, grad_weight, grad_bias, grad_residual = bncpu.batch_norm_relu_backward(
        x, output, x, np.ones(3, dtype), *running, save_mean, save_invstd, training, EPS,
        residual_grad=True)
    assert grad_input.shape == grad_residual.shape == x.shape
    assert_bitwise_equal(grad_weight, np.zeros(3, dtype))
    assert_bitwise_equal(grad_bias, np.zeros(3, dtype))


def strided(shape, dtype):
    """A non-contiguous out (every other element of a buffer) and the buffer."""
    buffer = np.full(shape[:-1] + (2 * shape[-1],), 7.0, dtype=dtype)
    return buffer[..., ::2], buffer


@pytest.mark.parametrize("dtype", DTYPES)
@TRAINING
def test_out_receives_the_results_and_is_returned(dtype, training):
    case = Case((4, 3, 5), dtype)
    output, save_mean, save_invstd = case.forward(bncpu, training, case.running())
    grads = case.backward(bncpu, training, output, save_mean, save_invstd)
    outs = [np.full_like(case.x, 7.0), np.full(case.x.shape, 7.0, dtype, order="F"),
            strided(case.x.shape, dtype)[0], np.zeros(case.x.shape, np.float64)]
    for out in outs:
        assert case.forward(bncpu, training, case.running(), out=out)[0] is out
        assert_bitwise_equal(out, output.astype(out.dtype))
    for out in outs:
        result = case.backward(bncpu, training, output, save_mean, save_invstd, out=out)
        assert result[0] is out
        assert_bitwise_equal(out, grads[0].astype(out.dtype))
        assert_all_bitwise_equal(result[1:], grads[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("into", ["input", "residual"])
@TRAINING
def test_forward_in_place(dtype, training, into):
    case = Case((4, 3, 5, 2), dtype)
    expected, *_ = case.forward(bncpu, training, case.running())
    target = case.x if into == "input" else case.residual
    assert bncpu.batch_norm_relu(case.x, *case.running(), case.weight, case.bias, training,
                                 MOMENTUM, EPS, residual=case.residual, out=target) is target
    assert_bitwise_equal(target, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("into", ["grad_output", "output", "input"])
@TRAINING
def test_backward_in_place(dtype, training, into):
    case = Case((4, 3, 5, 2), dtype)
    output, save_mean, save_invstd = case.forward(bncpu, training, case.running())
    expected = case.backward(bncpu, training, output, save_mean, save_invstd,
                             residual_grad=True)
    target = {"grad_output": case.dy, "output": output, "input": case.x}[into]
    result = case.backward(bncpu, training, output, save_mean, save_invstd,
                           residual_grad=True, out=target)
    assert result[0] is target
    assert_all_bitwise_equal(result, expected)


# ----------------------------------------------------------------------------------
# Every work mode of the kernels, threads, instruction sets
# ----------------------------------------------------------------------------------
# Inputs large enough for several threads, one per way the batch-norm kernels cut the
# work (see bncpu/_kernels/batch_norm.pyx); channels last on a 4-D shape is column mode.
WORK_MODES = {
    "channel": (8, 16, 23, 29),
    "channel-long-rows": (2, 8, 300, 300),     # rows of more than one piece
    "channel-runs": (4, 16, 64, 64),           # adjacent channels per task
    "split": (4, 1, 512, 512),                 # fewer channels than threads
    "column": (70000, 3),
    "column-tiles": (301, 1031),
    "column-short-rows": (67, 130, 3, 5),
    "column-aliased-rows": (301, 16, 8, 8),    # rows 4 KiB apart
}


def fused_results(case, training):
    running = case.running()
    output, save_mean, save_invstd = case.forward(bncpu, training, running)
    grads = case.backward(bncpu, training, output, save_mean, save_invstd,
                          residual_grad=case.residual is not None)
    return (output, save_mean, save_invstd) + grads + running


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@TRAINING
@pytest.mark.parametrize("shape", WORK_MODES.values(), ids=WORK_MODES.keys())
def test_every_work_mode_is_the_unfused_composition_for_any_thread_count(shape, training,
                                                                         residual, dtype):
    case = Case(shape, dtype, "weight+bias", residual)
    with num_threads(1):
        expected = fused_results(case, training)
        running = case.running()
        composed = bncpu_composition(case, training, running)
    assert_all_bitwise_equal(expected[:7],
                             composed if residual else composed[:6] + (None,))
    assert_all_bitwise_equal(expected[7:], running)
    for n_threads in (2, 3):
        with num_threads(n_threads):
            assert_all_bitwise_equal(fused_results(case, training), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@AXES
@TRAINING
def test_results_do_not_depend_on_the_number_of_threads(training, axis, dtype):
    case = Case((8, 16, 23, 29), dtype, axis=axis)
    results = []
    for n_threads in (1, 2, 3):
        with num_threads(n_threads):
            results.append(fused_results(case, training))
    for other in results[1:]:
        assert_all_bitwise_equal(other, results[0])


ISA_SCRIPT = r"""
import sys
import numpy as np
import bncpu

rng = np.random.default_rng(5)
results = {"isa": np.array(bncpu.isa())}
for dtype in (np.float32, np.float64):
    for shape in [(8, 16, 32, 32), (4, 1, 300, 300), (301, 131), (67, 130, 3, 5),
                  (43, 16, 8, 8)]:
        x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
        r = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w = rng.standard_normal(shape[1]).astype(dtype)
        b = rng.standard_normal(shape[1]).astype(dtype)
        rm, rv = np.zeros(shape[1], dtype), np.ones(shape[1], dtype)
        arrays = []
        for training in (True, False):
            y, mean, invstd = bncpu.batch_norm_relu_forward(x, w, b, rm, rv, training, 0.1,
                                                            1e-5, residual=r)
            arrays += [y, mean, invstd, rm, rv]
            arrays += bncpu.batch_norm_relu_backward(dy, y, x, w, rm, rv, mean, invstd,
                                                     training, 1e-5, residual_grad=True)
        results[f"{np.dtype(dtype).name}{shape}"] = np.concatenate([np.ravel(a)
                                                                    for a in arrays])
np.savez(sys.argv[1], **results)
"""


def test_every_instruction_set_build_gives_the_same_bits(tmp_path):
    runs = runs_under_every_isa(ISA_SCRIPT, tmp_path)
    isas = list(runs)
    first = runs[isas[0]]
    for isa in isas[1:]:
        for key in first.files:
            if key != "isa":
                np.testing.assert_array_equal(runs[isa][key].view(np.uint8),
                                              first[key].view(np.uint8),
                                              err_msg=f"{key}: {isa} vs {isas[0]}")


# ----------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ----------------------------------------------------------------------------------
SENTINEL = 7.0


def read_only(array):
    array.flags.writeable = False
    return array


def bad_forward_cases():
    shape = (4, 3, 5)
    return {
        "residual shape": (dict(residual=np.ones((4, 3, 6))), ValueError, "residual has shape"),
        "residual dtype": (dict(residual=np.ones(shape, complex)), TypeError, "residual"),
        "out shape": (dict(out=np.zeros((4, 3, 6))), ValueError, "out has shape"),
        "read-only out": (dict(out=read_only(np.zeros(shape))), ValueError, "read-only"),
        "weight size": (dict(weight=np.ones(4)), ValueError, "weight should contain 3"),
        "eps": (dict(eps=-1.0), ValueError, "eps"),
        "one value per channel": (dict(input=np.ones((1, 3))), ValueError, "more than 1 value"),
        "running-variance flag": (dict(unbiased_running_var="no"), TypeError,
                                  "unbiased_running_var must be a bool"),
    }


@pytest.mark.parametrize("bad", list(bad_forward_cases()))
def test_bad_forward_input_raises_and_writes_nothing(bad):
    changes, error, message = bad_forward_cases()[bad]
    case = Case((4, 3, 5), np.float64)
    running = case.running()
    out = np.full(case.x.shape, SENTINEL)
    args = dict(input=case.x, weight=case.weight, bias=case.bias, running_mean=running[0],
                running_var=running[1], training=True, momentum=MOMENTUM, eps=EPS,
                residual=case.residual, out=out)
    if bad == "one value per channel":
        args.update(residual=None, out=None)
    args.update(changes)
    with pytest.raises(error, match=message):
        bncpu.batch_norm_relu_forward(**args)
    assert_all_bitwise_equal(running, case.running())
    assert (out == SENTINEL).all()


def bad_backward_cases():
    return {
        "output shape": (dict(output=np.ones((4, 3, 6))), ValueError, "output has shape"),
        "grad_output shape": (dict(grad_output=np.ones((4, 3))), ValueError, "grad_output"),
        "output dtype": (dict(output=np.ones((4, 3, 5), complex)), TypeError, "output"),
        "out shape": (dict(out=np.zeros((4, 3, 6))), ValueError, "out has shape"),
        "out type": (dict(out=[0.0]), TypeError, "numpy.ndarray"),
        "no saved statistics": (dict(save_mean=None), ValueError, "save_mean"),
        "weight size": (dict(weight=np.ones(2)), ValueError, "weight should contain 3"),
    }


@pytest.mark.parametrize("bad", list(bad_backward_cases()))
def test_bad_backward_input_raises_and_writes_nothing(bad):
    changes, error, message = bad_backward_cases()[bad]
    case = Case((4, 3, 5), np.float64)
    output, save_mean, save_invstd = case.forward(bncpu, True, case.running())
    out = np.full(case.x.shape, SENTINEL)
    args = dict(grad_output=case.dy, output=output, input=case.x, weight=case.weight,
                running_mean=case.running_mean, running_var=case.running_var,
                save_mean=save_mean, save_invstd=save_invstd, training=True, eps=EPS,
                residual_grad=True, out=out)
    args.update(changes)
    saved = [a.copy() for a in (case.dy, output, case.x)]
    with pytest.raises(error, match=message):
        bncpu.batch_norm_relu_backward(**args)
    assert (out == SENTINEL).all()
    assert_all_bitwise_equal((case.dy, output, case.x), saved)


# ----------------------------------------------------------------------------------
# fold_batch_norm
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bn_affine", [True, False], ids=["bn-affine", "bn-plain"])
@pytest.mark.parametrize("layer_bias", [True, False], ids=["layer-bias", "no-layer-bias"])
@pytest.mark.parametrize("layer", ["conv2d", "linear", "conv1d"])
def test_fold_matches_layer_then_batch_norm_in_eval(torch, layer, layer_bias, bn_affine, dtype):
    torch.manual_seed(0)
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    make = {"conv2d": (lambda: torch.nn.Conv2d(3, 5, 3, bias=layer_bias),
                       torch.nn.BatchNorm2d, (2, 3, 7, 6)),
            "conv1d": (lambda: torch.nn.Conv1d(3, 5, 2, bias=layer_bias),
                       torch.nn.BatchNorm1d, (2, 3, 7)),
            "linear": (lambda: torch.nn.Linear(3, 5, bias=layer_bias),
                       torch.nn.BatchNorm1d, (4, 3))}
    make_layer, make_bn, input_shape = make[layer]
    conv, bn = make_layer().to(tdtype), make_bn(5, affine=bn_affine).to(tdtype)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if bn_affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    model = torch.nn.Sequential(conv, bn).eval()
    x = torch.randn(input_shape, dtype=tdtype)
    expected = model(x).detach().numpy()

    def numpy(t):
        return None if t is None else t.detach().numpy()
    weight, bias = numpy(conv.weight), numpy(conv.bias)
    before = [a.copy() for a in (weight, bias) if a is not None]
    folded_weight, folded_bias = bncpu.fold_batch_norm(
        weight, bias, numpy(bn.running_mean), numpy(bn.running_var), numpy(bn.weight),
        numpy(bn.bias), bn.eps)
    assert folded_weight.dtype == folded_bias.dtype == dtype
    assert_all_bitwise_equal([a for a in (weight, bias) if a is not None], before)
    ref = reference.fold_batch_norm(weight, bias, numpy(bn.running_mean), numpy(bn.running_var),
                                    numpy(bn.weight), numpy(bn.bias), bn.eps)
    assert_all_bitwise_equal((folded_weight, folded_bias), [r.astype(dtype) for r in ref])

    fused = make_layer().to(tdtype)
    if not layer_bias:
        fused.bias = torch.nn.Parameter(torch.zeros(5, dtype=tdtype))
    with torch.no_grad():
        fused.weight.copy_(torch.from_numpy(folded_weight))
        fused.bias.copy_(torch.from_numpy(folded_bias))
    assert_close(fused(x).detach().numpy(), expected, dtype)


def test_fold_formula_and_dtypes():
    weight = np.arange(12.0).reshape(3, 4)
    running_mean, running_var = np.array([1.0, -2.0, 0.5]), np.array([4.0, 1.0, 0.25])
    folded_weight, folded_bias = bncpu.fold_batch_norm(weight, None, running_mean, running_var,
                                                       None, None, eps=0.0)
    scale = np.array([0.5, 1.0, 2.0])
    assert_bitwise_equal(folded_weight, weight * scale[:, None])
    assert_bitwise_equal(folded_bias, -running_mean * scale)
    folded = bncpu.fold_batch_norm(weight.astype(np.float16), None, running_mean, running_var,
                                   None, None)
    assert [f.dtype for f in folded] == [np.float32, np.float32]
    folded = bncpu.fold_batch_norm(np.ones((3, 2), int), None, running_mean, running_var,
                                   None, None)
    assert [f.dtype for f in folded] == [np.float64, np.float64]


@pytest.mark.parametrize("bad, error, message", [
    (dict(weight=np.float64(1.0)), ValueError, "at least 1 dimension"),
    (dict(weight=np.ones((3, 2), complex)), TypeError, "weight has unsupported dtype"),
    (dict(running_mean=np.zeros(4)), ValueError, "running_mean should contain 3"),
    (dict(running_var=None), ValueError, "running_mean and running_var must be given"),
    (dict(bias=np.zeros(2)), ValueError, "bias should contain 3"),
    (dict(bn_weight=np.ones((3, 1))), ValueError, "bn_weight has shape"),
    (dict(bn_bias=np.ones(2)), ValueError, "bn_bias should contain 3"),
    (dict(eps=float("nan")), ValueError, "eps"),
])
def test_fold_bad_input(bad, error, message):
    args = dict(weight=np.ones((3, 2)), bias=np.zeros(3), running_mean=np.zeros(3),
                running_var=np.ones(3), bn_weight=np.ones(3), bn_bias=np.zeros(3), eps=EPS)
    args.update(bad)
    with pytest.raises(error, match=message):
        bncpu.fold_batch_norm(**args)


# ----------------------------------------------------------------------------------
# The C API: the same kernels from C
# ----------------------------------------------------------------------------------
C_PROGRAM = r"""
#include "bncpu.h"

/* Reads n, c, s and the float32 arrays x, residual, dy, weight, bias, running_mean,
 * running_var from argv[1]; writes every result of the fused kernels, in training and
 * evaluation, to argv[2]; exits 1 if a check of the error statuses fails. */
static float *read_floats(FILE *f, int64_t count)
{
    float *a = malloc(count * sizeof(float));
    if (fread(a, sizeof(float), count, f) != (size_t)count)
        exit(2);
    return a;
}

int main(int argc, char **argv)
{
    int64_t dims[3], n, c, s, size, i;
    FILE *in, *out;
    float *x, *r, *dy, *w, *b, *rm, *rv, *y, *mean, *invstd, *dx, *dw, *db, *dr;
    int status;
    if (argc != 3 || bncpu_import() != BNCPU_OK)
        return 3;
    in = fopen(argv[1], "rb");
    if (fread(dims, sizeof(int64_t), 3, in) != 3)
        return 2;
    n = dims[0], c = dims[1], s = dims[2], size = n * c * s;
    x = read_floats(in, size), r = read_floats(in, size), dy = read_floats(in, size);
    w = read_floats(in, c), b = read_floats(in, c), rm = read_floats(in, c);
    rv = read_floats(in, c);
    fclose(in);
    y = malloc(size * sizeof(float)), dx = malloc(size * sizeof(float));
    dr = malloc(size * sizeof(float));
    mean = malloc(c * sizeof(float)), invstd = malloc(c * sizeof(float));
    dw = malloc(c * sizeof(float)), db = malloc(c * sizeof(float));
    out = fopen(argv[2], "wb");

    status = bncpu_batch_norm_relu_forward_train_f32(x, r, y, n, c, s, w, b, rm, rv, 0.1, 1e-5,
                                                     mean, invstd, 1);
    status |= bncpu_batch_norm_relu_backward_f32(dy, y, x, dx, n, c, s, w, NULL, NULL, mean,
                                                 invstd, 1, 1e-5, dw, db, dr);
    fwrite(y, sizeof(float), size, out), fwrite(mean, sizeof(float), c, out);
    fwrite(invstd, sizeof(float), c, out), fwrite(rm, sizeof(float), c, out);
    fwrite(rv, sizeof(float), c, out), fwrite(dx, sizeof(float), size, out);
    fwrite(dw, sizeof(float), c, out), fwrite(db, sizeof(float), c, out);
    fwrite(dr, sizeof(float), size, out);

    status |= bncpu_batch_norm_relu_forward_eval_f32(x, NULL, y, n, c, s, w, b, rm, rv, 1e-5);
    status |= bncpu_batch_norm_relu_backward_f32(dy, y, x, dx, n, c, s, w, rm, rv, NULL, NULL,
                                                 0, 1e-5, dw, db, NULL);
    fwrite(y, sizeof(float), size, out), fwrite(dx, sizeof(float), size, out);
    fwrite(dw, sizeof(float), c, out), fwrite(db, sizeof(float), c, out);
    fclose(out);
    if (status != BNCPU_OK)
        return 4;

    /* Bad arguments: the documented status, nothing written. */
    for (i = 0; i < size; i++)
        dx[i] = 7.0f;
    if (bncpu_batch_norm_relu_backward_f32(dy, NULL, x, dx, n, c, s, w, NULL, NULL, mean,
                                           invstd, 1, 1e-5, dw, db, NULL)
            != BNCPU_ERR_NULL_POINTER
        || bncpu_batch_norm_relu_forward_train_f32(x, r, dx, n, c, s, w, b, rm, rv, 2.0, 1e-5,
                                                   mean, invstd, 1) != BNCPU_ERR_BAD_MOMENTUM
        || bncpu_batch_norm_relu_forward_eval_f32(x, r, dx, n, c, s, w, b, rm, rv, -1.0)
            != BNCPU_ERR_BAD_EPS)
        return 1;
    for (i = 0; i < size; i++)
        if (dx[i] != 7.0f)
            return 1;
    return 0;
}
"""


@pytest.mark.parametrize("shape", [(4, 3, 5), (8, 16, 23, 29)], ids=["column", "channel"])
def test_c_api_gives_the_python_results(toolchain, shape, tmp_path):
    """Skipped, as test_c_api's tests, without a C compiler or python3-config."""
    compiler, include_flags, link_flags = toolchain
    source, binary = tmp_path / "fused.c", tmp_path / "fused"
    source.write_text(C_PROGRAM)
    compile_c(compiler + ["-O2", "-Wall", "-Werror", str(source), "-o", str(binary)]
                         + include_flags + link_flags)

    case = Case(shape, np.float32)
    n, c, s = shape[0], shape[1], int(np.prod(shape[2:]))
    with open(tmp_path / "in.bin", "wb") as f:
        f.write(np.array([n, c, s], np.int64).tobytes())
        for array in (case.x, case.residual, case.dy, case.weight, case.bias,
                      case.running_mean, case.running_var):
            f.write(array.tobytes())
    result = subprocess.run([str(binary), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                            env=example_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr

    running = case.running()
    train = case.forward(bncpu, True, running)
    train_grads = case.backward(bncpu, True, train[0], *train[1:], residual_grad=True)
    evaluation = bncpu.batch_norm_relu(case.x, *running, case.weight, case.bias)
    eval_grads = bncpu.batch_norm_relu_backward(case.dy, evaluation, case.x, case.weight,
                                                *running, None, None, False, EPS)
    expected = (train + running + train_grads + (evaluation,) + eval_grads[:3])
    ours = np.fromfile(tmp_path / "out.bin", np.float32)
    assert ours.size == sum(a.size for a in expected)
    at = 0
    for array in expected:
        assert_bitwise_equal(ours[at:at + array.size].reshape(array.shape), array)
        at += array.size
