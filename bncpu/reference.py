"""The slow twin: plain-NumPy versions of every public bncpu function.

bncpu's Cython kernels are written to be fast; the functions here are written to be obviously
right. Each one has the same name, arguments and results as its fast counterpart and follows the
formula above it line by line, so the tests can hold the kernels to it and the benchmark
(`python -m bncpu`) can show what the kernels buy. Nothing here is tuned for speed.

Conventions, shared with the kernels and taken from PyTorch, whose semantics these follow:

* Inputs may be any array-likes. All arithmetic is in float64 and results are new float64 arrays,
  except that batch norm's output and grad_input for float16 and bfloat16 (ml_dtypes) input are
  the float64 truth rounded once to the input's dtype, as the half-precision kernels promise.
  Statistics are two-pass: the mean first, then the squared deviations from it, which avoids the
  cancellation of E[x^2] - E[x]^2 when the mean is large against the spread.
* Batch, group and instance norm see an input of shape (N, C, *) as (N, C, S), S the product of
  the trailing dims (S = 1 for 2-D input). Layer and RMS norm normalize over the trailing dims
  named by `normalized_shape`.
* `eps` is added to the variance (or mean square) under the square root; `rstd` and `invstd` both
  mean 1 / sqrt(var + eps). Variances are biased (divided by the count), except in the update of
  a running variance, which is unbiased (divided by the count - 1).
* Running statistics are the one side effect: when given, they are ndarrays updated in place.
* A missing weight acts as 1 and a missing bias as 0. Backward functions return the parameter
  gradients as None when `weight` is None.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "batch_norm",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_stats",
    "batch_norm_gather_stats",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "layer_norm",
    "layer_norm_forward",
    "layer_norm_backward",
    "group_norm",
    "group_norm_forward",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_forward",
    "instance_norm_backward",
    "rms_norm",
    "rms_norm_forward",
    "rms_norm_backward",
    "batch_norm_relu",
    "batch_norm_relu_forward",
    "batch_norm_relu_backward",
    "fold_batch_norm",
]


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

def _float64(array):
    return np.asarray(array, dtype=np.float64)


def _rounded_like(result, input):
    """The float64 result rounded to the dtype of a float16 or bfloat16 input, else as is."""
    dtype = np.asarray(input).dtype
    if dtype == np.float16 or (dtype.kind == "V" and dtype.name == "bfloat16"):
        return result.astype(dtype)
    return result


def _channels(x):
    """View (N, C, *) as (N, C, S): one row of S values per sample and channel."""
    # math.prod rather than reshape(..., -1): -1 cannot be resolved when N == 0.
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _channels_first(array, axis, batch_axis_allowed=True):
    """The array as float64 with its channel axis moved to 1 (axis 1 of the result).

    Every function taking `axis` computes on this view and moves the channel axis of its result
    back with _channels_back, so channels-last data gives the channels-first numbers. Axis 0
    holds the samples of group and instance norm, which therefore refuse it as channel axis.
    """
    x = _float64(array)
    axis = int(axis)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for an input of {x.ndim} dimensions")
    if axis % x.ndim == 0 and not batch_axis_allowed:
        raise ValueError(f"axis {axis} is the batch axis (0) of the input")
    return np.moveaxis(x, axis, 1)


def _channels_back(array, axis):
    """Undo _channels_first on a result of the input's shape."""
    return np.moveaxis(array, 1, axis)


