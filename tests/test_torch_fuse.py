"""convert(fuse=True)'s torch.fx pass: batch norm -> (add) -> ReLU written in a forward,
fused into one batch_norm_relu call. Converted models against stock torch (outputs,
gradients of every parameter and of the input, running statistics) in training and
evaluation, float32 and float64; the spellings it fuses and the cases it must leave alone;
state_dict both ways; torch.compile(fullgraph=True) against eager; a ResNet-18."""
import copy
import importlib.util
import io
import operator
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: bncpu.torch needs it")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bncpu.torch as bt  # noqa: E402
from bncpu.torch._fuse import FusedBatchNorm2d  # noqa: E402

TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "resnet_step.py"


@pytest.fixture(scope="module")
def resnet_step():
    spec = importlib.util.spec_from_file_location("resnet_step", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # so that its classes pickle
    spec.loader.exec_module(module)
    return module


class Block(nn.Module):
    """conv -> bn -> ``combine`` (the pattern under test, given the bn's output and the
    block's input) -> conv."""

    def __init__(self, combine, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(channels, channels, 1)
        self.combine = combine

    def forward(self, x):
        return self.head(self.combine(self, self.bn(self.conv(x)), x))


def add_in_place(block, y, x):
    y += x
    return block.relu(y)


FUSED_FORMS = {
    "nn.ReLU": lambda block, y, x: block.relu(y),
    "F.relu": lambda block, y, x: F.relu(y),
    "torch.relu": lambda block, y, x: torch.relu(y),
    "Tensor.relu_": lambda block, y, x: y.relu_(),
    "+ then nn.ReLU(inplace)": lambda block, y, x: block.relu(y + x),
    "+= then nn.ReLU(inplace)": add_in_place,
    "residual first": lambda block, y, x: F.relu(x + y, inplace=True),
    "torch.add then torch.relu_": lambda block, y, x: torch.relu_(torch.add(y, x)),
    "Tensor.add_ then Tensor.relu": lambda block, y, x: y.add_(x).relu(),
    "operator.add then F.relu": lambda block, y, x: F.relu(operator.add(y, x)),
}


def run(model, x, seed=0):
    """Output, and the gradients of the input and of every parameter, of one forward +
    backward (of a random linear function of the output, drawn from ``seed``)."""
    x = x.clone().requires_grad_(True)
    output = model(x)
    generator = torch.Generator().manual_seed(seed)
    output.backward(torch.randn(output.shape, generator=generator, dtype=output.dtype))
    grads = [x.grad] + [p.grad for p in model.parameters()]
    model.zero_grad()
    return output, grads


def assert_same_training(converted, original, dtype, shape, steps=2, tol=None):
    """Forward + backward in training then evaluation: outputs, gradients, buffers."""
    tol = tol or TOL[dtype]
    generator = torch.Generator().manual_seed(0)
    for training in [True] * steps + [False]:
        converted.train(training)
        original.train(training)
        x = torch.randn(shape, generator=generator, dtype=dtype) * 2 + 0.5
        ours, theirs = run(converted, x), run(original, x)
        torch.testing.assert_close(ours[0], theirs[0], **tol)
        for our_grad, their_grad in zip(ours[1], theirs[1]):
            torch.testing.assert_close(our_grad, their_grad, **tol)
        for (key, ours_value), theirs_value in zip(converted.state_dict().items(),
                                                   original.state_dict().values()):
            torch.testing.assert_close(ours_value, theirs_value, **tol, msg=key)


@DTYPES
@pytest.mark.parametrize("form", FUSED_FORMS.values(), ids=FUSED_FORMS)
def test_each_spelling_fuses_and_matches_torch(form, dtype):
    torch.manual_seed(0)
    original = Block(form).to(dtype)
    converted = bt.convert(original, fuse=True)
    assert type(converted.bn) is FusedBatchNorm2d
    code = converted.forward.__func__.__code__
    assert "relu" not in code.co_names and "relu_" not in code.co_names
    assert_same_training(converted, original, dtype, (3, 4, 5, 6))


LEFT_ALONE = {
    "bn output used twice": lambda block, y, x: block.relu(y) + y,
    "scalar added": lambda block, y, x: block.relu(y + 1.0),
    "add with alpha": lambda block, y, x: block.relu(torch.add(y, x, alpha=2)),
    "in-place add into the residual": lambda block, y, x: block.relu((x * 1).add_(y)),
    "sum used twice": lambda block, y, x: (lambda s: block.relu(s) * s)(y + x),
    "no relu": lambda block, y, x: torch.sigmoid(y + x),
    "bn added to itself": lambda block, y, x: block.relu(y + y),
}


@pytest.mark.parametrize("form", LEFT_ALONE.values(), ids=LEFT_ALONE)
def test_patterns_that_are_not_fused(form):
    torch.manual_seed(0)
    original = Block(form).double()
    converted = bt.convert(original, fuse=True)
    assert type(converted.bn) is bt.BatchNorm2d
    assert "forward" not in vars(converted)
    assert_same_training(converted, original, torch.float64, (3, 4, 5, 6))


class Doubles(nn.Module):
    def forward(self, x):
        return x.mul_(2)


WRITES = {
    "Tensor.mul_": lambda late, x: x.mul_(2),
    "torch.relu_": lambda late, x: torch.relu_(x),
    "a user module": lambda late, x: late.doubles(x),
}


@pytest.mark.parametrize("residual_first", [False, True])
@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES)
def test_a_write_between_the_batch_norm_and_the_add_keeps_it_unfused(write, residual_first):
    """The fused call reads the batch norm's input later, or the residual earlier, than
    the original: bn(x), a write into x, relu(bn + x) (the residual defined before the
    batch norm, or by the write)."""
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.doubles = Doubles()

        def forward(self, x):
            x = x * 1.0
            y = self.bn(x)
            written = write(self, x)
            return F.relu(y + (x if residual_first else written))

    original = Late().double()
    converted = bt.convert(original, fuse=True)
    assert type(converted.bn) is bt.BatchNorm2d
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():   # (torch's batch norm backward refuses the changed input too)
        torch.testing.assert_close(converted(x), original(x), **TOL[torch.float64])


def test_residual_that_broadcasts_or_promotes_runs_unfused_at_run_time():
    """The graph cannot know shapes: a residual that broadcasts or has another dtype
    takes batch_norm, then the add and the ReLU as the original did."""
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return F.relu(self.bn(x) + self.shift)

    original = Broadcast().double()
    converted = bt.convert(original, fuse=True)
    assert type(converted.bn) is FusedBatchNorm2d
    assert_same_training(converted, original, torch.float64, (2, 4, 3, 3))
    promoted = Block(FUSED_FORMS["+ then nn.ReLU(inplace)"])
    converted = bt.convert(promoted, fuse=True)
    x = torch.randn(2, 4, 3, 3)
    residual = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for model in (converted, promoted):
        model.eval()
    ours = converted.bn(x, residual, relu=True)
    theirs = torch.relu(promoted.bn(x) + residual)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


def test_untraceable_and_mode_dependent_forwards_warn_and_stay_unfused():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.stem = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            x = self.stem(x)
            return F.relu(self.bn(x)) if x.sum() > 0 else -x

    class ModeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.bn(x) + (x if self.training else 0))

    class Optional(ModeDependent):
        def forward(self, x, residual=None):
            return F.relu(self.bn(x) + (x if residual is None else residual))

    with pytest.warns(UserWarning, match=r"\(Optional\).*optional or variadic arguments"):
        converted = bt.convert(Optional(), fuse=True)
    assert type(converted.bn) is bt.BatchNorm2d
    with pytest.warns(UserWarning, match=r"'the model' \(DataDependent\) could not be traced"):
        converted = bt.convert(DataDependent(), fuse=True)
    assert type(converted.bn) is bt.BatchNorm2d
    assert type(converted.stem[1]) is bt.BatchNormReLU2d   # module swapping still fuses
    original = nn.Sequential(ModeDependent()).double()
    with pytest.warns(UserWarning, match=r"'0' \(ModeDependent\).*self.training"):
        converted = bt.convert(original, fuse=True)
    assert type(converted[0].bn) is bt.BatchNorm2d
    assert_same_training(converted, original, torch.float64, (2, 4, 3, 3))


