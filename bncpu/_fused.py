"""Batch norm fused with what follows it in a CNN: ReLU, or an add and a ReLU (residual
networks), forward and backward; and folding an evaluation-mode batch norm into the
convolution or linear layer before it.

    output = relu(batch_norm(x) + residual),   relu(v) = 0 where v < 0, else v

relu keeps NaN and -0.0, as ``torch.relu`` does. The backward needs no saved mask: a value
passed the ReLU where ``output > 0``, so an output of exactly 0 passes no gradient; a NaN
output passes its gradient, as in torch's ``threshold_backward`` (the mask is
``not output <= 0``).

Validation is bncpu._validate's; the arithmetic is batch norm's (bncpu._batch_norm), the
ReLU and the mask applied on the way.
"""
import numpy as np

from bncpu import _validate as v
from bncpu._batch_norm import batch_norm_backward, batch_norm_forward


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, residual=None, axis=1, out=None):
    """``relu(batch_norm(input) + residual)``, arguments as ``bncpu.batch_norm``.

    ``residual`` (optional) has the input's shape. Returns the output (``out`` itself when
    given; ``out`` may be the input or the residual).
    """
    return batch_norm_relu_forward(input, weight, bias, running_mean, running_var, training,
                                   momentum, eps, residual=residual, axis=axis, out=out)[0]


def batch_norm_relu_forward(input, weight, bias, running_mean, running_var, training, momentum,
                            eps, *, residual=None, axis=1, out=None):
    """``relu(batch_norm_forward(...) + residual)``: returns (output, save_mean, save_invstd),
    the statistics as ``batch_norm_forward`` saves them (empty arrays in evaluation)."""
    x = v.as_input(input)
    dtype = x.dtype
    residual = _same_shape_input(residual, "residual", x)
    result = v.Output(out, x.shape, dtype, (x, residual))
    # The normalized values are written before the residual is read: a target that is the
    # residual itself needs a buffer.
    target = result.target
    if residual is not None and np.may_share_memory(target, residual):
        target = np.empty(x.shape, dtype)
    output, save_mean, save_invstd = batch_norm_forward(
        x, weight, bias, running_mean, running_var, training, momentum, eps, axis=axis,
        out=target)
    if residual is not None:
        np.add(output, residual, out=output)
    _relu(output)
    if output is not result.target:
        result.target[...] = output
    return result.finish(), save_mean, save_invstd


def batch_norm_relu_backward(grad_output, output, input, weight, running_mean, running_var,
                             save_mean, save_invstd, training, eps, *, residual_grad=False,
                             axis=1, out=None):
    """Backward of ``batch_norm_relu_forward``: (grad_input, grad_weight, grad_bias,
    grad_residual).

    With the mask ``output > 0`` (NaN counted as passed, as in PyTorch),
    ``g = grad_output where the mask holds, else 0`` is the gradient reaching the
    batch norm (and the residual): the other results are ``batch_norm_backward``'s for ``g``
    (training or evaluation as ``training`` says), and ``grad_residual = g`` when
    ``residual_grad`` is true, else None. ``out`` receives grad_input and may be
    grad_output, output or input itself.
    """
    x = v.as_input(input)
    dtype = x.dtype
    dy = _same_shape_input(grad_output, "grad_output", x)
    y = _same_shape_input(output, "output", x)
    if out is not None:
        v.Output(out, x.shape, dtype, ())   # out's errors before any work
    grad = np.zeros(x.shape, dtype)
    np.copyto(grad, dy, where=~(y <= 0))   # not dy·mask: a masked NaN passes nothing
    if out is None and not residual_grad:
        out = grad   # the masked gradient is a buffer of our own: overwrite it
    grad_input, grad_weight, grad_bias = batch_norm_backward(
        grad, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps,
        axis=axis, out=out)
    return grad_input, grad_weight, grad_bias, (grad if residual_grad else None)


def fold_batch_norm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps=1e-5):
    """Fold an evaluation-mode batch norm into the layer before it: (folded_weight,
    folded_bias) with ``layer'(x) = batch_norm(layer(x))``.

    ``weight`` is the convolution's or linear layer's, its output channels along axis 0;
    ``bias``, ``bn_weight`` and ``bn_bias`` may be None (0, 1 and 0). With
    ``scale = bn_weight / sqrt(running_var + eps)`` per output channel::

        folded_weight = weight·scale
        folded_bias   = (bias - running_mean)·scale + bn_bias

    computed in float64 and returned in weight's dtype (float16 as float32, integers as
    float64; the folded bias always given). Nothing is modified.
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


def _relu(array):
    """In place: 0 where array < 0 (NaN and -0.0 kept, as torch.relu)."""
    np.copyto(array, 0, where=array < 0)
