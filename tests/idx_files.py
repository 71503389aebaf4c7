"""Test helpers that write MNIST-layout IDX gzip files, so no test needs the network or real data.

``make_tiny_mnist`` writes learnable synthetic digits: each class is a fixed random prototype
(a few Gaussian blobs and a stroke) and each sample is its class prototype shifted by up to one
pixel, scaled in intensity and noised. Classes are distinct enough that a small MLP separates a
pair of them in a few hundred SGD steps, which lets end-to-end continual-learning tests (plain
fine-tuning forgets, EWC / replay forget less) run in seconds.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

#: IDX dtype codes (LeCun's format description), keyed by numpy dtype.
IDX_DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The uncompressed IDX encoding of ``array`` (big-endian header and payload)."""
    arr = np.asarray(array)
    big = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    if big not in IDX_DTYPE_CODES:
        raise ValueError(f"dtype {arr.dtype} has no IDX code; use one of {list(IDX_DTYPE_CODES)}")
    header = struct.pack(">BBBB", 0, 0, IDX_DTYPE_CODES[big], arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(big, copy=False).tobytes(order="C")


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as a gzip-compressed IDX file (the layout MNIST ships in)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 makes the bytes (and so the md5) reproducible for a given array.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(idx_bytes(array))
    return path


def class_prototypes(seed: int = 0, num_classes: int = 10) -> np.ndarray:
    """One fixed random 28x28 pattern per class, values in [0, 1]: 3 blobs + 1 line stroke."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    protos = np.zeros((num_classes, 28, 28))
    for c in range(num_classes):
        img = np.zeros((28, 28))
        for _ in range(3):
            cy, cx = rng.uniform(5, 23, size=2)
            sigma = rng.uniform(1.5, 3.0)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        # A straight stroke between two random points, drawn as a thin Gaussian ridge.
        p0, p1 = rng.uniform(4, 24, size=(2, 2))
        t = np.linspace(0.0, 1.0, 40)[:, None]
        pts = p0 + t * (p1 - p0)
        d2 = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
        img += np.exp(-d2 / 1.5).max(axis=0)
        protos[c] = np.clip(img, 0.0, 1.0)
    return protos


def tiny_mnist_arrays(
    n_per_class: int, *, seed: int, proto_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (images uint8 (N,28,28), labels uint8 (N,)) with ``n_per_class`` per digit."""
    rng = np.random.default_rng(seed)
    protos = class_prototypes(proto_seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), n_per_class)
    rng.shuffle(labels)
    images = np.empty((labels.size, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        dy, dx = rng.integers(-1, 2, size=2)
        img = np.roll(protos[c], (int(dy), int(dx)), axis=(0, 1)) * rng.uniform(0.7, 1.0)
        img = img + rng.normal(0.0, 0.1, size=(28, 28))
        images[i] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return images, labels


def make_tiny_mnist(
    directory: str | Path,
    n_train_per_class: int = 60,
    n_test_per_class: int = 20,
    seed: int = 0,
) -> Path:
    """Write the four standard MNIST files with synthetic learnable digits into ``directory``.

    Train and test share the class prototypes (``proto_seed`` 0) but draw different samples.
    """
    directory = Path(directory)
    train_x, train_y = tiny_mnist_arrays(n_train_per_class, seed=seed)
    test_x, test_y = tiny_mnist_arrays(n_test_per_class, seed=seed + 10_000)
    write_idx(directory / MNIST_FILES["train_images"], train_x)
    write_idx(directory / MNIST_FILES["train_labels"], train_y)
    write_idx(directory / MNIST_FILES["test_images"], test_x)
    write_idx(directory / MNIST_FILES["test_labels"], test_y)
    return directory
