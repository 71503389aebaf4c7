"""The training loop of a task sequence, public: :func:`train_stages` runs an agent
through stages (``start_task`` / ``learn`` / ``end_task``), evaluating every
``eval_every`` steps and at every stage end, and checkpointing through callbacks. Used by
``crl train`` (:mod:`agents.runner`) and ``crl reference`` (:mod:`agents.reference`)."""


from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import KVWriter
from tqdm.auto import tqdm

from agents.evaluation import (
    BatchedEvaluator,
    EvalResult,
    ScoreNormalizer,
    json_ready,
)
from crl.metric_keys import (
    RL_AVERAGE_RETURN,
    RL_AVERAGE_SCORE,
    RL_RETURN,
    RL_SCORE,
    RL_SUCCESS,
    rl_task_key,
)
from crl.metrics import EvalHistory
from crl.plasticity import Probe
from crl.tracking import RunTracker

if TYPE_CHECKING:
    from envs.sequence import TaskSequence

class TrackerWriter(KVWriter):
    """SB3 logger output that forwards every dump to the RunTracker (and so to W&B).

    ``iteration_offset``: SB3 counts ``time/iterations`` within one ``learn()`` call (one per
    task here); a run resumed in the middle of a task starts a new call, and the offset (the
    task's rollouts before the checkpoint) keeps the logged count that of an uninterrupted
    run. The tracker may be attached after the agent is built (a resume builds the agent to
    validate the checkpoint before anything in the run directory changes).
    """

    def __init__(self, tracker: RunTracker | None) -> None:
        self.tracker = tracker
        self.iteration_offset = 0

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any],
              step: int = 0) -> None:
        row = {k: v for k, v in key_values.items()
               if isinstance(v, (int, float, np.integer, np.floating))}
        if self.iteration_offset and "time/iterations" in row:
            row["time/iterations"] = int(row["time/iterations"]) + self.iteration_offset
        if row:
            assert self.tracker is not None, "TrackerWriter used before its tracker was set"
            self.tracker.log(row, step=step)

    def close(self) -> None:
        pass


@dataclass
class EvalRecord:
    """Raw evaluations of a run (or a reference run): per evaluation, per evaluated task."""

    tasks: tuple[int, ...]
    steps: list[int] = field(default_factory=list)
    mean_returns: list[list[float]] = field(default_factory=list)
    success_rates: list[list[float]] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)

    def add(self, step: int, result: EvalResult, normalizer: ScoreNormalizer) -> np.ndarray:
        self.steps.append(int(step))
        self.mean_returns.append(result.mean_returns.tolist())
        self.success_rates.append(result.success_rates.tolist())
        scores = normalizer.scores(result)
        self.scores.append(scores.tolist())
        return scores

    def to_dict(self) -> dict[str, Any]:
        return json_ready(dataclasses.asdict(self))


class _EvalCallback(BaseCallback):
    """Evaluate every ``eval_every`` global steps (not at stage ends: the runner does those
    after ``end_task``) and advance the progress bar."""

    def __init__(self, every: int, evaluate: Callable[[int], None], stage_ends: set[int],
                 bar: Any) -> None:
        super().__init__()
        self.every = every
        self.evaluate = evaluate
        self.stage_ends = stage_ends
        self.bar = bar
        self._last = 0

    def _on_step(self) -> bool:
        t = self.num_timesteps
        if self.bar is not None:
            self.bar.update(t - self._last)
        self._last = t
        if t % self.every == 0 and t not in self.stage_ends:
            self.evaluate(t)
        return True


@dataclass
class Stage:
    task: int
    steps: int


@dataclass(frozen=True)
class Position:
    """Where a run stands in its schedule: the stage to run next or running, the env steps it
    has done, and whether its ``start_task`` ran (a checkpoint inside a task: True)."""

    stage: int
    steps_done: int = 0
    started: bool = False


