"""bncpu.torch.fold: the folded model against the unfolded evaluation model, for Conv1d/2d/3d
and Linear -> BatchNorm pairs, in float32/float64, float16/bfloat16, with parametrized and
hooked weights, and what it leaves alone."""
import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: bncpu.torch needs it")
import torch.nn as nn  # noqa: E402
from torch.nn.utils import parametrizations  # noqa: E402

import bncpu.torch as bt  # noqa: E402

TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-10),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

INPUT_SHAPES = {nn.Conv1d: (3, 9), nn.Conv2d: (3, 7, 7), nn.Conv3d: (3, 4, 5, 5),
                nn.Linear: (3,)}


def input_shape(model):
    return INPUT_SHAPES[next(kind for kind in INPUT_SHAPES if isinstance(model[0], kind))]


def trained_eval(model, dtype=torch.float32):
    """The model after two training forwards (running statistics away from 0 and 1) with
    batch norm weights and biases away from 1 and 0, in evaluation mode."""
    model = model.to(dtype)
    with torch.no_grad():
        for step in range(2):
            model(torch.randn(8, *input_shape(model), dtype=dtype) * 3 + 1)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layers", [
    (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)),
    (nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)),
    (nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4, affine=False)),
    (nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)),
    (nn.Linear(3, 4), nn.BatchNorm1d(4)),
], ids=lambda layers: type(layers[0]).__name__)
def test_fold(dtype, layers):
    model = trained_eval(nn.Sequential(copy.deepcopy(layers[0]), copy.deepcopy(layers[1]),
                                       nn.ReLU()), dtype)
    converted = trained_eval(nn.Sequential(copy.deepcopy(layers[0]),
                                           copy.deepcopy(layers[1])), dtype)
    converted = bt.convert(converted)
    x = torch.randn(5, *INPUT_SHAPES[type(layers[0])], dtype=dtype)
    for original in (model, converted):
        folded = bt.fold(original)
        assert type(folded[1]) is nn.Identity and type(original[1]) is not nn.Identity
        assert folded[0].bias is not None
        torch.testing.assert_close(folded(x), original(x), **TOL[dtype])


def test_fold_needs_eval_and_skips_what_it_cannot_fold():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="model.eval()"):
        bt.fold(model)
    fused = bt.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()),
                       fuse=True).eval()
    untracked = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    mismatched = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm2d(4))
    for model in (fused, untracked.eval(), mismatched.eval()):
        folded = bt.fold(model)
        assert [type(m) for m in folded] == [type(m) for m in model]


PARAMETRIZATIONS = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "weight_norm hook": torch.nn.utils.weight_norm,
    "spectral_norm hook": torch.nn.utils.spectral_norm,
}


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("parametrize", PARAMETRIZATIONS.values(), ids=PARAMETRIZATIONS)
@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.Linear(3, 4)],
                         ids=lambda layer: type(layer).__name__)
def test_fold_through_a_parametrized_weight(parametrize, layer):
    """The weight the layer computes is baked in, then folded; the original keeps its
    parametrization (a deep copy shares the parametrized class with it)."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4) if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d(4)
    model = trained_eval(nn.Sequential(parametrize(copy.deepcopy(layer)), norm))
    x = torch.randn(5, *input_shape(model))
    with torch.no_grad():
        expected = model(x)
        folded = bt.fold(model)
        assert type(folded[1]) is nn.Identity and type(folded[0]) is type(layer)
        assert set(folded.state_dict()) == {"0.weight", "0.bias"}
        torch.testing.assert_close(folded(x), expected, **TOL[torch.float32])
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert type(model[0]) is not type(layer) or model[0]._forward_pre_hooks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_fold_half_precision(dtype, bias):
    """Folded in float64, written back in the layer's dtype; a new bias too."""
    torch.manual_seed(0)
    model = trained_eval(nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4)),
                         dtype)
    folded = bt.fold(model)
    assert folded[0].weight.dtype == folded[0].bias.dtype == dtype
    x = torch.randn(5, 3, 7, 7, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[dtype])


def test_fold_leaves_pairs_with_other_hooks_with_a_warning():
    seen = []
    model = trained_eval(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                       nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    model[0].register_forward_hook(lambda module, args, output: seen.append(output))
    model[3].register_forward_pre_hook(lambda module, args: None)
    with pytest.warns(UserWarning) as record:
        folded = bt.fold(model)
    assert [str(warning.message).split(" left")[0] for warning in record] == [
        "fold: '0' (Conv2d) -> '1' (BatchNorm2d)", "fold: '2' (Conv2d) -> '3' (BatchNorm2d)"]
    assert [type(m) for m in folded] == [type(m) for m in model]
