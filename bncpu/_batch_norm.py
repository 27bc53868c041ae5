"""Batch norm: the public Python functions (validation in bncpu._validate, kernels in
bncpu/_kernels/batch_norm.pyx, reached through bncpu._ops).

Each public function checks its arguments once and then calls a ``run_*`` function,
which only calls the kernel and turns its status into an exception. The layers
(bncpu.nn) and synchronized batch norm (bncpu.distributed) check what they receive and
call the ``run_*`` functions too, so no argument is checked twice in Python; the C
entries keep their own checks, as the public C API must.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bncpu import _validate as v
from bncpu._ops import batch_norm as _bn
from bncpu._status import raise_for_status


# ----------------------------------------------------------------------------------
# Batch norm
# ----------------------------------------------------------------------------------
def batch_norm(input: ArrayLike, running_mean: NDArray | None, running_var: NDArray | None,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               out: NDArray | None = None, axis: int = 1,
               unbiased_running_var: bool = True) -> NDArray:
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Per channel over the other values of the input:
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``. With ``training=True`` the batch
    statistics are used and the running statistics, when given, are updated in place;
    with ``training=False`` the running statistics are used.

    Parameters
    ----------
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``. float32, float64, float16
        and bfloat16 (``ml_dtypes.bfloat16``) are kept, the half-precision ones computed in
        float32 and returned in their dtype; integers and bool are computed as float64.
    running_mean, running_var : ndarray of shape (C,) or None
        Running statistics in the compute dtype (float32 for float16 and bfloat16 input;
        in evaluation they may also have the input's dtype). Required when ``training=False``. In
        training they are updated in place, so they must be writeable, C-contiguous, in
        native byte order, apart from each other and from ``out``.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    training : bool
        Use (and record) the batch statistics rather than the running ones.
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    out : ndarray, optional
        Where to write the result: of the input's shape, writeable, castable from the
        compute dtype under 'same_kind'. It may be the input itself.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last
        (N, *spatial, C). Any axis runs on the input's own memory.
    unbiased_running_var : bool, default True
        Blend the unbiased batch variance into ``running_var`` (PyTorch); False blends the
        biased one, as Keras and d2l do.

    Returns
    -------
    ndarray
        The normalized input, of its shape and layout (``out`` itself when given).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                              momentum, eps, out=out, axis=axis,
                              unbiased_running_var=unbiased_running_var)[0]


def batch_norm_forward(input: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                       running_mean: NDArray | None, running_var: NDArray | None,
                       training: bool, momentum: float, eps: float, *,
                       out: NDArray | None = None, axis: int = 1,
                       unbiased_running_var: bool = True
                       ) -> tuple[NDArray, NDArray, NDArray]:
    """Batch norm with its saved statistics, as ``torch.ops.aten.native_batch_norm``.

    The arguments are those of ``batch_norm``, in PyTorch's order for this operator.

    Returns
    -------
    output : ndarray
        As ``batch_norm`` returns it (``out`` itself when given).
    save_mean, save_invstd : ndarray of shape (C,)
        In training, the batch mean and 1/sqrt(var + eps) per channel in the compute dtype,
        as ``batch_norm_backward`` needs them; in evaluation empty arrays, as in PyTorch.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    x, layout, w, b, rm, rv, training, momentum, eps = forward_args(
        input, weight, bias, running_mean, running_var, training, momentum, eps, axis, out,
        half=True)
    unbiased_running_var = v.check_flag(unbiased_running_var, "unbiased_running_var")
    result = v.Output(out, x.shape, x.dtype, (x, w, b, rm, rv))
    save_mean, save_invstd = run_forward(x, result.target, layout, w, b, rm, rv, training,
                                         momentum, eps, unbiased_running_var)
    return result.finish(), save_mean, save_invstd


