"""Synchronized batch norm (bncpu.distributed) against batch norm of the whole batch.

The scenarios here are run by P "processes" that share a communicator: threads of this
process (ThreadGroup below, a communicator written in a few lines as another engine
would), MPI ranks (tests/test_distributed_mpi.py runs this module's scenarios under
mpiexec) and torch.distributed gloo processes (tests/test_torch_sync.py). Each process
holds its shard of one batch; the results must equal single-process batch norm
(bncpu.reference, float64) of the concatenated batch: float64 to 1e-10, float32 to
float32 rounding; the running statistics must be the same, bit for bit, on every
process; a bad argument on one process must raise on all of them with nothing written.
"""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import bncpu
from conftest import CHILD_CWD
from bncpu import reference
from bncpu.distributed import (
    Communicator, LocalCommunicator, as_communicator, sync_batch_norm_backward,
    sync_batch_norm_forward,
)

CHANNELS = 3
SPATIAL = (2, 5)
# Samples of process r; the batch is their concatenation (an empty shard included).
SHARD_SIZES = (4, 1, 0, 3)
MOMENTUM, EPS = 0.1, 1e-5
# float64 to 1e-10 (relative to the largest value); float32 to a few roundings.
TOLERANCE = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-10}
THREAD_TIMEOUT = 60


# ----------------------------------------------------------------------------------
# The data of a scenario, and the truth: batch norm of the whole batch
# ----------------------------------------------------------------------------------
def shard_sizes(size, scenario="unequal"):
    if scenario == "all_empty":
        return (0,) * size
    return SHARD_SIZES[:size] if size <= len(SHARD_SIZES) else SHARD_SIZES + (2,) * (size - 4)


def channels_last(array, axis):
    """The (N, C, *spatial) array laid out with its channel axis at ``axis``."""
    return np.ascontiguousarray(np.moveaxis(array, 1, axis))


def shard(rank, size, dtype, scenario="unequal", axis=1):
    """(x, dy) of process ``rank``, channels at ``axis``: a slice of the whole batch."""
    sizes = shard_sizes(size, scenario)
    start = sum(sizes[:rank])
    x, dy = whole_batch(sum(sizes), dtype)
    return (channels_last(x[start:start + sizes[rank]], axis),
            channels_last(dy[start:start + sizes[rank]], axis))


def whole_batch(samples, dtype):
    rng = np.random.default_rng(1234)
    x = rng.normal(3.0, 2.0, size=(samples, CHANNELS) + SPATIAL).astype(dtype)
    dy = rng.normal(0.0, 1.0, size=(samples, CHANNELS) + SPATIAL).astype(dtype)
    return x, dy


def parameters(dtype, c=CHANNELS):
    """(weight, bias, running_mean, running_var), the running statistics fresh copies."""
    rng = np.random.default_rng(99)
    weight = rng.uniform(0.5, 1.5, c).astype(dtype)
    bias = rng.normal(size=c).astype(dtype)
    return weight, bias, rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)


def truth(size, dtype, scenario="unequal"):
    """Single-process float64 batch norm of the concatenated batch: a dict of arrays."""
    x, dy = (a.astype(np.float64) for a in whole_batch(sum(shard_sizes(size, scenario)), dtype))
    weight, bias, running_mean, running_var = (p.astype(np.float64) for p in parameters(dtype))
    if x.shape[0] == 0:
        return {"running_mean": running_mean, "running_var": running_var}
    y, save_mean, save_invstd = reference.batch_norm_forward(
        x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS)
    dx, grad_weight, grad_bias = reference.batch_norm_backward(
        dy, x, weight, None, None, save_mean, save_invstd, True, EPS)
    return {"y": y, "dx": dx, "grad_weight": grad_weight, "grad_bias": grad_bias,
            "running_mean": running_mean, "running_var": running_var,
            "mean": save_mean, "invstd": save_invstd}


def assert_near(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[np.dtype(dtype)] * scale)


# ----------------------------------------------------------------------------------
# One process's part of a scenario (threads, MPI ranks and gloo processes run it)
# ----------------------------------------------------------------------------------
SCENARIOS = ("unequal", "all_empty", "mismatch_channels", "mismatch_dtype", "bad_running_mean",
             "bad_grad_output", "backward_channels", "backward_dtype", "backward_count")