def _grouped(x, num_groups):
    """View (N, C, *) as (N, G, C/G, S): group g holds channels g*C/G to (g+1)*C/G - 1.

    No channels make no groups (instance norm of C == 0 channels passes num_groups = 0).
    """
    n, c = x.shape[:2]
    if num_groups == 0 == c:
        return x.reshape(n, 0, 1, math.prod(x.shape[2:]))
    if c % num_groups != 0:
        raise ValueError(
            "Expected number of channels in input to be divisible by num_groups, "
            f"but got input of shape {list(x.shape)} and num_groups={num_groups}"
        )
    return x.reshape(n, num_groups, c // num_groups, math.prod(x.shape[2:]))


def _check_num_groups(num_groups):
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")


def _trailing_axes(x, normalized_shape):
    """The axes layer and RMS norm reduce over: the last len(normalized_shape), matching it."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(d) for d in normalized_shape)
    k = len(normalized_shape)
    if k == 0 or k > x.ndim or x.shape[x.ndim - k:] != normalized_shape:
        raise ValueError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], but got input of size {list(x.shape)}"
        )
    return tuple(range(x.ndim - k, x.ndim))


def _affine(y, weight, bias, param_shape):
    """y * weight + bias, the parameters reshaped to `param_shape` to broadcast against y."""
    if weight is not None:
        y = y * _float64(weight).reshape(param_shape)
    if bias is not None:
        y = y + _float64(bias).reshape(param_shape)
    return y


def _update_running_stats(running_mean, running_var, mean, unbiased_var, momentum):
    """Exponential moving averages, in place:

        running = (1 - momentum) * running + momentum * value_of_this_batch
    """
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased_var


def _standardize(x, axes, eps):
    """xhat = (x - mean) * rstd over `axes`, returned with mean and rstd (reduced axes kept as 1s).

        mean = sum(x) / n,  var = sum((x - mean)^2) / n,  rstd = 1 / sqrt(var + eps)

    Over no values (n == 0) the mean is 0, as for batch norm's empty batch, and the variance
    0/0 = NaN, as torch gives them.
    """
    n = math.prod(x.shape[axis] for axis in axes)
    mean = x.sum(axis=axes, keepdims=True) / max(n, 1)
    m2 = ((x - mean) ** 2).sum(axis=axes, keepdims=True)
    var = m2 / n if n > 0 else np.full_like(m2, np.nan)
    rstd = 1.0 / np.sqrt(var + eps)
    return (x - mean) * rstd, mean, rstd


def _standardize_backward(grad_xhat, xhat, rstd, axes, centered=True):
    """dL/dx from g = dL/dxhat, means taken over `axes`, for xhat = (x - mean) * rstd:

        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))

    The mean(g) term is x's share in the mean and the last term its share in the variance. With
    centered=False it is the gradient of RMS norm's xhat = x * rstd, which has no mean to share in.
    """
    grad_input = grad_xhat - xhat * (grad_xhat * xhat).mean(axis=axes, keepdims=True)
    if centered:
        grad_input = grad_input - grad_xhat.mean(axis=axes, keepdims=True)
    return rstd * grad_input


# ---------------------------------------------------------------------------------------------
# Batch norm: statistics per channel over N and S
# ---------------------------------------------------------------------------------------------

def batch_norm(input: ArrayLike, running_mean: NDArray | None, running_var: NDArray | None,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1,
               unbiased_running_var: bool = True) -> NDArray:
    """Batch norm as torch.nn.functional.batch_norm: the output of batch_norm_forward.

    Parameters
    ----------
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``.
        Any real dtype, computed in float64 (float16 and bfloat16: the output rounded to
        that dtype).
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics; required when ``training=False``, updated in place in training.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    training : bool
        Use (and record) the batch statistics rather than the running ones.
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last (N, *spatial, C).
    unbiased_running_var : bool, default True
        Blend the unbiased batch variance into ``running_var`` (PyTorch); False blends the
        biased one, as Keras and d2l do.

    Returns
    -------
    ndarray
        The normalized input, of its shape and layout.
    """
    return batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, momentum, eps, axis=axis,
        unbiased_running_var=unbiased_running_var,
    )[0]


def batch_norm_forward(input: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                       running_mean: NDArray | None, running_var: NDArray | None, training: bool,
                       momentum: float, eps: float, *, axis: int = 1,
                       unbiased_running_var: bool = True) -> tuple[NDArray, NDArray, NDArray]:
    """Batch norm with its saved statistics, as torch.ops.aten.native_batch_norm.

    For channel c, over the M = N * S values of the batch:

        training:  mean_c = sum(x) / M,        var_c = sum((x - mean_c)^2) / M
        eval:      mean_c = running_mean_c,    var_c = running_var_c
        y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

    Training returns (output, save_mean, save_invstd), save_invstd = 1 / sqrt(var + eps), and
    updates the running statistics in place as batch_norm_gather_stats describes. Eval mode saves
    nothing: it returns empty (0,) arrays in their place, as torch does.

    Training on one value per channel (M == 1) raises ValueError, as torch.nn.functional.batch_norm
    does: its unbiased variance would be 0/0 (native_batch_norm makes running_var nan instead).
    An empty batch (M == 0) gives an empty output, saves
    mean 0 and invstd 1 / sqrt(eps), and leaves the running statistics unchanged.

    `axis` is the channel axis (1, or -1 for channels-last (N, *, C) data); the output has the
    input's shape. unbiased_running_var=False puts the biased var_c into the running variance,
    as Keras and d2l do.

    Parameters
    ----------
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``.
        Any real dtype, computed in float64 (float16 and bfloat16: the output rounded to
        that dtype).
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics; required when ``training=False``, updated in place in training.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    training : bool
        Use (and record) the batch statistics rather than the running ones.
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last (N, *spatial, C).
    unbiased_running_var : bool, default True
        Blend the unbiased batch variance into ``running_var`` (PyTorch); False blends the
        biased one, as Keras and d2l do.

    Returns
    -------
    output : ndarray
        As ``batch_norm`` returns it.
    save_mean, save_invstd : ndarray of shape (C,)
        In training, the batch mean and 1/sqrt(var + eps) per channel in float64,
        as ``batch_norm_backward`` needs them; in evaluation empty arrays, as in PyTorch.
    """
    x = _channels_first(input, axis)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given in evaluation mode")
        invstd = 1.0 / np.sqrt(_float64(running_var) + eps)
        output = batch_norm_elemt(x, weight, bias, running_mean, invstd)
        return _rounded_like(_channels_back(output, axis), input), np.empty(0), np.empty(0)

    if x.shape[0] * math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {np.shape(input)}"
        )
    # One process is the P = 1 case of synchronized batch norm: the same three steps serve both.
    mean, m2, count = batch_norm_stats(x)
    save_mean, save_invstd = batch_norm_gather_stats(
        mean[None], m2[None], [count], running_mean, running_var, momentum, eps,
        unbiased_running_var=unbiased_running_var,
    )
    output = batch_norm_elemt(x, weight, bias, save_mean, save_invstd)
    return _rounded_like(_channels_back(output, axis), input), save_mean, save_invstd


def batch_norm_backward(grad_output: ArrayLike, input: ArrayLike, weight: ArrayLike | None,
                        running_mean: ArrayLike | None, running_var: ArrayLike | None,
                        save_mean: ArrayLike | None, save_invstd: ArrayLike | None, training: bool,
                        eps: float, *, axis: int = 1
                        ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Batch norm backward, as torch.ops.aten.native_batch_norm_backward.

    Sums run per channel over N and S. Training, where the statistics came from this batch
    (saved by batch_norm_forward), with xhat = (x - save_mean) * save_invstd and M = N * S:

        grad_bias = sum(dy),  grad_weight = sum(dy * xhat)
        dx = weight * save_invstd * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)

    Eval, where the running statistics are constants, with invstd = 1 / sqrt(running_var + eps):

        grad_bias = sum(dy),  grad_weight = sum(dy * (x - running_mean)) * invstd
        dx = dy * weight * invstd

    Returns (grad_input, grad_weight, grad_bias). `axis`: the channel axis, as in batch_norm_forward.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``.
        Any real dtype, computed in float64 (float16 and bfloat16: the output rounded to
        that dtype).
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    running_mean, running_var : array_like of shape (C,)
        Used (only read) when ``training=False``.
    save_mean, save_invstd : array_like of shape (C,)
        The statistics ``batch_norm_forward`` saved; used when ``training=True``.
    training : bool
        Whether the forward normalized with the batch statistics.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last (N, *spatial, C).

    Returns
    -------
    grad_input : ndarray
        Of the input's shape.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None when weight is None.
    """
    x, grad_output = _channels_first(input, axis), _channels_first(grad_output, axis)
    if training:
        mean, invstd = _float64(save_mean), _float64(save_invstd)
    else:
        mean, invstd = _float64(running_mean), 1.0 / np.sqrt(_float64(running_var) + eps)
    sum_dy, sum_dy_xmu, grad_weight, grad_bias = batch_norm_backward_reduce(
        grad_output, x, mean, invstd, weight
    )
    if training:
        count = x.shape[0] * math.prod(x.shape[2:])
        grad_input = batch_norm_backward_elemt(
            grad_output, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count
        )
    else:
        dy = _channels(grad_output)
        grad_input = _affine(dy * invstd[:, None], weight, None, (-1, 1)).reshape(x.shape)
    return _rounded_like(_channels_back(grad_input, axis), input), grad_weight, grad_bias


