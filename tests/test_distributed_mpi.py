"""Synchronized batch norm over MPI: mpiexec -n 1..4 ranks, from Python and from C.

The Python tests launch this very file under mpiexec (``python test_distributed_mpi.py
outdir scenario:dtype:axis ...``): each rank runs the scenarios of
tests/test_distributed.py in turn with an mpi4py communicator and saves what it
computed; the test then checks the ranks' results together, against batch norm of the
concatenated batch. The 3-rank scenarios share one launch. The C test builds
examples/c/bn_mpi.c with mpicc and runs it on 3 ranks.

Every launch is bounded in time (the whole process group is killed past it), so a hung
collective fails the test instead of hanging the suite. The tests skip, with the
reason, when mpi4py or mpiexec is missing (pip install mpich mpi4py, or bncpu[mpi]).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 180
DEATH_EXIT_CODE = 3     # the exit status of the rank that dies in the "rank_dies" scenario

if __name__ != "__main__":
    import pytest

    import bncpu
    from test_distributed import SCENARIOS, check_scenario
    from test_c_api import find_python_config

    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install mpich mpi4py)")


# ----------------------------------------------------------------------------------
# The rank's side: run a scenario, save the results
# ----------------------------------------------------------------------------------
def rank_main(outdir, *specs):
    for spec in specs:
        run_spec(outdir, spec, *spec.split(":"))


def run_spec(outdir, spec, scenario, dtype, axis):
    from mpi4py import MPI
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    if scenario == "layer":          # bncpu.distributed.SyncBatchNorm, comm=None: COMM_WORLD
        from bncpu.distributed import SyncBatchNorm
        from test_distributed import CHANNELS, SHARD_SIZES, layer_steps
        layer = SyncBatchNorm(CHANNELS, dtype=dtype, axis=int(axis))
        result = layer_steps(layer, SHARD_SIZES[:size], rank, dtype, int(axis))
        result.update({f"{name}{step}": value for name in ("y", "dx")
                       for step, value in enumerate(result.pop(name))})
        result.update({f"state.{k}": value for k, value in result.pop("state").items()})
    elif scenario == "rank_dies":      # rank 1 dies before the collective the others enter
        if rank == 1:
            (Path(outdir) / "rank1_died").touch()
            os._exit(DEATH_EXIT_CODE)
        from test_distributed import run_scenario
        result = run_scenario(MPI.COMM_WORLD, "unequal", np.dtype(dtype), int(axis))
    elif scenario == "torch_module":   # bncpu.torch.SyncBatchNorm over an mpi4py communicator
        import bncpu.torch as bt
        from test_torch_sync import SHARDS, bn_steps, new_bn
        module = bt.convert_sync_batchnorm(new_bn(), process_group=MPI.COMM_WORLD)
        result = bn_steps(module, SHARDS, rank, dtype)
    else:
        from test_distributed import run_scenario
        comm = None if scenario == "unequal" else MPI.COMM_WORLD   # None: MPI.COMM_WORLD too
        result = run_scenario(comm, scenario, np.dtype(dtype), int(axis))
    np.savez(Path(outdir) / f"{spec}_rank{rank}.npz",
             **{k: np.asarray(val) for k, val in result.items()})


if __name__ == "__main__":
    rank_main(*sys.argv[1:])
    sys.exit(0)


# ----------------------------------------------------------------------------------
# The test's side
# ----------------------------------------------------------------------------------
def find_tool(name):
    """An MPI tool next to this Python (a virtual environment's pip mpich) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if os.access(local, os.X_OK) else shutil.which(name)


@pytest.fixture(scope="module")
def mpiexec():
    """The launcher command: MPICH's as is; Open MPI's told to run more ranks than cores
    (and as root, in containers), which it refuses by default."""
    path = find_tool("mpiexec")
    if path is None:
        pytest.skip("mpiexec not found (pip install mpich, or an MPI installation on PATH)")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    if "Open MPI" in version.stdout + version.stderr:
        return [path, "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return [path]


def package_env(**extra):
    """The ranks import the bncpu this test imported, one OpenMP thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    package_parent = str(Path(bncpu.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, str(HERE),
                                                      env.get("PYTHONPATH")]))
    return env


def launch(command, timeout=LAUNCH_TIMEOUT, returncode=0, **extra_env):
    """Run ``command`` in its own process group; kill the whole group past ``timeout``.
    Asserts that it exited with ``returncode`` (or one of a tuple); returns its stdout."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=package_env(**extra_env), start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s (hung collective?)")
    expected = returncode if isinstance(returncode, tuple) else (returncode,)
    assert process.returncode in expected, (
        f"{' '.join(command)} exited with {process.returncode}, expected {returncode}:\n"
        f"{stdout[-3000:]}{stderr[-3000:]}")
    return stdout


def spec(scenario, dtype=np.float64, axis=1):
    return f"{scenario}:{np.dtype(dtype).name}:{axis}"


def run_ranks(mpiexec, size, specs, outdir):
    """Launch ``size`` ranks running ``specs``; {spec: [per-rank results]}."""
    launch([*mpiexec, "-n", str(size), sys.executable, __file__, str(outdir), *specs])
    runs = {}
    for name in specs:
        results = []
        for rank in range(size):
            with np.load(outdir / f"{name}_rank{rank}.npz") as saved:
                result = {k: saved[k] for k in saved.files}
            for key in ("error", "rank", "count"):
                if key in result:
                    result[key] = result[key].item()
            results.append(result)
        runs[name] = results
    return runs


THREE_RANK_SPECS = ([spec("unequal", np.float32, -1), spec("layer", np.float32, -1)]
                    + [spec(s) for s in SCENARIOS])


@pytest.fixture(scope="module")
def three_ranks(mpiexec, tmp_path_factory):
    """The 3-rank scenarios, run in one launch."""
    return run_ranks(mpiexec, 3, THREE_RANK_SPECS, tmp_path_factory.mktemp("mpi3"))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_equals_whole_batch(mpiexec, size, tmp_path):
    name = spec("unequal")
    check_scenario(run_ranks(mpiexec, size, [name], tmp_path)[name], "unequal", np.float64)


def test_float32_channels_last(three_ranks):
    check_scenario(three_ranks[spec("unequal", np.float32, -1)], "unequal", np.float32)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenarios(three_ranks, scenario):
    check_scenario(three_ranks[spec(scenario)], scenario, np.float64)


def test_layer(three_ranks):
    """bncpu.distributed.SyncBatchNorm on MPI.COMM_WORLD: several steps, then evaluation,
    equal to bncpu.nn.BatchNorm2d on the whole batch."""
    from bncpu.nn import BatchNorm2d
    from test_distributed import CHANNELS, LAYER_STEPS, SHARD_SIZES, assert_near, layer_steps
    ranks = three_ranks[spec("layer", np.float32, -1)]
    expected = layer_steps(BatchNorm2d(CHANNELS), (sum(SHARD_SIZES[:3]),), 0, np.float32)
    for name in ("y", "dx"):
        for step in range(LAYER_STEPS):
            assert_near(np.concatenate([r[f"{name}{step}"] for r in ranks]),
                        expected[name][step], np.float32)
    assert_near(np.concatenate([r["y_eval"] for r in ranks]), expected["y_eval"], np.float32)
    for name in ("grad_weight", "grad_bias"):
        assert_near(sum(r[name].astype(np.float64) for r in ranks), expected[name], np.float32)
    for key, value in expected["state"].items():
        for r in ranks:
            assert r[f"state.{key}"].tobytes() == ranks[0][f"state.{key}"].tobytes(), key
        assert_near(ranks[0][f"state.{key}"], value, np.float32)


def test_a_dying_rank_ends_the_job(mpiexec, tmp_path):
    """A rank that dies before a collective: the launcher ends the others (they do not
    wait forever), well within the launch timeout, and reports the dead rank's exit
    status; no rank completed the step. MPICH's launcher reports the first failure it
    sees: the dead rank's status, or SIGKILL's 9 when it sees a rank it killed in the
    clean-up first."""
    launch([*mpiexec, "-n", "3", sys.executable, __file__, str(tmp_path), spec("rank_dies")],
           timeout=120, returncode=(DEATH_EXIT_CODE, 9))
    assert [path.name for path in tmp_path.iterdir()] == ["rank1_died"]


def test_torch_module_over_mpi4py(mpiexec, tmp_path):
    """bncpu.torch.SyncBatchNorm with an mpi4py communicator as its process_group."""
    pytest.importorskip("torch", reason="PyTorch is not installed")
    from test_torch_sync import check_against_whole_batch
    name = spec("torch_module")
    check_against_whole_batch(run_ranks(mpiexec, 3, [name], tmp_path)[name], "float64")


# ----------------------------------------------------------------------------------
# examples/c/bn_mpi.c
# ----------------------------------------------------------------------------------
def test_c_example(mpiexec, tmp_path):
    """bn_mpi.c on 3 ranks: its shards' output and gradient equal the whole batch's."""
    mpicc = find_tool("mpicc")
    if mpicc is None:
        pytest.skip("mpicc not found (pip install mpich)")
    config = find_python_config()
    if config is None:
        pytest.skip("python3-config not found: install the Python development files")

    def flags(*options):
        return subprocess.run([config, *options], capture_output=True, text=True,
                              check=True).stdout.split()

    binary = tmp_path / "bn_mpi"
    compile_command = ([mpicc, "-O2", "-Wall", "-Wextra", "-Werror",
                        str(HERE.parent / "examples" / "c" / "bn_mpi.c"), "-o", str(binary),
                        "-I" + bncpu.get_include()]
                       + flags("--includes") + flags("--embed", "--ldflags"))
    compiled = subprocess.run(compile_command, capture_output=True, text=True)
    assert compiled.returncode == 0, f"{' '.join(compile_command)}\n{compiled.stderr}"
    stdout = launch([*mpiexec, "-n", "3", str(binary)], BNCPU_PYTHON=sys.executable)
    records = sorted((json.loads(line) for line in stdout.splitlines()),
                     key=lambda record: record["rank"])
    assert [r["rank"] for r in records] == [0, 1, 2]
    n, c, s = (sum(r["n"] for r in records), records[0]["c"], records[0]["s"])
    whole = {name: np.concatenate([np.reshape(r[name], (r["n"], c, s)) for r in records])
             for name in ("x", "dy", "y", "dx")}
    assert n == whole["x"].shape[0] and any(r["n"] == 0 for r in records)
    first = records[0]
    weight, bias = np.array(first["weight"]), np.array(first["bias"])
    running_mean, running_var = (np.array(first["running_mean_in"]),
                                 np.array(first["running_var_in"]))
    y, save_mean, save_invstd = bncpu.reference.batch_norm_forward(
        whole["x"], weight, bias, running_mean, running_var, True, first["momentum"],
        first["eps"])
    dx, grad_weight, grad_bias = bncpu.reference.batch_norm_backward(
        whole["dy"], whole["x"], weight, None, None, save_mean, save_invstd, True, first["eps"])
    np.testing.assert_allclose(whole["y"], y, rtol=0, atol=1e-10 * np.abs(y).max())
    np.testing.assert_allclose(whole["dx"], dx, rtol=0, atol=1e-10 * np.abs(dx).max())
    for record in records:
        assert record["running_mean"] == first["running_mean"]   # bit for bit (%.17g)
        assert record["running_var"] == first["running_var"]
    np.testing.assert_allclose(first["running_mean"], running_mean, rtol=1e-12)
    np.testing.assert_allclose(first["running_var"], running_var, rtol=1e-12)
    np.testing.assert_allclose(sum(np.array(r["grad_weight"]) for r in records), grad_weight,
                               rtol=1e-10)
    np.testing.assert_allclose(sum(np.array(r["grad_bias"]) for r in records), grad_bias,
                               rtol=1e-10)
