"""Batch and instance norm layers: torch.nn.BatchNorm1d/2d/3d and InstanceNorm1d/2d/3d.

Both keep per-channel running statistics (torch's ``_NormBase``): ``_NormBase`` holds the
state, ``_BatchNorm`` and ``_InstanceNorm`` the two forwards; the 1d/2d/3d classes only
name the input ranks they accept.
"""
import warnings

import numpy as np

from bncpu import _validate as v
from bncpu._batch_norm import channel_args, run_backward, run_forward
from bncpu._row_norm import (
    group_params, instance_args, run_grouped_backward, run_instance_forward)
from bncpu.nn._module import Module, layer_axis


def _check_momentum(momentum):
    return None if momentum is None else v.check_momentum(momentum)


class _NormBase(Module):
    """Per-channel parameters and running statistics (torch.nn.modules.batchnorm._NormBase).

    ``weight``/``bias`` (ones/zeros) when ``affine`` (``bias`` None with ``bias=False``);
    ``running_mean``/``running_var``
    (zeros/ones) and ``num_batches_tracked`` (a 0-d int64 array) when
    ``track_running_stats``, else None. ``axis`` is the channel axis of the input
    (1: (N, C, *spatial); -1: channels last, (N, *spatial, C)).
    """

    _parameter_names = ("weight", "bias")
    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")
    _input_ndims = ()      # the input ranks the class accepts
    unbiased_running_var = True   # PyTorch's running variance (batch norm may choose another)

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, bias, dtype,
                 axis):
        super().__init__(dtype)
        self.num_features = v.check_count(num_features, "num_features")
        self.eps = v.check_eps(eps)
        self.momentum = _check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = layer_axis(axis)
        c = self.num_features
        self.weight = np.ones(c, self.dtype) if self.affine else None
        self.bias = np.zeros(c, self.dtype) if self.affine and bias else None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, self.dtype)
            self.running_var = np.ones(c, self.dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
            # The running statistics an evaluation forward used, kept for its backward.
            self._eval_stats = np.empty((2, c), self.dtype)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.zero_grad()

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked.fill(0)

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            self.weight.fill(1)
        if self.bias is not None:
            self.bias.fill(0)

    def _check_input_dim(self, x):
        if x.ndim not in self._input_ndims:
            raise ValueError(f"expected {' or '.join(f'{d}D' for d in self._input_ndims)} input "
                             f"(got {x.ndim}D input)")

    def _saved_running_stats(self):
        """Copies of the running statistics, for the backward of an evaluation forward."""
        self._eval_stats[0] = self.running_mean
        self._eval_stats[1] = self.running_var
        return self._eval_stats[0], self._eval_stats[1]

    # The layers check their input (Module._as_input) and their own arrays against it,
    # then call the kernels unchecked: eps and momentum were checked when set, and the
    # kernels' C entries check them again.
    def _local_forward(self, x, layout, running_mean, running_var, training, momentum):
        w, b, rm, rv = channel_args(x, layout, self.weight, self.bias, running_mean,
                                    running_var, training)
        output = np.empty_like(x)
        save_mean, save_invstd = run_forward(x, output, layout, w, b, rm, rv, training, momentum,
                                             self.eps, self.unbiased_running_var)
        return output, save_mean, save_invstd

    def _local_backward(self, dy, x, layout, running_mean, running_var, save_mean, save_invstd,
                        training):
        w = v.per_channel(self.weight, "weight", layout[1], x.dtype)
        grad_input = np.empty_like(x)
        grad_weight, grad_bias = run_backward(dy, x, grad_input, layout, w, running_mean,
                                              running_var, save_mean, save_invstd, training,
                                              self.eps)
        return grad_input, grad_weight, grad_bias

    def extra_repr(self):
        text = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")
        return text if self.axis == 1 else f"{text}, axis={self.axis}"


class _BatchNorm(_NormBase):
    """Batch norm with torch's train/eval semantics.

    Training: the batch statistics normalize; with ``track_running_stats`` the running
    statistics move toward them (``momentum``, or with ``momentum=None`` the cumulative
    average: factor 1/num_batches_tracked) and ``num_batches_tracked`` counts the step.
    Evaluation: the running statistics normalize, or the batch statistics when the layer
    keeps none. ``unbiased_running_var=False`` keeps the biased batch variance in the
    running variance (Keras, d2l: their momentum 0.9 is this ``momentum=0.1``).

    Subclassing (synchronized batch norm): the training statistics go through two hooks,
    and only those need overriding to compute them across processes:

    * ``_train_forward(x, layout, running_mean, running_var, momentum)`` gets the
      validated input (C-contiguous, the layer's dtype) and its (outer, C, inner)
      ``layout`` (channels along ``self.axis``), checks the layer's per-channel arrays
      against it, normalizes it with the statistics of the batch, updates
      ``running_mean``/``running_var`` in place with ``momentum`` when they are not None
      (``self.unbiased_running_var`` says which variance), and returns ``(output,
      save_mean, save_invstd)``.
    * ``_train_backward(grad_output, x, layout, save_mean, save_invstd)`` gets the
      validated grad_output (of the input's shape and dtype) and what that forward
      returned, and returns ``(grad_input, grad_weight, grad_bias)`` (the last two None
      without ``affine``), the parameter gradients summed over the whole batch.

    The layer keeps everything else: the input check (``_check_input_dim``), momentum and
    ``num_batches_tracked`` (counted only after ``_train_forward`` returned), evaluation,
    saving for the backward, gradient accumulation and state dicts. The hooks run only in
    training mode; evaluation without running statistics uses the local batch, as torch's
    SyncBatchNorm does.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, bias=True, dtype=np.float32, axis=1,
                 unbiased_running_var=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias, dtype,
                         axis)
        self.unbiased_running_var = bool(unbiased_running_var)

    def _train_forward(self, x, layout, running_mean, running_var, momentum):
        return self._local_forward(x, layout, running_mean, running_var, True, momentum)

    def _train_backward(self, grad_output, x, layout, save_mean, save_invstd):
        return self._local_backward(grad_output, x, layout, None, None, save_mean, save_invstd,
                                    True)

    def _forward(self, x):
        layout = v.channel_layout(x.shape, v.channel_axis(self.axis, x.ndim))
        if self.training:
            tracked = self.track_running_stats
            if not tracked:
                momentum = 0.0
            elif self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked + 1)
            else:
                momentum = self.momentum
            output, save_mean, save_invstd = self._train_forward(
                x, layout, self.running_mean if tracked else None,
                self.running_var if tracked else None, momentum)
            if tracked:
                self.num_batches_tracked += 1
            return output, ("train", x, layout, save_mean, save_invstd)
        if self.running_mean is None:
            output, save_mean, save_invstd = self._local_forward(x, layout, None, None, True, 0.0)
            return output, ("batch", x, layout, save_mean, save_invstd)
        output = self._local_forward(x, layout, self.running_mean, self.running_var, False,
                                     0.0)[0]
        return output, ("eval", x, layout) + self._saved_running_stats()

    def _backward(self, grad_output, saved):
        mode, x, layout, first, second = saved
        dy = v.grad_output(grad_output, x)
        if mode == "train":
            grads = self._train_backward(dy, x, layout, first, second)
        elif mode == "batch":
            grads = self._local_backward(dy, x, layout, None, None, first, second, True)
        else:
            grads = self._local_backward(dy, x, layout, first, second, None, None, False)
        grad_input, grad_weight, grad_bias = grads
        return grad_input, {"weight": grad_weight, "bias": grad_bias}

    def extra_repr(self):
        text = super().extra_repr()
        return text if self.unbiased_running_var else f"{text}, unbiased_running_var=False"


class BatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) or (N, C, L) input (channels last: (N, L, C) with axis=-1),
    as torch.nn.BatchNorm1d."""
    _input_ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm of (N, C, H, W) input (channels last: (N, H, W, C) with axis=-1),
    as torch.nn.BatchNorm2d."""
    _input_ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm of (N, C, D, H, W) input (channels last: (N, D, H, W, C) with axis=-1),
    as torch.nn.BatchNorm3d."""
    _input_ndims = (5,)


class _InstanceNorm(_NormBase):
    """Instance norm with torch's semantics: each sample's channel normalized over its own
    spatial values, in training and in evaluation, unless the layer tracks running
    statistics, which then normalize in evaluation (and are updated in training with
    ``momentum``; ``momentum=None`` leaves them unchanged, as in torch). An input without
    the batch axis (one rank lower) is one sample. ``num_batches_tracked`` is kept but
    never counted, as in torch."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, *, bias=True, dtype=np.float32, axis=1):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias, dtype,
                         axis)

    def _forward(self, x):
        unbatched = x.ndim == self._input_ndims[0]
        batched = x[None] if unbatched else x
        axis = v.channel_axis(self.axis, batched.ndim, batch_axis_allowed=False)
        if batched.shape[axis] != self.num_features:
            dim = axis - 1 if unbatched else axis
            if self.affine:
                raise ValueError(f"expected input's size at dim={dim} to match num_features "
                                 f"({self.num_features}), but got: {batched.shape[axis]}.")
            warnings.warn(f"input's size at dim={dim} does not match num_features. You can "
                          f"silence this warning by not passing in num_features, which is not "
                          f"used because affine=False", stacklevel=3)
        if self.training or not self.track_running_stats:   # the input's statistics
            weight, bias, running_mean, running_var = instance_args(
                batched, axis, self.weight, self.bias, self.running_mean, self.running_var)
            output, mean, rstd = run_instance_forward(
                batched, axis, weight, bias, running_mean, running_var,
                0.0 if self.momentum is None else self.momentum, self.eps, None)
            saved = ("instance", batched, mean, rstd)
        else:
            output = self._local_forward(batched, v.channel_layout(batched.shape, axis),
                                         self.running_mean, self.running_var, False, 0.0)[0]
            saved = ("eval", batched) + self._saved_running_stats()
        return (output[0] if unbatched else output), saved + (axis, unbatched)

    def _backward(self, grad_output, saved):
        mode, x, first, second, axis, unbatched = saved
        dy = v.as_array(grad_output, "grad_output")
        dy = v.grad_output(dy[None] if unbatched else dy, x)
        if mode == "instance":
            weight, _ = group_params(x, axis, self.weight, None)
            grad_input, grad_weight, grad_bias = run_grouped_backward(
                dy, x, x.shape[axis], axis, first, second, weight, None)
        else:
            grad_input, grad_weight, grad_bias = self._local_backward(
                dy, x, v.channel_layout(x.shape, axis), first, second, None, None, False)
        return (grad_input[0] if unbatched else grad_input), {"weight": grad_weight,
                                                              "bias": grad_bias}


class InstanceNorm1d(_InstanceNorm):
    """Instance norm of (N, C, L) or unbatched (C, L) input (channels last: (N, L, C) with
    axis=-1), as torch.nn.InstanceNorm1d."""
    _input_ndims = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """Instance norm of (N, C, H, W) or unbatched (C, H, W) input (channels last:
    (N, H, W, C) with axis=-1), as torch.nn.InstanceNorm2d."""
    _input_ndims = (3, 4)


class InstanceNorm3d(_InstanceNorm):
    """Instance norm of (N, C, D, H, W) or unbatched (C, D, H, W) input (channels last:
    (N, D, H, W, C) with axis=-1), as torch.nn.InstanceNorm3d."""
    _input_ndims = (4, 5)
