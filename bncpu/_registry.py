"""Every computing function of bncpu, with what the tests (and the benchmarks) need to know
about it: how to make its inputs, its NumPy twin, its PyTorch counterpart, and which of
its arguments it writes in place.

    from bncpu._registry import FUNCTIONS
    spec = FUNCTIONS["batch_norm_forward"]
    args = spec.inputs((8, 3, 5, 5), np.float32, seed=0)      # a dict of arguments
    result = spec.call(args)                                  # bncpu's results, a tuple
    expected = spec.call_twin(args)                           # bncpu.reference's
    spec.torch_results(torch, args)                           # torch's (None: no CPU op)

A spec (``Function``):
  name       the public name (bncpu.<name>, bncpu.reference.<name>)
  family     batch_norm, layer_norm, group_norm, instance_norm or rms_norm
  params     argument names in call order; keyword-only ones are marked by ``keyword``
  inputs     inputs(shape, dtype, seed) -> {argument: value}: a valid call on an input
             of that shape (the function's own layout: (N, C, *spatial) or rows)
  shapes     small shapes that reach the function's work modes, for the tests
  written    arguments written in place (running statistics)
  has_out    whether it takes out=
  torch      torch_results(torch, args) -> a tuple comparable with the results, or
             None when PyTorch has no CPU kernel for the operation
  bad        bad(args) -> [(what, args, twin_raises)]: invalid calls, each one argument
             spoiled; bncpu must raise ValueError/TypeError and write nothing (out=,
             written arguments), and so must the twin where twin_raises
(The one-result wrappers batch_norm, layer_norm, group_norm, instance_norm and rms_norm
return the first result of their *_forward, which is listed.)
Every spec's results are a tuple (a single array is wrapped), None where a result is
absent (e.g. grad_weight without weight).
This module imports NumPy only; torch comes in as an argument.
"""
import collections

import numpy as np

import bncpu
from bncpu import reference


class Function(collections.namedtuple(
        "Function", "name family params keyword inputs shapes written has_out torch bad")):

    def _call(self, function, args, out=None):
        positional = [args[p] for p in self.params if p not in self.keyword]
        keywords = {p: args[p] for p in self.keyword if p in args}
        if out is not None:
            keywords["out"] = out
        result = function(*positional, **keywords)
        return result if isinstance(result, tuple) else (result,)

    def call(self, args, out=None):
        """bncpu.<name>(**args), results as a tuple."""
        return self._call(getattr(bncpu, self.name), args, out)

    def call_twin(self, args):
        """bncpu.reference.<name>(**args), results as a tuple."""
        return self._call(getattr(reference, self.name), args)

    def torch_results(self, torch, args):
        """torch's results as NumPy arrays (None: no CPU counterpart)."""
        if self.torch is None:
            return None
        return tuple(None if r is None else np.asarray(r.detach().numpy() if hasattr(r, "detach")
                                                       else r)
                     for r in self.torch(torch, args))

    def copy_args(self, args):
        """Arguments with the written ones copied (so two calls start alike)."""
        return {k: (v.copy() if k in self.written and v is not None else v)
                for k, v in args.items()}


def _normal(rng, shape, dtype, loc=0.5, scale=2.0):
    return rng.normal(loc, scale, size=shape).astype(dtype)


def _params(rng, c, dtype):
    return (rng.uniform(0.5, 1.5, c).astype(dtype), rng.normal(size=c).astype(dtype))


def _t(torch, array):
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array))


# ----------------------------------------------------------------------------------
# Input generators
# ----------------------------------------------------------------------------------
def _bn_forward_inputs(training):
    def inputs(shape, dtype, seed=0):
        rng = np.random.default_rng(seed)
        c = shape[1]
        weight, bias = _params(rng, c, dtype)
        return dict(input=_normal(rng, shape, dtype), weight=weight, bias=bias,
                    running_mean=rng.normal(size=c).astype(dtype),
                    running_var=rng.uniform(0.5, 2.0, c).astype(dtype),
                    training=training, momentum=0.1, eps=1e-5)
    return inputs