def test_hooks_and_sharing_keep_a_pair_unfused():
    torch.manual_seed(0)
    hooked_bn, hooked_relu, shared = (Block(FUSED_FORMS["nn.ReLU"]) for _ in range(3))
    calls = []
    hooked_bn.bn.register_forward_hook(lambda module, args, output: calls.append("bn"))
    hooked_relu.relu.register_forward_hook(lambda module, args, output: calls.append("relu"))
    shared.other = shared.bn
    for model in (hooked_bn, hooked_relu, shared):
        converted = bt.convert(model, fuse=True)
        assert type(converted.bn) is bt.BatchNorm2d
        converted(torch.randn(2, 4, 3, 3))
    assert calls == ["bn", "relu"]


def test_a_hooked_block_keeps_its_hooks_and_is_fused_inside(resnet_step):
    """Children are leaves of their parent's graph: a block's hooks still run, and the
    block's own forward is rewritten, whoever calls it."""
    torch.manual_seed(0)
    original = nn.Sequential(resnet_step.BasicBlock(4, 8, 2), nn.Flatten())
    calls = []
    original[0].register_forward_hook(lambda module, args, output: calls.append(output.shape))
    converted = bt.convert(original, fuse=True)
    block = converted[0]
    assert [type(m) for m in (block.bn1, block.bn2, block.downsample[1])] == [
        FusedBatchNorm2d, FusedBatchNorm2d, bt.BatchNorm2d]
    x = torch.randn(2, 4, 6, 6)
    converted(x)
    original(x)
    assert calls == [torch.Size([2, 8, 3, 3])] * 2
    # A fused batch norm called as a batch norm (as unrewritten code would) is one.
    converted.eval()
    original.eval()
    torch.testing.assert_close(block.bn2(x.repeat(1, 2, 1, 1)),
                               original[0].bn2(x.repeat(1, 2, 1, 1)))


