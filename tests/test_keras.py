"""bncpu.keras against Keras's own layers, on every Keras backend.

Keras fixes its backend at import, so ``test_backend[<name>]`` runs this file again in a
child process with KERAS_BACKEND=<name> (time-bounded); the child runs the tests below
it, which compare bncpu's layers with Keras's: training steps and losses, moving
statistics after ``fit``, predictions, gradients against bncpu's backward, serialization
both ways, ``convert``, channels-first ``axis=1``, counted fallbacks, and one short epoch
of examples/keras_cnn_bn.py.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = os.environ.get("BNCPU_KERAS_TEST_BACKEND")
CHILD_TIMEOUT_S = 900

if BACKEND is None:
    @pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
    def test_backend(backend):
        for package in ("keras", backend):
            if importlib.util.find_spec(package) is None:
                pytest.skip(f"{package} is not installed (the `keras` extra)")
        if backend == "jax":
            pytest.importorskip("bncpu.jax", reason="bncpu.jax's FFI handler is not built")
        # conftest's PYTHONPATH leads the child to the bncpu under test; started from
        # CHILD_CWD, not the repository root, whose source tree holds no compiled modules.
        from conftest import CHILD_CWD
        env = dict(os.environ, KERAS_BACKEND=backend, BNCPU_KERAS_TEST_BACKEND=backend,
                   TF_CPP_MIN_LOG_LEVEL="2")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
             "--rootdir", ROOT, os.path.abspath(__file__)],
            cwd=CHILD_CWD, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        assert result.returncode == 0, (f"the {backend} child failed:\n{result.stdout[-8000:]}\n"
                                        f"{result.stderr[-4000:]}")
else:
    keras = pytest.importorskip("keras")
    import bncpu  # noqa: E402
    import bncpu.keras as bk  # noqa: E402

    assert keras.backend.backend() == BACKEND, "KERAS_BACKEND did not reach the child"

    def _data(shape, seed=0):
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)

    # (Keras class, bncpu class, constructor arguments, input shape without the batch)
    CASES = {
        "batch_norm": (keras.layers.BatchNormalization, bk.BatchNormalization, {}, (6, 6, 4)),
        "batch_norm_no_affine": (keras.layers.BatchNormalization, bk.BatchNormalization,
                                 dict(center=False, scale=False, momentum=0.9), (6, 6, 4)),
        "batch_norm_center_only": (keras.layers.BatchNormalization, bk.BatchNormalization,
                                   dict(scale=False), (5, 4)),
        "batch_norm_axis_1": (keras.layers.BatchNormalization, bk.BatchNormalization,
                              dict(axis=1), (4, 5, 3)),
        "layer_norm": (keras.layers.LayerNormalization, bk.LayerNormalization, {}, (5, 8)),
        "layer_norm_two_axes": (keras.layers.LayerNormalization, bk.LayerNormalization,
                                dict(axis=[-2, -1]), (5, 8)),
        "group_norm": (keras.layers.GroupNormalization, bk.GroupNormalization,
                       dict(groups=2), (6, 6, 4)),
        "group_norm_axis_1": (keras.layers.GroupNormalization, bk.GroupNormalization,
                              dict(groups=2, axis=1), (4, 5, 3)),
        "instance_norm": (keras.layers.GroupNormalization, bk.GroupNormalization,
                          dict(groups=-1), (6, 6, 4)),
        "rms_norm": (keras.layers.RMSNormalization, bk.RMSNormalization, {}, (5, 8)),
    }

    def _model(norm, kwargs, shape, seed=0):
        """Input -> Dense (mixes the values, so the norm's input gradient matters) -> norm
        -> Flatten -> Dense(3), from one seed."""
        keras.utils.set_random_seed(seed)
        return keras.Sequential([
            keras.Input(shape), keras.layers.Dense(shape[-1]), norm(**kwargs),
            keras.layers.Flatten(), keras.layers.Dense(3)])

    def _pair(case):
        keras_cls, bncpu_cls, kwargs, shape = CASES[case]
        models = [_model(cls, kwargs, shape) for cls in (keras_cls, bncpu_cls)]
        models[1].set_weights(models[0].get_weights())
        return models, shape

    def _close(got, want, rtol=2e-4, atol=2e-5):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                                   keras.ops.convert_to_numpy(want), rtol=rtol, atol=atol)

    @pytest.mark.parametrize("case", CASES)
    def test_fit_matches_keras_layers(case):
        """model.fit (compile's default jit_compile="auto"): losses per epoch, the weights and
        moving statistics after fit, and predictions, against Keras's layer."""
        models, shape = _pair(case)
        x = _data((32,) + shape)
        y = _data((32, 3), seed=1)
        histories = []
        for model in models:
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
            histories.append(model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                                       verbose=0).history["loss"])
        np.testing.assert_allclose(histories[1], histories[0], rtol=1e-4)
        for got, want in zip(models[1].get_weights(), models[0].get_weights()):
            _close(got, want)
        _close(models[1].predict(x, verbose=0), models[0].predict(x, verbose=0))
        assert bk.fallback_counts() == {}

    @pytest.mark.parametrize("case", ["batch_norm", "batch_norm_axis_1"])
    def test_train_on_batch_and_evaluate(case):
        models, shape = _pair(case)
        x, y = _data((16,) + shape), _data((16, 3), seed=1)
        for model in models:
            model.compile(optimizer="adam", loss="mse")
        for _ in range(3):
            losses = [float(model.train_on_batch(x, y)) for model in models]
            np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
        evaluated = [model.evaluate(x, y, verbose=0) for model in models]
        np.testing.assert_allclose(evaluated[1], evaluated[0], rtol=1e-4)

    def _gradients(layer, x, dy):
        """d(sum(layer(x, training=True)·dy)) with respect to x and the trainable weights."""
        name = keras.backend.backend()
        if name == "jax":
            import jax
            import jax.numpy as jnp
            trainable = [v.value for v in layer.trainable_variables]
            frozen = [v.value for v in layer.non_trainable_variables]

            # stateless_call hands its keywords to call(): only batch norm takes training.
            training = ({"training": True} if isinstance(layer, keras.layers.BatchNormalization)
                        else {})

            def loss(trainable, x):
                y, _ = layer.stateless_call(trainable, frozen, x, **training)
                return jnp.vdot(y, dy)
            weights_grad, x_grad = jax.grad(loss, argnums=(0, 1))(trainable, jnp.asarray(x))
            return [x_grad] + list(weights_grad)
        if name == "tensorflow":
            import tensorflow as tf
            x = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=True) * dy)
            return tape.gradient(loss, [x] + [v.value for v in layer.trainable_variables])
        import torch
        x = torch.tensor(x, requires_grad=True)
        (layer(x, training=True) * torch.from_numpy(dy)).sum().backward()
        return [x.grad] + [v.value.grad for v in layer.trainable_variables]

    @pytest.mark.parametrize("axis", [-1, 1])
    def test_batch_norm_gradients_equal_bncpu_backward(axis):
        x, dy = _data((8, 4, 5, 3)), _data((8, 4, 5, 3), seed=1)
        layer = bk.BatchNormalization(axis=axis, gamma_initializer="random_normal",
                                      beta_initializer="random_normal")
        layer.build(x.shape)
        gamma, beta = (keras.ops.convert_to_numpy(v) for v in (layer.gamma, layer.beta))
        _, save_mean, save_invstd = bncpu.batch_norm_forward(x, gamma, beta, None, None, True,
                                                             0.1, layer.epsilon, axis=axis)
        expected = bncpu.batch_norm_backward(dy, x, gamma, None, None, save_mean, save_invstd,
                                             True, layer.epsilon, axis=axis)
        for got, want in zip(_gradients(layer, x, dy), expected):
            _close(got, want, rtol=1e-5, atol=1e-6)

    def test_layer_group_rms_gradients_equal_bncpu_backward():
        x, dy = _data((8, 6, 4)), _data((8, 6, 4), seed=1)
        layer = bk.LayerNormalization(gamma_initializer="random_normal")
        layer.build(x.shape)
        gamma = keras.ops.convert_to_numpy(layer.gamma)
        _, mean, rstd = bncpu.layer_norm_forward(x, 4, gamma, None, layer.epsilon)
        for got, want in zip(_gradients(layer, x, dy),
                             bncpu.layer_norm_backward(dy, x, 4, mean, rstd, gamma)):
            _close(got, want, rtol=1e-5, atol=1e-6)

        layer = bk.GroupNormalization(groups=2, gamma_initializer="random_normal")
        layer.build(x.shape)
        gamma = keras.ops.convert_to_numpy(layer.gamma)
        _, mean, rstd = bncpu.group_norm_forward(x, 2, gamma, None, layer.epsilon, axis=-1)
        for got, want in zip(_gradients(layer, x, dy),
                             bncpu.group_norm_backward(dy, x, 2, mean, rstd, gamma, axis=-1)):
            _close(got, want, rtol=1e-5, atol=1e-6)

        layer = bk.RMSNormalization()
        layer.build(x.shape)
        scale = keras.ops.convert_to_numpy(layer.scale)
        _, rstd = bncpu.rms_norm_forward(x, 4, scale, layer.epsilon)
        for got, want in zip(_gradients(layer, x, dy),
                             bncpu.rms_norm_backward(dy, x, 4, rstd, scale)):
            _close(got, want, rtol=1e-5, atol=1e-6)

    def test_trainable_false_batch_norm_runs_inference():
        x = _data((8, 5, 4))
        layer = bk.BatchNormalization(moving_mean_initializer="random_normal",
                                      moving_variance_initializer="ones")
        layer.build(x.shape)
        layer.trainable = False
        before = keras.ops.convert_to_numpy(layer.moving_mean)
        _close(layer(x, training=True), layer(x, training=False), rtol=0, atol=0)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.moving_mean), before)

    def test_serialization_both_ways(tmp_path):
        models, shape = _pair("batch_norm")
        x, y = _data((16,) + shape), _data((16, 3), seed=1)
        models[1].compile(optimizer="sgd", loss="mse")
        models[1].fit(x, y, epochs=1, verbose=0)
        expected = models[1].predict(x, verbose=0)
        # bncpu's .keras: load_model finds the registered class; Keras's model reads it.
        models[1].save(tmp_path / "bncpu.keras")
        loaded = keras.models.load_model(tmp_path / "bncpu.keras")
        assert type(loaded.layers[1]) is bk.BatchNormalization
        _close(loaded.predict(x, verbose=0), expected, rtol=0, atol=1e-6)
        models[0].load_weights(tmp_path / "bncpu.keras")
        _close(models[0].predict(x, verbose=0), expected, rtol=1e-5, atol=1e-5)
        # And back: Keras's weights file into bncpu's model.
        fresh = _model(bk.BatchNormalization, {}, shape, seed=3)
        models[0].save_weights(tmp_path / "keras.weights.h5")
        fresh.load_weights(tmp_path / "keras.weights.h5")
        for got, want in zip(fresh.get_weights(), models[0].get_weights()):
            np.testing.assert_array_equal(got, want)
        assert ([v.name for v in fresh.layers[1].weights]
                == [v.name for v in models[0].layers[1].weights]
                == ["gamma", "beta", "moving_mean", "moving_variance"])

    def test_convert_functional_model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 4))
        h = keras.layers.BatchNormalization(moving_mean_initializer="random_normal")(inputs)
        h = keras.layers.GroupNormalization(groups=2)(h)
        h = keras.layers.LayerNormalization()(h)
        h = keras.layers.RMSNormalization()(h)
        outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
        model = keras.Model(inputs, outputs)
        converted = bk.convert(model)
        kinds = [type(layer) for layer in converted.layers]
        for cls in (bk.BatchNormalization, bk.GroupNormalization, bk.LayerNormalization,
                    bk.RMSNormalization):
            assert cls in kinds
        assert not any(type(layer).__module__.startswith("bncpu") for layer in model.layers)
        x = _data((4, 6, 6, 4))
        _close(converted.predict(x, verbose=0), model.predict(x, verbose=0))
        with pytest.raises(TypeError, match="keras.Model"):
            bk.convert(keras.layers.Dense(2))

    def test_fallbacks_are_counted_and_match_keras():
        bk.reset_fallback_counts()
        x = _data((8, 5, 4))
        cases = [
            (dict(renorm=True), {}, "renorm"),
            ({}, dict(mask=np.ones((8, 5), bool)), "mask"),
        ]
        for kwargs, call_kwargs, reason in cases:
            ours, theirs = bk.BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
            _close(ours(x, training=True, **call_kwargs), theirs(x, training=True, **call_kwargs))
            assert bk.fallback_counts()[("BatchNormalization", reason)] == 1
        half = bk.LayerNormalization(dtype="float16")
        _close(half(x.astype(np.float16)),
               keras.layers.LayerNormalization(dtype="float16")(x.astype(np.float16)),
               rtol=1e-2, atol=1e-2)
        assert bk.fallback_counts()[("LayerNormalization", "dtype float16")] == 1
        # Axes 1 and 3 of 4-D input (Keras's torch path mishandles one non-trailing axis).
        x4 = _data((8, 5, 3, 4))
        middle = bk.LayerNormalization(axis=[1, 3])
        _close(middle(x4), keras.layers.LayerNormalization(axis=[1, 3])(x4))
        assert bk.fallback_counts()[("LayerNormalization", "axes not trailing")] == 1
        bk.reset_fallback_counts()
        assert bk.fallback_counts() == {}

    def test_tensorflow_auto_jit_picks_graph_mode():
        layer = bk.BatchNormalization()
        assert layer.supports_jit == (keras.backend.backend() != "tensorflow")

    def test_example_one_short_epoch():
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "keras_cnn_bn.py"), "--epochs", "1",
             "--samples", "256", "--backend", BACKEND],
            cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "time per epoch" in result.stdout
