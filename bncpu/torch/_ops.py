"""bncpu's kernels as PyTorch custom operators, namespace ``bncpu`` (``torch.ops.bncpu``).

Each normalization is a pair of functional operators, ``<name>_forward`` and
``<name>_backward``, defined by schema in a ``torch.library.Library`` with a CPU kernel;
each has a fake kernel (shapes, dtypes and strides only, for ``torch.compile`` and
export) and the forward has its autograd formula registered
(``torch.library.register_autograd``), which calls the backward operator. In the
profiler they show as ``bncpu::batch_norm_forward`` and so on. (``Library.define`` and
``impl`` rather than ``torch.library.custom_op``: the same registrations, without the
wrapper custom_op puts around every call, which took 40% of a trivial operator's call
time in a measurement.)

Zero copy: a CPU tensor is handed to bncpu as a NumPy view of its memory
(``tensor.detach().numpy()``), outputs are allocated by torch and written by the kernel
through ``out=``, and bncpu's own result arrays (statistics) become tensors with
``torch.from_numpy``. A channels-last input (``channels_last``, ``channels_last_3d``, or
any (N, C, *spatial) tensor whose strides put C last) is viewed permuted to
(N, *spatial, C), which is C-contiguous, and run with ``axis=-1``; its output is
allocated in the same memory format.

Running statistics: PyTorch does not take an autograd formula for an operator that
mutates its arguments, so the training forward returns the updated running statistics
as new tensors (the kernel updates a clone of the C values, like aten's
``_native_batch_norm_legit_functional``) and ``bncpu.torch.functional`` copies them
back with ``Tensor.copy_``, a mutation PyTorch records (and ``torch.compile``
functionalizes) as it does for its own batch norm. Nothing is written when the kernel
raises. Plain eager calls on tensors the kernels take as they are skip the operators
altogether (see "Plain eager calls" at the end): there the kernel updates the running
statistics in place, as aten's batch norm does in eager mode.
"""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.graph import increment_version

import bncpu
from bncpu import _validate
from bncpu._ops import batch_norm as _bn
from bncpu._ops import row_norm as _rows
from bncpu.torch import _fallback

Tensor = torch.Tensor

_library = torch.library.Library("bncpu", "FRAGMENT")


# name -> (the operator torch.ops.bncpu.<name>, its CPU kernel)
_OPERATORS = {}


def _operator(schema):
    """Define ``bncpu::<schema>`` with the decorated function as its CPU kernel."""
    def define(kernel):
        name = schema.split("(", 1)[0]
        _library.define(schema)
        _library.impl(name, kernel, "CPU")
        _OPERATORS[name] = (getattr(torch.ops.bncpu, name).default, kernel)
        return kernel
    return define


def _through_dispatcher(input):
    """Whether a call must go through torch's dispatcher: under torch.compile, the
    profiler (which names the operators), a dispatch mode (fake tensors, export) or with a
    tensor subclass. Plain eager calls skip it: its boxing and two Python trampolines (the
    autograd kernel, then the CPU kernel) cost several times the kernel's own overhead on
    a small input."""
    return (torch.compiler.is_compiling() or type(input) is not torch.Tensor
            or torch.autograd._profiler_enabled() or torch._C._len_torch_dispatch_stack() > 0)


def _run(name, *args):
    """The operator ``bncpu::<name>`` (no autograd of its own: the backward operators) on
    ``args``, grad_output first."""
    operator, kernel = _OPERATORS[name]
    return operator(*args) if _through_dispatcher(args[0]) else kernel(*args)


def _fake(name):
    """Register the decorated function as the fake kernel of ``bncpu::<name>``."""
    return torch.library.register_fake(f"bncpu::{name}", lib=_library)


# name -> the forward operator's kernel and formulas as an autograd.Function
_EAGER = {}


def _autograd(name, kernel, backward, setup_context):
    """Register the autograd formula of the forward operator ``bncpu::<name>``, and build
    its eager twin (see ``forward``)."""
    torch.library.register_autograd(f"bncpu::{name}", backward, setup_context=setup_context,
                                    lib=_library)

    def eager_forward(ctx, *args):
        # (forward with ctx, not a separate setup_context: Function.apply binds the
        # arguments with inspect.signature on every call for the latter)
        output = kernel(*args)
        setup_context(ctx, args, output)
        return output

    eager = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward), "backward": staticmethod(backward)})
    _EAGER[name] = eager.apply


