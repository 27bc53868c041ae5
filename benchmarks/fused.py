"""Fused batch norm + (add +) ReLU: side-by-side timings against the report's fused targets.

    python benchmarks/fused.py                      # 2 threads, float32, both shapes
    python benchmarks/fused.py --threads 1,2 --rounds 30

For each shape every implementation of an operation is timed round-robin (one call of
each, then again), so a noisy neighbour slows them alike; each cell is the median over
the rounds, and every ratio is the median of the per-round ratios. Rows:

* bn+relu fwd train:      fused vs bncpu's batch norm alone (target <= 1.1x),
                          vs torch native_batch_norm + relu_ (target >= 4x)
* bn+add+relu fwd train:  fused vs torch native_batch_norm + add_ + relu_ (>= 4x)
* bn+relu fwd eval:       fused vs torch batch norm + relu_ (>= 1.8x), vs the streaming
                          floor y = a·x + b into a preallocated array (<= 1.1x)
* bn+relu bwd train:      fused vs torch threshold_backward + native_batch_norm_backward
                          (>= 2x)
* bn+add+relu bwd train:  the same with grad_residual written too (no target)

The "unfused" column is bncpu's batch norm followed by NumPy's add and ReLU
(np.maximum in place), to show what fusing saves. Needs PyTorch for the torch and floor
columns. Run it on a quiet machine: a loaded one slows the multi-threaded calls most.
"""
import argparse
import statistics
import sys
import time

import numpy as np

import bncpu
from bncpu.bench.machine import reuse_freed_memory

EPS = 1e-5
MOMENTUM = 0.1
SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56)]


def _relu_(array):
    return np.maximum(array, 0, out=array)


class Arrays:
    """The inputs of one shape, as NumPy arrays and (when torch is there) tensors sharing
    their memory."""

    def __init__(self, shape, dtype, torch):
        rng = np.random.default_rng(0)
        c = shape[1]
        self.x = rng.standard_normal(shape, dtype=np.float32).astype(dtype) + 0.5
        self.residual = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        self.dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        self.weight = rng.uniform(0.5, 1.5, c).astype(dtype)
        self.bias = rng.normal(size=c).astype(dtype)
        self.running_mean = np.zeros(c, dtype)
        self.running_var = np.ones(c, dtype)
        self.output, self.save_mean, self.save_invstd = bncpu.batch_norm_relu_forward(
            self.x, self.weight, self.bias, None, None, True, MOMENTUM, EPS)
        self.floor_out = np.empty_like(self.x)
        self.t = None if torch is None else {
            name: torch.from_numpy(getattr(self, name))
            for name in ("x", "residual", "dy", "weight", "bias", "running_mean", "running_var",
                         "output", "save_mean", "save_invstd", "floor_out")}


