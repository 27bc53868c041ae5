"""The eager fast path: the kernels straight on the tensors' memory.

A call that ``_route.eager_fast_path`` lets skip torch's dispatcher, whose input is
contiguous or channels last, with contiguous parameters and running statistics of the
right sizes, and eps and momentum Python floats in range, skips bncpu's Python
validation too: torch has already guaranteed what bncpu would check (one CPU float
dtype: see ``_fallback.reason``) and the checks below the rest, so the kernel wrappers
get the tensors' own memory and nothing else runs. Each function here has the
signature of the operator it stands for (``KERNELS``). A forward returns None when
the arguments are not ones it takes (the operator's CPU kernel then runs, which copies
where it must and raises bncpu's errors before writing anything), else the operator's
results and the NumPy views its backward reuses (``arrays``; autograd's version check
on the saved tensors guards them).

The differences from the operators: the forward's results hold None for the statistics
(they stay NumPy arrays, in ``arrays``) and for the new running statistics: in training
the kernel updates the running statistics in place and bumps their version counters,
as aten's batch norm does in eager mode. Per-call CPU time on a tiny input is measured by
``benchmarks/torch_integration.py --only overhead``.
"""
import math

import numpy as np
import torch
from torch.autograd.graph import increment_version

from bncpu import _validate
from bncpu._status import raise_for_status
from bncpu._ops import batch_norm as _bn
from bncpu._ops import row_norm as _rows
from bncpu.torch._layout import channel_layout, channels_last_order

def _view(tensor):
    """A NumPy view of a CPU tensor's memory (detached; None stays None)."""
    return None if tensor is None else tensor.numpy(force=True)


def _vector(tensor, size):
    """Whether ``tensor`` is None or ``size`` contiguous values."""
    return tensor is None or (tensor.shape == (size,) and tensor.is_contiguous())


def _shaped(tensor, shape):
    """Whether ``tensor`` is None or a contiguous tensor of ``shape``."""
    return tensor is None or (tensor.shape == shape and tensor.is_contiguous())


def _eps_in_range(eps):
    return type(eps) is float and 0.0 <= eps < math.inf


def _like(input, tensor):
    """``tensor`` with ``input``'s strides (itself when it has them: no copy)."""
    if tensor.stride() == input.stride():
        return tensor
    return torch.empty_like(input).copy_(tensor)


def _tensor(array, like):
    """A kernel's result array as a tensor (no copy), or an empty tensor for None."""
    return like.new_empty(0) if array is None else torch.from_numpy(array)


def _or_empty(tensor, like):
    return like.new_empty(0) if tensor is None else tensor


# ----------------------------------------------------------------------------------
# Batch norm, and relu(batch_norm(x) + residual)
# ----------------------------------------------------------------------------------
def _batch_norm_layout(input, weight, bias, running_mean, running_var, training, momentum,
                       eps, residual):
    """The kernels' (outer, channels, inner) of ``input`` when they take these arguments
    as they are, else None."""
    layout = channel_layout(input)
    if layout is None:
        return None
    n, c, s = layout
    if not (_vector(weight, c) and _vector(bias, c) and _vector(running_mean, c)
            and _vector(running_var, c) and _eps_in_range(eps)
            and type(momentum) is float and 0.0 <= momentum <= 1.0
            and (running_mean is None) == (running_var is None)):
        return None
    if residual is not None and (residual.shape != input.shape
                                 or residual.stride() != input.stride()):
        return None
    if training:
        if n * s < 2:
            return None
        if running_mean is not None and running_mean.data_ptr() == running_var.data_ptr():
            return None
    elif running_mean is None:
        return None
    return layout


