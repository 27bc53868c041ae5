"""bncpu.jax: bit for bit the NumPy API's results and gradients, under jit, grad and vmap,
through an XLA custom call (no host callback)."""
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="bncpu.jax needs jax (the `jax` extra)")
import jax.numpy as jnp  # noqa: E402

import bncpu  # noqa: E402

bj = pytest.importorskip("bncpu.jax", reason="bncpu.jax's FFI handler is not built")

SHAPE = (6, 4, 5, 3)


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(dtype)


def _params(c, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype),
            rng.standard_normal(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype))


def _equal(jax_value, numpy_value):
    np.testing.assert_array_equal(np.asarray(jax_value), numpy_value, strict=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_forward_and_grad_equal_numpy_api(dtype, training, axis, affine):
    with jax.enable_x64(dtype == np.float64):
        x, dy = _data(SHAPE, dtype), _data(SHAPE, dtype, seed=2)
        c = SHAPE[axis]
        weight, bias, running_mean, running_var = _params(c, dtype)
        if not affine:
            weight = bias = None
        mean_np, var_np = running_mean.copy(), running_var.copy()
        y_np = bncpu.batch_norm(x, mean_np, var_np, weight, bias, training, 0.2, 1e-3, axis=axis,
                                unbiased_running_var=False)
        run = jax.jit(lambda x, w, b, m, v: bj.batch_norm(
            x, m, v, w, b, training, 0.2, 1e-3, axis=axis, unbiased_running_var=False))
        y, new_mean, new_var = run(x, weight, bias, running_mean, running_var)
        _equal(y, y_np)
        _equal(new_mean, mean_np)
        _equal(new_var, var_np)

        def loss(x, w, b):
            return jnp.vdot(bj.batch_norm(x, running_mean, running_var, w, b, training, 0.2, 1e-3,
                                          axis=axis)[0], dy)
        argnums = (0, 1, 2) if affine else (0,)
        grads = jax.jit(jax.grad(loss, argnums=argnums))(x, weight, bias)
        _, save_mean, save_invstd = bncpu.batch_norm_forward(
            x, weight, bias, running_mean.copy(), running_var.copy(), training, 0.2, 1e-3,
            axis=axis)
        expected = bncpu.batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
                                             save_invstd, training, 1e-3, axis=axis)
        for got, want in zip(grads, expected):
            _equal(got, want)


def test_batch_norm_training_without_running_stats_and_bias_only_grad():
    x, dy = _data(SHAPE, np.float32), _data(SHAPE, np.float32, seed=2)
    y, mean, var = bj.batch_norm(x, None, None, training=True)
    assert mean is None and var is None
    _equal(y, bncpu.batch_norm(x, None, None, training=True))
    # A bias without a weight still has a gradient: the sum of dy per channel.
    bias = np.zeros(SHAPE[1], np.float32)
    grad = jax.grad(lambda b: jnp.vdot(bj.batch_norm(x, None, None, None, b, True)[0], dy))(bias)
    np.testing.assert_allclose(grad, dy.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("normalized_shape", [(3,), (5, 3)])
def test_layer_and_rms_norm_equal_numpy_api(dtype, normalized_shape):
    with jax.enable_x64(dtype == np.float64):
        x, dy = _data(SHAPE, dtype), _data(SHAPE, dtype, seed=2)
        rng = np.random.default_rng(3)
        weight = rng.standard_normal(normalized_shape).astype(dtype)
        bias = rng.standard_normal(normalized_shape).astype(dtype)

        y = jax.jit(lambda x, w, b: bj.layer_norm(x, normalized_shape, w, b, 1e-3))(x, weight, bias)
        _equal(y, bncpu.layer_norm(x, normalized_shape, weight, bias, 1e-3))
        grads = jax.grad(lambda x, w, b: jnp.vdot(bj.layer_norm(x, normalized_shape, w, b, 1e-3),
                                                  dy), argnums=(0, 1, 2))(x, weight, bias)
        _, mean, rstd = bncpu.layer_norm_forward(x, normalized_shape, weight, bias, 1e-3)
        for got, want in zip(grads, bncpu.layer_norm_backward(dy, x, normalized_shape, mean, rstd,
                                                              weight)):
            _equal(got, want)

        y = jax.jit(lambda x, w: bj.rms_norm(x, normalized_shape, w))(x, weight)
        _equal(y, bncpu.rms_norm(x, normalized_shape, weight))
        grads = jax.grad(lambda x, w: jnp.vdot(bj.rms_norm(x, normalized_shape, w), dy),
                         argnums=(0, 1))(x, weight)
        _, rstd = bncpu.rms_norm_forward(x, normalized_shape, weight, None)
        for got, want in zip(grads, bncpu.rms_norm_backward(dy, x, normalized_shape, rstd, weight)):
            _equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis, groups", [(1, 2), (1, 4), (-1, 3), (-1, 1), (2, 5), (2, 1)])
def test_group_norm_equal_numpy_api(dtype, axis, groups):
    # groups == C on the last or a middle axis is the per-sample instance path.
    with jax.enable_x64(dtype == np.float64):
        x, dy = _data(SHAPE, dtype), _data(SHAPE, dtype, seed=2)
        c = SHAPE[axis]
        groups = c if groups == 1 and axis != 1 else groups
        weight, bias, _, _ = _params(c, dtype)
        y = jax.jit(lambda x, w, b: bj.group_norm(x, groups, w, b, 1e-3, axis=axis))(x, weight, bias)
        _equal(y, bncpu.group_norm(x, groups, weight, bias, 1e-3, axis=axis))
        grads = jax.grad(lambda x, w, b: jnp.vdot(bj.group_norm(x, groups, w, b, 1e-3, axis=axis),
                                                  dy), argnums=(0, 1, 2))(x, weight, bias)
        _, mean, rstd = bncpu.group_norm_forward(x, groups, weight, bias, 1e-3, axis=axis)
        expected = bncpu.group_norm_backward(dy, x, groups, mean, rstd, weight, axis=axis)
        for got, want in zip(grads, expected):
            _equal(got, want)


def test_vmap_is_one_call_per_element():
    xs = _data((3,) + SHAPE, np.float32)
    weight, bias, running_mean, running_var = _params(SHAPE[1], np.float32)
    batched = jax.vmap(lambda x: bj.batch_norm(x, running_mean, running_var, weight, bias,
                                               True)[0])(xs)
    for x, y in zip(xs, batched):
        _equal(y, bncpu.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias,
                                   True))
    # Mapped over the weight too, and differentiated.
    weights = np.stack([weight, 2 * weight, -weight])
    grads = jax.vmap(jax.grad(lambda x, w: jnp.sum(bj.layer_norm(x, 3, w[:3]) ** 2),
                              argnums=1))(xs, weights)
    for x, w, g in zip(xs, weights, grads):
        expected = jax.grad(lambda w: jnp.sum(bj.layer_norm(x, 3, w[:3]) ** 2))(w)
        _equal(g, np.asarray(expected))