# Scenarios whose forward agrees but whose process 1 passes the backward one channel
# less, the other dtype or another count: every process must raise the same error.
BACKWARD_MISMATCHES = {"backward_channels": "disagree on the number of channels",
                       "backward_dtype": "disagree on the dtype",
                       "backward_count": "disagree on the count"}
UNWRITTEN = 7.0   # what the backward's out= holds before the call


def mismatched_backward(scenario, axis, x, dy, weight, mean, invstd, count):
    """The backward's arguments as process 1 of a BACKWARD_MISMATCHES scenario passes them."""
    if scenario == "backward_channels":
        fewer = np.arange(x.shape[axis] - 1)
        return (np.take(x, fewer, axis=axis), np.take(dy, fewer, axis=axis), weight[:-1],
                mean[:-1], invstd[:-1], count)
    if scenario == "backward_dtype":
        other = np.float32 if x.dtype == np.float64 else np.float64
        return x.astype(other), dy.astype(other), weight.astype(other), mean, invstd, count
    return x, dy, weight, mean, invstd, count + 1


def run_scenario(comm, scenario, dtype, axis=1):
    """Forward and backward of process comm.rank; a dict of what it computed (or the
    errors it raised), with its running statistics afterwards."""
    comm = as_communicator(comm)
    rank, size = comm.rank, comm.size
    last = rank == size - 1
    dtype = np.dtype(dtype)
    if scenario == "mismatch_dtype" and last:
        dtype = np.dtype(np.float32 if dtype == np.float64 else np.float64)
    x, dy = shard(rank, size, dtype, scenario, axis)
    if scenario == "mismatch_channels" and last:
        x = np.concatenate([x, x[:, :1]], axis=1)   # one channel more (axis 1 here)
    weight, bias, running_mean, running_var = parameters(dtype, x.shape[axis])
    passed_mean = running_mean[:-1] if scenario == "bad_running_mean" and rank == 0 else running_mean
    if scenario == "bad_grad_output" and last:
        dy = dy[:, :, :1]
    out = {"rank": rank}
    try:
        y, mean, invstd, count = sync_batch_norm_forward(
            x, weight, bias, passed_mean, running_var, MOMENTUM, EPS, comm, axis=axis)
        out.update(y=np.moveaxis(y, axis, 1), mean=mean, invstd=invstd, count=count)
        arguments = (x, dy, weight, mean, invstd, count)
        if scenario in BACKWARD_MISMATCHES and rank == 1:   # a process with values
            arguments = mismatched_backward(scenario, axis, *arguments)
        x, dy, weight, mean, invstd, count = arguments
        grad_input = np.full_like(x, UNWRITTEN)
        out["grad_input"] = grad_input
        dx, grad_weight, grad_bias = sync_batch_norm_backward(
            dy, x, weight, mean, invstd, count, comm, axis=axis, out=grad_input)
        out.update(dx=np.moveaxis(dx, axis, 1), grad_weight=grad_weight, grad_bias=grad_bias)
    except (TypeError, ValueError) as error:
        out["error"] = f"{type(error).__name__}: {error}"
    out.update(running_mean=running_mean, running_var=running_var)
    return out