def _bn_backward_inputs(training):
    def inputs(shape, dtype, seed=0):
        args = _bn_forward_inputs(True)(shape, dtype, seed)
        rng = np.random.default_rng(seed + 1)
        _, save_mean, save_invstd = bncpu.batch_norm_forward(
            args["input"], None, None, None, None, True, 0.1, 1e-5)
        return dict(grad_output=_normal(rng, shape, dtype, 0.0, 1.0), input=args["input"],
                    weight=args["weight"], running_mean=args["running_mean"],
                    running_var=args["running_var"], save_mean=save_mean,
                    save_invstd=save_invstd, training=training, eps=1e-5)
    return inputs


def _bn_relu_forward_inputs(shape, dtype, seed=0):
    args = _bn_forward_inputs(True)(shape, dtype, seed)
    args["residual"] = _normal(np.random.default_rng(seed + 2), shape, dtype, 0.0, 1.0)
    return args


def _bn_relu_backward_inputs(shape, dtype, seed=0):
    forward = _bn_relu_forward_inputs(shape, dtype, seed)
    output, save_mean, save_invstd = bncpu.batch_norm_relu_forward(
        forward["input"], forward["weight"], forward["bias"], None, None, True, 0.1, 1e-5,
        residual=forward["residual"])
    args = _bn_backward_inputs(True)(shape, dtype, seed)
    args.update(output=output, save_mean=save_mean, save_invstd=save_invstd,
                residual_grad=True)
    return args