def _batch_norm_forward(relu, input, weight, bias, running_mean, running_var, training,
                        momentum, eps, residual=None):
    layout = _batch_norm_layout(input, weight, bias, running_mean, running_var, training,
                                momentum, eps, residual)
    if layout is None:
        return None
    n, c, s = layout
    output = torch.empty_like(input)
    x, y, w, b = _view(input), _view(output), _view(weight), _view(bias)
    rm, rv = _view(running_mean), _view(running_var)
    save_mean = save_invstd = None
    if not training:
        if relu:
            status = _bn.relu_forward_eval(x, _view(residual), y, n, c, s, w, b, rm, rv, eps)
        else:
            status = _bn.forward_eval(x, y, n, c, s, w, b, rm, rv, eps)
        raise_for_status(status)
    else:
        save_mean, save_invstd = np.empty(c, x.dtype), np.empty(c, x.dtype)
        if relu:
            status = _bn.relu_forward_train(x, _view(residual), y, n, c, s, w, b, rm, rv,
                                            momentum, eps, save_mean, save_invstd)
        else:
            status = _bn.forward_train(x, y, n, c, s, w, b, rm, rv, momentum, eps,
                                       save_mean, save_invstd)
        raise_for_status(status)
        if running_mean is not None:
            increment_version(running_mean)
            increment_version(running_var)
    return (output, None, None, None, None), (layout, x, w, rm, rv, y, save_mean, save_invstd)


def batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum,
                       eps):
    return _batch_norm_forward(False, input, weight, bias, running_mean, running_var,
                               training, momentum, eps)


def batch_norm_relu_forward(input, weight, bias, running_mean, running_var, training,
                            momentum, eps, residual):
    return _batch_norm_forward(True, input, weight, bias, running_mean, running_var,
                               training, momentum, eps, residual)


def _parameter_grads(weight, shape, dtype, bias=True):
    """NumPy arrays for grad_weight and grad_bias (None without weight, or without
    ``bias``)."""
    if weight is None:
        return None, None
    return np.empty(shape, dtype), np.empty(shape, dtype) if bias else None


def batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                        save_invstd, training, eps, *, arrays):
    (n, c, s), x, w, rm, rv, _, save_mean, save_invstd = arrays
    grad_input = torch.empty_like(input)
    grad_weight, grad_bias = _parameter_grads(weight, c, x.dtype)
    raise_for_status(_bn.backward(
        _view(_like(input, grad_output)), x, _view(grad_input), n, c, s, w, rm, rv, save_mean,
        save_invstd, training, eps, grad_weight, grad_bias))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


def batch_norm_relu_backward(grad_output, output, input, weight, running_mean, running_var,
                             save_mean, save_invstd, training, eps, residual_grad, *, arrays):
    (n, c, s), x, w, rm, rv, y, save_mean, save_invstd = arrays
    grad_input = torch.empty_like(input)
    grad_residual = torch.empty_like(input) if residual_grad else None
    grad_weight, grad_bias = _parameter_grads(weight, c, x.dtype)
    raise_for_status(_bn.relu_backward(
        _view(_like(input, grad_output)), y, x, _view(grad_input), n, c, s, w, rm, rv,
        save_mean, save_invstd, training, eps, grad_weight, grad_bias, _view(grad_residual)))
    return (grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input),
            _or_empty(grad_residual, input))


# ----------------------------------------------------------------------------------
# Layer norm and RMS norm: rows of d values
# ----------------------------------------------------------------------------------
def _rows_of(input, normalized_shape, weight, bias, eps):
    """(rows, d) of ``input`` when the row-norm kernels take these arguments as they
    are, else None."""
    shape = tuple(normalized_shape)
    leading = input.dim() - len(shape)
    if not (shape and leading >= 0 and input.shape[leading:] == shape and input.numel()
            and input.is_contiguous() and _shaped(weight, shape) and _shaped(bias, shape)
            and _eps_in_range(eps)):
        return None
    d = math.prod(shape)
    return input.numel() // d, d


def _row_norm_forward(input, normalized_shape, weight, bias, eps, centered):
    layout = _rows_of(input, normalized_shape, weight, bias, eps)
    if layout is None:
        return None
    rows, d = layout
    output = torch.empty_like(input)
    x, w = _view(input), _view(weight)
    mean = np.empty(rows, x.dtype) if centered else None
    rstd = np.empty(rows, x.dtype)
    raise_for_status(_rows.forward(x, _view(output), rows, d, 1, 1, w, _view(bias), eps,
                                    centered, mean, rstd))
    return output, (layout, x, w, mean, rstd)


