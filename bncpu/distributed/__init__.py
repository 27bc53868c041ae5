"""Synchronized batch norm across processes: MPI (mpi4py) and torch.distributed.

Each process normalizes its shard of the batch with the statistics of the whole batch:
one all-gather of every process's (mean, m2, count) per channel, in float64, and in the
backward one all-reduce of a fixed-size table in which the processes agree on the
channels, dtype and count, then one of (sum_dy, sum_dy_xmu). Results equal single-process batch norm
on the concatenated batch, every process gets the same statistics bit for bit (the
partials are merged in rank order), and a bad argument on any process raises on all of
them instead of leaving the others blocked.

* ``SyncBatchNorm``: the ``bncpu.nn`` batch-norm layer with synchronized training
  statistics.
* ``sync_batch_norm_forward`` / ``sync_batch_norm_backward``: the functional steps.
* ``Communicator`` (the protocol), ``MPICommunicator``, ``TorchCommunicator``,
  ``LocalCommunicator`` (one process) and ``as_communicator``.

mpi4py and torch are imported only when a communicator of theirs is used.
"""
from bncpu.distributed._comm import (
    Communicator, LocalCommunicator, MPICommunicator, TorchCommunicator, as_communicator,
)
from bncpu.distributed._functional import sync_batch_norm_backward, sync_batch_norm_forward
from bncpu.distributed._layer import SyncBatchNorm

__all__ = [
    "SyncBatchNorm",
    "Communicator", "LocalCommunicator", "MPICommunicator", "TorchCommunicator",
    "as_communicator", "sync_batch_norm_forward", "sync_batch_norm_backward",
]
