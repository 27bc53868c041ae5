"""Batch norm fused with what follows it in a CNN: ReLU, or an add and a ReLU (residual
networks), forward and backward; and folding an evaluation-mode batch norm into the
convolution or linear layer before it.

    output = relu(batch_norm(x) + residual),   relu(v) = 0 where v < 0, else v

relu keeps NaN and -0.0, as ``torch.relu`` does. The backward needs no saved mask: a value
passed the ReLU where ``output > 0``, so an output of exactly 0 passes no gradient; a NaN
output passes its gradient, as in torch's ``threshold_backward`` (the mask is
``not output <= 0``).

Validation is bncpu._validate's, as for batch norm. The kernels are batch norm's
(bncpu/_kernels/batch_norm.pyx) with the add and the ReLU in their normalizing pass, and the
mask applied wherever the backward reads the gradient: the same arithmetic as bncpu's
batch norm followed by NumPy's add and ReLU, bit for bit, without the passes over memory
of their own that the add, the ReLU and the mask would take.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bncpu import _validate as v
from bncpu._batch_norm import backward_stats, forward_args
from bncpu._ops import batch_norm as _bn
from bncpu._status import raise_for_status


def batch_norm_relu(input: ArrayLike, running_mean: NDArray | None,
                    running_var: NDArray | None, weight: ArrayLike | None = None,
                    bias: ArrayLike | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, *,
                    residual: ArrayLike | None = None, axis: int = 1,
                    out: NDArray | None = None, unbiased_running_var: bool = True) -> NDArray:
    """``relu(batch_norm(input) + residual)`` in one kernel.

    Parameters
    ----------
    input, running_mean, running_var, weight, bias, training, momentum, eps, axis
        As in ``bncpu.batch_norm``.
    unbiased_running_var : bool, default True
        As in ``bncpu.batch_norm``: which batch variance the running variance follows in
        training.
    residual : array_like, optional
        Added to the normalized input before the ReLU (a residual network's shortcut), of
        the input's shape; converted to the input's compute dtype.
    out : ndarray, optional
        Where to write the result, as ``out`` in ``bncpu.batch_norm``; it may be the input
        or the residual itself.

    Returns
    -------
    ndarray
        The output, of the input's shape and layout (``out`` itself when given).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    return batch_norm_relu_forward(input, weight, bias, running_mean, running_var, training,
                                   momentum, eps, residual=residual, axis=axis, out=out,
                                   unbiased_running_var=unbiased_running_var)[0]


def batch_norm_relu_forward(input: ArrayLike, weight: ArrayLike | None,
                            bias: ArrayLike | None, running_mean: NDArray | None,
                            running_var: NDArray | None, training: bool, momentum: float,
                            eps: float, *, residual: ArrayLike | None = None, axis: int = 1,
                            out: NDArray | None = None, unbiased_running_var: bool = True
                            ) -> tuple[NDArray, NDArray, NDArray]:
    """``relu(batch_norm(input) + residual)`` with the statistics the backward needs.

    The arguments are those of ``batch_norm_relu``, in the order of
    ``bncpu.batch_norm_forward``. One kernel: the statistics, then one pass that
    normalizes, adds the residual and applies the ReLU.

    Returns
    -------
    output : ndarray
        As ``batch_norm_relu`` returns it (``out`` itself when given).
    save_mean, save_invstd : ndarray of shape (C,)
        As ``bncpu.batch_norm_forward`` saves them (empty arrays in evaluation).

    Raises
    ------
    TypeError
        An argument of the wrong type (a dtype that is not real, a flag that is not a bool,
        a running statistic that is not an ndarray of the compute dtype).
    ValueError
        Shapes or values that disagree; nothing has been written then.
    """
    x, (n, c, s), w, b, rm, rv, training, momentum, eps = forward_args(
        input, weight, bias, running_mean, running_var, training, momentum, eps, axis, out)
    unbiased_running_var = v.check_flag(unbiased_running_var, "unbiased_running_var")
    dtype = x.dtype
    residual = _same_shape_input(residual, "residual", x)
    result = v.Output(out, x.shape, dtype, (x, residual, w, b, rm, rv))
    if training:
        save_mean = np.empty(c, dtype)
        save_invstd = np.empty(c, dtype)
        status = _bn.relu_forward_train(x, residual, result.target, n, c, s, w, b, rm, rv,
                                        momentum, eps, save_mean, save_invstd,
                                        unbiased_running_var)
    else:
        save_mean = save_invstd = np.empty(0, dtype)
        status = _bn.relu_forward_eval(x, residual, result.target, n, c, s, w, b, rm, rv, eps)
    raise_for_status(status)
    return result.finish(), save_mean, save_invstd


