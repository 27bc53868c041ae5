"""Batch norm: the public Python functions (validation in bncpu._validate, kernels in
bncpu/_kernels/batch_norm.pyx)."""
import numpy as np

from bncpu import _validate as v
from bncpu._dispatch import KERNELS

_bn = KERNELS["batch_norm"]


def _forward_train(x, y, n, c, s, w, b, rm, rv, momentum, eps, save_mean, save_invstd,
                   unbiased):
    """The training-forward kernel; the running variance takes the biased batch variance
    when ``unbiased`` is False (the kernel's statistics with momentum 1 into temporaries,
    then blended here)."""
    if unbiased or rm is None or n * s == 0:
        return _bn.forward_train(x, y, n, c, s, w, b, rm, rv, momentum, eps, save_mean,
                                 save_invstd)
    batch_mean, batch_var = np.zeros(c, rm.dtype), np.zeros(c, rv.dtype)
    status = _bn.forward_train(x, y, n, c, s, w, b, batch_mean, batch_var, 1.0, eps, save_mean,
                               save_invstd)
    if status == 0:
        _blend_biased(rm, rv, batch_mean, batch_var, n * s, momentum)
    return status


def _blend_biased(running_mean, running_var, batch_mean, unbiased_var, count, momentum):
    """running = (1 - momentum)·running + momentum·batch, in place, with the biased
    variance unbiased_var·(count - 1)/count."""
    biased_var = unbiased_var.astype(np.float64) * ((count - 1) / count)
    running_mean[...] = (1 - momentum) * running_mean.astype(np.float64) + momentum * batch_mean
    running_var[...] = (1 - momentum) * running_var.astype(np.float64) + momentum * biased_var


