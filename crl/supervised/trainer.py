"""Runs any strategy through the contract on a supervised benchmark, and the joint upper bound.

The trainer is the supervised *host*: it adapts a classifier to :class:`crl.strategies.Host`
and calls the hooks in the order of docs/ARCHITECTURE.md, "Host/strategy contract". After
every task it evaluates every task, which fills the accuracy matrix R[i][j] (after task i, on
task j) that the metrics read.

Checkpoints: the trainer hands a payload of plain tensors and numbers (model, optimiser,
strategy state, shuffling generator, global RNGs, accuracy rows, position) to a callback at
every task boundary and every ``checkpoint_every`` updates, and continues exactly from such a
payload. Exactness needs the same torch build and the same number of torch threads (CPU
kernels reduce in an order that depends on it; :mod:`crl.supervised.experiment` pins it with
``torch_threads``); under those, a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from crl.checkpoint import CheckpointError, rng_state, set_rng_state
from crl.plasticity import Probe
from crl.plasticity import check_settings as check_plasticity
from crl.strategies import Batch, Strategy
from crl.strategies.memory import batch_length, concat_batches
from crl.supervised.benchmarks import Benchmark, Task, iterate_batches

#: Called after every task with (task index, accuracies of all tasks, global update count).
#: (task, accuracies after it, updates so far, the plasticity metrics measured then)
TaskEndCallback = Callable[[int, np.ndarray, int, dict[str, float]], None]
#: Called every ``log_every`` updates with (update count, metrics).
UpdateCallback = Callable[[int, dict[str, float]], None]
#: Called with the trainer's checkpoint payload; must serialise it before returning.
CheckpointCallback = Callable[[dict[str, Any]], None]


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
    #: Checkpoint every N updates as well as at every task boundary (0: boundaries only).
    #: 500 keeps the overhead small (scripts/bench_checkpoint_supervised.py measures it).
    checkpoint_every: int = 500
    #: torch intra-op threads for the run (None: leave torch's setting). Part of the config
    #: because CPU results depend on it in the last bits; pin it for exact resumes.
    torch_threads: int | None = None
    #: plasticity metrics (crl/plasticity.py) on each task's probe batch at its end
    plasticity: bool = True
    plasticity_tau: float = 0.025
    plasticity_probe: int = 256

    def __post_init__(self) -> None:
        check_plasticity(float(self.plasticity_tau), 0.01, self.plasticity_probe)
        for name in ("epochs", "batch_size", "importance_batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if isinstance(self.checkpoint_every, bool) or int(self.checkpoint_every) < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at task "
                             f"boundaries), got {self.checkpoint_every!r}")
        if self.torch_threads is not None and int(self.torch_threads) < 1:
            raise ValueError(f"torch_threads must be >= 1 or None (torch's default), got "
                             f"{self.torch_threads!r}")
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
    #: :meth:`crl.plasticity.Probe.history` (None: not measured)
    plasticity: dict[str, Any] | None = None
    #: seconds this process spent measuring them (a resumed run: since the resume)
    plasticity_seconds: float = 0.0


class ClassifierHost:
    """Adapts a classifier to the strategy contract (:class:`crl.strategies.base.Host`)."""

    #: ``_train_step`` steps with the gradient ``before_optimizer_step`` sees (no clipping)
    gradients_final_before_step = True

    def __init__(self, model: nn.Module, config: TrainerConfig, generator: torch.Generator):
        self.module = model
        self.config = config
        self.generator = generator
        self.task: Task | None = None
        self._last: tuple[Batch, torch.Tensor] | None = None
        #: the optimiser of the running update (the trainer makes a new one per task)
        self.optimizer: torch.optim.Optimizer | None = None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.optimizer is None else [self.optimizer]

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        own = getattr(self.module, "protected_parameters", None)
        return own() if callable(own) else dict(self.module.named_parameters())

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def importance_batches(self) -> Iterator[Batch]:
        if self.task is None:
            raise RuntimeError("importance_batches() called before any task was trained")
        return self.task.batches(self.config.importance_batch_size, generator=self.generator)

    def experience_batches(self) -> Iterator[Batch]:
        """The whole training set of the task just trained (a perfect memory keeps it)."""
        if self.task is None:
            raise RuntimeError("experience_batches() called before any task was trained")
        return self.task.batches(4096, shuffle=False)

    @property
    def task_size(self) -> int:
        """Training samples of the running task (the host's own data a mixed batch draws on)."""
        return 0 if self.task is None else len(self.task.train_y)

    def logits(self, batch: Batch) -> torch.Tensor:
        logits = self.module(batch["x"], batch["task"])
        self._last = (batch, logits)
        return logits

    def outputs_of(self, batch: Batch) -> torch.distributions.Distribution | None:
        """The output distribution of the latest forward pass if it was on ``batch`` (the
        training step hands it to the strategy instead of a second forward)."""
        last = self._last
        if last is None or last[0] is not batch:
            return None
        return torch.distributions.Categorical(logits=last[1], validate_args=False)

    @property
    def multi_head(self) -> bool:
        """One output head per task (``with_task`` then selects another task's head)."""
        return bool(getattr(self.module, "multi_head", False))

    def with_task(self, batch: Batch, task: int) -> dict[str, torch.Tensor]:
        """The batch as if its samples were of ``task`` (its head, for LwF)."""
        return {**batch, "task": torch.full_like(batch["task"], task)}

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


class NonFiniteError(FloatingPointError):
    """The loss or the weights became nan/inf; ``task`` (-1: joint) and ``update`` say where.

    Raised before the optimiser step of the bad update and before any checkpoint of
    non-finite weights is written, so the last checkpoint on disk is a good one.
    """

    def __init__(self, message: str, task: int, update: int) -> None:
        super().__init__(message)
        self.task = task
        self.update = update


def _where(task: int) -> str:
    return "joint training" if task < 0 else f"task {task}"


def _check_finite(loss: torch.Tensor, task: int, update: int) -> None:
    """``update`` counts from 1 (the update being computed), as checkpoints count them."""
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"loss became {loss.item()} at {_where(task)}, update {update}; lower the "
            "learning rate or the regularisation strength (lam)", task, update,
        )


