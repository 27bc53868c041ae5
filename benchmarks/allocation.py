"""What allocating a large result costs a fresh process, against writing into ``out=``.

Each configuration runs in its own fresh Python process (malloc's state and its settings
are per process): the operation is called ``--calls`` times allocating its result and as
many times into a preallocated ``out=``, alternately; the median times, the first call
and the minor page faults per call are printed.

Configurations:
  default      glibc's malloc as it comes; NumPy asks for transparent huge pages
               (madvise) on arrays of 4 MiB and more
  no-thp       as default, with NumPy's huge-page request turned off
  tunables     GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:trim_threshold=... (1 GiB):
               freed memory stays in the heap, set from the environment, no code change
  mallopt      the same thresholds set from Python (what ``python -m bncpu`` does)

    python benchmarks/allocation.py                 # every configuration, default shapes
    python benchmarks/allocation.py --threads 1 --calls 41 --cpu-clock

Timings on a loaded machine are noisy; the page-fault counts are not.
"""
import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = ("default", "no-thp", "tunables", "mallopt")
ONE_GIB = 1 << 30
# (label, function, shape): a 100 MB inference output and a 12.8 MB training output.
CASES = (("batch_norm fwd eval", "eval", (32, 256, 56, 56)),
         ("batch_norm fwd train", "train", (32, 64, 56, 56)),
         ("batch_norm bwd train", "backward", (32, 64, 56, 56)))


def worker(config, threads, calls, cpu_clock):
    """Runs in the fresh process: prints one JSON line per case."""
    import resource

    import numpy as np

    import bncpu
    from bncpu.bench import machine

    if config == "no-thp":
        np._core.multiarray._set_madvise_hugepage(False)
    if config == "mallopt" and not machine.reuse_freed_memory():
        raise SystemExit("mallopt refused")
    bncpu.set_num_threads(threads)
    clock = time.thread_time if cpu_clock else time.perf_counter
    rng = np.random.default_rng(0)
    for label, kind, shape in CASES:
        x = rng.standard_normal(shape, dtype=np.float32)
        c = shape[1]
        weight, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
        mean, var = np.zeros(c, np.float32), np.ones(c, np.float32)
        if kind == "backward":
            dy = rng.standard_normal(shape, dtype=np.float32)
            _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, None, None,
                                                                 True, 0.1, 1e-5)

            def call(out=None):
                return bncpu.batch_norm_backward(dy, x, weight, None, None, save_mean,
                                                 save_invstd, True, 1e-5, out=out)
        else:
            def call(out=None, training=(kind == "train")):
                return bncpu.batch_norm_forward(x, weight, bias, mean, var, training, 0.1,
                                                1e-5, out=out)
        out = np.empty_like(x)
        times = {"allocating": [], "out=": []}
        faults = {"allocating": 0, "out=": 0}
        first = None
        for i in range(calls):
            for name in times:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = clock()
                result = call(out if name == "out=" else None)
                elapsed = clock() - start
                del result
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                if i == 0 and name == "allocating":
                    first = elapsed
                times[name].append(elapsed)
        print(json.dumps({
            "config": config, "case": label, "shape": shape, "threads": threads,
            "output_mb": x.nbytes / 1e6, "first_call_s": first,
            "median_s": {name: float(np.median(values[1:])) for name, values in times.items()},
            "faults_per_call": {name: count / calls for name, count in faults.items()}}),
            flush=True)


def run_config(config, threads, calls, cpu_clock):
    env = dict(os.environ)
    if config == "tunables":
        env["GLIBC_TUNABLES"] = (f"glibc.malloc.mmap_threshold={ONE_GIB}:"
                                 f"glibc.malloc.trim_threshold={ONE_GIB}")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", config,
                             "--threads", str(threads), "--calls", str(calls)]
                            + (["--cpu-clock"] if cpu_clock else []),
                            env=env, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=21)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with the thread's CPU time (user + system, so page faults "
                             "count): steadier on a busy machine; needs --threads 1")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="FILE", help="write every result")
    args = parser.parse_args(argv)
    if args.cpu_clock and args.threads != 1:
        parser.error("--cpu-clock needs --threads 1")
    if args.worker:
        worker(args.worker, args.threads, args.calls, args.cpu_clock)
        return 0
    results = []
    print(f"{'config':9s} {'operation':21s} {'shape':18s} {'first':>8s} {'allocating':>10s} "
          f"{'out=':>8s} {'alloc/out':>9s} {'faults/call':>11s}")
    for config in args.configs.split(","):
        for row in run_config(config, args.threads, args.calls, args.cpu_clock):
            results.append(row)
            median = row["median_s"]
            print(f"{config:9s} {row['case']:21s} {str(tuple(row['shape'])):18s} "
                  f"{row['first_call_s'] * 1e3:6.1f}ms {median['allocating'] * 1e3:8.2f}ms "
                  f"{median['out='] * 1e3:6.2f}ms {median['allocating'] / median['out=']:8.2f}x "
                  f"{row['faults_per_call']['allocating']:11.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
