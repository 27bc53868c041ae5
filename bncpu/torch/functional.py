"""``torch.nn.functional``'s normalizations, computed by bncpu: the same names, signatures
and results, autograd included. What bncpu does not compute runs torch's own function
(see ``bncpu.torch._fallback`` for the table; ``bncpu.torch.fallback_counts()`` counts it).
Flags (``training``, ``use_input_stats``) must be bools, as in bncpu's NumPy API.
"""
import operator as _operator

import torch as _torch
import torch.nn.functional as _F

from bncpu import _validate
from bncpu.torch import _fallback
from bncpu.torch._autograd import forward as _forward

__all__ = ["batch_norm", "batch_norm_relu", "group_norm", "instance_norm", "layer_norm",
           "rms_norm"]


def _shape_list(normalized_shape):
    """normalized_shape (an int, a sequence of ints or a torch.Size) as a list of ints."""
    if isinstance(normalized_shape, (tuple, list)):   # (torch.Size is a tuple)
        return [_operator.index(size) for size in normalized_shape]
    return [_operator.index(normalized_shape)]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm``: per channel (dim 1) of an (N, C, *) input;
    in training the batch statistics, the running statistics updated in place when
    given; in evaluation the running statistics."""
    training = _validate.check_flag(training, "training")
    reason = _fallback.reason(input, (weight, bias), (running_mean, running_var))
    if reason is not None:
        _fallback.record("batch_norm", reason)
        return _F.batch_norm(input, running_mean, running_var, weight, bias, training,
                             momentum, eps)
    return _forward("batch_norm_forward", input, weight, bias, running_mean, running_var,
                    training, momentum, eps)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, residual=None):
    """``relu(batch_norm(input, ...) + residual)`` in one pass (``residual`` optional, of
    the input's shape); arguments and running statistics as ``batch_norm``."""
    training = _validate.check_flag(training, "training")
    reason = _fallback.reason(input, (weight, bias, residual), (running_mean, running_var))
    if reason is not None:
        _fallback.record("batch_norm_relu", reason)
        output = _F.batch_norm(input, running_mean, running_var, weight, bias, training,
                               momentum, eps)
        return _torch.relu(output if residual is None else output + residual)
    return _forward("batch_norm_relu_forward", input, weight, bias, running_mean, running_var,
                    training, momentum, eps, residual)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``: over the trailing ``normalized_shape`` dims."""
    reason = _fallback.reason(input, (weight, bias))
    if reason is not None:
        _fallback.record("layer_norm", reason)
        return _F.layer_norm(input, normalized_shape, weight, bias, eps)
    return _forward("layer_norm_forward", input, _shape_list(normalized_shape), weight, bias,
                    eps)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.group_norm``: each sample's ``num_groups`` groups of
    channels; weight and bias per channel."""
    reason = _fallback.reason(input, (weight, bias))
    if reason is not None:
        _fallback.record("group_norm", reason)
        return _F.group_norm(input, num_groups, weight, bias, eps)
    return _forward("group_norm_forward", input, num_groups, weight, bias, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.instance_norm``: each sample's channel over its spatial
    values (``use_input_stats``; running statistics updated when given), or the running
    statistics (batch norm in evaluation)."""
    use_input_stats = _validate.check_flag(use_input_stats, "use_input_stats")
    reason = _fallback.reason(input, (weight, bias), (running_mean, running_var))
    if reason is not None:
        _fallback.record("instance_norm", reason)
        return _F.instance_norm(input, running_mean, running_var, weight, bias,
                                use_input_stats, momentum, eps)
    if not use_input_stats:
        return _forward("batch_norm_forward", input, weight, bias, running_mean, running_var,
                        False, momentum, eps)
    return _forward("instance_norm_forward", input, weight, bias, running_mean, running_var,
                    momentum, eps)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: ``x / sqrt(mean(x²) + eps) * weight`` over the
    trailing ``normalized_shape`` dims; ``eps=None`` is the dtype's machine epsilon."""
    reason = _fallback.reason(input, (weight,))
    if reason is not None:
        _fallback.record("rms_norm", reason)
        return _F.rms_norm(input, normalized_shape, weight, eps)
    return _forward("rms_norm_forward", input, _shape_list(normalized_shape), weight, eps)
