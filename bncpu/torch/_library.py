"""bncpu's kernels as PyTorch custom operators, namespace ``bncpu`` (``torch.ops.bncpu``):
their schemas, CPU kernels and fake kernels. (Their autograd formulas are registered by
``bncpu.torch._autograd``.)

Each normalization is a pair of functional operators, ``<name>_forward`` and
``<name>_backward``, defined by schema in a ``torch.library.Library`` with a CPU kernel;
each has a fake kernel (shapes, dtypes and strides only, for ``torch.compile``, export
and jit tracing). In the profiler they show as ``bncpu::batch_norm_forward`` and so on.
(``Library.define`` and ``impl`` rather than ``torch.library.custom_op``: the same
registrations, without the wrapper custom_op puts around every call, which took 40% of a
trivial operator's call time in a measurement.)

The CPU kernels call bncpu's NumPy API, which validates every argument. Zero copy: a CPU
tensor is handed to bncpu as a NumPy view of its memory (``tensor.detach().numpy()``),
outputs are allocated by torch and written by the kernel through ``out=``, and bncpu's
own result arrays (statistics) become tensors with ``torch.from_numpy``. A channels-last
input (``channels_last``, ``channels_last_3d``, or any (N, C, *spatial) tensor whose
strides put C last) is viewed permuted to (N, *spatial, C), which is C-contiguous, and
run with ``axis=-1``; its output is allocated in the same memory format.

Running statistics: PyTorch does not take an autograd formula for an operator that
mutates its arguments, so the training forward returns the updated running statistics
as new tensors (the kernel updates a clone of the C values, like aten's
``_native_batch_norm_legit_functional``) and ``bncpu.torch.functional`` copies them
back with ``Tensor.copy_``, a mutation PyTorch records (and ``torch.compile``
functionalizes) as it does for its own batch norm. Nothing is written when the kernel
raises.
"""
from typing import Optional

import torch

import bncpu
from bncpu.torch._layout import channels_last_order

Tensor = torch.Tensor

_library = torch.library.Library("bncpu", "FRAGMENT")

# name -> (the operator torch.ops.bncpu.<name>, its CPU kernel)
OPERATORS = {}


def _operator(schema):
    """Define ``bncpu::<schema>`` with the decorated function as its CPU kernel."""
    def define(kernel):
        name = schema.split("(", 1)[0]
        _library.define(schema)
        _library.impl(name, kernel, "CPU")
        OPERATORS[name] = (getattr(torch.ops.bncpu, name).default, kernel)
        return kernel
    return define


def _fake(name):
    """Register the decorated function as the fake kernel of ``bncpu::<name>``."""
    return torch.library.register_fake(f"bncpu::{name}", lib=_library)


def register_autograd(name, backward, setup_context):
    """Register the autograd formula of the operator ``bncpu::<name>``."""
    torch.library.register_autograd(f"bncpu::{name}", backward, setup_context=setup_context,
                                    lib=_library)


def _array(tensor, order=None):
    """A NumPy view of a CPU tensor's memory (None stays None), permuted by ``order``."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if order is not None:
        tensor = tensor.permute(order)
    return tensor.numpy()


def _axis(order):
    return 1 if order is None else -1


def _tensor(array, like):
    """bncpu's result array as a tensor (no copy), or an empty tensor for None."""
    return like.new_empty(0) if array is None else torch.from_numpy(array)


def _or_empty(tensor, like):
    """``tensor``, or a new empty tensor for None (a result that is absent)."""
    return like.new_empty(0) if tensor is None else tensor


def _updated(stat, training):
    """The clone of a running statistic that the kernel updates, or None."""
    return stat.detach().clone() if training and stat is not None else None

# ----------------------------------------------------------------------------------
# Batch norm
# ----------------------------------------------------------------------------------
@_operator(
    "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? "
    "running_mean, Tensor? running_var, bool training, float momentum, float eps) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)")