def forward(name, *args):
    """Run the forward operator ``bncpu::<name>`` on ``args`` (input first): through the
    dispatcher when ``_through_dispatcher`` says so, else its kernel and autograd formulas
    as an ``autograd.Function``, or its kernel alone when no gradient is wanted."""
    operator, kernel = _OPERATORS[name]
    if _through_dispatcher(args[0]):
        return operator(*args)
    if torch.is_grad_enabled() and any(isinstance(arg, torch.Tensor) and arg.requires_grad
                                       for arg in args):
        return _EAGER[name](*args)
    return kernel(*args)


def _array(tensor, order=None):
    """A NumPy view of a CPU tensor's memory (None stays None), permuted by ``order``."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if order is not None:
        tensor = tensor.permute(order)
    return tensor.numpy()


def _channels_last_order(tensor):
    """(0, 2, ..., ndim-1, 1) when that permutation makes the (N, C, *spatial) tensor
    C-contiguous and the tensor itself is not; None otherwise."""
    if tensor.dim() < 3 or tensor.is_contiguous():
        return None
    order = (0, *range(2, tensor.dim()), 1)
    return order if tensor.permute(order).is_contiguous() else None


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


def _bias_grad(grad_bias, weight, bias, grad_output, channel_dims):
    """grad_bias from the backward operator, or Σ grad_output when bias comes without weight
    (the kernels give the parameter gradients only with a weight)."""
    if bias is None or not bias.requires_grad:
        return None
    if weight is not None:
        return grad_bias
    dims = [d for d in range(grad_output.dim()) if d not in channel_dims]
    return grad_output.sum(dim=dims) if dims else grad_output


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
    order = _channels_last_order(input)
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
    order = _channels_last_order(input)
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


def _batch_norm_setup(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, training, _, eps = inputs
    running = (None, None) if training else (running_mean, running_var)
    ctx.save_for_backward(input, weight, bias, *running, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.training, ctx.eps = training, eps


def _batch_norm_grad(ctx, grad_output, *_):
    input, weight, bias, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grads = _fallback.double_backward(
            "batch_norm",
            lambda x, w, b: F.batch_norm(x, running_mean, running_var, w, b, ctx.training, 0.0,
                                         ctx.eps),
            (input, weight, bias), grad_output)
    else:
        grad_input, grad_weight, grad_bias = _run(
            "batch_norm_backward", grad_output, input, weight, running_mean, running_var,
            save_mean, save_invstd, ctx.training, ctx.eps)
        grads = (grad_input, grad_weight if weight is not None else None,
                 _bias_grad(grad_bias, weight, bias, grad_output, (1,)))
    return (*grads, None, None, None, None, None)


_autograd("batch_norm_forward", batch_norm_forward, _batch_norm_grad, _batch_norm_setup)


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
    order = _channels_last_order(input)
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
    order = _channels_last_order(input)
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
    elif _channels_last_order(input) is not None:
        grad_residual = torch.empty_like(input)
    else:
        grad_residual = input.new_empty(input.shape)
    return (torch.empty_like(input), input.new_empty(params), input.new_empty(params),
            grad_residual)


def _batch_norm_relu_setup(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, training, _, eps, residual = inputs
    running = (None, None) if training else (running_mean, running_var)
    ctx.save_for_backward(input, weight, bias, *running, output[1], output[2], output[0],
                          residual)
    ctx.mark_non_differentiable(*output[1:])
    ctx.training, ctx.eps = training, eps


def _batch_norm_relu_grad(ctx, grad_output, *_):
    (input, weight, bias, running_mean, running_var, save_mean, save_invstd, output,
     residual) = ctx.saved_tensors
    if torch.is_grad_enabled():
        def torch_forward(x, w, b, r):
            y = F.batch_norm(x, running_mean, running_var, w, b, ctx.training, 0.0, ctx.eps)
            return torch.relu(y if r is None else y + r)
        grads = _fallback.double_backward("batch_norm_relu", torch_forward,
                                          (input, weight, bias, residual), grad_output)
    else:
        residual_grad = residual is not None and residual.requires_grad
        grad_input, grad_weight, grad_bias, grad_residual = _run(
            "batch_norm_relu_backward", grad_output, output, input, weight, running_mean,
            running_var, save_mean, save_invstd, ctx.training, ctx.eps,
            residual_grad or (bias is not None and weight is None))
        grads = (grad_input, grad_weight if weight is not None else None,
                 _bias_grad(grad_bias, weight, bias, grad_residual, (1,)),
                 grad_residual if residual_grad else None)
    return (*grads[:3], None, None, None, None, None, grads[3])


_autograd("batch_norm_relu_forward", batch_norm_relu_forward, _batch_norm_relu_grad,
          _batch_norm_relu_setup)


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


def _layer_norm_setup(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps = inputs
    ctx.save_for_backward(input, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.normalized_shape, ctx.eps = normalized_shape, eps


def _layer_norm_grad(ctx, grad_output, *_):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grads = _fallback.double_backward(
            "layer_norm",
            lambda x, w, b: F.layer_norm(x, ctx.normalized_shape, w, b, ctx.eps),
            (input, weight, bias), grad_output)
    else:
        grad_input, grad_weight, grad_bias = _run(
            "layer_norm_backward", grad_output, input, ctx.normalized_shape, mean, rstd, weight)
        normalized_dims = range(input.dim() - len(ctx.normalized_shape), input.dim())
        grads = (grad_input, grad_weight if weight is not None else None,
                 _bias_grad(grad_bias, weight, bias, grad_output, normalized_dims))
    return grads[0], None, grads[1], grads[2], None


_autograd("layer_norm_forward", layer_norm_forward, _layer_norm_grad, _layer_norm_setup)


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


def _rms_norm_setup(ctx, inputs, output):
    input, normalized_shape, weight, eps = inputs
    ctx.save_for_backward(input, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.normalized_shape, ctx.eps = normalized_shape, eps


def _rms_norm_grad(ctx, grad_output, *_):
    input, weight, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grad_input, grad_weight = _fallback.double_backward(
            "rms_norm", lambda x, w: F.rms_norm(x, ctx.normalized_shape, w, ctx.eps),
            (input, weight), grad_output)
    else:
        grad_input, grad_weight = _run("rms_norm_backward", grad_output, input,
                                       ctx.normalized_shape, rstd, weight)
        grad_weight = grad_weight if weight is not None else None
    return grad_input, None, grad_weight, None


_autograd("rms_norm_forward", rms_norm_forward, _rms_norm_grad, _rms_norm_setup)


# ----------------------------------------------------------------------------------
# Group norm, and instance norm with the input's statistics (one channel per group)
# ----------------------------------------------------------------------------------
@_operator(
    "group_norm_forward(Tensor input, int num_groups, Tensor? weight, Tensor? bias, "
    "float eps) -> (Tensor, Tensor, Tensor)")
def group_norm_forward(input: Tensor, num_groups: int, weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(output, mean, rstd), mean and rstd of shape (N, num_groups)."""
    order = _channels_last_order(input)
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
    order = _channels_last_order(input)
    grad_input = torch.empty_like(input)
    _, grad_weight, grad_bias = bncpu.group_norm_backward(
        _array(grad_output, order), _array(input, order), num_groups, _array(mean),
        _array(rstd), _array(weight), axis=_axis(order), out=_array(grad_input, order))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


