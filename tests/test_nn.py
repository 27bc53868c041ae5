"""bncpu.nn: each layer against its torch.nn twin over training steps then evaluation
(outputs, grad_input, accumulated parameter gradients, running statistics,
num_batches_tracked), state dicts both ways, repr and error messages; the Keras/d2l
running variance (unbiased_running_var=False) against the reference and d2l's formula."""
import copy
import gc
import weakref

import numpy as np
import pytest

import bncpu
import bncpu.nn as nn
import bncpu.reference as reference
from conftest import DTYPES, random_input

# Two float32 computations (bncpu, torch) of the same value each round a few times:
# compare them with a little more room than one result against the float64 reference.
TOL = {np.dtype(np.float32): 5e-5, np.dtype(np.float64): 1e-11}


def close(actual, expected, dtype, what=""):
    """actual within TOL of expected (a torch tensor or array), relative to max(1, |expected|)."""
    actual, expected = (a.detach().numpy() if hasattr(a, "detach") else a for a in (actual, expected))
    assert (actual is None) == (expected is None), what
    if expected is None:
        return
    actual, expected = np.asarray(actual), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def torch_dtype(torch, dtype):
    return torch.float32 if np.dtype(dtype) == np.float32 else torch.float64


def twins(torch, name, args, kwargs, dtype, seed=3):
    """(bncpu layer, torch module) built with the same arguments, the bncpu layer's
    parameters randomized and copied into the torch module through a state dict."""
    layer = getattr(nn, name)(*args, dtype=dtype, **kwargs)
    module = getattr(torch.nn, name)(*args, dtype=torch_dtype(torch, dtype), **kwargs)
    rng = np.random.default_rng(seed)
    for parameter in layer.parameters():
        parameter[...] = rng.uniform(0.5, 1.5, parameter.shape)
    module.load_state_dict({key: torch.from_numpy(value) for key, value in layer.state_dict().items()})
    return layer, module


def step(torch, layer, module, x, dy, dtype):
    """One forward and backward of both; compares output, grad_input and the state."""
    y = layer(x)
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    close(y, yt, dtype, "output")
    assert y.dtype == dtype and y.shape == x.shape
    grad_input = layer.backward(dy)
    yt.backward(torch.from_numpy(dy))
    close(grad_input, xt.grad, dtype, "grad_input")
    compare_state(torch, layer, module, dtype)


def compare_state(torch, layer, module, dtype):
    for name, parameter in layer.named_parameters():
        close(getattr(layer, "grad_" + name), getattr(module, name).grad, dtype, "grad_" + name)
    for name in ("running_mean", "running_var"):
        if hasattr(module, name):
            close(getattr(layer, name), getattr(module, name), dtype, name)
    if getattr(module, "num_batches_tracked", None) is not None:
        assert int(layer.num_batches_tracked) == int(module.num_batches_tracked)
    else:
        assert getattr(layer, "num_batches_tracked", None) is None


def run_steps(torch, layer, module, shape, dtype, train_steps=3, eval_steps=2):
    """Training steps, then evaluation steps: gradients accumulate across all of them."""
    for index in range(train_steps + eval_steps):
        if index == train_steps:
            assert layer.eval() is layer
            module.eval()
        x = random_input(shape, dtype, seed=10 + index, loc=0.3 * index, scale=1 + index)
        dy = random_input(shape, dtype, seed=50 + index)
        step(torch, layer, module, x, dy, dtype)


MOMENTA = [None, 0.1, 1.0]
STATE = {"affine+tracked": (True, True), "affine": (True, False), "tracked": (False, True),
         "neither": (False, False)}


# ----------------------------------------------------------------------------------
# Training then evaluation, against torch.nn
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("state", STATE)
@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (8, 5)), ("BatchNorm1d", (4, 5, 7)),
                                        ("BatchNorm2d", (4, 5, 3, 6)),
                                        ("BatchNorm3d", (2, 5, 3, 2, 4))])
