"""What OpenMP's wait policy does around bncpu calls.

After a parallel region, GNU OpenMP's workers spin (busy-wait) for a while before they
sleep, so that the next region starts without a wake-up; with ``OMP_WAIT_POLICY`` unset
the spin lasts ``GOMP_SPINCOUNT`` = 300,000 iterations. bncpu, PyTorch (when imported
after bncpu) and oneDNN's GNU OpenMP build share one libgomp, hence one policy. The
policy is read when libgomp loads, so each one runs in a fresh process here:

  default   OMP_WAIT_POLICY and GOMP_SPINCOUNT unset
  spin10k   GOMP_SPINCOUNT=10000 (a spin of a few microseconds)
  passive   OMP_WAIT_POLICY=passive (workers sleep at once)
  active    OMP_WAIT_POLICY=active (workers spin up to 30 billion iterations)

For each policy it measures, at ``--threads`` threads:
  spin_cpu_ms   CPU time the process burns in the 50 ms after one bncpu call, while the
                calling thread sleeps: the workers' spin (median of 9)
  call_ms       bncpu's inference forward on a 1.6 MB input called back to back
  step_ms       a stand-in training step: forward, 2 ms of single-threaded NumPy work
                (what a framework does between kernels), backward, NumPy work again;
                a spinning worker then competes with the calling thread for a core
  step_cpu_ms   CPU time of the whole process per step

    python benchmarks/thread_wait.py
    python benchmarks/thread_wait.py --threads 2 --json thread_wait.json

On a loaded machine the wall times are noisy; the CPU times much less so.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = {"default": {}, "spin10k": {"GOMP_SPINCOUNT": "10000"},
            "passive": {"OMP_WAIT_POLICY": "passive"}, "active": {"OMP_WAIT_POLICY": "active"}}
SMALL = (32, 64, 14, 14)      # 1.6 MB: a call of a few hundred microseconds
LARGE = (32, 64, 56, 56)      # 25.7 MB


def worker(threads, rounds):
    import numpy as np

    import bncpu

    bncpu.set_num_threads(threads)
    rng = np.random.default_rng(0)
    results = {}

    def arrays(shape):
        x = rng.standard_normal(shape, dtype=np.float32)
        c = shape[1]
        return x, np.ones(c, np.float32), np.zeros(c, np.float32)

    x, weight, bias = arrays(LARGE)
    out = np.empty_like(x)
    spins = []
    for _ in range(9):
        bncpu.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5, out=out)
        cpu = time.process_time()
        time.sleep(0.05)
        spins.append(time.process_time() - cpu)
    results["spin_cpu_ms"] = statistics.median(spins) * 1e3

    small, small_weight, small_bias = arrays(SMALL)
    small_out = np.empty_like(small)
    mean, var = np.zeros(SMALL[1], np.float32), np.ones(SMALL[1], np.float32)
    calls = []
    for _ in range(rounds * 20):
        start = time.perf_counter()
        bncpu.batch_norm_forward(small, small_weight, small_bias, mean, var, False, 0.1, 1e-5,
                                 out=small_out)
        calls.append(time.perf_counter() - start)
    results["call_ms"] = statistics.median(calls) * 1e3

    dy = rng.standard_normal(LARGE, dtype=np.float32)
    dx = np.empty_like(x)
    other = rng.standard_normal((160, 160))

    def framework_work():
        """About 2 ms of single-threaded work on the calling thread."""
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            other @ other

    steps, step_cpu = [], []
    for _ in range(rounds):
        start, cpu = time.perf_counter(), time.process_time()
        _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True,
                                                             0.1, 1e-5, out=out)
        framework_work()
        bncpu.batch_norm_backward(dy, x, weight, None, None, save_mean, save_invstd, True, 1e-5,
                                  out=dx)
        framework_work()
        steps.append(time.perf_counter() - start)
        step_cpu.append(time.process_time() - cpu)
    results["step_ms"] = statistics.median(steps) * 1e3
    results["step_cpu_ms"] = statistics.median(step_cpu) * 1e3
    print(json.dumps(results), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.threads, args.rounds)
        return 0
    rows = {}
    print(f"{'policy':8s} {'spin_cpu_ms':>11s} {'call_ms':>8s} {'step_ms':>8s} "
          f"{'step_cpu_ms':>11s}")
    for name, settings in POLICIES.items():
        env = {key: value for key, value in os.environ.items()
               if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        # NumPy's own BLAS threads would blur the picture: one for the stand-in work.
        env.update(settings, OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                                 "--threads", str(args.threads), "--rounds", str(args.rounds)],
                                env=env, capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows[name] = row
        print(f"{name:8s} {row['spin_cpu_ms']:11.2f} {row['call_ms']:8.3f} {row['step_ms']:8.2f} "
              f"{row['step_cpu_ms']:11.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"threads": args.threads, "policies": POLICIES, "results": rows}, out,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