def run_forward(x, y, layout, w, b, rm, rv, training, momentum, eps, unbiased_running_var):
    """The forward kernel on checked arguments (``forward_args``'s): writes ``y``, returns
    (save_mean, save_invstd)."""
    n, c, s = layout
    if training:
        save_mean = np.empty(c, v.param_dtype(x.dtype))
        save_invstd = np.empty(c, v.param_dtype(x.dtype))
        raise_for_status(_bn.forward_train(x, y, n, c, s, w, b, rm, rv, momentum, eps,
                                           save_mean, save_invstd, unbiased_running_var))
    else:
        save_mean = save_invstd = np.empty(0, v.param_dtype(x.dtype))
        raise_for_status(_bn.forward_eval(x, y, n, c, s, w, b, rm, rv, eps))
    return save_mean, save_invstd


def batch_norm_backward(grad_output: ArrayLike, input: ArrayLike, weight: ArrayLike | None,
                        running_mean: ArrayLike | None, running_var: ArrayLike | None,
                        save_mean: ArrayLike | None, save_invstd: ArrayLike | None,
                        training: bool, eps: float, *, out: NDArray | None = None,
                        axis: int = 1
                        ) -> tuple[NDArray, NDArray | None, NDArray | None]:
    """Batch norm backward, as ``torch.ops.aten.native_batch_norm_backward``.

    Training (statistics from the forward, x̂ = (x - save_mean)·save_invstd):
    ``grad_input = weight·save_invstd·(dy - mean(dy) - x̂·mean(dy·x̂))``,
    ``grad_weight = Σ dy·x̂``, ``grad_bias = Σ dy``. Evaluation (the running statistics
    are constants): ``grad_input = dy·weight/sqrt(running_var + eps)``.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``. float32, float64, float16
        and bfloat16 (``ml_dtypes.bfloat16``) are kept, the half-precision ones computed in
        float32 (their statistics, weight and gradients of weight and bias float32);
        integers and bool are computed as float64.
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
    out : ndarray, optional
        Receives grad_input, as ``out`` in ``batch_norm``; may be grad_output or input.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last
        (N, *spatial, C). Any axis runs on the input's own memory.

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
    x = v.as_input(input, half=True)
    dtype = x.dtype
    dy = v.grad_output(grad_output, x)
    layout = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    training = v.check_flag(training, "training")
    eps = v.check_eps(eps)
    w = v.per_channel(weight, "weight", layout[1], v.param_dtype(dtype))
    rm, rv, mean, invstd = backward_stats(layout[1], v.param_dtype(dtype), training, running_mean,
                                          running_var, save_mean, save_invstd)
    result = v.Output(out, x.shape, dtype, (dy, x, w))
    grad_weight, grad_bias = run_backward(dy, x, result.target, layout, w, rm, rv, mean, invstd,
                                          training, eps)
    return result.finish(), grad_weight, grad_bias


def run_backward(dy, x, dx, layout, w, rm, rv, mean, invstd, training, eps):
    """The backward kernel on checked arguments: writes ``dx``, returns (grad_weight,
    grad_bias), None without ``w``."""
    n, c, s = layout
    grad_weight = np.empty(c, v.param_dtype(x.dtype)) if w is not None else None
    grad_bias = np.empty(c, v.param_dtype(x.dtype)) if w is not None else None
    raise_for_status(_bn.backward(dy, x, dx, n, c, s, w, rm, rv, mean, invstd, training, eps,
                                  grad_weight, grad_bias))
    return grad_weight, grad_bias


def forward_args(input, weight, bias, running_mean, running_var, training, momentum, eps,
                 axis, out, half=False):
    """The checked arguments of a batch-norm forward, plain or fused:
    (x, (n, c, s), weight, bias, running_mean, running_var, training, momentum, eps).
    In training ``out`` must lie apart from the running statistics it would overwrite.
    half: float16 and bfloat16 input is kept (see v.as_input), its parameters and
    statistics float32 (v.param_dtype)."""
    x = v.as_input(input, half=half)
    layout = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum)
    training = v.check_flag(training, "training")
    w, b, rm, rv = channel_args(x, layout, weight, bias, running_mean, running_var, training)
    if training and out is not None:
        v.check_out_apart(out, running_mean=rm, running_var=rv)
    return x, layout, w, b, rm, rv, training, momentum, eps


def channel_args(x, layout, weight, bias, running_mean, running_var, training):
    """The checked (weight, bias, running_mean, running_var) of a forward of the checked
    input ``x`` of (outer, C, inner) ``layout``: the running statistics are required in
    evaluation and updated in training; training needs more than one value per channel."""
    n, c, s = layout
    dtype = v.param_dtype(x.dtype)
    rm, rv = v.running_pair(running_mean, running_var, c, dtype, required=not training,
                            updated=training, data_dtype=x.dtype)
    w = v.per_channel(weight, "weight", c, dtype)
    b = v.per_channel(bias, "bias", c, dtype)
    if training and n * s == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    return w, b, rm, rv


def backward_stats(c, dtype, training, running_mean, running_var, save_mean, save_invstd):
    """(running_mean, running_var, save_mean, save_invstd) of a batch-norm backward, plain or
    fused: the forward's saved statistics in training, the running ones in evaluation (the
    other pair None)."""
    if training:
        mean = v.per_channel(save_mean, "save_mean", c, dtype)
        invstd = v.per_channel(save_invstd, "save_invstd", c, dtype)
        if mean is None or invstd is None:
            raise ValueError("save_mean and save_invstd must be given when training=True")
        return None, None, mean, invstd
    rm = v.per_channel(running_mean, "running_mean", c, dtype)
    rv = v.per_channel(running_var, "running_var", c, dtype)
    if rm is None or rv is None:
        raise ValueError("running_mean and running_var must be given when training=False")
    return rm, rv, None, None


# ----------------------------------------------------------------------------------
# Batch norm, split phase: the steps of synchronized batch norm across processes
#   1. batch_norm_stats on each process's batch           -> (mean, m2, count)
#   2. all-gather those, batch_norm_gather_stats          -> global (mean, invstd)
#   3. batch_norm_elemt                                   -> output
#   backward: batch_norm_backward_reduce, all-reduce the two sums,
#             batch_norm_backward_elemt with the global count.
# ----------------------------------------------------------------------------------
def batch_norm_stats(input: ArrayLike, *, axis: int = 1) -> tuple[NDArray, NDArray, int]:
    """Local per-channel statistics of one process's part of a batch (synchronized batch
    norm, step 1).

    Parameters
    ----------
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``. float32 and float64 are
        kept; float16 is computed as float32, integers and bool as float64.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last
        (N, *spatial, C). Any axis runs on the input's own memory.

    Returns
    -------
    mean, m2 : ndarray of shape (C,), float64
        The mean and m2 = Σ(x - mean)² per channel; partials of several processes (or
        chunks) merge exactly with ``batch_norm_gather_stats``. An empty part gives 0 and 0.
    count : int
        The number of values per channel (0 for an empty part, which can still take part in
        a synchronized step).

    Raises
    ------
    TypeError, ValueError
        As ``batch_norm``.
    """
    x = v.as_input(input)
    return run_stats(x, v.channel_layout(x.shape, v.channel_axis(axis, x.ndim)))


def run_stats(x, layout):
    """(mean, m2, count) of the checked input ``x`` of (outer, C, inner) ``layout``."""
    n, c, s = layout
    mean = np.empty(c, np.float64)
    m2 = np.empty(c, np.float64)
    raise_for_status(_bn.stats(x, n, c, s, mean, m2))
    return mean, m2, n * s


def batch_norm_gather_stats(mean: ArrayLike, m2: ArrayLike, count: ArrayLike,
                            running_mean: NDArray | None = None,
                            running_var: NDArray | None = None, momentum: float = 0.1,
                            eps: float = 1e-5, *, unbiased_running_var: bool = True
                            ) -> tuple[NDArray, NDArray]:
    """Merge per-process partials into the batch's (mean, invstd) (synchronized batch norm,
    step 2).

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

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    mean = v.as_array(mean, "mean")
    m2 = v.as_array(m2, "m2")
    if mean.ndim == 1 and m2.ndim == 1:
        mean, m2 = mean[None, :], m2[None, :]
    if mean.ndim != 2 or m2.shape != mean.shape:
        raise ValueError(f"mean and m2 must both have shape (P, C), got {mean.shape} and {m2.shape}")
    p, c = mean.shape
    v.compute_dtype(mean.dtype, "mean")
    v.compute_dtype(m2.dtype, "m2")
    counts = v.check_counts(count, p)
    total = int(counts.sum())
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum)
    unbiased_running_var = v.check_flag(unbiased_running_var, "unbiased_running_var")
    dtype = (v.compute_dtype(running_mean.dtype, "running_mean")
             if isinstance(running_mean, np.ndarray) else np.dtype(np.float64))
    rm, rv = v.running_pair(running_mean, running_var, c, dtype, required=False)
    check_total_count(total)
    return run_gather_stats(np.ascontiguousarray(mean, np.float64),
                            np.ascontiguousarray(m2, np.float64), counts, rm, rv, momentum,
                            eps, unbiased_running_var, dtype == np.float32)