def layer_norm_forward(input, normalized_shape, weight, bias, eps):
    result = _row_norm_forward(input, normalized_shape, weight, bias, eps, True)
    return None if result is None else ((result[0], None, None), result[1])


def rms_norm_forward(input, normalized_shape, weight, eps):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    result = _row_norm_forward(input, normalized_shape, weight, None, eps, False)
    return None if result is None else ((result[0], None), result[1])


def _row_norm_backward(grad_output, input, normalized_shape, weight, arrays, centered):
    (rows, d), x, w, mean, rstd = arrays
    grad_input = torch.empty_like(input)
    grad_weight, grad_bias = _parameter_grads(weight, tuple(normalized_shape), x.dtype,
                                              centered)
    raise_for_status(_rows.backward(
        _view(_like(input, grad_output)), x, _view(grad_input), rows, d, 1, 1, mean, rstd, w,
        centered, grad_weight, grad_bias))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


def layer_norm_backward(grad_output, input, normalized_shape, mean, rstd, weight, *, arrays):
    return _row_norm_backward(grad_output, input, normalized_shape, weight, arrays, True)


def rms_norm_backward(grad_output, input, normalized_shape, rstd, weight, *, arrays):
    return _row_norm_backward(grad_output, input, normalized_shape, weight, arrays,
                              False)[:2]


# ----------------------------------------------------------------------------------
# Group norm: each sample's groups of adjacent channels
# ----------------------------------------------------------------------------------
def _groups_of(input, num_groups, weight, bias, eps):
    """((n, c, s), channels_last) of ``input`` when the group-norm row kernels take these
    arguments as they are (contiguous or channels last, 1 < groups < C, as the operator
    routes them), else None."""
    shape = input.shape
    if not (len(shape) >= 2 and type(num_groups) is int and _eps_in_range(eps)):
        return None
    n, c = shape[0], shape[1]
    if not (1 <= num_groups < c and c % num_groups == 0 and input.numel()
            and _vector(weight, c) and _vector(bias, c)):
        return None
    s = input.numel() // (n * c)
    if input.is_contiguous():
        return (n, c, s), False
    if channels_last_order(input) is not None:
        return (n, c, s), True
    return None


def group_norm_forward(input, num_groups, weight, bias, eps):
    layout = _groups_of(input, num_groups, weight, bias, eps)
    if layout is None:
        return None
    (n, c, s), channels_last = layout
    output = torch.empty_like(input)
    x, w = _view(input), _view(weight)
    mean = np.empty((n, num_groups), x.dtype)
    rstd = np.empty((n, num_groups), x.dtype)
    raise_for_status(_rows.forward(x, _view(output), n, c, s, num_groups, w, _view(bias), eps,
                                    True, mean, rstd, channels_last))
    return (output, None, None), (layout, x, w, mean, rstd)


def group_norm_backward(grad_output, input, num_groups, mean, rstd, weight, *, arrays):
    ((n, c, s), channels_last), x, w, mean, rstd = arrays
    grad_input = torch.empty_like(input)
    grad_weight, grad_bias = _parameter_grads(weight, c, x.dtype)
    raise_for_status(_rows.backward(
        _view(_like(input, grad_output)), x, _view(grad_input), n, c, s, num_groups, mean, rstd,
        w, True, grad_weight, grad_bias, channels_last))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


# operator name -> the function that stands for its CPU kernel on the fast path
KERNELS = {function.__name__: function for function in (
    batch_norm_forward, batch_norm_backward, batch_norm_relu_forward, batch_norm_relu_backward,
    layer_norm_forward, layer_norm_backward, rms_norm_forward, rms_norm_backward,
    group_norm_forward, group_norm_backward)}
