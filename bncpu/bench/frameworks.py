"""The report's Keras and JAX rows: one training step (forward + backward) of batch norm,
bncpu inside the framework against the framework's own, when the framework imports.

``jax``    ``jax.jit(jax.grad(...))`` of ``bncpu.jax.batch_norm`` against the same loss on
           batch norm written with ``jax.numpy`` (XLA fuses it);
``keras``  ``bncpu.keras.BatchNormalization`` against ``keras.layers.BatchNormalization``
           on the jax backend, both through the layer's ``stateless_call`` under
           ``jax.jit(jax.grad(...))``.

A step's loss is ``vdot(y, dy)``: its gradients are the backward of ``dy``, and both
sides return the new running statistics as well. Each call is compiled and run once
before it is handed out, so that the report's calibration times the step, not XLA's
compiler.

Keras picks its backend once per process, when it is imported (``KERAS_BACKEND``). The
report imports it with the jax backend when nothing has imported it yet; a process where
Keras already runs another backend gets no Keras rows (benchmarks/keras_jax.py times the
tensorflow and torch backends, a child process each).
"""
import os
import sys
import time

from bncpu.bench import timing
from bncpu.bench.timing import Unavailable

# The implementation a framework row compares bncpu with, and its name in the table.
STOCK = {"jax": "jnp batch norm (XLA)", "keras": "keras.layers.BatchNormalization"}


def _import_jax():
    import jax
    import bncpu.jax   # noqa: F401  (ImportError when its XLA FFI handler is not built)
    return jax


def _import_keras():
    """Keras on the jax backend, importing it so when no one has yet."""
    if "keras" not in sys.modules:
        before = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = "jax"
        try:
            import keras
        finally:
            if before is None:
                del os.environ["KERAS_BACKEND"]
            else:
                os.environ["KERAS_BACKEND"] = before
    import keras
    backend = keras.backend.backend()
    if backend != "jax":
        raise Unavailable(f"Keras already runs the {backend} backend in this process")
    import bncpu.keras   # noqa: F401
    return keras


def missing(framework):
    """Why ``framework`` ('jax' or 'keras') cannot be timed here, or None."""
    try:
        _import_jax()
        if framework == "keras":
            _import_keras()
    except (ImportError, Unavailable) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def versions():
    """{package: version} of the frameworks that imported."""
    found = {}
    for name in ("jax", "keras"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__version__", None):
            found[name] = module.__version__
    return found


def _channel_axes(ndim, axis):
    return tuple(d for d in range(ndim) if d != axis % ndim)


def _jnp_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, axis):
    """Batch norm in training as a jax.numpy program, with bncpu.jax's rules (running
    variance updated with the unbiased batch variance)."""
    import jax.numpy as jnp
    from jax import lax
    axes = _channel_axes(x.ndim, axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = jnp.mean(x, axis=axes)
    var = jnp.var(x, axis=axes)
    scale = lax.rsqrt(var + eps) * weight
    y = (x - mean.reshape(shape)) * scale.reshape(shape) + bias.reshape(shape)
    n = x.size // x.shape[axis]
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * (n / (n - 1))
    return y, new_mean, new_var


def _bncpu_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, axis):
    import bncpu.jax
    return bncpu.jax.batch_norm(x, running_mean, running_var, weight, bias, True, momentum,
                                eps, axis=axis)


def _jax_step(batch_norm, args, dy, device):
    """The jitted step of ``batch_norm`` on ``args``: gradients for x, weight and bias,
    and the new running statistics."""
    jax = _import_jax()
    import jax.numpy as jnp
    axis, momentum, eps = args.get("axis", 1), args["momentum"], args["eps"]

    def loss(x, weight, bias, running_mean, running_var, dy):
        y, new_mean, new_var = batch_norm(x, running_mean, running_var, weight, bias,
                                          momentum, eps, axis)
        return jnp.vdot(y, dy), (new_mean, new_var)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    operands = [jax.device_put(args[name], device) for name in
                ("input", "weight", "bias", "running_mean", "running_var")]
    operands.append(jax.device_put(dy, device))
    return lambda: jax.block_until_ready(grad(*operands))


def keras_step(layer_class, args, dy, device):
    """The jitted step of a Keras batch-norm layer built for ``args``'s input, its
    weights and moving statistics the arguments': gradients for its trainable weights
    and x, and its new moving statistics (also benchmarks/keras_jax.py's jax step)."""
    jax = _import_jax()
    import jax.numpy as jnp
    x = args["input"]
    layer = layer_class(axis=args.get("axis", 1), momentum=1.0 - args["momentum"],
                        epsilon=args["eps"])
    layer.build(x.shape)
    values = {"gamma": args["weight"], "beta": args["bias"],
              "moving_mean": args["running_mean"], "moving_variance": args["running_var"]}
    trainable = [jax.device_put(values[v.name], device) for v in layer.trainable_variables]
    frozen = [jax.device_put(values[v.name], device) for v in layer.non_trainable_variables]

    def loss(trainable, frozen, x, dy):
        y, frozen = layer.stateless_call(trainable, frozen, x, training=True)
        return jnp.vdot(y, dy), frozen
    grad = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
    xj, dyj = jax.device_put(x, device), jax.device_put(dy, device)
    return lambda: jax.block_until_ready(grad(trainable, frozen, xj, dyj))


def implementation_call(inputs, implementation, framework):
    """The zero-argument step of ``implementation`` ('bncpu' or 'stock') for a framework
    row, compiled and run once; ``Unavailable`` for the report's other implementations."""
    if implementation not in ("bncpu", "stock"):
        raise Unavailable(f"a {framework} row compares bncpu with {STOCK[framework]}")
    reason = missing(framework)
    if reason is not None:
        raise Unavailable(reason)
    if timing.clock is time.thread_time:
        # XLA runs a step on its own threads, off the calling thread's CPU clock.
        raise Unavailable("--cpu-clock: XLA runs the step off the calling thread's clock")
    jax = _import_jax()
    device = jax.devices("cpu")[0]
    args, dy = inputs.args, inputs.grad_output
    if framework == "jax":
        batch_norm = _bncpu_batch_norm if implementation == "bncpu" else _jnp_batch_norm
        step = _jax_step(batch_norm, args, dy, device)
    else:
        keras = _import_keras()
        import bncpu.keras
        layer_class = (bncpu.keras.BatchNormalization if implementation == "bncpu"
                       else keras.layers.BatchNormalization)
        step = keras_step(layer_class, args, dy, device)
    step()   # compile
    return step
