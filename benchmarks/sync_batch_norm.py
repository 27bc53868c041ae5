"""Synchronized batch norm over 2 processes vs one process on the whole batch.

One training step (forward + backward, float32, default (32, 64, 56, 56)) timed three
ways, round-robin in one MPI job so that a noisy neighbour slows them alike:

  sync 2p x 1t    bncpu.distributed: 2 MPI processes, 1 thread each, each on half the
                  batch (split-phase kernels + one all-gather + one all-reduce)
  whole 1p x 2t   bncpu.batch_norm_forward + batch_norm_backward (fused kernels) on the
                  whole batch, one process, 2 threads (the other process sleeps)
  half 1p x 1t    the same fused kernels on one half at 1 thread: what a process would
                  cost with no synchronization at all
  split 1p x 1t   the synchronized step's kernels on one half at 1 thread with no peer
                  (LocalCommunicator): the split-phase kernels' cost over the fused ones
  sync gloo       as "sync 2p x 1t", through torch.distributed's gloo backend on
                  127.0.0.1 (the same processes join a gloo group; when torch is installed)

plus, inside the synchronized step, the time spent in the two collectives (including
waiting for the other process), the latency of the two collectives alone (the same
messages exchanged back to back by processes that start together: what synchronization
costs a perfectly balanced step), and the bytes each process sends per step: the payload
(float64 values) and what MPI sends (plus the all-gather's row length, 8 bytes).
Each row shows the median over the rounds and the minimum (for the collectives alone,
the fastest single exchange): on a busy machine the minimum is the better estimate of
what the code costs.

    python benchmarks/sync_batch_norm.py                      # launches mpiexec -n 2 itself
    PYTHONPATH=$PWD python benchmarks/sync_batch_norm.py      # an in-place build
    python benchmarks/sync_batch_norm.py --rounds 30 --json sync.json
    python benchmarks/sync_batch_norm.py --shape 64,64,28,28 --processes 4

Needs mpi4py and mpiexec (pip install mpich mpi4py). The ratios are medians of the
per-round ratios.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32,64,56,56", help="whole batch (N,C,H,W)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write every sample and the summary here")
    parser.add_argument("--no-gloo", action="store_true", help="skip the gloo rows")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gloo-store", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------
# Inside the MPI job
# ----------------------------------------------------------------------------------
class TimedCommunicator:
    """An MPICommunicator that adds up the wall time of its collectives and the bytes
    this process contributes to them."""

    def __init__(self, inner):
        self.inner, self.rank, self.size = inner, inner.rank, inner.size
        self.seconds = 0.0
        self.payload_bytes = 0
        self.sent_bytes = 0

    def allgather(self, row):
        start = time.perf_counter()
        rows = self.inner.allgather(row)
        self.seconds += time.perf_counter() - start
        self.payload_bytes += row.nbytes
        self.sent_bytes += row.nbytes + 8   # the row, and its length sent first
        return rows

    def allreduce_sum(self, values):
        start = time.perf_counter()
        total = self.inner.allreduce_sum(values)
        self.seconds += time.perf_counter() - start
        self.payload_bytes += values.nbytes
        self.sent_bytes += values.nbytes
        return total


def quiet_barrier(comm):
    """A barrier that sleeps instead of spinning (MPICH's blocking calls poll a core,
    which would steal it from the other process's 2-thread run)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(2e-4)


def worker(args):
    from mpi4py import MPI

    import bncpu
    from bncpu.bench import machine
    from bncpu.distributed import (
        LocalCommunicator, MPICommunicator, sync_batch_norm_backward, sync_batch_norm_forward,
    )
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    shape = tuple(int(v) for v in args.shape.split(","))
    if shape[0] % size:
        raise SystemExit(f"the batch ({shape[0]}) must split evenly over {size} processes")
    machine.reuse_freed_memory()
    rng = np.random.default_rng(rank)
    half_shape = (shape[0] // size,) + shape[1:]
    x = rng.standard_normal(half_shape, dtype=np.float32).astype(args.dtype)
    dy = rng.standard_normal(half_shape, dtype=np.float32).astype(args.dtype)
    c = shape[1]
    weight, bias = np.ones(c, args.dtype), np.zeros(c, args.dtype)
    running_mean, running_var = np.zeros(c, args.dtype), np.ones(c, args.dtype)
    if rank == 0:
        x_whole = np.concatenate([x] * size)
        dy_whole = np.concatenate([dy] * size)
    comm = TimedCommunicator(MPICommunicator(world))
    gloo = None
    if args.gloo_store:
        import torch.distributed as dist

        from bncpu.distributed import TorchCommunicator
        dist.init_process_group("gloo", init_method=f"file://{args.gloo_store}", rank=rank,
                                world_size=size)
        gloo = TorchCommunicator()

    def sync_step(comm=comm):
        _, mean, invstd, count = sync_batch_norm_forward(x, weight, bias, running_mean,
                                                         running_var, 0.1, 1e-5, comm)
        sync_batch_norm_backward(dy, x, weight, mean, invstd, count, comm)

    def fused_step(xs, dys):
        _, save_mean, save_invstd = bncpu.batch_norm_forward(xs, weight, bias, running_mean,
                                                             running_var, True, 0.1, 1e-5)
        bncpu.batch_norm_backward(dys, xs, weight, None, None, save_mean, save_invstd, True,
                                  1e-5)

    def timed(function, *arguments):
        start = time.perf_counter()
        function(*arguments)
        return time.perf_counter() - start

    def collectives_only(engine, repeats=50):
        """Seconds of the step's two collectives alone, on its message sizes: the median
        and the minimum over ``repeats`` exchanges (the slower process's)."""
        row = np.zeros(4 + 2 * c)
        sums = np.zeros(1 + 2 * c)
        quiet_barrier(world)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.allgather(row)
            engine.allreduce_sum(sums)
            times.append(time.perf_counter() - start)
        return (world.allreduce(statistics.median(times), op=MPI.MAX),
                world.allreduce(min(times), op=MPI.MAX))

    samples = {"sync": [], "collectives": [], "latency": [], "latency_min": [], "whole": [],
               "half": [], "split": []}
    if gloo is not None:
        samples.update(sync_gloo=[], latency_gloo=[], latency_gloo_min=[])
    for round_index in range(args.warmup + args.rounds):
        bncpu.set_num_threads(1)
        quiet_barrier(world)
        comm.seconds = 0.0
        comm.payload_bytes = comm.sent_bytes = 0
        step = world.allreduce(timed(sync_step), op=MPI.MAX)
        collectives = world.allreduce(comm.seconds, op=MPI.MAX)
        step_bytes = (comm.payload_bytes, comm.sent_bytes)
        latency, latency_min = collectives_only(comm.inner)
        if gloo is not None:
            quiet_barrier(world)
            gloo_step = world.allreduce(timed(sync_step, gloo), op=MPI.MAX)
            gloo_latency, gloo_latency_min = collectives_only(gloo)
        if rank == 0:
            # Rank 0 alone, in an order that rotates every round; a pause after each run
            # lets the 2-thread run's OpenMP worker stop spinning before the next one.
            local = {"whole": lambda: timed(fused_step, x_whole, dy_whole),
                     "half": lambda: timed(fused_step, x, dy),
                     "split": lambda: timed(sync_step, LocalCommunicator())}
            names = list(local)
            local_times = {}
            for name in names[round_index % 3:] + names[:round_index % 3]:
                bncpu.set_num_threads(2 if name == "whole" else 1)
                local_times[name] = local[name]()
                time.sleep(0.01)
            whole, half, split = (local_times[name] for name in names)
            bncpu.set_num_threads(1)
        quiet_barrier(world)
        if rank == 0 and round_index >= args.warmup:
            for name, value in (("sync", step), ("collectives", collectives),
                                ("latency", latency), ("latency_min", latency_min),
                                ("whole", whole), ("half", half), ("split", split)):
                samples[name].append(value)
            if gloo is not None:
                samples["sync_gloo"].append(gloo_step)
                samples["latency_gloo"].append(gloo_latency)
                samples["latency_gloo_min"].append(gloo_latency_min)
    if rank == 0:
        print(json.dumps({"samples": samples, "payload_bytes": step_bytes[0],
                          "sent_bytes": step_bytes[1], "processes": size, "shape": shape,
                          "dtype": args.dtype, "isa": bncpu.isa(),
                          "openmp": bncpu.openmp_enabled()}))


# ----------------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------------
def find_mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    if os.access(local, os.X_OK):
        return str(local)
    from shutil import which
    return which("mpiexec")


def system_load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install mpich mpi4py")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    forwarded = [a for a in forwarded if not a.startswith("--json")]
    if args.json:
        forwarded = [a for a in forwarded if a != args.json]
    store = tempfile.TemporaryDirectory()
    if not args.no_gloo and importlib.util.find_spec("torch") is not None:
        forwarded += ["--gloo-store", os.path.join(store.name, "gloo")]
    command = [mpiexec, "-n", str(args.processes), sys.executable, os.path.abspath(__file__),
               "--worker", *forwarded]
    try:
        import bncpu
    except ImportError:
        raise SystemExit("bncpu is not importable: pip install it, or set PYTHONPATH to the "
                         "repository of an in-place build") from None
    # The workers import the bncpu this launcher found.
    package_parent = str(Path(bncpu.__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="2", MASTER_ADDR="127.0.0.1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent,
                                                        os.environ.get("PYTHONPATH")])))
    load_before = system_load()
    with store:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    samples = report["samples"]
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {
        "sync / whole": statistics.median(s / w for s, w in zip(samples["sync"], samples["whole"])),
        "sync / half": statistics.median(s / h for s, h in zip(samples["sync"], samples["half"])),
        "split / half": statistics.median(s / h for s, h in zip(samples["split"],
                                                                samples["half"])),
        "collectives / sync": statistics.median(
            c / s for c, s in zip(samples["collectives"], samples["sync"])),
    }
    report.update(medians_s=medians, ratios=ratios, load_average=[load_before, system_load()])
    report.update(minimums_s={name: min(values) for name, values in samples.items()})
    p = report["processes"]
    rows = [("sync", f"sync {p}p x 1t", f"{p} processes, 1 thread each, 1/{p} of the batch each"),
            ("collectives", "  in collectives", "of which in the all-gather + all-reduce "
                                               "(waiting for the other process included)"),
            ("latency", "  collectives alone", "the same two messages, processes in step"),
            ("sync_gloo", "sync gloo", "as sync, through torch.distributed's gloo"),
            ("latency_gloo", "  collectives alone", "the same two messages over gloo"),
            ("whole", "whole 1p x 2t", "fused kernels, whole batch, 1 process, 2 threads"),
            ("half", "half 1p x 1t", f"fused kernels, 1/{p} of the batch, no synchronization"),
            ("split", "split 1p x 1t", f"split-phase kernels, 1/{p} of the batch, no peer")]
    print(f"synchronized batch norm, training forward + backward, {tuple(report['shape'])} "
          f"{report['dtype']}, {args.rounds} rounds, kernels {report['isa']}")
    print(f"  {'':20} {'median':>10} {'min':>10}")
    for key, label, what in rows:
        if key not in samples:
            continue
        low = report["minimums_s"].get(f"{key}_min", report["minimums_s"][key])
        print(f"  {label:20} {medians[key] * 1e3:7.3f} ms {low * 1e3:7.3f} ms   {what}")
    print("  median per-round ratios: " + ", ".join(f"{name} {value:.2f}x"
                                                   for name, value in ratios.items()))
    print(f"  bytes sent per process per step: {report['payload_bytes']} payload "
          f"(float64 values), {report['sent_bytes']} with the row length")
    print(f"  load average before/after: {load_before:.2f} / {system_load():.2f} "
          f"(on {os.cpu_count()} CPUs; above 0 the timings include other processes' work)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
