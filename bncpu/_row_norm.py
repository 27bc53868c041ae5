"""Layer, group, instance and RMS norm: the public Python functions (validation in
bncpu._validate, kernels in bncpu/_kernels/row_norm.pyx).

Each normalizes rows of contiguous values on their own: layer and RMS norm the values
of the trailing ``normalized_shape`` dims, group norm the values of one sample's group
of channels, instance norm those of one sample's channel.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bncpu import _validate as v
from bncpu._batch_norm import batch_norm_forward
from bncpu._ops import batch_norm as _bn
from bncpu._ops import row_norm as _rows
from bncpu._status import raise_for_status


def _normalized_shape(normalized_shape, input_shape):
    """normalized_shape as a tuple of ints, which must be the trailing dims of the input."""
    try:
        shape = (operator.index(normalized_shape),)
    except TypeError:
        try:
            shape = tuple(operator.index(size) for size in normalized_shape)
        except TypeError:
            raise TypeError(f"normalized_shape must be an int or a sequence of ints, "
                            f"got {normalized_shape!r}") from None
    if not shape:
        raise ValueError("Expected normalized_shape to be at least 1-dimensional, i.e., containing "
                         "at least one element, but got normalized_shape = []")
    if len(shape) > len(input_shape) or tuple(input_shape[len(input_shape) - len(shape):]) != shape:
        raise ValueError(f"Given normalized_shape={list(shape)}, expected input with shape "
                         f"[*, {', '.join(map(str, shape))}], but got input of size "
                         f"{list(input_shape)}")
    return shape


def _leading(input_shape, normalized_shape):
    """The dims of the input before its normalized ones: one row of values for each index."""
    return tuple(input_shape[:len(input_shape) - len(normalized_shape)])


def _rows_backward_args(grad_output, input, normalized_shape):
    """Checked (dy, x, normalized_shape, leading shape) of a layer/RMS backward."""
    x = v.as_input(input, min_ndim=0)
    dy = v.grad_output(grad_output, x, min_ndim=0)
    normalized_shape = _normalized_shape(normalized_shape, x.shape)
    return dy, x, normalized_shape, _leading(x.shape, normalized_shape)


# The run_* functions take checked arguments and only call the kernels: the public
# functions and the bncpu.nn layers check once, then call them.
def run_rows_forward(x, y, leading, w, b, eps, centered):
    """Layer norm (``centered``) or RMS norm of the checked input ``x`` as rows of the
    values of its trailing dims (``leading``: the other dims): writes ``y``, returns
    (mean, rstd) of shape ``leading`` (mean None for RMS norm)."""
    rows, d = math.prod(leading), math.prod(x.shape[len(leading):])
    mean = np.empty(leading, x.dtype) if centered else None
    rstd = np.empty(leading, x.dtype)
    raise_for_status(_rows.forward(x, y, rows, d, 1, 1, w, b, eps, centered, mean, rstd))
    return mean, rstd


def run_rows_backward(dy, x, dx, leading, mean, rstd, w, centered):
    """The backward of ``run_rows_forward``: writes ``dx``, returns (grad_weight,
    grad_bias), None without ``w`` (grad_bias None for RMS norm)."""
    shape = x.shape[len(leading):]
    rows, d = math.prod(leading), math.prod(shape)
    grad_weight = np.empty(shape, x.dtype) if w is not None else None
    grad_bias = np.empty(shape, x.dtype) if w is not None and centered else None
    raise_for_status(_rows.backward(dy, x, dx, rows, d, 1, 1, mean, rstd, w, centered,
                                    grad_weight, grad_bias))
    return grad_weight, grad_bias


def _num_groups(num_groups, input_shape, axis=1):
    try:
        groups = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"num_groups must be an integer, got {type(num_groups).__name__}") from None
    if groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {groups}")
    if input_shape[axis] % groups != 0:
        raise ValueError(f"Expected number of channels in input to be divisible by num_groups, "
                         f"but got input of shape {list(input_shape)} and num_groups={groups}")
    return groups


# ----------------------------------------------------------------------------------
# Layer norm
# ----------------------------------------------------------------------------------
def layer_norm(input: ArrayLike, normalized_shape: int | Sequence[int],
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               eps: float = 1e-5, *, out: NDArray | None = None) -> NDArray:
    """Layer normalization, as ``torch.nn.functional.layer_norm``.

    Over the values of the trailing dimensions named by ``normalized_shape``, for each
    leading index: ``y = (x - mean) / sqrt(var + eps) * weight + bias``, the variance
    biased.

    Parameters
    ----------
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``. float32 and float64 are
        kept; float16 is computed as float32, integers and bool as float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight, bias : array_like of shape normalized_shape, optional
        Elementwise scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.
    out : ndarray, optional
        Where to write the result: of the input's shape, writeable, castable from the
        compute dtype under 'same_kind'. It may be the input itself.

    Returns
    -------
    ndarray
        The normalized input (``out`` itself when given).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return layer_norm_forward(input, normalized_shape, weight, bias, eps, out=out)[0]