@_fake("group_norm_backward")
def _(grad_output, input, num_groups, mean, rstd, weight):
    params = 0 if weight is None else input.shape[1]
    return torch.empty_like(input), input.new_empty(params), input.new_empty(params)


def _group_norm_setup(ctx, inputs, output):
    input, num_groups, weight, bias, eps = inputs
    ctx.save_for_backward(input, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.num_groups, ctx.eps = num_groups, eps


def _group_norm_grad(ctx, grad_output, *_):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grads = _fallback.double_backward(
            "group_norm", lambda x, w, b: F.group_norm(x, ctx.num_groups, w, b, ctx.eps),
            (input, weight, bias), grad_output)
    else:
        grad_input, grad_weight, grad_bias = _run(
            "group_norm_backward", grad_output, input, ctx.num_groups, mean, rstd, weight)
        grads = (grad_input, grad_weight if weight is not None else None,
                 _bias_grad(grad_bias, weight, bias, grad_output, (1,)))
    return grads[0], None, grads[1], grads[2], None


_autograd("group_norm_forward", group_norm_forward, _group_norm_grad, _group_norm_setup)


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
    order = _channels_last_order(input)
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
    order = _channels_last_order(input)
    grad_input = torch.empty_like(input)
    _, grad_weight, grad_bias = bncpu.instance_norm_backward(
        _array(grad_output, order), _array(input, order), _array(mean), _array(rstd),
        _array(weight), axis=_axis(order), out=_array(grad_input, order))
    return grad_input, _tensor(grad_weight, input), _tensor(grad_bias, input)


@_fake("instance_norm_backward")
def _(grad_output, input, mean, rstd, weight):
    params = 0 if weight is None else input.shape[1]
    return torch.empty_like(input), input.new_empty(params), input.new_empty(params)


def _instance_norm_setup(ctx, inputs, output):
    input, weight, bias, _, _, _, eps = inputs
    ctx.save_for_backward(input, weight, bias, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.eps = eps


def _instance_norm_grad(ctx, grad_output, *_):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grads = _fallback.double_backward(
            "instance_norm",
            lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.0, ctx.eps),
            (input, weight, bias), grad_output)
    else:
        grad_input, grad_weight, grad_bias = _run(
            "instance_norm_backward", grad_output, input, mean, rstd, weight)
        grads = (grad_input, grad_weight if weight is not None else None,
                 _bias_grad(grad_bias, weight, bias, grad_output, (1,)))
    return (*grads, None, None, None, None)


_autograd("instance_norm_forward", instance_norm_forward, _instance_norm_grad,
          _instance_norm_setup)


# ----------------------------------------------------------------------------------
# Plain eager calls the kernels take as they are: straight to bncpu._ops
# ----------------------------------------------------------------------------------
# A plain eager call (see _through_dispatcher) whose input is contiguous or channels
# last, with contiguous parameters and running statistics of the right sizes, and eps and
# momentum Python floats in range, skips the operators and bncpu's Python validation:
# torch has already guaranteed what bncpu would check (one CPU float dtype: see
# _fallback.reason) and the checks below the rest, so the kernel wrappers get the
# tensors' own memory and nothing else runs. The running statistics are updated in place
# by the kernel and their version counters bumped, as aten's batch norm does in eager
# mode. Anything else (other strides, sizes that disagree, empty inputs, values out of
# range) takes the operators' path, which copies where it must and raises bncpu's errors
# before writing anything. The saved statistics stay NumPy arrays on the autograd
# context. Per-call CPU time on a tiny input is measured by
# benchmarks/torch_integration.py --only overhead.
def _view(tensor):
    """A NumPy view of a CPU tensor's memory (detached; None stays None)."""
    return None if tensor is None else tensor.numpy(force=True)


def _vector(tensor, size):
    """Whether ``tensor`` is None or ``size`` contiguous values."""
    return tensor is None or (tensor.shape == (size,) and tensor.is_contiguous())


def _shaped(tensor, shape):
    """Whether ``tensor`` is None or a contiguous tensor of ``shape``."""
    return tensor is None or (tensor.shape == shape and tensor.is_contiguous())


def _eps_in_range(eps):
    return type(eps) is float and 0.0 <= eps < float("inf")


def _like(input, tensor):
    """``tensor`` with ``input``'s strides (itself when it has them: no copy)."""
    if tensor.stride() == input.stride():
        return tensor
    return torch.empty_like(input).copy_(tensor)


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in tensors)


