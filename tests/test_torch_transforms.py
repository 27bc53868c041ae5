"""bncpu.torch under torch's transforms and interceptors: jit trace and script,
torch.func (vmap, grad, jvp), forward-mode AD, dispatch and function modes, tensor
subclasses, torch.compile; the one rule that decides when the eager fast path runs
(bncpu.torch._route.eager_fast_path, docs/torch.md "When the eager fast path runs");
and flags that must be bools on every path.
"""
import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: bncpu.torch needs it")
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import bncpu.torch as bt  # noqa: E402
from bncpu.torch import _route  # noqa: E402

DTYPE = torch.float64
C = 4


def _stats():
    return torch.zeros(C, dtype=DTYPE), torch.full((C,), 2.0, dtype=DTYPE)


def _residual(x):
    return torch.cos(x)


# name: (bncpu's function of (x, weight, bias), torch's, input shape); the running
# statistics are made fresh on every call, so no call sees another's update.
FUNCTIONS = {
    "batch_norm train": (lambda x, w, b: bt.batch_norm(x, *_stats(), w, b, True),
                         lambda x, w, b: F.batch_norm(x, *_stats(), w, b, True), (3, C, 5)),
    "batch_norm eval": (lambda x, w, b: bt.batch_norm(x, *_stats(), w, b, False),
                        lambda x, w, b: F.batch_norm(x, *_stats(), w, b, False), (3, C, 5)),
    "batch_norm_relu": (
        lambda x, w, b: bt.batch_norm_relu(x, None, None, w, b, True, residual=_residual(x)),
        lambda x, w, b: torch.relu(F.batch_norm(x, None, None, w, b, True) + _residual(x)),
        (3, C, 5)),
    "layer_norm": (lambda x, w, b: bt.layer_norm(x, (C,), w, b),
                   lambda x, w, b: F.layer_norm(x, (C,), w, b), (3, 5, C)),
    "rms_norm": (lambda x, w, b: bt.rms_norm(x, (C,), w) + b,
                 lambda x, w, b: F.rms_norm(x, (C,), w) + b, (3, 5, C)),
    "group_norm": (lambda x, w, b: bt.group_norm(x, 2, w, b),
                   lambda x, w, b: F.group_norm(x, 2, w, b), (3, C, 5)),
    "instance_norm": (lambda x, w, b: bt.instance_norm(x, None, None, w, b),
                      lambda x, w, b: F.instance_norm(x, None, None, w, b), (3, C, 5)),
}


def inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=DTYPE) * 2 + 0.5
    weight = torch.rand(C, generator=generator, dtype=DTYPE) + 0.5
    bias = torch.randn(C, generator=generator, dtype=DTYPE)
    return x, weight, bias


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, C, 3), nn.BatchNorm2d(C), nn.ReLU(), nn.GroupNorm(2, C),
        nn.InstanceNorm2d(C, affine=True), nn.Flatten(), nn.LayerNorm(C * 36),
        nn.RMSNorm(C * 36)).double()