def check_scenario(results, scenario, dtype, check_sums_bitwise=True):
    """Assert what the P processes' results of ``scenario`` must be."""
    size = len(results)
    dtype = np.dtype(dtype)
    _, _, initial_mean, initial_var = parameters(dtype)
    if scenario in ("mismatch_channels", "mismatch_dtype", "bad_running_mean"):
        expected = {"mismatch_channels": "disagree on the number of channels",
                    "mismatch_dtype": "disagree on the dtype",
                    "bad_running_mean": "running_mean should contain"}[scenario]
        for result in results:
            assert expected in result.get("error", ""), (result["rank"], result.get("error"))
            assert "y" not in result
        for result in results[:-1] if scenario != "bad_running_mean" else results:
            # nothing written on any process
            np.testing.assert_array_equal(result["running_mean"], initial_mean)
            np.testing.assert_array_equal(result["running_var"], initial_var)
        return
    if scenario in BACKWARD_MISMATCHES:
        errors = {result["error"] for result in results if "error" in result}
        assert len(errors) == 1 and all("error" in result for result in results), errors
        assert BACKWARD_MISMATCHES[scenario] in errors.pop()
        for result in results:   # the forward ran; the backward wrote nothing
            assert "y" in result and "dx" not in result, result["rank"]
            np.testing.assert_array_equal(result["grad_input"], UNWRITTEN)
        return
    if scenario == "bad_grad_output":
        for result in results:
            assert "y" in result and "dx" not in result, result["rank"]
            assert "grad_output" in result["error"] or "processes failed" in result["error"]
        assert "grad_output has shape" in results[-1]["error"]
        return
    expected = truth(size, dtype, scenario)
    first = results[0]
    for result in results:
        assert "error" not in result, result["error"]
        # Identical statistics everywhere, bit for bit.
        for name in ("running_mean", "running_var", "mean", "invstd"):
            assert result[name].tobytes() == first[name].tobytes(), (name, result["rank"])
        assert result["count"] == sum(shard_sizes(size, scenario)) * int(np.prod(SPATIAL))
        assert result["y"].dtype == dtype and result["dx"].dtype == dtype
    for name in ("running_mean", "running_var"):
        assert_near(first[name], expected[name], dtype)
        assert first[name].dtype == dtype
    if scenario == "all_empty":
        np.testing.assert_array_equal(first["running_mean"], initial_mean)
        np.testing.assert_array_equal(first["running_var"], initial_var)
        return
    assert_near(first["mean"], expected["mean"], dtype)
    assert_near(first["invstd"], expected["invstd"], dtype)
    for name in ("y", "dx"):
        assert_near(np.concatenate([r[name] for r in results]), expected[name], dtype)
    for name in ("grad_weight", "grad_bias"):   # shares that sum to the whole batch's
        assert_near(sum(r[name].astype(np.float64) for r in results), expected[name], dtype)


# ----------------------------------------------------------------------------------
# A communicator of threads: another engine in a few lines
# ----------------------------------------------------------------------------------
class ThreadGroup:
    """``size`` threads exchanging through shared slots and a barrier."""

    def __init__(self, size, delays=None):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=THREAD_TIMEOUT)
        self.slots = [None] * size
        self.delays = delays   # per-rank sleep before contributing: another arrival order

    def member(self, rank):
        return ThreadMember(self, rank)


class ThreadMember:
    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, value):
        if self.group.delays is not None:
            time.sleep(self.group.delays[self.rank])
        self.group.slots[self.rank] = np.array(value, dtype=np.float64)
        self.group.barrier.wait()
        values = list(self.group.slots)
        self.group.barrier.wait()
        return values

    def allgather(self, row):
        return self._exchange(row)

    def allreduce_sum(self, values):
        total = np.zeros_like(np.asarray(values, dtype=np.float64))
        for contribution in self._exchange(values):   # rank order
            total += contribution
        return total


def run_threads(size, function, delays=None):
    """function(communicator) on ``size`` threads; their results in rank order."""
    group = ThreadGroup(size, delays)
    results = [None] * size

    def target(rank):
        try:
            results[rank] = function(group.member(rank))
        except BaseException as error:   # reported below, by the test's thread
            results[rank] = error

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(THREAD_TIMEOUT)
        assert not thread.is_alive(), "a synchronized step hung"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_equals_whole_batch(size, dtype):
    results = run_threads(size, lambda comm: run_scenario(comm, "unequal", dtype))
    check_scenario(results, "unequal", dtype)


@pytest.mark.parametrize("axis", [-1, 2, 0])
def test_channel_axis(axis):
    results = run_threads(3, lambda comm: run_scenario(comm, "unequal", np.float64, axis))
    check_scenario(results, "unequal", np.float64)


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "unequal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scenarios(scenario, dtype):
    results = run_threads(3, lambda comm: run_scenario(comm, scenario, dtype))
    check_scenario(results, scenario, dtype)


def test_error_names_the_failing_process():
    results = run_threads(3, lambda comm: run_scenario(comm, "bad_running_mean", np.float64))
    assert results[0]["error"].startswith("ValueError: running_mean should contain 3 elements")
    for result in results[1:]:
        assert "1 of 3 processes failed" in result["error"]
        assert "process 0: ValueError: running_mean should contain 3 elements" in result["error"]