def test_value_and_grad_and_lowering_is_a_custom_call():
    x = _data(SHAPE, np.float32)

    def loss(x):
        return jnp.sum(bj.batch_norm(x, None, None, training=True)[0] ** 3)
    value, grad = jax.jit(jax.value_and_grad(loss))(x)
    assert np.isfinite(float(value)) and grad.shape == x.shape
    text = jax.jit(jax.value_and_grad(loss)).lower(x).as_text()
    assert "stablehlo.custom_call @bncpu_batch_norm_forward" in text
    assert "stablehlo.custom_call @bncpu_batch_norm_backward" in text
    assert "callback" not in text


def test_bad_arguments_raise_clear_errors():
    x = _data(SHAPE, np.float32)
    with pytest.raises(TypeError, match="float32 and float64"):
        bj.batch_norm(x.astype(np.int32), None, None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var must be given"):
        bj.batch_norm(x, None, None)
    with pytest.raises(ValueError, match="weight has shape"):
        bj.batch_norm(x, None, None, np.ones(3, np.float32), training=True)
    with pytest.raises(ValueError, match="momentum"):
        bj.batch_norm(x, None, None, training=True, momentum=2.0)
    with pytest.raises(ValueError, match="divisible"):
        bj.group_norm(x, 3)
    with pytest.raises(ValueError, match="normalized_shape"):
        bj.layer_norm(x, (4,))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bj.batch_norm(x[:1, :, :1, :1], None, None, training=True)


def _python(code):
    """Run ``code`` in a child Python that imports the bncpu under test (conftest's
    PYTHONPATH, from CHILD_CWD: not the source tree)."""
    from conftest import CHILD_CWD
    return subprocess.run([sys.executable, "-c", code], cwd=CHILD_CWD, capture_output=True,
                          text=True, timeout=120)


def test_import_bncpu_needs_neither_jax_nor_keras():
    result = _python("import sys, bncpu; bncpu.batch_norm([[1.0], [2.0]], None, None, "
                     "training=True); print(sorted({'jax', 'keras', 'tensorflow', 'torch'} "
                     "& set(sys.modules)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_handler_says_how_to_build_it():
    # sys.modules[name] = None makes that import fail, as a build without jax leaves it.
    result = _python("import sys; sys.modules['bncpu.jax._ffi'] = None; import bncpu.jax")
    assert result.returncode != 0
    assert "builds it only when jax is importable" in result.stderr
