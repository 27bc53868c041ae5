"""A ResNet-18 training step (forward, backward, SGD), stock torch against
``bncpu.torch.convert(model, fuse=True)``, and the share of the step that batch norm, ReLU
and add take (the Amdahl bound on what faster normalization can give).

The two models start from the same weights and see the same batches; their steps run
interleaved (one of each in turn), so a noisy neighbour slows both alike, and each time is
the median over the steps. One more step of each runs under torch's profiler: the self
CPU time of batch norm (forward and backward), of ReLU (``relu``, ``threshold_backward``)
and of add (``add``, ``add_``) over the whole step's. With a share ``p`` for all three,
no speed-up of them gives the step more than ``1 / (1 - p)``.

    python benchmarks/resnet_step.py                       # B=32, 112x112, 2 threads, 11 steps
    python benchmarks/resnet_step.py --batch 16 --size 64 --steps 5   # quicker

The ResNet-18 here is the standard one (He et al. 2016; torchvision's layout and
``BasicBlock``: ``relu(bn2(conv2(y)) + identity)`` with ``out += identity``), defined here
so that torchvision is not needed; the tests import it from this file.
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn

import bncpu
import bncpu.torch as bt


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norms; the input (projected by ``downsample``
    when the shape changes) added before the last ReLU."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """7x7 stem, max pool, four stages of two BasicBlocks (64, 128, 256, 512 channels),
    average pool, linear classifier: 20 batch norms."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, stride),
                                        BasicBlock(channels, channels)))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def fused_batch_norms(model):
    """How many of the model's batch norms run fused with a ReLU."""
    from bncpu.torch._fuse import FUSED
    fused = tuple(FUSED.values()) + (bt.BatchNormReLU1d, bt.BatchNormReLU2d,
                                     bt.BatchNormReLU3d)
    return sum(isinstance(module, fused) for module in model.modules())


def step(model, optimizer, x, target):
    loss = nn.functional.cross_entropy(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


_SHARES = {
    "batch norm": lambda key: "batch_norm" in key,
    "relu": lambda key: key in ("aten::relu", "aten::relu_", "aten::threshold_backward",
                                "aten::clamp_min", "aten::clamp_min_"),
    "add": lambda key: key in ("aten::add", "aten::add_"),
}


def profile_shares(model, optimizer, x, target):
    """(share of the step's self CPU time per category, the step's profiled ms)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(model, optimizer, x, target)
    totals = {key: 0.0 for key in _SHARES}
    total = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        for category, matches in _SHARES.items():
            if matches(event.key):
                totals[category] += event.self_cpu_time_total
    return {key: value / total for key, value in totals.items()}, total / 1e3


def load_average():
    try:
        with open("/proc/loadavg") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--size", type=int, default=112, help="image height and width (112)")
    parser.add_argument("--steps", type=int, default=11, help="timed steps per model (11)")
    parser.add_argument("--threads", type=int, default=2, help="torch and bncpu threads (2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bncpu.set_num_threads(args.threads)
    print(f"bncpu {bncpu.__version__} ({bncpu.isa()}), torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}; "
          f"B={args.batch}, {args.size}x{args.size}, {args.steps} steps; "
          f"load average {load_average()}")
    torch.manual_seed(0)
    stock = ResNet18()
    models = {"torch": stock, "bncpu fused": bt.convert(stock, fuse=True)}
    print(f"batch norms fused: {fused_batch_norms(models['bncpu fused'])} of "
          f"{sum(isinstance(m, nn.BatchNorm2d) for m in stock.modules())}")
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                  for name, model in models.items()}
    generator = torch.Generator().manual_seed(1)

    def batch():
        return (torch.randn(args.batch, 3, args.size, args.size, generator=generator),
                torch.randint(0, 1000, (args.batch,), generator=generator))

    x, target = batch()
    losses = {name: step(model, optimizers[name], x, target) for name, model in models.items()}
    print("first step's loss: " + ", ".join(f"{name} {loss:.6f}"
                                              for name, loss in losses.items()))
    times = {name: [] for name in models}
    for _ in range(args.steps):
        x, target = batch()
        for name, model in models.items():
            start = time.perf_counter()
            step(model, optimizers[name], x, target)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"  {name:12s} step median {1e3 * median:7.1f} ms "
              f"(range {1e3 * min(times[name]):.0f}-{1e3 * max(times[name]):.0f} ms)")
    print(f"  speed-up (torch / bncpu fused): {medians['torch'] / medians['bncpu fused']:.3f}x")
    x, target = batch()
    for name, model in models.items():
        shares, total = profile_shares(model, optimizers[name], x, target)
        share = sum(shares.values())
        print(f"  profile {name:12s} " + ", ".join(f"{key} {100 * value:.1f}%"
                                                    for key, value in shares.items())
              + f"; together {100 * share:.1f}% of {total:.0f} ms: "
              f"bound 1/(1 - p) = {1 / (1 - share):.3f}x")
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