# Split phase: the building blocks of synchronized batch norm, where P processes each hold a part
# of the batch. Forward: batch_norm_stats on each part, exchange, batch_norm_gather_stats,
# batch_norm_elemt on each part. Backward: batch_norm_backward_reduce on each part, sum the
# reductions over processes, batch_norm_backward_elemt on each part.

def batch_norm_stats(input: ArrayLike, *, axis: int = 1) -> tuple[NDArray, NDArray, int]:
    """Per-channel partial statistics of one process's part of the batch: (mean, m2, count).

        count = N * S,  mean_c = sum(x) / count,  m2_c = sum((x - mean_c)^2)

    m2 is the sum of squared deviations, not yet divided by anything: that is what merges exactly
    across processes. An empty part gives mean 0 and m2 0, not 0/0. `axis`: the channel axis.

    Parameters
    ----------
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``.
        Any real dtype, computed in float64.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last (N, *spatial, C).

    Returns
    -------
    mean, m2 : ndarray of shape (C,), float64
        The mean and m2 = Σ(x - mean)² per channel; partials of several processes (or
        chunks) merge exactly with ``batch_norm_gather_stats``. An empty part gives 0 and 0.
    count : int
        The number of values per channel (0 for an empty part, which can still take part in
        a synchronized step).
    """
    x = _channels(_channels_first(input, axis))
    count = x.shape[0] * x.shape[2]
    mean = x.sum(axis=(0, 2)) / max(count, 1)
    m2 = ((x - mean[:, None]) ** 2).sum(axis=(0, 2))
    return mean, m2, count


def batch_norm_gather_stats(mean: ArrayLike, m2: ArrayLike, count: int | ArrayLike,
                            running_mean: NDArray | None = None,
                            running_var: NDArray | None = None, momentum: float = 0.1,
                            eps: float = 1e-5, *, unbiased_running_var: bool = True
                            ) -> tuple[NDArray, NDArray]:
    """Merge the partial statistics of P processes into the batch's (mean, invstd).

    Row p of the (P, C) arrays `mean` and `m2` and entry p of `count` come from batch_norm_stats
    on process p ((C,) arrays and one count for a single process). Chan et al.'s parallel
    formula, written for P parts at once, gives exactly

        n = sum_p n_p
        mean = sum_p n_p * mean_p / n
        M2 = sum_p (m2_p + n_p * (mean_p - mean)^2)
        invstd = 1 / sqrt(M2 / n + eps)

    each part's spread about its own mean plus its mean's spread about the total mean. When n > 0,
    the running statistics, if given, are updated in place with the unbiased variance:

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * M2 / (n - 1)

    n == 1 makes that 0/0 = nan, as in torch. n == 0 gives mean 0 and invstd 1 / sqrt(eps).
    unbiased_running_var=False puts the biased M2 / n there instead (Keras's and d2l's convention).

    Parameters
    ----------
    mean, m2 : array_like of shape (P, C), or (C,) for one process
        ``batch_norm_stats`` results of the P processes.
    count : int or array_like of P integers
        Their counts, each >= 0, totalling below 2**63 and not exactly 1.
    running_mean, running_var : ndarray of shape (C,), optional
        Updated in place as the training forward does, with the total count (unchanged when
        it is 0). float32 or float64, the same for both.
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    unbiased_running_var : bool, default True
        As in ``batch_norm``. (No ``axis``: the partials are per channel already.)

    Returns
    -------
    mean, invstd : ndarray of shape (C,), float64
        The batch's mean and 1/sqrt(var + eps) per channel.
    """
    # (C,) arrays and a single count are one process's partials.
    part_means, part_m2s = np.atleast_2d(_float64(mean)), np.atleast_2d(_float64(m2))
    part_counts = np.atleast_1d(_float64(count))
    n = part_counts.sum()
    # max(n, 1): with n == 0 every numerator is 0 too, and the statistics come out as 0.
    total_mean = part_counts @ part_means / max(n, 1)
    total_m2 = (part_m2s + part_counts[:, None] * (part_means - total_mean) ** 2).sum(axis=0)
    if n > 0:
        var_count = n - 1 if unbiased_running_var else n
        _update_running_stats(running_mean, running_var, total_mean, total_m2 / var_count, momentum)
    return total_mean, 1.0 / np.sqrt(total_m2 / max(n, 1) + eps)


