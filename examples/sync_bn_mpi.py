"""Synchronized batch norm over MPI, checked against batch norm of the whole batch.

    mpiexec -n 2 python examples/sync_bn_mpi.py

Every process builds the same global batch from one seed and keeps its own shard (the
shards are of unequal sizes, and with 3 or more processes one is empty). Each process
runs two training steps and one evaluation step of bncpu.distributed.SyncBatchNorm on
its shard, and the same steps of bncpu.nn.BatchNorm2d on the whole batch. Synchronized
batch norm must give, on every process, its shard's rows of the whole batch's output and
input gradient, the whole batch's running statistics, and (summed over the processes)
its parameter gradients. Rank 0 prints the largest difference and PASS or FAIL; the
exit status is 1 on FAIL.
"""
import sys

import numpy as np
from mpi4py import MPI

import bncpu.nn
from bncpu.distributed import SyncBatchNorm

CHANNELS = 8
STEPS = 2
# float64 data: the synchronized and the single-process results differ only by the
# order of float64 sums.
TOLERANCE = 1e-10


def shard_bounds(batch, rank, size):
    """Rows [start, stop) of the global batch that ``rank`` holds: rank r gets r + 1
    shares, so the shards differ in size; with 3 or more ranks the last one is empty."""
    shares = [r + 1 for r in range(size)]
    if size >= 3:
        shares[-1] = 0
    edges = np.concatenate([[0], np.cumsum(shares)]) * batch // sum(shares)
    return int(edges[rank]), int(edges[rank + 1])


def main():
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)
    batch = 4 * size + 2
    start, stop = shard_bounds(batch, rank, size)

    synced = SyncBatchNorm(CHANNELS, comm=comm, dtype=np.float64)
    whole = bncpu.nn.BatchNorm2d(CHANNELS, dtype=np.float64)
    errors = []

    def record(mine, theirs):
        errors.append(float(np.max(np.abs(mine - theirs), initial=0.0)))

    for _ in range(STEPS):
        x = rng.normal(3.0, 2.0, size=(batch, CHANNELS, 5, 5))
        dy = rng.standard_normal(x.shape)
        record(synced(x[start:stop]), whole(x)[start:stop])
        record(synced.backward(dy[start:stop]), whole.backward(dy)[start:stop])
        # Each process holds its share of the parameter gradients; a data-parallel
        # optimizer sums them over the processes.
        for mine, theirs in ((synced.grad_weight, whole.grad_weight),
                             (synced.grad_bias, whole.grad_bias)):
            record(comm.allreduce(mine, op=MPI.SUM), theirs)
        synced.zero_grad()
        whole.zero_grad()
    record(synced.running_mean, whole.running_mean)
    record(synced.running_var, whole.running_var)

    synced.eval()
    whole.eval()
    x = rng.normal(3.0, 2.0, size=(batch, CHANNELS, 5, 5))
    record(synced(x[start:stop]), whole(x)[start:stop])

    largest = comm.allreduce(max(errors), op=MPI.MAX)
    passed = largest <= TOLERANCE
    if rank == 0:
        print(f"synchronized batch norm on {size} processes vs batch norm of the whole "
              f"batch ({batch} samples): largest difference {largest:.2e} "
              f"(tolerance {TOLERANCE:.0e}): {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