def check_total_count(total):
    """ValueError for a batch of one value per channel, which has no variance to train with."""
    if total == 1:
        raise ValueError("Expected more than 1 value per channel when training, got a total count of 1")


def run_gather_stats(means, m2s, counts, rm, rv, momentum, eps, unbiased_running_var,
                     float32_stats):
    """The global (mean, invstd) of checked (P, C) float64 partials and P int64 counts;
    ``float32_stats``: the running statistics' dtype (they may be None)."""
    p, c = means.shape
    mean = np.empty(c, np.float64)
    invstd = np.empty(c, np.float64)
    raise_for_status(_bn.gather_stats(p, c, means, m2s, counts, rm, rv, momentum, eps, mean,
                                      invstd, float32_stats, unbiased=unbiased_running_var))
    return mean, invstd


def batch_norm_elemt(input: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                     mean: ArrayLike, invstd: ArrayLike, *, out: NDArray | None = None,
                     axis: int = 1) -> NDArray:
    """Normalize with given per-channel statistics (synchronized batch norm, step 3):
    ``(x - mean)·invstd·weight + bias``.

    Parameters
    ----------
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``. float32 and float64 are
        kept; float16 is computed as float32, integers and bool as float64.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    mean, invstd : array_like of shape (C,)
        Per-channel statistics (computed in float64), e.g. from ``batch_norm_gather_stats``.
    out : ndarray, optional
        Where to write the result: of the input's shape, writeable, castable from the
        compute dtype under 'same_kind'. It may be the input itself.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last
        (N, *spatial, C). Any axis runs on the input's own memory.

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
    x = v.as_input(input)
    dtype = x.dtype
    layout = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    c = layout[1]
    w = v.per_channel(weight, "weight", c, dtype)
    b = v.per_channel(bias, "bias", c, dtype)
    mean = v.stats_array(mean, "mean", c)
    invstd = v.stats_array(invstd, "invstd", c)
    result = v.Output(out, x.shape, dtype, (x, w, b))
    run_elemt(x, result.target, layout, mean, invstd, w, b)
    return result.finish()


def run_elemt(x, y, layout, mean, invstd, w, b):
    """``y = (x - mean)·invstd·w + b`` on checked arguments."""
    n, c, s = layout
    raise_for_status(_bn.elemt(x, y, n, c, s, mean, invstd, w, b))


def _split_backward_args(grad_output, input, mean, invstd, weight, axis):
    """The checked arrays of the split-phase backward functions, and the (outer, C, inner)
    layout of the input."""
    x = v.as_input(input)
    dy = v.grad_output(grad_output, x)
    layout = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    c = layout[1]
    return (dy, x, v.stats_array(mean, "mean", c), v.stats_array(invstd, "invstd", c),
            v.per_channel(weight, "weight", c, x.dtype), layout)


def batch_norm_backward_reduce(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                               invstd: ArrayLike, weight: ArrayLike | None = None, *,
                               axis: int = 1
                               ) -> tuple[NDArray, NDArray, NDArray | None, NDArray | None]:
    """The per-channel sums of the batch-norm backward over one process's part.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``. float32, float64, float16
        and bfloat16 (``ml_dtypes.bfloat16``) are kept, the half-precision ones computed in
        float32 (their statistics, weight and gradients of weight and bias float32);
        integers and bool are computed as float64.
    mean, invstd : array_like of shape (C,)
        The statistics the forward normalized with.
    weight : array_like of shape (C,), optional
        Only whether it is given matters: without it no parameter gradients are returned.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last
        (N, *spatial, C). Any axis runs on the input's own memory.

    Returns
    -------
    sum_dy, sum_dy_xmu : ndarray of shape (C,), float64
        Σ dy and Σ dy·(x - mean): what processes all-reduce in synchronized batch norm.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        sum_dy_xmu·invstd and sum_dy in the compute dtype; None when weight is None.

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    dy, x, mean, invstd, w, layout = _split_backward_args(grad_output, input, mean, invstd,
                                                          weight, axis)
    return run_backward_reduce(dy, x, layout, mean, invstd, w)