def batch_norm_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       training: bool, momentum: float, eps: float
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(output, save_mean, save_invstd, new_running_mean, new_running_var); the last two
    are empty unless training with running statistics, save_* empty in evaluation."""
    order = channels_last_order(input)
    output = torch.empty_like(input)
    new_mean, new_var = _updated(running_mean, training), _updated(running_var, training)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(
        _array(input, order), _array(weight), _array(bias),
        _array(new_mean if training else running_mean),
        _array(new_var if training else running_var),
        training, momentum, eps, axis=_axis(order), out=_array(output, order))
    return (output, torch.from_numpy(save_mean), torch.from_numpy(save_invstd),
            _or_empty(new_mean, input), _or_empty(new_var, input))


@_fake("batch_norm_forward")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    stats = input.shape[1] if training else 0
    return (torch.empty_like(input), input.new_empty(stats), input.new_empty(stats),
            input.new_empty(running_mean.shape if training and running_mean is not None else 0),
            input.new_empty(running_var.shape if training and running_var is not None else 0))


@_operator(
    "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? "
    "running_mean, Tensor? running_var, Tensor save_mean, Tensor save_invstd, bool "
    "training, float eps) -> (Tensor, Tensor, Tensor)")
def batch_norm_backward(grad_output: Tensor, input: Tensor, weight: Optional[Tensor],
                        running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        save_mean: Tensor, save_invstd: Tensor, training: bool, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); the last two empty without weight."""
    order = channels_last_order(input)
    grad_input = torch.empty_like(input)
    _, grad_weight, grad_bias = bncpu.batch_norm_backward(
        _array(grad_output, order), _array(input, order), _array(weight),
        _array(running_mean), _array(running_var), _array(save_mean), _array(save_invstd),
        training, eps, axis=_axis(order), out=_array(grad_input, order))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


@_fake("batch_norm_backward")
def _(grad_output, input, weight, running_mean, running_var, save_mean, save_invstd, training,
      eps):
    params = 0 if weight is None else input.shape[1]
    return torch.empty_like(input), input.new_empty(params), input.new_empty(params)


# ----------------------------------------------------------------------------------
# Batch norm + (add) + ReLU
# ----------------------------------------------------------------------------------
@_operator(
    "batch_norm_relu_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? "
    "running_mean, Tensor? running_var, bool training, float momentum, float eps, "
    "Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def batch_norm_relu_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                            running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            training: bool, momentum: float, eps: float,
                            residual: Optional[Tensor]
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """relu(batch_norm(input) + residual): outputs as ``batch_norm_forward``'s."""
    order = channels_last_order(input)
    output = torch.empty_like(input)
    new_mean, new_var = _updated(running_mean, training), _updated(running_var, training)
    _, save_mean, save_invstd = bncpu.batch_norm_relu_forward(
        _array(input, order), _array(weight), _array(bias),
        _array(new_mean if training else running_mean),
        _array(new_var if training else running_var),
        training, momentum, eps, residual=_array(residual, order), axis=_axis(order),
        out=_array(output, order))
    return (output, torch.from_numpy(save_mean), torch.from_numpy(save_invstd),
            _or_empty(new_mean, input), _or_empty(new_var, input))


@_fake("batch_norm_relu_forward")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, residual):
    stats = input.shape[1] if training else 0
    return (torch.empty_like(input), input.new_empty(stats), input.new_empty(stats),
            input.new_empty(running_mean.shape if training and running_mean is not None else 0),
            input.new_empty(running_var.shape if training and running_var is not None else 0))


@_operator(
    "batch_norm_relu_backward(Tensor grad_output, Tensor output, Tensor input, "
    "Tensor? weight, Tensor? running_mean, Tensor? running_var, Tensor save_mean, "
    "Tensor save_invstd, bool training, float eps, bool residual_grad) -> (Tensor, "
    "Tensor, Tensor, Tensor)")
