"""Channels-last against channels-first, side by side in one process.

Batch norm on (32, 56, 56, 64) float32 as NHWC with ``axis=-1`` against the same values as
NCHW (training forward, evaluation forward, training backward), and PyTorch on the NHWC
memory as a ``channels_last`` tensor (and on the NCHW one); group norm on (8, 28, 28, 256)
channels-last against channels-first (forward, backward). A streaming floor (one pass
reading the input and writing an output of its size) sets the
scale (the speed report's floor, bncpu.bench.peers.floor_call_into). Each round calls every variant once in turn (round robin), and the figures are
medians over rounds, so a load that comes and goes hits all variants alike.

    python benchmarks/channels_last.py --threads 2 --rounds 31
    python benchmarks/channels_last.py --threads 2 --json channels_last.json
    python benchmarks/channels_last.py --threads 1 --clock cpu     # on a loaded machine

``--clock cpu`` times each call by the CPU time of the process (all its threads) instead of
the wall clock: on a machine shared with other work, waiting for a core no longer counts,
so at one thread the figures hardly move with the load (memory bandwidth is still shared).

Run it from outside the repository root or with bncpu installed (``python`` in the root
imports the source tree, which works only when built in place).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import bncpu
from bncpu.bench import machine, peers

try:
    import torch
except ImportError:
    torch = None

EPS, MOMENTUM = 1e-5, 0.1


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for bncpu and torch")
    parser.add_argument("--rounds", type=int, default=31, help="round-robin rounds (default 31)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time (default) or the process's CPU time per call")
    parser.add_argument("--json", metavar="FILE", help="write the medians and ratios")
    return parser.parse_args(argv)


def batch_norm_calls(n_threads):
    rng = np.random.default_rng(0)
    last = rng.standard_normal((32, 56, 56, 64), dtype=np.float32)   # NHWC
    first = np.ascontiguousarray(last.transpose(0, 3, 1, 2))          # the same values, NCHW
    dy_last = rng.standard_normal(last.shape, dtype=np.float32)
    dy_first = np.ascontiguousarray(dy_last.transpose(0, 3, 1, 2))
    c = last.shape[-1]
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, mean, invstd = bncpu.batch_norm_forward(first, weight, bias, None, None, True, 0, EPS)

    def ours(x, dy, axis):
        return {
            "train": lambda: bncpu.batch_norm_forward(x, weight, bias, rm, rv, True, MOMENTUM, EPS,
                                                      axis=axis),
            "eval": lambda: bncpu.batch_norm_forward(x, weight, bias, rm, rv, False, MOMENTUM, EPS,
                                                     axis=axis),
            "backward": lambda: bncpu.batch_norm_backward(dy, x, weight, None, None, mean, invstd,
                                                          True, EPS, axis=axis),
        }

    calls = {"bncpu NHWC axis=-1": ours(last, dy_last, -1),
             "bncpu NCHW": ours(first, dy_first, 1)}
    if torch is not None:
        torch.set_num_threads(n_threads)
        t = {name: torch.from_numpy(a) for name, a in
             dict(weight=weight, bias=bias, rm=rm.copy(), rv=rv.copy(), mean=mean,
                  invstd=invstd).items()}

        def theirs(x, dy):
            return {
                "train": lambda: torch.native_batch_norm(x, t["weight"], t["bias"], t["rm"], t["rv"],
                                                         True, MOMENTUM, EPS),
                "eval": lambda: torch.native_batch_norm(x, t["weight"], t["bias"], t["rm"], t["rv"],
                                                        False, MOMENTUM, EPS),
                "backward": lambda: torch.ops.aten.native_batch_norm_backward(
                    dy, x, t["weight"], None, None, t["mean"], t["invstd"], True, EPS,
                    [True, True, True]),
            }
        # NCHW-shaped views of the NHWC memory: torch's channels_last memory format.
        x_cl, dy_cl = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (last, dy_last))
        assert x_cl.is_contiguous(memory_format=torch.channels_last)
        calls["torch channels_last"] = theirs(x_cl, dy_cl)
        calls["torch NCHW"] = theirs(torch.from_numpy(first), torch.from_numpy(dy_first))
    # The speed report's floor: one pass reading the input and writing an array of its size.
    one_pass = peers.floor_call_into((last,), np.empty_like(last), n_threads)
    calls["floor (one pass)"] = {"train": one_pass, "eval": one_pass, "backward": one_pass}
    return calls


def group_norm_calls():
    rng = np.random.default_rng(1)
    last = rng.standard_normal((8, 28, 28, 256), dtype=np.float32)
    first = np.ascontiguousarray(last.transpose(0, 3, 1, 2))
    dy_last = rng.standard_normal(last.shape, dtype=np.float32)
    dy_first = np.ascontiguousarray(dy_last.transpose(0, 3, 1, 2))
    c, groups = last.shape[-1], 32
    weight = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    _, mean, rstd = bncpu.group_norm_forward(first, groups, weight, bias, EPS)

    def ours(x, dy, axis):
        return {
            "forward": lambda: bncpu.group_norm_forward(x, groups, weight, bias, EPS, axis=axis),
            "backward": lambda: bncpu.group_norm_backward(dy, x, groups, mean, rstd, weight,
                                                          axis=axis),
        }
    return {"bncpu NHWC axis=-1": ours(last, dy_last, -1), "bncpu NCHW": ours(first, dy_first, 1)}


def round_robin(calls, rounds, clock=time.perf_counter):
    """{variant: {phase: median seconds}}, every (variant, phase) called once per round."""
    pairs = [(variant, phase) for variant, phases in calls.items() for phase in phases]
    for variant, phase in pairs:            # warm-up
        calls[variant][phase]()
    times = {pair: [] for pair in pairs}
    for _ in range(rounds):
        for variant, phase in pairs:
            start = clock()
            calls[variant][phase]()
            times[(variant, phase)].append(clock() - start)
    medians = {}
    for (variant, phase), values in times.items():
        medians.setdefault(variant, {})[phase] = statistics.median(values)
    return medians


def table(title, medians, baseline):
    phases = list(medians[baseline])
    print(f"\n{title}: median ms per call, and the ratio to {baseline!r}")
    print(f"{'':22}" + "".join(f"{phase:>20}" for phase in phases))
    for variant in medians:
        cells = "".join(f"{1e3 * medians[variant][p]:9.2f} ({medians[variant][p] / medians[baseline][p]:5.2f}x)"
                        .rjust(20) for p in phases)
        print(f"{variant:22}{cells}")


def main(argv=None):
    args = parse_args(argv)
    bncpu.set_num_threads(args.threads)
    machine.reuse_freed_memory()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    bn = round_robin(batch_norm_calls(args.threads), args.rounds, clock)
    gn = round_robin(group_norm_calls(), args.rounds, clock)
    print(f"bncpu {bncpu.__version__} ({bncpu.isa()}), {args.threads} threads, {args.rounds} "
          f"rounds, {args.clock} clock, torch {torch.__version__ if torch else 'absent'}; load average "
          f"{' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    table("batch norm (32, 56, 56, 64) float32", bn, "bncpu NCHW")
    table("group norm (8, 28, 28, 256) float32, 32 groups", gn, "bncpu NCHW")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"batch_norm": bn, "group_norm": gn, "threads": args.threads,
                       "clock": args.clock}, file, indent=1)


if __name__ == "__main__":
    sys.exit(main())
