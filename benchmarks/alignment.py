"""Does bncpu's speed depend on where its buffers start within a 64-byte cache line?

NumPy gives 16-byte-aligned data, so an input and an ``out=`` can sit at any of 4 x 4
(input, output) offsets of 0, 16, 32, 48 bytes within a line. For each pair this times
bncpu writing into ``out=`` and, beside it, the streaming floor (one pass, y = a*x + b,
into the same output), round-robin over all 16 pairs and both; it prints, per operation,
a 4 x 4 grid of median times relative to the aligned pair (0, 0), first bncpu's, then the
floor's, and per output offset the median over the input offsets. A penalty that the
floor shares is the memory system's; one that only bncpu pays is its kernel's. (The
kernels stream only whole cache lines, so the output's offset should cost nothing: see
BNCPU_LINE_BYTES in bncpu/_kernels/_elementwise.h.)

    python benchmarks/alignment.py                       # 2 threads, default shapes
    python benchmarks/alignment.py --threads 1 --rounds 15 --cpu-clock --json alignment.json

Timings on a loaded machine are noisy: compare grids of one run, rerun quietly.
"""
import argparse
import json
import sys

import numpy as np

import bncpu
from bncpu.bench import cases, machine, peers, timing

OFFSETS = (0, 16, 32, 48)
LINE = 64
SHAPES = ((32, 64, 56, 56), (32, 128, 56, 56), (32, 2048, 7, 7))
OPERATIONS = ("fwd_eval", "fwd_train", "bwd_train")


def at_offset(shape, offset, fill=None):
    """A float32 array of ``shape`` whose data starts ``offset`` bytes after a line start."""
    size = int(np.prod(shape))
    raw = cases.aligned_empty((size * 4 + LINE,), np.uint8)
    array = raw[offset:offset + size * 4].view(np.float32).reshape(shape)
    if fill is not None:
        array[...] = fill
    return array


def make_calls(operation, shape, in_offset, out_offset, source, gradient):
    """(bncpu call, floor call) on inputs at ``in_offset`` writing at ``out_offset``."""
    channels = shape[1]
    weight, bias = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    x = at_offset(shape, in_offset, source)
    out = at_offset(shape, out_offset, 0.0)
    if operation == "bwd_train":
        dy = at_offset(shape, in_offset, gradient)
        _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True,
                                                             0.1, 1e-5)

        def call():
            bncpu.batch_norm_backward(dy, x, weight, None, None, save_mean, save_invstd, True,
                                      1e-5, out=out)
        reads = (x, dy)
    else:
        training = operation == "fwd_train"

        def call():
            bncpu.batch_norm_forward(x, weight, bias, running_mean, running_var, training,
                                     0.1, 1e-5, out=out)
        reads = (x,)
    return call, peers.floor_call_into(reads, out, bncpu.get_num_threads())


def median_grid(samples):
    return np.array([[np.median(samples[(i, o)]) for o in OFFSETS] for i in OFFSETS])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with the thread's CPU time (needs --threads 1)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if args.cpu_clock:
        if args.threads != 1:
            parser.error("--cpu-clock needs --threads 1")
        timing.use_cpu_clock(True)
    machine.reuse_freed_memory()
    machine.set_threads(args.threads)
    rng = np.random.default_rng(0)
    results = []
    for shape in SHAPES:
        source = rng.standard_normal(shape, dtype=np.float32)
        gradient = rng.standard_normal(shape, dtype=np.float32)
        for operation in args.operations.split(","):
            pairs = [(i, o) for i in OFFSETS for o in OFFSETS]
            calls = {pair: make_calls(operation, shape, *pair, source, gradient)
                     for pair in pairs}
            samples = {"bncpu": {pair: [] for pair in pairs}, "floor": {pair: [] for pair in pairs}}
            for pair in pairs:   # warm-up: first touch, thread start
                for call in calls[pair]:
                    call()
            for _ in range(args.rounds):
                for pair in pairs:
                    for name, call in zip(("bncpu", "floor"), calls[pair]):
                        start = timing.clock()
                        call()
                        samples[name][pair].append(timing.clock() - start)
            del calls
            mb = np.prod(shape) * 4 / 1e6
            print(f"\n{operation} {shape} float32 ({mb:.1f} MB per array), {args.threads} "
                  f"thread(s): median time / aligned (0, 0); rows: input offset, "
                  f"columns: output offset (bytes)")
            row = {"shape": shape, "operation": operation, "threads": args.threads}
            for name in ("bncpu", "floor"):
                grid = median_grid(samples[name])
                aligned = grid[0, 0]
                print(f"  {name}: aligned {aligned * 1e3:.2f} ms, worst "
                      f"{grid.max() / aligned:.2f}x")
                print("        " + "".join(f"{o:>7d}" for o in OFFSETS))
                for i, values in zip(OFFSETS, grid):
                    print(f"    {i:3d} " + "".join(f"{v / aligned:7.2f}" for v in values))
                by_output = np.median(grid, axis=0)
                print("    by output offset (median over the input offsets): "
                      + " ".join(f"{v / by_output[0]:.2f}" for v in by_output))
                row[name] = {"aligned_s": aligned, "median_s": grid.tolist()}
            results.append(row)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"offsets": OFFSETS, "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