def test_arrival_order_and_threads_do_not_change_bits():
    """Processes contributing in another order, and kernels on another thread count,
    give the same bits."""
    def step(comm):
        return run_scenario(comm, "unequal", np.float32)

    baseline = run_threads(4, step)
    bncpu.set_num_threads(1)
    try:
        reordered = run_threads(4, step, delays=[0.03, 0.0, 0.02, 0.01])
    finally:
        bncpu.set_num_threads(0)
    for first, second in zip(baseline, reordered):
        for name in ("y", "dx", "grad_weight", "grad_bias", "running_mean", "running_var"):
            assert first[name].tobytes() == second[name].tobytes(), name


def test_one_value_in_total_raises_everywhere():
    def step(comm):
        x = np.ones((1 if comm.rank == 1 else 0, 2), np.float64)
        with pytest.raises(ValueError, match="total count of 1"):
            sync_batch_norm_forward(x, None, None, None, None, 0.1, 1e-5, comm)
        return True

    assert run_threads(3, step) == [True] * 3


def test_out_and_no_weight():
    """out= receives the output (in place too); without weight no parameter gradients."""
    def step(comm):
        x, dy = shard(comm.rank, comm.size, np.float64)
        expected_y, mean, invstd, count = sync_batch_norm_forward(
            x, None, None, None, None, 0.1, 1e-5, comm)
        in_place = x.copy()
        y, *_ = sync_batch_norm_forward(in_place, None, None, None, None, 0.1, 1e-5, comm,
                                        out=in_place)
        assert y is in_place
        np.testing.assert_array_equal(y, expected_y)
        out = np.empty_like(x)
        dx, grad_weight, grad_bias = sync_batch_norm_backward(dy, x, None, mean, invstd, count,
                                                              comm, out=out)
        assert dx is out and grad_weight is None and grad_bias is None
        return dx

    results = run_threads(2, step)
    x, dy = whole_batch(sum(shard_sizes(2)), np.float64)
    _, save_mean, save_invstd = reference.batch_norm_forward(x, None, None, None, None, True,
                                                             0.1, 1e-5)
    expected, _, _ = reference.batch_norm_backward(dy, x, None, None, None, save_mean,
                                                   save_invstd, True, 1e-5)
    assert_near(np.concatenate(results), expected, np.float64)


def test_out_overlapping_running_stats_rejected():
    """An out= sharing memory with the running statistics would overwrite their update:
    rejected before the collective, nothing written."""
    from bncpu.distributed._comm import LocalCommunicator
    x = np.random.default_rng(0).random((6, 3), dtype=np.float64)
    storage = np.zeros(18 + 6)
    running_mean, running_var = storage[:3], storage[3:6]
    running_var[:] = 1.0
    before = storage.copy()
    with pytest.raises(ValueError, match="out shares memory with running_mean"):
        sync_batch_norm_forward(x, None, None, running_mean, running_var, 0.1, 1e-5,
                                LocalCommunicator(), out=storage[:18].reshape(6, 3))
    np.testing.assert_array_equal(storage, before)


def test_local_communicator_equals_batch_norm():
    x, dy = shard(0, 1, np.float64)
    weight, bias, running_mean, running_var = parameters(np.float64)
    fused_mean, fused_var = running_mean.copy(), running_var.copy()
    y, mean, invstd, count = sync_batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                     MOMENTUM, EPS, LocalCommunicator())
    expected_y, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, weight, bias, fused_mean, fused_var, True, MOMENTUM, EPS)
    assert_near(y, expected_y, np.float64)
    assert_near(running_mean, fused_mean, np.float64)
    assert_near(running_var, fused_var, np.float64)
    dx, grad_weight, grad_bias = sync_batch_norm_backward(dy, x, weight, mean, invstd, count,
                                                          LocalCommunicator())
    expected = bncpu.batch_norm_backward(dy, x, weight, None, None, save_mean, save_invstd,
                                         True, EPS)
    for actual, wanted in zip((dx, grad_weight, grad_bias), expected):
        assert_near(actual, wanted, np.float64)


def test_as_communicator():
    local = LocalCommunicator()
    assert as_communicator(local) is local
    assert isinstance(ThreadGroup(2).member(0), Communicator)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        as_communicator("world")


