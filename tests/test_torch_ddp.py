"""bncpu.torch inside DistributedDataParallel (gloo, 2 processes on 127.0.0.1).

The test runs this file as a script in 2 processes (``python test_torch_ddp.py rank
world port outdir``); each joins a gloo group, wraps a model with torch's norms and its
``bncpu.torch.convert`` copy in DDP, trains both on its shard of the same batches and
saves what it saw. The launch is bounded in time: past it the processes are killed and
the test fails instead of hanging.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

WORLD = 2
STEPS = 3
TIMEOUT = 240

if __name__ != "__main__":
    import pytest
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: bncpu.torch needs it")
else:
    import torch


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 8), torch.nn.BatchNorm1d(8), torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 3)).double()


def batch(step, rank):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4 * WORLD, 3, 6, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (4 * WORLD,), generator=generator)
    return x[4 * rank:4 * (rank + 1)], y[4 * rank:4 * (rank + 1)]


def worker(rank, world, port, outdir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import bncpu.torch as bt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for label, module in (("torch", model()), ("bncpu", bt.convert(model(), fuse=True))):
            ddp = DistributedDataParallel(module)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.5)
            losses = []
            for step in range(STEPS):
                x, y = batch(step, rank)
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            results[label] = dict(losses=torch.stack(losses), state=module.state_dict(),
                                  types=[type(m).__name__ for m in module])
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes(tmp_path):
    import bncpu

    # The processes import the bncpu this process imported (installed or built in place).
    bncpu_root = str(Path(bncpu.__file__).resolve().parent.parent)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([bncpu_root, os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    processes = [subprocess.Popen([sys.executable, __file__, str(rank), str(WORLD), str(port),
                                   str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
                 for rank in range(WORLD)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the DDP processes did not finish within {TIMEOUT} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for results in ranks:
        assert "BatchNormReLU2d" in results["bncpu"]["types"]
        torch.testing.assert_close(results["bncpu"]["losses"], results["torch"]["losses"],
                                   rtol=1e-10, atol=1e-12)
        for key, value in results["torch"]["state"].items():
            torch.testing.assert_close(results["bncpu"]["state"][key], value, rtol=1e-9,
                                       atol=1e-11, msg=key)
    # DDP all-reduced the gradients: every rank holds the same parameters.
    for key, value in ranks[0]["bncpu"]["state"].items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(ranks[1]["bncpu"]["state"][key], value, rtol=0, atol=0)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
