"""Layer, group and RMS norm layers: torch.nn.LayerNorm, GroupNorm and RMSNorm.

None of them keeps running statistics: training and evaluation compute the same thing.
"""
import operator

import numpy as np

from bncpu import _validate as v
from bncpu._row_norm import (
    _leading, _normalized_shape, _num_groups, group_params, run_grouped_backward,
    run_grouped_forward, run_rows_backward, run_rows_forward)
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


# The layers check their input (Module._as_input) and their own arrays against it, then
# call the kernels unchecked: eps was checked when set, and the C entries check it again.
def _rows_forward(layer, x, bias, eps, centered):
    """Layer or RMS norm of ``layer`` on its checked input: (output, saved)."""
    shape = _normalized_shape(layer.normalized_shape, x.shape)
    weight = v.shaped_param(layer.weight, "weight", shape, x.dtype)
    bias = v.shaped_param(bias, "bias", shape, x.dtype)
    leading = _leading(x.shape, shape)
    output = np.empty_like(x)
    mean, rstd = run_rows_forward(x, output, leading, weight, bias, eps, centered)
    return output, (x, leading, mean, rstd)


def _rows_backward(layer, grad_output, saved, centered):
    """(grad_input, grad_weight, grad_bias) of ``_rows_forward``."""
    x, leading, mean, rstd = saved
    dy = v.grad_output(grad_output, x, min_ndim=0)
    weight = v.shaped_param(layer.weight, "weight", x.shape[len(leading):], x.dtype)
    grad_input = np.empty_like(x)
    return (grad_input,) + run_rows_backward(dy, x, grad_input, leading, mean, rstd, weight,
                                             centered)


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
        return _rows_forward(self, x, self.bias, self.eps, True)

    def _backward(self, grad_output, saved):
        grad_input, grad_weight, grad_bias = _rows_backward(self, grad_output, saved, True)
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
        eps = float(np.finfo(x.dtype).eps) if self.eps is None else self.eps
        return _rows_forward(self, x, None, eps, False)

    def _backward(self, grad_output, saved):
        grad_input, grad_weight, _ = _rows_backward(self, grad_output, saved, False)
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
        axis = v.channel_axis(self.axis, x.ndim, batch_axis_allowed=False)
        groups = _num_groups(self.num_groups, x.shape, axis)
        weight, bias = group_params(x, axis, self.weight, self.bias)
        output, mean, rstd = run_grouped_forward(x, groups, axis, weight, bias, self.eps, None)
        return output, (x, groups, axis, mean, rstd)

    def _backward(self, grad_output, saved):
        x, groups, axis, mean, rstd = saved
        weight, _ = group_params(x, axis, self.weight, None)
        grad_input, grad_weight, grad_bias = run_grouped_backward(
            v.grad_output(grad_output, x), x, groups, axis, mean, rstd, weight, None)
        return grad_input, {"weight": grad_weight, "bias": grad_bias}

    def extra_repr(self):
        text = (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")
        return text if self.axis == 1 else f"{text}, axis={self.axis}"