def test_import_needs_neither_mpi4py_nor_torch():
    code = ("import sys, bncpu.distributed; "
            "print(sorted(m for m in ('mpi4py', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=CHILD_CWD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------
# The layer: bncpu.distributed.SyncBatchNorm against bncpu.nn.BatchNorm2d on the whole batch
# ----------------------------------------------------------------------------------
LAYER_STEPS = 3


def layer_steps(layer, shards, rank, dtype, axis=1):
    """LAYER_STEPS training steps (forward, backward) on this rank's part of the batch,
    gradients accumulated, then an evaluation forward: what the layer computed."""
    start = sum(shards[:rank])
    record = {"y": [], "dx": []}
    for step in range(LAYER_STEPS):
        rng = np.random.default_rng(step)
        x = rng.normal(1.0, 2.0, (sum(shards), CHANNELS) + SPATIAL).astype(dtype)
        dy = rng.normal(0.0, 1.0, x.shape).astype(dtype)
        part = slice(start, start + shards[rank])
        record["y"].append(np.moveaxis(layer(channels_last(x[part], axis)), axis, 1))
        record["dx"].append(np.moveaxis(layer.backward(channels_last(dy[part], axis)), axis, 1))
    layer.eval()
    record["y_eval"] = np.moveaxis(layer(channels_last(x[part], axis)), axis, 1)
    record["state"] = layer.state_dict()
    record["grad_weight"], record["grad_bias"] = layer.grad_weight, layer.grad_bias
    return record


@pytest.mark.parametrize("momentum, axis, dtype", [(0.1, 1, np.float64), (None, -1, np.float32),
                                                   (1.0, 1, np.float32)])
def test_layer_equals_whole_batch(momentum, axis, dtype):
    from bncpu.distributed import SyncBatchNorm
    from bncpu.nn import BatchNorm2d
    shards = SHARD_SIZES[:3]

    def step(comm):
        layer = SyncBatchNorm(CHANNELS, momentum=momentum, comm=comm, dtype=dtype, axis=axis)
        layer.weight[:] = np.linspace(0.5, 1.5, CHANNELS)
        return layer_steps(layer, shards, comm.rank, dtype, axis)

    ranks = run_threads(3, step)
    whole = BatchNorm2d(CHANNELS, momentum=momentum, dtype=dtype)
    whole.weight[:] = np.linspace(0.5, 1.5, CHANNELS)
    expected = layer_steps(whole, (sum(shards),), 0, dtype)
    for name in ("y", "dx"):
        for s in range(LAYER_STEPS):
            assert_near(np.concatenate([r[name][s] for r in ranks]), expected[name][s], dtype)
    assert_near(np.concatenate([r["y_eval"] for r in ranks]), expected["y_eval"], dtype)
    for name in ("grad_weight", "grad_bias"):
        assert_near(sum(r[name].astype(np.float64) for r in ranks), expected[name], dtype)
    for key, value in expected["state"].items():
        for r in ranks:
            assert r["state"][key].tobytes() == ranks[0]["state"][key].tobytes(), key
        assert_near(ranks[0]["state"][key], value, dtype)


def test_layer_interface():
    from bncpu.distributed import SyncBatchNorm
    layer = SyncBatchNorm(2, comm=LocalCommunicator(), dtype=np.float64, affine=False,
                          track_running_stats=False)
    assert "comm=LocalCommunicator()" in repr(layer)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        layer(np.ones(3))
    x = np.arange(24, dtype=np.float64).reshape(2, 2, 3, 2)   # any rank >= 2
    y = layer(x)
    assert layer.grad_weight is None and layer.backward(np.ones_like(x)).shape == x.shape
    np.testing.assert_allclose(y, bncpu.batch_norm(x, None, None, training=True), atol=1e-12)
    assert layer.state_dict() == {}
    with pytest.raises(TypeError, match="comm must be"):
        SyncBatchNorm(2, comm=object())


def test_layer_error_on_one_process_leaves_every_layer_unchanged():
    from bncpu.distributed import SyncBatchNorm

    def step(comm):
        layer = SyncBatchNorm(CHANNELS, comm=comm, dtype=np.float64)
        x, _ = shard(comm.rank, comm.size, np.float64)
        if comm.rank == 1:
            x = x.astype(np.float32)   # the layer computes in float64: a local TypeError
        with pytest.raises((TypeError, ValueError)) as error:
            layer(x)
        return error.value, layer.state_dict()

    results = run_threads(3, step)
    assert isinstance(results[1][0], TypeError)
    for error, state in results:
        assert int(state["num_batches_tracked"]) == 0
        np.testing.assert_array_equal(state["running_mean"], 0)
        np.testing.assert_array_equal(state["running_var"], 1)


# ----------------------------------------------------------------------------------
# Any split of any batch
# ----------------------------------------------------------------------------------
def test_any_split_equals_whole_batch():
    """Random batches split at random points (empty shards included) over 1-4 threads."""
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(size=st.integers(1, 4), samples=st.integers(2, 9),
                      channels=st.integers(1, 5), spatial=st.integers(1, 7),
                      cuts=st.lists(st.floats(0, 1), min_size=3, max_size=3),
                      dtype=st.sampled_from([np.float32, np.float64]),
                      seed=st.integers(0, 2**32 - 1))
    def check(size, samples, channels, spatial, cuts, dtype, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(rng.uniform(-5, 5), rng.uniform(0.1, 3),
                       (samples, channels, spatial)).astype(dtype)
        dy = rng.normal(size=x.shape).astype(dtype)
        weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
        bounds = [0] + sorted(int(c * samples) for c in cuts[:size - 1]) + [samples]

        def step(comm):
            part = slice(bounds[comm.rank], bounds[comm.rank + 1])
            y, mean, invstd, count = sync_batch_norm_forward(x[part], weight, None, None, None,
                                                             0.1, EPS, comm)
            dx, grad_weight, _ = sync_batch_norm_backward(dy[part], x[part], weight, mean,
                                                          invstd, count, comm)
            return y, dx, grad_weight

        results = run_threads(size, step)
        wide = [a.astype(np.float64) for a in (x, dy, weight)]
        y, save_mean, save_invstd = reference.batch_norm_forward(wide[0], wide[2], None, None,
                                                                 None, True, 0.1, EPS)
        dx, grad_weight, _ = reference.batch_norm_backward(wide[1], wide[0], wide[2], None,
                                                           None, save_mean, save_invstd, True,
                                                           EPS)
        assert_near(np.concatenate([r[0] for r in results]), y, dtype)
        assert_near(np.concatenate([r[1] for r in results]), dx, dtype)
        assert_near(sum(r[2].astype(np.float64) for r in results), grad_weight, dtype)

    check()


def test_every_argument_is_checked_before_the_collective():
    """A bad argument that the kernels would only meet after the collective (here the
    running-variance flag) is caught on its process before it, so all raise together."""
    def step(comm):
        x, _ = shard(comm.rank, comm.size, np.float64)
        flag = "yes" if comm.rank == 2 else True
        with pytest.raises((TypeError, ValueError), match="unbiased_running_var must be a bool"):
            sync_batch_norm_forward(x, None, None, None, None, 0.1, 1e-5, comm,
                                    unbiased_running_var=flag)
        return True

    assert run_threads(3, step) == [True] * 3


def test_layer_backward_error_on_one_process_raises_everywhere():
    """A grad_output that the layer's own checks reject on one process: that process still
    joins the backward's collective, so every process raises and none waits."""
    from bncpu.distributed import SyncBatchNorm

    def step(comm):
        layer = SyncBatchNorm(CHANNELS, comm=comm, dtype=np.float64)
        x, dy = shard(comm.rank, comm.size, np.float64)
        layer(x)
        if comm.rank == 1:
            dy = dy[:, :, :1]
        with pytest.raises(ValueError) as error:
            layer.backward(dy)
        return str(error.value), layer.grad_weight

    results = run_threads(3, step)
    assert "grad_output has shape" in results[1][0]
    for message, grad_weight in results:
        assert grad_weight is None
    for message, _ in results[0::2]:
        assert "1 of 3 processes failed their checks (see the error raised on process 1)" in message


def test_layer_eps_changed_on_one_process_raises_everywhere():
    """An eps set to a bad value after construction, on one process: caught before the
    collective, so every process raises and none is left in the next step."""
    from bncpu.distributed import SyncBatchNorm

    def step(comm):
        layer = SyncBatchNorm(CHANNELS, comm=comm, dtype=np.float64)
        if comm.rank == 2:
            layer.eps = -1.0
        with pytest.raises(ValueError) as error:
            layer(shard(comm.rank, comm.size, np.float64)[0])
        return str(error.value), int(layer.num_batches_tracked)

    results = run_threads(3, step)
    assert results[2][0].startswith("eps must be finite and >= 0")
    for message, tracked in results:
        assert tracked == 0 and "eps must be finite" in message
