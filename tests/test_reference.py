"""bncpu.reference, the slow twin, checked two ways: against PyTorch's forward, backward and
running-statistics updates (when torch is importable), and, without torch, against itself: every
backward against central finite differences of its forward, and the split-phase batch norm
statistics merged over processes against those of the whole batch."""

import functools

import numpy as np
import pytest

from bncpu import reference as ref
from conftest import central_differences

EPS = 1e-5
MOMENTUM = 0.1

# Both sides compute in float64, but torch's CPU kernels sum in a different order (and some in one
# pass), so agreement is to rounding, not to the bit.
assert_close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-12)

# 2-D to 5-D, a single channel, and prime sizes so that no dimension hides a transposition.
CHANNEL_SHAPES = [(4, 3), (5, 1), (2, 3, 5), (3, 5, 7, 11), (2, 1, 3, 4, 5)]

# Which of weight and bias are given.
AFFINE = {
    "weight+bias": (True, True),
    "weight": (True, False),
    "bias": (False, True),
    "none": (False, False),
}


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is the oracle for the torch checks")


def random_input(shape, seed=0):
    """Values with a mean away from 0, so that a slip in the centering shows."""
    return np.random.default_rng(seed).normal(3.0, 2.0, size=shape)


def random_params(shape, affine, seed=1):
    """(weight, bias) of `shape`, each None unless its flag in `affine` is set."""
    rng = np.random.default_rng(seed)
    has_weight, has_bias = AFFINE[affine]
    weight = rng.uniform(0.5, 1.5, size=shape) if has_weight else None
    bias = rng.normal(size=shape) if has_bias else None
    return weight, bias


def running_stats(num_channels, seed=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=num_channels), rng.uniform(0.5, 2.0, size=num_channels)


def to_torch(torch, array):
    """A float64 tensor holding a copy of `array`, so that in-place updates stay on their side."""
    return None if array is None else torch.tensor(np.asarray(array, dtype=np.float64))


def output_mask(weight):
    """torch's native backward ops compute the parameter gradients only when asked."""
    return [True, weight is not None, weight is not None]


def assert_grads_close(ours, theirs, weight):
    """(grad_input, grad_weight, grad_bias) against torch's; ours for the parameters are None
    exactly when there is no weight."""
    assert_close(ours[0], theirs[0].numpy())
    for our_grad, their_grad in zip(ours[1:], theirs[1:], strict=True):
        assert (our_grad is None) == (weight is None)
        if weight is not None:
            assert_close(our_grad, their_grad.numpy())


# ---------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
def test_batch_norm_forward_matches_torch(torch, shape, affine, training):
    x = random_input(shape)
    weight, bias = random_params(shape[1], affine)
    running_mean, running_var = running_stats(shape[1])
    torch_running_mean = to_torch(torch, running_mean)
    torch_running_var = to_torch(torch, running_var)

    ours = ref.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training, MOMENTUM, EPS
    )
    theirs = torch.ops.aten.native_batch_norm(
        to_torch(torch, x), to_torch(torch, weight), to_torch(torch, bias),
        torch_running_mean, torch_running_var, training, MOMENTUM, EPS,
    )
    for our_value, their_value in zip(ours, theirs, strict=True):
        assert our_value.shape == tuple(their_value.shape)  # eval mode saves (0,)-shaped arrays
        assert_close(our_value, their_value.numpy())
    assert_close(running_mean, torch_running_mean.numpy())
    assert_close(running_var, torch_running_var.numpy())


