"""Forward + backward of one batch-norm layer in training, float32, channels-last
(32, 56, 56, 64), per Keras backend: bncpu.keras's layer against Keras's own (and on the
torch backend against bncpu.torch's module), measured side by side in one process per
backend, alternating the contenders, medians of the repetitions.

    python benchmarks/keras_jax.py                      # every installed backend
    python benchmarks/keras_jax.py --backend jax --repeats 31
    python benchmarks/keras_jax.py --example            # also the Keras CNN's epoch time

Targets: jax >= 2x Keras's layer, tensorflow >= 1.5x Keras's layer (compiled as
``jit_compile="auto"`` compiles it: XLA for Keras's layer, a graph for bncpu's), torch
no slower than bncpu.torch's BatchNorm2d on the same (channels-last) memory. The load
average (/proc/loadavg) is printed with the figures: on a shared machine they are only
comparable within one run.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SHAPE = (32, 56, 56, 64)
EPSILON = 1e-3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "n/a"


def _jax_steps(keras, layers, x, dy):
    """The speed report's Keras row (bncpu/bench/frameworks.py): each layer's training
    step through ``stateless_call`` under ``jax.jit(jax.grad(...))``."""
    import jax
    from bncpu.bench import frameworks
    device = jax.devices("cpu")[0]
    args = {"input": x, "axis": -1, "momentum": 1.0 - layers["keras"].momentum,
            "eps": layers["keras"].epsilon, "weight": np.ones(SHAPE[-1], np.float32),
            "bias": np.zeros(SHAPE[-1], np.float32),
            "running_mean": np.zeros(SHAPE[-1], np.float32),
            "running_var": np.ones(SHAPE[-1], np.float32)}
    return {name: frameworks.keras_step(type(layer), args, dy, device)
            for name, layer in layers.items()}


def _tensorflow_steps(keras, layers, x, dy):
    import tensorflow as tf
    xt, dyt = tf.constant(x), tf.constant(dy)
    steps = {}
    for name, layer in layers.items():
        def step(layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(xt)
                loss = tf.reduce_sum(layer(xt, training=True) * dyt)
            return tape.gradient(loss, [xt] + layer.trainable_variables)
        # What jit_compile="auto" does: XLA when every layer supports it, else a graph.
        steps[name] = tf.function(step, jit_compile=layer.supports_jit)
        if layer.supports_jit:
            steps[name + " (graph)"] = tf.function(step, jit_compile=False)
    return steps


def _torch_steps(keras, layers, x, dy):
    import torch
    import bncpu.torch
    steps = {}
    dyt = torch.from_numpy(dy)
    for name, layer in layers.items():
        def step(layer=layer):
            xt = torch.from_numpy(x).requires_grad_()
            (layer(xt, training=True) * dyt).sum().backward()
            return xt.grad
        steps[name] = step
    # bncpu.torch's module on the same memory: an NCHW view of the NHWC data.
    module = bncpu.torch.BatchNorm2d(SHAPE[-1], eps=EPSILON, momentum=0.01)
    dy_nchw = dyt.permute(0, 3, 1, 2)

    def module_step():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
        (module(xt) * dy_nchw).sum().backward()
        return xt.grad
    steps["bncpu.torch BatchNorm2d"] = module_step
    return steps


def run_backend(repeats):
    import keras
    import bncpu
    import bncpu.keras
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    layers = {"keras": keras.layers.BatchNormalization(),
              "bncpu.keras": bncpu.keras.BatchNormalization()}
    for layer in layers.values():
        layer.build(SHAPE)
    make = {"jax": _jax_steps, "tensorflow": _tensorflow_steps, "torch": _torch_steps}[backend]
    steps = make(keras, layers, x, dy)
    for step in steps.values():   # compile, warm the caches
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"backend {backend}: BatchNormalization forward+backward, training, float32 {SHAPE} "
          f"channels-last, bncpu threads {bncpu.get_num_threads()}, {repeats} repeats, "
          f"load {_load()}")
    ours = medians["bncpu.keras"]
    for name, median in medians.items():
        spread = f"[{min(times[name]):.1f}, {max(times[name]):.1f}]"
        print(f"  {name:<26} median {median:8.2f} ms {spread:>18}   bncpu.keras is "
              f"{median / ours:.2f}x faster")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["jax", "tensorflow", "torch"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--example", action="store_true",
                        help="also run examples/keras_cnn_bn.py (3 epochs) per backend")
    args = parser.parse_args()
    if args.backend and os.environ.get("KERAS_BACKEND") == args.backend:
        run_backend(args.repeats)
        return
    backends = [args.backend] if args.backend else ["jax", "tensorflow", "torch"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for backend in backends:
        env["KERAS_BACKEND"] = backend
        subprocess.run([sys.executable, os.path.abspath(__file__), "--backend", backend,
                        "--repeats", str(args.repeats)], env=env, check=False, timeout=900)
        if args.example:
            result = subprocess.run(
                [sys.executable, os.path.join(ROOT, "examples", "keras_cnn_bn.py"), "--backend",
                 backend, "--epochs", "3"], env=env, capture_output=True, text=True,
                timeout=900)
            lines = [line for line in result.stdout.splitlines() if "time per epoch" in line]
            print(f"  example, {backend}: " + (lines[0] if lines else result.stderr[-2000:])
                  + f" (load {_load()})")


if __name__ == "__main__":
    main()