def _channel_layout(input):
    """(outer, channels, inner) of an (N, C, *) input as the batch-norm kernels read its
    memory: (N, C, prod(*)) when contiguous, (N·prod(*), C, 1) when channels last;
    None otherwise or when it is empty."""
    shape = input.shape
    if len(shape) < 2 or input.numel() == 0:
        return None
    inner = input.numel() // (shape[0] * shape[1])
    if input.is_contiguous():
        return shape[0], shape[1], inner
    if _channels_last_order(input) is not None:
        return shape[0] * inner, shape[1], 1
    return None


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _raise_for_status(status):
    if status != 0:
        _validate.raise_for_status(status)


class _DirectBatchNorm(torch.autograd.Function):
    """Batch norm, or relu(batch_norm(x) + residual) (``relu``), on tensors the kernels
    take as they are, with autograd."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, arguments):
        # (the arguments autograd need not see in one tuple: apply costs per argument)
        running_mean, running_var, layout, training, momentum, eps, relu = arguments
        output, save_mean, save_invstd, views = _batch_norm_kernel(
            input, weight, bias, residual, running_mean, running_var, layout, training,
            momentum, eps, True, relu)
        x, w, rm, rv, y = views
        running = (None, None) if training else (running_mean, running_var)
        ctx.save_for_backward(input, weight, bias, residual, output if relu else None,
                              *running)
        ctx.layout, ctx.training, ctx.eps, ctx.relu = layout, training, eps, relu
        ctx.arrays = (save_mean, save_invstd, x, w, y) + ((None, None) if training
                                                          else (rm, rv))
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, residual, _, running_mean, running_var = ctx.saved_tensors
        if torch.is_grad_enabled():
            def torch_forward(x, w, b, r):
                y = F.batch_norm(x, running_mean, running_var, w, b, ctx.training, 0.0,
                                 ctx.eps)
                return torch.relu(y if r is None else y + r) if ctx.relu else y
            grads = _fallback.double_backward(
                "batch_norm_relu" if ctx.relu else "batch_norm", torch_forward,
                (input, weight, bias, residual), grad_output)
            return (*grads, None)
        n, c, s = ctx.layout
        needs = ctx.needs_input_grad
        grad_input = torch.empty_like(input) if needs[0] or ctx.relu else None
        dtype = _NUMPY_DTYPES[input.dtype]
        grad_weight = np.empty(c, dtype) if needs[1] else None
        grad_bias = np.empty(c, dtype) if needs[2] else None
        # (the forward's NumPy views: ctx.saved_tensors above checked that none of those
        # tensors was modified in place since)
        save_mean, save_invstd, x, w, y, running_mean, running_var = ctx.arrays
        dy = _view(_like(input, grad_output))
        if ctx.relu:
            grad_residual = torch.empty_like(input) if needs[3] else None
            status = _bn.relu_backward(
                dy, y, x, _view(grad_input), n, c, s, w, running_mean, running_var,
                save_mean, save_invstd, ctx.training, ctx.eps, grad_weight, grad_bias,
                _view(grad_residual))
        else:
            grad_residual = None
            status = _bn.backward(
                dy, x, _view(grad_input), n, c, s, w, running_mean, running_var, save_mean,
                save_invstd, ctx.training, ctx.eps, grad_weight, grad_bias)
        _raise_for_status(status)
        return (grad_input if needs[0] else None,
                None if grad_weight is None else torch.from_numpy(grad_weight),
                None if grad_bias is None else torch.from_numpy(grad_bias), grad_residual,
                None)


def _batch_norm_kernel(input, weight, bias, residual, running_mean, running_var, layout,
                       training, momentum, eps, save, relu):
    """(output, save_mean, save_invstd, (x, weight, running_mean, running_var, output) as
    NumPy views): the forward kernel (``relu``: the fused one) on the tensors' memory, the
    running statistics updated in place in training; the statistics (NumPy) when
    ``save`` and training, else None."""
    n, c, s = layout
    output = torch.empty_like(input)
    x, w, b, rm, rv = (_view(input), _view(weight), _view(bias), _view(running_mean),
                       _view(running_var))
    y = _view(output)
    save_mean = save_invstd = None
    if training:
        if save:
            save_mean, save_invstd = np.empty(c, x.dtype), np.empty(c, x.dtype)
        if relu:
            status = _bn.relu_forward_train(x, _view(residual), y, n, c, s, w, b, rm, rv,
                                            momentum, eps, save_mean, save_invstd)
        else:
            status = _bn.forward_train(x, y, n, c, s, w, b, rm, rv, momentum, eps, save_mean,
                                       save_invstd)
        _raise_for_status(status)
        if running_mean is not None:
            increment_version(running_mean)
            increment_version(running_var)
    elif relu:
        _raise_for_status(_bn.relu_forward_eval(x, _view(residual), y, n, c, s, w, b, rm, rv,
                                                eps))
    else:
        _raise_for_status(_bn.forward_eval(x, y, n, c, s, w, b, rm, rv, eps))
    return output, save_mean, save_invstd, (x, w, rm, rv, y)


def batch_norm_direct(input, weight, bias, running_mean, running_var, training, momentum,
                      eps, relu=False, residual=None):
    """``F.batch_norm``'s result (``relu``: ``relu(F.batch_norm(...) + residual)``)
    computed straight by the kernel, running statistics updated in place, or None when
    the call needs the operators' path."""
    if _through_dispatcher(input):
        return None
    layout = _channel_layout(input)
    if layout is None:
        return None
    n, c, s = layout
    if not (_vector(weight, c) and _vector(bias, c) and _vector(running_mean, c)
            and _vector(running_var, c) and _eps_in_range(eps)
            and type(momentum) is float and 0.0 <= momentum <= 1.0
            and (running_mean is None) == (running_var is None)):
        return None
    if residual is not None and (residual.shape != input.shape
                                 or residual.stride() != input.stride()):
        return None
    if training:
        if n * s < 2:
            return None
        if running_mean is not None and running_mean.data_ptr() == running_var.data_ptr():
            return None
    elif running_mean is None:
        return None
    if _wants_grad(input, weight, bias, residual):
        return _DirectBatchNorm.apply(input, weight, bias, residual, (
            running_mean, running_var, layout, training, momentum, eps, relu))
    return _batch_norm_kernel(input, weight, bias, residual, running_mean, running_var, layout,
                              training, momentum, eps, False, relu)[0]


