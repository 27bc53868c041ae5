"""Per-call cost on small inputs, in CPU time of one thread (medians, round-robin).

Rows:
* the NumPy API's batch norm on (4, 32, 8, 8) float32 (training forward, inference,
  backward) beside the bare kernel wrapper on the same arrays: the difference is what
  the Python layer costs;
* torch modules' forward + backward through autograd on small inputs: bncpu.torch's
  BatchNorm2d (training and eval), LayerNorm and GroupNorm against torch.nn's own;
* one SGD training step of examples/lenet_bn.py's LeNet on a synthetic Fashion-MNIST-sized
  batch (256, 1, 28, 28): torch.nn's batch norms against ``bncpu.torch.convert``'s.

Each figure is the median over ``--samples`` samples, each a loop of calls of at least
``--min-ms`` of CPU time; the implementations of a row alternate, so load on a shared
machine slows them alike. /proc/loadavg is printed before and after.

glibc hands blocks above its mmap threshold back to the system when they are freed, so a
LeNet step's time also depends on how many of its megabyte buffers fault their pages in
again: measured here, 450 to 3,150 faults per step and up to 25% of the step, differing
from process to process and between two models in one process. The script therefore
keeps freed blocks in the heap (``mallopt``) unless ``--default-malloc`` is given, and
reports the faults per call.

    OMP_NUM_THREADS=1 python benchmarks/small_calls.py
"""
import argparse
import copy
import ctypes
import importlib.util
import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

import bncpu
import bncpu.torch as bt
from bncpu._ops import batch_norm as kernels

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def keep_freed_blocks():
    """Whether glibc now keeps freed blocks up to 32 MB in the heap (no munmap, no trim):
    see the module's docstring."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, limit = -1, -3, 32 << 20
    return bool(libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, limit))


def page_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_robin(functions, samples, min_seconds, faults=None):
    """{name: median CPU seconds per call}, one sample of each function in turn; with a
    dict ``faults``, also the median page faults per call there."""
    clock = time.thread_time
    loops = {}
    for name, function in functions.items():
        function()
        start, count = clock(), 0
        while clock() - start < min_seconds:
            function()
            count += 1
        loops[name] = max(count, 1)
    times = {name: [] for name in functions}
    faulted = {name: [] for name in functions}
    for _ in range(samples):
        for name, function in functions.items():
            first_fault, start = page_faults(), clock()
            for _ in range(loops[name]):
                function()
            times[name].append((clock() - start) / loops[name])
            faulted[name].append((page_faults() - first_fault) / loops[name])
    if faults is not None:
        faults.update({name: statistics.median(values) for name, values in faulted.items()})
    return {name: statistics.median(values) for name, values in times.items()}


def show(title, medians, pairs=()):
    print(f"\n{title}")
    for name, seconds in medians.items():
        print(f"  {name:40s} {seconds * 1e6:8.2f} us")
    for ours, theirs in pairs:
        print(f"  {ours} / {theirs}: {medians[ours] / medians[theirs]:.2f}x")


def numpy_rows(samples, min_seconds):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 8, 8), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    c = x.shape[1]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    mean, invstd = np.empty(c, np.float32), np.empty(c, np.float32)
    grad_w, grad_b = np.empty(c, np.float32), np.empty(c, np.float32)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), True,
                                                         0.1, 1e-5)
    functions = {
        "batch_norm training": lambda: bncpu.batch_norm(x, rm, rv, w, b, training=True),
        "kernel forward_train": lambda: kernels.forward_train(
            x, y, 4, c, 64, w, b, rm, rv, 0.1, 1e-5, mean, invstd, True),
        "batch_norm eval": lambda: bncpu.batch_norm(x, rm, rv, w, b),
        "kernel forward_eval": lambda: kernels.forward_eval(x, y, 4, c, 64, w, b, rm, rv,
                                                            1e-5),
        "batch_norm_backward": lambda: bncpu.batch_norm_backward(
            dy, x, w, None, None, save_mean, save_invstd, True, 1e-5),
        "kernel backward": lambda: kernels.backward(
            dy, x, dx, 4, c, 64, w, None, None, save_mean, save_invstd, True, 1e-5, grad_w,
            grad_b),
    }
    show("NumPy API, (4, 32, 8, 8) float32", round_robin(functions, samples, min_seconds))


def module_step(module, x):
    def step():
        module(x).sum().backward()
    return step


def module_rows(samples, min_seconds):
    torch.manual_seed(0)
    cases = [
        ("BatchNorm2d train (4,32,8,8)", lambda: nn.BatchNorm2d(32), bt.BatchNorm2d,
         (4, 32, 8, 8), True),
        ("BatchNorm2d eval (4,32,8,8)", lambda: nn.BatchNorm2d(32), bt.BatchNorm2d,
         (4, 32, 8, 8), False),
        ("LayerNorm (64,128)", lambda: nn.LayerNorm(128), bt.LayerNorm, (64, 128), True),
        ("GroupNorm (4,32,8,8) 8 groups", lambda: nn.GroupNorm(8, 32), bt.GroupNorm,
         (4, 32, 8, 8), True),
    ]
    for title, make, ours, shape, training in cases:
        x = torch.randn(shape, requires_grad=True)
        theirs_module = make().train(training)
        ours_module = make().train(training)
        ours_module.__class__ = ours
        functions = {"torch": module_step(theirs_module, x),
                     "bncpu.torch": module_step(ours_module, x)}
        show(f"module forward + backward, {title}",
             round_robin(functions, samples, min_seconds), [("bncpu.torch", "torch")])


def lenet_rows(samples, min_seconds, batch_size=256):
    spec = importlib.util.spec_from_file_location("lenet_bn",
                                                  os.path.join(EXAMPLES, "lenet_bn.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    x = torch.rand(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    model = example.lenet()
    loss_function = nn.CrossEntropyLoss()

    def training_step(network):
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

        def step():
            optimizer.zero_grad()
            loss_function(network(x), y).backward()
            optimizer.step()
        return step

    functions = {"torch": training_step(copy.deepcopy(model)),
                 "bncpu.torch": training_step(bt.convert(model))}
    faults = {}
    show(f"LeNet-BN training step, batch ({batch_size}, 1, 28, 28)",
         round_robin(functions, samples, min_seconds, faults), [("bncpu.torch", "torch")])
    print("  page faults per step: " + ", ".join(f"{name} {count:.0f}"
                                                 for name, count in faults.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--min-ms", type=float, default=60.0)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's mmap and trim thresholds as they are")
    parser.add_argument("--only", choices=("numpy", "modules", "lenet"), action="append",
                        help="run only this part (repeatable; default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bncpu.set_num_threads(1)
    kept = not args.default_malloc and keep_freed_blocks()
    print(f"loadavg {loadavg()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"freed blocks kept in the heap: {kept}")
    parts = {"numpy": numpy_rows, "modules": module_rows, "lenet": lenet_rows}
    for name in args.only or parts:
        parts[name](args.samples, args.min_ms / 1e3)
    print(f"\nloadavg {loadavg()}")


if __name__ == "__main__":
    main()
