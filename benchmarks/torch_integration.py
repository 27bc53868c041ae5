"""What bncpu.torch costs and gains inside PyTorch (float32, a set thread count).

1. Per-call overhead: ``bncpu.torch.batch_norm`` / ``layer_norm`` on tiny tensors against
   the direct ``bncpu`` call on NumPy views of the same memory (forward; and forward +
   backward through autograd against the direct forward + backward calls).
2. A module's forward + backward through autograd on (32, 64, 56, 56), NCHW and
   channels_last: ``bncpu.torch.BatchNorm2d`` (and the fused ``BatchNormReLU2d``) against
   ``torch.nn.BatchNorm2d`` (+ ReLU), with a streaming floor (one pass forward, one
   backward).
3. One training step (forward, backward, SGD) of a ResNet basic block at (32, 64, 56, 56)
   (conv-BN-ReLU-conv-BN-add-ReLU): torch, ``convert``-ed, and with the second batch norm,
   the add and the ReLU fused (``bncpu.torch.batch_norm_relu(..., residual=x)``); the
   share of the step the norms take, from one profiled step of each.

Implementations run round-robin (one sample of each in turn), so a noisy neighbour slows
all alike; each figure is the median over the samples. On a machine shared with other
work the absolute times drift: compare the ratios, and rerun on an idle machine.

    python benchmarks/torch_integration.py --threads 2
    python benchmarks/torch_integration.py --threads 2 --samples 5 --block-steps 2   # quicker
    python benchmarks/torch_integration.py --only overhead --samples 41 --cpu-clock
"""
import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

import bncpu
import bncpu.torch as bt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch and bncpu threads (2)")
    parser.add_argument("--samples", type=int, default=15, help="samples per figure (15)")
    parser.add_argument("--block-steps", type=int, default=5,
                        help="timed training steps per ResNet-block variant (5)")
    parser.add_argument("--only", choices=("overhead", "module", "block"), action="append",
                        help="run only this part (repeatable; default: all three)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time the per-call overhead in CPU time of the calling thread "
                             "(tiny inputs run on it alone), not wall time: on a busy "
                             "machine, time spent descheduled is left out")
    parser.add_argument("--json", metavar="PATH", help="write every sample as JSON")
    return parser.parse_args(argv)


def round_robin(functions, samples, min_seconds=0.0, warmup=1, clock=time.perf_counter):
    """{name: [seconds per call]} with one sample of each function in turn; a sample
    loops a function until it lasts ``min_seconds``."""
    loops = {}
    for name, function in functions.items():
        for _ in range(warmup):
            function()
        start, count = clock(), 0
        while True:
            function()
            count += 1
            if clock() - start >= min_seconds:
                break
        loops[name] = count
    times = {name: [] for name in functions}
    for _ in range(samples):
        for name, function in functions.items():
            start = clock()
            for _ in range(loops[name]):
                function()
            times[name].append((clock() - start) / loops[name])
    return times


def median(values):
    return statistics.median(values)


def show(title, times, baseline=None, unit=1e-6, unit_name="us"):
    print(f"\n{title}")
    base = median(times[baseline]) if baseline else None
    for name, values in times.items():
        line = f"  {name:44s} {median(values) / unit:10.1f} {unit_name}"
        if base is not None and name != baseline:
            line += f"   {base / median(values):5.2f}x vs {baseline}"
        print(line)