def layer_norm_forward(input: ArrayLike, normalized_shape: int | Sequence[int],
                       weight: ArrayLike | None, bias: ArrayLike | None, eps: float, *,
                       out: NDArray | None = None) -> tuple[NDArray, NDArray, NDArray]:
    """Layer norm with its statistics, as ``torch.ops.aten.native_layer_norm``.

    The arguments are those of ``layer_norm``.

    Returns
    -------
    output : ndarray
        The normalized input (``out`` itself when given).
    mean, rstd : ndarray of shape ``input.shape[:-len(normalized_shape)]``
        Per row, in the compute dtype, rstd = 1/sqrt(var + eps), as ``layer_norm_backward``
        needs them. A row of no values has mean 0 and rstd NaN, as in PyTorch.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    x = v.as_input(input, min_ndim=0)
    dtype = x.dtype
    normalized_shape = _normalized_shape(normalized_shape, x.shape)
    eps = v.check_eps(eps)
    w = v.shaped_param(weight, "weight", normalized_shape, dtype)
    b = v.shaped_param(bias, "bias", normalized_shape, dtype)
    leading = _leading(x.shape, normalized_shape)
    result = v.Output(out, x.shape, dtype, (x, w, b))
    mean, rstd = run_rows_forward(x, result.target, leading, w, b, eps, True)
    return result.finish(), mean, rstd


def layer_norm_backward(grad_output: ArrayLike, input: ArrayLike,
                        normalized_shape: int | Sequence[int], mean: ArrayLike,
                        rstd: ArrayLike, weight: ArrayLike | None, *,
                        out: NDArray | None = None
                        ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Layer norm backward, as ``torch.ops.aten.native_layer_norm_backward``.

    With x̂ = (x - mean)·rstd and g = dy·weight, means over the normalized values:
    ``grad_input = rstd·(g - mean(g) - x̂·mean(g·x̂))``; sums over the leading dimensions:
    ``grad_weight = Σ dy·x̂``, ``grad_bias = Σ dy``.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``. float32 and float64 are
        kept; float16 is computed as float32, integers and bool as float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    mean, rstd : array_like
        From ``layer_norm_forward`` (PyTorch's shape with trailing 1s is accepted too).
    weight : array_like of shape normalized_shape, optional
        The forward's weight (1 when None).
    out : ndarray, optional
        Receives grad_input, as ``out`` in the forward; may be grad_output or input.

    Returns
    -------
    grad_input : ndarray
        Of the input's shape (``out`` itself when given).
    grad_weight, grad_bias : ndarray of shape normalized_shape, or None
        None when weight is None.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    dy, x, normalized_shape, leading = _rows_backward_args(grad_output, input, normalized_shape)
    dtype = x.dtype
    mean = v.saved_stats(mean, "mean", leading, dtype, len(normalized_shape))
    rstd = v.saved_stats(rstd, "rstd", leading, dtype, len(normalized_shape))
    w = v.shaped_param(weight, "weight", normalized_shape, dtype)
    result = v.Output(out, x.shape, dtype, (dy, x, w, mean, rstd))
    grad_weight, grad_bias = run_rows_backward(dy, x, result.target, leading, mean, rstd, w, True)
    return result.finish(), grad_weight, grad_bias


# ----------------------------------------------------------------------------------
# Group norm, and instance norm (one channel per group)
# ----------------------------------------------------------------------------------
# The row kernels read each sample's group as one contiguous run: channels first. Other
# channel axes (``axis=-1``: channels-last data) go
# * for instance norm, through the batch-norm kernels on each sample's own
#   (outer, C, inner) buffer, whose per-channel statistics are that sample's
#   per-instance ones: no copy;
# * for group norm with channels last (axis = ndim - 1), through the row kernels'
#   channels-last entries (sums column by column, no copy); other axes through a
#   channels-first copy of the input (and of grad_output), the result written back in
#   the input's layout.
def _sample_layout(shape, axis):
    """(N, C, S) of an input of ``shape``: samples along axis 0, channels along ``axis``,
    S values per sample and channel."""
    return shape[0], shape[axis], math.prod(shape[1:axis]) * math.prod(shape[axis + 1:])


def _channels_first(array, axis):
    return np.ascontiguousarray(np.moveaxis(array, axis, 1))


def _per_sample(x, axis):
    """(outer, inner) of one sample x[i] seen by the batch-norm kernels as (outer, C, inner)."""
    return math.prod(x.shape[1:axis]), math.prod(x.shape[axis + 1:])


def run_grouped_forward(x, groups, axis, w, b, eps, out, other_inputs=()):
    """(output, mean, rstd) of group norm on checked arguments; mean, rstd (N, groups)."""
    n, c, s = _sample_layout(x.shape, axis)
    result = v.Output(out, x.shape, x.dtype, (x, w, b) + other_inputs)
    mean = np.empty((n, groups), x.dtype)
    rstd = np.empty((n, groups), x.dtype)
    if groups == 0:   # instance norm of no channels has no groups
        pass
    elif axis == 1 or axis == x.ndim - 1 and groups < c:
        raise_for_status(_rows.forward(x, result.target, n, c, s, groups, w, b, eps, True,
                                         mean, rstd, axis != 1))
    elif groups < c:
        first = _channels_first(x, axis)
        y = np.empty_like(first)
        raise_for_status(_rows.forward(first, y, n, c, s, groups, w, b, eps, True, mean, rstd))
        result.target[...] = np.moveaxis(y, 1, axis)
    else:
        outer, inner = _per_sample(x, axis)
        for i in range(n):
            raise_for_status(_bn.forward_train(x[i], result.target[i], outer, c, inner, w, b,
                                                 None, None, 0.0, eps, mean[i], rstd[i]))
        if s == 0:   # empty instances: rstd NaN, as the row kernels and PyTorch give it
            rstd.fill(np.nan)
    return result.finish(), mean, rstd


def _grouped_backward(grad_output, input, groups_of, mean, rstd, weight, out, axis):
    """Group-norm backward; ``groups_of(channels)`` gives the validated number of groups."""
    x = v.as_input(input)
    dtype = x.dtype
    dy = v.grad_output(grad_output, x)
    axis = v.channel_axis(axis, x.ndim, batch_axis_allowed=False)
    n, c, s = _sample_layout(x.shape, axis)
    groups = groups_of(x.shape, axis)
    mean = v.saved_stats(mean, "mean", (n, groups), dtype)
    rstd = v.saved_stats(rstd, "rstd", (n, groups), dtype)
    w = v.per_channel(weight, "weight", c, dtype)
    return run_grouped_backward(dy, x, groups, axis, mean, rstd, w, out)


def run_grouped_backward(dy, x, groups, axis, mean, rstd, w, out):
    """(grad_input, grad_weight, grad_bias) of group norm on checked arguments."""
    dtype = x.dtype
    n, c, s = _sample_layout(x.shape, axis)
    result = v.Output(out, x.shape, dtype, (dy, x, w, mean, rstd))
    grad_weight = np.empty(c, dtype) if w is not None else None
    grad_bias = np.empty(c, dtype) if w is not None else None
    if groups == 0:
        pass
    elif axis == 1 or axis == x.ndim - 1 and groups < c:
        raise_for_status(_rows.backward(dy, x, result.target, n, c, s, groups, mean, rstd, w,
                                          True, grad_weight, grad_bias, axis != 1))
    elif groups < c:
        dy_first, x_first = _channels_first(dy, axis), _channels_first(x, axis)
        dx = np.empty_like(x_first)
        raise_for_status(_rows.backward(dy_first, x_first, dx, n, c, s, groups, mean, rstd, w,
                                          True, grad_weight, grad_bias))
        result.target[...] = np.moveaxis(dx, 1, axis)
    else:
        outer, inner = _per_sample(x, axis)
        sample_grads = np.zeros((2, n, c), dtype) if w is not None else None
        for i in range(n):
            grad_weight_i, grad_bias_i = (None, None) if w is None else sample_grads[:, i]
            raise_for_status(_bn.backward(dy[i], x[i], result.target[i], outer, c, inner, w,
                                            None, None, mean[i], rstd[i], True, 0.0,
                                            grad_weight_i, grad_bias_i))
        if w is not None:
            grad_weight[...] = sample_grads[0].sum(axis=0, dtype=np.float64)
            grad_bias[...] = sample_grads[1].sum(axis=0, dtype=np.float64)
    return result.finish(), grad_weight, grad_bias


def group_norm(input: ArrayLike, num_groups: int, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, eps: float = 1e-5, *,
               out: NDArray | None = None, axis: int = 1) -> NDArray:
    """Group normalization, as ``torch.nn.functional.group_norm``.

    The C channels form ``num_groups`` groups of C/num_groups adjacent channels; each
    sample's group is normalized over its values:
    ``y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]``.

    Parameters
    ----------
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``. float32 and float64 are kept;
        float16 is computed as float32, integers and bool as float64.
    num_groups : int
        >= 1, dividing C.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.
    out : ndarray, optional
        Where to write the result: of the input's shape, writeable, castable from the
        compute dtype under 'same_kind'. It may be the input itself.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data, whose results
        keep that layout; not 0 (the samples).

    Returns
    -------
    ndarray
        The normalized input (``out`` itself when given).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return group_norm_forward(input, num_groups, weight, bias, eps, out=out, axis=axis)[0]


