"""LeNet with batch normalization, trained end to end twice from the same seed: with
torch.nn's batch norms, then after ``bncpu.torch.convert``.

The network is the one of the d2l course (chapter "Batch Normalization"):
Conv 6@5x5 -> BatchNorm2d -> Sigmoid -> AvgPool 2 -> Conv 16@5x5 -> BatchNorm2d -> Sigmoid
-> AvgPool 2 -> Flatten -> Linear 120 -> BatchNorm1d -> Sigmoid -> Linear 84 ->
BatchNorm1d -> Sigmoid -> Linear 10, trained with SGD (lr 1.0, batch 256).

Data: Fashion-MNIST from its IDX files with ``--data DIR`` (train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally
gzipped); without it, offline, scikit-learn's bundled 8x8 digits (1,797 images), each
centred in a 28x28 frame of zeros, 80% for training and 20% for testing.

    python examples/lenet_bn.py                       # digits, 40 epochs
    python examples/lenet_bn.py --data ~/fashion-mnist  # Fashion-MNIST, 10 epochs

The digits give 6 batches of 256 per epoch (Fashion-MNIST 235), hence their default of 40
epochs: 240 steps, about one Fashion-MNIST epoch.

Prints per epoch the mean training loss, training and test accuracy and seconds, for
each run; then the losses of both runs over the first steps, their largest difference,
and the time spent in the normalization layers (forward and backward, from module
hooks) of each run.
"""
import argparse
import copy
import gzip
import os
import time

import numpy as np
import torch
import torch.nn as nn

import bncpu
import bncpu.torch

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_FILES = {"train_images": "train-images-idx3-ubyte",
                 "train_labels": "train-labels-idx1-ubyte",
                 "test_images": "t10k-images-idx3-ubyte",
                 "test_labels": "t10k-labels-idx1-ubyte"}
FIRST_STEPS = 5


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------
def read_idx(path):
    """An IDX file (plain or gzipped) as a NumPy array: two zero bytes, a type code, the
    number of dimensions, the dimensions as big-endian uint32, then the values."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as file:
        content = file.read()
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic number {content[:4].hex()})")
    ndim = content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise ValueError(f"{path}: truncated header")
    shape = tuple(int(d) for d in np.frombuffer(content, ">u4", ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[content[2]])
    expected = header + dtype.itemsize * int(np.prod(shape))
    if len(content) != expected:
        raise ValueError(f"{path}: {len(content)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(content, dtype, offset=header).reshape(shape)


def _find(directory, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{name} (or {name}.gz) not found in {directory}")


def load_fashion_mnist(directory):
    """(train_x, train_y, test_x, test_y): images (N, 1, 28, 28) float32 in [0, 1],
    labels int64."""
    arrays = {key: read_idx(_find(directory, name)) for key, name in FASHION_FILES.items()}
    images = [arrays[key].astype(np.float32)[:, None] / 255.0
              for key in ("train_images", "test_images")]
    labels = [arrays[k].astype(np.int64) for k in ("train_labels", "test_labels")]
    for x, y in zip(images, labels):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels in {directory}")
    return images[0], labels[0], images[1], labels[1]


def load_digits_28(seed=0):
    """scikit-learn's 8x8 digits (values 0..16) scaled to [0, 1] and centred in 28x28:
    (train_x, train_y, test_x, test_y), a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.zeros((len(digits.images), 1, 28, 28), np.float32)
    images[:, 0, 10:18, 10:18] = digits.images / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    n_train = int(0.8 * len(images))
    train, test = order[:n_train], order[n_train:]
    labels = digits.target.astype(np.int64)
    return images[train], labels[train], images[test], labels[test]


# ----------------------------------------------------------------------------------
# Model, timing, training
# ----------------------------------------------------------------------------------
def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, 10))


