"""Split, permuted and rotated MNIST as task sequences in the three continual-learning scenarios.

Scenarios follow van de Ven & Tolias (2019), "Three scenarios for continual learning"
(arXiv:1904.07734):

- ``task-il``: the task id is given; one output head per task (multi-head, ``n_heads`` =
  number of tasks) and labels are local to the task.
- ``domain-il``: no task id; one head shared by all tasks with the same label space.
- ``class-il``: no task id; one head over the union of all tasks' classes.

Label mapping per benchmark:

============== ============================ ========================== ==========================
benchmark      task-il (per head)           domain-il (one head)       class-il (one head)
============== ============================ ========================== ==========================
split-mnist    position in pair, {0, 1}     position in pair, {0, 1}   the digit, 10 outputs
permuted-mnist the digit, 10 per head       the digit, 10 outputs      digit + 10·task, 10·T out
rotated-mnist  the digit, 10 per head       the digit, 10 outputs      digit + 10·task, 10·T out
============== ============================ ========================== ==========================

With the default class order, "position in pair" equals ``digit % 2``. Class-IL on permuted and
rotated MNIST (10·T classes) is allowed, as in van de Ven & Tolias (2019).

Choices made here (and why):

- permuted-mnist permutes every task, task 0 included (as in van de Ven & Tolias's code), so
  no task is privileged; ``identity_first=True`` keeps task 0 unpermuted as in Kirkpatrick
  et al. (2017) and other papers.
- split-mnist's default scenario is ``task-il``, the original multi-head protocol of Zenke
  et al. (2017) and this project's multi-head default; the CLI passes the scenario anyway.
  Up to 5 tasks (the first pairs of the class order).
- rotated-mnist's default angles are evenly spaced on [0°, 180°): task i is rotated by
  i·180°/T (task 0 unrotated), counter-clockwise as displayed (row 0 at the top);
  ``rotations=`` gives explicit angles. Bilinear interpolation, zero padding.
- Every transformed tensor is computed once here, never per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from crl.supervised.mnist import MNIST

BENCHMARKS: tuple[str, ...] = ("split-mnist", "permuted-mnist", "rotated-mnist")
SCENARIOS: tuple[str, ...] = ("task-il", "domain-il", "class-il")
DEFAULT_SCENARIO: dict[str, str] = {
    "split-mnist": "task-il",
    "permuted-mnist": "domain-il",
    "rotated-mnist": "domain-il",
}
DEFAULT_NUM_TASKS: dict[str, int] = {"split-mnist": 5, "permuted-mnist": 10, "rotated-mnist": 10}

# Stream ids that keep the random draws of different purposes independent of each other.
_PERMUTATION, _TRAIN_SUBSET, _TEST_SUBSET, _CLASS_ORDER = 1, 2, 3, 4


@dataclass(repr=False)
class Task:
    """One task: its data (x float32 (N, 784) in [0, 1]; y int64 scenario labels)."""

    index: int
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    #: Original digits in the task.
    classes: list[int]

    def __repr__(self) -> str:
        return (
            f"Task({self.index}, {self.name!r}, train={len(self.train_y)}, "
            f"test={len(self.test_y)}, classes={self.classes})"
        )

    def batches(
        self,
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the task's ``split`` in mini-batches ``{"x", "y", "task"}``."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        return iterate_batches(
            x,
            y,
            self.index,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            seed=seed,
            drop_last=drop_last,
        )


@dataclass(repr=False)
class Benchmark:
    """A task sequence in one scenario, with the output layout a model needs."""

    name: str
    scenario: str
    tasks: list[Task]
    #: Number of output heads: one per task for task-IL, else 1.
    n_heads: int
    #: Outputs of each head.
    head_outputs: int
    seed: int = 0
    #: What produced the tasks: permutations, angles, class order.
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    def head_of(self, task: int) -> int:
        """The head that serves ``task`` (its own in task-IL, the shared one otherwise)."""
        return task if self.n_heads > 1 else 0

    def __repr__(self) -> str:
        return (
            f"Benchmark({self.name!r}, {self.scenario!r}, tasks={len(self.tasks)}, "
            f"n_heads={self.n_heads}, head_outputs={self.head_outputs}, seed={self.seed})"
        )


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    task: int | torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches as dicts ``{"x", "y", "task"}`` (the shape strategies and hosts expect).

    ``task`` is one task id for all rows, or a tensor of per-row ids (mixed-task data such
    as joint training).

    Shuffling uses ``generator`` if given (pass the same one across epochs to get a new order
    each epoch), else a generator seeded with ``seed``, else torch's global RNG.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    n = len(y)
    ids = torch.full((n,), task, dtype=torch.int64) if isinstance(task, int) else task.long()
    if len(ids) != n:
        raise ValueError(f"task ids have {len(ids)} rows but y has {n}")
    if shuffle:
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {
            "x": x[idx],
            "y": y[idx],
            "task": ids[idx],
        }


# -- transforms ----------------------------------------------------------------------------


def _generator(seed: int, stream: int, task: int = 0) -> torch.Generator:
    """An independent, reproducible generator per (seed, purpose, task)."""
    state = np.random.SeedSequence([seed, stream, task]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).reshape(len(images), -1).float() / 255.0


def pixel_permutations(num_tasks: int, seed: int, *, identity_first: bool = False) -> torch.Tensor:
    """(num_tasks, 784) int64 pixel orders; task i's own stream makes it independent of T."""
    perms = [
        torch.randperm(784, generator=_generator(seed, _PERMUTATION, i)) for i in range(num_tasks)
    ]
    if identity_first and num_tasks:
        perms[0] = torch.arange(784)
    return torch.stack(perms)


