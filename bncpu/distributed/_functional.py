"""Synchronized batch norm, functional: the split-phase kernels around two collectives.

Forward (training), on each of the P processes of a communicator:

    local   : (mean_p, m2_p, count_p) = batch_norm_stats(x_p)            m2 = Σ(x - mean)²
    gather  : row_p = [status, C, dtype code, count_p, mean_p, m2_p]      one all-gather
    merge   : (mean, invstd) = batch_norm_gather_stats(rows in rank order)
              M = Σ count_p,  invstd = 1/sqrt(M2/M + eps), running stats updated with the
              unbiased M2/(M - 1)
    local   : y_p = batch_norm_elemt(x_p, weight, bias, mean, invstd)

Backward:

    local   : (sum_dy_p, sum_dy_xmu_p) = batch_norm_backward_reduce(dy_p, x_p, mean)
    reduce  : [failures, sum_dy, sum_dy_xmu] = Σ_p [status, sum_dy_p, sum_dy_xmu_p]   one all-reduce
    local   : dx_p = batch_norm_backward_elemt(dy_p, x_p, mean, invstd, weight,
                                               sum_dy, sum_dy_xmu, M)
              grad_weight_p = sum_dy_xmu_p·invstd, grad_bias_p = sum_dy_p (this process's
              share, as in torch's SyncBatchNorm; data-parallel training sums them)

Every process checks all its arguments before the collective and sends the outcome in
it (``status``, with the error message in place of the statistics), and every process
checks that all agree on the channel count and dtype, so a bad argument anywhere raises
on every process instead of leaving the others blocked in a collective; nothing is
written when it raises. What can still fail after a collective (a total count of 1)
depends only on what every process received, so it fails everywhere alike. The rows are merged in rank order, so every process computes
the same statistics, bit for bit, whatever order they arrive in.
"""
import numpy as np

import bncpu
from bncpu import _validate as v
from bncpu.distributed._comm import as_communicator

# Row layout of the forward all-gather.
_HEADER = 4                       # status, channels, dtype code, count
_STATUS_OK, _STATUS_FAILED = 0.0, 1.0
_DTYPE_CODES = {np.dtype(np.float32): 1.0, np.dtype(np.float64): 2.0}
_DTYPE_NAMES = {code: dtype.name for dtype, code in _DTYPE_CODES.items()}
_MESSAGE_LIMIT = 500              # characters of a local error sent to the other processes


def _failed_row(error):
    """A row saying this process failed, carrying the error text as one byte per value."""
    message = f"{type(error).__name__}: {error}"[:_MESSAGE_LIMIT].encode("utf-8", "replace")
    return np.concatenate(([_STATUS_FAILED, len(message)],
                           np.frombuffer(message, dtype=np.uint8).astype(np.float64)))


def _message_of(row):
    length = int(row[1])
    return row[2:2 + length].astype(np.uint8).tobytes().decode("utf-8", "replace")


def _check_rows(rows, rank, local_error):
    """Raise, on every process, when a process failed or the processes disagree."""
    size = len(rows)
    failed = [(r, row) for r, row in enumerate(rows) if row[0] != _STATUS_OK]
    if local_error is not None:
        raise local_error
    if failed:
        details = "; ".join(f"process {r}: {_message_of(row)}" for r, row in failed)
        raise ValueError(f"synchronized batch norm: {len(failed)} of {size} processes failed "
                         f"their checks, nothing was computed ({details})")
    channels = [int(row[1]) for row in rows]
    if len(set(channels)) > 1:
        listing = ", ".join(f"process {r}: {c}" for r, c in enumerate(channels))
        raise ValueError(f"synchronized batch norm: the processes disagree on the number of "
                         f"channels ({listing})")
    codes = [row[2] for row in rows]
    if len(set(codes)) > 1:
        listing = ", ".join(f"process {r}: {_DTYPE_NAMES.get(code, code)}"
                            for r, code in enumerate(codes))
        raise ValueError(f"synchronized batch norm: the processes disagree on the dtype "
                         f"({listing})")
    c = channels[0]
    if any(row.shape[0] != _HEADER + 2 * c for row in rows):
        raise ValueError("synchronized batch norm: a process sent a malformed row "
                         f"(rank {rank} received lengths {[row.shape[0] for row in rows]})")


