"""bncpu.torch.SyncBatchNorm and convert_sync_batchnorm on CPU tensors over gloo.

The test spawns WORLD processes of this very file (``python test_torch_sync.py rank
world init_file outdir``) that join a torch.distributed gloo group on 127.0.0.1 and run
every scenario below in turn, saving what each rank computed; the tests then compare
the ranks' results with single-process torch.nn.BatchNorm2d on the concatenated batch
(float64 to 1e-10, float32 to float32 rounding). The launch is bounded in time: past it
every process is killed and the test fails instead of hanging.

Single-process behaviour (no torch.distributed: plain batch norm, conversion, state
dicts, fallback) is tested in this process.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORLD = 3
SHARDS = (3, 0, 5)          # samples per rank (one empty)
DDP_SHARDS = (3, 2, 5)      # DistributedDataParallel: every rank has samples
CHANNELS, SPATIAL = 4, (3, 3)
STEPS = 3
LAUNCH_TIMEOUT = 240
FUNCTIONAL_SCENARIOS = ("unequal", "mismatch_dtype", "bad_running_mean", "backward_channels",
                        "backward_dtype", "backward_count")
TOLERANCE = {"float32": 3e-6, "float64": 1e-10}

if __name__ != "__main__":
    import pytest
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    import bncpu
    from test_distributed import check_scenario
else:
    import torch


# ----------------------------------------------------------------------------------
# Data, and the same steps on one process (the truth) or on a rank
# ----------------------------------------------------------------------------------
def batch(shards, dtype, step):
    """(x, dy) of the whole batch at a training step, as float64 arrays of dtype's values."""
    rng = np.random.default_rng(100 + step)
    shape = (sum(shards), CHANNELS) + SPATIAL
    x = rng.normal(2.0, 3.0, shape).astype(dtype).astype(np.float64)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype).astype(np.float64)
    return x, dy


def part(array, shards, rank):
    start = sum(shards[:rank])
    return array[start:start + shards[rank]]


def bn_steps(module, shards, rank, dtype, channels_last=False):
    """STEPS training steps of a batch-norm module on this rank's part of the batch,
    then one evaluation forward; every output, gradient and buffer, as float64 arrays."""
    torch_dtype = getattr(torch, dtype)
    module = module.to(torch_dtype)
    record = {}
    for step in range(STEPS):
        x, dy = (torch.tensor(part(a, shards, rank), dtype=torch_dtype)
                 for a in batch(shards, dtype, step))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = module(x)
        (y * dy).sum().backward()
        record[f"y{step}"] = y.detach().double().numpy()
        record[f"dx{step}"] = x.grad.double().numpy()
        record[f"grad_weight{step}"] = module.weight.grad.double().numpy().copy()
        record[f"grad_bias{step}"] = module.bias.grad.double().numpy().copy()
        module.weight.grad = module.bias.grad = None
        if channels_last:
            record[f"channels_last{step}"] = np.array(
                y.is_contiguous(memory_format=torch.channels_last))
    module.eval()
    x, _ = batch(shards, dtype, STEPS)
    record["y_eval"] = module(torch.tensor(part(x, shards, rank), dtype=torch_dtype)).detach().double().numpy()
    record["running_mean"] = module.running_mean.double().numpy()
    record["running_var"] = module.running_var.double().numpy()
    record["num_batches_tracked"] = module.num_batches_tracked.numpy()
    return record


def new_bn(momentum=0.1):
    torch.manual_seed(0)
    module = torch.nn.BatchNorm2d(CHANNELS, momentum=momentum)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    return module


def new_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(CHANNELS, 6, 3, padding=1),
                               torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.Conv2d(6, 2, 1))