# ----------------------------------------------------------------------------------
# 1. Per-call overhead
# ----------------------------------------------------------------------------------
def overhead(samples, clock=time.perf_counter):
    x = torch.randn(2, 3, 4, 4)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    xn, wn, bn, rmn, rvn = (t.numpy() for t in (x, weight, bias, running_mean, running_var))
    dy = torch.randn_like(x)
    dyn = dy.numpy()
    rows = torch.randn(8, 32)
    rows_weight, rows_bias = torch.ones(32), torch.zeros(32)
    rows_n, rwn, rbn = rows.numpy(), rows_weight.numpy(), rows_bias.numpy()
    x_grad = x.clone().requires_grad_(True)

    def direct_train_fwd_bwd():
        _, mean, invstd = bncpu.batch_norm_forward(xn, wn, bn, rmn, rvn, True, 0.1, 1e-5)
        bncpu.batch_norm_backward(dyn, xn, wn, None, None, mean, invstd, True, 1e-5)

    def bncpu_torch_train_fwd_bwd():
        bt.batch_norm(x_grad, running_mean, running_var, weight, bias, True).backward(dy)

    def torch_train_fwd_bwd():
        torch.nn.functional.batch_norm(x_grad, running_mean, running_var, weight, bias,
                                       True).backward(dy)

    functions = {
        "bncpu.batch_norm_forward, train": lambda: bncpu.batch_norm_forward(
            xn, wn, bn, rmn, rvn, True, 0.1, 1e-5),
        "bncpu.torch.batch_norm, train": lambda: bt.batch_norm(
            x, running_mean, running_var, weight, bias, True),
        "bncpu.batch_norm_forward, eval": lambda: bncpu.batch_norm_forward(
            xn, wn, bn, rmn, rvn, False, 0.1, 1e-5),
        "bncpu.torch.batch_norm, eval": lambda: bt.batch_norm(
            x, running_mean, running_var, weight, bias, False),
        "bncpu.layer_norm_forward": lambda: bncpu.layer_norm_forward(rows_n, (32,), rwn, rbn,
                                                                     1e-5),
        "bncpu.torch.layer_norm": lambda: bt.layer_norm(rows, (32,), rows_weight, rows_bias),
        "bncpu fwd+bwd, train": direct_train_fwd_bwd,
        "bncpu.torch fwd+bwd (autograd), train": bncpu_torch_train_fwd_bwd,
        "torch.nn.functional.batch_norm, train": lambda: torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, True),
        "torch.nn.functional fwd+bwd (autograd), train": torch_train_fwd_bwd,
    }
    times = round_robin(functions, samples, min_seconds=0.01, clock=clock)
    clock_name = "wall clock" if clock is time.perf_counter else "CPU time of the calling thread"
    show(f"Per-call overhead, tiny inputs (2, 3, 4, 4) and (8, 32), float32 ({clock_name})",
         times)
    pairs = [("bncpu.torch.batch_norm, train", "bncpu.batch_norm_forward, train"),
             ("bncpu.torch.batch_norm, eval", "bncpu.batch_norm_forward, eval"),
             ("bncpu.torch.layer_norm", "bncpu.layer_norm_forward"),
             ("bncpu.torch fwd+bwd (autograd), train", "bncpu fwd+bwd, train")]
    print("  overhead of the integration (median difference):")
    for ours, direct in pairs:
        print(f"    {ours:44s} {(median(times[ours]) - median(times[direct])) * 1e6:8.1f} us")
    return times


# ----------------------------------------------------------------------------------
# 2. Module forward + backward
# ----------------------------------------------------------------------------------
def module_fwd_bwd(samples, shape=(32, 64, 56, 56)):
    results = {}
    for layout in ("NCHW", "channels_last"):
        memory_format = (torch.channels_last if layout == "channels_last"
                         else torch.contiguous_format)
        x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_(True)
        dy = torch.randn(shape).contiguous(memory_format=memory_format)
        torch_bn = nn.BatchNorm2d(shape[1])
        ours = bt.convert(torch_bn)
        fused = bt.convert(nn.Sequential(nn.BatchNorm2d(shape[1]), nn.ReLU()), fuse=True)
        y_floor, dx_floor = torch.empty_like(x), torch.empty_like(x)
        xd = x.detach()

        def step(module):
            def run():
                x.grad = None
                module(x).backward(dy)
            return run

        def floor():
            torch.add(xd, 1.0, out=y_floor)
            torch.add(dy, xd, out=dx_floor)

        functions = {"torch nn.BatchNorm2d": step(torch_bn),
                     "bncpu.torch BatchNorm2d": step(ours),
                     "torch nn.BatchNorm2d + nn.ReLU": step(nn.Sequential(torch_bn, nn.ReLU())),
                     "bncpu.torch BatchNormReLU2d (fused)": step(fused),
                     "floor (one pass fwd, one bwd)": floor}
        times = round_robin(functions, samples)
        show(f"Module forward + backward, {shape} float32, {layout}", times,
             baseline="torch nn.BatchNorm2d", unit=1e-3, unit_name="ms")
        speedup = (median(times["torch nn.BatchNorm2d + nn.ReLU"])
                   / median(times["bncpu.torch BatchNormReLU2d (fused)"]))
        print(f"  fused vs torch BN + ReLU: {speedup:.2f}x")
        results[layout] = times
    return results