def run_backward_reduce(dy, x, layout, mean, invstd, w):
    """``batch_norm_backward_reduce`` on checked arguments."""
    n, c, s = layout
    sum_dy = np.empty(c, np.float64)
    sum_dy_xmu = np.empty(c, np.float64)
    raise_for_status(_bn.backward_reduce(dy, x, n, c, s, mean, sum_dy, sum_dy_xmu))
    if w is None:
        return sum_dy, sum_dy_xmu, None, None
    return sum_dy, sum_dy_xmu, (sum_dy_xmu * invstd).astype(x.dtype), sum_dy.astype(x.dtype)


def batch_norm_backward_elemt(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                              invstd: ArrayLike, weight: ArrayLike | None, sum_dy: ArrayLike,
                              sum_dy_xmu: ArrayLike, count: int | ArrayLike, *,
                              out: NDArray | None = None, axis: int = 1) -> NDArray:
    """grad_input from the sums and count of all processes:
    ``weight·invstd·(dy - sum_dy/count - (x - mean)·invstd²·sum_dy_xmu/count)``.

    Parameters
    ----------
    grad_output : array_like
        dL/dy, of the input's shape.
    input : array_like
        Data of at least 2 dimensions, channels along ``axis``. float32, float64, float16
        and bfloat16 (``ml_dtypes.bfloat16``) are kept, the half-precision ones computed in
        float32 (their statistics, weight and gradients of weight and bias float32);
        integers and bool are computed as float64.
    mean, invstd : array_like of shape (C,)
        The statistics the forward normalized with.
    weight : array_like of shape (C,), optional
        The forward's weight (1 when None).
    sum_dy, sum_dy_xmu : array_like of shape (C,)
        ``batch_norm_backward_reduce``'s sums, all-reduced over the processes.
    count : int or 1-D array_like of ints
        The batch's total count, or the per-process counts (summed), as PyTorch's
        ``batch_norm_backward_elemt`` takes them; > 0 for a non-empty input, below 2**63.
    out : ndarray, optional
        Receives grad_input, as ``out`` in ``batch_norm``; may be grad_output or input.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial) data, -1 for channels-last
        (N, *spatial, C). Any axis runs on the input's own memory.

    Returns
    -------
    ndarray
        grad_input, of the input's shape (``out`` itself when given).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    dy, x, mean, invstd, w, layout = _split_backward_args(grad_output, input, mean, invstd,
                                                          weight, axis)
    c = layout[1]
    sum_dy = v.stats_array(sum_dy, "sum_dy", c)
    sum_dy_xmu = v.stats_array(sum_dy_xmu, "sum_dy_xmu", c)
    count = check_backward_count(v.total_count(count), x)
    result = v.Output(out, x.shape, x.dtype, (dy, x, w))
    run_backward_elemt(dy, x, result.target, layout, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    return result.finish()


def check_backward_count(count, x):
    """The batch's total count, checked against this part ``x`` of it."""
    if count == 0 and x.size > 0:
        raise ValueError("count must be > 0 for a non-empty input")
    return count


def run_backward_elemt(dy, x, dx, layout, mean, invstd, w, sum_dy, sum_dy_xmu, count):
    """``batch_norm_backward_elemt`` on checked arguments (``count`` the checked total)."""
    n, c, s = layout
    if x.size > 0:
        raise_for_status(_bn.backward_elemt(dy, x, dx, n, c, s, mean, invstd, w, sum_dy,
                                            sum_dy_xmu, count))
