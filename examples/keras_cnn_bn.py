"""The classic Keras CNN with batch normalization, trained twice from the same seed: with
keras.layers.BatchNormalization, then with bncpu.keras.BatchNormalization.

    Conv2D(16, 3, padding="same") on 32x32x3 -> BatchNormalization -> relu -> MaxPooling2D
    -> Flatten -> Dense(128) -> BatchNormalization -> relu -> Dense(10, softmax)

trained with ``model.fit`` (Adam, sparse categorical cross-entropy, batch 64).

Data: CIFAR-10's python batches with ``--data DIR`` (data_batch_1 ... data_batch_5 and
test_batch, as in cifar-10-batches-py); without it, offline, scikit-learn's bundled 8x8
digits (1,797 images), each pixel repeated 4x4 to 32x32 and copied to 3 channels, 80% for
training and 20% for testing.

    python examples/keras_cnn_bn.py                          # digits, KERAS_BACKEND or tensorflow
    python examples/keras_cnn_bn.py --backend jax --epochs 10
    python examples/keras_cnn_bn.py --data ~/cifar-10-batches-py --samples 10000

Prints per epoch the training loss and accuracy and the test accuracy of both models side
by side, then the time per epoch of each (the median over the epochs after the first,
which also compiles the training step).
"""
import argparse
import os
import pickle
import time

import numpy as np

BATCH_SIZE = 64


def digits(seed):
    """scikit-learn's digits as 32x32x3 float32 images in [0, 1]: (train, test) pairs."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = np.kron(bunch.images / 16.0, np.ones((4, 4)))            # (N, 32, 32)
    images = np.repeat(images[..., None], 3, axis=-1).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    return (images[train], labels[train]), (images[test], labels[test])


def cifar10(directory):
    """CIFAR-10's python batches as NHWC float32 images in [0, 1]: (train, test) pairs."""
    def read(name):
        path = os.path.join(directory, name)
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="bytes")
        images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
        return (images.transpose(0, 2, 3, 1).astype(np.float32) / 255.0,
                np.asarray(batch[b"labels"], np.int64))
    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return train, read("test_batch")


def build(keras, norm, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(16, 3, padding="same"),
        norm(),
        keras.layers.Activation("relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128),
        norm(),
        keras.layers.Activation("relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def train(keras, model, train_set, test_set, epochs, seed):
    """Per epoch (loss, accuracy, test accuracy, seconds of fit)."""
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    keras.utils.set_random_seed(seed)   # the same shuffling for both models
    rows = []
    for _ in range(epochs):
        start = time.perf_counter()
        history = model.fit(*train_set, batch_size=BATCH_SIZE, epochs=1, verbose=0)
        seconds = time.perf_counter() - start
        _, test_accuracy = model.evaluate(*test_set, batch_size=256, verbose=0)
        rows.append((history.history["loss"][0], history.history["accuracy"][0], test_accuracy,
                     seconds))
    return rows


def per_epoch(rows):
    """The median fit time over the epochs after the first (the first, if it is alone)."""
    seconds = [row[3] for row in rows]
    return float(np.median(seconds[1:] if len(seconds) > 1 else seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["tensorflow", "jax", "torch"],
                        help="Keras backend (default: KERAS_BACKEND, else Keras's default)")
    parser.add_argument("--data", help="directory of CIFAR-10's python batches")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, help="train on the first N training images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend   # read once, when keras is imported
    import keras
    import bncpu.keras

    train_set, test_set = cifar10(args.data) if args.data else digits(args.seed)
    if args.samples:
        train_set = (train_set[0][:args.samples], train_set[1][:args.samples])
    print(f"backend {keras.backend.backend()}, {len(train_set[1])} training and "
          f"{len(test_set[1])} test images, batch {BATCH_SIZE}")

    results = {}
    for name, norm in (("keras", keras.layers.BatchNormalization),
                       ("bncpu", bncpu.keras.BatchNormalization)):
        results[name] = train(keras, build(keras, norm, args.seed), train_set, test_set,
                              args.epochs, args.seed)

    print(f"{'epoch':>5}  {'keras loss':>10} {'acc':>6} {'test':>6}   "
          f"{'bncpu loss':>10} {'acc':>6} {'test':>6}")
    for epoch, (ours, theirs) in enumerate(zip(results["bncpu"], results["keras"]), 1):
        print(f"{epoch:>5}  {theirs[0]:>10.4f} {theirs[1]:>6.3f} {theirs[2]:>6.3f}   "
              f"{ours[0]:>10.4f} {ours[1]:>6.3f} {ours[2]:>6.3f}")
    stock, ours = per_epoch(results["keras"]), per_epoch(results["bncpu"])
    print(f"time per epoch: keras {stock:.3f} s, bncpu {ours:.3f} s ({stock / ours:.2f}x); "
          f"first epoch (with compilation): keras {results['keras'][0][3]:.3f} s, "
          f"bncpu {results['bncpu'][0][3]:.3f} s")
    counts = bncpu.keras.fallback_counts()
    if counts:
        print(f"calls that ran Keras's own code: {counts}")


if __name__ == "__main__":
    main()