class Checkpoints:
    """When to checkpoint: at task boundaries (the runner asks) and at the first update
    boundary at or after every multiple of ``every`` env steps (0: boundaries only)."""

    def __init__(self, every: int, write: Callable[[Position], None], last_step: int) -> None:
        self.every = int(every)
        self.write = write
        self.last_step = last_step
        self.next_due = self._due_after(last_step)
        self.count = 0

    def _due_after(self, step: int) -> float:
        return (step // self.every + 1) * self.every if self.every else math.inf

    def save(self, position: Position, step: int) -> None:
        self.write(position)
        self.count += 1
        self.last_step = step
        self.next_due = self._due_after(step)

    def maybe(self, position: Callable[[], Position], step: int) -> None:
        if step >= self.next_due and step != self.last_step:
            self.save(position(), step)


class _CheckpointCallback(BaseCallback):
    """Checkpoints at the start of a rollout, which is an update boundary: PPO's previous
    ``train()`` and SAC's previous gradient steps are done, the next env step is not."""

    def __init__(self, checkpoints: Checkpoints, position: Callable[[], Position]) -> None:
        super().__init__()
        self.checkpoints = checkpoints
        self.position = position

    def _on_rollout_start(self) -> None:
        self.checkpoints.maybe(self.position, int(self.model.num_timesteps))

    def _on_step(self) -> bool:
        return True


def train_stages(agent: Any, stages: Sequence[Stage], evaluator: BatchedEvaluator,
                  normalizer: ScoreNormalizer, record: EvalRecord, *, eval_every: int,
                  log: Callable[[dict[str, Any], int], None], task_names: Sequence[str],
                  progress: bool, desc: str,
                  checkpoint: Callable[[Position, dict[str, float]], None] | None = None,
                  checkpoint_every: int = 0, start: Position | None = None,
                  timings: Mapping[str, float] | None = None,
                  writer: TrackerWriter | None = None,
                  probe: Probe | None = None) -> dict[str, float]:
    """The core loop shared by continual runs and single-task reference runs.

    ``checkpoint(position, timings)`` writes a checkpoint (None: none are taken); ``start``
    and ``timings`` continue a run from a checkpoint's position and timings. ``probe``
    measures the plasticity metrics (:mod:`crl.plasticity`) on the running task's probe
    batch at every evaluation, logged with it (its time is part of ``eval_seconds`` and
    counted apart as ``plasticity_seconds``).
    """
    timings_now: dict[str, float] = {"eval_seconds": 0.0, "eval_count": 0,
                                     "checkpoint_seconds": 0.0, "checkpoint_count": 0,
                                     "plasticity_seconds": 0.0,
                                     "total_seconds": 0.0, **(timings or {})}
    ends = list(np.cumsum([s.steps for s in stages]).astype(int))
    starts = [0, *ends[:-1]]
    elapsed_before = float(timings_now["total_seconds"])
    t_start = time.perf_counter()

    def elapsed() -> dict[str, float]:
        out = dict(timings_now)
        out["total_seconds"] = elapsed_before + time.perf_counter() - t_start
        out["train_seconds"] = (out["total_seconds"] - out["eval_seconds"]
                                - out["checkpoint_seconds"])
        return out

    def evaluate(step: int) -> None:
        t0 = time.perf_counter()
        result = evaluator.evaluate(agent)
        elapsed_eval = time.perf_counter() - t0
        timings_now["eval_seconds"] += elapsed_eval
        timings_now["eval_count"] += 1
        scores = record.add(step, result, normalizer)
        row: dict[str, Any] = {}
        for r, t in enumerate(result.tasks):
            row[rl_task_key(t, task_names[t], RL_RETURN)] = float(result.mean_returns[r])
            if np.isfinite(result.success_rates[r]):
                row[rl_task_key(t, task_names[t], RL_SUCCESS)] = float(result.success_rates[r])
                row[f"test/deterministic/{t}/{task_names[t]}/success"] = float(
                    result.success_rates[r])
            if np.isfinite(scores[r]):
                row[rl_task_key(t, task_names[t], RL_SCORE)] = float(scores[r])
        row[RL_AVERAGE_RETURN] = float(result.mean_returns.mean())
        if np.all(np.isfinite(scores)):
            row[RL_AVERAGE_SCORE] = float(scores.mean())
        if np.all(np.isfinite(result.success_rates)):
            row["test/deterministic/average_success"] = float(result.success_rates.mean())
        if probe is not None:
            t1 = time.perf_counter()
            row.update(probe.measure(agent.host, stages[current["stage"]].task, step,
                                     batches=agent.probe_batches))
            timings_now["plasticity_seconds"] += time.perf_counter() - t1
        timings_now["eval_seconds"] += time.perf_counter() - t0 - elapsed_eval
        log(row, step)

    def write(position: Position) -> None:
        assert checkpoint is not None
        t0 = time.perf_counter()
        checkpoint(position, elapsed())
        timings_now["checkpoint_seconds"] += time.perf_counter() - t0
        timings_now["checkpoint_count"] += 1

    current = {"stage": 0 if start is None else start.stage}

    def position_in_task() -> Position:
        i = current["stage"]
        return Position(i, int(agent.num_timesteps) - int(starts[i]), True)

    checkpoints = Checkpoints(checkpoint_every, write, int(agent.num_timesteps))
    total = ends[-1]
    # disable=None: tqdm draws only on a terminal (a log file gets no carriage returns)
    bar = tqdm(total=total, desc=desc, unit="step", disable=None if progress else True,
               leave=False,
               dynamic_ncols=True, initial=int(agent.num_timesteps))
    try:
        callback: BaseCallback = _EvalCallback(eval_every, evaluate, set(ends), bar)
        callback._last = int(agent.num_timesteps)  # type: ignore[attr-defined]
        if checkpoint is not None:
            callback = CallbackList([callback, _CheckpointCallback(checkpoints,
                                                                   position_in_task)])
        if start is None:
            evaluate(0)
            if checkpoint is not None:
                checkpoints.save(Position(0), 0)
            start = Position(0)
        for i in range(start.stage, len(stages)):
            stage = stages[i]
            current["stage"] = i
            steps = stage.steps
            if i == start.stage and start.started:  # resumed inside this task
                steps -= start.steps_done
                if writer is not None and hasattr(agent, "rollout_size"):
                    writer.iteration_offset = start.steps_done // agent.rollout_size
            else:
                agent.start_task(stage.task)
                log({"task": stage.task, "stage": i}, int(agent.num_timesteps))
            agent.learn(steps, callback=callback, reset_num_timesteps=False,
                        progress_bar=False)
            if writer is not None:
                writer.iteration_offset = 0
            if agent.num_timesteps != ends[i]:
                raise RuntimeError(
                    f"stage {i} ended at step {agent.num_timesteps}, expected {ends[i]}: the "
                    "agent trained past a task switch"
                )
            agent.end_task(stage.task)
            evaluate(ends[i])
            if checkpoint is not None:
                checkpoints.save(Position(i + 1), int(ends[i]))
    finally:
        bar.close()
    return elapsed()


def stage_history(record: EvalRecord, sequence: TaskSequence) -> EvalHistory | None:
    """Columns = stages of the schedule; None while some score is unknown (missing bounds)."""
    scores = np.asarray(record.scores, dtype=float)
    cols = [record.tasks.index(t) for t in sequence.schedule]
    stage_scores = scores[:, cols]
    if not np.all(np.isfinite(stage_scores)):
        return None
    starts = [0, *sequence.stage_ends[:-1]]
    return EvalHistory(record.steps, stage_scores, starts, sequence.total_steps)


def stage_names(sequence: TaskSequence) -> list[str]:
    names = [sequence.task_names[t] for t in sequence.schedule]
    if len(set(names)) == len(names):
        return names
    return [f"{n}#{sequence.schedule[:s].count(sequence.schedule[s]) + 1}"
            for s, n in enumerate(names)]
