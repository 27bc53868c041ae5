"""bncpu.torch's functions and operators against torch.nn.functional: values, gradients,
running statistics, channels_last (without a copy), gradcheck, torch.library.opcheck,
torch.compile(fullgraph=True), the profiler, fallbacks and errors.

Modules, convert, fuse and fold are in test_torch_modules.py; DDP in test_torch_ddp.py;
the LeNet example in test_torch_lenet.py.
"""
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: bncpu.torch needs it")
import torch.nn.functional as F  # noqa: E402

import bncpu  # noqa: E402
import bncpu.torch as bt  # noqa: E402

DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}
SHAPES = {"NCHW": (4, 6, 5, 7), "C=1": (3, 1, 4, 4), "N=1": (1, 5, 3, 3),
          "primes": (3, 7, 11), "NCDHW": (2, 4, 3, 2, 5)}


def tensors(shape, dtype, seed=0, n=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) * 2 + 0.5 for _ in range(n)]


def channels_last(x):
    """x with its channel dim stored last (channels_last / channels_last_3d, or the
    same strides for a 3-D input)."""
    last = (0, *range(2, x.dim()), 1)
    return x.permute(last).contiguous().permute(0, -1, *range(1, x.dim() - 1))


def run(function, inputs, grad_output_seed=7):
    """function(*inputs) and the gradients of every input that requires grad, for one
    random grad_output (the inputs are cloned first)."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
              for t in inputs]
    output = function(*inputs)
    grad_output = tensors(output.shape, output.dtype, grad_output_seed)[0]
    output.backward(grad_output)
    return output, [None if t is None or not t.requires_grad else t.grad for t in inputs]


def assert_same(bncpu_result, torch_result, dtype):
    (y1, g1), (y2, g2) = bncpu_result, torch_result
    torch.testing.assert_close(y1, y2, **TOL[dtype])
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL[dtype])


def params(c, dtype, affine, requires_grad=True, seed=1):
    weight, bias = tensors((c,), dtype, seed, 2)
    weight = weight.abs() + 0.5
    return [t.requires_grad_(requires_grad) if use else None
            for t, use in zip((weight, bias), affine)]


AFFINE = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True),
          "none": (False, False)}


# ----------------------------------------------------------------------------------
# Against torch.nn.functional
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("affine", AFFINE.values(), ids=AFFINE.keys())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_training_and_eval(dtype, shape, affine, layout):
    x = tensors(shape, dtype)[0]
    if layout == "channels_last":
        x = channels_last(x)
    x.requires_grad_(True)
    c = shape[1]
    weight, bias = params(c, dtype, affine)
    running = {name: [tensors((c,), dtype, 3)[0], tensors((c,), dtype, 4)[0].abs() + 0.5]
               for name in ("bncpu", "torch")}
    for training in (True, False):
        results = {}
        for name, function in (("bncpu", bt.batch_norm), ("torch", F.batch_norm)):
            rm, rv = running[name]
            results[name] = run(lambda x, w, b: function(x, rm, rv, w, b, training, 0.3, 1e-4),
                                (x, weight, bias))
        assert_same(results["bncpu"], results["torch"], dtype)
        for ours, theirs in zip(running["bncpu"], running["torch"]):
            torch.testing.assert_close(ours, theirs, **TOL[dtype])
        # the memory format kept: torch's for 4-D and 5-D, the input's strides for 3-D
        # input (where torch returns a contiguous output)
        expected = results["torch"][0] if x.dim() > 3 else x
        assert results["bncpu"][0].stride() == expected.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE.values(), ids=AFFINE.keys())
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_relu(dtype, affine, residual, layout):
    shape = (4, 6, 5, 3)
    x, r = tensors(shape, dtype, 0, 2)
    if layout == "channels_last":
        x, r = channels_last(x), channels_last(r)
    x.requires_grad_(True)
    r = r.requires_grad_(True) if residual else None
    weight, bias = params(shape[1], dtype, affine)
    for training in (True, False):
        rm1, rv1 = torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype)
        rm2, rv2 = rm1.clone(), rv1.clone()
        ours = run(lambda x, w, b, r: bt.batch_norm_relu(x, rm1, rv1, w, b, training,
                                                         residual=r), (x, weight, bias, r))
        theirs = run(lambda x, w, b, r: torch.relu(
            F.batch_norm(x, rm2, rv2, w, b, training) + (0 if r is None else r)),
            (x, weight, bias, r))
        assert_same(ours, theirs, dtype)
        torch.testing.assert_close(rm1, rm2, **TOL[dtype])
        torch.testing.assert_close(rv1, rv2, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("affine", AFFINE.values(), ids=AFFINE.keys())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_and_instance_norm(dtype, shape, affine, layout):
    x = tensors(shape, dtype)[0]
    if layout == "channels_last":
        x = channels_last(x)
    x.requires_grad_(True)
    c = shape[1]
    weight, bias = params(c, dtype, affine)
    groups = 1 if c in (1, 5, 7) else 2
    # torch 2.13's group-norm backward fails for a bias without weight ("tensor does not
    # have a device"): its reference gets a weight of ones instead, the same function.
    ones = torch.ones(c, dtype=dtype) if weight is None and bias is not None else None
    assert_same(run(lambda x, w, b: bt.group_norm(x, groups, w, b, 1e-4), (x, weight, bias)),
                run(lambda x, w, b: F.group_norm(x, groups, w if ones is None else ones, b, 1e-4),
                    (x, weight, bias)),
                dtype)
    stats = {name: [torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)]
             for name in ("bncpu", "torch")}
    for use_input_stats in (True, False):
        results = {name: run(lambda x, w, b: function(x, *stats[name], w, b, use_input_stats,
                                                      0.2, 1e-4), (x, weight, bias))
                   for name, function in (("bncpu", bt.instance_norm),
                                          ("torch", F.instance_norm))}
        assert_same(results["bncpu"], results["torch"], dtype)
        for ours, theirs in zip(stats["bncpu"], stats["torch"]):
            torch.testing.assert_close(ours, theirs, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalized_shape", [(7,), (5, 7), 7], ids=str)
@pytest.mark.parametrize("affine", AFFINE.values(), ids=AFFINE.keys())
def test_layer_and_rms_norm(dtype, normalized_shape, affine):
    """normalized_shape may be an int (torch's functions want a sequence, its modules
    accept an int)."""
    x = tensors((3, 4, 5, 7), dtype)[0].requires_grad_(True)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    weight, bias = (t.reshape(shape) if t is not None else None
                    for t in params(int(np.prod(shape)), dtype, affine))
    assert_same(
        run(lambda x, w, b: bt.layer_norm(x, normalized_shape, w, b, 1e-4), (x, weight, bias)),
        run(lambda x, w, b: F.layer_norm(x, shape, w, b, 1e-4), (x, weight, bias)),
        dtype)
    for eps in (None, 1e-4):
        assert_same(run(lambda x, w: bt.rms_norm(x, normalized_shape, w, eps), (x, weight)),
                    run(lambda x, w: F.rms_norm(x, shape, w, eps), (x, weight)),
                    dtype)


LAYOUTS = {"transposed": lambda x: x.transpose(2, 3), "sliced": lambda x: x[:, :, ::2],
           "expanded": lambda x: x[:1].expand(3, -1, -1, -1)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_strides(layout):
    """Non-contiguous inputs (bncpu copies them) give torch's values and gradients."""
    base = tensors((3, 4, 6, 5), torch.float64)[0]
    weight, bias = params(4, torch.float64, (True, True))
    for ours, theirs in ((lambda x, w, b: bt.batch_norm(x, None, None, w, b, True),
                          lambda x, w, b: F.batch_norm(x, None, None, w, b, True)),
                         (lambda x, w, b: bt.group_norm(x, 2, w, b),
                          lambda x, w, b: F.group_norm(x, 2, w, b))):
        # the view is taken inside the function, so the operators receive its strides
        results = [run(lambda x, w, b: function(LAYOUTS[layout](x), w, b),
                       [base.requires_grad_(True), weight, bias])
                   for function in (ours, theirs)]
        assert not LAYOUTS[layout](base).is_contiguous()
        assert_same(*results, torch.float64)


