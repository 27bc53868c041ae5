"""examples/lenet_bn.py: its IDX loader on small IDX files written here, and one short
epoch of both runs (torch's batch norms and bncpu's) on the offline digits and on
Fashion-MNIST-shaped IDX files."""
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="PyTorch is not installed: the example needs it")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lenet_bn.py"


@pytest.fixture(scope="module")
def lenet_bn():
    spec = importlib.util.spec_from_file_location("lenet_bn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    content = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(content)


def write_fashion(directory, n_train=40, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images, labels
    return arrays


@pytest.mark.parametrize("dtype, code", [(np.uint8, 0x08), (np.int8, 0x09), (">i2", 0x0B),
                                         (">i4", 0x0C), (">f4", 0x0D), (">f8", 0x0E)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx(lenet_bn, tmp_path, dtype, code, suffix):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if np.dtype(dtype) == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / f"data.idx{suffix}"
    write_idx(path, array, code)
    read = lenet_bn.read_idx(str(path))
    assert read.shape == (2, 3, 5) and read.dtype == np.dtype(dtype)
    assert np.array_equal(read, array)


def test_read_idx_rejects_bad_files(lenet_bn, tmp_path):
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]))
    truncated = tmp_path / "truncated"
    write_idx(truncated, np.zeros((4, 4), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ValueError, match="not an IDX file"):
        lenet_bn.read_idx(str(bad_magic))
    with pytest.raises(ValueError, match="expected 28"):
        lenet_bn.read_idx(str(truncated))


def test_load_fashion_mnist(lenet_bn, tmp_path):
    arrays = write_fashion(tmp_path)
    train_x, train_y, test_x, test_y = lenet_bn.load_fashion_mnist(str(tmp_path))
    assert train_x.shape == (40, 1, 28, 28) and train_x.dtype == np.float32
    assert np.array_equal(train_x[:, 0] * 255, arrays["train"][0].astype(np.float32))
    assert np.array_equal(test_y, arrays["t10k"][1]) and test_y.dtype == np.int64
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        lenet_bn.load_fashion_mnist(str(tmp_path))


def check_runs(runs):
    torch_run, bncpu_run = runs["torch"], runs["bncpu"]
    assert len(torch_run["losses"]) == len(bncpu_run["losses"]) > 0
    np.testing.assert_allclose(bncpu_run["losses"], torch_run["losses"], rtol=1e-5)
    assert abs(torch_run["history"][-1]["test_acc"] - bncpu_run["history"][-1]["test_acc"]) <= 0.01
    assert bncpu_run["norm_forward"] > 0 and bncpu_run["norm_backward"] > 0


def test_one_short_epoch_on_digits(lenet_bn, capsys):
    pytest.importorskip("sklearn", reason="scikit-learn (the examples extra) provides the digits")
    check_runs(lenet_bn.main(["--epochs", "1", "--max-batches", "3"]))
    output = capsys.readouterr().out
    assert "bncpu  epoch  1: loss" in output and "norm layers forward" in output


def test_one_short_epoch_on_idx_files(lenet_bn, tmp_path):
    write_fashion(tmp_path)
    check_runs(lenet_bn.main(["--data", str(tmp_path), "--epochs", "1", "--batch-size", "16"]))
