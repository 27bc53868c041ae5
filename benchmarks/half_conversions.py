"""Throughput of bncpu/_kernels/_half.h's conversions, per ISA path, on one thread.

A 32 MB buffer of bfloat16 or float16 values (16M values drawn from a unit normal) is
widened to float32 (32 MB read, 64 MB written), narrowed back from float32 (64 MB read,
32 MB written), and widened and narrowed in registers (32 MB read, 32 MB written: what a
normalization kernel reading and writing half precision adds to its arithmetic). Beside
them, two copies as floors: the float32 data of the same 16M values (64 MB each way,
what the float32 kernels move) and the 32 MB of 16-bit data itself. Each figure is the
median over --rounds rounds; every round times every case once, in turn, so a burst of
load on the (shared) machine hits all cases alike. The harness is tests/
test_half_conversions.py's, compiled with the same flags per path; paths this CPU lacks
are left out.

    PYTHONPATH=. python benchmarks/half_conversions.py
    PYTHONPATH=. python benchmarks/half_conversions.py --rounds 101 --mb 0.25   # in cache
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from test_half_conversions import ISA_PATHS, build   # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--mb", type=float, default=32,
                        help="size of the 16-bit buffer in MB (0.25: in the L2 cache)")
    return parser.parse_args(argv)


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv):
    args = parse_args(argv)
    n = int(args.mb * (1 << 20)) // 2
    values = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    halves = {"bf16": None, "f16": values.astype(np.float16).view(np.uint16)}
    wide = np.empty(n, np.float32)
    narrow = np.empty(n, np.uint16)
    copy_f32 = np.empty(n, np.float32)

    cases = {"float32 copy": lambda: np.copyto(copy_f32, values),
             "16-bit copy": lambda: np.copyto(narrow, halves["f16"])}
    workdir = tempfile.mkdtemp(prefix="bncpu_half_bench_")
    for path in ISA_PATHS:
        harness = build(path, workdir)
        if isinstance(harness, str):
            print(f"skipped: {harness}")
            continue
        if halves["bf16"] is None:
            halves["bf16"] = harness.narrow("bf16", "scalar", values)
        for fmt in ("bf16", "f16"):
            prefix = f"{path.name} {fmt} ({dict(zip(('bf16', 'f16'), harness.paths()))[fmt]})"
            cases[f"{prefix} widen"] = (
                lambda h=harness, f=fmt: h.call(f"{f}_widen_vector", halves[f], wide))
            cases[f"{prefix} narrow"] = (
                lambda h=harness, f=fmt: h.call(f"{f}_narrow_vector", values, narrow))
            cases[f"{prefix} widen+narrow"] = (
                lambda h=harness, f=fmt: h.call(f"{f}_roundtrip", halves[f], narrow))

    print(f"$ {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    with open("/proc/loadavg") as f:
        print(f"loadavg before: {f.read().strip()}")
    for run in cases.values():   # first touch of every page, and warm caches of code
        run()
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, run in cases.items():
            times[name].append(timed(run))
    with open("/proc/loadavg") as f:
        print(f"loadavg after:  {f.read().strip()}")

    floor = statistics.median(times["float32 copy"])
    print(f"{n} values ({args.mb} MB of 16-bit data), one thread, median of {args.rounds}")
    print(f"{'case':42s} {'us':>9s} {'values/ns':>10s} {'vs float32 copy':>16s}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:42s} {median * 1e6:9.1f} {n / median / 1e9:10.2f} "
              f"{median / floor:15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