class _DirectRowNorm(torch.autograd.Function):
    """Layer norm (``centered``) or RMS norm on tensors the kernels take as they are, as
    rows of d values, with autograd."""

    @staticmethod
    def forward(ctx, input, weight, bias, normalized_shape, rows, d, eps, centered):
        output, mean, rstd = _row_norm_kernel(input, weight, bias, rows, d, eps, centered,
                                              True)
        ctx.save_for_backward(input, weight, bias)
        ctx.normalized_shape, ctx.rows, ctx.d = normalized_shape, rows, d
        ctx.eps, ctx.centered, ctx.stats = eps, centered, (mean, rstd)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            shape, eps = ctx.normalized_shape, ctx.eps
            if ctx.centered:
                grads = _fallback.double_backward(
                    "layer_norm", lambda x, w, b: F.layer_norm(x, shape, w, b, eps),
                    (input, weight, bias), grad_output)
            else:
                grads = (*_fallback.double_backward(
                    "rms_norm", lambda x, w: F.rms_norm(x, shape, w, eps), (input, weight),
                    grad_output), None)
            return (*grads, None, None, None, None, None)
        needs = ctx.needs_input_grad
        grad_input = torch.empty_like(input) if needs[0] else None
        dtype = _NUMPY_DTYPES[input.dtype]
        grad_weight = np.empty(ctx.normalized_shape, dtype) if needs[1] else None
        grad_bias = np.empty(ctx.normalized_shape, dtype) if needs[2] else None
        mean, rstd = ctx.stats
        _raise_for_status(_rows.backward(
            _view(_like(input, grad_output)), _view(input), _view(grad_input), ctx.rows, ctx.d,
            1, 1, mean, rstd, _view(weight), ctx.centered, grad_weight, grad_bias))
        return (grad_input, None if grad_weight is None else torch.from_numpy(grad_weight),
                None if grad_bias is None else torch.from_numpy(grad_bias),
                None, None, None, None, None)