def group_norm_forward(input: ArrayLike, num_groups: int, weight: ArrayLike | None,
                       bias: ArrayLike | None, eps: float, *, out: NDArray | None = None,
                       axis: int = 1) -> tuple[NDArray, NDArray, NDArray]:
    """Group norm with its statistics, as ``torch.ops.aten.native_group_norm``.

    The arguments are those of ``group_norm``.

    Returns
    -------
    output : ndarray
        The normalized input (``out`` itself when given).
    mean, rstd : ndarray of shape (N, num_groups)
        Per sample and group, in the compute dtype, rstd = 1/sqrt(var + eps). A group of no
        values has mean 0 and rstd NaN, as in PyTorch.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    x = v.as_input(input)
    axis = v.channel_axis(axis, x.ndim, batch_axis_allowed=False)
    groups = _num_groups(num_groups, x.shape, axis)
    eps = v.check_eps(eps)
    w, b = group_params(x, axis, weight, bias)
    return run_grouped_forward(x, groups, axis, w, b, eps, out)


def group_params(x, axis, weight, bias):
    """The checked per-channel (weight, bias) of a group or instance norm of the checked
    input ``x``, channels along ``axis``."""
    return (v.per_channel(weight, "weight", x.shape[axis], x.dtype),
            v.per_channel(bias, "bias", x.shape[axis], x.dtype))


def group_norm_backward(grad_output: ArrayLike, input: ArrayLike, num_groups: int,
                        mean: ArrayLike, rstd: ArrayLike, weight: ArrayLike | None, *,
                        out: NDArray | None = None, axis: int = 1
                        ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Group norm backward, as ``torch.ops.aten.native_group_norm_backward``.

    With x̂ = (x - mean)·rstd and g = dy·weight[c], means over each group's values:
    ``grad_input = rstd·(g - mean(g) - x̂·mean(g·x̂))``; per channel over the samples and
    spatial values: ``grad_weight = Σ dy·x̂``, ``grad_bias = Σ dy``.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``. float32 and float64 are kept;
        float16 is computed as float32, integers and bool as float64.
    num_groups : int
        As in the forward.
    mean, rstd : array_like of shape (N, num_groups)
        From ``group_norm_forward``.
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    out : ndarray, optional
        Receives grad_input, as ``out`` in the forward; may be grad_output or input.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data, whose results
        keep that layout; not 0 (the samples).

    Returns
    -------
    grad_input : ndarray
        Of the input's shape (``out`` itself when given).
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None when weight is None.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return _grouped_backward(grad_output, input,
                             lambda shape, axis: _num_groups(num_groups, shape, axis),
                             mean, rstd, weight, out, axis)


def instance_norm(input: ArrayLike, running_mean: NDArray | None = None,
                  running_var: NDArray | None = None, weight: ArrayLike | None = None,
                  bias: ArrayLike | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, out: NDArray | None = None,
                  axis: int = 1) -> NDArray:
    """Instance normalization, as ``torch.nn.functional.instance_norm``.

    With ``use_input_stats`` each sample's channel is normalized over its own spatial
    values (group norm with one channel per group) and the running statistics, when given,
    are updated in place with the batch means of the per-instance statistics, the variance
    unbiased: ``new = (1 - momentum)·old + momentum·mean_N(stat)``. Without it the running
    statistics normalize (batch norm in evaluation).

    Parameters
    ----------
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``. float32 and float64 are kept;
        float16 is computed as float32, integers and bool as float64.
    running_mean, running_var : ndarray of shape (C,), optional
        Required without ``use_input_stats``. Updated in place with it, so then writeable,
        C-contiguous, apart from each other and from ``out``.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    use_input_stats : bool
        Normalize with each instance's statistics (True) or the running ones.
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    out : ndarray, optional
        Where to write the result: of the input's shape, writeable, castable from the
        compute dtype under 'same_kind'. It may be the input itself.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data, whose results
        keep that layout; not 0 (the samples).

    Returns
    -------
    ndarray
        The normalized input (``out`` itself when given).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return instance_norm_forward(input, weight, bias, running_mean, running_var, use_input_stats,
                                 momentum, eps, out=out, axis=axis)[0]


