"""Shared pytest fixtures. Add fixtures here; keep each documented and generated (no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Several engineers share 2 cores: one intra-op thread keeps small tests fast and predictable.
torch.set_num_threads(1)

# Make ``tests/idx_files.py`` importable as ``idx_files`` from every test module.
sys.path.insert(0, str(Path(__file__).parent))

from idx_files import make_tiny_mnist  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the four MNIST IDX gzip files: 10 synthetic classes, 60 train and
    20 test images per class. Session-scoped and read-only by convention: copy it to modify."""
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"), 60, 20, seed=0)


@pytest.fixture(scope="session")
def tiny_mnist(tiny_mnist_dir: Path):
    """The tiny data set loaded with :func:`crl.supervised.mnist.load_mnist` (no download)."""
    from crl.supervised.mnist import load_mnist

    return load_mnist(tiny_mnist_dir, download=False)
