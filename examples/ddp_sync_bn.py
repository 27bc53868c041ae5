"""bncpu's SyncBatchNorm inside DistributedDataParallel on CPUs, checked against one process.

    python examples/ddp_sync_bn.py [--processes 2] [--steps 3]

The script starts its own processes (torch.multiprocessing, a gloo group on 127.0.0.1).
Each trains the same small CNN, its batch norms replaced by
``bncpu.torch.convert_sync_batchnorm`` and wrapped in DistributedDataParallel, on its
equal shard of the same batches. Synchronized batch norm normalizes with the whole
batch's statistics and DDP averages the gradients, so every process must follow, to
float64 rounding, the same model trained in one process on the whole batches with
torch's own BatchNorm2d. Each process checks its losses, parameters and running
statistics against that single-process run; the script prints the largest difference
and PASS or FAIL, and exits with 1 on FAIL.
"""
import argparse
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel

import bncpu.torch

SHARD = 4           # samples per process and step
TOLERANCE = 1e-10   # float64: the two runs differ only in the order of sums


def new_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).double()


def whole_batch(step, processes):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(SHARD * processes, 3, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (SHARD * processes,), generator=generator)
    return x, labels


def train(model, steps, processes, rank=None):
    """SGD on the whole batches (rank None) or on this rank's shard of them; the losses of
    the whole batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(steps):
        x, labels = whole_batch(step, processes)
        if rank is not None:
            x, labels = x[SHARD * rank:SHARD * (rank + 1)], labels[SHARD * rank:SHARD * (rank + 1)]
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        if rank is not None:   # the whole batch's loss is the mean of equal shards' losses
            dist.all_reduce(loss)
            loss /= processes
        losses.append(loss)
    return torch.stack(losses)


def largest_difference(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def worker(rank, processes, port, steps):
    # One thread per process: the processes share the machine's cores.
    torch.set_num_threads(1)
    bncpu.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=processes)
    try:
        model = bncpu.torch.convert_sync_batchnorm(new_model())
        losses = train(DistributedDataParallel(model), steps, processes, rank)
        reference = new_model()
        reference_losses = train(reference, steps, processes)
        differences = [largest_difference(losses, reference_losses)]
        reference_state = reference.state_dict()
        differences += [largest_difference(value.double(), reference_state[key].double())
                        for key, value in model.state_dict().items()]
        largest = torch.tensor(max(differences), dtype=torch.float64)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        layers = sum(isinstance(m, bncpu.torch.SyncBatchNorm) for m in model.modules())
        passed = largest.item() <= TOLERANCE and layers == 2
        if rank == 0:
            print(f"DDP on {processes} processes with {layers} bncpu.torch.SyncBatchNorm "
                  f"layers vs one process on the whole batches, {steps} steps: largest "
                  f"difference {largest.item():.2e} (tolerance {TOLERANCE:.0e}): "
                  f"{'PASS' if passed else 'FAIL'}", flush=True)
        if not passed:
            sys.exit(1)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    try:
        mp.spawn(worker, args=(args.processes, free_port(), args.steps),
                 nprocs=args.processes)
    except ProcessException as error:   # a process raised or exited with a failure
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