def instance_norm_forward(input: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                          running_mean: NDArray | None, running_var: NDArray | None,
                          use_input_stats: bool, momentum: float, eps: float, *,
                          out: NDArray | None = None, axis: int = 1
                          ) -> tuple[NDArray, NDArray, NDArray]:
    """Instance norm with its statistics.

    The arguments are those of ``instance_norm``. With ``use_input_stats`` one spatial
    value per instance is an error, as in PyTorch, and an empty batch leaves the running
    statistics unchanged. The running statistics follow each instance's float64 mean and
    variance (one more read of the input; not the saved rstd, from which ``1/rstd² - eps``
    loses the variance when it is far below eps).

    Returns
    -------
    output : ndarray
        The normalized input (``out`` itself when given).
    mean, rstd : ndarray of shape (N, C)
        Per instance, in the compute dtype, rstd = 1/sqrt(var + eps); without
        ``use_input_stats``, the empty arrays ``batch_norm_forward`` returns in evaluation.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    x = v.as_input(input)
    axis = v.channel_axis(axis, x.ndim, batch_axis_allowed=False)
    if not v.check_flag(use_input_stats, "use_input_stats"):
        return batch_norm_forward(x, weight, bias, running_mean, running_var, False, momentum,
                                  eps, out=out, axis=axis)
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum)
    w, b, rm, rv = instance_args(x, axis, weight, bias, running_mean, running_var)
    v.check_out_apart(out, running_mean=rm, running_var=rv)
    return run_instance_forward(x, axis, w, b, rm, rv, momentum, eps, out)


def instance_args(x, axis, weight, bias, running_mean, running_var):
    """The checked (weight, bias, running_mean, running_var) of an instance norm with the
    input's statistics, of the checked input ``x``; more than one value per instance."""
    n, c, s = _sample_layout(x.shape, axis)
    rm, rv = v.running_pair(running_mean, running_var, c, x.dtype, required=False)
    w, b = group_params(x, axis, weight, bias)
    if s == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, "
                         f"got input size {x.shape}")
    return w, b, rm, rv