def _fold_inputs(shape, dtype, seed=0):
    """A layer weight of C = shape[1] output channels (the rest of the shape after them)
    and a batch norm of C channels."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    weight = _normal(rng, (c,) + (shape[2:] or shape[:1]), dtype)
    bias, bn_weight = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 1.5, c).astype(dtype)
    return dict(weight=weight, bias=bias, running_mean=rng.normal(size=c).astype(dtype),
                running_var=rng.uniform(0.5, 2.0, c).astype(dtype), bn_weight=bn_weight,
                bn_bias=rng.normal(size=c).astype(dtype), eps=1e-5)


def _bn_stats_inputs(shape, dtype, seed=0):
    return dict(input=_normal(np.random.default_rng(seed), shape, dtype))


def _bn_gather_inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = _normal(rng, shape, dtype)
    parts = [bncpu.batch_norm_stats(part) for part in np.array_split(x, 2, axis=0)]
    c = shape[1]
    return dict(mean=np.stack([p[0] for p in parts]), m2=np.stack([p[1] for p in parts]),
                count=np.array([p[2] for p in parts]),
                running_mean=rng.normal(size=c).astype(dtype),
                running_var=rng.uniform(0.5, 2.0, c).astype(dtype), momentum=0.1, eps=1e-5)


def _bn_split_stats(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = _normal(rng, shape, dtype)
    mean, m2, count = bncpu.batch_norm_stats(x)
    invstd = 1.0 / np.sqrt(m2 / max(count, 1) + 1e-5)
    weight, bias = _params(rng, shape[1], dtype)
    return rng, x, mean, invstd, weight, bias


def _bn_elemt_inputs(shape, dtype, seed=0):
    _, x, mean, invstd, weight, bias = _bn_split_stats(shape, dtype, seed)
    return dict(input=x, weight=weight, bias=bias, mean=mean, invstd=invstd)


def _bn_backward_reduce_inputs(shape, dtype, seed=0):
    rng, x, mean, invstd, weight, _ = _bn_split_stats(shape, dtype, seed)
    return dict(grad_output=_normal(rng, shape, dtype, 0.0, 1.0), input=x, mean=mean,
                invstd=invstd, weight=weight)


def _bn_backward_elemt_inputs(shape, dtype, seed=0):
    args = _bn_backward_reduce_inputs(shape, dtype, seed)
    sum_dy, sum_dy_xmu, _, _ = bncpu.batch_norm_backward_reduce(**args)
    return dict(args, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu,
                count=np.int64(args["input"].size // args["input"].shape[1]))


def _layer_inputs(dims, forward, rms=False):
    def inputs(shape, dtype, seed=0):
        rng = np.random.default_rng(seed)
        normalized = tuple(shape[-dims:])
        x = _normal(rng, shape, dtype)
        weight, bias = _params(rng, normalized, dtype)
        eps = 1e-6 if rms else 1e-5
        if forward:
            args = dict(input=x, normalized_shape=normalized, weight=weight, eps=eps)
            if not rms:
                args["bias"] = bias
            return args
        dy = _normal(rng, shape, dtype, 0.0, 1.0)
        if rms:
            _, rstd = bncpu.rms_norm_forward(x, normalized, weight, eps)
            return dict(grad_output=dy, input=x, normalized_shape=normalized, rstd=rstd,
                        weight=weight)
        _, mean, rstd = bncpu.layer_norm_forward(x, normalized, weight, bias, eps)
        return dict(grad_output=dy, input=x, normalized_shape=normalized, mean=mean, rstd=rstd,
                    weight=weight)
    return inputs


def _group_inputs(groups_of, forward, instance=False):
    def inputs(shape, dtype, seed=0):
        rng = np.random.default_rng(seed)
        c = shape[1]
        x = _normal(rng, shape, dtype)
        weight, bias = _params(rng, c, dtype)
        groups = groups_of(c)
        if instance and forward:
            return dict(input=x, weight=weight, bias=bias, running_mean=np.zeros(c, dtype),
                        running_var=np.ones(c, dtype), use_input_stats=True, momentum=0.1,
                        eps=1e-5)
        if forward:
            return dict(input=x, num_groups=groups, weight=weight, bias=bias, eps=1e-5)
        dy = _normal(rng, shape, dtype, 0.0, 1.0)
        _, mean, rstd = bncpu.group_norm_forward(x, groups, weight, bias, 1e-5)
        if instance:
            return dict(grad_output=dy, input=x, mean=mean.reshape(shape[0], c),
                        rstd=rstd.reshape(shape[0], c), weight=weight)
        return dict(grad_output=dy, input=x, num_groups=groups, mean=mean, rstd=rstd,
                    weight=weight)
    return inputs


def _two_groups(c):
    return 2 if c % 2 == 0 else 1


# ----------------------------------------------------------------------------------
# Bad calls: one argument spoiled each
# ----------------------------------------------------------------------------------
def _spoil(args, name, value):
    spoiled = dict(args)
    spoiled[name] = value
    return spoiled


def _bad_common(args, twin_checks_weight=True):
    """Spoiled calls that apply to every function: a complex input, a wrong-length
    weight, a NaN eps. Each is (what, args, twin_raises): whether bncpu.reference
    refuses it too (it checks shapes, not every dtype and scalar)."""
    cases = []
    first = "grad_output" if "grad_output" in args else "input"
    if first in args:
        cases.append(("complex input", _spoil(args, first, args[first].astype(np.complex128)),
                      False))
    if args.get("weight") is not None:
        weight = args["weight"]
        longer = np.ones(weight.shape[:-1] + (weight.shape[-1] + 1,), weight.dtype)
        cases.append(("weight one too long", _spoil(args, "weight", longer), twin_checks_weight))
    if "eps" in args:
        cases.append(("eps = NaN", _spoil(args, "eps", float("nan")), False))
    return cases


def _bad_running(args):
    cases = _bad_common(args)
    if args.get("running_mean") is not None:
        cases.append(("running_mean too short",
                      _spoil(args, "running_mean", args["running_mean"][:-1].copy()), True))
    if "momentum" in args:
        cases.append(("momentum = NaN", _spoil(args, "momentum", float("nan")), False))
    return cases


def _bad_backward_reduce(args):
    return _bad_common(args, twin_checks_weight=False)


def _bad_relu(args):
    """The batch-norm cases, and a residual or an output of another shape."""
    cases = _bad_running(args) if "momentum" in args else _bad_common(args)
    for name in ("residual", "output"):
        if name in args:
            cases.append((f"{name} of another shape", _spoil(args, name, args[name][:1]), True))
    return cases


def _bad_fold(args):
    return [("complex weight", _spoil(args, "weight", args["weight"].astype(np.complex128)),
             False),
            ("bn_weight one too long", _spoil(args, "bn_weight", np.ones(args["bias"].size + 1)),
             True),
            ("running_mean too short",
             _spoil(args, "running_mean", args["running_mean"][:-1].copy()), True),
            ("eps = NaN", _spoil(args, "eps", float("nan")), False)]


# ----------------------------------------------------------------------------------
# Torch counterparts
# ----------------------------------------------------------------------------------
def _torch_bn_forward(torch, a):
    return torch.ops.aten.native_batch_norm(
        _t(torch, a["input"]), _t(torch, a["weight"]), _t(torch, a["bias"]),
        _t(torch, a["running_mean"].copy()), _t(torch, a["running_var"].copy()),
        a["training"], a["momentum"], a["eps"])


def _torch_bn_backward(torch, a):
    return torch.ops.aten.native_batch_norm_backward(
        _t(torch, a["grad_output"]), _t(torch, a["input"]), _t(torch, a["weight"]),
        _t(torch, a["running_mean"]), _t(torch, a["running_var"]), _t(torch, a["save_mean"]),
        _t(torch, a["save_invstd"]), a["training"], a["eps"], [True, True, True])


def _torch_bn_relu_forward(torch, a):
    output, save_mean, save_invstd = _torch_bn_forward(torch, a)
    return torch.relu(output + _t(torch, a["residual"])), save_mean, save_invstd


def _torch_bn_relu_backward(torch, a):
    grad = torch.ops.aten.threshold_backward(_t(torch, a["grad_output"]), _t(torch, a["output"]),
                                             0)
    return _torch_bn_backward(torch, dict(a, grad_output=grad.numpy())) + (grad,)


def _torch_layer_forward(torch, a):
    return torch.ops.aten.native_layer_norm(
        _t(torch, a["input"]), list(a["normalized_shape"]), _t(torch, a["weight"]),
        _t(torch, a["bias"]), a["eps"])


def _torch_group_forward(torch, a):
    x = a["input"]
    n, c = x.shape[:2]
    return torch.ops.aten.native_group_norm(
        _t(torch, x), _t(torch, a["weight"]), _t(torch, a["bias"]), n, c,
        int(np.prod(x.shape[2:], dtype=np.int64)), a["num_groups"], a["eps"])


def _torch_rms_forward(torch, a):
    x = _t(torch, a["input"])
    return (torch.nn.functional.rms_norm(x, list(a["normalized_shape"]), _t(torch, a["weight"]),
                                         a["eps"]),)


BATCH_SHAPES = ((300, 17), (16, 8, 6, 6), (4, 6, 70, 70), (3, 1, 80, 80), (5, 3))
ROW_SHAPES = ((33, 100), (6, 7, 40), (3, 20000), (1, 5))
GROUP_SHAPES = ((8, 8, 14, 14), (2, 4, 150, 150), (3, 6, 9), (4, 2))
INSTANCE_SHAPES = GROUP_SHAPES[:3] + ((4, 2, 3),)

_entries = [
    ("batch_norm_forward", "batch_norm",
     ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
     (), _bn_forward_inputs(True), BATCH_SHAPES, ("running_mean", "running_var"), True,
     _torch_bn_forward, _bad_running),
    ("batch_norm_backward", "batch_norm",
     ("grad_output", "input", "weight", "running_mean", "running_var", "save_mean",
      "save_invstd", "training", "eps"),
     (), _bn_backward_inputs(True), BATCH_SHAPES, (), True, _torch_bn_backward, _bad_common),
    ("batch_norm_stats", "batch_norm", ("input",), (), _bn_stats_inputs, BATCH_SHAPES, (),
     False, None, _bad_common),
    ("batch_norm_gather_stats", "batch_norm",
     ("mean", "m2", "count", "running_mean", "running_var", "momentum", "eps"), (),
     _bn_gather_inputs, BATCH_SHAPES, ("running_mean", "running_var"), False, None,
     _bad_running),
    ("batch_norm_elemt", "batch_norm", ("input", "weight", "bias", "mean", "invstd"), (),
     _bn_elemt_inputs, BATCH_SHAPES, (), True, None, _bad_common),
    ("batch_norm_backward_reduce", "batch_norm",
     ("grad_output", "input", "mean", "invstd", "weight"), (), _bn_backward_reduce_inputs,
     BATCH_SHAPES, (), False, None, _bad_backward_reduce),
    ("batch_norm_backward_elemt", "batch_norm",
     ("grad_output", "input", "mean", "invstd", "weight", "sum_dy", "sum_dy_xmu", "count"), (),
     _bn_backward_elemt_inputs, BATCH_SHAPES, (), True, None, _bad_common),
    ("batch_norm_relu_forward", "batch_norm",
     ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
      "residual"), ("residual",), _bn_relu_forward_inputs, BATCH_SHAPES,
     ("running_mean", "running_var"), True, _torch_bn_relu_forward, _bad_relu),
    ("batch_norm_relu_backward", "batch_norm",
     ("grad_output", "output", "input", "weight", "running_mean", "running_var", "save_mean",
      "save_invstd", "training", "eps", "residual_grad"), ("residual_grad",),
     _bn_relu_backward_inputs, BATCH_SHAPES, (), True, _torch_bn_relu_backward, _bad_relu),
    ("fold_batch_norm", "batch_norm",
     ("weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias", "eps"), (),
     _fold_inputs, BATCH_SHAPES, (), False, None, _bad_fold),
    ("layer_norm_forward", "layer_norm", ("input", "normalized_shape", "weight", "bias", "eps"),
     (), _layer_inputs(1, True), ROW_SHAPES, (), True, _torch_layer_forward, _bad_common),
    ("layer_norm_backward", "layer_norm",
     ("grad_output", "input", "normalized_shape", "mean", "rstd", "weight"), (),
     _layer_inputs(1, False), ROW_SHAPES, (), True, None, _bad_common),
    ("group_norm_forward", "group_norm", ("input", "num_groups", "weight", "bias", "eps"), (),
     _group_inputs(_two_groups, True), GROUP_SHAPES, (), True, _torch_group_forward,
     _bad_common),
    ("group_norm_backward", "group_norm",
     ("grad_output", "input", "num_groups", "mean", "rstd", "weight"), (),
     _group_inputs(_two_groups, False), GROUP_SHAPES, (), True, None, _bad_common),
    ("instance_norm_forward", "instance_norm",
     ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum",
      "eps"), (), _group_inputs(lambda c: c, True, instance=True), INSTANCE_SHAPES,
     ("running_mean", "running_var"), True, None, _bad_running),
    ("instance_norm_backward", "instance_norm", ("grad_output", "input", "mean", "rstd", "weight"),
     (), _group_inputs(lambda c: c, False, instance=True), INSTANCE_SHAPES, (), True, None,
     _bad_common),
    ("rms_norm_forward", "rms_norm", ("input", "normalized_shape", "weight", "eps"), (),
     _layer_inputs(1, True, rms=True), ROW_SHAPES, (), True, _torch_rms_forward, _bad_common),
    ("rms_norm_backward", "rms_norm", ("grad_output", "input", "normalized_shape", "rstd", "weight"),
     (), _layer_inputs(1, False, rms=True), ROW_SHAPES, (), True, None, _bad_common),
]

FUNCTIONS = collections.OrderedDict(
    (entry[0], Function(*entry)) for entry in _entries)