def rotate_images(x: torch.Tensor, degrees: float, *, chunk: int = 8192) -> torch.Tensor:
    """Rotate flattened 28x28 images counter-clockwise (as displayed) by ``degrees``.

    Bilinear ``grid_sample`` with zero padding; a multiple of 90° maps pixel centres onto
    pixel centres (``align_corners=False`` on a square image), so it matches ``torch.rot90``.
    """
    rad = math.radians(degrees)
    c, s = math.cos(rad), math.sin(rad)
    theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 1, 28, 28], align_corners=False)
    out = torch.empty_like(x)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].reshape(-1, 1, 28, 28)
        rotated = F.grid_sample(
            part,
            grid.expand(len(part), -1, -1, -1),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        out[start : start + chunk] = rotated.reshape(len(part), -1).clamp_(0.0, 1.0)
    return out


# -- construction --------------------------------------------------------------------------


def _normalise(value: str, valid: Sequence[str], what: str) -> str:
    key = value.strip().lower().replace("_", "-")
    if what == "scenario" and key in ("task", "domain", "class"):
        key += "-il"
    if key not in valid:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(valid)}")
    return key


def _subset(
    n_available: int, n: int | None, gen: torch.Generator, what: str
) -> torch.Tensor | slice:
    """Seeded indices of ``n`` of ``n_available`` examples, in their original order; all of
    them as a slice (indexing with it copies nothing)."""
    if n is None:
        return slice(None)
    if n < 1:
        raise ValueError(f"{what} must be >= 1 (or None for all), got {n}")
    if n > n_available:
        raise ValueError(
            f"{what}={n} but the task has only {n_available} examples; use at most "
            f"{n_available} or None for all"
        )
    return torch.randperm(n_available, generator=gen)[:n].sort().values


def _class_order(class_order: Sequence[int] | str | None, seed: int) -> list[int]:
    if class_order is None:
        return list(range(10))
    if isinstance(class_order, str):
        if class_order != "random":
            raise ValueError(
                f"class_order must be None, 'random' or a sequence of the 10 digits, "
                f"got {class_order!r}"
            )
        return torch.randperm(10, generator=_generator(seed, _CLASS_ORDER)).tolist()
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(10)):
        raise ValueError(f"class_order must list each digit 0..9 exactly once, got {order}")
    return order