@DTYPES
def test_resnet18_fuses_every_batch_norm_followed_by_relu_and_trains_as_torch(
        resnet_step, dtype):
    """17 of the 20 batch norms: the stem's, both of every block's; the three downsample
    batch norms' outputs are the residual of an add, not followed by a ReLU themselves."""
    torch.manual_seed(0)
    original = resnet_step.ResNet18(num_classes=10).to(dtype)
    converted = bt.convert(original, fuse=True)
    assert resnet_step.fused_batch_norms(converted) == 17
    unfused = [name for name, m in converted.named_modules() if type(m) is bt.BatchNorm2d]
    assert unfused == ["layer2.0.downsample.1", "layer3.0.downsample.1",
                       "layer4.0.downsample.1"]
    # 18 layers of float32 sums in another order: the first conv's weight gradient moves
    # by up to 5e-5 (the unfused conversion's does too).
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else None
    assert_same_training(converted, original, dtype, (4, 3, 64, 64), tol=tol)


class Residual(nn.Module):
    """relu(bn(layer(x)) + x) for a Linear -> BatchNorm1d or Conv3d -> BatchNorm3d."""

    def __init__(self, layer, norm):
        super().__init__()
        self.layer, self.norm = layer, norm

    def forward(self, x):
        return F.relu(self.norm(self.layer(x)) + x)


@pytest.mark.parametrize("layers", [
    (nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None)),
    (nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4, affine=False)),
], ids=lambda layers: type(layers[1]).__name__)
def test_1d_and_3d_batch_norms(layers):
    torch.manual_seed(0)
    original = Residual(*layers).double()
    converted = bt.convert(original, fuse=True)
    assert type(converted.norm).__name__ == "Fused" + type(layers[1]).__name__
    shape = (6, 4) if isinstance(layers[0], nn.Linear) else (2, 4, 3, 2, 2)
    assert_same_training(converted, original, torch.float64, shape)


def test_state_dict_both_ways_deepcopy_and_pickle(resnet_step):
    torch.manual_seed(0)
    original = resnet_step.ResNet18(num_classes=10)
    converted = bt.convert(original, fuse=True)
    assert list(converted.state_dict()) == list(original.state_dict())
    stock = resnet_step.ResNet18(num_classes=10)
    converted.load_state_dict(stock.state_dict())
    original.load_state_dict(converted.state_dict())
    copied = copy.deepcopy(converted)
    with torch.no_grad():
        copied.fc.bias.add_(1)
    x = torch.randn(2, 3, 32, 32)
    for model in (stock, copied, converted):
        model.eval()
    torch.testing.assert_close(converted(x), stock(x), **TOL[torch.float32])
    torch.testing.assert_close(copied(x), stock(x) + 1, **TOL[torch.float32])
    # A whole-model pickle keeps the class's forward: unfused, the same results.
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), stock(x), **TOL[torch.float32])


def test_compile_fullgraph_of_the_fused_graph(resnet_step):
    """The rewritten forward compiles without a graph break and gives eager's outputs,
    gradients and running statistics."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    original = nn.Sequential(resnet_step.BasicBlock(4, 4), resnet_step.BasicBlock(4, 8, 2))
    eager = bt.convert(original, fuse=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 8, 8)
    ours, theirs = run(compiled, x), run(eager, x)
    torch.testing.assert_close(ours[0], theirs[0], **TOL[torch.float32])
    for our_grad, their_grad in zip(ours[1], theirs[1]):
        torch.testing.assert_close(our_grad, their_grad, **TOL[torch.float32])
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, msg=key)