class NormTimer:
    """Seconds spent in the model's batch-norm modules, forward and backward, measured by
    module hooks (forward: pre-hook to hook; backward: backward pre-hook to hook)."""

    def __init__(self, model):
        self.forward = self.backward = 0.0
        self._start = {}
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(self._begin("forward"))
                module.register_forward_hook(self._end("forward"))
                module.register_full_backward_pre_hook(self._begin("backward"))
                module.register_full_backward_hook(self._end("backward"))

    def _begin(self, phase):
        def hook(module, *args):
            self._start[(id(module), phase)] = time.perf_counter()
        return hook

    def _end(self, phase):
        def hook(module, *args):
            elapsed = time.perf_counter() - self._start.pop((id(module), phase))
            setattr(self, phase, getattr(self, phase) + elapsed)
        return hook


def accuracy(model, x, y, batch_size):
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = slice(start, start + batch_size)
            correct += (model(x[batch]).argmax(1) == y[batch]).sum().item()
    return correct / max(len(x), 1)


def train(model, data, epochs, batch_size, lr, seed, max_batches=None, label=""):
    """SGD on the training set, batches in a seeded order; prints a line per epoch.
    Returns a dict: step losses, per-epoch history, norm-layer seconds."""
    train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in data)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_function = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    timer = NormTimer(model)
    losses, history = [], []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(train_x), generator=generator)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        epoch_loss = correct = seen = 0
        for index in batches[:max_batches]:
            x, y = train_x[index], train_y[index]
            output = model(x)
            loss = loss_function(output, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            epoch_loss += loss.item() * len(y)
            correct += (output.argmax(1) == y).sum().item()
            seen += len(y)
        seconds = time.perf_counter() - start
        test_accuracy = accuracy(model, test_x, test_y, batch_size)
        history.append(dict(loss=epoch_loss / seen, train_acc=correct / seen,
                            test_acc=test_accuracy, seconds=seconds))
        print(f"  {label:6s} epoch {epoch + 1:2d}: loss {epoch_loss / seen:.4f}, "
              f"train acc {correct / seen:.3f}, test acc {test_accuracy:.3f}, "
              f"{seconds:.2f} s", flush=True)
    return dict(losses=losses, history=history, norm_forward=timer.forward,
                norm_backward=timer.backward)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="directory of the Fashion-MNIST IDX files "
                                       "(default: scikit-learn's digits, offline)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 10 on Fashion-MNIST, 40 on the digits")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of torch and bncpu (default: their defaults)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="train on at most this many batches per epoch (quick runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        bncpu.set_num_threads(args.threads)
    data = load_fashion_mnist(args.data) if args.data else load_digits_28(args.seed)
    if args.epochs is None:
        args.epochs = 10 if args.data else 40
    source = (f"Fashion-MNIST from {args.data}" if args.data
              else "scikit-learn digits padded to 28x28")
    print(f"LeNet-BN on {source}: {len(data[0])} training, {len(data[2])} test images; "
          f"SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; "
          f"threads: torch {torch.get_num_threads()}, bncpu {bncpu.get_num_threads()}")
    torch.manual_seed(args.seed)
    model = lenet()
    runs = {}
    for label, run_model in (("torch", copy.deepcopy(model)),
                             ("bncpu", bncpu.torch.convert(model))):
        print(f"{label}:")
        runs[label] = train(run_model, data, args.epochs, args.batch_size, args.lr, args.seed,
                            args.max_batches, label)
    first = min(FIRST_STEPS, len(runs["torch"]["losses"]))
    difference = max((abs(a - b) for a, b in zip(runs["torch"]["losses"][:first],
                                                  runs["bncpu"]["losses"][:first])), default=0.0)
    print(f"first {first} step losses:")
    for label in runs:
        print(f"  {label:6s} " + " ".join(f"{loss:.7f}" for loss in runs[label]["losses"][:first]))
    print(f"  largest difference {difference:.2e}")
    for label, run in runs.items():
        last = run["history"][-1]
        total = sum(epoch["seconds"] for epoch in run["history"])
        print(f"{label:6s}: final test acc {last['test_acc']:.3f}, training {total:.2f} s, "
              f"norm layers forward {run['norm_forward']:.3f} s, backward "
              f"{run['norm_backward']:.3f} s")
    return runs


if __name__ == "__main__":
    main()