@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
def test_batch_norm_functional_matches_torch(torch, shape, track_running_stats):
    x = random_input(shape)
    weight, bias = random_params(shape[1], "weight+bias")
    running_mean, running_var = running_stats(shape[1]) if track_running_stats else (None, None)
    torch_running_mean = to_torch(torch, running_mean)
    torch_running_var = to_torch(torch, running_var)

    ours = ref.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
    theirs = torch.nn.functional.batch_norm(
        to_torch(torch, x), torch_running_mean, torch_running_var,
        to_torch(torch, weight), to_torch(torch, bias), True, MOMENTUM, EPS,
    )
    assert_close(ours, theirs.numpy())
    if track_running_stats:
        assert_close(running_mean, torch_running_mean.numpy())
        assert_close(running_var, torch_running_var.numpy())


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("affine", ["weight", "none"])
@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
def test_batch_norm_backward_matches_torch(torch, shape, affine, training):
    x = random_input(shape)
    grad_output = random_input(shape, seed=3)
    weight, _ = random_params(shape[1], affine)
    running_mean, running_var = running_stats(shape[1])
    _, save_mean, save_invstd = ref.batch_norm_forward(
        x, weight, None, running_mean.copy(), running_var.copy(), training, MOMENTUM, EPS
    )

    ours = ref.batch_norm_backward(
        grad_output, x, weight, running_mean, running_var, save_mean, save_invstd, training, EPS
    )
    theirs = torch.ops.aten.native_batch_norm_backward(
        to_torch(torch, grad_output), to_torch(torch, x), to_torch(torch, weight),
        to_torch(torch, running_mean), to_torch(torch, running_var),
        to_torch(torch, save_mean), to_torch(torch, save_invstd), training, EPS,
        output_mask(weight),
    )
    assert_grads_close(ours, theirs, weight)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 2, 1, 1)])
def test_batch_norm_one_value_per_channel_raises_like_torch(torch, shape):
    x = random_input(shape)
    message = "Expected more than 1 value per channel when training"
    with pytest.raises(ValueError, match=message):
        ref.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match=message):
        torch.nn.functional.batch_norm(to_torch(torch, x), None, None, training=True)


def test_batch_norm_empty_batch_leaves_running_stats_like_torch(torch):
    # native_batch_norm refuses an empty input (and native_batch_norm_backward dies of SIGFPE on
    # one), so the functional form is the one to compare with.
    x = np.empty((0, 3, 5))
    running_mean, running_var = running_stats(3)
    torch_running_mean = to_torch(torch, running_mean)
    torch_running_var = to_torch(torch, running_var)
    before = running_mean.copy(), running_var.copy()

    ours = ref.batch_norm(x, running_mean, running_var, training=True)
    theirs = torch.nn.functional.batch_norm(
        to_torch(torch, x), torch_running_mean, torch_running_var, training=True
    )
    assert ours.shape == tuple(theirs.shape) == x.shape
    for ours_now, theirs_now, old in zip((running_mean, running_var),
                                         (torch_running_mean, torch_running_var), before):
        np.testing.assert_array_equal(ours_now, old)
        np.testing.assert_array_equal(theirs_now.numpy(), old)


def test_batch_norm_empty_batch_statistics():
    mean, m2, count = ref.batch_norm_stats(np.empty((0, 3, 5)))
    np.testing.assert_array_equal(mean, np.zeros(3))
    np.testing.assert_array_equal(m2, np.zeros(3))
    assert count == 0 and isinstance(count, int)

    output, save_mean, save_invstd = ref.batch_norm_forward(
        np.empty((0, 3)), None, None, None, None, True, MOMENTUM, EPS
    )
    assert output.shape == (0, 3)
    np.testing.assert_array_equal(save_mean, np.zeros(3))
    assert_close(save_invstd, np.full(3, 1 / np.sqrt(EPS)))


def split_batch(x, part_sizes):
    """Split along N into consecutive parts of the given sizes, as P processes would hold it."""
    return np.split(x, np.cumsum(part_sizes)[:-1])