def ddp_steps(model, shards, rank, size, dtype):
    """STEPS SGD steps; the loss is scaled so that the gradient averaged over the ranks
    (as DistributedDataParallel does) is the whole batch's."""
    torch_dtype = getattr(torch, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = {}
    for step in range(STEPS):
        x, _ = batch(shards, dtype, step)
        x = torch.tensor(part(x, shards, rank), dtype=torch_dtype)
        loss = (model(x) ** 2).sum() * size / sum(shards)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record[f"loss{step}"] = np.array(loss.item() / size)
    module = getattr(model, "module", model)
    for name, tensor in module.state_dict().items():
        record[f"state.{name}"] = tensor.double().numpy()
    return record


# ----------------------------------------------------------------------------------
# The rank's side
# ----------------------------------------------------------------------------------
def rank_main(rank, world, init_file, outdir):
    import torch.distributed as dist

    import bncpu.torch as bt
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)

    def save(name, record):
        np.savez(Path(outdir) / f"{name}_rank{rank}.npz", **record)

    for dtype in ("float64", "float32"):
        save(f"module_{dtype}", bn_steps(bt.SyncBatchNorm.convert_sync_batchnorm(new_bn()),
                                         SHARDS, rank, dtype))
    save("channels_last", bn_steps(bt.convert_sync_batchnorm(new_bn()), SHARDS, rank,
                                   "float32", channels_last=True))
    save("momentum_none", bn_steps(bt.convert_sync_batchnorm(new_bn(momentum=None)), SHARDS,
                                   rank, "float64"))
    model = bt.convert_sync_batchnorm(new_model().double())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    save("ddp", ddp_steps(ddp, DDP_SHARDS, rank, world, "float64"))
    # Mismatched channel counts: every rank must raise (and no rank hang).
    channels = CHANNELS + (rank == world - 1)
    module = bt.SyncBatchNorm(channels).double()
    try:
        module(torch.ones((2, channels, 2), dtype=torch.float64))
        message = ""
    except ValueError as error:
        message = str(error)
    save("mismatch", {"error": np.array(message),
                      "running_mean": module.running_mean.numpy()})
    # A rank whose input the module's own checks reject still joins the step.
    module = bt.SyncBatchNorm(CHANNELS).double()
    try:
        module(torch.ones((2, CHANNELS) if rank else (CHANNELS,), dtype=torch.float64))
        message = ""
    except ValueError as error:
        message = str(error)
    save("bad_input", {"error": np.array(message)})
    # The functional steps and the NumPy layer's communicator over a torch process group.
    from test_distributed import run_scenario
    for scenario in FUNCTIONAL_SCENARIOS:
        result = run_scenario(dist.group.WORLD, scenario, np.float64)
        save(f"functional_{scenario}", {k: np.asarray(v) for k, v in result.items()})
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(*sys.argv[1:])
    sys.exit(0)