def batch_norm_elemt(input: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                     mean: ArrayLike, invstd: ArrayLike, *, axis: int = 1) -> NDArray:
    """The elementwise half of batch norm, given the batch statistics of channel c:

        y = (x - mean_c) * invstd_c * weight_c + bias_c

    Parameters
    ----------
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``.
        Any real dtype, computed in float64.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    mean, invstd : array_like of shape (C,)
        Per-channel statistics (computed in float64), e.g. from ``batch_norm_gather_stats``.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last (N, *spatial, C).

    Returns
    -------
    ndarray
        The normalized input.
    """
    x = _channels_first(input, axis)
    xhat = (_channels(x) - _float64(mean)[:, None]) * _float64(invstd)[:, None]
    return _channels_back(_affine(xhat, weight, bias, (-1, 1)).reshape(x.shape), axis)


def batch_norm_backward_reduce(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                               invstd: ArrayLike, weight: ArrayLike | None = None, *, axis: int = 1
                               ) -> tuple[NDArray, NDArray, NDArray | None, NDArray | None]:
    """The reduction half of the batch norm backward, per channel over one process's part:

        sum_dy = sum(dy),  sum_dy_xmu = sum(dy * (x - mean_c))
        grad_weight = sum_dy_xmu * invstd_c,  grad_bias = sum_dy

    Returns (sum_dy, sum_dy_xmu, grad_weight, grad_bias). Summed over processes, all four are the
    batch's: sum_dy and sum_dy_xmu feed batch_norm_backward_elemt.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``.
        Any real dtype, computed in float64.
    mean, invstd : array_like of shape (C,)
        The statistics the forward normalized with.
    weight : array_like of shape (C,), optional
        Only whether it is given matters: without it no parameter gradients are returned.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last (N, *spatial, C).

    Returns
    -------
    sum_dy, sum_dy_xmu : ndarray of shape (C,), float64
        Σ dy and Σ dy·(x - mean): what processes all-reduce in synchronized batch norm.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        sum_dy_xmu·invstd and sum_dy in float64; None when weight is None.
    """
    dy = _channels(_channels_first(grad_output, axis))
    x = _channels(_channels_first(input, axis))
    sum_dy = dy.sum(axis=(0, 2))
    sum_dy_xmu = (dy * (x - _float64(mean)[:, None])).sum(axis=(0, 2))
    if weight is None:
        return sum_dy, sum_dy_xmu, None, None
    return sum_dy, sum_dy_xmu, sum_dy_xmu * _float64(invstd), sum_dy.copy()


def batch_norm_backward_elemt(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                              invstd: ArrayLike, weight: ArrayLike | None, sum_dy: ArrayLike,
                              sum_dy_xmu: ArrayLike, count: int | ArrayLike, *, axis: int = 1
                              ) -> NDArray:
    """The elementwise half of the training-mode batch norm backward, given the reductions summed
    over all processes and the batch's total count:

        dx = weight_c * invstd_c
             * (dy - sum_dy_c / count - (x - mean_c) * invstd_c^2 * sum_dy_xmu_c / count)

    This is batch_norm_backward's training formula, with xhat * sum(dy * xhat) written as
    (x - mean) * invstd^2 * sum_dy_xmu. `count` may also be the per-process counts, which are
    summed, as torch.batch_norm_backward_elemt takes them.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``.
        Any real dtype, computed in float64.
    mean, invstd : array_like of shape (C,)
        The statistics the forward normalized with.
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    sum_dy, sum_dy_xmu : array_like of shape (C,)
        ``batch_norm_backward_reduce``'s sums, all-reduced over the processes.
    count : int or 1-D array_like of ints
        The batch's total count, or the per-process counts (summed), as PyTorch's
        ``batch_norm_backward_elemt`` takes them; > 0 for a non-empty input, below 2**63.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last (N, *spatial, C).

    Returns
    -------
    ndarray
        grad_input, of the input's shape.
    """
    x = _channels_first(input, axis)
    dy = _channels(_channels_first(grad_output, axis))
    mean, invstd = _float64(mean)[:, None], _float64(invstd)[:, None]
    count = np.sum(count)
    if count == 0 and x.size > 0:
        raise ValueError("count must be > 0 for a non-empty input")
    # An empty batch has no gradient to spread; max(..., 1) keeps 0/0 out of its empty result.
    count = max(count, 1)
    grad_xhat = (dy - _float64(sum_dy)[:, None] / count
                 - (_channels(x) - mean) * invstd**2 * _float64(sum_dy_xmu)[:, None] / count)
    return _channels_back(_affine(grad_xhat * invstd, weight, None, (-1, 1)).reshape(x.shape), axis)


# ---------------------------------------------------------------------------------------------
# Layer norm: statistics per leading index over the trailing normalized_shape
# ---------------------------------------------------------------------------------------------

def layer_norm(input: ArrayLike, normalized_shape: int | Sequence[int],
               weight: ArrayLike | None = None, bias: ArrayLike | None = None, eps: float = 1e-5
               ) -> NDArray:
    """Layer norm as torch.nn.functional.layer_norm: the output of layer_norm_forward.

    Parameters
    ----------
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``.
        Any real dtype, computed in float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight, bias : array_like of shape normalized_shape, optional
        Elementwise scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.

    Returns
    -------
    ndarray
        The normalized input.
    """
    return layer_norm_forward(input, normalized_shape, weight, bias, eps)[0]