@pytest.mark.parametrize("seed", range(5))
def test_batch_norm_gather_stats_merges_exactly(seed):
    # Parts with very different means, and empty parts: Chan's correction term carries the weight.
    rng = np.random.default_rng(seed)
    part_sizes = rng.integers(0, 4, size=5)
    part_sizes[0] += 1
    parts = [random_input((size, 3, 2), seed=seed + 10 * p) + 10 * p
             for p, size in enumerate(part_sizes)]
    whole = np.concatenate(parts)
    means, m2s, counts = zip(*(ref.batch_norm_stats(part) for part in parts))
    running_mean, running_var = running_stats(3)
    old_running_mean, old_running_var = running_mean.copy(), running_var.copy()

    mean, invstd = ref.batch_norm_gather_stats(
        np.stack(means), np.stack(m2s), counts, running_mean, running_var, MOMENTUM, EPS
    )
    whole_mean, whole_m2, whole_count = ref.batch_norm_stats(whole)
    assert whole_count == sum(counts)
    assert_close(mean, whole_mean)
    assert_close(invstd, 1 / np.sqrt(whole_m2 / whole_count + EPS))
    assert_close(running_mean, (1 - MOMENTUM) * old_running_mean + MOMENTUM * whole_mean)
    assert_close(running_var,
                 (1 - MOMENTUM) * old_running_var + MOMENTUM * whole_m2 / (whole_count - 1))


