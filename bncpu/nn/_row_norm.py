"""Layer, group and RMS norm layers: torch.nn.LayerNorm, GroupNorm and RMSNorm.

None of them keeps running statistics: training and evaluation compute the same thing.
"""
import operator

import numpy as np

from bncpu import _validate as v
from bncpu._row_norm import (
    group_norm_backward, group_norm_forward, layer_norm_backward, layer_norm_forward,
    rms_norm_backward, rms_norm_forward)
from bncpu.nn._module import Module, layer_axis


def _shape_tuple(normalized_shape):
    """normalized_shape as torch stores it: a tuple of ints."""
    try:
        return (operator.index(normalized_shape),)
    except TypeError:
        pass
    try:
        return tuple(operator.index(size) for size in normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, "
                        f"got {normalized_shape!r}") from None


class LayerNorm(Module):
    """Layer norm over the trailing ``normalized_shape`` dims, as torch.nn.LayerNorm:
    ``weight`` (ones) and ``bias`` (zeros, unless ``bias=False``) of that shape when
    ``elementwise_affine``."""

    _parameter_names = ("weight", "bias")
    _min_ndim = 0

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *,
                 dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = v.check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        affine = self.elementwise_affine
        self.weight = np.ones(self.normalized_shape, self.dtype) if affine else None
        self.bias = np.zeros(self.normalized_shape, self.dtype) if affine and bias else None
        self.zero_grad()

    def reset_parameters(self):
        if self.weight is not None:
            self.weight.fill(1)
        if self.bias is not None:
            self.bias.fill(0)

    def _forward(self, x):
        output, mean, rstd = layer_norm_forward(x, self.normalized_shape, self.weight, self.bias,
                                                self.eps)
        return output, (x, mean, rstd)

    def _backward(self, grad_output, saved):
        x, mean, rstd = saved
        grad_input, grad_weight, grad_bias = layer_norm_backward(
            grad_output, x, self.normalized_shape, mean, rstd, self.weight)
        return grad_input, {"weight": grad_weight, "bias": grad_bias}

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}")


class RMSNorm(Module):
    """RMS norm over the trailing ``normalized_shape`` dims, as torch.nn.RMSNorm: ``weight``
    (ones) of that shape when ``elementwise_affine``; ``eps=None`` is the machine epsilon
    of the layer's dtype."""

    _parameter_names = ("weight",)
    _min_ndim = 0

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32):
        super().__init__(dtype)
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = None if eps is None else v.check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.weight = (np.ones(self.normalized_shape, self.dtype) if self.elementwise_affine
                       else None)
        self.zero_grad()

    def reset_parameters(self):
        if self.weight is not None:
            self.weight.fill(1)

    def _forward(self, x):
        output, rstd = rms_norm_forward(x, self.normalized_shape, self.weight, self.eps)
        return output, (x, rstd)

    def _backward(self, grad_output, saved):
        x, rstd = saved
        grad_input, grad_weight = rms_norm_backward(grad_output, x, self.normalized_shape, rstd,
                                                    self.weight)
        return grad_input, {"weight": grad_weight}

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class GroupNorm(Module):
    """Group norm, as torch.nn.GroupNorm: ``num_channels`` channels in ``num_groups``
    groups of adjacent channels; per-channel ``weight`` (ones) and ``bias`` (zeros, unless
    ``bias=False``) when ``affine``. ``axis`` is the channel axis (1, or -1 for channels-last input)."""

    _parameter_names = ("weight", "bias")

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, bias=True,
                 dtype=np.float32, axis=1):
        super().__init__(dtype)
        self.num_groups = v.check_count(num_groups, "num_groups")
        self.num_channels = v.check_count(num_channels, "num_channels")
        if self.num_groups == 0 or self.num_channels % self.num_groups != 0:
            raise ValueError(f"num_channels ({self.num_channels}) must be divisible by "
                             f"num_groups ({self.num_groups})")
        self.eps = v.check_eps(eps)
        self.affine = bool(affine)
        self.axis = layer_axis(axis)
        self.weight = np.ones(self.num_channels, self.dtype) if self.affine else None
        self.bias = np.zeros(self.num_channels, self.dtype) if self.affine and bias else None
        self.zero_grad()

    def reset_parameters(self):
        if self.weight is not None:
            self.weight.fill(1)
        if self.bias is not None:
            self.bias.fill(0)

    def _forward(self, x):
        output, mean, rstd = group_norm_forward(x, self.num_groups, self.weight, self.bias,
                                                self.eps, axis=self.axis)
        return output, (x, mean, rstd)

    def _backward(self, grad_output, saved):
        x, mean, rstd = saved
        grad_input, grad_weight, grad_bias = group_norm_backward(
            grad_output, x, self.num_groups, mean, rstd, self.weight, axis=self.axis)
        return grad_input, {"weight": grad_weight, "bias": grad_bias}

    def extra_repr(self):
        text = (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")
        return text if self.axis == 1 else f"{text}, axis={self.axis}"
