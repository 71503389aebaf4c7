"""Runs any strategy through the contract on a supervised benchmark, and the joint upper bound.

The trainer is the supervised *host*: it adapts a classifier to :class:`crl.strategies.Host`
and calls the hooks in DESIGN.md's order. After every task it evaluates every task, which
fills the accuracy matrix R[i][j] (after task i, on task j) that the metrics read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from crl.strategies import Batch, Strategy
from crl.supervised.benchmarks import Benchmark, Task, iterate_batches

#: Called after every task with (task index, accuracies of all tasks, global update count).
TaskEndCallback = Callable[[int, np.ndarray, int], None]
#: Called every ``log_every`` updates with (update count, metrics).
UpdateCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainerConfig:
    """Optimisation settings shared by every method (so comparisons are like for like)."""

    epochs: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    reset_optimizer: bool = True
    importance_batch_size: int = 256
    eval_batch_size: int = 1024
    log_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "importance_batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


@dataclass
class SupervisedResult:
    """What one run produced; ``matrix`` has one row per finished task (joint: one row)."""

    method: str
    matrix: np.ndarray
    initial: np.ndarray
    seconds_per_task: list[float] = field(default_factory=list)
    updates: int = 0


class ClassifierHost:
    """Adapts a classifier to the strategy contract (:class:`crl.strategies.base.Host`)."""

    def __init__(self, model: nn.Module, config: TrainerConfig, generator: torch.Generator):
        self.module = model
        self.config = config
        self.generator = generator
        self.task: Task | None = None

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        own = getattr(self.module, "protected_parameters", None)
        return own() if callable(own) else dict(self.module.named_parameters())

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def importance_batches(self) -> Iterator[Batch]:
        if self.task is None:
            raise RuntimeError("importance_batches() called before any task was trained")
        return self.task.batches(self.config.importance_batch_size, generator=self.generator)

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.module(batch["x"], batch["task"])

    def output_distribution(self, batch: Batch) -> torch.distributions.Distribution:
        return torch.distributions.Categorical(logits=self.logits(batch), validate_args=False)

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["y"])


def make_optimizer(params: list[nn.Parameter], config: TrainerConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(params, lr=config.lr)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch_size: int) -> float:
    """Accuracy on the task's test set (argmax over the task's head)."""
    was_training = model.training
    model.eval()
    correct = 0
    n = task.test_x.shape[0]
    for start in range(0, n, batch_size):
        x = task.test_x[start : start + batch_size]
        t = torch.full((x.shape[0],), task.index, dtype=torch.long)
        pred = model(x, t).argmax(dim=1)
        correct += int((pred == task.test_y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(n, 1)


def evaluate_all(
    model: nn.Module, benchmark: Benchmark, strategy: Strategy | None, batch_size: int
) -> np.ndarray:
    """Accuracy on every task, each under the strategy's evaluation context (PackNet masks)."""
    accs = np.zeros(len(benchmark.tasks))
    for j, task in enumerate(benchmark.tasks):
        if strategy is None:
            accs[j] = evaluate(model, task, batch_size)
        else:
            with strategy.evaluation(j):
                accs[j] = evaluate(model, task, batch_size)
    return accs


def _check_finite(loss: torch.Tensor, task: int, update: int) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss became {loss.item()} at task {task}, update {update}; lower the learning "
            "rate or the regularisation strength (lam)"
        )


def _train_step(
    host: ClassifierHost, strategy: Strategy, optimizer: torch.optim.Optimizer, batch: Batch,
    task: int, update: int,
) -> dict[str, float]:
    """One update with the hooks in DESIGN.md's order; returns the row to log."""
    optimizer.zero_grad(set_to_none=True)
    loss = host.loss(batch)
    penalty = strategy.penalty()
    total = loss if penalty is None else loss + penalty
    _check_finite(total, task, update)
    total.backward()
    strategy.before_optimizer_step()
    optimizer.step()
    strategy.after_optimizer_step()
    row = {"train/loss": loss.item()}
    if penalty is not None:
        row["train/penalty"] = penalty.item()
    return row


def run_sequence(
    benchmark: Benchmark,
    model: nn.Module,
    strategy: Strategy,
    config: TrainerConfig,
    *,
    seed: int = 0,
    on_task_end: TaskEndCallback | None = None,
    on_update: UpdateCallback | None = None,
) -> SupervisedResult:
    """Train the tasks in order with ``strategy``; evaluate every task after each one."""
    generator = torch.Generator().manual_seed(seed)
    host = ClassifierHost(model, config, generator)
    strategy.bind(host)
    n_tasks = len(benchmark.tasks)
    initial = evaluate_all(model, benchmark, None, config.eval_batch_size)
    matrix = np.zeros((n_tasks, n_tasks))
    seconds: list[float] = []
    optimizer = make_optimizer(host.trained_parameters(), config)
    updates = 0
    for i, task in enumerate(benchmark.tasks):
        start = time.perf_counter()
        host.task = task
        if config.reset_optimizer and i > 0:
            optimizer = make_optimizer(host.trained_parameters(), config)
        strategy.on_task_start(i)
        model.train()
        n_batches = -(-task.train_x.shape[0] // config.batch_size) * config.epochs
        bar = tqdm(
            total=n_batches,
            desc=f"{strategy.name} task {i + 1}/{n_tasks}",
            disable=not config.progress,
            leave=False,
        )
        for _ in range(config.epochs):
            for batch in task.batches(config.batch_size, generator=generator):
                row = _train_step(host, strategy, optimizer, batch, i, updates)
                updates += 1
                bar.update()
                if on_update is not None and updates % config.log_every == 0:
                    on_update(updates, row)
        bar.close()
        strategy.on_task_end(i)
        seconds.append(time.perf_counter() - start)
        matrix[i] = evaluate_all(model, benchmark, strategy, config.eval_batch_size)
        if on_task_end is not None:
            on_task_end(i, matrix[i], updates)
    return SupervisedResult(strategy.name, matrix, initial, seconds, updates)


def run_joint(
    benchmark: Benchmark,
    model: nn.Module,
    config: TrainerConfig,
    *,
    seed: int = 0,
    on_update: UpdateCallback | None = None,
) -> SupervisedResult:
    """Multi-task upper bound: all tasks' data shuffled together, same number of epochs."""
    generator = torch.Generator().manual_seed(seed)
    initial = evaluate_all(model, benchmark, None, config.eval_batch_size)
    x = torch.cat([t.train_x for t in benchmark.tasks])
    y = torch.cat([t.train_y for t in benchmark.tasks])
    task_ids = torch.cat(
        [torch.full((t.train_x.shape[0],), t.index, dtype=torch.long) for t in benchmark.tasks]
    )
    host = ClassifierHost(model, config, generator)
    no_method = Strategy().bind(host)  # the base strategy's hooks are all no-ops
    optimizer = make_optimizer(host.trained_parameters(), config)
    start = time.perf_counter()
    updates = 0
    model.train()
    for _ in tqdm(range(config.epochs), desc="joint", disable=not config.progress, leave=False):
        for batch in iterate_batches(x, y, task_ids, config.batch_size, generator=generator):
            row = _train_step(host, no_method, optimizer, batch, -1, updates)
            updates += 1
            if on_update is not None and updates % config.log_every == 0:
                on_update(updates, row)
    final = evaluate_all(model, benchmark, None, config.eval_batch_size)
    elapsed = time.perf_counter() - start
    return SupervisedResult("joint", final[None, :], initial, [elapsed], updates)