@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("shape", [shape for shape in CHANNEL_SHAPES if shape[0] >= 2])
def test_batch_norm_split_phase_matches_torch_on_the_whole_batch(torch, shape, affine):
    """Synchronized batch norm over three processes, one of them with an empty part."""
    x = random_input(shape)
    grad_output = random_input(shape, seed=3)
    weight, bias = random_params(shape[1], affine)
    part_sizes = [1, 0, shape[0] - 1]
    x_parts, grad_parts = split_batch(x, part_sizes), split_batch(grad_output, part_sizes)
    running_mean, running_var = running_stats(shape[1])
    torch_running_mean = to_torch(torch, running_mean)
    torch_running_var = to_torch(torch, running_var)

    means, m2s, counts = zip(*(ref.batch_norm_stats(part) for part in x_parts))
    mean, invstd = ref.batch_norm_gather_stats(
        np.stack(means), np.stack(m2s), counts, running_mean, running_var, MOMENTUM, EPS
    )
    output = np.concatenate(
        [ref.batch_norm_elemt(part, weight, bias, mean, invstd) for part in x_parts]
    )

    reductions = [ref.batch_norm_backward_reduce(dy, part, mean, invstd, weight)
                  for dy, part in zip(grad_parts, x_parts)]
    sum_dy, sum_dy_xmu = (sum(r[0] for r in reductions), sum(r[1] for r in reductions))
    grad_input = np.concatenate([
        ref.batch_norm_backward_elemt(dy, part, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
        for dy, part in zip(grad_parts, x_parts)
    ])

    their_output, their_mean, their_invstd = torch.ops.aten.native_batch_norm(
        to_torch(torch, x), to_torch(torch, weight), to_torch(torch, bias),
        torch_running_mean, torch_running_var, True, MOMENTUM, EPS,
    )
    their_grads = torch.ops.aten.native_batch_norm_backward(
        to_torch(torch, grad_output), to_torch(torch, x), to_torch(torch, weight), None, None,
        their_mean, their_invstd, True, EPS, output_mask(weight),
    )
    assert_close(mean, their_mean.numpy())
    assert_close(invstd, their_invstd.numpy())
    assert_close(running_mean, torch_running_mean.numpy())
    assert_close(running_var, torch_running_var.numpy())
    assert_close(output, their_output.numpy())
    assert_close(grad_input, their_grads[0].numpy())
    if weight is None:
        assert all(r[2] is None and r[3] is None for r in reductions)
    else:
        assert_close(sum(r[2] for r in reductions), their_grads[1].numpy())
        assert_close(sum(r[3] for r in reductions), their_grads[2].numpy())


# ---------------------------------------------------------------------------------------------
# Layer norm and RMS norm
# ---------------------------------------------------------------------------------------------

# (input shape, normalized_shape); an int normalized_shape is allowed, as in torch.
TRAILING_CASES = [
    ((7,), 7), ((4, 3), (3,)), ((2, 3, 5), 5), ((2, 3, 5), (3, 5)),
    ((3, 5, 7, 11), (7, 11)), ((3, 5, 7, 11), (11,)), ((2, 1, 3, 4, 5), (1, 3, 4, 5)), ((4, 1), 1),
]


def as_tuple(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape, normalized_shape", TRAILING_CASES)
def test_layer_norm_matches_torch(torch, shape, normalized_shape, affine):
    x = random_input(shape)
    grad_output = random_input(shape, seed=3)
    normalized = as_tuple(normalized_shape)
    weight, bias = random_params(normalized, affine)
    leading = shape[:len(shape) - len(normalized)]

    output, mean, rstd = ref.layer_norm_forward(x, normalized_shape, weight, bias, EPS)
    grads = ref.layer_norm_backward(grad_output, x, normalized_shape, mean, rstd, weight)
    theirs = torch.ops.aten.native_layer_norm(
        to_torch(torch, x), list(normalized), to_torch(torch, weight), to_torch(torch, bias), EPS
    )
    # torch shapes grad_bias after the bias tensor, so it needs one; its values do not matter.
    their_grads = torch.ops.aten.native_layer_norm_backward(
        to_torch(torch, grad_output), to_torch(torch, x), list(normalized), theirs[1], theirs[2],
        to_torch(torch, weight), to_torch(torch, np.zeros(normalized)),
        output_mask(weight),
    )
    assert mean.shape == rstd.shape == leading
    assert_close(output, theirs[0].numpy())
    assert_close(mean, theirs[1].numpy().reshape(leading))
    assert_close(rstd, theirs[2].numpy().reshape(leading))
    assert_close(ref.layer_norm(x, normalized_shape, weight, bias, EPS), theirs[0].numpy())
    assert_grads_close(grads, their_grads, weight)


@pytest.mark.parametrize("eps", [EPS, None])
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "none"])
@pytest.mark.parametrize("shape, normalized_shape", TRAILING_CASES)
def test_rms_norm_matches_torch(torch, shape, normalized_shape, has_weight, eps):
    x = random_input(shape)
    grad_output = random_input(shape, seed=3)
    normalized = as_tuple(normalized_shape)
    weight, _ = random_params(normalized, "weight" if has_weight else "none")
    x_t, weight_t = to_torch(torch, x).requires_grad_(), to_torch(torch, weight)
    if weight_t is not None:
        weight_t.requires_grad_()

    output, rstd = ref.rms_norm_forward(x, normalized_shape, weight, eps)
    grads = ref.rms_norm_backward(grad_output, x, normalized_shape, rstd, weight)
    their_output = torch.nn.functional.rms_norm(x_t, list(normalized), weight_t, eps)
    their_output.backward(to_torch(torch, grad_output))
    dims = tuple(range(-len(normalized), 0))
    their_rstd = torch.rsqrt(x_t.detach().pow(2).mean(dims) + (eps or np.finfo(np.float64).eps))

    assert_close(output, their_output.detach().numpy())
    assert_close(ref.rms_norm(x, normalized_shape, weight, eps), their_output.detach().numpy())
    assert_close(rstd, their_rstd.numpy())
    assert_close(grads[0], x_t.grad.numpy())
    if has_weight:
        assert_close(grads[1], weight_t.grad.numpy())
    else:
        assert grads[1] is None


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float16, 2e-3)])
def test_rms_norm_default_eps_follows_torch(torch, dtype, rtol):
    # Mean squares of ~1e-8, below float32's epsilon (1.2e-7) and far below float16's (9.8e-4):
    # which epsilon torch adds decides the result. For float16 it is float32's.
    x = (1e-4 * random_input((4, 6))).astype(dtype)
    ours = ref.rms_norm(x, 6)
    theirs = torch.nn.functional.rms_norm(torch.from_numpy(x), [6])
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=rtol)


@pytest.mark.parametrize("function", [ref.layer_norm, ref.rms_norm])
@pytest.mark.parametrize("normalized_shape", [4, (5, 3), (1, 2, 3, 5), ()])
def test_wrong_normalized_shape_raises(function, normalized_shape):
    with pytest.raises(ValueError, match="normalized_shape"):
        function(random_input((2, 3, 5)), normalized_shape)