def run_instance_forward(x, axis, w, b, rm, rv, momentum, eps, out):
    """(output, mean, rstd) of instance norm with the input's statistics, on checked
    arguments; the running statistics, when given, are updated."""
    n, c, s = _sample_layout(x.shape, axis)
    update = rm is not None and n * s > 0
    if update:   # before anything is written: it may fail (MemoryError)
        instance_mean, instance_var = _instance_stats(x, axis)
    output, mean, rstd = run_grouped_forward(x, c, axis, w, b, eps, out, (rm, rv))
    if update:
        rm[...] = (1 - momentum) * rm + momentum * instance_mean.mean(axis=0)
        rv[...] = (1 - momentum) * rv + momentum * (instance_var * (s / (s - 1))).mean(axis=0)
    return output, mean, rstd


def _instance_stats(x, axis):
    """float64 (mean, biased variance) of every instance of a validated input, (N, C) each."""
    n, c, s = _sample_layout(x.shape, axis)
    mean = np.empty((n, c))
    m2 = np.empty((n, c))
    if axis == 1:   # the instances are the rows of an (N·C, S) matrix: one channel each
        raise_for_status(_bn.stats(x, 1, n * c, s, mean, m2))
    else:
        outer, inner = _per_sample(x, axis)
        for i in range(n):
            raise_for_status(_bn.stats(x[i], outer, c, inner, mean[i], m2[i]))
    return mean, m2 / s