# ----------------------------------------------------------------------------------
# jit trace and script
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("fuse", [False, True], ids=["", "fused"])
def test_jit_trace_records_the_operators(trainable, training, fuse):
    """The trace records torch.ops.bncpu.* and the traced module gives the eager result
    (and the running statistics' update), on an input it was not traced with."""
    eager = bt.convert(model(), fuse=fuse).train(training).requires_grad_(trainable)
    traced_copy = copy.deepcopy(eager)
    x, other = (torch.randn(2, 3, 8, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(s))
                for s in (0, 1))
    traced = torch.jit.trace(traced_copy, (x,), check_trace=False)
    traced_copy.load_state_dict(eager.state_dict())
    assert "bncpu::batch_norm" in str(traced.inlined_graph)
    torch.testing.assert_close(traced(other), eager(other), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(traced_copy.state_dict(), eager.state_dict())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_script_gives_the_eager_result(training):
    eager = bt.convert(model(), fuse=True).train(training)
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    torch.testing.assert_close(scripted(x), eager(x), rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(scripted.buffers(), eager.buffers()):
        torch.testing.assert_close(ours, theirs)


# ----------------------------------------------------------------------------------
# Forward-mode AD and torch.func: torch's function, counted
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FUNCTIONS)
def test_forward_ad_gets_the_tangent(name):
    ours, theirs, shape = FUNCTIONS[name]
    x, weight, bias = inputs(shape)
    tangent = inputs(shape, seed=1)[0]
    bt.reset_fallback_counts()
    results = []
    for function in (ours, theirs):
        with fwAD.dual_level():
            output = function(fwAD.make_dual(x, tangent), weight, bias)
            results.append(fwAD.unpack_dual(output))
    (y, dy), (y_torch, dy_torch) = results
    assert dy is not None
    torch.testing.assert_close(y, y_torch)
    torch.testing.assert_close(dy, dy_torch)
    assert sum(count for (_, reason), count in bt.fallback_counts().items()
               if reason == "forward-mode AD") >= 1


@pytest.mark.parametrize("name", FUNCTIONS)
def test_gradcheck_with_forward_ad(name):
    ours, _, shape = FUNCTIONS[name]
    x, weight, bias = (t.requires_grad_(True) for t in inputs(shape))
    assert torch.autograd.gradcheck(ours, (x, weight, bias), check_forward_ad=True)


def test_forward_ad_through_a_converted_model():
    reference = model()
    converted = bt.convert(reference, fuse=True)
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    tangent = torch.randn_like(x)
    results = []
    for net in (converted, reference):
        with fwAD.dual_level():
            results.append(fwAD.unpack_dual(net(fwAD.make_dual(x, tangent))).tangent)
    assert results[0] is not None
    torch.testing.assert_close(*results)


TRANSFORMS = {
    "vmap": lambda f, x, w, b: torch.func.vmap(lambda xs: f(xs, w, b))(
        torch.stack([x, x * 0.5 + 1.0])),
    "grad": lambda f, x, w, b: torch.func.grad(
        lambda xs, ws: (f(xs, ws, b) * torch.sin(xs)).sum(), argnums=(0, 1))(x, w),
    "jvp": lambda f, x, w, b: torch.func.jvp(lambda xs: f(xs, w, b), (x,),
                                             (torch.cos(x),))[1],
}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_torch_func(name, transform):
    ours, theirs, shape = FUNCTIONS[name]
    x, weight, bias = inputs(shape)
    bt.reset_fallback_counts()
    if transform == "vmap" and name == "batch_norm train":
        # torch refuses to update unbatched running statistics under vmap: so does bncpu
        for function in (ours, theirs):
            with pytest.raises(RuntimeError, match="running_mean"):
                TRANSFORMS[transform](function, x, weight, bias)
    else:
        result = TRANSFORMS[transform](ours, x, weight, bias)
        torch.testing.assert_close(result, TRANSFORMS[transform](theirs, x, weight, bias))
    assert sum(count for (_, reason), count in bt.fallback_counts().items()
               if reason == "torch.func transform") >= 1


# ----------------------------------------------------------------------------------
# Dispatch and function modes, subclasses, torch.compile: the operators
# ----------------------------------------------------------------------------------
class _SeenOperators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


class _SeenFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


class _Recording(torch.Tensor):
    """A subclass that records the torch functions called on it."""
    seen = set()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.add(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("mode", [_SeenOperators, _SeenFunctions])
@pytest.mark.parametrize("name", ["batch_norm train", "layer_norm"])
def test_modes_see_the_operators(name, mode):
    ours, theirs, shape = FUNCTIONS[name]
    x, weight, bias = inputs(shape)
    with mode() as seen:
        result = ours(x, weight, bias)
    assert any(operator.startswith("bncpu.") for operator in seen.seen), seen.seen
    torch.testing.assert_close(result, theirs(x, weight, bias))


@pytest.mark.parametrize("argument", ["input", "weight"])
def test_subclass_arguments_take_the_operators(argument):
    x, weight, bias = inputs((3, C, 5))
    _Recording.seen.clear()
    if argument == "input":
        x = x.as_subclass(_Recording)
    else:
        weight = weight.as_subclass(_Recording)
    result = bt.batch_norm(x, None, None, weight, bias, True)
    assert "bncpu.batch_norm_forward.default" in _Recording.seen
    torch.testing.assert_close(result.as_subclass(torch.Tensor),
                               F.batch_norm(x, None, None, weight, bias, True).as_subclass(
                                   torch.Tensor))


def test_compile_fullgraph_counts_no_fallback():
    torch._dynamo.reset()
    x, weight, bias = inputs((3, C, 5))
    compiled, eager = (_stats(), _stats())

    def step(x, weight, bias, running_mean, running_var):
        return bt.batch_norm(x, running_mean, running_var, weight, bias, True)

    bt.reset_fallback_counts()
    result = torch.compile(step, fullgraph=True, backend="aot_eager")(x, weight, bias, *compiled)
    torch.testing.assert_close(result, step(x, weight, bias, *eager))
    torch.testing.assert_close(compiled, eager)
    assert bt.fallback_counts() == {}


# ----------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------
def _traced(body):
    torch.jit.trace(lambda x: body(x) or x, (torch.ones(1),), check_trace=False)


CONTEXTS = {   # name: a runner of body(tensor) in that context
    "jit trace": _traced,
    "dispatch mode": lambda body: _in(_SeenOperators(), body),
    "function mode": lambda body: _in(_SeenFunctions(), body),
    "profiler": lambda body: _in(torch.profiler.profile(), body),
    "forward AD level": lambda body: _in(fwAD.dual_level(), body),
    "vmap": lambda body: torch.func.vmap(lambda x: body(x) or x)(torch.ones(2, 1)),
    "grad": lambda body: torch.func.grad(lambda x: (body(x) or x).sum())(torch.ones(1)),
    "jvp": lambda body: torch.func.jvp(lambda x: body(x) or x, (torch.ones(1),),
                                       (torch.ones(1),)),
    "subclass": lambda body: body(torch.ones(1).as_subclass(_Recording)),
}


def _in(context, body):
    with context:
        body(torch.ones(1))


@pytest.mark.parametrize("context", CONTEXTS)
def test_the_fast_path_rule_refuses_every_transform(context):
    decisions = []

    def body(x):
        decisions.append(_route.eager_fast_path((x, None, 1.0, True)))

    CONTEXTS[context](body)
    assert decisions == [False]
    assert _route.eager_fast_path((torch.ones(1), nn.Parameter(torch.ones(1)), None, 1.0))


# ----------------------------------------------------------------------------------
# Flags are bools on every path
# ----------------------------------------------------------------------------------
FLAG_CALLS = {
    "batch_norm": lambda x, flag, rm, rv: bt.batch_norm(x, rm, rv, training=flag),
    "batch_norm_relu": lambda x, flag, rm, rv: bt.batch_norm_relu(x, rm, rv, training=flag),
    "instance_norm": lambda x, flag, rm, rv: bt.instance_norm(x, rm, rv,
                                                              use_input_stats=flag),
}


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "float16"])
@pytest.mark.parametrize("flag", ["False", None, 1, 0.0])
@pytest.mark.parametrize("name", FLAG_CALLS)
def test_flags_must_be_bools(name, flag, layout):
    """A string, None or a number is a TypeError naming the flag, whatever the input's
    layout or dtype, and nothing is written."""
    x = inputs((3, C, 5))[0]
    if layout == "transposed":
        x = x.transpose(0, 2).contiguous().transpose(0, 2)
    elif layout == "float16":
        x = x.half()
    rm, rv = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
    with pytest.raises(TypeError, match="training|use_input_stats"):
        FLAG_CALLS[name](x, flag, rm, rv)
    assert rm.tolist() == [0.0] * C and rv.tolist() == [1.0] * C


def test_numpy_bools_are_flags():
    import numpy as np

    x = inputs((3, C, 5))[0]
    torch.testing.assert_close(bt.batch_norm(x, *_stats(), training=np.bool_(False)),
                               F.batch_norm(x, *_stats(), training=False))