def _check_weights_finite(model: nn.Module, task: int, update: int) -> None:
    """Refuse to checkpoint nan/inf weights (a finite loss can still step into them)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(
                f"parameter {name} became non-finite after update {update} of {_where(task)}; "
                "lower the learning rate or the regularisation strength (lam)", task, update,
            )


def _train_step(
    host: ClassifierHost, strategy: Strategy, optimizer: torch.optim.Optimizer, batch: Batch,
    task: int, update: int,
) -> dict[str, float]:
    """One update with the hooks in the contract's order (docs/ARCHITECTURE.md,
    "Host/strategy contract"); returns the row to log."""
    host.optimizer = optimizer
    optimizer.zero_grad(set_to_none=True)
    extra = strategy.replay_batch(batch_length(batch), host.task_size, appended=True)
    if extra is not None:  # stored samples join the batch (replay's perfect memory)
        batch = concat_batches([batch, extra])
    loss = host.loss(batch)
    penalty = strategy.penalty(batch, host.outputs_of(batch))
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


# -- checkpoints ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Position:
    """Where training stands: the next batch to train is batch ``batch`` of epoch ``epoch``
    of task ``task``. ``started``: the task's ``on_task_start`` ran (and its optimiser reset),
    so a resume goes on inside the task instead of starting it. ``task`` equal to the number
    of tasks means every task is done (joint training: task 0 is the one joint "task")."""

    task: int = 0
    epoch: int = 0
    batch: int = 0
    started: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Position:
        return cls(int(state["task"]), int(state["epoch"]), int(state["batch"]),
                   bool(state["started"]))


class _Run:
    """The mutable state of one training run that a checkpoint captures and restores.

    Mid-epoch resume is exact because the shuffling generator's state is kept from the start
    of the current epoch (before its permutation is drawn): a resumed run draws the same
    permutation and skips the batches already trained. Nothing else draws from that
    generator during an epoch (importance batches are drawn in ``on_task_end``).
    """

    def __init__(self, kind: str, model: nn.Module, strategy: Strategy | None,
                 generator: torch.Generator, n_rows: int, n_tasks: int) -> None:
        self.kind = kind
        self.model = model
        self.strategy = strategy
        self.generator = generator
        self.initial = np.zeros(n_tasks)
        self.matrix = np.zeros((n_rows, n_tasks))
        self.rows_done = 0
        self.seconds: list[float] = []
        self.updates = 0
        self.position = Position()
        self.epoch_generator: torch.Tensor | None = None
        self.task_start = time.perf_counter()
        self.probe: Probe | None = None
        self.probe_seconds = 0.0

    def payload(self, optimizer: torch.optim.Optimizer, position: Position) -> dict[str, Any]:
        """The trainer's part of a checkpoint: plain tensors and numbers only.

        Tensors of the model and strategy are the live ones, so the callback must serialise
        before returning (``save_checkpoint`` does).
        """
        task = position.task if position.started else position.task - 1
        _check_weights_finite(self.model, -1 if self.kind == "joint" else task, self.updates)
        return {
            "kind": self.kind,
            "method": None if self.strategy is None else self.strategy.name,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "strategy": None if self.strategy is None else self.strategy.state_dict(),
            "generator": self.generator.get_state(),
            "epoch_generator": self.epoch_generator if position.started else None,
            "rng": rng_state(),
            "torch_threads": torch.get_num_threads(),
            "initial": torch.from_numpy(self.initial.copy()),
            "matrix": torch.from_numpy(self.matrix[: self.rows_done].copy()),
            "seconds_per_task": list(self.seconds),
            "task_seconds": time.perf_counter() - self.task_start if position.started else 0.0,
            "updates": self.updates,
            "position": position.as_dict(),
            "plasticity": None if self.probe is None else self.probe.state_dict(),
        }

    def restore(self, state: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                n_batches: Callable[[int], int], epochs: int) -> None:
        """Load a checkpoint written by :meth:`payload` (the model and strategy must be built
        as for the run that wrote it); a checkpoint of another kind of run is an error."""
        if state.get("kind") != self.kind:
            raise CheckpointError(f"the checkpoint is of a {state.get('kind')!r} run, not a "
                                  f"{self.kind!r} run; resume it with the method it was run with")
        name = None if self.strategy is None else self.strategy.name
        if state.get("method") != name:
            raise CheckpointError(f"the checkpoint was written by method {state.get('method')!r}"
                                  f" but this run uses {name!r}")
        matrix = state["matrix"].numpy()
        if matrix.shape[1:] != self.matrix.shape[1:] or matrix.shape[0] > self.matrix.shape[0]:
            raise CheckpointError(
                f"the checkpoint's accuracy matrix has shape {tuple(matrix.shape)}, which does "
                f"not fit a run of {self.matrix.shape[1]} tasks; the benchmark differs")
        pos = Position.from_dict(state["position"])
        n_tasks = self.matrix.shape[0]
        if not 0 <= pos.task <= n_tasks or (pos.started and not (
                pos.task < n_tasks and 0 <= pos.epoch < epochs
                and 0 <= pos.batch <= n_batches(pos.task))):
            raise CheckpointError(f"the checkpoint's position {pos} lies outside this run "
                                  f"({n_tasks} tasks, {epochs} epochs); the settings differ")
        if pos.started and state["epoch_generator"] is None:
            raise CheckpointError("the checkpoint is inside a task but lacks the epoch's "
                                  "generator state; it was not written by this trainer")
        try:
            self.model.load_state_dict(state["model"])
            if self.strategy is not None:
                self.strategy.load_state_dict(state["strategy"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this model/method: {exc}") from exc
        if int(state.get("torch_threads", 0)) != torch.get_num_threads():
            warnings.warn(
                f"the run was checkpointed with {state.get('torch_threads')} torch threads and "
                f"resumes with {torch.get_num_threads()}; results can differ from an "
                "uninterrupted run in the last bits (pin --torch-threads for exact resumes)",
                RuntimeWarning, stacklevel=3,
            )
        self.generator.set_state(state["generator"])
        self.epoch_generator = state["epoch_generator"]
        self.initial = state["initial"].numpy().copy()
        self.rows_done = matrix.shape[0]
        self.matrix[: self.rows_done] = matrix
        self.seconds = [float(s) for s in state["seconds_per_task"]]
        self.updates = int(state["updates"])
        self.position = pos
        self.task_start = time.perf_counter() - float(state["task_seconds"])
        if self.probe is not None and state.get("plasticity") is not None:
            self.probe.load_state_dict(state["plasticity"])
        set_rng_state(state["rng"])  # last: nothing above may draw from the global RNGs

    def epoch_batches(self, batches: Callable[[], Iterator[Batch]], epoch: int,
                      resumed: Position | None) -> Iterator[tuple[int, Batch]]:
        """(index, batch) of one epoch, skipping what a resumed checkpoint already trained."""
        skip = 0
        if resumed is not None and resumed.epoch == epoch:
            assert self.epoch_generator is not None
            self.generator.set_state(self.epoch_generator)
            skip = resumed.batch
        else:
            self.epoch_generator = self.generator.get_state()
        # the permutation is drawn here, whole, so skipped batches cost only their indexing
        return itertools.islice(enumerate(batches()), skip, None)


def _n_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def run_sequence(
    benchmark: Benchmark,
    model: nn.Module,
    strategy: Strategy,
    config: TrainerConfig,
    *,
    seed: int = 0,
    on_task_end: TaskEndCallback | None = None,
    on_update: UpdateCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: Mapping[str, Any] | None = None,
) -> SupervisedResult:
    """Train the tasks in order with ``strategy``; evaluate every task after each one.

    ``on_checkpoint`` gets the trainer's checkpoint payload after every task (once its
    evaluation was reported to ``on_task_end``) and every ``config.checkpoint_every``
    updates; ``resume`` is such a payload (loaded back): training continues exactly where
    it was, as if never interrupted (same batches, same strategy state, same RNG draws).
    """
    generator = torch.Generator().manual_seed(seed)
    host = ClassifierHost(model, config, generator)
    strategy.bind(host)
    n_tasks = len(benchmark.tasks)
    run = _Run("sequence", model, strategy, generator, n_tasks, n_tasks)
    if config.plasticity:
        run.probe = Probe(config.plasticity_tau, size=config.plasticity_probe)
    optimizer = make_optimizer(host.trained_parameters(), config)

    def n_batches(i: int) -> int:
        return _n_batches(benchmark.tasks[i].train_x.shape[0], config.batch_size)

    resumed: Position | None = None
    if resume is None:
        run.initial = evaluate_all(model, benchmark, None, config.eval_batch_size)
    else:
        run.restore(resume, optimizer, n_batches, config.epochs)
        resumed = run.position if run.position.started else None
    every = config.checkpoint_every
    for i in range(run.position.task, n_tasks):
        task = benchmark.tasks[i]
        host.task = task
        if resumed is None:
            run.task_start = time.perf_counter()
            if config.reset_optimizer and i > 0:
                optimizer = make_optimizer(host.trained_parameters(), config)
            strategy.on_task_start(i)
        model.train()
        first_epoch = 0 if resumed is None else resumed.epoch
        bar = tqdm(
            total=n_batches(i) * config.epochs,
            initial=0 if resumed is None else n_batches(i) * resumed.epoch + resumed.batch,
            desc=f"{strategy.name} task {i + 1}/{n_tasks}",
            disable=None if config.progress else True,  # None: only on a terminal
            leave=False,
        )
        for epoch in range(first_epoch, config.epochs):
            batches = run.epoch_batches(
                lambda task=task: task.batches(config.batch_size, generator=generator),
                epoch, resumed)
            for b, batch in batches:
                row = _train_step(host, strategy, optimizer, batch, i, run.updates + 1)
                run.updates += 1
                bar.update()
                if on_update is not None and run.updates % config.log_every == 0:
                    row |= {f"train/{k}": v for k, v in strategy.diagnostics().items()}
                    on_update(run.updates, row)
                if on_checkpoint is not None and every and run.updates % every == 0:
                    on_checkpoint(run.payload(optimizer, Position(i, epoch, b + 1, True)))
            resumed = None
        bar.close()
        resumed = None
        strategy.on_task_end(i)
        run.seconds.append(time.perf_counter() - run.task_start)
        run.matrix[i] = evaluate_all(model, benchmark, strategy, config.eval_batch_size)
        run.rows_done = i + 1
        measured: dict[str, float] = {}
        if run.probe is not None:
            t0 = time.perf_counter()
            measured = run.probe.measure(
                host, i, run.updates,
                # its own seed: the training generator must not see the probe
                batches=lambda task=task, i=i: task.batches(config.plasticity_probe, seed=i),
                complete=True)
            run.probe_seconds += time.perf_counter() - t0
        if on_task_end is not None:
            on_task_end(i, run.matrix[i], run.updates, measured)
        if on_checkpoint is not None:
            on_checkpoint(run.payload(optimizer, Position(i + 1)))
    return SupervisedResult(strategy.name, run.matrix, run.initial, run.seconds, run.updates,
                            None if run.probe is None else run.probe.history(),
                            run.probe_seconds)


def run_joint(
    benchmark: Benchmark,
    model: nn.Module,
    config: TrainerConfig,
    *,
    seed: int = 0,
    on_update: UpdateCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: Mapping[str, Any] | None = None,
) -> SupervisedResult:
    """Multi-task upper bound: all tasks' data shuffled together, same number of epochs.

    Checkpoints and resume work as in :func:`run_sequence`, with the joint data as one task.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([t.train_x for t in benchmark.tasks])
    y = torch.cat([t.train_y for t in benchmark.tasks])
    task_ids = torch.cat(
        [torch.full((t.train_x.shape[0],), t.index, dtype=torch.long) for t in benchmark.tasks]
    )
    host = ClassifierHost(model, config, generator)
    no_method = Strategy().bind(host)  # the base strategy's hooks are all no-ops
    run = _Run("joint", model, None, generator, 1, len(benchmark.tasks))
    optimizer = make_optimizer(host.trained_parameters(), config)
    per_epoch = _n_batches(x.shape[0], config.batch_size)
    resumed: Position | None = None
    if resume is None:
        run.initial = evaluate_all(model, benchmark, None, config.eval_batch_size)
        run.task_start = time.perf_counter()
    else:
        run.restore(resume, optimizer, lambda _: per_epoch, config.epochs)
        resumed = run.position if run.position.started else None
    every = config.checkpoint_every
    if run.position.task == 0:
        model.train()
        first_epoch = 0 if resumed is None else resumed.epoch
        for epoch in tqdm(range(first_epoch, config.epochs), desc="joint",
                          disable=None if config.progress else True, leave=False):
            batches = run.epoch_batches(
                lambda: iterate_batches(x, y, task_ids, config.batch_size, generator=generator),
                epoch, resumed)
            for b, batch in batches:
                row = _train_step(host, no_method, optimizer, batch, -1, run.updates + 1)
                run.updates += 1
                if on_update is not None and run.updates % config.log_every == 0:
                    on_update(run.updates, row)
                if on_checkpoint is not None and every and run.updates % every == 0:
                    on_checkpoint(run.payload(optimizer, Position(0, epoch, b + 1, True)))
            resumed = None
        run.matrix[0] = evaluate_all(model, benchmark, None, config.eval_batch_size)
        run.seconds.append(time.perf_counter() - run.task_start)
        run.rows_done = 1
        if on_checkpoint is not None:
            on_checkpoint(run.payload(optimizer, Position(1)))
    return SupervisedResult("joint", run.matrix, run.initial, run.seconds, run.updates)