def test_batch_norm_layers(torch, name, shape, state, momentum, dtype):
    affine, tracked = STATE[state]
    layer, module = twins(torch, name, (5,), dict(momentum=momentum, affine=affine,
                                                  track_running_stats=tracked), dtype)
    run_steps(torch, layer, module, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("state", STATE)
@pytest.mark.parametrize("name,shape", [("InstanceNorm1d", (3, 4, 7)),
                                        ("InstanceNorm1d", (4, 7)),        # unbatched
                                        ("InstanceNorm2d", (3, 4, 5, 3)),
                                        ("InstanceNorm3d", (2, 4, 3, 2, 3))])
def test_instance_norm_layers(torch, name, shape, state, momentum, dtype):
    affine, tracked = STATE[state]
    layer, module = twins(torch, name, (4,), dict(momentum=momentum, affine=affine,
                                                  track_running_stats=tracked), dtype)
    run_steps(torch, layer, module, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups,shape", [(1, (3, 6, 5)), (3, (2, 6, 4, 3)), (6, (4, 6, 5))])
def test_group_norm_layer(torch, groups, shape, affine, bias, dtype):
    layer, module = twins(torch, "GroupNorm", (groups, 6), dict(affine=affine, bias=bias), dtype)
    run_steps(torch, layer, module, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("normalized_shape,shape", [(7, (5, 7)), ((3, 4), (2, 5, 3, 4))])
def test_layer_norm_layer(torch, normalized_shape, shape, affine, bias, dtype):
    layer, module = twins(torch, "LayerNorm", (normalized_shape,),
                          dict(elementwise_affine=affine, bias=bias), dtype)
    run_steps(torch, layer, module, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("normalized_shape,shape", [(7, (5, 7)), ((3, 4), (2, 5, 3, 4))])
def test_rms_norm_layer(torch, normalized_shape, shape, eps, affine, dtype):
    layer, module = twins(torch, "RMSNorm", (normalized_shape,),
                          dict(eps=eps, elementwise_affine=affine), dtype)
    run_steps(torch, layer, module, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,args,shape", [
    ("BatchNorm2d", (5,), (4, 5, 3, 6)), ("BatchNorm1d", (5,), (4, 5, 7)),
    ("InstanceNorm2d", (5,), (3, 5, 4, 3)), ("InstanceNorm1d", (5,), (5, 7)),
    ("GroupNorm", (1, 5), (2, 5, 4, 3))])
def test_channels_last_layers(torch, name, args, shape, dtype):
    """axis=-1 on channels-last data gives torch's results on the channels-first data."""
    kwargs = dict(affine=True, track_running_stats=True) if "Norm" in name and args == (5,) else {}
    layer, module = twins(torch, name, args, kwargs, dtype)
    last = nn.__dict__[name](*args, dtype=dtype, axis=-1, **kwargs)
    last.load_state_dict(layer.state_dict())
    unbatched = name == "InstanceNorm1d"
    for index in range(4):
        if index == 3:
            last.eval()
            module.eval()
        x = random_input(shape, dtype, seed=index)
        dy = random_input(shape, dtype, seed=20 + index)
        xt = torch.tensor(x, requires_grad=True)
        yt = module(xt)
        yt.backward(torch.from_numpy(dy))
        channel = 0 if unbatched else 1
        y = last(np.ascontiguousarray(np.moveaxis(x, channel, -1)))
        close(y, np.moveaxis(yt.detach().numpy(), channel, -1), dtype, "output")
        grad_input = last.backward(np.ascontiguousarray(np.moveaxis(dy, channel, -1)))
        close(grad_input, np.moveaxis(xt.grad.numpy(), channel, -1), dtype, "grad_input")
        compare_state(torch, last, module, dtype)


# ----------------------------------------------------------------------------------
# Gradients, modes, parameters
# ----------------------------------------------------------------------------------
def test_gradients_accumulate_until_zero_grad():
    layer = nn.BatchNorm1d(3, dtype=np.float64)
    x = random_input((6, 3), np.float64)
    dy = random_input((6, 3), np.float64, seed=5)
    layer(x)
    layer.backward(dy)
    once = layer.grad_weight.copy(), layer.grad_bias.copy()
    layer(x)
    layer.backward(dy)
    np.testing.assert_allclose(layer.grad_weight, 2 * once[0], rtol=1e-13)
    np.testing.assert_allclose(layer.grad_bias, 2 * once[1], rtol=1e-13)
    layer.zero_grad()
    assert layer.grad_weight is None and layer.grad_bias is None


def test_backward_needs_a_forward_and_frees_it():
    layer = nn.LayerNorm(4)
    with pytest.raises(RuntimeError, match="call the layer on an input first"):
        layer.backward(np.ones((2, 4), np.float32))
    y = layer(np.arange(8, dtype=np.float32).reshape(2, 4))
    layer.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match="nothing saved"):
        layer.backward(np.ones_like(y))


def test_failed_forward_changes_nothing():
    layer = nn.BatchNorm1d(3)
    state = layer.state_dict()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        layer(np.ones((1, 3, 2, 2), np.float32))
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_bad_channels_or_gradient_change_nothing(training):
    """The layer checks its input and its own arrays once, then runs the kernels unchecked:
    a channel count that disagrees with its arrays, an array replaced by one of another
    size, or a grad_output of another shape raise and leave the layer as it was."""
    layer = nn.BatchNorm2d(3, dtype=np.float64).train(training)
    state = layer.state_dict()
    with pytest.raises(ValueError, match="running_mean should contain 4 elements not 3"):
        layer(random_input((2, 4, 3, 3), np.float64))
    layer.bias = np.zeros(2)
    with pytest.raises(ValueError, match="bias should contain 3 elements not 2"):
        layer(random_input((2, 3, 3, 3), np.float64))
    layer.bias = np.zeros(3, np.float32)   # another dtype is converted, as for the functions
    x = random_input((2, 3, 3, 3), np.float64)
    y = layer(x)
    after_forward = layer.state_dict()
    with pytest.raises(ValueError, match="grad_output has shape"):
        layer.backward(np.ones((2, 3, 3, 2)))
    assert layer.grad_weight is None and layer.grad_bias is None
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, after_forward[key])
        if not training:
            np.testing.assert_array_equal(value, state[key])
    assert layer.backward(np.ones_like(y)).shape == x.shape   # the forward is still saved


def test_train_eval_parameters_and_dtype():
    layer = nn.BatchNorm2d(4, dtype=np.float64)
    assert layer.training and layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert all(p.dtype == np.float64 for p in layer.parameters())
    assert nn.BatchNorm2d(4, affine=False).parameters() == []
    assert nn.RMSNorm(4).parameters()[0].shape == (4,)
    with pytest.raises(TypeError, match="computes in float64 but the input has dtype float32"):
        layer(np.ones((2, 4, 2, 2), np.float32))
    assert layer(np.arange(32).reshape(2, 4, 2, 2)).dtype == np.float64   # integers convert
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        nn.LayerNorm(3, dtype=np.int32)


def test_momentum_none_is_the_cumulative_average():
    layer = nn.BatchNorm1d(2, momentum=None, dtype=np.float64)
    batches = [random_input((5, 2), np.float64, seed=s, loc=s) for s in range(4)]
    for x in batches:
        layer(x)
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-13)
    np.testing.assert_allclose(layer.running_var,
                               np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-13)
    assert int(layer.num_batches_tracked) == 4