def sync_batch_norm_forward(input, weight, bias, running_mean, running_var, momentum, eps,
                            comm, *, axis=1, out=None, unbiased_running_var=True):
    """Training forward with the statistics of the whole batch over all processes.

    Every process of ``comm`` calls it with its own shard ``input`` (any number of
    samples, 0 included; the same channel count and dtype everywhere). ``comm`` is an
    mpi4py communicator, a torch.distributed process group, a Communicator, or None for
    ``MPI.COMM_WORLD``. The running statistics, when given, are updated in place with the
    global mean and unbiased variance (biased with ``unbiased_running_var=False``),
    identically on every process. ``axis`` is the channel axis (1: (N, C, *spatial),
    -1: channels-last), as in ``bncpu.batch_norm``.

    Returns ``(output, mean, invstd, count)``: the normalized shard (``out`` itself when
    given), the global float64 mean and invstd per channel and the global count, which
    ``sync_batch_norm_backward`` takes.
    """
    comm = as_communicator(comm)
    local_error = None
    try:
        x = v.as_input(input)
        axis = v.channel_axis(axis, x.ndim)
        c = x.shape[axis]
        dtype = x.dtype
        eps = v.check_eps(eps)
        momentum = v.check_momentum(momentum)
        unbiased_running_var = v.check_flag(unbiased_running_var, "unbiased_running_var")
        rm, rv = v.running_pair(running_mean, running_var, c, dtype, required=False)
        w = v.per_channel(weight, "weight", c, dtype)
        b = v.per_channel(bias, "bias", c, dtype)
        v.check_out_apart(out, running_mean=rm, running_var=rv)
        result = v.Output(out, x.shape, dtype, (x, w, b, rm, rv))
        mean, m2, count = bncpu.batch_norm_stats(x, axis=axis)
        row = np.concatenate(([_STATUS_OK, c, _DTYPE_CODES[dtype], count], mean, m2))
    except Exception as error:   # any local failure still joins the collective
        local_error = error
        row = _failed_row(error)
    rows = comm.allgather(row)
    _check_rows(rows, comm.rank, local_error)
    stacked = np.array(rows)   # rows of one length, checked above
    means = stacked[:, _HEADER:_HEADER + c]
    m2s = stacked[:, _HEADER + c:]
    counts = stacked[:, 3].astype(np.int64)
    total = int(counts.sum())
    mean, invstd = bncpu.batch_norm_gather_stats(
        means, m2s, counts, rm, rv, momentum, eps, unbiased_running_var=unbiased_running_var)
    bncpu.batch_norm_elemt(x, w, b, mean, invstd, out=result.target, axis=axis)
    return result.finish(), mean, invstd, total


def join_failed_forward(error, comm):
    """Take part in the forward's all-gather for a process that failed before it (a layer
    whose own input checks raised ``error``), so that the others raise too instead of
    waiting; then raise ``error``."""
    as_communicator(comm).allgather(_failed_row(error))
    raise error


def sync_batch_norm_backward(grad_output, input, weight, mean, invstd, count, comm, *, axis=1,
                             out=None):
    """Backward of ``sync_batch_norm_forward``: ``(grad_input, grad_weight, grad_bias)``.

    ``mean``, ``invstd`` and ``count`` are what the forward returned (the same on every
    process). grad_input is this shard's part of the gradient of the whole batch;
    grad_weight and grad_bias (None without weight) are this process's share of the
    parameter gradients: their sum over the processes is the gradient of the whole batch.
    """
    comm = as_communicator(comm)
    mean = v.as_array(mean, "mean")
    c = mean.shape[0] if mean.ndim == 1 else -1
    local_error = None
    try:
        if c < 0:
            raise ValueError(f"mean must be the 1-D mean of the forward, got shape {mean.shape}")
        x = v.as_input(input)
        axis = v.channel_axis(axis, x.ndim)
        dtype = x.dtype
        if x.shape[axis] != c:
            raise ValueError(f"input has {x.shape[axis]} channels but mean has {c}")
        dy = v.as_input(grad_output, "grad_output", dtype=dtype)
        v.same_shape(dy, "grad_output", x.shape)
        w = v.per_channel(weight, "weight", c, dtype)
        count = v.check_count(count)
        if count == 0 and x.size > 0:
            raise ValueError("count must be > 0 for a non-empty input")
        result = v.Output(out, x.shape, dtype, (dy, x, w))
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = bncpu.batch_norm_backward_reduce(
            dy, x, mean, invstd, w, axis=axis)
        sums = np.concatenate(([_STATUS_OK], sum_dy, sum_dy_xmu))
    except Exception as error:   # any local failure still joins the collective
        local_error = error
        sums = np.zeros(1 + 2 * max(c, 0))
        sums[0] = _STATUS_FAILED
    total = comm.allreduce_sum(sums)
    if local_error is not None:
        raise local_error
    if total[0] != _STATUS_OK:
        raise ValueError(f"synchronized batch norm backward: {int(total[0])} of {comm.size} "
                         f"processes failed their checks (their own error says why), nothing "
                         f"was computed")
    bncpu.batch_norm_backward_elemt(dy, x, mean, invstd, w, total[1:1 + c], total[1 + c:],
                                    count, out=result.target, axis=axis)
    return result.finish(), grad_weight, grad_bias