# ----------------------------------------------------------------------------------
# Batch norm
# ----------------------------------------------------------------------------------
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, out=None, axis=1, unbiased_running_var=True):
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Per channel (``axis``, 1 for (N, C, *spatial), -1 for channels-last (N, *spatial, C))
    over the other values of the input: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.
    With ``training=True`` the batch statistics are used and, when given,
    ``running_mean``/``running_var`` are updated in place (``new = (1 - momentum)·old +
    momentum·batch``, the variance unbiased, or biased with ``unbiased_running_var=False``
    as Keras and d2l keep it); with ``training=False`` the running statistics are used.
    Any ``axis`` runs on the input's own memory, and the output has the input's layout.
    Returns the output (``out`` itself when given).
    """
    return batch_norm_forward(input, weight, bias, running_mean, running_var, training,
                              momentum, eps, out=out, axis=axis,
                              unbiased_running_var=unbiased_running_var)[0]


def batch_norm_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                       *, out=None, axis=1, unbiased_running_var=True):
    """``torch.ops.aten.native_batch_norm``: returns (output, save_mean, save_invstd).

    In training, save_mean and save_invstd hold the batch mean and 1/sqrt(var + eps)
    per channel (the input's dtype), as ``batch_norm_backward`` needs them; in
    evaluation they are empty arrays, as in PyTorch. ``axis`` and
    ``unbiased_running_var`` as in ``batch_norm``.
    """
    x = v.as_input(input)
    dtype = x.dtype
    n, c, s = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    eps = v.check_eps(eps)
    momentum = v.check_momentum(momentum)
    training = v.check_flag(training, "training")
    unbiased_running_var = v.check_flag(unbiased_running_var, "unbiased_running_var")
    rm, rv = v.running_pair(running_mean, running_var, c, dtype, required=not training,
                            updated=training)
    w = v.per_channel(weight, "weight", c, dtype)
    b = v.per_channel(bias, "bias", c, dtype)
    if training and n * s == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    if training:
        v.check_out_apart(out, running_mean=rm, running_var=rv)
    result = v.Output(out, x.shape, dtype, (x, w, b, rm, rv))
    if training:
        save_mean = np.empty(c, dtype)
        save_invstd = np.empty(c, dtype)
        status = _forward_train(x, result.target, n, c, s, w, b, rm, rv, momentum, eps,
                                save_mean, save_invstd, unbiased_running_var)
    else:
        save_mean = save_invstd = np.empty(0, dtype)
        status = _bn.forward_eval(x, result.target, n, c, s, w, b, rm, rv, eps)
    v.raise_for_status(status)
    return result.finish(), save_mean, save_invstd


def batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean,
                        save_invstd, training, eps, *, out=None, axis=1):
    """``torch.ops.aten.native_batch_norm_backward``: (grad_input, grad_weight, grad_bias).

    Training (statistics from the forward, x̂ = (x - save_mean)·save_invstd):
    ``grad_input = weight·save_invstd·(dy - mean(dy) - x̂·mean(dy·x̂))``,
    ``grad_weight = Σ dy·x̂``, ``grad_bias = Σ dy``. Evaluation (running statistics are
    constants): ``grad_input = dy·weight/sqrt(running_var + eps)``. grad_weight and
    grad_bias are None when weight is None. ``out`` receives grad_input and may be
    grad_output or input itself. ``axis``: the channel axis, as in ``batch_norm``.
    """
    x = v.as_input(input)
    dtype = x.dtype
    dy = v.as_input(grad_output, "grad_output", dtype=dtype)
    v.same_shape(dy, "grad_output", x.shape)
    n, c, s = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    training = v.check_flag(training, "training")
    eps = v.check_eps(eps)
    w = v.per_channel(weight, "weight", c, dtype)
    if training:
        mean = v.per_channel(save_mean, "save_mean", c, dtype)
        invstd = v.per_channel(save_invstd, "save_invstd", c, dtype)
        if mean is None or invstd is None:
            raise ValueError("save_mean and save_invstd must be given when training=True")
        rm = rv = None
    else:
        rm = v.per_channel(running_mean, "running_mean", c, dtype)
        rv = v.per_channel(running_var, "running_var", c, dtype)
        if rm is None or rv is None:
            raise ValueError("running_mean and running_var must be given when training=False")
        mean = invstd = None
    result = v.Output(out, x.shape, dtype, (dy, x, w))
    grad_weight = np.empty(c, dtype) if w is not None else None
    grad_bias = np.empty(c, dtype) if w is not None else None
    status = _bn.backward(dy, x, result.target, n, c, s, w, rm, rv, mean, invstd, training, eps,
                          grad_weight, grad_bias)
    v.raise_for_status(status)
    return result.finish(), grad_weight, grad_bias


# ----------------------------------------------------------------------------------
# Batch norm, split phase: the steps of synchronized batch norm across processes
#   1. batch_norm_stats on each process's batch           -> (mean, m2, count)
#   2. all-gather those, batch_norm_gather_stats          -> global (mean, invstd)
#   3. batch_norm_elemt                                   -> output
#   backward: batch_norm_backward_reduce, all-reduce the two sums,
#             batch_norm_backward_elemt with the global count.
# ----------------------------------------------------------------------------------
def batch_norm_stats(input, *, axis=1):
    """Local per-channel statistics: (mean, m2, count), m2 = Σ(x - mean)², float64.

    Partials of several processes (or chunks) merge exactly with
    ``batch_norm_gather_stats``. An empty batch gives count 0 (mean and m2 zero), so a
    process without samples can still take part in a synchronized step. ``axis``: the
    channel axis, as in ``batch_norm``.
    """
    x = v.as_input(input)
    n, c, s = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    mean = np.empty(c, np.float64)
    m2 = np.empty(c, np.float64)
    v.raise_for_status(_bn.stats(x, n, c, s, mean, m2))
    return mean, m2, n * s


def batch_norm_gather_stats(mean, m2, count, running_mean=None, running_var=None,
                            momentum=0.1, eps=1e-5, *, unbiased_running_var=True):
    """Merge per-process partials into the global (mean, invstd), float64.

    ``mean`` and ``m2`` are (P, C) stacks (or (C,) for one process) of
    ``batch_norm_stats`` results and ``count`` the P counts. The running statistics,
    when given, are updated in place exactly as the training forward does, using the
    total count (the variance unbiased unless ``unbiased_running_var=False``). A total
    count of 0 leaves them unchanged. (No ``axis``: the partials are per channel already.)
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
    if total == 1:
        raise ValueError("Expected more than 1 value per channel when training, got a total count of 1")
    mean_out = np.empty(c, np.float64)
    invstd_out = np.empty(c, np.float64)
    mean = np.ascontiguousarray(mean, np.float64)
    m2 = np.ascontiguousarray(m2, np.float64)
    if rm is None or unbiased_running_var or total == 0:
        status = _bn.gather_stats(p, c, mean, m2, counts, rm, rv, momentum, eps, mean_out,
                                  invstd_out, dtype == np.float32)
    else:
        batch_mean, batch_var = np.zeros(c, dtype), np.zeros(c, dtype)
        status = _bn.gather_stats(p, c, mean, m2, counts, batch_mean, batch_var, 1.0, eps,
                                  mean_out, invstd_out, dtype == np.float32)
        if status == 0:
            _blend_biased(rm, rv, batch_mean, batch_var, total, momentum)
    v.raise_for_status(status)
    return mean_out, invstd_out


def batch_norm_elemt(input, weight, bias, mean, invstd, *, out=None, axis=1):
    """Normalize with given per-channel statistics: (x - mean)·invstd·weight + bias,
    the channels along ``axis`` (as in ``batch_norm``)."""
    x = v.as_input(input)
    dtype = x.dtype
    n, c, s = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    w = v.per_channel(weight, "weight", c, dtype)
    b = v.per_channel(bias, "bias", c, dtype)
    mean = v.stats_array(mean, "mean", c)
    invstd = v.stats_array(invstd, "invstd", c)
    result = v.Output(out, x.shape, dtype, (x, w, b))
    v.raise_for_status(_bn.elemt(x, result.target, n, c, s, mean, invstd, w, b))
    return result.finish()


def _split_backward_args(grad_output, input, mean, invstd, weight, axis):
    """The checked arrays of the split-phase backward functions, and the (outer, C, inner)
    layout of the input."""
    x = v.as_input(input)
    dy = v.as_input(grad_output, "grad_output", dtype=x.dtype)
    v.same_shape(dy, "grad_output", x.shape)
    layout = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    c = layout[1]
    return (dy, x, v.stats_array(mean, "mean", c), v.stats_array(invstd, "invstd", c),
            v.per_channel(weight, "weight", c, x.dtype), layout)


def batch_norm_backward_reduce(grad_output, input, mean, invstd, weight=None, *, axis=1):
    """Per-channel (sum_dy, sum_dy_xmu, grad_weight, grad_bias).

    ``sum_dy = Σ dy`` and ``sum_dy_xmu = Σ dy·(x - mean)`` (float64) are what processes
    all-reduce in synchronized batch norm; ``grad_weight = sum_dy_xmu·invstd`` and
    ``grad_bias = sum_dy`` (input dtype) are None when weight is None. ``axis``: the
    channel axis, as in ``batch_norm``.
    """
    dy, x, mean, invstd, w, (n, c, s) = _split_backward_args(grad_output, input, mean, invstd,
                                                             weight, axis)
    dtype = x.dtype
    sum_dy = np.empty(c, np.float64)
    sum_dy_xmu = np.empty(c, np.float64)
    v.raise_for_status(_bn.backward_reduce(dy, x, n, c, s, mean, sum_dy, sum_dy_xmu))
    if w is None:
        return sum_dy, sum_dy_xmu, None, None
    return sum_dy, sum_dy_xmu, (sum_dy_xmu * invstd).astype(dtype), sum_dy.astype(dtype)


def batch_norm_backward_elemt(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu,
                              count, *, out=None, axis=1):
    """grad_input from the global sums and count of all processes:
    ``weight·invstd·(dy - sum_dy/count - (x - mean)·invstd²·sum_dy_xmu/count)``, the
    channels along ``axis`` (as in ``batch_norm``)."""
    dy, x, mean, invstd, w, (n, c, s) = _split_backward_args(grad_output, input, mean, invstd,
                                                             weight, axis)
    dtype = x.dtype
    sum_dy = v.stats_array(sum_dy, "sum_dy", c)
    sum_dy_xmu = v.stats_array(sum_dy_xmu, "sum_dy_xmu", c)
    count = v.total_count(count)
    if count == 0 and x.size > 0:
        raise ValueError("count must be > 0 for a non-empty input")
    result = v.Output(out, x.shape, dtype, (dy, x, w))
    if x.size > 0:
        v.raise_for_status(_bn.backward_elemt(dy, x, result.target, n, c, s, mean, invstd, w,
                                              sum_dy, sum_dy_xmu, count))
    return result.finish()