def instance_norm_backward(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                           rstd: ArrayLike, weight: ArrayLike | None, *,
                           out: NDArray | None = None, axis: int = 1
                           ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Instance-norm backward with the input's own statistics (``use_input_stats``):
    ``group_norm_backward`` with one channel per group.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``. float32 and float64 are kept;
        float16 is computed as float32, integers and bool as float64.
    mean, rstd : array_like of shape (N, C)
        From ``instance_norm_forward``.
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    out : ndarray, optional
        Receives grad_input, as ``out`` in the forward; may be grad_output or input.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data, whose results
        keep that layout; not 0 (the samples).

    Returns
    -------
    grad_input : ndarray
        Of the input's shape (``out`` itself when given).
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None when weight is None.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return _grouped_backward(grad_output, input, lambda shape, axis: shape[axis], mean, rstd,
                             weight, out, axis)


# ----------------------------------------------------------------------------------
# RMS norm
# ----------------------------------------------------------------------------------
def rms_norm(input: ArrayLike, normalized_shape: int | Sequence[int],
             weight: ArrayLike | None = None, eps: float | None = None, *,
             out: NDArray | None = None) -> NDArray:
    """RMS normalization, as ``torch.nn.functional.rms_norm``.

    Over the values of the trailing dimensions named by ``normalized_shape``:
    ``y = x / sqrt(mean(x²) + eps) * weight``.

    Parameters
    ----------
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``. float32 and float64 are
        kept; float16 is computed as float32, integers and bool as float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight : array_like of shape normalized_shape, optional
        Elementwise scale (1 when None).
    eps : float, optional
        Finite and >= 0; None is the machine epsilon of the compute dtype (float32 for
        float16 input, float64 for integers), as in PyTorch.
    out : ndarray, optional
        Where to write the result: of the input's shape, writeable, castable from the
        compute dtype under 'same_kind'. It may be the input itself.

    Returns
    -------
    ndarray
        The normalized input (``out`` itself when given).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return rms_norm_forward(input, normalized_shape, weight, eps, out=out)[0]


def rms_norm_forward(input: ArrayLike, normalized_shape: int | Sequence[int],
                     weight: ArrayLike | None, eps: float | None, *,
                     out: NDArray | None = None) -> tuple[NDArray, NDArray]:
    """RMS norm with its statistic, as ``torch.ops.aten._fused_rms_norm``.

    The arguments are those of ``rms_norm``.

    Returns
    -------
    output : ndarray
        The normalized input (``out`` itself when given).
    rstd : ndarray of shape ``input.shape[:-len(normalized_shape)]``
        1/sqrt(mean(x²) + eps) per row, in the compute dtype.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    x = v.as_input(input, min_ndim=0)
    dtype = x.dtype
    normalized_shape = _normalized_shape(normalized_shape, x.shape)
    eps = float(np.finfo(dtype).eps) if eps is None else v.check_eps(eps)
    w = v.shaped_param(weight, "weight", normalized_shape, dtype)
    leading = _leading(x.shape, normalized_shape)
    result = v.Output(out, x.shape, dtype, (x, w))
    rstd = run_rows_forward(x, result.target, leading, w, None, eps, False)[1]
    return result.finish(), rstd


def rms_norm_backward(grad_output: ArrayLike, input: ArrayLike,
                      normalized_shape: int | Sequence[int], rstd: ArrayLike,
                      weight: ArrayLike | None, *, out: NDArray | None = None
                      ) -> tuple[NDArray, NDArray | None]:
    """RMS-norm backward, as ``torch.ops.aten._fused_rms_norm_backward``.

    With x̂ = x·rstd and g = dy·weight, means over the normalized values:
    ``grad_input = rstd·(g - x̂·mean(g·x̂))``; ``grad_weight = Σ dy·x̂`` over the leading
    dimensions.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``. float32 and float64 are
        kept; float16 is computed as float32, integers and bool as float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    rstd : array_like
        From ``rms_norm_forward`` (PyTorch's shape with trailing 1s is accepted too).
    weight : array_like of shape normalized_shape, optional
        The forward's weight (1 when None).
    out : ndarray, optional
        Receives grad_input, as ``out`` in the forward; may be grad_output or input.

    Returns
    -------
    grad_input : ndarray
        Of the input's shape (``out`` itself when given).
    grad_weight : ndarray of shape normalized_shape, or None
        None when weight is None.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    dy, x, normalized_shape, leading = _rows_backward_args(grad_output, input, normalized_shape)
    dtype = x.dtype
    rstd = v.saved_stats(rstd, "rstd", leading, dtype, len(normalized_shape))
    w = v.shaped_param(weight, "weight", normalized_shape, dtype)
    result = v.Output(out, x.shape, dtype, (dy, x, w, rstd))
    grad_weight = run_rows_backward(dy, x, result.target, leading, None, rstd, w, False)[0]
    return result.finish(), grad_weight
