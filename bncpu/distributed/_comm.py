"""The communicator protocol of synchronized batch norm, and its implementations.

A synchronized step needs two collectives and nothing else:

* ``allgather(row)``: every process contributes a 1-D float64 row and receives the list
  of all rows in rank order. Rows may differ in length (a process whose channel count
  disagrees, or one that failed its local checks, sends a row of another length): the
  implementation must return them all, never hang or truncate.
* ``allreduce_sum(values)``: the element-wise sum of a float64 vector of the same length
  on every process, returned to all of them; for a given number of processes it must not
  depend on the order in which the contributions arrive.

plus the attributes ``rank`` and ``size``. Another engine plugs in with a class of these
four members (the tests use one built on threads).

No module here imports mpi4py or torch until a communicator of that kind is built.
"""
import sys
from typing import List, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Communicator(Protocol):
    """What synchronized batch norm needs from a group of processes."""

    rank: int
    size: int

    def allgather(self, row: np.ndarray) -> List[np.ndarray]:
        """All processes' float64 rows, in rank order (lengths may differ)."""

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum over all processes of a float64 vector."""


class LocalCommunicator:
    """One process alone: the collectives return the local values (no synchronization)."""

    rank = 0
    size = 1

    def allgather(self, row):
        return [np.array(row, dtype=np.float64)]

    def allreduce_sum(self, values):
        return np.array(values, dtype=np.float64)

    def __repr__(self):
        return "LocalCommunicator()"


def _split_rows(gathered, lengths):
    """The rows of a (size, longest) gather, each cut to its length."""
    return [gathered[rank, :length] for rank, length in enumerate(lengths.tolist())]


def _padded(row, longest):
    padded = np.zeros(longest)
    padded[:row.shape[0]] = row
    return padded


class MPICommunicator:
    """An mpi4py communicator (default ``MPI.COMM_WORLD``).

    Rows travel as buffers, never pickled: an ``Allgather`` of their lengths, then one of
    the rows padded to the longest, so rows of different lengths arrive intact. The sums
    use the buffer ``Allreduce`` with ``MPI.SUM``, whose order of operations MPI fixes
    for a given communicator.
    """

    def __init__(self, comm=None):
        from mpi4py import MPI
        self._sum = MPI.SUM
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allgather(self, row):
        row = np.ascontiguousarray(row, dtype=np.float64)
        lengths = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([row.shape[0]], np.int64), lengths)
        gathered = np.empty((self.size, int(lengths.max())))
        self.comm.Allgather(_padded(row, gathered.shape[1]), gathered)
        return _split_rows(gathered, lengths)

    def allreduce_sum(self, values):
        values = np.ascontiguousarray(values, dtype=np.float64)
        total = np.empty_like(values)
        self.comm.Allreduce(values, total, op=self._sum)
        return total

    def __repr__(self):
        return f"MPICommunicator({self.comm!r}, rank={self.rank}, size={self.size})"


class TorchCommunicator:
    """A torch.distributed process group (default: the world group), on CPU tensors.

    Rows: an ``all_gather`` of their lengths, then one of the rows padded to the longest
    (two plain collectives: ``all_gather_object`` does the same plus pickling, and took
    1.5x as long over gloo); sums: ``all_reduce`` of a float64 tensor. torch.distributed
    must be initialized with a backend that handles CPU tensors (gloo, mpi).
    """

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group first")
        self._torch = torch
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def allgather(self, row):
        torch = self._torch
        row = np.ascontiguousarray(row, dtype=np.float64)
        lengths = torch.empty(self.size, dtype=torch.int64)
        self._dist.all_gather(list(lengths.view(self.size, 1)),
                              torch.tensor([row.shape[0]], dtype=torch.int64), group=self.group)
        gathered = torch.empty((self.size, int(lengths.max())), dtype=torch.float64)
        self._dist.all_gather(list(gathered),
                              torch.from_numpy(_padded(row, gathered.shape[1])), group=self.group)
        return _split_rows(gathered.numpy(), lengths.numpy())

    def allreduce_sum(self, values):
        total = self._torch.from_numpy(np.array(values, dtype=np.float64))
        self._dist.all_reduce(total, op=self._dist.ReduceOp.SUM, group=self.group)
        return total.numpy()

    def __repr__(self):
        return f"TorchCommunicator(group={self.group!r}, rank={self.rank}, size={self.size})"


_MEMBERS = ("rank", "size", "allgather", "allreduce_sum")
_OWN = (LocalCommunicator, MPICommunicator, TorchCommunicator)


def _is_mpi4py_comm(comm):
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and isinstance(comm, mpi.Comm)


def _is_torch_group(comm):
    dist = sys.modules.get("torch.distributed")
    return (dist is not None and dist.is_available()
            and isinstance(comm, dist.ProcessGroup))


def as_communicator(comm=None):
    """The Communicator for ``comm``.

    * None: mpi4py's ``MPI.COMM_WORLD`` (ImportError when mpi4py is missing);
    * an mpi4py ``Comm``: MPICommunicator(comm);
    * a torch.distributed ``ProcessGroup``: TorchCommunicator(comm);
    * any object with ``rank``, ``size``, ``allgather`` and ``allreduce_sum``: itself.
    """
    if isinstance(comm, _OWN):
        return comm
    if comm is None:
        try:
            return MPICommunicator()
        except ImportError:
            raise ImportError("comm=None means mpi4py's MPI.COMM_WORLD, but mpi4py is not "
                              "installed (pip install mpich mpi4py, or bncpu[mpi]); pass a "
                              "torch.distributed process group or another communicator"
                              ) from None
    if _is_mpi4py_comm(comm):
        return MPICommunicator(comm)
    if _is_torch_group(comm):
        return TorchCommunicator(comm)
    # Duck-typed: isinstance() on the runtime-checkable Protocol costs ~100 us a call.
    if all(hasattr(comm, name) for name in _MEMBERS):
        return comm
    raise TypeError(f"comm must be an mpi4py communicator, a torch.distributed process group "
                    f"or an object with rank, size, allgather and allreduce_sum, "
                    f"got {type(comm).__name__}")
