"""bncpu.distributed.SyncBatchNorm: the bncpu.nn batch-norm layer, statistics synchronized.

The layer is ``bncpu.nn``'s batch norm (parameters, running statistics, momentum and
``num_batches_tracked``, train/eval, gradient accumulation, state dicts with torch's
keys); only its two training hooks are replaced, by the synchronized forward and
backward of bncpu.distributed._functional.
"""
import collections

import numpy as np

from bncpu.distributed._comm import as_communicator
from bncpu import _validate as v
from bncpu.distributed._functional import (
    forward_channel_args, join_failed_backward, join_failed_forward, synchronized_backward,
    synchronized_forward,
)
from bncpu.nn._batch_norm import _BatchNorm

# What a synchronized training forward keeps for its backward.
_GlobalStatistics = collections.namedtuple("_GlobalStatistics", ["mean", "invstd", "count"])


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the whole batch of all processes of ``comm``, as torch.nn.SyncBatchNorm.

    ``comm``: an mpi4py communicator (None: ``MPI.COMM_WORLD``, resolved at the first
    training forward, when mpi4py is imported), a torch.distributed process group or a
    ``bncpu.distributed.Communicator``. Inputs of any rank >= 2, channels along ``axis``
    (1, or -1 for channels last). Every process calls ``layer(x)`` and
    ``layer.backward(dy)`` with its own shard (possibly empty) in the same order.

    Training: output and grad_input are those of batch norm on the concatenated batch;
    the running statistics (global mean and unbiased variance) are the same on every
    process. ``grad_weight``/``grad_bias`` accumulate this process's share, as in torch's
    SyncBatchNorm: summed over the processes (which a data-parallel optimizer does with
    every parameter's gradient) they are the gradients of the whole batch. Evaluation
    needs no communication and uses the running statistics (or, without them, the local
    batch, as torch does).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, comm=None, bias=True, dtype=np.float32, axis=1,
                 unbiased_running_var=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias,
                         dtype=dtype, axis=axis, unbiased_running_var=unbiased_running_var)
        # comm=None resolves (imports mpi4py) at the first use.
        self._comm = None if comm is None else as_communicator(comm)

    @property
    def comm(self):
        """The Communicator the layer synchronizes through."""
        if self._comm is None:
            self._comm = as_communicator(None)
        return self._comm

    def _check_input_dim(self, x):
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")

    def forward(self, input):
        """The layer's output; in training a collective step that every process joins,
        even one whose input the layer's own checks reject (it then raises everywhere)."""
        self._joined = False
        try:
            return super().forward(input)
        except Exception as error:
            if self.training and not self._joined:
                join_failed_forward(error, self.comm)
            raise

    def backward(self, grad_output):
        """grad_input; in training a collective step that every process joins, even one
        whose grad_output the layer's checks reject (it then raises everywhere)."""
        synchronized = self._saved is not None and self._saved[0] == "train"
        self._joined = False
        try:
            return super().backward(grad_output)
        except Exception as error:
            if synchronized and not self._joined:
                join_failed_backward(error, self.comm)
            raise

    def _train_forward(self, x, layout, running_mean, running_var, momentum):
        # eps and momentum are checked again here, not left to the kernels: a value changed
        # since construction would fail after the collective on this process alone.
        eps = v.check_eps(self.eps)
        momentum = v.check_momentum(momentum)
        w, b, rm, rv = forward_channel_args(x, layout, self.weight, self.bias, running_mean,
                                            running_var)
        self._joined = True
        output = np.empty_like(x)
        mean, invstd, count = synchronized_forward(self.comm, x, output, layout, w, b, rm, rv,
                                                   momentum, eps, self.unbiased_running_var)
        return output, _GlobalStatistics(mean, invstd, count), None

    def _train_backward(self, grad_output, x, layout, statistics, _):
        w = v.per_channel(self.weight, "weight", layout[1], x.dtype)
        self._joined = True
        grad_input = np.empty_like(x)
        grad_weight, grad_bias = synchronized_backward(
            self.comm, grad_output, x, grad_input, layout, w, statistics.mean, statistics.invstd,
            statistics.count)
        return grad_input, grad_weight, grad_bias

    def extra_repr(self):
        return f"{super().extra_repr()}, comm={self._comm!r}"