def layer_norm_forward(input: ArrayLike, normalized_shape: int | Sequence[int],
                       weight: ArrayLike | None, bias: ArrayLike | None, eps: float
                       ) -> tuple[NDArray, NDArray, NDArray]:
    """Layer norm with its statistics, as torch.ops.aten.native_layer_norm: (output, mean, rstd).

    For each leading index, over the n values of the trailing dims D named by normalized_shape:

        mean = sum_D(x) / n,  var = sum_D((x - mean)^2) / n,  rstd = 1 / sqrt(var + eps)
        y = (x - mean) * rstd * weight + bias          (weight and bias of shape normalized_shape)

    mean and rstd have shape input.shape[:-len(normalized_shape)] (torch keeps trailing 1s).

    Parameters
    ----------
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``.
        Any real dtype, computed in float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight, bias : array_like of shape normalized_shape, optional
        Elementwise scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.

    Returns
    -------
    output : ndarray
        The normalized input.
    mean, rstd : ndarray of shape ``input.shape[:-len(normalized_shape)]``
        Per row, in float64, rstd = 1/sqrt(var + eps), as ``layer_norm_backward``
        needs them. A row of no values has mean 0 and rstd NaN, as in PyTorch.
    """
    x = _float64(input)
    axes = _trailing_axes(x, normalized_shape)
    xhat, mean, rstd = _standardize(x, axes, eps)
    leading_shape, normalized = x.shape[:axes[0]], x.shape[axes[0]:]
    output = _affine(xhat, weight, bias, normalized)
    return output, mean.reshape(leading_shape), rstd.reshape(leading_shape)