def test_channels_last_runs_without_a_copy(monkeypatch):
    """The operator hands bncpu the tensors' own memory, permuted to (N, H, W, C) and
    C-contiguous, with axis=-1; a plain eager call hands the kernel that memory as
    (N·H·W, C, 1). Either way the output is channels_last."""
    from bncpu._ops import batch_norm as kernels

    seen = []
    original, original_kernel = bncpu.batch_norm_forward, kernels.forward_train

    def spy(input, *args, axis=1, out=None, **kwargs):
        seen.append((input.ctypes.data, input.flags.c_contiguous, out.ctypes.data, axis))
        return original(input, *args, axis=axis, out=out, **kwargs)

    def kernel_spy(x, y, n, c, s, *args, **kwargs):
        seen.append((x.ctypes.data, y.ctypes.data, (n, c, s)))
        return original_kernel(x, y, n, c, s, *args, **kwargs)

    monkeypatch.setattr(bncpu, "batch_norm_forward", spy)
    monkeypatch.setattr(kernels, "forward_train", kernel_spy)
    x = channels_last(tensors((2, 3, 4, 5), torch.float32)[0])
    y = torch.ops.bncpu.batch_norm_forward.default(x, None, None, None, None, True, 0.1,
                                                   1e-5)[0]
    assert seen[0] == (x.data_ptr(), True, y.data_ptr(), -1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    seen.clear()
    y = bt.batch_norm(x, None, None, training=True)
    assert seen == [(x.data_ptr(), y.data_ptr(), (40, 3, 1))]
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch_leaves_running_stats():
    x = torch.empty(0, 3, 4, 4)
    rm, rv = torch.full((3,), 0.5), torch.full((3,), 2.0)
    y = bt.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    assert rm.tolist() == [0.5] * 3 and rv.tolist() == [2.0] * 3


# ----------------------------------------------------------------------------------
# gradcheck, opcheck
# ----------------------------------------------------------------------------------
def gradcheck_inputs(shape, c, seed=0, residual=False):
    x, r = tensors(shape, torch.float64, seed, 2)
    weight, bias = params(c, torch.float64, (True, True))
    return [x.requires_grad_(True), weight, bias] + ([r.requires_grad_(True)] if residual else [])


GRADCHECK = {
    "batch_norm train": (lambda x, w, b: bt.batch_norm(x, None, None, w, b, True), (3, 4, 5)),
    "batch_norm eval": (lambda x, w, b: bt.batch_norm(
        x, torch.arange(4.0, dtype=torch.float64), torch.full((4,), 2.0, dtype=torch.float64),
        w, b, False), (3, 4, 5)),
    "batch_norm channels_last": (lambda x, w, b: bt.batch_norm(
        channels_last(x), None, None, w, b, True), (2, 4, 3, 3)),
    "batch_norm_relu": (lambda x, w, b, r: bt.batch_norm_relu(
        x, None, None, w, b, True, residual=r), (3, 4, 5)),
    "group_norm": (lambda x, w, b: bt.group_norm(x, 2, w, b), (3, 4, 5)),
    "instance_norm": (lambda x, w, b: bt.instance_norm(x, None, None, w, b), (3, 4, 5)),
    "layer_norm": (lambda x, w, b: bt.layer_norm(x, (4,), w, b), (3, 5, 4)),
    "rms_norm": (lambda x, w, b: bt.rms_norm(x, (4,), w) + b, (3, 5, 4)),
}


@pytest.mark.parametrize("name", GRADCHECK)
def test_gradcheck(name):
    function, shape = GRADCHECK[name]
    c = shape[-1] if name in ("layer_norm", "rms_norm") else shape[1]
    inputs = gradcheck_inputs(shape, c, residual=name == "batch_norm_relu")
    assert torch.autograd.gradcheck(function, inputs)


def test_double_backward_falls_back_to_torch():
    bt.reset_fallback_counts()
    function, shape = GRADCHECK["batch_norm train"]
    inputs = gradcheck_inputs(shape, shape[1])
    assert torch.autograd.gradgradcheck(function, inputs)
    assert bt.fallback_counts()[("batch_norm", "double backward")] > 0


OPCHECK = {
    "batch_norm_forward": lambda x, w, b: (x, w, b, torch.zeros(4), torch.ones(4), True, 0.1,
                                           1e-5),
    "batch_norm_relu_forward": lambda x, w, b: (x, w, b, None, None, True, 0.1, 1e-5,
                                                (x.detach() * 0.5).requires_grad_(True)),
    "group_norm_forward": lambda x, w, b: (x, 2, w, b, 1e-5),
    "instance_norm_forward": lambda x, w, b: (x, w, b, torch.zeros(4), torch.ones(4), 0.1, 1e-5),
    "layer_norm_forward": lambda x, w, b: (x.transpose(1, 2).contiguous(), [4], w, b, 1e-5),
    "rms_norm_forward": lambda x, w, b: (x.transpose(1, 2).contiguous(), [4], w, None),
}


@pytest.mark.parametrize("name", OPCHECK)
def test_opcheck(name):
    """Schema, fake kernel, autograd registration and AOT dispatch agree (torch's own
    checker for custom operators)."""
    x = tensors((3, 4, 5), torch.float32)[0].requires_grad_(True)
    weight, bias = params(4, torch.float32, (True, True))
    torch.library.opcheck(getattr(torch.ops.bncpu, name).default, OPCHECK[name](x, weight, bias))


def test_eager_path_equals_the_operator():
    """A plain eager call the fast path does not take (a transposed input: the operator's
    CPU kernel as an autograd.Function, without the dispatcher) and the same call through
    torch.ops.bncpu give the same bits: output, running statistics and gradients."""
    from bncpu.torch import _autograd

    x = tensors((5, 3, 4), torch.float32)[0].transpose(0, 2)
    weight, bias = params(3, torch.float32, (True, True))
    grad_output = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    results = []
    for through_operator in (False, True):
        inputs = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        running = torch.zeros(3), torch.ones(3)
        if through_operator:
            output, _, _, new_mean, new_var = torch.ops.bncpu.batch_norm_forward.default(
                *inputs, *running, True, 0.1, 1e-5)
            running[0].copy_(new_mean)
            running[1].copy_(new_var)
        else:
            output = _autograd.forward("batch_norm_forward", *inputs, *running, True, 0.1, 1e-5)
        output.backward(grad_output)
        results.append([output, *running, *(t.grad for t in inputs)])
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def _batch_norm_operator(training):
    def call(x, w, b, rm, rv):
        y, _, _, new_mean, new_var = torch.ops.bncpu.batch_norm_forward.default(
            x, w, b, rm, rv, training, 0.1, 1e-5)
        if training:
            rm.copy_(new_mean)
            rv.copy_(new_var)
        return y
    return call


def _batch_norm_relu_operator(training):
    def call(x, w, b, rm, rv):
        y, _, _, new_mean, new_var = torch.ops.bncpu.batch_norm_relu_forward.default(
            x, w, b, rm, rv, training, 0.1, 1e-5, x * 0.5)
        if training:
            rm.copy_(new_mean)
            rv.copy_(new_var)
        return y
    return call


DIRECT = {   # name: (bncpu.torch's function, the same through torch.ops.bncpu, input shape)
    "batch_norm_relu train": (
        lambda x, w, b, rm, rv: bt.batch_norm_relu(x, rm, rv, w, b, True, residual=x * 0.5),
        _batch_norm_relu_operator(True), (4, 3, 5)),
    "batch_norm_relu eval": (
        lambda x, w, b, rm, rv: bt.batch_norm_relu(x, rm, rv, w, b, False, residual=x * 0.5),
        _batch_norm_relu_operator(False), (4, 3, 5)),
    "batch_norm train": (lambda x, w, b, rm, rv: bt.batch_norm(x, rm, rv, w, b, True),
                         _batch_norm_operator(True), (4, 3, 5)),
    "batch_norm eval": (lambda x, w, b, rm, rv: bt.batch_norm(x, rm, rv, w, b, False),
                        _batch_norm_operator(False), (4, 3, 5)),
    "batch_norm channels_last": (
        lambda x, w, b, rm, rv: bt.batch_norm(channels_last(x), rm, rv, w, b, True),
        lambda x, *args: _batch_norm_operator(True)(channels_last(x), *args), (2, 3, 4, 5)),
    "instance_norm running": (
        lambda x, w, b, rm, rv: bt.instance_norm(x, rm, rv, w, b, use_input_stats=False),
        _batch_norm_operator(False), (4, 3, 5)),
    "layer_norm": (lambda x, w, b, rm, rv: bt.layer_norm(x, (3,), w, b),
                   lambda x, w, b, rm, rv: torch.ops.bncpu.layer_norm_forward.default(
                       x, [3], w, b, 1e-5)[0], (4, 5, 3)),
    "rms_norm": (lambda x, w, b, rm, rv: bt.rms_norm(x, (3,), w),
                 lambda x, w, b, rm, rv: torch.ops.bncpu.rms_norm_forward.default(
                     x, [3], w, None)[0], (4, 5, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", DIRECT)
def test_direct_kernel_path_equals_the_operator(name, dtype):
    """Plain eager calls on contiguous or channels-last tensors run the kernels straight:
    the same bits as the operators, forward, backward and running statistics (updated
    in place, their version counters bumped), with and without autograd."""
    ours, operator, shape = DIRECT[name]
    x = tensors(shape, dtype)[0]
    weight, bias = params(3, dtype, (True, True))
    grad_output = torch.linspace(-1, 1, x.numel(), dtype=dtype).reshape(x.shape)
    for requires_grad in (True, False):
        results = []
        for function in (ours, operator):
            inputs = [t.detach().clone().requires_grad_(requires_grad) for t in (x, weight, bias)]
            rm, rv = torch.arange(3, dtype=dtype), torch.full((3,), 2.0, dtype=dtype)
            versions = rm._version, rv._version
            y = function(*inputs, rm, rv)
            if requires_grad:
                y.backward(grad_output)
            updated = (rm._version, rv._version) != versions
            results.append([y, rm, rv, updated, *(t.grad for t in inputs if requires_grad)])
        for a, b in zip(*results):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_direct_path_in_no_grad_with_parameters_that_require_grad():
    x = tensors((4, 3, 5), torch.float32)[0]
    weight, bias = params(3, torch.float32, (True, True))
    with torch.no_grad():
        y = bt.batch_norm(x, None, None, weight, bias, True)
        z = bt.layer_norm(x, (5,), *params(5, torch.float32, (True, True)))
    assert not y.requires_grad and not z.requires_grad
    torch.testing.assert_close(y, F.batch_norm(x, None, None, weight, bias, True).detach())


def test_direct_path_sees_in_place_changes_before_backward():
    """The backward reuses the forward's NumPy views only after autograd's version check:
    an input or (evaluation) running statistic changed in place in between is an error,
    as with torch's own batch norm."""
    base = tensors((4, 3, 5), torch.float32)[0].requires_grad_(True)
    x = base * 1.0
    y = bt.batch_norm(x, None, None, training=True)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    rm, rv = torch.zeros(3), torch.ones(3)
    y = bt.batch_norm(base, rm, rv, training=False)
    bt.batch_norm(base.detach(), rm, rv, training=True)   # updates rm, rv in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_direct_path_leaves_other_cases_to_the_operators():
    """Running statistics that are one tensor, parameters of another size or strided, an
    eps out of range: bncpu's checks and errors, nothing written."""
    x = tensors((4, 3, 5), torch.float32)[0]
    stats = torch.zeros(3)
    y = bt.batch_norm(x, stats[:], stats[:], training=True)   # the operators' copies
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="weight"):
        bt.batch_norm(x, rm, rv, torch.ones(4), None, True)
    with pytest.raises(ValueError, match="eps"):
        bt.batch_norm(x, rm, rv, training=True, eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        bt.batch_norm(x, rm, rv, training=True, momentum=2.0)
    assert rm.tolist() == [0.0] * 3 and rv.tolist() == [1.0] * 3
    strided = torch.ones(6)[::2]
    torch.testing.assert_close(bt.layer_norm(x, (5,)), F.layer_norm(x, (5,)))
    torch.testing.assert_close(bt.batch_norm(x, rm, rv, strided, None, False),
                               F.batch_norm(x, rm, rv, strided, None, False))


# ----------------------------------------------------------------------------------
# torch.compile, profiler
# ----------------------------------------------------------------------------------
def test_compile_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()

    def step(x, weight, bias, running_mean, running_var):
        y = bt.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        return bt.layer_norm(torch.relu(y), (x.shape[-1],)).sum()

    x = tensors((4, 3, 5), torch.float32)[0]
    eager_args = [x.clone().requires_grad_(True), *params(3, torch.float32, (True, True)),
                  torch.zeros(3), torch.ones(3)]
    compiled_args = [t.detach().clone().requires_grad_(t.requires_grad) for t in eager_args]
    compiled = torch.compile(step, fullgraph=True)
    for args, function in ((eager_args, step), (compiled_args, compiled)):
        for _ in range(2):
            function(*args).backward()
    for ours, theirs in zip(compiled_args, eager_args):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_profiler_names_the_operators():
    x = tensors((4, 3, 5), torch.float32)[0].requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        bt.batch_norm(x, None, None, training=True).sum().backward()
    names = {event.key for event in profile.key_averages()}
    assert {"bncpu::batch_norm_forward", "bncpu::batch_norm_backward"} <= names


# ----------------------------------------------------------------------------------
# Fallbacks and errors
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_falls_back(dtype, caplog):
    bt.reset_fallback_counts()
    x = tensors((4, 3, 5), torch.float32)[0].to(dtype)
    rm1, rv1 = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm1.clone(), rv1.clone()
    with caplog.at_level(logging.DEBUG, logger="bncpu.torch"):
        y = bt.batch_norm(x, rm1, rv1, training=True)
    assert torch.equal(y, F.batch_norm(x, rm2, rv2, training=True))
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    assert bt.fallback_counts() == {("batch_norm", f"{dtype} input"): 1}
    assert f"{dtype} input" in caplog.text


def test_other_device_falls_back():
    bt.reset_fallback_counts()
    x = torch.empty(4, 3, 5, device="meta")
    assert bt.layer_norm(x, (5,)).device.type == "meta"
    assert bt.group_norm(x, 3).shape == x.shape
    assert bt.fallback_counts() == {("layer_norm", "meta input"): 1,
                                    ("group_norm", "meta input"): 1}


def test_running_stats_requiring_grad_fall_back():
    """torch's operator decides (torch 2.13 refuses a gradient for running statistics)."""
    bt.reset_fallback_counts()
    x = tensors((4, 3, 5), torch.float64)[0]
    rm = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    rv = torch.ones(3, dtype=torch.float64, requires_grad=True)
    outcomes = []
    for function in (bt.batch_norm, F.batch_norm):
        try:
            outcomes.append(function(x, rm, rv, training=False).sum().item())
        except RuntimeError as error:
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]
    assert bt.fallback_counts() == {("batch_norm", "running statistics require grad"): 1}


def test_mixed_dtypes_get_torchs_answer():
    bt.reset_fallback_counts()
    x = tensors((4, 3, 5), torch.float32)[0]
    weight = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError) as ours:
        bt.group_norm(x, 3, weight)
    with pytest.raises(RuntimeError) as theirs:
        F.group_norm(x, 3, weight)
    assert str(ours.value) == str(theirs.value)
    assert list(bt.fallback_counts()) == [("group_norm", "parameters of another dtype or device "
                                                         "than the input")]


def test_bad_input_raises_and_writes_nothing():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bt.batch_norm(torch.randn(1, 3), rm, rv, training=True)
    with pytest.raises(ValueError, match="running_mean"):
        bt.batch_norm(torch.randn(4, 3, 2), torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="num_groups"):
        bt.group_norm(torch.randn(4, 3, 2), 2)
    with pytest.raises(ValueError, match="normalized_shape"):
        bt.layer_norm(torch.randn(4, 3, 2), (3,))
    assert rm.tolist() == [0.0] * 3 and rv.tolist() == [1.0] * 3


def test_running_stats_get_no_grad_fn():
    x = tensors((4, 3, 5), torch.float32)[0].requires_grad_(True)
    rm, rv = torch.zeros(3), torch.ones(3)
    bt.batch_norm(x, rm, rv, training=True).sum().backward()
    assert rm.grad_fn is None and rv.grad_fn is None
    assert not rm.requires_grad


def test_public_names_are_the_api():
    """The modules list only their API: no imported module (torch, F, operator) and no
    internal helper among their public names."""
    import bncpu.torch.functional as functional

    for module in (bt, functional):
        public = {name for name in dir(module) if not name.startswith("_")}
        submodules = {"functional"} if module is bt else set()
        assert public == set(module.__all__) | submodules


# ----------------------------------------------------------------------------------
# The group-norm fast path gives the operator's bits
# ----------------------------------------------------------------------------------
class _Passthrough(torch.overrides.TorchFunctionMode):
    """A function mode that changes nothing but sends bncpu.torch to its operators."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_fast_path_equals_the_operator(dtype, channels_last):
    from bncpu.torch import _eager
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 32, 8, 8, dtype=dtype, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, dtype=dtype, generator=generator)
    bias = torch.randn(32, dtype=dtype, generator=generator)
    dy = torch.randn(4, 32, 8, 8, dtype=dtype, generator=generator)
    assert _eager.group_norm_forward(x, 8, weight, bias, 1e-5) is not None
    assert _eager.group_norm_forward(x, 32, weight, bias, 1e-5) is None   # instance-like

    def run(mode):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        with mode:
            y = bt.group_norm(leaves[0], 8, leaves[1], leaves[2], 1e-5)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    import contextlib
    from bncpu.torch._route import eager_fast_path
    assert eager_fast_path((x, weight, bias))
    with _Passthrough():
        assert not eager_fast_path((x, weight, bias))
    fast, operator = run(contextlib.nullcontext()), run(_Passthrough())
    for a, b in zip(fast, operator):
        assert torch.equal(a, b)