# ---------------------------------------------------------------------------------------------
# Group norm and instance norm
# ---------------------------------------------------------------------------------------------

GROUP_CASES = [
    ((4, 6), 3), ((2, 6, 5), 1), ((2, 6, 5), 2), ((2, 6, 5), 6),
    ((3, 5, 7, 11), 1), ((3, 5, 7, 11), 5), ((2, 1, 3, 4, 5), 1),
]


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape, num_groups", GROUP_CASES)
def test_group_norm_matches_torch(torch, shape, num_groups, affine):
    x = random_input(shape)
    grad_output = random_input(shape, seed=3)
    weight, bias = random_params(shape[1], affine)
    n, c, spatial_size = shape[0], shape[1], int(np.prod(shape[2:]))

    output, mean, rstd = ref.group_norm_forward(x, num_groups, weight, bias, EPS)
    grads = ref.group_norm_backward(grad_output, x, num_groups, mean, rstd, weight)
    theirs = torch.ops.aten.native_group_norm(
        to_torch(torch, x), to_torch(torch, weight), to_torch(torch, bias),
        n, c, spatial_size, num_groups, EPS,
    )
    their_grads = torch.ops.aten.native_group_norm_backward(
        to_torch(torch, grad_output), to_torch(torch, x), theirs[1], theirs[2],
        to_torch(torch, weight), n, c, spatial_size, num_groups, output_mask(weight),
    )
    assert mean.shape == rstd.shape == (n, num_groups)
    for our_value, their_value in zip((output, mean, rstd), theirs, strict=True):
        assert_close(our_value, their_value.numpy())
    assert_close(ref.group_norm(x, num_groups, weight, bias, EPS), theirs[0].numpy())
    assert_grads_close(grads, their_grads, weight)


def test_group_norm_indivisible_channels_raise():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        ref.group_norm(random_input((2, 6, 5)), 4)


INSTANCE_SHAPES = [(2, 3, 5), (1, 3, 4), (3, 5, 7, 11), (2, 1, 3, 4, 5)]


@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape", INSTANCE_SHAPES)
def test_instance_norm_matches_torch(torch, shape, affine, track_running_stats):
    x = random_input(shape)
    grad_output = random_input(shape, seed=3)
    weight, bias = random_params(shape[1], affine)
    running_mean, running_var = running_stats(shape[1]) if track_running_stats else (None, None)
    torch_running_mean = to_torch(torch, running_mean)
    torch_running_var = to_torch(torch, running_var)
    x_t, weight_t, bias_t = (to_torch(torch, a) for a in (x, weight, bias))
    for tensor in (x_t, weight_t, bias_t):
        if tensor is not None:
            tensor.requires_grad_()

    output, mean, rstd = ref.instance_norm_forward(
        x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS
    )
    grads = ref.instance_norm_backward(grad_output, x, mean, rstd, weight)
    their_output = torch.nn.functional.instance_norm(
        x_t, torch_running_mean, torch_running_var, weight_t, bias_t, True, MOMENTUM, EPS
    )
    their_output.backward(to_torch(torch, grad_output))
    per_instance = x_t.detach().flatten(2)

    assert_close(output, their_output.detach().numpy())
    assert_close(mean, per_instance.mean(2).numpy())
    assert_close(rstd, torch.rsqrt(per_instance.var(2, correction=0) + EPS).numpy())
    sum_dy = grad_output.reshape(shape[0], shape[1], -1).sum(axis=(0, 2))
    assert_close(grads[0], x_t.grad.numpy())
    if weight is not None:
        assert_close(grads[1], weight_t.grad.numpy())
        assert_close(grads[2], sum_dy)
    if bias is not None:
        assert_close(bias_t.grad.numpy(), sum_dy)
    if track_running_stats:
        assert_close(running_mean, torch_running_mean.numpy())
        assert_close(running_var, torch_running_var.numpy())


