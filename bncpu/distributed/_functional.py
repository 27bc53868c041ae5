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
    agree   : Σ_p header_p, header_p = [status, C, dtype code, M] in process p's own slot
              of a (P, 5) table of zeros (M in two exact halves)            one all-reduce
    reduce  : [sum_dy, sum_dy_xmu] = Σ_p [sum_dy_p, sum_dy_xmu_p]          one all-reduce
    local   : dx_p = batch_norm_backward_elemt(dy_p, x_p, mean, invstd, weight,
                                               sum_dy, sum_dy_xmu, M)
              grad_weight_p = sum_dy_xmu_p·invstd, grad_bias_p = sum_dy_p (this process's
              share, as in torch's SyncBatchNorm; data-parallel training sums them)

Every process checks all its arguments before the first collective and sends the outcome
in it (``status``; in the forward with the error message in place of the statistics), and
every process checks that all agree on the channel count and dtype (and in the backward
on the count), so a bad argument anywhere raises the same error on every process instead
of leaving the others blocked in a collective; nothing is written when it raises. The
backward needs its own fixed-size agreement before the sums: an all-reduce of vectors of
different lengths (processes that disagree on C) truncates on one process and blocks the
others. What can still fail after a collective (a total count of 1) depends only on what
every process received, so it fails everywhere alike. The rows are merged in rank order,
so every process computes the same statistics, bit for bit, whatever order they arrive in.

The public functions check their arguments and call ``synchronized_forward`` /
``synchronized_backward``, which take checked arguments; the layers check their own and
call those directly.
"""
import numpy as np

from bncpu import _validate as v
from bncpu._batch_norm import (
    check_backward_count, check_total_count, run_backward_elemt, run_backward_reduce,
    run_elemt, run_gather_stats, run_stats,
)
from bncpu.distributed._comm import as_communicator

# Row layout of the forward all-gather.
_HEADER = 4                       # status, channels, dtype code, count
_STATUS_OK, _STATUS_FAILED = 0.0, 1.0
_DTYPE_CODES = {np.dtype(np.float32): 1.0, np.dtype(np.float64): 2.0}
_DTYPE_NAMES = {code: dtype.name for dtype, code in _DTYPE_CODES.items()}
_MESSAGE_LIMIT = 500              # characters of a local error sent to the other processes
# Slot of each process in the backward's agreement table.
_SLOT = 5                         # status, channels, dtype code, count // 2**32, count % 2**32
_HALF = 2**32                     # counts (< 2**63) travel as two halves, exact in float64


def _failed_row(error):
    """A row saying this process failed, carrying the error text as one byte per value."""
    message = f"{type(error).__name__}: {error}"[:_MESSAGE_LIMIT].encode("utf-8", "replace")
    return np.concatenate(([_STATUS_FAILED, len(message)],
                           np.frombuffer(message, dtype=np.uint8).astype(np.float64)))


def _message_of(row):
    length = int(row[1])
    return row[2:2 + length].astype(np.uint8).tobytes().decode("utf-8", "replace")


def _check_agreement(step, what, values, shown=str):
    """ValueError, on every process alike, unless all processes sent the same value."""
    if len(set(values)) > 1:
        listing = ", ".join(f"process {r}: {shown(value)}" for r, value in enumerate(values))
        raise ValueError(f"{step}: the processes disagree on the {what} ({listing})")


def _dtype_name(code):
    return _DTYPE_NAMES.get(code, code)


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
    step = "synchronized batch norm"
    channels = [int(row[1]) for row in rows]
    _check_agreement(step, "number of channels", channels)
    _check_agreement(step, "dtype", [row[2] for row in rows], _dtype_name)
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
    try:
        x = v.as_input(input)
        layout = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
        eps = v.check_eps(eps)
        momentum = v.check_momentum(momentum)
        unbiased_running_var = v.check_flag(unbiased_running_var, "unbiased_running_var")
        w, b, rm, rv = forward_channel_args(x, layout, weight, bias, running_mean, running_var)
        v.check_out_apart(out, running_mean=rm, running_var=rv)
        result = v.Output(out, x.shape, x.dtype, (x, w, b, rm, rv))
    except Exception as error:   # any local failure still joins the collective
        join_failed_forward(error, comm)
    mean, invstd, total = synchronized_forward(comm, x, result.target, layout, w, b, rm, rv,
                                               momentum, eps, unbiased_running_var)
    return result.finish(), mean, invstd, total


def forward_channel_args(x, layout, weight, bias, running_mean, running_var):
    """The checked (weight, bias, running_mean, running_var) of a synchronized forward of
    the checked shard ``x`` of (outer, C, inner) ``layout`` (one value per channel is
    fine here: only the whole batch's count matters)."""
    c = layout[1]
    rm, rv = v.running_pair(running_mean, running_var, c, x.dtype, required=False)
    return (v.per_channel(weight, "weight", c, x.dtype), v.per_channel(bias, "bias", c, x.dtype),
            rm, rv)


def synchronized_forward(comm, x, y, layout, w, b, rm, rv, momentum, eps, unbiased_running_var):
    """The forward's collective step on checked arguments (a Communicator, the input, the
    array ``y`` that receives the output, ...): returns (mean, invstd, total count)."""
    local_error = None
    try:
        mean, m2, count = run_stats(x, layout)
        row = np.concatenate(([_STATUS_OK, layout[1], _DTYPE_CODES[x.dtype], count], mean, m2))
    except Exception as error:   # a kernel's failure (memory) still joins the collective
        local_error = error
        row = _failed_row(error)
    rows = comm.allgather(row)
    _check_rows(rows, comm.rank, local_error)
    c = layout[1]
    stacked = np.array(rows)   # rows of one length, checked above
    means = np.ascontiguousarray(stacked[:, _HEADER:_HEADER + c])
    m2s = np.ascontiguousarray(stacked[:, _HEADER + c:])
    counts = stacked[:, 3].astype(np.int64)
    total = int(counts.sum())
    check_total_count(total)
    float32_stats = rm is not None and rm.dtype == np.float32
    mean, invstd = run_gather_stats(means, m2s, counts, rm, rv, momentum, eps,
                                    unbiased_running_var, float32_stats)
    run_elemt(x, y, layout, mean, invstd, w, b)
    return mean, invstd, total


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
    Processes that disagree on the channel count, the dtype or ``count`` all raise the same
    ValueError, and nothing is written.
    """
    comm = as_communicator(comm)
    try:
        mean = v.as_array(mean, "mean")
        if mean.ndim != 1:
            raise ValueError(f"mean must be the 1-D mean of the forward, got shape {mean.shape}")
        c = mean.shape[0]
        x = v.as_input(input)
        axis = v.channel_axis(axis, x.ndim)
        if x.shape[axis] != c:
            raise ValueError(f"input has {x.shape[axis]} channels but mean has {c}")
        dtype = x.dtype
        layout = v.channel_layout(x.shape, axis)
        dy = v.grad_output(grad_output, x)
        w = v.per_channel(weight, "weight", c, dtype)
        count = check_backward_count(v.check_count(count), x)
        mean = v.stats_array(mean, "mean", c)
        invstd = v.stats_array(invstd, "invstd", c)
        result = v.Output(out, x.shape, dtype, (dy, x, w))
    except Exception as error:   # any local failure still joins the collective
        join_failed_backward(error, comm)
    grad_weight, grad_bias = synchronized_backward(comm, dy, x, result.target, layout, w, mean,
                                                   invstd, count)
    return result.finish(), grad_weight, grad_bias


def _agreement_header(comm, failed, c=0, dtype=None, count=0):
    """This process's slot of the backward's agreement table, zeros elsewhere."""
    header = np.zeros((comm.size, _SLOT))
    header[comm.rank] = (_STATUS_FAILED if failed else _STATUS_OK, c,
                         _DTYPE_CODES.get(dtype, 0.0), count // _HALF, count % _HALF)
    return header.reshape(-1)


def _check_agreement_table(table, size, local_error):
    """Raise, on every process, when a process failed or the processes disagree on the
    channels, the dtype or the count of the backward."""
    table = table.reshape(size, _SLOT)
    if local_error is not None:
        raise local_error
    failed = [r for r in range(size) if table[r, 0] != _STATUS_OK]
    if failed:
        where = (f"the error raised on process {failed[0]}" if len(failed) == 1 else
                 f"the errors raised on processes {', '.join(map(str, failed))}")
        raise ValueError(f"synchronized batch norm backward: {len(failed)} of {size} processes "
                         f"failed their checks (see {where}), nothing was computed")
    step = "synchronized batch norm backward"
    _check_agreement(step, "number of channels", [int(c) for c in table[:, 1]])
    _check_agreement(step, "dtype", list(table[:, 2]), _dtype_name)
    _check_agreement(step, "count", [int(hi) * _HALF + int(lo) for hi, lo in table[:, 3:]])


def join_failed_backward(error, comm):
    """Take part in the backward's agreement for a process whose own checks raised
    ``error``, so that the others raise too instead of waiting; then raise ``error``."""
    comm = as_communicator(comm)
    comm.allreduce_sum(_agreement_header(comm, failed=True))
    raise error


def synchronized_backward(comm, dy, x, dx, layout, w, mean, invstd, count):
    """The backward's collective step on checked arguments (``dx`` receives grad_input):
    returns this process's (grad_weight, grad_bias)."""
    local_error = None
    try:
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = run_backward_reduce(dy, x, layout, mean,
                                                                         invstd, w)
        header = _agreement_header(comm, False, layout[1], x.dtype, count)
    except Exception as error:   # a kernel's failure (memory) still joins the collective
        local_error = error
        header = _agreement_header(comm, failed=True)
    _check_agreement_table(comm.allreduce_sum(header), comm.size, local_error)
    c = layout[1]
    total = comm.allreduce_sum(np.concatenate((sum_dy, sum_dy_xmu)))
    run_backward_elemt(dy, x, dx, layout, mean, invstd, w, total[:c], total[c:], count)
    return grad_weight, grad_bias
