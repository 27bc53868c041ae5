"""bfloat16 and float16 batch norm against float32, and against torch's bfloat16.

On (32, 64, 56, 56) (--shape), at --threads threads (bncpu.set_num_threads and
torch.set_num_threads), in one process: bncpu's training forward, inference forward and
training backward (bncpu.batch_norm_forward / batch_norm_backward, the NumPy API a user
calls) on float32, bfloat16 and float16 data, and torch's F.batch_norm forward (training,
inference) and its training backward (torch.ops.aten.native_batch_norm_backward) on
bfloat16 tensors with float32 running statistics, as autocast leaves them. Each figure
is the median over --rounds rounds; every round times every case once, in turn, so a
burst of load on the (shared) machine hits all cases alike. The load average is printed
with the figures.

    PYTHONPATH=. python benchmarks/half.py
    PYTHONPATH=. python benchmarks/half.py --rounds 21 --threads 1
"""
import argparse
import statistics
import time

import ml_dtypes
import numpy as np

import bncpu


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds (median)")
    parser.add_argument("--no-torch", action="store_true", help="leave torch out")
    return parser.parse_args(argv)


def bncpu_cases(shape, dtype):
    """name -> callable of the three bncpu operations on data of dtype."""
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    weight, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
    running_mean, running_var = np.zeros(c, np.float32), np.ones(c, np.float32)
    out = np.empty_like(x)
    _, mean, invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5)
    return {
        "training forward": lambda: bncpu.batch_norm_forward(
            x, weight, bias, running_mean, running_var, True, 0.1, 1e-5, out=out),
        "inference": lambda: bncpu.batch_norm_forward(
            x, weight, bias, running_mean, running_var, False, 0.1, 1e-5, out=out),
        "backward": lambda: bncpu.batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, 1e-5, out=out),
    }


def torch_cases(shape):
    import torch
    import torch.nn.functional as F
    c = shape[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(torch.bfloat16)
    dy = torch.randn(shape, generator=generator).to(torch.bfloat16)
    weight, bias = torch.ones(c), torch.zeros(c)
    running_mean, running_var = torch.zeros(c), torch.ones(c)
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.1,
                                                       1e-5)

    def backward():
        torch.ops.aten.native_batch_norm_backward(dy, x, weight, None, None, mean, invstd, True,
                                                  1e-5, [True, True, True])

    with torch.no_grad():
        return {
            "training forward": lambda: F.batch_norm(x, running_mean, running_var, weight, bias,
                                                     True, 0.1, 1e-5),
            "inference": lambda: F.batch_norm(x, running_mean, running_var, weight, bias, False,
                                              0.1, 1e-5),
            "backward": backward,
        }


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    shape = tuple(args.shape)
    bncpu.set_num_threads(args.threads)
    columns = {"float32": bncpu_cases(shape, np.float32),
               "bfloat16": bncpu_cases(shape, ml_dtypes.bfloat16),
               "float16": bncpu_cases(shape, np.float16)}
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
        columns["torch bf16"] = torch_cases(shape)
    operations = list(columns["float32"])
    for cases in columns.values():   # warm up: first touches, thread pools
        for function in cases.values():
            function()
    times = {(column, operation): [] for column in columns for operation in operations}
    for _ in range(args.rounds):
        for column, cases in columns.items():
            for operation, function in cases.items():
                times[(column, operation)].append(timed(function))
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"shape {shape}, {args.threads} threads, median of {args.rounds} rounds, "
          f"ISA {bncpu.isa()}, load average {' '.join(load)}")
    header = f"{'':<18}" + "".join(f"{column:>13}" for column in columns)
    header += f"{'bf16/f32':>10}{'f16/f32':>9}"
    if "torch bf16" in columns:
        header += f"{'torch/bf16':>12}"
    print(header)
    for operation in operations:
        ms = {column: statistics.median(times[(column, operation)]) * 1e3 for column in columns}
        row = f"{operation:<18}" + "".join(f"{ms[column]:>10.2f} ms" for column in columns)
        row += f"{ms['bfloat16'] / ms['float32']:>9.2f}x{ms['float16'] / ms['float32']:>8.2f}x"
        if "torch bf16" in columns:
            row += f"{ms['torch bf16'] / ms['bfloat16']:>11.2f}x"
        print(row)
    bncpu.set_num_threads(0)


if __name__ == "__main__":
    main()
