"""bncpu.torch's modules and convert (and fuse=True): converted models against the
originals over several SGD steps (losses, parameters, buffers) in float32 and float64,
state_dict round trips, torch.compile(fullgraph=True) of a converted model, and what
conversion keeps (parameters, sharing, requires_grad, hooks, training mode). fold is in
test_torch_fold.py."""
import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: bncpu.torch needs it")
import torch.nn as nn  # noqa: E402

import bncpu.torch as bt  # noqa: E402

TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10)}


class Net(nn.Module):
    """Every norm module torch has, between convolutions and linear layers."""

    def __init__(self, momentum=0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
            nn.InstanceNorm2d(8, affine=True, track_running_stats=True), nn.ReLU())
        self.volume = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2), nn.ReLU(),
                                    nn.InstanceNorm3d(2))
        self.sequence = nn.Sequential(nn.Conv1d(8, 4, 1), nn.BatchNorm1d(4), nn.InstanceNorm1d(4))
        self.head = nn.Sequential(
            nn.Linear(4 * 36 + 2 * 4 * 6 * 6, 16), nn.BatchNorm1d(16, affine=False), nn.ReLU(),
            nn.Linear(16, 12), nn.LayerNorm(12), nn.RMSNorm([12]), nn.Linear(12, 5))

    def forward(self, x):
        features = self.features(x)
        volume = self.volume(features[:, None, :4]).flatten(1)
        sequence = self.sequence(features.flatten(2)).flatten(1)
        return self.head(torch.cat([sequence, volume], 1))


def data(dtype, step, n=6):
    generator = torch.Generator().manual_seed(step)
    return (torch.randn(n, 3, 8, 8, generator=generator, dtype=dtype),
            torch.randint(0, 5, (n,), generator=generator))


def train(model, dtype, steps=4, channels_last=False):
    """SGD steps, then an evaluation forward: the losses and the evaluation output."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    model.train()
    for step in range(steps):
        x, target = data(dtype, step)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    model.eval()
    with torch.no_grad():
        return torch.stack(losses), model(data(dtype, steps)[0])


def assert_models_close(ours, theirs, dtype):
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key in ours_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], **TOL[dtype], msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("fuse", [False, True])
def test_converted_model_trains_as_the_original(dtype, momentum, fuse):
    torch.manual_seed(0)
    original = Net(momentum).to(dtype)
    converted = bt.convert(original, fuse=fuse)
    assert type(converted.features[1]) is (bt.BatchNormReLU2d if fuse else bt.BatchNorm2d)
    ours, theirs = train(converted, dtype), train(original, dtype)
    torch.testing.assert_close(ours[0], theirs[0], **TOL[dtype])
    torch.testing.assert_close(ours[1], theirs[1], **TOL[dtype])
    assert_models_close(converted, original, dtype)


def test_channels_last_model():
    torch.manual_seed(0)
    original = Net()
    converted = bt.convert(original, fuse=True)
    ours, theirs = train(converted, torch.float32, 3, True), train(original, torch.float32, 3, True)
    torch.testing.assert_close(ours[0], theirs[0], **TOL[torch.float32])
    assert_models_close(converted, original, torch.float32)
    x = data(torch.float32, 0)[0].contiguous(memory_format=torch.channels_last)
    assert converted.features[:3](x).is_contiguous(memory_format=torch.channels_last)


def test_compile_fullgraph_of_a_converted_model():
    """torch.compile(fullgraph=True) traces the bncpu operators (no graph break) and the
    compiled steps match the eager ones: losses, gradients, running statistics."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = bt.convert(Net(), fuse=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x, target = data(torch.float32, step)
        for model in (eager, compiled):
            nn.functional.cross_entropy(model(x), target).backward()
    assert_models_close(compiled_model, eager, torch.float32)
    for ours, theirs in zip(compiled_model.parameters(), eager.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL[torch.float32])