def batch_norm_relu_backward(grad_output: Tensor, output: Tensor, input: Tensor,
                             weight: Optional[Tensor], running_mean: Optional[Tensor],
                             running_var: Optional[Tensor], save_mean: Tensor,
                             save_invstd: Tensor, training: bool, eps: float,
                             residual_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual); the mask is output > 0;
    grad_weight and grad_bias empty without weight, grad_residual without residual_grad."""
    order = channels_last_order(input)
    grad_input = torch.empty_like(input)
    _, grad_weight, grad_bias, grad_residual = bncpu.batch_norm_relu_backward(
        _array(grad_output, order), _array(output, order), _array(input, order),
        _array(weight), _array(running_mean), _array(running_var), _array(save_mean),
        _array(save_invstd), training, eps, residual_grad=residual_grad, axis=_axis(order),
        out=_array(grad_input, order))
    if grad_residual is not None:
        grad_residual = torch.from_numpy(grad_residual)
        if order is not None:   # the array is (N, *spatial, C): back to (N, C, *spatial)
            grad_residual = grad_residual.permute(0, -1, *range(1, input.dim() - 1))
    return (grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input),
            input.new_empty(0) if grad_residual is None else grad_residual)


@_fake("batch_norm_relu_backward")
def _(grad_output, output, input, weight, running_mean, running_var, save_mean, save_invstd,
      training, eps, residual_grad):
    params = 0 if weight is None else input.shape[1]
    if not residual_grad:
        grad_residual = input.new_empty(0)
    elif channels_last_order(input) is not None:
        grad_residual = torch.empty_like(input)
    else:
        grad_residual = input.new_empty(input.shape)
    return (torch.empty_like(input), input.new_empty(params), input.new_empty(params),
            grad_residual)


# ----------------------------------------------------------------------------------
# Layer norm and RMS norm: rows of the trailing normalized_shape values
# ----------------------------------------------------------------------------------
def _leading(input, normalized_shape):
    return input.shape[:input.dim() - len(normalized_shape)]


@_operator(
    "layer_norm_forward(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? "
    "bias, float eps) -> (Tensor, Tensor, Tensor)")
def layer_norm_forward(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(output, mean, rstd), mean and rstd of the leading shape."""
    output = input.new_empty(input.shape)
    _, mean, rstd = bncpu.layer_norm_forward(_array(input), normalized_shape, _array(weight),
                                             _array(bias), eps, out=output.numpy())
    return output, torch.from_numpy(mean), torch.from_numpy(rstd)


@_fake("layer_norm_forward")
def _(input, normalized_shape, weight, bias, eps):
    leading = _leading(input, normalized_shape)
    return input.new_empty(input.shape), input.new_empty(leading), input.new_empty(leading)


@_operator(
    "layer_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, "
    "Tensor mean, Tensor rstd, Tensor? weight) -> (Tensor, Tensor, Tensor)")
def layer_norm_backward(grad_output: Tensor, input: Tensor, normalized_shape: list[int],
                        mean: Tensor, rstd: Tensor, weight: Optional[Tensor]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); the last two empty without weight."""
    grad_input = input.new_empty(input.shape)
    _, grad_weight, grad_bias = bncpu.layer_norm_backward(
        _array(grad_output), _array(input), normalized_shape, _array(mean), _array(rstd),
        _array(weight), out=grad_input.numpy())
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


@_fake("layer_norm_backward")
def _(grad_output, input, normalized_shape, mean, rstd, weight):
    params = (0,) if weight is None else tuple(normalized_shape)
    return input.new_empty(input.shape), input.new_empty(params), input.new_empty(params)


@_operator(
    "rms_norm_forward(Tensor input, int[] normalized_shape, Tensor? weight, float? "
    "eps) -> (Tensor, Tensor)")
def rms_norm_forward(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor],
                     eps: Optional[float]) -> tuple[Tensor, Tensor]:
    """(output, rstd), rstd of the leading shape."""
    output = input.new_empty(input.shape)
    _, rstd = bncpu.rms_norm_forward(_array(input), normalized_shape, _array(weight), eps,
                                     out=output.numpy())
    return output, torch.from_numpy(rstd)


@_fake("rms_norm_forward")
def _(input, normalized_shape, weight, eps):
    return input.new_empty(input.shape), input.new_empty(_leading(input, normalized_shape))


@_operator(
    "rms_norm_backward(Tensor grad_output, Tensor input, int[] normalized_shape, "
    "Tensor rstd, Tensor? weight) -> (Tensor, Tensor)")
def rms_norm_backward(grad_output: Tensor, input: Tensor, normalized_shape: list[int],
                      rstd: Tensor, weight: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_weight); grad_weight empty without weight."""
    grad_input = input.new_empty(input.shape)
    _, grad_weight = bncpu.rms_norm_backward(_array(grad_output), _array(input),
                                             normalized_shape, _array(rstd), _array(weight),
                                             out=grad_input.numpy())
    return grad_input, _tensor(grad_weight, input)


