"""``torch.nn.functional``'s normalizations, computed by bncpu: the same names, signatures
and results, autograd included. What bncpu does not compute runs torch's own function
(see ``bncpu.torch._fallback`` for the table; ``bncpu.torch.fallback_counts()`` counts it).
"""
import operator

import torch
import torch.nn.functional as F

from bncpu.torch import _fallback
from bncpu.torch._ops import batch_norm_direct, forward, row_norm_direct


def _shape_list(normalized_shape):
    """normalized_shape (an int, a sequence of ints or a torch.Size) as a list of ints."""
    try:
        return [operator.index(normalized_shape)]
    except TypeError:
        return [operator.index(size) for size in normalized_shape]


def _write_running(running_mean, running_var, new_mean, new_var):
    """Copy the updated running statistics back (only after the kernel succeeded)."""
    if running_mean is not None:
        running_mean.copy_(new_mean)
    if running_var is not None:
        running_var.copy_(new_var)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm``: per channel (dim 1) of an (N, C, *) input;
    in training the batch statistics, the running statistics updated in place when
    given; in evaluation the running statistics."""
    reason = _fallback.reason(input, (weight, bias), (running_mean, running_var))
    if reason is not None:
        _fallback.record("batch_norm", reason)
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)
    output = batch_norm_direct(input, weight, bias, running_mean, running_var, training,
                               momentum, eps)
    if output is not None:
        return output
    output, _, _, new_mean, new_var = forward(
        "batch_norm_forward", input, weight, bias, running_mean, running_var, training, momentum,
        eps)
    if training:
        _write_running(running_mean, running_var, new_mean, new_var)
    return output


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, residual=None):
    """``relu(batch_norm(input, ...) + residual)`` in one pass (``residual`` optional, of
    the input's shape); arguments and running statistics as ``batch_norm``."""
    reason = _fallback.reason(input, (weight, bias, residual), (running_mean, running_var))
    if reason is not None:
        _fallback.record("batch_norm_relu", reason)
        output = F.batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps)
        return torch.relu(output if residual is None else output + residual)
    output = batch_norm_direct(input, weight, bias, running_mean, running_var, training,
                               momentum, eps, relu=True, residual=residual)
    if output is not None:
        return output
    output, _, _, new_mean, new_var = forward(
        "batch_norm_relu_forward", input, weight, bias, running_mean, running_var, training,
        momentum, eps, residual)
    if training:
        _write_running(running_mean, running_var, new_mean, new_var)
    return output


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``: over the trailing ``normalized_shape`` dims."""
    reason = _fallback.reason(input, (weight, bias))
    if reason is not None:
        _fallback.record("layer_norm", reason)
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    output = row_norm_direct(input, normalized_shape, weight, bias, eps, True)
    if output is not None:
        return output
    return forward("layer_norm_forward", input, _shape_list(normalized_shape), weight, bias,
                   eps)[0]


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm``: each sample's ``num_groups`` groups of
    channels; weight and bias per channel."""
    reason = _fallback.reason(input, (weight, bias))
    if reason is not None:
        _fallback.record("group_norm", reason)
        return F.group_norm(input, num_groups, weight, bias, eps)
    return forward("group_norm_forward", input, num_groups, weight, bias, eps)[0]


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm``: each sample's channel over its spatial
    values (``use_input_stats``; running statistics updated when given), or the running
    statistics (batch norm in evaluation)."""
    reason = _fallback.reason(input, (weight, bias), (running_mean, running_var))
    if reason is not None:
        _fallback.record("instance_norm", reason)
        return F.instance_norm(input, running_mean, running_var, weight, bias,
                               use_input_stats, momentum, eps)
    if not use_input_stats:
        output = batch_norm_direct(input, weight, bias, running_mean, running_var, False,
                                   momentum, eps)
        if output is not None:
            return output
        return forward("batch_norm_forward", input, weight, bias, running_mean, running_var,
                       False, momentum, eps)[0]
    output, _, _, new_mean, new_var = forward(
        "instance_norm_forward", input, weight, bias, running_mean, running_var, momentum, eps)
    _write_running(running_mean, running_var, new_mean, new_var)
    return output


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: ``x / sqrt(mean(x²) + eps) * weight`` over the
    trailing ``normalized_shape`` dims; ``eps=None`` is the dtype's machine epsilon."""
    reason = _fallback.reason(input, (weight,))
    if reason is not None:
        _fallback.record("rms_norm", reason)
        return F.rms_norm(input, normalized_shape, weight, eps)
    output = row_norm_direct(input, normalized_shape, weight, None, eps, False)
    if output is not None:
        return output
    return forward("rms_norm_forward", input, _shape_list(normalized_shape), weight, eps)[0]
