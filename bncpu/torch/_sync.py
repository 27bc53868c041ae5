"""torch.nn.SyncBatchNorm on CPU tensors, synchronized by bncpu.distributed.

PyTorch's SyncBatchNorm refuses CPU tensors. ``SyncBatchNorm`` here has its constructor,
parameters, buffers, state_dict keys, ``process_group`` attribute, input checks and
``momentum=None``/``num_batches_tracked`` rules, and computes a training forward on CPU
tensors with the statistics of the whole batch over the processes of ``process_group``:
a torch.distributed process group (gloo, or any backend that takes CPU tensors; None is
the default group), an mpi4py communicator, or a ``bncpu.distributed.Communicator``. The
backward checks that every process agrees on the channels, dtype and count (all raise
otherwise, none waits), then all-reduces the two per-channel sums, so ``input.grad`` is
that of the whole batch's loss; ``weight.grad`` and ``bias.grad`` are this process's share, as in torch
(DistributedDataParallel sums them).

It subclasses torch's ``_BatchNorm`` (the base of BatchNorm2d and of torch's
SyncBatchNorm), not ``torch.nn.SyncBatchNorm`` itself: DistributedDataParallel refuses any
instance of the latter in a CPU model ("SyncBatchNorm layers only work with GPU
modules", torch 2.13), which would defeat the purpose.

As in torch, nothing is synchronized in evaluation, nor when torch.distributed is not
initialized (and no other communicator was given), nor on a group of one process: then
the module computes bncpu's batch norm. Inputs that bncpu does not compute (not on the
CPU, neither float32 nor float64, parameters of another dtype) run torch's own
SyncBatchNorm forward, counted by ``bncpu.torch.fallback_counts()``. Double backward is
not supported.
"""
import torch
import torch.nn as nn

from bncpu.distributed import as_communicator
from bncpu.distributed._comm import TorchCommunicator, _is_torch_group
from bncpu.distributed._functional import (
    join_failed_forward, sync_batch_norm_backward, sync_batch_norm_forward,
)
from bncpu.torch import _fallback
from bncpu.torch._layout import channels_last_order as _channels_last_order
from bncpu.torch._modules import _BatchNormForward


def _numpy(tensor):
    """The NumPy view of a CPU tensor (None stays None)."""
    return None if tensor is None else tensor.detach().numpy()


def _inverse(order):
    """The permutation that undoes ``order``."""
    return sorted(range(len(order)), key=order.__getitem__)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward and backward of synchronized batch norm on CPU tensors (bncpu kernels;
    NumPy views of the tensors, outputs allocated by torch)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, comm):
        order = _channels_last_order(input)
        if order is None:
            x = input.detach().contiguous()
            axis = 1
        else:
            x = input.detach().permute(order)
            axis = -1
        output = torch.empty_like(x)
        _, mean, invstd, count = sync_batch_norm_forward(
            x.numpy(), _numpy(weight), _numpy(bias), _numpy(running_mean), _numpy(running_var),
            momentum, eps, comm, axis=axis, out=output.numpy())
        ctx.save_for_backward(x, weight)
        ctx.statistics = (mean, invstd, count, comm, axis, order)
        ctx.has_bias = bias is not None
        return output if order is None else output.permute(_inverse(order))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        mean, invstd, count, comm, axis, order = ctx.statistics
        dy = grad_output.contiguous() if order is None else grad_output.permute(order).contiguous()
        grad_input = torch.empty_like(x)
        _, grad_weight, grad_bias = sync_batch_norm_backward(
            dy.numpy(), x.numpy(), _numpy(weight), mean, invstd, count, comm, axis=axis,
            out=grad_input.numpy())
        if order is not None:
            grad_input = grad_input.permute(_inverse(order))
        return (grad_input,
                None if grad_weight is None else torch.from_numpy(grad_weight),
                None if grad_bias is None or not ctx.has_bias else torch.from_numpy(grad_bias),
                None, None, None, None, None)


class SyncBatchNorm(_BatchNormForward, nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm computed by bncpu, on CPU tensors.

    ``process_group``: a torch.distributed process group (None: the default group once
    torch.distributed is initialized), an mpi4py communicator or a
    ``bncpu.distributed.Communicator``. Everything else as torch.nn.SyncBatchNorm
    (``bias=False`` too, where the installed torch has it).
    """

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None,
                 **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def forward(self, input):
        reason = _fallback.reason(input, (self.weight, self.bias),
                                  (self.running_mean, self.running_var))
        if reason is not None:
            _fallback.record("SyncBatchNorm", reason)
            return nn.SyncBatchNorm.forward(self, input)
        self._step_comm = self._communicator() if self.training else None
        if self._step_comm is None:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return _BatchNormForward.forward(self, input)
        # A synchronized step: every process joins the collective, even one whose input
        # the checks reject (it then raises on every process instead of leaving them waiting).
        self._joined = False
        try:
            self._check_input_dim(input)
            self._check_non_zero_input_channels(input)
            return _BatchNormForward.forward(self, input)
        except Exception as error:
            if not self._joined:
                join_failed_forward(error, self._step_comm)
            raise
        finally:
            self._step_comm = None

    def _communicator(self):
        """The communicator of a synchronized step, or None when there is nothing to
        synchronize with (as torch: no initialized torch.distributed, or one process)."""
        group = self.process_group
        if group is not None and not _is_torch_group(group):
            comm = as_communicator(group)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            comm = TorchCommunicator(group)
        else:
            return None
        return comm if comm.size > 1 else None

    def _normalize(self, input, running_mean, running_var, training, momentum):
        if self._step_comm is None:
            return super()._normalize(input, running_mean, running_var, training, momentum)
        self._joined = True
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                            running_var, momentum, self.eps, self._step_comm)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """``convert_sync_batchnorm`` (below), as torch's classmethod."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module, process_group=None):
    """Replace every batch-norm layer of ``module`` (torch's BatchNorm1d/2d/3d,
    SyncBatchNorm, bncpu.torch's BatchNorm*, any ``_BatchNorm``) by a bncpu.torch
    SyncBatchNorm sharing its parameters and buffers, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. Returns the converted module
    (``module`` itself with its children replaced, or the new layer when ``module`` is a
    batch norm)."""
    converted = module
    if (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and not isinstance(module, SyncBatchNorm)):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum,
                                  module.affine, module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