@_fake("rms_norm_backward")
def _(grad_output, input, normalized_shape, rstd, weight):
    params = (0,) if weight is None else tuple(normalized_shape)
    return input.new_empty(input.shape), input.new_empty(params)


# ----------------------------------------------------------------------------------
# Group norm, and instance norm with the input's statistics (one channel per group)
# ----------------------------------------------------------------------------------
@_operator(
    "group_norm_forward(Tensor input, int num_groups, Tensor? weight, Tensor? bias, "
    "float eps) -> (Tensor, Tensor, Tensor)")
def group_norm_forward(input: Tensor, num_groups: int, weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(output, mean, rstd), mean and rstd of shape (N, num_groups)."""
    order = channels_last_order(input)
    output = torch.empty_like(input)
    _, mean, rstd = bncpu.group_norm_forward(_array(input, order), num_groups, _array(weight),
                                             _array(bias), eps, axis=_axis(order),
                                             out=_array(output, order))
    return output, torch.from_numpy(mean), torch.from_numpy(rstd)


@_fake("group_norm_forward")
def _(input, num_groups, weight, bias, eps):
    stats = (input.shape[0], num_groups)
    return torch.empty_like(input), input.new_empty(stats), input.new_empty(stats)


@_operator(
    "group_norm_backward(Tensor grad_output, Tensor input, int num_groups, Tensor "
    "mean, Tensor rstd, Tensor? weight) -> (Tensor, Tensor, Tensor)")
def group_norm_backward(grad_output: Tensor, input: Tensor, num_groups: int, mean: Tensor,
                        rstd: Tensor, weight: Optional[Tensor]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); the last two empty without weight."""
    order = channels_last_order(input)
    grad_input = torch.empty_like(input)
    _, grad_weight, grad_bias = bncpu.group_norm_backward(
        _array(grad_output, order), _array(input, order), num_groups, _array(mean),
        _array(rstd), _array(weight), axis=_axis(order), out=_array(grad_input, order))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


@_fake("group_norm_backward")
def _(grad_output, input, num_groups, mean, rstd, weight):
    params = 0 if weight is None else input.shape[1]
    return torch.empty_like(input), input.new_empty(params), input.new_empty(params)


@_operator(
    "instance_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? "
    "running_mean, Tensor? running_var, float momentum, float eps) -> (Tensor, "
    "Tensor, Tensor, Tensor, Tensor)")
def instance_norm_forward(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          momentum: float, eps: float
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Instance norm with the input's statistics: (output, mean, rstd, new_running_mean,
    new_running_var), mean and rstd (N, C), the last two empty without running
    statistics."""
    order = channels_last_order(input)
    output = torch.empty_like(input)
    new_mean, new_var = _updated(running_mean, True), _updated(running_var, True)
    _, mean, rstd = bncpu.instance_norm_forward(
        _array(input, order), _array(weight), _array(bias), _array(new_mean), _array(new_var),
        True, momentum, eps, axis=_axis(order), out=_array(output, order))
    return (output, torch.from_numpy(mean), torch.from_numpy(rstd),
            _or_empty(new_mean, input), _or_empty(new_var, input))


@_fake("instance_norm_forward")
def _(input, weight, bias, running_mean, running_var, momentum, eps):
    stats = input.shape[:2]
    return (torch.empty_like(input), input.new_empty(stats), input.new_empty(stats),
            input.new_empty(running_mean.shape if running_mean is not None else 0),
            input.new_empty(running_var.shape if running_var is not None else 0))


@_operator(
    "instance_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor "
    "rstd, Tensor? weight) -> (Tensor, Tensor, Tensor)")
def instance_norm_backward(grad_output: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                           weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); the last two empty without weight."""
    order = channels_last_order(input)
    grad_input = torch.empty_like(input)
    _, grad_weight, grad_bias = bncpu.instance_norm_backward(
        _array(grad_output, order), _array(input, order), _array(mean), _array(rstd),
        _array(weight), axis=_axis(order), out=_array(grad_input, order))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


@_fake("instance_norm_backward")
def _(grad_output, input, mean, rstd, weight):
    params = 0 if weight is None else input.shape[1]
    return torch.empty_like(input), input.new_empty(params), input.new_empty(params)
