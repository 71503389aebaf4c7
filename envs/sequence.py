"""TaskSequence: an ordered list of tasks with step budgets, cycles and a seed."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

import numpy as np

from envs.errors import EnvConfigError
from envs.spec import TaskSpec

if TYPE_CHECKING:
    import gymnasium as gym

    from envs.continual import ContinualEnv


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise EnvConfigError(
            f"{what} must be a positive integer (a number of env steps), got {value!r}."
        )
    return int(value)


@dataclass(frozen=True)
class TaskSequence:
    """Tasks trained one after the other, ``steps_per_task`` env steps each, ``cycles`` times.

    The sequence is a plain picklable value; envs are built from it by
    :meth:`make_env` (the continual training env) and :meth:`make_eval_env` (one per task).

    * ``steps_per_task``: one budget for every task, or one per task (in ``tasks`` order).
    * ``shuffle``: train the tasks in an order drawn from ``seed`` (the same in every cycle);
      a task keeps its index (and one-hot) whatever its position.
    * ``pad_observations``: zero-pad flat observations to the longest task's length.
    * Task ids are per task, not per stage: a task met again in a later cycle keeps its
      index, its one-hot and its output head.
    """

    name: str
    tasks: Sequence[TaskSpec]
    steps_per_task: int | Sequence[int]
    cycles: int = 1
    seed: int = 0
    shuffle: bool = False
    pad_observations: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise EnvConfigError(f"A sequence needs a non-empty name, got {self.name!r}.")
        tasks = tuple(self.tasks) if not isinstance(self.tasks, TaskSpec) else (self.tasks,)
        if not tasks:
            raise EnvConfigError(f"Sequence {self.name!r} has no tasks; give at least one.")
        for i, t in enumerate(tasks):
            if not isinstance(t, TaskSpec):
                raise EnvConfigError(
                    f"Task {i} of sequence {self.name!r} must be a TaskSpec, got {t!r}."
                )
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EnvConfigError(
                f"Sequence {self.name!r} has tasks with the same name: {dupes}. Task names "
                "identify tasks in logs and evaluation; give each a distinct name (repeat a "
                "whole sequence with cycles instead)."
            )
        object.__setattr__(self, "tasks", tasks)
        if isinstance(self.steps_per_task, Sequence) and not isinstance(self.steps_per_task, str):
            steps = tuple(self.steps_per_task)
            if len(steps) != len(tasks):
                raise EnvConfigError(
                    f"Sequence {self.name!r}: steps_per_task has {len(steps)} entries for "
                    f"{len(tasks)} tasks; give one number, or one per task."
                )
            steps = tuple(
                _positive_int(s, f"steps_per_task of task {i} ({tasks[i].name!r})")
                for i, s in enumerate(steps)
            )
        else:
            steps = _positive_int(self.steps_per_task, f"steps_per_task of {self.name!r}")
        object.__setattr__(self, "steps_per_task", steps)
        _positive_int(self.cycles, f"cycles of {self.name!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer) or (
            self.seed < 0
        ):
            raise EnvConfigError(
                f"Sequence {self.name!r}: seed must be a non-negative integer, got {self.seed!r}."
            )
        for i, t in enumerate(tasks):  # unknown ids fail now where the ids' extra is installed
            if t.requirements_available():
                try:
                    t.check_env_id()
                except EnvConfigError as exc:
                    raise EnvConfigError(f"Sequence {self.name!r}, task {i}: {exc}") from exc

    # -- schedule --------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @cached_property
    def order(self) -> tuple[int, ...]:
        """Task indices in training order within one cycle."""
        if not self.shuffle:
            return tuple(range(self.num_tasks))
        rng = np.random.default_rng([self.seed, 2])
        return tuple(int(i) for i in rng.permutation(self.num_tasks))

    @cached_property
    def schedule(self) -> tuple[int, ...]:
        """Task index of each stage (a stage is one task's turn)."""
        return self.order * self.cycles

    def task_budget(self, task_index: int) -> int:
        s = self.steps_per_task
        return s if isinstance(s, int) else s[task_index]

    @cached_property
    def stage_steps(self) -> tuple[int, ...]:
        return tuple(self.task_budget(i) for i in self.schedule)

    @cached_property
    def stage_ends(self) -> tuple[int, ...]:
        """Cumulative step count at the end of each stage (the last one is ``total_steps``)."""
        return tuple(itertools.accumulate(self.stage_steps))

    @property
    def switch_points(self) -> tuple[int, ...]:
        """Global step counts after which the active task changes (``len == stages - 1``)."""
        return self.stage_ends[:-1]

    @property
    def total_steps(self) -> int:
        return self.stage_ends[-1]

    def stage_at(self, step: int) -> int:
        """Stage of the 0-based global step ``step`` when switching immediately."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        stage = int(np.searchsorted(self.stage_ends, step, side="right"))
        return min(stage, len(self.schedule) - 1)

    def task_at(self, step: int) -> int:
        """Task index active at the 0-based global step ``step`` (immediate switching)."""
        return self.schedule[self.stage_at(step)]

    # -- seeds ------------------------------------------------------------------------------
    def task_seeds(self, seed: int | None = None) -> tuple[int, ...]:
        """One seed per task for training envs, derived from ``seed`` (default: the sequence's).

        ``numpy.random.SeedSequence.spawn`` gives independent, reproducible streams.
        """
        root = np.random.SeedSequence(self.seed if seed is None else seed)
        return tuple(int(c.generate_state(1)[0]) for c in root.spawn(self.num_tasks))

    def eval_seeds(self, seed: int | None = None) -> tuple[int, ...]:
        """Per-task seeds for evaluation envs, disjoint from the training streams."""
        root = np.random.SeedSequence([self.seed if seed is None else seed, 1])
        return tuple(int(c.generate_state(1)[0]) for c in root.spawn(self.num_tasks))

    # -- envs -------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> TaskSequence:
        """A copy with fields changed (e.g. ``steps_per_task``, ``seed``), validated again."""
        return dataclasses.replace(self, **changes)

    def make_env(self, **kwargs: Any) -> ContinualEnv:
        """The continual training env; kwargs go to :class:`envs.continual.ContinualEnv`."""
        from envs.continual import ContinualEnv

        return ContinualEnv(self, **kwargs)

    def make_eval_env(self, task_index: int, **kwargs: Any) -> gym.Env:
        """An env that always runs task ``task_index``, with the sequence's spaces, task id
        in ``info`` and (optionally) the one-hot: what the agent sees for that task."""
        from envs.continual import make_task_env

        return make_task_env(self, task_index, **kwargs)

    def env_fn(self, **kwargs: Any) -> partial:
        """A picklable zero-argument factory of :meth:`make_env` (for vector envs)."""
        from envs.continual import ContinualEnv

        return partial(ContinualEnv, self, **kwargs)

    def eval_env_fns(self, **kwargs: Any) -> list[partial]:
        """Picklable zero-argument factories, one evaluation env per task."""
        from envs.continual import make_task_env

        return [partial(make_task_env, self, i, **kwargs) for i in range(self.num_tasks)]

    # -- display ----------------------------------------------------------------------------
    @property
    def extras(self) -> tuple[str, ...]:
        return tuple(sorted({t.extra for t in self.tasks if t.extra}))

    def describe(self) -> str:
        s = self.steps_per_task
        budget = f"{s:,} steps/task" if isinstance(s, int) else "steps/task " + ", ".join(
            f"{x:,}" for x in s
        )
        head = f"{self.name}: {self.num_tasks} tasks x {self.cycles} cycle(s), {budget}, "
        head += f"{self.total_steps:,} steps in total"
        if self.extras:
            head += f" [extra: {', '.join(self.extras)}]"
        lines = [head] + [f"  {i}. {t.name} ({t.describe()})" for i, t in enumerate(self.tasks)]
        return "\n".join(lines)