def batch_norm_relu_backward(grad_output: ArrayLike, output: ArrayLike, input: ArrayLike,
                             weight: ArrayLike | None, running_mean: ArrayLike | None,
                             running_var: ArrayLike | None, save_mean: ArrayLike | None,
                             save_invstd: ArrayLike | None, training: bool, eps: float, *,
                             residual_grad: bool = False, axis: int = 1,
                             out: NDArray | None = None
                             ) -> tuple[NDArray, NDArray | None, NDArray | None,
                                        NDArray | None]:
    """Backward of ``batch_norm_relu_forward``.

    With the mask ``output > 0`` (a NaN output counted as passed, as in PyTorch), the
    gradient reaching the batch norm and the residual is ``g = grad_output`` where the
    mask holds, else 0. One kernel: the mask is applied as grad_output is read, in the
    per-channel sums and in the elementwise pass (which also writes grad_residual); g is
    never stored apart.

    Parameters
    ----------
    grad_output : array_like
        dL/d(output), of the input's shape.
    output : array_like
        The forward's output: its positive values say where the ReLU passed.
    input, weight, running_mean, running_var, save_mean, save_invstd, training, eps, axis
        As in ``bncpu.batch_norm_backward``.
    residual_grad : bool, default False
        Also return the residual's gradient, g.
    out : ndarray, optional
        Receives grad_input, as ``out`` in ``bncpu.batch_norm``; may be grad_output,
        output or input.

    Returns
    -------
    grad_input, grad_weight, grad_bias
        ``bncpu.batch_norm_backward``'s results for g (grad_input is ``out`` when given).
    grad_residual : ndarray or None
        g, of the input's shape, when ``residual_grad`` is true; else None.

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
    dy = _same_shape_input(grad_output, "grad_output", x)
    y = _same_shape_input(output, "output", x)
    n, c, s = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    training = v.check_flag(training, "training")
    residual_grad = v.check_flag(residual_grad, "residual_grad")
    eps = v.check_eps(eps)
    w = v.per_channel(weight, "weight", c, dtype)
    rm, rv, mean, invstd = backward_stats(c, dtype, training, running_mean, running_var,
                                          save_mean, save_invstd)
    result = v.Output(out, x.shape, dtype, (dy, y, x, w))
    grad_weight = np.empty(c, dtype) if w is not None else None
    grad_bias = np.empty(c, dtype) if w is not None else None
    grad_residual = np.empty(x.shape, dtype) if residual_grad else None
    status = _bn.relu_backward(dy, y, x, result.target, n, c, s, w, rm, rv, mean, invstd,
                               training, eps, grad_weight, grad_bias, grad_residual)
    raise_for_status(status)
    return result.finish(), grad_weight, grad_bias, grad_residual


def fold_batch_norm(weight: ArrayLike, bias: ArrayLike | None, running_mean: ArrayLike,
                    running_var: ArrayLike, bn_weight: ArrayLike | None,
                    bn_bias: ArrayLike | None, eps: float = 1e-5
                    ) -> tuple[NDArray, NDArray]:
    """Fold an evaluation-mode batch norm into the layer before it:
    ``layer'(x) = batch_norm(layer(x))``.

    Per output channel, with ``scale = bn_weight / sqrt(running_var + eps)``::

        folded_weight = weight·scale
        folded_bias   = (bias - running_mean)·scale + bn_bias

    computed in float64. Nothing is modified.

    Parameters
    ----------
    weight : array_like
        The convolution's or linear layer's weight, its output channels along axis 0.
    bias : array_like of shape (C_out,), optional
        The layer's bias (0 when None).
    running_mean, running_var : array_like of shape (C_out,)
        The batch norm's running statistics.
    bn_weight, bn_bias : array_like of shape (C_out,), optional
        The batch norm's weight and bias (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.

    Returns
    -------
    folded_weight : ndarray
        Of weight's shape, in weight's compute dtype (float16 as float32, integers as
        float64).
    folded_bias : ndarray of shape (C_out,)
        In the same dtype; always given.

    Raises
    ------
    TypeError
        An argument whose dtype is not real.
    ValueError
        A scalar weight, sizes that disagree, a missing running statistic, a bad eps.
    """
    w = v.as_array(weight, "weight")
    dtype = v.compute_dtype(w.dtype, "weight")
    if w.ndim < 1:
        raise ValueError("weight must have at least 1 dimension (output channels first), "
                         "got a scalar")
    c = w.shape[0]
    rm = v.per_channel(running_mean, "running_mean", c, np.float64)
    rv = v.per_channel(running_var, "running_var", c, np.float64)
    if rm is None or rv is None:
        raise ValueError("running_mean and running_var must be given")
    b = v.per_channel(bias, "bias", c, np.float64)
    gamma = v.per_channel(bn_weight, "bn_weight", c, np.float64)
    beta = v.per_channel(bn_bias, "bn_bias", c, np.float64)
    eps = v.check_eps(eps)
    scale = 1.0 / np.sqrt(rv + eps)
    if gamma is not None:
        scale = gamma * scale
    folded_weight = w.astype(np.float64) * scale.reshape((c,) + (1,) * (w.ndim - 1))
    folded_bias = ((b if b is not None else 0.0) - rm) * scale
    if beta is not None:
        folded_bias = folded_bias + beta
    return folded_weight.astype(dtype), folded_bias.astype(dtype)


def _same_shape_input(value, name, x):
    """An optional array of x's shape, converted to x's dtype (C-contiguous), or None."""
    if value is None:
        return None
    array = v.as_input(value, name, min_ndim=0, dtype=x.dtype)
    v.same_shape(array, name, x.shape)
    return array
