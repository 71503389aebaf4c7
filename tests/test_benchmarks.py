"""Benchmarks: label mappings per scenario, seeded transforms, rotation, batching and errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from crl.supervised.benchmarks import (
    Benchmark,
    iterate_batches,
    make_benchmark,
    pixel_permutations,
    rotate_images,
)
from crl.supervised.mnist import ENV_DATA_DIR, load_mnist


def _raw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)


@pytest.mark.parametrize(
    ("name", "scenario", "tasks", "heads", "outputs"),
    [
        ("split-mnist", "task-il", 5, 5, 2),
        ("split-mnist", "domain-il", 5, 1, 2),
        ("split-mnist", "class-il", 5, 1, 10),
        ("permuted-mnist", "task-il", 3, 3, 10),
        ("permuted-mnist", "domain-il", 3, 1, 10),
        ("permuted-mnist", "class-il", 3, 1, 30),
        ("rotated-mnist", "task-il", 3, 3, 10),
        ("rotated-mnist", "domain-il", 3, 1, 10),
        ("rotated-mnist", "class-il", 3, 1, 30),
    ],
)
def test_layout_shapes_dtypes(tiny_mnist, name, scenario, tasks, heads, outputs) -> None:
    b = make_benchmark(name, tiny_mnist, num_tasks=tasks, scenario=scenario)
    assert (b.name, b.scenario, len(b), b.n_heads, b.head_outputs) == (
        name,
        scenario,
        tasks,
        heads,
        outputs,
    )
    n_train, n_test = (120, 40) if name == "split-mnist" else (600, 200)
    for i, t in enumerate(b.tasks):
        assert t.index == i and b.head_of(i) == (i if heads > 1 else 0)
        assert t.train_x.shape == (n_train, 784) and t.test_x.shape == (n_test, 784)
        assert t.train_x.dtype == torch.float32 and t.test_x.dtype == torch.float32
        assert t.train_y.dtype == torch.int64 and t.test_y.dtype == torch.int64
        assert 0.0 <= float(t.train_x.min()) and float(t.train_x.max()) <= 1.0
        assert 0 <= int(t.train_y.min()) and int(t.train_y.max()) < outputs


def test_default_scenarios_and_task_counts(tiny_mnist) -> None:
    assert make_benchmark("split-mnist", tiny_mnist).scenario == "task-il"
    perm = make_benchmark("permuted-mnist", tiny_mnist, train_per_task=10, test_per_task=10)
    assert (perm.scenario, len(perm)) == ("domain-il", 10)
    rot = make_benchmark("rotated-mnist", tiny_mnist, num_tasks=3)
    assert rot.scenario == "domain-il" and rot.info["angles"] == [0.0, 60.0, 120.0]
    assert make_benchmark("Split_MNIST", tiny_mnist, scenario="class").scenario == "class-il"


# -- split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["task-il", "domain-il", "class-il"])
def test_split_label_mapping(tiny_mnist, scenario: str) -> None:
    b = make_benchmark("split-mnist", tiny_mnist, scenario=scenario)
    for t, pair in zip(b.tasks, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], strict=True):
        assert t.classes == pair
        for x, y, images, digits in (
            (t.train_x, t.train_y, tiny_mnist.train_images, tiny_mnist.train_labels),
            (t.test_x, t.test_y, tiny_mnist.test_images, tiny_mnist.test_labels),
        ):
            rows = np.flatnonzero(np.isin(digits, pair))  # original order is kept
            expected = digits[rows] if scenario == "class-il" else digits[rows] % 2
            assert y.tolist() == expected.tolist()
            assert torch.equal(x, _raw(images[rows]))


def test_split_class_order(tiny_mnist) -> None:
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    b = make_benchmark("split-mnist", tiny_mnist, scenario="task-il", class_order=order)
    first = b.tasks[0]
    assert first.classes == [9, 8]
    rows = np.flatnonzero(np.isin(tiny_mnist.train_labels, [9, 8]))
    assert first.train_y.tolist() == (tiny_mnist.train_labels[rows] == 8).astype(int).tolist()
    c = make_benchmark("split-mnist", tiny_mnist, scenario="class-il", class_order=order)
    assert c.tasks[0].train_y.tolist() == tiny_mnist.train_labels[rows].tolist()
    r1 = make_benchmark("split-mnist", tiny_mnist, class_order="random", seed=3)
    r2 = make_benchmark("split-mnist", tiny_mnist, class_order="random", seed=3)
    r3 = make_benchmark("split-mnist", tiny_mnist, class_order="random", seed=4)
    assert r1.info["class_order"] == r2.info["class_order"] != r3.info["class_order"]
    assert sorted(r1.info["class_order"]) == list(range(10))
    assert [t.classes for t in r1.tasks] == [
        r1.info["class_order"][i : i + 2] for i in (0, 2, 4, 6, 8)
    ]


def test_split_fewer_tasks(tiny_mnist) -> None:
    b = make_benchmark("split-mnist", tiny_mnist, num_tasks=2, scenario="task-il")
    assert [t.classes for t in b.tasks] == [[0, 1], [2, 3]] and b.n_heads == 2


# -- permuted ------------------------------------------------------------------------------


def test_permutations_seeded_and_distinct(tiny_mnist) -> None:
    a = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=3, seed=7)
    b = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=3, seed=7)
    c = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=3, seed=8)
    pa, pb, pc = a.info["permutations"], b.info["permutations"], c.info["permutations"]
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    for p in pa:
        assert sorted(p.tolist()) == list(range(784))  # a true permutation
        assert not torch.equal(p, torch.arange(784))  # task 0 is permuted too by default
    assert len({tuple(p.tolist()) for p in pa}) == 3  # distinct across tasks
    base_train, base_test = _raw(tiny_mnist.train_images), _raw(tiny_mnist.test_images)
    for t, p in zip(a.tasks, pa, strict=True):
        assert torch.equal(t.train_x, base_train[:, p]) and torch.equal(t.test_x, base_test[:, p])
        assert t.train_y.tolist() == tiny_mnist.train_labels.tolist()
    # Task i's permutation does not depend on the sequence length.
    assert torch.equal(pixel_permutations(5, 7)[:3], pa)


def test_permuted_identity_first_and_class_il(tiny_mnist) -> None:
    b = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=2, identity_first=True)
    assert torch.equal(b.tasks[0].train_x, _raw(tiny_mnist.train_images))
    assert not torch.equal(b.tasks[1].train_x, b.tasks[0].train_x)
    c = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=3, scenario="class-il")
    for t in c.tasks:
        assert t.test_y.tolist() == (tiny_mnist.test_labels + 10 * t.index).tolist()
    ti = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=3, scenario="task-il")
    assert ti.tasks[2].train_y.tolist() == tiny_mnist.train_labels.tolist()


def test_train_per_task_subsample(tiny_mnist) -> None:
    a = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=2, train_per_task=50, seed=1)
    b = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=2, train_per_task=50, seed=1)
    assert len(a.tasks[0].train_y) == 50 and len(a.tasks[0].test_y) == 200
    assert torch.equal(a.tasks[1].train_x, b.tasks[1].train_x)
    # Each row is a permuted original image, with its own label.
    base = _raw(tiny_mnist.train_images)[:, a.info["permutations"][0]]
    labels = torch.from_numpy(tiny_mnist.train_labels)
    hits = (a.tasks[0].train_x[:, None, :] == base[None]).all(-1)
    assert hits.sum(1).eq(1).all()
    assert torch.equal(labels[hits.float().argmax(1)], a.tasks[0].train_y)
    s = make_benchmark("split-mnist", tiny_mnist, train_per_task=30, test_per_task=10)
    assert [len(t.train_y) for t in s.tasks] == [30] * 5
    assert [len(t.test_y) for t in s.tasks] == [10] * 5
    with pytest.raises(ValueError, match="train_per_task=121 but the task has only 120"):
        make_benchmark("split-mnist", tiny_mnist, train_per_task=121)
    with pytest.raises(ValueError, match="train_per_task must be >= 1"):
        make_benchmark("split-mnist", tiny_mnist, train_per_task=0)


# -- rotated -------------------------------------------------------------------------------


def test_rotation_matches_rot90() -> None:
    img = torch.zeros(28, 28)
    img[3:10, 4] = 1.0  # an "L": asymmetric under every rotation and mirror
    img[9, 4:15] = 0.5
    img[20, 22] = 0.25
    x = img.reshape(1, 784)
    for degrees, k in ((90, 1), (180, 2), (270, 3), (-90, 3)):
        rotated = rotate_images(x, degrees).reshape(28, 28)
        torch.testing.assert_close(rotated, torch.rot90(img, k, dims=(0, 1)), atol=1e-5, rtol=0)
    assert not torch.allclose(rotate_images(x, 90), torch.rot90(img, 3).reshape(1, 784))
    torch.testing.assert_close(rotate_images(x, 0.0), x, atol=1e-6, rtol=0)


def test_rotation_is_about_the_image_centre() -> None:
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = torch.exp(-((yy - 13.5) ** 2 + (xx - 13.5) ** 2) / 32.0).reshape(1, 784)
    rotated = rotate_images(blob, 33.0)
    torch.testing.assert_close(rotated, blob, atol=0.02, rtol=0)  # isotropic: unchanged
    assert rotated.sum().item() == pytest.approx(blob.sum().item(), rel=1e-3)


def test_rotated_benchmark(tiny_mnist) -> None:
    b = make_benchmark("rotated-mnist", tiny_mnist, rotations=[0, 90], scenario="class-il")
    assert len(b) == 2 and b.head_outputs == 20 and b.tasks[1].name == "rotation 90°"
    assert torch.equal(b.tasks[0].train_x, _raw(tiny_mnist.train_images))
    expected = torch.rot90(b.tasks[0].test_x.reshape(-1, 28, 28), 1, dims=(1, 2)).reshape(-1, 784)
    torch.testing.assert_close(b.tasks[1].test_x, expected, atol=1e-5, rtol=0)
    assert b.tasks[1].train_y.tolist() == (tiny_mnist.train_labels + 10).tolist()


# -- batches -------------------------------------------------------------------------------


def test_batches_cover_each_example_once(tiny_mnist) -> None:
    task = make_benchmark("split-mnist", tiny_mnist, scenario="task-il").tasks[3]
    batches = list(task.batches(32, seed=0))
    assert [len(b["y"]) for b in batches] == [32, 32, 32, 24]
    assert all(b["task"].dtype == torch.int64 and b["task"].eq(3).all() for b in batches)
    xs = torch.cat([b["x"] for b in batches])
    order = torch.cat([b["y"] for b in batches])
    # Same multiset of rows as the task, in a different order.
    assert sorted(map(tuple, xs.tolist())) == sorted(map(tuple, task.train_x.tolist()))
    assert not torch.equal(xs, task.train_x)
    assert sorted(order.tolist()) == sorted(task.train_y.tolist())
    again = torch.cat([b["x"] for b in task.batches(32, seed=0)])
    other = torch.cat([b["x"] for b in task.batches(32, seed=1)])
    assert torch.equal(xs, again) and not torch.equal(xs, other)
    assert [len(b["y"]) for b in task.batches(32, seed=0, drop_last=True)] == [32, 32, 32]
    plain = list(task.batches(50, split="test", shuffle=False))
    assert torch.equal(torch.cat([b["x"] for b in plain]), task.test_x)


def test_generator_gives_new_order_each_epoch() -> None:
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    e1 = torch.cat([b["y"] for b in iterate_batches(x, y, 0, 4, generator=gen)])
    e2 = torch.cat([b["y"] for b in iterate_batches(x, y, 0, 4, generator=gen)])
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(10))
    assert not torch.equal(e1, e2)


def test_tiny_mnist_is_learnable(tiny_mnist) -> None:
    """The synthetic digits must let a small MLP learn a 2-way task fast (others rely on it)."""
    torch.manual_seed(0)
    task = make_benchmark("split-mnist", tiny_mnist, scenario="task-il").tasks[2]
    net = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        for b in task.batches(32, generator=gen):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(b["x"]), b["y"]).backward()
            opt.step()
    acc = (net(task.test_x).argmax(1) == task.test_y).float().mean().item()
    assert acc >= 0.95


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "split-cifar"}, ValueError, "unknown benchmark 'split-cifar'.*permuted-mnist"),
        ({"scenario": "online"}, ValueError, "unknown scenario 'online'.*task-il, domain-il"),
        ({"num_tasks": 0}, ValueError, "num_tasks must be >= 1"),
        ({"num_tasks": 6}, ValueError, "at most 5 tasks.*use 1..5"),
        ({"class_order": [0, 1, 2]}, ValueError, "each digit 0..9 exactly once"),
        ({"class_order": "shuffled"}, ValueError, "'random'"),
        ({"rotations": [0, 90]}, ValueError, "rotated-mnist only"),
        ({"identity_first": True}, ValueError, "permuted-mnist only"),
        ({"name": "permuted-mnist", "class_order": "random"}, ValueError, "split-mnist only"),
        ({"name": "rotated-mnist", "num_tasks": 3, "rotations": [0, 9]}, ValueError, "2 angles"),
    ],
)
def test_errors(tiny_mnist, kwargs, error, match) -> None:
    kwargs = {"name": "split-mnist", **kwargs}
    with pytest.raises(error, match=match):
        make_benchmark(kwargs.pop("name"), tiny_mnist, **kwargs)


def test_bad_data_and_batch_args(tiny_mnist) -> None:
    with pytest.raises(TypeError, match="load_mnist"):
        make_benchmark("split-mnist", {"train_images": None})  # type: ignore[arg-type]
    task = make_benchmark("split-mnist", tiny_mnist).tasks[0]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(task.batches(0))
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        task.batches(8, split="val")


# -- optional real data --------------------------------------------------------------------


def test_real_split_mnist_if_available() -> None:
    env = os.environ.get(ENV_DATA_DIR, "")
    if not env or not (Path(env) / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{ENV_DATA_DIR} does not point at a directory with the MNIST files")
    b: Benchmark = make_benchmark("split-mnist", load_mnist(env, download=False))
    data = load_mnist(env, download=False)
    assert sum(len(t.train_y) for t in b.tasks) == len(data.train_labels)
    assert sum(len(t.test_y) for t in b.tasks) == len(data.test_labels)
