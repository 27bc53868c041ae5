"""The tensorflow backend: the NumPy API inside ``tf.numpy_function``, differentiated by
``tf.custom_gradient`` with the backward kernels.

``tf.numpy_function`` cannot be compiled by XLA, so bncpu's layers set
``supports_jit = False`` on this backend and ``jit_compile="auto"`` picks graph mode.
Absent parameters cross into NumPy as arrays of no elements. The backward always runs
with a weight (ones when there is none): the kernels give the parameter gradients only
with one, and a bias without a weight still needs its gradient.
"""
import numpy as np
import tensorflow as tf

import bncpu


def _given(array):
    return array if array.size else None


def _optional(value, dtype):
    return tf.zeros([0], dtype) if value is None else tf.convert_to_tensor(value, dtype)


def _grad_of(param, grad):
    """The gradient of a parameter, or no elements for an absent one."""
    return grad if param.size else np.zeros_like(param)


def _run(forward, backward, differentiable, constants, result_shapes, residuals):
    """Results of ``forward(*differentiable, *constants)`` (NumPy; it returns the results,
    then ``residuals`` arrays kept for the backward), the first one differentiated by
    ``backward(dy, *differentiable, *constants, *residuals)`` -> gradients of
    ``differentiable``."""
    dtype = differentiable[0].dtype

    @tf.custom_gradient
    def run(*tensors):
        outputs = tf.numpy_function(forward, list(tensors) + list(constants),
                                    [dtype] * (len(result_shapes) + residuals),
                                    stateful=False)
        results, saved = outputs[:len(result_shapes)], outputs[len(result_shapes):]
        for result, shape in zip(results, result_shapes):
            result.set_shape(shape)

        def grad(dy, *_):
            grads = tf.numpy_function(backward, [dy] + list(tensors) + list(constants)
                                      + list(saved), [dtype] * len(tensors), stateful=False)
            for g, tensor in zip(grads, tensors):
                g.set_shape(tensor.shape)
            return grads
        return (tuple(results) if len(results) > 1 else results[0]), grad
    return run(*differentiable)



def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, unbiased_running_var=True):
    x = tf.convert_to_tensor(x)
    c = x.shape[axis]

    def forward(x, w, b, mean, var):
        new_mean, new_var = mean.copy(), var.copy()
        y, save_mean, save_invstd = bncpu.batch_norm_forward(
            x, _given(w), _given(b), new_mean, new_var, training, momentum, eps, axis=axis,
            unbiased_running_var=unbiased_running_var)
        return y, new_mean, new_var, save_mean, save_invstd

    def backward(dy, x, w, b, mean, var, save_mean, save_invstd):
        dx, dw, db = bncpu.batch_norm_backward(
            dy, x, w if w.size else np.ones(c, x.dtype), mean, var, save_mean, save_invstd,
            training, eps, axis=axis)
        return dx, _grad_of(w, dw), _grad_of(b, db)

    return _run(forward, backward,
                [x, _optional(weight, x.dtype), _optional(bias, x.dtype)],
                [running_mean, running_var], [x.shape, (c,), (c,)], 2)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    x = tf.convert_to_tensor(x)
    normalized_shape = tuple(normalized_shape)

    def forward(x, w, b):
        return bncpu.layer_norm_forward(x, normalized_shape, _given(w), _given(b), eps)

    def backward(dy, x, w, b, mean, rstd):
        dx, dw, db = bncpu.layer_norm_backward(
            dy, x, normalized_shape, mean, rstd,
            w if w.size else np.ones(normalized_shape, x.dtype))
        return dx, _grad_of(w, dw), _grad_of(b, db)

    return _run(forward, backward,
                [x, _optional(weight, x.dtype), _optional(bias, x.dtype)], [], [x.shape], 2)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1):
    x = tf.convert_to_tensor(x)
    c = x.shape[axis]

    def forward(x, w, b):
        return bncpu.group_norm_forward(x, num_groups, _given(w), _given(b), eps, axis=axis)

    def backward(dy, x, w, b, mean, rstd):
        dx, dw, db = bncpu.group_norm_backward(
            dy, x, num_groups, mean, rstd, w if w.size else np.ones(c, x.dtype), axis=axis)
        return dx, _grad_of(w, dw), _grad_of(b, db)

    return _run(forward, backward,
                [x, _optional(weight, x.dtype), _optional(bias, x.dtype)], [], [x.shape], 2)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    x = tf.convert_to_tensor(x)
    normalized_shape = tuple(normalized_shape)

    def forward(x, w):
        return bncpu.rms_norm_forward(x, normalized_shape, _given(w), eps)

    def backward(dy, x, w, rstd):
        dx, dw = bncpu.rms_norm_backward(dy, x, normalized_shape, rstd,
                                         w if w.size else np.ones(normalized_shape, x.dtype))
        return dx, _grad_of(w, dw)

    return _run(forward, backward, [x, _optional(weight, x.dtype)], [], [x.shape], 1)