def make_benchmark(
    name: str,
    data: MNIST,
    *,
    num_tasks: int | None = None,
    scenario: str | None = None,
    seed: int = 0,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    rotations: Sequence[float] | None = None,
    identity_first: bool = False,
    class_order: Sequence[int] | str | None = None,
) -> Benchmark:
    """Build a benchmark from loaded MNIST; see the module docstring for the conventions.

    ``train_per_task`` / ``test_per_task`` draw a seeded subset of each task's examples
    (different per task). ``class_order`` (split-mnist only): None for 0..9, ``"random"``
    for a seeded order, or the 10 digits; consecutive pairs form the tasks.
    """
    if not isinstance(data, MNIST):
        raise TypeError(
            "data must be a crl.supervised.mnist.MNIST (from load_mnist), "
            f"got {type(data).__name__}"
        )
    name = _normalise(name, BENCHMARKS, "benchmark")
    scenario = _normalise(scenario or DEFAULT_SCENARIO[name], SCENARIOS, "scenario")
    if rotations is not None and name != "rotated-mnist":
        raise ValueError(f"rotations= applies to rotated-mnist only, not {name}")
    if class_order is not None and name != "split-mnist":
        raise ValueError(f"class_order= applies to split-mnist only, not {name}")
    if identity_first and name != "permuted-mnist":
        raise ValueError(f"identity_first= applies to permuted-mnist only, not {name}")
    if num_tasks is None:
        num_tasks = len(rotations) if rotations is not None else DEFAULT_NUM_TASKS[name]
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")

    train_x, test_x = to_float(data.train_images), to_float(data.test_images)
    train_digits = torch.from_numpy(np.asarray(data.train_labels, dtype=np.int64))
    test_digits = torch.from_numpy(np.asarray(data.test_labels, dtype=np.int64))
    info: dict[str, Any] = {}
    tasks: list[Task] = []

    if name == "split-mnist":
        if num_tasks > 5:
            raise ValueError(
                f"split-mnist has at most 5 tasks (digit pairs), got num_tasks={num_tasks}; "
                "use 1..5"
            )
        order = _class_order(class_order, seed)
        info["class_order"] = order
        for t in range(num_tasks):
            pair = order[2 * t : 2 * t + 2]
            splits = []
            for digits, x, stream, n in (
                (train_digits, train_x, _TRAIN_SUBSET, train_per_task),
                (test_digits, test_x, _TEST_SUBSET, test_per_task),
            ):
                rows = torch.nonzero((digits == pair[0]) | (digits == pair[1])).squeeze(1)
                what = "train_per_task" if stream == _TRAIN_SUBSET else "test_per_task"
                rows = rows[_subset(len(rows), n, _generator(seed, stream, t), what)]
                d = digits[rows]
                y = d if scenario == "class-il" else (d == pair[1]).long()
                splits.append((x[rows], y))
            (trx, try_), (tex, tey) = splits
            tasks.append(Task(t, f"digits {pair[0]}/{pair[1]}", trx, try_, tex, tey, pair))
        n_heads = num_tasks if scenario == "task-il" else 1
        head_outputs = 10 if scenario == "class-il" else 2
    else:
        if name == "permuted-mnist":
            perms = pixel_permutations(num_tasks, seed, identity_first=identity_first)
            info["permutations"] = perms

            def transform(x: torch.Tensor, t: int) -> torch.Tensor:
                return x[:, perms[t]]

            names = [f"permutation {t}" for t in range(num_tasks)]
        else:
            if rotations is None:
                angles = [t * 180.0 / num_tasks for t in range(num_tasks)]
            else:
                angles = [float(a) for a in rotations]
                if len(angles) != num_tasks:
                    raise ValueError(
                        f"rotations has {len(angles)} angles but num_tasks={num_tasks}; give "
                        "one angle per task (or leave num_tasks out)"
                    )
            info["angles"] = angles

            def transform(x: torch.Tensor, t: int) -> torch.Tensor:
                return x.clone() if angles[t] % 360 == 0 else rotate_images(x, angles[t])

            names = [f"rotation {a:g}°" for a in angles]
        for t in range(num_tasks):
            tr = _subset(
                len(train_digits),
                train_per_task,
                _generator(seed, _TRAIN_SUBSET, t),
                "train_per_task",
            )
            te = _subset(
                len(test_digits), test_per_task, _generator(seed, _TEST_SUBSET, t), "test_per_task"
            )
            offset = 10 * t if scenario == "class-il" else 0
            tasks.append(
                Task(
                    t,
                    names[t],
                    transform(train_x[tr], t),
                    train_digits[tr] + offset,
                    transform(test_x[te], t),
                    test_digits[te] + offset,
                    list(range(10)),
                )
            )
        n_heads = num_tasks if scenario == "task-il" else 1
        head_outputs = 10 * num_tasks if scenario == "class-il" else 10

    return Benchmark(name, scenario, tasks, n_heads, head_outputs, seed, info)


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DEFAULT_NUM_TASKS",
    "DEFAULT_SCENARIO",
    "SCENARIOS",
    "Task",
    "iterate_batches",
    "make_benchmark",
    "pixel_permutations",
    "rotate_images",
    "to_float",
]