@pytest.mark.parametrize("shape", INSTANCE_SHAPES)
def test_instance_norm_without_input_stats_matches_torch(torch, shape):
    x = random_input(shape)
    weight, bias = random_params(shape[1], "weight+bias")
    running_mean, running_var = running_stats(shape[1])

    output, mean, rstd = ref.instance_norm_forward(
        x, weight, bias, running_mean, running_var, False, MOMENTUM, EPS
    )
    theirs = torch.nn.functional.instance_norm(
        to_torch(torch, x), to_torch(torch, running_mean), to_torch(torch, running_var),
        to_torch(torch, weight), to_torch(torch, bias), False, MOMENTUM, EPS,
    )
    assert_close(output, theirs.numpy())
    functional = ref.instance_norm(x, running_mean, running_var, weight, bias, False)
    assert_close(functional, theirs.numpy())
    assert mean.shape == rstd.shape == (0,)


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1), (2, 3, 1, 1)])
def test_instance_norm_one_value_per_instance_raises_like_torch(torch, shape):
    x = random_input(shape)
    message = "Expected more than 1 spatial element when training"
    with pytest.raises(ValueError, match=message):
        ref.instance_norm(x)
    with pytest.raises(ValueError, match=message):
        torch.nn.functional.instance_norm(to_torch(torch, x))


# ---------------------------------------------------------------------------------------------
# Every backward against central finite differences of its forward (no torch needed)
# ---------------------------------------------------------------------------------------------
# Each case maps (x, *params) to (output, vjp), vjp(dy) giving the gradients of sum(output * dy)
# with respect to x and each given parameter (None entries, for absent parameters, dropped).

RUNNING_MEAN, RUNNING_VAR = running_stats(3)


def batch_norm_training(x, weight=None, bias=None):
    output, mean, invstd = ref.batch_norm_forward(x, weight, bias, None, None, True, MOMENTUM, EPS)
    return output, lambda dy: ref.batch_norm_backward(
        dy, x, weight, None, None, mean, invstd, True, EPS
    )


def batch_norm_eval(x, weight=None, bias=None):
    output, _, _ = ref.batch_norm_forward(
        x, weight, bias, RUNNING_MEAN, RUNNING_VAR, False, MOMENTUM, EPS
    )
    return output, lambda dy: ref.batch_norm_backward(
        dy, x, weight, RUNNING_MEAN, RUNNING_VAR, None, None, False, EPS
    )


def batch_norm_split_phase(x, weight=None, bias=None):
    """Two processes, holding the first sample and the rest."""
    x_parts = split_batch(x, [1, len(x) - 1])
    means, m2s, counts = zip(*(ref.batch_norm_stats(part) for part in x_parts))
    mean, invstd = ref.batch_norm_gather_stats(np.stack(means), np.stack(m2s), counts)
    output = np.concatenate(
        [ref.batch_norm_elemt(part, weight, bias, mean, invstd) for part in x_parts]
    )

    def vjp(dy):
        grad_parts = split_batch(dy, [1, len(x) - 1])
        reductions = [ref.batch_norm_backward_reduce(g, part, mean, invstd, weight)
                      for g, part in zip(grad_parts, x_parts)]
        sum_dy, sum_dy_xmu = sum(r[0] for r in reductions), sum(r[1] for r in reductions)
        grad_input = np.concatenate([
            ref.batch_norm_backward_elemt(
                g, part, mean, invstd, weight, sum_dy, sum_dy_xmu, sum(counts)
            )
            for g, part in zip(grad_parts, x_parts)
        ])
        if weight is None:
            return grad_input, None, None
        return grad_input, sum(r[2] for r in reductions), sum(r[3] for r in reductions)

    return output, vjp


def layer_norm(x, weight=None, bias=None):
    output, mean, rstd = ref.layer_norm_forward(x, (4, 5), weight, bias, EPS)
    return output, lambda dy: ref.layer_norm_backward(dy, x, (4, 5), mean, rstd, weight)


def group_norm(x, weight=None, bias=None):
    output, mean, rstd = ref.group_norm_forward(x, 2, weight, bias, EPS)
    return output, lambda dy: ref.group_norm_backward(dy, x, 2, mean, rstd, weight)