def test_convert_keeps_parameters_sharing_and_state():
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.ReLU(), shared, nn.LayerNorm(4))
    model[4].weight.requires_grad_(False)
    model[1].momentum = None
    model.eval()
    calls = []
    model[4].register_forward_hook(lambda *args: calls.append("hook"))
    converted = bt.convert(model, inplace=True)
    assert converted is model
    assert type(model[1]) is bt.BatchNorm2d and model[1] is model[3]
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[4], nn.LayerNorm)
    assert not model[4].weight.requires_grad and not model.training
    assert model[1].momentum is None
    model(torch.randn(2, 3, 4, 4))
    assert calls == ["hook"]
    # Not in place: the original is left alone, the copy keeps its own sharing.
    shared = nn.BatchNorm2d(3)
    original = nn.Sequential(shared, shared)
    copied = bt.convert(original)
    assert type(original[0]) is nn.BatchNorm2d and copied[0] is copied[1]
    assert copied[0].weight is not shared.weight
    assert repr(copied) == repr(original)


def test_convert_leaves_subclasses_and_fused_pairs_with_hooks():
    class MyNorm(nn.BatchNorm2d):
        pass

    relu = nn.ReLU()
    relu.register_forward_hook(lambda *args: None)
    model = nn.Sequential(MyNorm(2), nn.ReLU(), nn.BatchNorm2d(2), relu, nn.BatchNorm1d(2),
                          nn.Flatten(), nn.BatchNorm1d(2), nn.ReLU())
    converted = bt.convert(model, fuse=True)
    assert [type(m) for m in converted] == [MyNorm, nn.ReLU, bt.BatchNorm2d, nn.ReLU,
                                            bt.BatchNorm1d, nn.Flatten, bt.BatchNormReLU1d,
                                            nn.Identity]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bt.convert("model")


@pytest.mark.parametrize("module", [
    nn.BatchNorm1d(3), nn.BatchNorm2d(3, affine=False), nn.BatchNorm3d(3, momentum=None),
    nn.BatchNorm2d(3, track_running_stats=False), nn.InstanceNorm1d(3, affine=True),
    nn.InstanceNorm2d(3, track_running_stats=True), nn.InstanceNorm3d(3), nn.GroupNorm(1, 3),
    nn.LayerNorm([4]), nn.RMSNorm(4, eps=1e-3), nn.LayerNorm(4, bias=False),
], ids=repr)
def test_each_module_state_dict_and_modes(module):
    """state_dict both ways (strict), then forward/backward in training and evaluation,
    unbatched input where torch takes it."""
    converted = bt.convert(module)
    assert set(converted.state_dict()) == set(module.state_dict())
    converted.load_state_dict(module.state_dict())
    module.load_state_dict(converted.state_dict())
    dims = {nn.BatchNorm1d: 3, nn.InstanceNorm1d: 3, nn.BatchNorm3d: 5, nn.InstanceNorm3d: 5}
    ndim = next((d for cls, d in dims.items() if isinstance(module, cls)), 4)
    rows = isinstance(module, (nn.LayerNorm, nn.RMSNorm))
    shape = (5, 3, 4) if rows else (5, 3, 4, 4, 4)[:ndim]
    for training in (True, False, True):
        module.train(training)
        converted.train(training)
        x = torch.randn(shape, dtype=torch.float64)
        inputs = [x.clone().requires_grad_(True) for _ in range(2)]
        outputs = [m.double()(i) for m, i in zip((converted, module), inputs)]
        for output in outputs:
            output.backward(torch.ones_like(output) + x)
        torch.testing.assert_close(outputs[0], outputs[1], **TOL[torch.float64])
        torch.testing.assert_close(inputs[0].grad, inputs[1].grad, **TOL[torch.float64])
        assert_models_close(converted, module, torch.float64)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        unbatched = torch.randn(shape[1:], dtype=torch.float64)
        torch.testing.assert_close(converted(unbatched), module(unbatched))