# ----------------------------------------------------------------------------------
# 3. ResNet basic block, one training step
# ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN-(+x)-ReLU, 64 channels."""

    def __init__(self, channels=64):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class FusedBasicBlock(BasicBlock):
    """The same block with bn1+ReLU and bn2+add+ReLU each one bncpu call."""

    def forward(self, x):
        bn1, bn2 = self.bn1, self.bn2
        y = bt.batch_norm_relu(self.conv1(x), bn1.running_mean, bn1.running_var, bn1.weight,
                               bn1.bias, True, bn1.momentum, bn1.eps)
        return bt.batch_norm_relu(self.conv2(y), bn2.running_mean, bn2.running_var,
                                  bn2.weight, bn2.bias, True, bn2.momentum, bn2.eps, residual=x)


NORM_EVENTS = ("aten::native_batch_norm", "aten::native_batch_norm_backward",
               "bncpu::batch_norm_forward", "bncpu::batch_norm_backward",
               "bncpu::batch_norm_relu_forward", "bncpu::batch_norm_relu_backward")
RELU_ADD_EVENTS = ("aten::relu", "aten::threshold_backward", "aten::add")


def block_step(block_steps, shape=(32, 64, 56, 56)):
    torch.manual_seed(0)
    base = BasicBlock(shape[1])
    variants = {"torch": base, "bncpu.torch convert": bt.convert(base)}
    fused = FusedBasicBlock(shape[1])
    fused.load_state_dict(base.state_dict())
    variants["bncpu.torch fused (BN+ReLU, BN+add+ReLU)"] = fused
    x = torch.randn(shape)
    dy = torch.randn(shape)
    steps = {}
    for name, block in variants.items():
        optimizer = torch.optim.SGD(block.parameters(), lr=0.01)

        def step(block=block, optimizer=optimizer):
            optimizer.zero_grad()
            block(x).backward(dy)
            optimizer.step()
        steps[name] = step
    times = round_robin(steps, block_steps, warmup=1)
    show(f"ResNet basic block, one training step (forward, backward, SGD), {shape} float32",
         times, baseline="torch", unit=1e-3, unit_name="ms")
    shares = {}
    for name, step in steps.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            step()
        events = {event.key: event.cpu_time_total for event in profile.key_averages()}
        total = sum(event.self_cpu_time_total for event in profile.key_averages())
        norms = sum(events.get(key, 0) for key in NORM_EVENTS)
        relu_add = sum(events.get(key, 0) for key in RELU_ADD_EVENTS)
        shares[name] = dict(norms=norms / total, relu_add=relu_add / total,
                            norms_ms=norms / 1e3, profiled_ms=total / 1e3)
        print(f"  {name:44s} norms {norms / 1e3:8.1f} ms = {100 * norms / total:4.1f}% of the "
              f"profiled step ({total / 1e3:.0f} ms); relu/add {100 * relu_add / total:4.1f}%")
    return times, shares


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bncpu.set_num_threads(args.threads)
    load = None
    try:
        load = open("/proc/loadavg").read().split()[0]
    except OSError:
        pass
    print(f"bncpu {bncpu.__version__} ({bncpu.isa()}), torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, "
          f"load average {load}")
    report = {"threads": args.threads, "load_average": load}
    parts = args.only or ("overhead", "module", "block")
    if "overhead" in parts:
        report["overhead"] = overhead(
            args.samples, time.thread_time if args.cpu_clock else time.perf_counter)
    if "module" in parts:
        report["module"] = module_fwd_bwd(args.samples)
    if "block" in parts:
        report["block"], report["block_shares"] = block_step(args.block_steps)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