def instance_norm(x, weight=None, bias=None):
    output, mean, rstd = ref.instance_norm_forward(x, weight, bias, None, None, True, MOMENTUM, EPS)
    return output, lambda dy: ref.instance_norm_backward(dy, x, mean, rstd, weight)


def rms_norm(x, weight=None):
    output, rstd = ref.rms_norm_forward(x, (5,), weight, EPS)
    return output, lambda dy: ref.rms_norm_backward(dy, x, (5,), rstd, weight)


# name: (case, input shape, shapes of all its parameters)
GRADIENT_CASES = {
    "batch_norm training": (batch_norm_training, (4, 3, 2), [(3,), (3,)]),
    "batch_norm eval": (batch_norm_eval, (4, 3, 2), [(3,), (3,)]),
    "batch_norm split phase": (batch_norm_split_phase, (3, 3, 2), [(3,), (3,)]),
    "layer_norm": (layer_norm, (3, 4, 5), [(4, 5), (4, 5)]),
    "group_norm": (group_norm, (2, 6, 3), [(6,), (6,)]),
    "instance_norm": (instance_norm, (2, 3, 4), [(3,), (3,)]),
    "rms_norm": (rms_norm, (3, 4, 5), [(5,)]),
}


@pytest.mark.parametrize("with_params", [True, False], ids=["params", "no params"])
@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_backward_matches_finite_differences(name, with_params):
    case, shape, param_shapes = GRADIENT_CASES[name]
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, size=shape)
    params = [rng.uniform(0.5, 1.5, size=s) for s in param_shapes] if with_params else []
    output, vjp = case(x, *params)
    grad_output = rng.normal(size=output.shape)

    def loss():
        return np.sum(case(x, *params)[0] * grad_output)

    expected = [central_differences(loss, array) for array in (x, *params)]
    grads = vjp(grad_output)
    assert all(g is None for g in grads[1:]) != with_params
    actual = [g for g in grads if g is not None]
    for our_grad, numerical_grad in zip(actual, expected, strict=True):
        np.testing.assert_allclose(our_grad, numerical_grad, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Degenerate input: the kernels agree with the twin (same results, or both raise)
# ---------------------------------------------------------------------------------------------
def _degenerate_calls(module, shape):
    """Every function of `module` (bncpu or bncpu.reference) on an input of `shape`, with the
    other arguments derived from it, as {name: thunk}. Each thunk returns the results and the
    running statistics it updated."""
    x = random_input(shape)
    dy = random_input(shape, seed=4)
    c = shape[1] if len(shape) > 1 else 0
    weight, bias = random_params(c, "weight+bias")

    def train(name, call):
        def thunk():
            running_mean, running_var = running_stats(c)
            return list(call(running_mean, running_var)) + [running_mean, running_var]
        return name, thunk

    m = module
    calls = dict([
        train("batch_norm_forward train", lambda rm, rv: m.batch_norm_forward(
            x, weight, bias, rm, rv, True, MOMENTUM, EPS)),
        ("batch_norm_forward eval", lambda: m.batch_norm_forward(
            x, weight, bias, *running_stats(c), False, MOMENTUM, EPS)),
        ("batch_norm_backward train", lambda: m.batch_norm_backward(
            dy, x, weight, None, None, *ref.batch_norm_gather_stats(
                *ref.batch_norm_stats(x)[:2], [ref.batch_norm_stats(x)[2]], eps=EPS), True, EPS)),
        ("batch_norm_backward eval", lambda: m.batch_norm_backward(
            dy, x, weight, *running_stats(c), None, None, False, EPS)),
        ("batch_norm_stats", lambda: m.batch_norm_stats(x)),
        train("batch_norm_gather_stats", lambda rm, rv: m.batch_norm_gather_stats(
            np.stack([ref.batch_norm_stats(x)[0]] * 2), np.stack([ref.batch_norm_stats(x)[1]] * 2),
            [ref.batch_norm_stats(x)[2]] * 2, rm, rv, MOMENTUM, EPS)),
        ("batch_norm_elemt", lambda: m.batch_norm_elemt(
            x, weight, bias, np.zeros(c), np.ones(c))),
        ("batch_norm_backward_reduce", lambda: m.batch_norm_backward_reduce(
            dy, x, np.zeros(c), np.ones(c), weight)),
        ("batch_norm_backward_elemt counts", lambda: m.batch_norm_backward_elemt(
            dy, x, np.zeros(c), np.ones(c), weight, np.ones(c), np.ones(c),
            [x.size // max(c, 1), 3])),
        ("batch_norm_backward_elemt count 0", lambda: m.batch_norm_backward_elemt(
            dy, x, np.zeros(c), np.ones(c), weight, np.ones(c), np.ones(c), 0)),
        ("layer_norm_forward", lambda: m.layer_norm_forward(
            x, shape[-1:], None, None, EPS)),
        ("layer_norm_forward 2 dims", lambda: m.layer_norm_forward(
            x, shape[-2:], None, None, EPS)),
        ("layer_norm_backward", lambda: m.layer_norm_backward(
            dy, x, shape[-1:], *ref.layer_norm_forward(x, shape[-1:], None, None, EPS)[1:],
            np.ones(shape[-1:]))),
        ("rms_norm_forward", lambda: m.rms_norm_forward(x, shape[-1:], None, EPS)),
        ("rms_norm_backward", lambda: m.rms_norm_backward(
            dy, x, shape[-1:], ref.rms_norm_forward(x, shape[-1:], None, EPS)[1],
            np.ones(shape[-1:]))),
        ("group_norm_forward", lambda: m.group_norm_forward(x, 1, weight, bias, EPS)),
        ("group_norm_forward 0 groups", lambda: m.group_norm_forward(x, 0, None, None, EPS)),
        ("group_norm_backward", lambda: m.group_norm_backward(
            dy, x, 1, *ref.group_norm_forward(x, 1, None, None, EPS)[1:], weight)),
        train("instance_norm_forward", lambda rm, rv: m.instance_norm_forward(
            x, weight, bias, rm, rv, True, MOMENTUM, EPS)),
        ("instance_norm_backward", lambda: m.instance_norm_backward(
            dy, x, *ref.instance_norm_forward(x, None, None, None, None, True, 0.1, EPS)[1:],
            weight)),
    ])
    return calls


DEGENERATE_SHAPES = [(0, 3), (0, 3, 4), (2, 3, 0), (2, 0, 4), (2, 0), (0, 0, 3), (3, 1),
                     (1, 3, 1), (2, 3, 1, 0), (1, 1)]


def _outcome(thunk):
    try:
        with np.errstate(all="ignore"):
            return "result", thunk()
    except (ValueError, TypeError) as exc:
        return "error", type(exc)


@pytest.mark.parametrize("name", list(_degenerate_calls(ref, (2, 3)).keys()))
@pytest.mark.parametrize("shape", DEGENERATE_SHAPES, ids=str)
def test_kernels_agree_with_the_twin_on_degenerate_input(shape, name):
    import bncpu
    ours_kind, ours = _outcome(_degenerate_calls(bncpu, shape)[name])
    twin_kind, twin = _outcome(_degenerate_calls(ref, shape)[name])
    if ours_kind == "error" or twin_kind == "error":
        # The twin that raises while the kernels compute (or the reverse) is a disagreement;
        # raising together is agreement, with the same exception type.
        assert (ours_kind, ours) == (twin_kind, twin)
        return
    assert len(ours) == len(twin)
    for index, (a, b) in enumerate(zip(ours, twin)):
        if b is None or a is None:
            assert a is None and b is None, f"result {index}"
        elif np.ndim(b) == 0:
            np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=f"result {index}")
        else:
            assert np.shape(a) == np.shape(b), f"result {index}"
            np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-10, atol=1e-12,
                                       equal_nan=True, err_msg=f"result {index}")