def _row_norm_kernel(input, weight, bias, rows, d, eps, centered, save):
    """(output, mean, rstd): the layer-norm (``centered``) or RMS-norm forward kernel on
    the tensors' memory; the statistics (NumPy; mean None for RMS norm) when ``save``,
    else None."""
    output = torch.empty_like(input)
    mean = rstd = None
    if save:
        dtype = _NUMPY_DTYPES[input.dtype]
        mean = np.empty(rows, dtype) if centered else None
        rstd = np.empty(rows, dtype)
    _raise_for_status(_rows.forward(_view(input), _view(output), rows, d, 1, 1, _view(weight),
                                    _view(bias), eps, centered, mean, rstd))
    return output, mean, rstd


def row_norm_direct(input, normalized_shape, weight, bias, eps, centered):
    """``F.layer_norm``'s (``centered``) or ``F.rms_norm``'s result computed straight by
    the kernel, or None when the call needs the operators' path. ``eps`` None (RMS norm)
    is the dtype's machine epsilon."""
    if _through_dispatcher(input):
        return None
    if type(normalized_shape) is int:
        shape = (normalized_shape,)
    elif type(normalized_shape) in (tuple, list, torch.Size):
        shape = tuple(normalized_shape)
    else:
        return None
    if not all(type(size) is int for size in shape):
        return None
    if eps is None and not centered:
        eps = torch.finfo(input.dtype).eps
    leading = input.dim() - len(shape)
    if not (shape and leading >= 0 and input.shape[leading:] == shape and input.numel()
            and input.is_contiguous() and _shaped(weight, shape) and _shaped(bias, shape)
            and _eps_in_range(eps)):
        return None
    d = math.prod(shape)
    rows = input.numel() // d
    if _wants_grad(input, weight, bias):
        return _DirectRowNorm.apply(input, weight, bias, shape, rows, d, eps, centered)
    return _row_norm_kernel(input, weight, bias, rows, d, eps, centered, False)[0]