def operations(a, torch):
    """{row: {implementation: call}}; the first implementation is the fused one."""
    w, b, rm, rv = a.weight, a.bias, a.running_mean, a.running_var
    ops = {
        "bn+relu fwd train": {
            "fused": lambda: bncpu.batch_norm_relu_forward(a.x, w, b, rm, rv, True, MOMENTUM, EPS),
            "bn alone": lambda: bncpu.batch_norm_forward(a.x, w, b, rm, rv, True, MOMENTUM, EPS),
            "unfused": lambda: _relu_(bncpu.batch_norm_forward(a.x, w, b, rm, rv, True,
                                                               MOMENTUM, EPS)[0]),
        },
        "bn+add+relu fwd train": {
            "fused": lambda: bncpu.batch_norm_relu_forward(a.x, w, b, rm, rv, True, MOMENTUM,
                                                           EPS, residual=a.residual),
            "bn alone": lambda: bncpu.batch_norm_forward(a.x, w, b, rm, rv, True, MOMENTUM, EPS),
            "unfused": lambda: _relu_(np.add(bncpu.batch_norm_forward(
                a.x, w, b, rm, rv, True, MOMENTUM, EPS)[0], a.residual)),
        },
        "bn+relu fwd eval": {
            "fused": lambda: bncpu.batch_norm_relu(a.x, rm, rv, w, b),
            "bn alone": lambda: bncpu.batch_norm(a.x, rm, rv, w, b),
            "unfused": lambda: _relu_(bncpu.batch_norm(a.x, rm, rv, w, b)),
        },
        "bn+relu bwd train": {
            "fused": lambda: bncpu.batch_norm_relu_backward(
                a.dy, a.output, a.x, w, rm, rv, a.save_mean, a.save_invstd, True, EPS),
            "bn alone": lambda: bncpu.batch_norm_backward(
                a.dy, a.x, w, rm, rv, a.save_mean, a.save_invstd, True, EPS),
            "unfused": lambda: bncpu.batch_norm_backward(
                np.where(a.output <= 0, 0, a.dy), a.x, w, rm, rv, a.save_mean, a.save_invstd,
                True, EPS),
        },
        "bn+add+relu bwd train": {
            "fused": lambda: bncpu.batch_norm_relu_backward(
                a.dy, a.output, a.x, w, rm, rv, a.save_mean, a.save_invstd, True, EPS,
                residual_grad=True),
            "bn alone": lambda: bncpu.batch_norm_backward(
                a.dy, a.x, w, rm, rv, a.save_mean, a.save_invstd, True, EPS),
        },
    }
    if torch is not None:
        t = a.t
        aten = torch.ops.aten
        bn = aten.native_batch_norm.default
        ops["bn+relu fwd train"]["torch"] = lambda: bn(
            t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], True,
            MOMENTUM, EPS)[0].relu_()
        ops["bn+add+relu fwd train"]["torch"] = lambda: bn(
            t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], True,
            MOMENTUM, EPS)[0].add_(t["residual"]).relu_()
        ops["bn+relu fwd eval"]["torch"] = lambda: bn(
            t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], False,
            MOMENTUM, EPS)[0].relu_()
        # The streaming floor: one pass reading x and writing y, y = a·x + b.
        ops["bn+relu fwd eval"]["floor"] = lambda: torch.add(0.5, t["x"], alpha=1.5,
                                                             out=t["floor_out"])

        def torch_backward(residual_grad):
            def run():
                grad = aten.threshold_backward.default(t["dy"], t["output"], 0)
                return aten.native_batch_norm_backward.default(
                    grad, t["x"], t["weight"], t["running_mean"], t["running_var"],
                    t["save_mean"], t["save_invstd"], True, EPS, [True] * 3) + (
                    (grad,) if residual_grad else ())
            return run
        ops["bn+relu bwd train"]["torch"] = torch_backward(False)
        ops["bn+add+relu bwd train"]["torch"] = torch_backward(True)
    return ops


# The fused kernels' targets: (row, other implementation, bound on other/fused or fused/other).
TARGETS = [
    ("bn+relu fwd train", "bn alone", "fused/bn alone <= 1.1"),
    ("bn+relu fwd train", "torch", "torch/fused >= 4"),
    ("bn+add+relu fwd train", "torch", "torch/fused >= 4"),
    ("bn+relu fwd eval", "torch", "torch/fused >= 1.8"),
    ("bn+relu fwd eval", "floor", "fused/floor <= 1.1"),
    ("bn+relu bwd train", "torch", "torch/fused >= 2"),
]


def time_row(calls, rounds):
    """{implementation: per-round seconds}, round-robin after one warm-up call each."""
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return samples


def ratio(samples, numerator, denominator):
    return statistics.median(n / d for n, d in zip(samples[numerator], samples[denominator]))


def target_check(spec, samples):
    left, bound = spec.split(" <= ") if " <= " in spec else spec.split(" >= ")
    value = ratio(samples, *left.split("/"))
    ok = value <= float(bound) if " <= " in spec else value >= float(bound)
    return f"{spec}: {value:.2f} {'ok' if ok else 'MISS'}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: no torch or floor columns", file=sys.stderr)
    reuse_freed_memory()
    print(f"bncpu {bncpu.__version__} ({bncpu.isa()}), "
          f"torch {torch.__version__ if torch else 'absent'}; median of {args.rounds} rounds "
          f"(ratios: median of per-round ratios)")
    for n_threads in (int(t) for t in args.threads.split(",")):
        bncpu.set_num_threads(n_threads)
        if torch is not None:
            torch.set_num_threads(n_threads)
        for shape in SHAPES:
            arrays = Arrays(shape, np.dtype(args.dtype), torch)
            print(f"\n{shape} {args.dtype}, {n_threads} threads")
            for row, calls in operations(arrays, torch).items():
                samples = time_row(calls, args.rounds)
                cells = "  ".join(f"{name} {statistics.median(s) * 1e3:7.2f} ms"
                                  for name, s in samples.items())
                print(f"  {row:23s} {cells}")
                for target_row, other, spec in TARGETS:
                    if target_row == row and other in samples:
                        print(f"  {'':23s}   {target_check(spec, samples)}")
    bncpu.set_num_threads(0)


if __name__ == "__main__":
    main()
