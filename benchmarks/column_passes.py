"""The passes of channels-last (column-mode) batch norm, one by one, against channels-first.

Batch norm on (32, 56, 56, 64) float32: the statistics (``batch_norm_stats``), the
normalization (``batch_norm_elemt``), the backward sums (``batch_norm_backward_reduce``)
and the backward's elementwise pass (``batch_norm_backward_elemt``), each on the NHWC
memory with ``axis=-1`` and on the same values as NCHW, beside two streaming floors: a
sum reading the input once (NumPy) and a copy reading it and writing an array of its size.
Medians over a round robin in one process, as benchmarks/channels_last.py.

    python benchmarks/column_passes.py --threads 1 --clock cpu --rounds 15
    python benchmarks/column_passes.py --shape 100352,256        # a 2-D (N, C) case

Run it from outside the repository root or with bncpu installed.
"""
import argparse
import os
import sys
import time

import numpy as np

import bncpu
from bncpu.bench import machine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from channels_last import round_robin, table   # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for bncpu")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds (default 15)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu",
                        help="the process's CPU time per call (default) or wall time")
    parser.add_argument("--shape", default="32,56,56,64",
                        help="channels-last shape, comma-separated (default 32,56,56,64)")
    return parser.parse_args(argv)


def calls(shape):
    rng = np.random.default_rng(0)
    last = rng.standard_normal(shape, dtype=np.float32)
    first = np.ascontiguousarray(np.moveaxis(last, -1, 1))
    dy_last = rng.standard_normal(shape, dtype=np.float32)
    dy_first = np.ascontiguousarray(np.moveaxis(dy_last, -1, 1))
    c = shape[-1]
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    mean, m2, count = bncpu.batch_norm_stats(first)
    invstd = (1 / np.sqrt(m2 / count + 1e-5)).astype(np.float32)
    mean = mean.astype(np.float32)
    sums = bncpu.batch_norm_backward_reduce(dy_first, first, mean, invstd, weight)

    def ours(x, dy, axis):
        out = np.empty_like(x)
        return {
            "stats": lambda: bncpu.batch_norm_stats(x, axis=axis),
            "elemt": lambda: bncpu.batch_norm_elemt(x, weight, bias, mean, invstd, out=out,
                                                    axis=axis),
            "bwd reduce": lambda: bncpu.batch_norm_backward_reduce(dy, x, mean, invstd, weight,
                                                                   axis=axis),
            "bwd elemt": lambda: bncpu.batch_norm_backward_elemt(
                dy, x, mean, invstd, weight, sums[0], sums[1], count, out=out, axis=axis),
        }

    copy = np.empty_like(last)
    floor = {"stats": lambda: last.sum(axis=None), "elemt": lambda: np.copyto(copy, last)}
    floor["bwd reduce"] = lambda: (last.sum(axis=None), dy_last.sum(axis=None))
    floor["bwd elemt"] = lambda: np.add(last, dy_last, out=copy)
    return {"bncpu NHWC axis=-1": ours(last, dy_last, -1),
            "bncpu NCHW": ours(first, dy_first, 1),
            "NumPy sum / copy": floor}


def main(argv=None):
    args = parse_args(argv)
    bncpu.set_num_threads(args.threads)
    machine.reuse_freed_memory()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    shape = tuple(int(v) for v in args.shape.split(","))
    medians = round_robin(calls(shape), args.rounds, clock)
    print(f"bncpu {bncpu.__version__} ({bncpu.isa()}), {args.threads} threads, {args.rounds} "
          f"rounds, {args.clock} clock; load average "
          f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    table(f"batch norm passes {shape} float32", medians, "bncpu NCHW")


if __name__ == "__main__":
    sys.exit(main())