def test_layers_hold_no_reference_cycles():
    gc.collect()
    gc.disable()
    try:
        layer = nn.BatchNorm2d(3)
        y = layer(random_input((2, 3, 4, 4), np.float32))
        layer.backward(y)
        layer(random_input((2, 3, 4, 4), np.float32))
        ref = weakref.ref(layer)
        del layer
        assert ref() is None
    finally:
        gc.enable()


def test_copy_and_deepcopy():
    layer = nn.GroupNorm(2, 4)
    clone = copy.deepcopy(layer)
    clone.weight[...] = 3
    assert (layer.weight == 1).all()


# ----------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,args,kwargs,keys", [
    ("BatchNorm2d", (3,), {}, ["weight", "bias", "running_mean", "running_var",
                                "num_batches_tracked"]),
    ("BatchNorm2d", (3,), dict(affine=False), ["running_mean", "running_var",
                                               "num_batches_tracked"]),
    ("BatchNorm2d", (3,), dict(track_running_stats=False), ["weight", "bias"]),
    ("InstanceNorm2d", (3,), {}, []),
    ("InstanceNorm2d", (3,), dict(affine=True, track_running_stats=True),
     ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
    ("GroupNorm", (1, 3), dict(bias=False), ["weight"]),
    ("LayerNorm", ((2, 3),), {}, ["weight", "bias"]),
    ("RMSNorm", (3,), {}, ["weight"]),
])
def test_state_dict_keys_match_torch(torch, name, args, kwargs, keys):
    layer = getattr(nn, name)(*args, **kwargs)
    module = getattr(torch.nn, name)(*args, **kwargs)
    assert list(layer.state_dict()) == keys == list(module.state_dict())
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[key], value.numpy())
    assert repr(layer) == repr(module)


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_both_ways(torch, dtype):
    """A trained torch module's state into a bncpu layer, and back into a fresh module:
    all three give the same evaluation output."""
    module = torch.nn.BatchNorm2d(3, dtype=torch_dtype(torch, dtype))
    torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    torch.nn.init.uniform_(module.bias, -1, 1)
    for seed in range(3):
        module(torch.from_numpy(random_input((4, 3, 5, 5), dtype, seed=seed, loc=seed)))
    module.eval()
    layer = nn.BatchNorm2d(3, dtype=dtype).eval()
    assert layer.load_state_dict(module.state_dict()) == ([], [])
    assert int(layer.num_batches_tracked) == 3
    back = torch.nn.BatchNorm2d(3, dtype=torch_dtype(torch, dtype)).eval()
    back.load_state_dict({key: torch.from_numpy(value) for key, value in layer.state_dict().items()})
    x = random_input((2, 3, 5, 5), dtype, seed=9)
    expected = module(torch.from_numpy(x))
    close(layer(x), expected, dtype)
    close(back(torch.from_numpy(x)), expected, dtype)