def layer_norm_backward(grad_output: ArrayLike, input: ArrayLike,
                        normalized_shape: int | Sequence[int], mean: ArrayLike, rstd: ArrayLike,
                        weight: ArrayLike | None
                        ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Layer norm backward, as torch.ops.aten.native_layer_norm_backward.

    With xhat = (x - mean) * rstd and g = dy * weight, means over the normalized dims D and
    sums over the leading dims:

        dx = rstd * (g - mean_D(g) - xhat * mean_D(g * xhat))
        grad_weight = sum(dy * xhat),  grad_bias = sum(dy)

    Returns (grad_input, grad_weight, grad_bias).

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``.
        Any real dtype, computed in float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    mean, rstd : array_like
        From ``layer_norm_forward`` (PyTorch's shape with trailing 1s is accepted too).
    weight : array_like of shape normalized_shape, optional
        The forward's weight (1 when None).

    Returns
    -------
    grad_input : ndarray
        Of the input's shape.
    grad_weight, grad_bias : ndarray of shape normalized_shape, or None
        None when weight is None.
    """
    x, dy = _float64(input), _float64(grad_output)
    axes = _trailing_axes(x, normalized_shape)
    leading_axes, normalized = tuple(range(axes[0])), x.shape[axes[0]:]
    stats_shape = x.shape[:axes[0]] + (1,) * len(axes)
    rstd = _float64(rstd).reshape(stats_shape)
    xhat = (x - _float64(mean).reshape(stats_shape)) * rstd
    grad_input = _standardize_backward(_affine(dy, weight, None, normalized), xhat, rstd, axes)
    if weight is None:
        return grad_input, None, None
    return grad_input, (dy * xhat).sum(axis=leading_axes), dy.sum(axis=leading_axes)


# ---------------------------------------------------------------------------------------------
# Group norm: statistics per sample and group of channels
# ---------------------------------------------------------------------------------------------

def group_norm(input: ArrayLike, num_groups: int, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, eps: float = 1e-5, *, axis: int = 1) -> NDArray:
    """Group norm as torch.nn.functional.group_norm: the output of group_norm_forward.

    Parameters
    ----------
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``.
        Any real dtype, computed in float64.
    num_groups : int
        >= 1, dividing C.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data; not 0 (the samples).

    Returns
    -------
    ndarray
        The normalized input.
    """
    return group_norm_forward(input, num_groups, weight, bias, eps, axis=axis)[0]


def group_norm_forward(input: ArrayLike, num_groups: int, weight: ArrayLike | None,
                       bias: ArrayLike | None, eps: float, *, axis: int = 1
                       ) -> tuple[NDArray, NDArray, NDArray]:
    """Group norm with its statistics, as torch.ops.aten.native_group_norm: (output, mean, rstd).

    The C channels form G = num_groups contiguous groups of C/G. For sample n and group g, over the
    n_g = C/G * S values of the group's channels:

        mean = sum(x) / n_g,  var = sum((x - mean)^2) / n_g,  rstd = 1 / sqrt(var + eps)
        y = (x - mean) * rstd * weight_c + bias_c      (weight and bias per channel, shape (C,))

    mean and rstd have shape (N, G). `axis` is the channel axis (1, or -1 for channels-last
    (N, *, C) data); the output has the input's shape.

    Parameters
    ----------
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``.
        Any real dtype, computed in float64.
    num_groups : int
        >= 1, dividing C.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data; not 0 (the samples).

    Returns
    -------
    output : ndarray
        The normalized input.
    mean, rstd : ndarray of shape (N, num_groups)
        Per sample and group, in float64, rstd = 1/sqrt(var + eps). A group of no
        values has mean 0 and rstd NaN, as in PyTorch.
    """
    _check_num_groups(num_groups)
    x = _channels_first(input, axis, batch_axis_allowed=False)
    xhat, mean, rstd = _standardize(_grouped(x, num_groups), (2, 3), eps)
    output = _affine(_channels(xhat.reshape(x.shape)), weight, bias, (-1, 1)).reshape(x.shape)
    return (_channels_back(output, axis), mean.reshape(x.shape[0], num_groups),
            rstd.reshape(x.shape[0], num_groups))


def group_norm_backward(grad_output: ArrayLike, input: ArrayLike, num_groups: int, mean: ArrayLike,
                        rstd: ArrayLike, weight: ArrayLike | None, *, axis: int = 1
                        ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Group norm backward, as torch.ops.aten.native_group_norm_backward.

    With xhat = (x - mean) * rstd and g = dy * weight_c, means over each group's values and sums per
    channel over N and S:

        dx = rstd * (g - mean_group(g) - xhat * mean_group(g * xhat))
        grad_weight = sum(dy * xhat),  grad_bias = sum(dy)

    Returns (grad_input, grad_weight, grad_bias). `axis`: the channel axis, as in group_norm_forward.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``.
        Any real dtype, computed in float64.
    num_groups : int
        As in the forward.
    mean, rstd : array_like of shape (N, num_groups)
        From ``group_norm_forward``.
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data; not 0 (the samples).

    Returns
    -------
    grad_input : ndarray
        Of the input's shape.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None when weight is None.
    """
    _check_num_groups(num_groups)
    return _group_norm_backward(grad_output, input, num_groups, mean, rstd, weight, axis)


def _group_norm_backward(grad_output, input, num_groups, mean, rstd, weight, axis):
    """group_norm_backward, num_groups = 0 allowed for C = 0 (instance norm of no channels)."""
    x = _channels_first(input, axis, batch_axis_allowed=False)
    dy = _channels(_channels_first(grad_output, axis))
    groups = _grouped(x, num_groups)
    stats_shape = (x.shape[0], num_groups, 1, 1)
    rstd = _float64(rstd).reshape(stats_shape)
    xhat = (groups - _float64(mean).reshape(stats_shape)) * rstd
    grad_xhat = _affine(dy, weight, None, (-1, 1)).reshape(groups.shape)
    grad_input = _channels_back(_standardize_backward(grad_xhat, xhat, rstd, (2, 3)).reshape(x.shape),
                                axis)
    if weight is None:
        return grad_input, None, None
    xhat = xhat.reshape(dy.shape)
    return grad_input, (dy * xhat).sum(axis=(0, 2)), dy.sum(axis=(0, 2))


# ---------------------------------------------------------------------------------------------
# Instance norm: statistics per sample and channel
# ---------------------------------------------------------------------------------------------

def instance_norm(input: ArrayLike, running_mean: NDArray | None = None,
                  running_var: NDArray | None = None, weight: ArrayLike | None = None,
                  bias: ArrayLike | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1) -> NDArray:
    """Instance norm as torch.nn.functional.instance_norm: the output of instance_norm_forward.

    Parameters
    ----------
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``.
        Any real dtype, computed in float64.
    running_mean, running_var : ndarray of shape (C,), optional
        Required without ``use_input_stats``; updated in place with it.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    use_input_stats : bool
        Normalize with each instance's statistics (True) or the running ones.
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data; not 0 (the samples).

    Returns
    -------
    ndarray
        The normalized input.
    """
    return instance_norm_forward(
        input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, axis=axis
    )[0]


def instance_norm_forward(input: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                          running_mean: NDArray | None, running_var: NDArray | None,
                          use_input_stats: bool, momentum: float, eps: float, *, axis: int = 1
                          ) -> tuple[NDArray, NDArray, NDArray]:
    """Instance norm with its statistics: (output, mean, rstd).

    With use_input_stats, sample n and channel c are normalized over their own S values, which
    is group norm with one channel per group:

        mean = sum_S(x) / S,  var = sum_S((x - mean)^2) / S,  rstd = 1 / sqrt(var + eps)
        y = (x - mean) * rstd * weight_c + bias_c

    and the running statistics, if given, move in place toward the batch averages of the
    per-instance statistics, the variances unbiased:

        running_mean = (1 - momentum) * running_mean + momentum * mean_N(mean)
        running_var  = (1 - momentum) * running_var  + momentum * mean_N(var * S / (S - 1))

    mean and rstd have shape (N, C). S == 1 raises ValueError, as torch.nn.functional.instance_norm
    does. An empty batch leaves the running statistics unchanged.

    Without use_input_stats this is batch norm in eval mode: the running statistics normalize,
    and empty (0,) arrays stand in for mean and rstd, as batch_norm_forward returns them.
    `axis`: the channel axis, as in group_norm_forward.

    Parameters
    ----------
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``.
        Any real dtype, computed in float64.
    running_mean, running_var : ndarray of shape (C,), optional
        Required without ``use_input_stats``; updated in place with it.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    use_input_stats : bool
        Normalize with each instance's statistics (True) or the running ones.
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data; not 0 (the samples).

    Returns
    -------
    output : ndarray
        The normalized input.
    mean, rstd : ndarray of shape (N, C)
        Per instance, in float64, rstd = 1/sqrt(var + eps); without
        ``use_input_stats``, the empty arrays ``batch_norm_forward`` returns in evaluation.
    """
    x = _channels_first(input, axis, batch_axis_allowed=False)
    if not use_input_stats:
        output, mean, rstd = batch_norm_forward(x, weight, bias, running_mean, running_var, False,
                                                momentum, eps)
        return _channels_back(output, axis), mean, rstd

    spatial_size = math.prod(x.shape[2:])
    if spatial_size == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {np.shape(input)}"
        )
    xhat, mean, rstd = _standardize(_grouped(x, x.shape[1]), (2, 3), eps)
    output = _affine(_channels(xhat.reshape(x.shape)), weight, bias, (-1, 1)).reshape(x.shape)
    mean, rstd = mean.reshape(x.shape[:2]), rstd.reshape(x.shape[:2])
    if x.shape[0] * spatial_size > 0:
        unbiased_var = ((_channels(x) - mean[:, :, None]) ** 2).sum(axis=2) / (spatial_size - 1)
        _update_running_stats(
            running_mean, running_var, mean.mean(axis=0), unbiased_var.mean(axis=0), momentum
        )
    return _channels_back(output, axis), mean, rstd


def instance_norm_backward(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                           rstd: ArrayLike, weight: ArrayLike | None, *, axis: int = 1
                           ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Instance norm backward with the input's own statistics: group norm's with one channel per
    group (see group_norm_backward). Returns (grad_input, grad_weight, grad_bias).

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        (N, C, *spatial) data, or channels along ``axis``.
        Any real dtype, computed in float64.
    mean, rstd : array_like of shape (N, C)
        From ``instance_norm_forward``.
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data; not 0 (the samples).

    Returns
    -------
    grad_input : ndarray
        Of the input's shape.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        None when weight is None.
    """
    x = _channels_first(input, axis, batch_axis_allowed=False)
    grad_input, grad_weight, grad_bias = _group_norm_backward(
        _channels_first(grad_output, axis), x, x.shape[1], mean, rstd, weight, 1
    )
    return _channels_back(grad_input, axis), grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# RMS norm: root mean square per leading index over the trailing normalized_shape
# ---------------------------------------------------------------------------------------------

def _rms_norm_default_eps(dtype):
    """torch's eps=None: the machine epsilon of the type torch computes in. That is float32 for
    float16 input too (torch's "opmath" type for half precision), and we compute non-float input
    in float64.
    """
    if dtype.kind != "f":
        return np.finfo(np.float64).eps
    return np.finfo(np.promote_types(dtype, np.float32)).eps


def rms_norm(input: ArrayLike, normalized_shape: int | Sequence[int],
             weight: ArrayLike | None = None, eps: float | None = None) -> NDArray:
    """RMS norm as torch.nn.functional.rms_norm: the output of rms_norm_forward.

    Parameters
    ----------
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``.
        Any real dtype, computed in float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight : array_like of shape normalized_shape, optional
        Elementwise scale (1 when None).
    eps : float, optional
        Finite and >= 0; None is the machine epsilon of the input's floating type (float32's
        for float16 input, float64's for integers), as in PyTorch.

    Returns
    -------
    ndarray
        The normalized input.
    """
    return rms_norm_forward(input, normalized_shape, weight, eps)[0]


def rms_norm_forward(input: ArrayLike, normalized_shape: int | Sequence[int],
                     weight: ArrayLike | None, eps: float | None) -> tuple[NDArray, NDArray]:
    """RMS norm with its statistic, as torch.ops.aten._fused_rms_norm: (output, rstd).

    For each leading index, over the n values of the trailing dims D named by normalized_shape:

        rstd = 1 / sqrt(sum_D(x^2) / n + eps),  y = x * rstd * weight

    No mean is subtracted and there is no bias. eps=None means the machine epsilon of the input's
    floating type, float32's for float16 input (see _rms_norm_default_eps). rstd has shape
    input.shape[:-len(normalized_shape)].

    Parameters
    ----------
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``.
        Any real dtype, computed in float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight : array_like of shape normalized_shape, optional
        Elementwise scale (1 when None).
    eps : float, optional
        Finite and >= 0; None is the machine epsilon of the input's floating type (float32's
        for float16 input, float64's for integers), as in PyTorch.

    Returns
    -------
    output : ndarray
        The normalized input.
    rstd : ndarray of shape ``input.shape[:-len(normalized_shape)]``
        1/sqrt(mean(x²) + eps) per row, in float64.
    """
    input = np.asarray(input)
    if eps is None:
        eps = _rms_norm_default_eps(input.dtype)
    x = _float64(input)
    axes = _trailing_axes(x, normalized_shape)
    rstd = 1.0 / np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)
    output = _affine(x * rstd, weight, None, x.shape[axes[0]:])
    return output, rstd.reshape(x.shape[:axes[0]])


def rms_norm_backward(grad_output: ArrayLike, input: ArrayLike,
                      normalized_shape: int | Sequence[int], rstd: ArrayLike,
                      weight: ArrayLike | None) -> tuple[NDArray, NDArray | None]:
    """RMS norm backward, as torch.ops.aten._fused_rms_norm_backward.

    With xhat = x * rstd and g = dy * weight, means over the normalized dims D and sums over the
    leading dims:

        dx = rstd * (g - xhat * mean_D(g * xhat))
        grad_weight = sum(dy * xhat)

    Returns (grad_input, grad_weight).

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data whose trailing dimensions are ``normalized_shape``.
        Any real dtype, computed in float64.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    rstd : array_like
        From ``rms_norm_forward`` (PyTorch's shape with trailing 1s is accepted too).
    weight : array_like of shape normalized_shape, optional
        The forward's weight (1 when None).

    Returns
    -------
    grad_input : ndarray
        Of the input's shape.
    grad_weight : ndarray of shape normalized_shape, or None
        None when weight is None.
    """
    x, dy = _float64(input), _float64(grad_output)
    axes = _trailing_axes(x, normalized_shape)
    leading_axes, normalized = tuple(range(axes[0])), x.shape[axes[0]:]
    rstd = _float64(rstd).reshape(x.shape[:axes[0]] + (1,) * len(axes))
    xhat = x * rstd
    grad_xhat = _affine(dy, weight, None, normalized)
    grad_input = _standardize_backward(grad_xhat, xhat, rstd, axes, centered=False)
    if weight is None:
        return grad_input, None
    return grad_input, (dy * xhat).sum(axis=leading_axes)


# ---------------------------------------------------------------------------------------------
# Fused batch norm + (add +) ReLU, and folding batch norm into the layer before it
# ---------------------------------------------------------------------------------------------

def _relu(v):
    """0 where v < 0, else v: NaN and -0.0 are kept, as torch.relu keeps them."""
    return np.where(v < 0, 0.0, v)


def _same_shape(value, name, shape):
    """value as float64, which must have the input's shape."""
    array = _float64(value)
    if array.shape != tuple(shape):
        raise ValueError(f"{name} has shape {array.shape} but input has shape {tuple(shape)}")
    return array


def batch_norm_relu(input: ArrayLike, running_mean: NDArray | None, running_var: NDArray | None,
                    weight: ArrayLike | None = None, bias: ArrayLike | None = None,
                    training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                    residual: ArrayLike | None = None, axis: int = 1,
                    unbiased_running_var: bool = True) -> NDArray:
    """relu(batch_norm(input) + residual): the output of batch_norm_relu_forward."""
    return batch_norm_relu_forward(input, weight, bias, running_mean, running_var, training,
                                   momentum, eps, residual=residual, axis=axis,
                                   unbiased_running_var=unbiased_running_var)[0]


def batch_norm_relu_forward(input: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                            running_mean: NDArray | None, running_var: NDArray | None,
                            training: bool, momentum: float, eps: float, *,
                            residual: ArrayLike | None = None, axis: int = 1,
                            unbiased_running_var: bool = True
                            ) -> tuple[NDArray, NDArray, NDArray]:
    """Batch norm, then the residual added, then ReLU:

        y = batch_norm_forward(...)'s output,   output = relu(y + residual)

    relu(v) = 0 where v < 0, else v; no residual: relu(y).

    Parameters
    ----------
    input, weight, bias, running_mean, running_var, training, momentum, eps, axis,
    unbiased_running_var
        As in ``batch_norm_forward`` (the running statistics updated in place in training).
    residual : array_like, optional
        Of the input's shape.

    Returns
    -------
    output : ndarray
        relu(y + residual).
    save_mean, save_invstd : ndarray
        As ``batch_norm_forward`` saves them.
    """
    if residual is not None:
        residual = _same_shape(residual, "residual", np.shape(input))
    y, save_mean, save_invstd = batch_norm_forward(
        input, weight, bias, running_mean, running_var, training, momentum, eps, axis=axis,
        unbiased_running_var=unbiased_running_var)
    if residual is not None:
        y = y + residual
    return _relu(y), save_mean, save_invstd


def batch_norm_relu_backward(grad_output: ArrayLike, output: ArrayLike, input: ArrayLike,
                             weight: ArrayLike | None, running_mean: ArrayLike | None,
                             running_var: ArrayLike | None, save_mean: ArrayLike | None,
                             save_invstd: ArrayLike | None, training: bool, eps: float, *,
                             residual_grad: bool = False, axis: int = 1
                             ) -> tuple[NDArray, NDArray | None, NDArray | None, NDArray | None]:
    """Backward of batch_norm_relu_forward. The ReLU passed a value where output > 0 (a NaN
    output counts as passed, as in torch's threshold_backward), so the gradient reaching the
    batch norm and the residual is

        g = 0 where output <= 0, else grad_output

    Parameters
    ----------
    grad_output : array_like
        Of the input's shape.
    output : array_like
        The forward's output, of the input's shape.
    input, weight, running_mean, running_var, save_mean, save_invstd, training, eps, axis
        As in ``batch_norm_backward``.
    residual_grad : bool, default False
        Also return g, the residual's gradient.

    Returns
    -------
    grad_input, grad_weight, grad_bias
        batch_norm_backward's for g.
    grad_residual : ndarray or None
        g when residual_grad is true, else None.
    """
    shape = np.shape(input)
    mask_off = _same_shape(output, "output", shape) <= 0
    grad = np.where(mask_off, 0.0, _same_shape(grad_output, "grad_output", shape))
    grad_input, grad_weight, grad_bias = batch_norm_backward(
        grad, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
        axis=axis)
    return grad_input, grad_weight, grad_bias, (grad if residual_grad else None)


def fold_batch_norm(weight: ArrayLike, bias: ArrayLike | None, running_mean: ArrayLike,
                    running_var: ArrayLike, bn_weight: ArrayLike | None,
                    bn_bias: ArrayLike | None, eps: float = 1e-5) -> tuple[NDArray, NDArray]:
    """The layer (weight, bias), output channels along axis 0 of weight, followed by an
    evaluation-mode batch norm, as one layer: per output channel c,

        scale_c       = bn_weight_c / sqrt(running_var_c + eps)
        folded_weight = weight[c] * scale_c
        folded_bias_c = (bias_c - running_mean_c) * scale_c + bn_bias_c

    A missing bias or bn_bias is 0, a missing bn_weight 1.

    Returns
    -------
    folded_weight : ndarray
        Of weight's shape.
    folded_bias : ndarray of shape (C_out,)
    """
    w = _float64(weight)
    scale = 1.0 / np.sqrt(_float64(running_var) + eps)
    if bn_weight is not None:
        scale = scale * _float64(bn_weight)
    bias = np.zeros(w.shape[0]) if bias is None else _float64(bias)
    folded_bias = (bias - _float64(running_mean)) * scale
    if bn_bias is not None:
        folded_bias = folded_bias + _float64(bn_bias)
    return w * scale.reshape((-1,) + (1,) * (w.ndim - 1)), folded_bias