# ----------------------------------------------------------------------------------
# The test's side
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    """Run WORLD gloo processes once; {scenario: [per-rank dicts]}."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this PyTorch has no gloo backend")
    outdir = tmp_path_factory.mktemp("gloo")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1")
    package_parent = str(Path(bncpu.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, str(HERE),
                                                      env.get("PYTHONPATH")]))
    if sys.platform != "linux":
        del env["GLOO_SOCKET_IFNAME"]
    init_file = outdir / "store"
    processes = [subprocess.Popen([sys.executable, __file__, str(rank), str(WORLD),
                                   str(init_file), str(outdir)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env, start_new_session=True)
                 for rank in range(WORLD)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the gloo processes did not finish within {LAUNCH_TIMEOUT} s")
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    results = {}
    for path in sorted(outdir.glob("*_rank*.npz")):
        scenario, rank = path.stem.rsplit("_rank", 1)
        with np.load(path) as saved:
            results.setdefault(scenario, {})[int(rank)] = {k: saved[k] for k in saved.files}
    return {scenario: [ranks[r] for r in range(WORLD)] for scenario, ranks in results.items()}


def assert_near(actual, expected, dtype):
    scale = max(1.0, float(np.abs(expected).max())) if np.size(expected) else 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


def check_against_whole_batch(ranks, dtype, momentum=0.1):
    expected = bn_steps(new_bn(momentum), (sum(SHARDS),), 0, "float64")
    for step in range(STEPS):
        for name in (f"y{step}", f"dx{step}"):
            assert_near(np.concatenate([r[name] for r in ranks]), expected[name], dtype)
        for name in (f"grad_weight{step}", f"grad_bias{step}"):
            assert_near(sum(r[name] for r in ranks), expected[name], dtype)
    assert_near(np.concatenate([r["y_eval"] for r in ranks]), expected["y_eval"], dtype)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        for r in ranks:
            assert r[name].tobytes() == ranks[0][name].tobytes(), name   # bit for bit
        assert_near(ranks[0][name], expected[name], dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_module_equals_whole_batch(gloo_results, dtype):
    check_against_whole_batch(gloo_results[f"module_{dtype}"], dtype)


def test_channels_last(gloo_results):
    ranks = gloo_results["channels_last"]
    check_against_whole_batch(ranks, "float32")
    assert all(bool(r[f"channels_last{step}"]) for r in ranks if r["y0"].shape[0] > 0
               for step in range(STEPS))


def test_momentum_none(gloo_results):
    check_against_whole_batch(gloo_results["momentum_none"], "float64", momentum=None)


def test_ddp_training_equals_whole_batch(gloo_results):
    ranks = gloo_results["ddp"]
    expected = ddp_steps(new_model().double(), (sum(DDP_SHARDS),), 0, 1, "float64")
    for step in range(STEPS):
        assert_near(sum(r[f"loss{step}"] for r in ranks), expected[f"loss{step}"], "float64")
    for name in expected:
        if name.startswith("state."):
            for r in ranks:
                assert_near(r[name], expected[name], "float64")


def test_mismatch_raises_on_every_rank(gloo_results):
    for r in gloo_results["mismatch"]:
        assert "disagree on the number of channels" in r["error"].item()
        np.testing.assert_array_equal(r["running_mean"][:CHANNELS], 0)


@pytest.mark.parametrize("scenario", FUNCTIONAL_SCENARIOS)
def test_functional_over_a_process_group(gloo_results, scenario):
    """sync_batch_norm_forward/backward with a torch process group as comm."""
    ranks = gloo_results[f"functional_{scenario}"]
    for r in ranks:
        for key in ("error", "rank", "count"):
            if key in r:
                r[key] = r[key].item()
    check_scenario(ranks, scenario, np.float64)


def test_bad_input_on_one_rank_raises_on_every_rank(gloo_results):
    errors = [r["error"].item() for r in gloo_results["bad_input"]]
    assert "expected at least 2D input (got 1D input)" in errors[0]
    for error in errors[1:]:
        assert "process 0: ValueError: expected at least 2D input" in error


# ----------------------------------------------------------------------------------
# One process: no torch.distributed
# ----------------------------------------------------------------------------------
def test_without_distributed_is_batch_norm():
    import bncpu.torch as bt
    module = bt.SyncBatchNorm(CHANNELS).double()
    assert isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    reference = torch.nn.BatchNorm2d(CHANNELS).double()
    x = torch.tensor(batch((6,), "float64", 0)[0])
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outputs = [m(xi) for m, xi in zip((module, reference), xs)]
    for output in outputs:
        output.square().sum().backward()
    assert_near(outputs[0].detach().numpy(), outputs[1].detach().numpy(), "float64")
    assert_near(xs[0].grad.numpy(), xs[1].grad.numpy(), "float64")
    assert_near(module.running_var.numpy(), reference.running_var.numpy(), "float64")


def test_convert_sync_batchnorm():
    import bncpu.torch as bt
    model = new_model()
    original = model[1].train(False)
    converted = bt.convert_sync_batchnorm(model, process_group="group")
    layer = converted[1]
    assert converted is model and type(layer) is bt.SyncBatchNorm
    assert layer.process_group == "group" and not layer.training
    assert layer.weight is original.weight and layer.running_mean is original.running_mean
    assert list(converted.state_dict()) == list(new_model().state_dict())
    single = bt.convert_sync_batchnorm(torch.nn.BatchNorm1d(3, affine=False))
    assert type(single) is bt.SyncBatchNorm and single.weight is None
    torch_sync = torch.nn.SyncBatchNorm(3)
    assert type(bt.SyncBatchNorm.convert_sync_batchnorm(torch_sync)) is bt.SyncBatchNorm


def test_other_communicator_needs_no_torch_distributed():
    """process_group may be any bncpu.distributed communicator: here two threads of this
    process, each with part of the batch, get the whole batch's output and gradient."""
    import bncpu.torch as bt
    from test_distributed import run_threads
    x = torch.tensor(batch((5,), "float64", 1)[0])
    weights = torch.arange(x.numel(), dtype=torch.float64).reshape(x.shape)
    parts = (slice(0, 2), slice(2, 5))

    def step(comm):
        module = bt.SyncBatchNorm(CHANNELS, process_group=comm).double()
        shard = x[parts[comm.rank]].clone().requires_grad_(True)
        output = module(shard)
        (output * weights[parts[comm.rank]]).sum().backward()
        return output.detach().numpy(), shard.grad.numpy()

    results = run_threads(2, step)
    whole = x.clone().requires_grad_(True)
    output = torch.nn.BatchNorm2d(CHANNELS).double()(whole)
    (output * weights).sum().backward()
    assert_near(np.concatenate([r[0] for r in results]), output.detach().numpy(), "float64")
    assert_near(np.concatenate([r[1] for r in results]), whole.grad.numpy(), "float64")