def test_load_state_dict_errors_load_nothing(torch):
    layer = nn.BatchNorm1d(3)
    before = layer.state_dict()
    state = {"weight": np.full(4, 2.0), "bias": [1, 2, 3], "running_var": torch.full((3,), 5.0),
             "extra": 1}
    with pytest.raises(RuntimeError) as info:
        layer.load_state_dict(state)
    assert str(info.value) == (
        "Error(s) in loading state_dict for BatchNorm1d:\n"
        '\tMissing key(s) in state_dict: "running_mean". \n'
        '\tUnexpected key(s) in state_dict: "extra". \n'
        "\tsize mismatch for weight: copying a param with shape (4,) from checkpoint, "
        "the shape in current model is (3,).")
    assert isinstance(info.value, ValueError)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    # strict=False: missing and unexpected keys are reported, the rest loaded
    del state["weight"]
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["weight", "running_mean"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(layer.bias, [1, 2, 3])
    np.testing.assert_array_equal(layer.running_var, [5, 5, 5])
    assert layer.bias.dtype == np.float32
    with pytest.raises(ValueError, match='parameter named "num_batches_tracked": cannot convert'):
        layer.load_state_dict({**layer.state_dict(), "num_batches_tracked": 1.5})
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like"):
        layer.load_state_dict([("bias", [1, 2, 3])])
    # num_batches_tracked may be left out (torch's state dicts of old versions)
    partial = layer.state_dict()
    del partial["num_batches_tracked"]
    assert layer.load_state_dict(partial) == ([], [])


# ----------------------------------------------------------------------------------
# Messages as torch's
# ----------------------------------------------------------------------------------
def torch_message(function):
    try:
        function()
    except Exception as exc:   # noqa: BLE001  (torch's exception, whatever its type)
        return str(exc)
    raise AssertionError("torch raised nothing")


@pytest.mark.parametrize("name,args,bad_shape", [
    ("BatchNorm1d", (3,), (2, 3, 4, 5)), ("BatchNorm2d", (3,), (2, 3, 4)),
    ("BatchNorm3d", (3,), (2, 3, 4, 5)), ("InstanceNorm1d", (3,), (3,)),
    ("InstanceNorm2d", (3,), (2, 3, 4, 5, 6)), ("InstanceNorm3d", (3,), (3, 4, 5))])
def test_rank_messages_match_torch(torch, name, args, bad_shape):
    expected = torch_message(lambda: getattr(torch.nn, name)(*args)(torch.zeros(bad_shape)))
    with pytest.raises(ValueError) as info:
        getattr(nn, name)(*args)(np.zeros(bad_shape, np.float32))
    assert str(info.value) == expected


def test_instance_norm_feature_count_matches_torch(torch):
    x = np.zeros((2, 4, 5), np.float32)
    expected = torch_message(lambda: torch.nn.InstanceNorm1d(3, affine=True)(torch.from_numpy(x)))
    with pytest.raises(ValueError) as info:
        nn.InstanceNorm1d(3, affine=True)(x)
    assert str(info.value) == expected
    with pytest.warns(UserWarning, match="does not match num_features"):
        nn.InstanceNorm1d(3)(random_input((2, 4, 5), np.float32))


def test_group_norm_divisibility_matches_torch(torch):
    expected = torch_message(lambda: torch.nn.GroupNorm(4, 6))
    with pytest.raises(ValueError) as info:
        nn.GroupNorm(4, 6)
    assert str(info.value) == expected


def test_constructor_checks():
    with pytest.raises(ValueError, match="momentum must be in"):
        nn.BatchNorm2d(3, momentum=2.0)
    with pytest.raises(ValueError, match="eps must be finite"):
        nn.LayerNorm(3, eps=-1.0)
    with pytest.raises(TypeError, match="axis must be an integer"):
        nn.BatchNorm2d(3, axis=1.5)
    with pytest.raises(TypeError, match="normalized_shape must be"):
        nn.RMSNorm("x")


# ----------------------------------------------------------------------------------
# Keras / d2l running variance: unbiased_running_var=False
# ----------------------------------------------------------------------------------
def d2l_moving_average(moving, batch, d2l_momentum):
    """d2l's (and Keras's) update: the weight on the old value, the batch variance biased."""
    return d2l_momentum * moving + (1.0 - d2l_momentum) * batch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis,shape", [(1, (4, 3, 5, 5)), (-1, (4, 5, 5, 3)), (1, (6, 3))])
def test_biased_running_var_reproduces_d2l(dtype, axis, shape):
    layer = nn.BatchNorm2d(3, dtype=dtype, axis=axis, unbiased_running_var=False) \
        if len(shape) == 4 else nn.BatchNorm1d(3, dtype=dtype, unbiased_running_var=False)
    moving_mean, moving_var = np.zeros(3), np.ones(3)
    reduce_axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    for seed in range(3):
        x = random_input(shape, dtype, seed=seed, loc=seed)
        layer(x)
        batch = x.astype(np.float64)
        moving_mean = d2l_moving_average(moving_mean, batch.mean(reduce_axes), 0.9)
        moving_var = d2l_moving_average(moving_var, batch.var(reduce_axes), 0.9)
        close(layer.running_mean, moving_mean, dtype)
        close(layer.running_var, moving_var, dtype)
    assert "unbiased_running_var=False" in repr(layer)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_biased_running_var_functions_match_reference(dtype, momentum):
    x = random_input((5, 4, 3), dtype)
    running = [np.zeros(4, dtype), np.ones(4, dtype)]
    expected = [np.zeros(4), np.ones(4)]
    y = bncpu.batch_norm(x, *running, training=True, momentum=momentum,
                         unbiased_running_var=False)
    reference.batch_norm(x, *expected, training=True, momentum=momentum,
                         unbiased_running_var=False)
    close(running[0], expected[0], dtype)
    close(running[1], expected[1], dtype)
    close(y, reference.batch_norm(x, None, None, training=True), dtype)
    # gather_stats, as synchronized batch norm calls it with two processes' partials
    parts = [bncpu.batch_norm_stats(x[:2]), bncpu.batch_norm_stats(x[2:])]
    gathered = [np.zeros(4, dtype), np.ones(4, dtype)]
    bncpu.batch_norm_gather_stats(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                                  [p[2] for p in parts], *gathered, momentum=momentum,
                                  unbiased_running_var=False)
    close(gathered[0], expected[0], dtype)
    close(gathered[1], expected[1], dtype)


def test_training_statistics_go_through_the_hooks():
    """The contract a synchronized subclass relies on: in training, and only there, the
    statistics come from _train_forward and the backward from _train_backward; the layer
    counts the batch after _train_forward returned."""
    calls = []

    class Recording(nn.BatchNorm2d):
        def _train_forward(self, x, layout, running_mean, running_var, momentum):
            calls.append(("forward", int(self.num_batches_tracked), momentum))
            return super()._train_forward(x, layout, running_mean, running_var, momentum)

        def _train_backward(self, grad_output, x, layout, save_mean, save_invstd):
            calls.append(("backward",))
            return super()._train_backward(grad_output, x, layout, save_mean, save_invstd)

    layer = Recording(3, momentum=None, dtype=np.float64)
    x = random_input((2, 3, 4, 4), np.float64)
    for _ in range(2):
        layer.backward(layer(x))
    layer.eval()
    layer.backward(layer(x))
    assert calls == [("forward", 0, 1.0), ("backward",), ("forward", 1, 0.5), ("backward",)]
    assert int(layer.num_batches_tracked) == 2
