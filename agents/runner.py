"""Train a continual SB3 agent on a task sequence, evaluate it, and report CW's metrics.

The loop follows the sequence's schedule: for each stage ``agent.start_task(task)``, then
``agent.learn(steps, reset_num_timesteps=False)`` on the continual env (which switches task
exactly at the stage's end), then ``agent.end_task(task)``. An SB3 callback evaluates every
task every ``eval_every`` env steps with :class:`agents.evaluation.BatchedEvaluator`; the
runner adds the evaluations at step 0 and at the end of every stage, after ``end_task``, so
the end-of-task score sees the model after all of the task's updates (PackNet's pruning and
retraining included) and before any of the next task's.

Metrics come from :mod:`crl.metrics` on an :class:`~crl.metrics.EvalHistory` whose columns
are the *stages* of the schedule (stage ``s`` scores task ``schedule[s]``): with one cycle and
no shuffling that is one column per task; with cycles (CW20) or a shuffled order, forgetting
and forward transfer are measured per stage, as CW does for CW20.

Everything is tracked by :class:`crl.tracking.RunTracker` (local run directory + W&B
offline); SB3's own logger is routed there too (``train/...``, ``rollout/...`` keys).

Checkpoints (``checkpoints/last.pt``, written atomically by :mod:`crl.checkpoint`) are taken
after the evaluation at step 0, at every task boundary (after ``end_task`` and the end-of-task
evaluation) and every ``checkpoint_every`` env steps at an update boundary: the start of a
rollout, i.e. after the previous update (PPO's ``train()``, SAC's gradient steps). They hold
the agent (:mod:`agents.checkpoint`: weights, optimisers, strategy, SB3 counters, replay
buffer, training env), the global RNG states, the evaluations, the timings, the metrics row
count and the position in the schedule, so :func:`resume` continues the run exactly where the
checkpoint was taken, with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import KVWriter, Logger
from tqdm.auto import tqdm

from agents.checkpoint import agent_state, load_agent_state
from agents.evaluation import (
    BatchedEvaluator,
    EvalResult,
    ScoreNormalizer,
    build_normalizer,
    json_ready,
)
from agents.method_defaults import rl_method_options
from crl.checkpoint import (
    CheckpointError,
    check_compatible,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from crl.config import check_seed
from crl.metrics import EvalHistory, bootstrap_ci, summarize
from crl.plots import plot_task_curves
from crl.runs import (
    RunFailed,
    check_metrics_rows,
    clear_for_resume,
    holds_run,
    raise_if_finished,
    read_run_config,
    record_failure,
)
from crl.strategies import strategy_class
from crl.tracking import RunTracker, to_builtin

if TYPE_CHECKING:
    from envs.sequence import TaskSequence

AGENTS = ("sac", "ppo")
ON_POLICY = {"ppo"}
#: Default env steps between mid-task checkpoints (task boundaries always checkpoint). A
#: kill costs at most this much work; the write costs (scripts/bench_checkpoint.py) ~15 ms
#: for PPO on CartPoleSwap (0.1% of the README run) and ~5 s for a CW10-sized SAC with its
#: 1M-transition replay buffer (836 MB), i.e. ~0.5% of the ~1000 s SAC needs for 100k steps.
CHECKPOINT_EVERY = 100_000
#: RunConfig fields a resume may change: they do not touch the numbers of the run.
RESUME_MAY_CHANGE = ("progress", "checkpoint_every", "checkpoint_buffer", "run_dir",
                     "run_path", "save_model")


class ConfigError(ValueError):
    """A run is configured wrongly; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
#: Continual options of the agents (constructor keywords besides SB3's own).
CONTINUAL_OPTIONS = {
    "sac": ("multi_head", "reset_buffer", "reset_optimizer", "exploration_steps",
            "per_task_entropy", "regularize_critic", "importance_samples"),
    "ppo": ("multi_head", "reset_optimizer", "regularize_critic", "importance_samples"),
}


@dataclass
class RunConfig:
    """Everything a continual RL run depends on; saved verbatim as the run's config.

    ``agent_options``: continual options of the agent (``multi_head``, ``reset_buffer``...)
    and SB3 keyword arguments (``learning_rate``, ``batch_size``, ``n_steps``...), checked
    against the agent's constructor. ``net_arch``: hidden widths of every MLP (None: SB3's
    default). ``method_options``: per method, e.g. ``{"ewc": {"lam": 100.0}}``.
    """

    sequence: str = "CartPoleSwap"
    agent: str = "ppo"
    method: str = "finetune"
    seed: int = 0
    steps_per_task: int | None = None
    cycles: int | None = None
    eval_every: int = 5_000
    eval_episodes: int = 5
    eval_max_steps: int | None = None
    forgetting_k: int = 5
    net_arch: tuple[int, ...] | None = None
    agent_options: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    torch_threads: int | None = 1
    run_dir: str = "runs"
    wandb: str = "offline"
    wandb_project: str = "crl"
    group: str | None = None
    reference_dir: str | None = None
    reference_seed: int = 1
    require_references: bool = False
    random_episodes: int = 10
    progress: bool = True
    save_model: bool = True
    checkpoint_every: int = CHECKPOINT_EVERY
    checkpoint_buffer: bool = True
    run_path: str | None = None

    def __post_init__(self) -> None:
        self.agent = str(self.agent).strip().lower()
        if self.agent not in AGENTS:
            raise ConfigError(f"unknown agent {self.agent!r}; choose one of: {', '.join(AGENTS)}")
        self.method = str(self.method).strip().lower()
        strategy_class(self.method)  # unknown methods fail before any work is done
        try:
            check_seed(self.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("eval_every", "eval_episodes", "forgetting_k", "random_episodes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.steps_per_task is not None and (
            isinstance(self.steps_per_task, bool) or not isinstance(self.steps_per_task, int)
            or self.steps_per_task < 1
        ):
            raise ConfigError(
                f"steps-per-task must be a positive integer, got {self.steps_per_task!r}"
            )
        if isinstance(self.checkpoint_every, bool) or not isinstance(
                self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(
                f"checkpoint-every must be an integer >= 0 (env steps between checkpoints; 0: "
                f"task boundaries only), got {self.checkpoint_every!r}"
            )
        if self.wandb not in ("offline", "online", "disabled"):
            raise ConfigError(f"wandb mode must be offline, online or disabled, got {self.wandb!r}")
        if self.net_arch is not None:
            self.net_arch = tuple(int(w) for w in self.net_arch)
        self.agent_options = dict(self.agent_options)
        gamma = self.agent_options.get("gamma")
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, int | float)
                                  or not 0.0 < float(gamma) <= 1.0):
            raise ConfigError(f"gamma (the discount) must be a number in (0, 1], got {gamma!r}")
        check_device(self.device)
        self.method_options = {k: dict(v) for k, v in self.method_options.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def check_device(device: str) -> None:
    """A device torch knows and this machine has: training on the CPU while the config says
    ``cuda`` would record a lie. ``auto`` is SB3's own choice (CUDA where available)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, "
                          f"mps): {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this machine has no CUDA GPU torch can use "
                          "(torch.cuda.is_available() is False); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available here; use --device cpu")


def load_sequence(config: RunConfig) -> TaskSequence:
    """The run's sequence, with the step budget override applied."""
    from envs.registry import get_sequence

    overrides: dict[str, Any] = {}
    if config.steps_per_task is not None:
        overrides["steps_per_task"] = config.steps_per_task
    if config.cycles is not None:
        overrides["cycles"] = config.cycles
    return get_sequence(config.sequence, **overrides)


def check_agent_fits(config: RunConfig, sequence: TaskSequence) -> None:
    """SAC needs continuous actions; PPO takes discrete or continuous; on-policy rollouts
    must end exactly at task switches."""
    from envs.continual import sequence_spaces

    action_space = sequence_spaces(sequence).action_space
    if config.agent == "sac" and not isinstance(action_space, spaces.Box):
        raise ConfigError(
            f"SAC needs a continuous (Box) action space, but sequence {sequence.name!r} has "
            f"{action_space}; use --agent ppo for discrete actions, or a continuous sequence "
            "(PendulumVariants, HalfCheetah*, Hopper*, CW10)"
        )
    if config.agent == "sac":
        explore = config.agent_options.get("exploration_steps")
        if explore is None:
            from agents.sac import ContinualSAC

            explore = inspect.signature(ContinualSAC.__init__).parameters[
                "exploration_steps"].default
        short = sorted({b for b in sequence.stage_steps if b <= int(explore)})
        if short:
            raise ConfigError(
                f"SAC acts at random for the first --exploration-steps {int(explore):,} steps "
                f"of every task and only trains after them, but the task budgets {short} are "
                f"not longer: the agent would never train; lower --exploration-steps or raise "
                f"--steps-per-task"
            )
    if config.agent in ON_POLICY:
        n_steps = int(config.agent_options.get("n_steps", 2048))
        bad = sorted({b for b in sequence.stage_steps if b % n_steps})
        if bad:
            raise ConfigError(
                f"PPO collects rollouts of n_steps={n_steps} env steps and a rollout must not "
                f"cross a task switch, but the task budgets {bad} are not multiples of "
                f"{n_steps}; set --n-steps to a divisor of the budget or --steps-per-task to a "
                f"multiple of {n_steps}"
            )


def check_method_options(config: RunConfig, sequence: TaskSequence) -> None:
    """Build the method once from its resolved options, before any run directory exists, so
    that a bad option is an error naming it, not a failed run left behind."""
    from agents.continual import build_strategy

    options = rl_method_options(config.agent, config.method,
                                config.method_options.get(config.method), config.agent_options)
    try:
        if config.agent == "ppo":
            from agents.ppo import replay_as_distillation

            options = replay_as_distillation(config.method, options) or options
        build_strategy(config.method, options, sequence.num_tasks, config.seed)
    except (ValueError, TypeError) as exc:
        given = sorted(config.method_options.get(config.method) or {})
        flags = ", ".join(f"--{config.method}-{k.replace('_', '-')}" for k in given)
        raise ConfigError(f"{config.method}: {exc}" + (f" (options given: {flags})" if flags
                                                        else "")) from exc


def agent_class(name: str) -> type:
    if name == "sac":
        from agents.sac import ContinualSAC

        return ContinualSAC
    if name == "ppo":
        from agents.ppo import ContinualPPO

        return ContinualPPO
    raise ConfigError(f"unknown agent {name!r}; choose one of: {', '.join(AGENTS)}")


def check_agent_options(config: RunConfig) -> None:
    """Every agent option must be a keyword of the agent class or of its SB3 parents."""
    import inspect

    cls = agent_class(config.agent)
    accepted: set[str] = set()
    for base in cls.__mro__:
        if "__init__" in base.__dict__:
            accepted |= set(inspect.signature(base.__init__).parameters)
    accepted -= {"self", "policy", "env", "kwargs", "args", "sb3_kwargs"}
    unknown = sorted(set(config.agent_options) - accepted - {"policy_kwargs"})
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for the {config.agent.upper()} agent; valid: "
            f"{', '.join(sorted(accepted))}"
        )


def make_agent(config: RunConfig, env: Any, sequence: TaskSequence, *, method: str | None = None,
               seed: int | None = None) -> Any:
    """The continual agent of ``config`` on ``env`` (a gym env or VecEnv)."""
    cls = agent_class(config.agent)
    if config.torch_threads:  # small nets on shared cores: more threads only contend
        torch.set_num_threads(config.torch_threads)
    method = config.method if method is None else method
    options = dict(config.agent_options)
    policy_kwargs = dict(options.pop("policy_kwargs", None) or {})
    if config.net_arch is not None:
        policy_kwargs.setdefault("net_arch", list(config.net_arch))
    check_agent_options(config)
    obs_space = env.observation_space
    policy = "MultiInputPolicy" if isinstance(obs_space, spaces.Dict) else "MlpPolicy"
    return cls(
        policy, env,
        strategy=method,
        strategy_options=rl_method_options(config.agent, method, config.method_options.get(method),
                                           config.agent_options),
        num_tasks=sequence.num_tasks,
        seed=config.seed if seed is None else seed,
        device=config.device,
        verbose=0,
        policy_kwargs=policy_kwargs or None,
        **options,
    )


# --------------------------------------------------------------------------------------------
# Logging glue
# --------------------------------------------------------------------------------------------
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


def _train_stages(agent: Any, stages: Sequence[Stage], evaluator: BatchedEvaluator,
                  normalizer: ScoreNormalizer, record: EvalRecord, *, eval_every: int,
                  log: Callable[[dict[str, Any], int], None], task_names: Sequence[str],
                  progress: bool, desc: str,
                  checkpoint: Callable[[Position, dict[str, float]], None] | None = None,
                  checkpoint_every: int = 0, start: Position | None = None,
                  timings: Mapping[str, float] | None = None,
                  writer: TrackerWriter | None = None) -> dict[str, float]:
    """The core loop shared by continual runs and single-task reference runs.

    ``checkpoint(position, timings)`` writes a checkpoint (None: none are taken); ``start``
    and ``timings`` continue a run from a checkpoint's position and timings.
    """
    timings_now: dict[str, float] = {"eval_seconds": 0.0, "eval_count": 0,
                                     "checkpoint_seconds": 0.0, "checkpoint_count": 0,
                                     "total_seconds": 0.0, **(timings or {})}
    ends = list(np.cumsum([s.steps for s in stages]).astype(int))
    starts = [0, *ends[:-1]]
    prefix = {t: f"eval/{t}-{task_names[t]}" for t in evaluator.tasks}
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
        timings_now["eval_seconds"] += time.perf_counter() - t0
        timings_now["eval_count"] += 1
        scores = record.add(step, result, normalizer)
        row: dict[str, Any] = {}
        for r, t in enumerate(result.tasks):
            row[f"{prefix[t]}/return"] = float(result.mean_returns[r])
            if np.isfinite(result.success_rates[r]):
                row[f"{prefix[t]}/success"] = float(result.success_rates[r])
                row[f"test/deterministic/{t}/{task_names[t]}/success"] = float(
                    result.success_rates[r])
            if np.isfinite(scores[r]):
                row[f"{prefix[t]}/score"] = float(scores[r])
        row["eval/average_return"] = float(result.mean_returns.mean())
        if np.all(np.isfinite(scores)):
            row["eval/average_score"] = float(scores.mean())
        if np.all(np.isfinite(result.success_rates)):
            row["test/deterministic/average_success"] = float(result.success_rates.mean())
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


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
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


def metric_rows(summary: Mapping[str, Any], history: EvalHistory | None,
                names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """Per stage: end-of-task score, final score, forgetting, AUC, forward transfer."""
    rows = []
    n = len(names)
    for s in range(n):
        row: dict[str, Any] = {"task": names[s]}
        if history is not None:
            row["end_of_task"] = float(history.scores[history.window_mask(s), s][-k:].mean())
            row["final"] = float(history.scores[history.window_mask(n - 1), s][-k:].mean())
            row["auc"] = summary["auc"][s]
            row["forgetting"] = summary["forgetting"][s] if s < n - 1 else None
            ft = summary.get("forward_transfer")
            row["forward_transfer"] = ft[s] if ft is not None else None
        rows.append(row)
    return rows


@dataclass
class RunResult:
    config: RunConfig
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    record: EvalRecord
    history: EvalHistory | None
    plot_path: Path | None
    timings: dict[str, float]
    agent: Any = None


# --------------------------------------------------------------------------------------------
# The continual run
# --------------------------------------------------------------------------------------------
#: bool agent options -> (flag when True, flag when False) of `crl train/reference`.
_BOOL_FLAGS = {
    "multi_head": ("--multi-head", "--single-head"),
    "reset_buffer": ("--reset-buffer", "--keep-buffer"),
    "reset_optimizer": ("--reset-optimizer", "--keep-optimizer"),
    "per_task_entropy": ("--per-task-entropy", "--shared-entropy"),
    "regularize_critic": ("--regularize-critic", "--no-regularize-critic"),
}
_VALUE_FLAGS = {"learning_rate", "batch_size", "buffer_size", "gamma", "n_steps", "n_epochs",
                "ent_coef", "exploration_steps", "importance_samples"}


def reference_command(config: RunConfig) -> str:
    """The `crl reference` command that creates the references this config looks up."""
    parts = ["crl reference", f"--sequence {config.sequence}", f"--agent {config.agent}"]
    if config.steps_per_task is not None:
        parts.append(f"--steps-per-task {config.steps_per_task}")
    parts.append(f"--eval-every {config.eval_every} --eval-episodes {config.eval_episodes}")
    if config.eval_max_steps is not None:
        parts.append(f"--eval-max-steps {config.eval_max_steps}")
    if config.net_arch is not None:
        parts.append("--net-arch " + ",".join(map(str, config.net_arch)))
    extra = {}
    for key, value in sorted(config.agent_options.items()):
        if key in _BOOL_FLAGS:
            parts.append(_BOOL_FLAGS[key][0 if value else 1])
        elif key in _VALUE_FLAGS:
            parts.append(f"--{key.replace('_', '-')} {value}")
        else:
            extra[key] = value
    if extra:
        parts.append(f"--sb3-kwargs '{json.dumps(json_ready(extra))}'")
    if config.device != "cpu":
        parts.append(f"--device {config.device}")
    if config.reference_seed != 1:
        parts.append(f"--reference-seed {config.reference_seed}")
    if config.reference_dir:
        parts.append(f"--reference-dir {config.reference_dir}")
    return " ".join(parts)


def run_dir_for(config: RunConfig, sequence: TaskSequence) -> tuple[Path, str, str]:
    group = config.group or f"{sequence.name}-{config.agent}"
    name = f"{config.method}-seed{config.seed}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(config.run_dir) / group / f"{name}-{stamp}-{os.getpid()}", group, name


@dataclass
class _Plan:
    """What a run is, resolved before anything is written: sequence, scores, references."""

    config: RunConfig
    sequence: TaskSequence
    refs: dict[int, Any]
    missing_refs: list[int]
    normalizer: ScoreNormalizer
    resolved: dict[str, Any]
    group: str
    name: str


def _normalizer_from(bounds: Mapping[str, Any], sequence: TaskSequence,
                     hint: str) -> ScoreNormalizer:
    """The score bounds a run recorded (config.yaml ``score_bounds``): a resumed run scores
    its evaluations exactly as its first part did, whatever the caches hold now."""
    def array(values: Sequence[Any]) -> np.ndarray:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=float)

    missing = {sequence.task_names.index(name): why
               for name, why in (bounds.get("missing") or {}).items()}
    return ScoreNormalizer(sequence.task_names, list(bounds["kind"]), array(bounds["low"]),
                           array(bounds["high"]), missing,
                           f"create the reference runs with `{hint}`",
                           list(bounds.get("basis") or []))


def _plan(config: RunConfig, bounds: Mapping[str, Any] | None = None) -> _Plan:
    from agents.reference import load_references

    sequence = load_sequence(config)
    check_agent_fits(config, sequence)
    check_agent_options(config)  # fail on bad agent options before any work
    check_method_options(config, sequence)
    refs, missing_refs = load_references(config, sequence, required=config.require_references)
    if bounds is not None:
        normalizer = _normalizer_from(bounds, sequence, reference_command(config))
    else:
        normalizer = build_normalizer(
            sequence,
            reference_returns={t: r.final_return for t, r in refs.items()},
            random_episodes=config.random_episodes,
            cache_dir=None if config.reference_dir is None
            else Path(config.reference_dir) / "random_returns",
            reference_hint=reference_command(config),
            max_steps=config.eval_max_steps,
        )
    if missing_refs:
        warnings.warn(
            f"no reference runs for tasks {[sequence.task_names[t] for t in missing_refs]}: "
            "forward transfer will be n/a (the command that creates them follows the results)",
            RuntimeWarning, stacklevel=3,
        )
    resolved = config.to_dict() | {
        "resolved_sequence": sequence.name, "tasks": list(sequence.task_names),
        "schedule": list(sequence.schedule), "steps_per_task_resolved": list(sequence.stage_steps),
        "score_bounds": normalizer.to_dict(),
        "method_options_resolved": rl_method_options(
            config.agent, config.method, config.method_options.get(config.method),
            config.agent_options),
    }
    group = config.group or f"{sequence.name}-{config.agent}"
    name = f"{config.method}-seed{config.seed}"
    return _Plan(config, sequence, refs, missing_refs, normalizer, to_builtin(resolved), group,
                 name)


def train(config: RunConfig, *, run_dir: str | Path | None = None,
          keep_agent: bool = False) -> RunResult:
    """Train ``config.agent`` with ``config.method`` on the sequence; evaluate; report.

    The run directory is ``run_dir``, else ``config.run_path``, else a new folder under
    ``config.run_dir``; an explicit one must not hold a run already.
    """
    plan = _plan(config)
    explicit = run_dir if run_dir is not None else config.run_path
    if explicit is None:
        path = run_dir_for(config, plan.sequence)[0]
    else:
        path = Path(explicit)
        if existing := holds_run(path):
            raise ConfigError(
                f"{path} already holds a run ({', '.join(existing)}); continue it with "
                f"`crl train --resume {path}`, or choose another --run-path"
            )
    return _execute(plan, Path(path), keep_agent=keep_agent)


def config_fields(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The RunConfig fields of a resolved config (config.yaml holds more)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in saved.items() if k in names}


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A `crl train` run directory's config.yaml; anything else is a clear error."""
    return read_run_config(run_dir, "train")


def _merge(saved: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(saved)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class _Resume:
    state: dict[str, Any]
    env: Any
    agent: Any
    writer: TrackerWriter
    notes: list[str]


_CHECKPOINT_KEYS = ("config", "position", "agent", "rng", "record", "timings", "tracker_rows")


def resume(run_dir: str | Path, changes: Mapping[str, Any] | None = None, *,
           keep_agent: bool = False) -> RunResult:
    """Continue an interrupted run from ``run_dir/checkpoints/last.pt`` and finish it.

    The run is rebuilt from its config.yaml, with ``changes`` (RunConfig fields, nested for
    ``agent_options``/``method_options``: the options given now) applied on top; the result
    must equal the checkpoint's configuration except for :data:`RESUME_MAY_CHANGE`, else a
    :class:`CheckpointError` names every key that differs. Raises :class:`RunFinished` if
    the run already has results. Nothing in ``run_dir`` changes until the checkpoint, the
    configuration, the agent and the metrics file have all been checked.
    """
    run_dir = Path(run_dir)
    saved = load_run_config(run_dir)
    raise_if_finished(run_dir)
    state = _load_rl_checkpoint(run_dir, _CHECKPOINT_KEYS)
    try:
        config = RunConfig(**_merge(config_fields(saved), dict(changes or {})))
    except TypeError as exc:
        raise ConfigError(f"{run_dir}/config.yaml: {exc}") from exc
    if config.run_path is not None and Path(config.run_path).resolve() != run_dir.resolve():
        config = config.replace(run_path=str(run_dir))
    bounds = saved.get("score_bounds")
    if not isinstance(bounds, Mapping):
        raise CheckpointError(f"{run_dir}/config.yaml has no score_bounds; restore the file")
    plan = _plan(config, bounds=bounds)
    check_compatible(state["config"], plan.resolved, what="configuration",
                     ignore=RESUME_MAY_CHANGE)
    check_metrics_rows(run_dir, int(state["tracker_rows"]))
    writer = TrackerWriter(None)
    env, agent, notes = _rebuild_agent(config, plan.sequence, state["agent"], [writer])
    clear_for_resume(run_dir)  # validated: from here on the run directory may change
    return _execute(plan, run_dir, resume=_Resume(state, env, agent, writer, notes),
                    keep_agent=keep_agent)


def load_agent(run_dir: str | Path) -> Any:
    """The agent of a run's last checkpoint (weights, optimisers, strategy, replay buffer,
    position in the sequence) on a new training env of its sequence, ready to continue or to
    evaluate. The global RNGs are left alone."""
    state = _load_rl_checkpoint(run_dir, ("config", "agent"))
    config = RunConfig(**config_fields(state["config"]))
    return _rebuild_agent(config, load_sequence(config), state["agent"], [])[1]


def _load_rl_checkpoint(run_dir: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    """A `crl train` checkpoint holding ``keys``; anything else is a :class:`CheckpointError`."""
    ckpt_file = checkpoint_path(run_dir)
    state = load_checkpoint(ckpt_file)
    missing = [k for k in keys if k not in state]
    if state.get("kind") != "rl" or missing:
        raise CheckpointError(f"{ckpt_file} is not a checkpoint of a `crl train` run (kind "
                              f"{state.get('kind')!r}, missing {missing})")
    return state


def _rebuild_agent(config: RunConfig, sequence: TaskSequence, saved: Mapping[str, Any],
                   outputs: list[KVWriter]) -> tuple[Any, Any, list[str]]:
    """(training env, agent, notes on what is not bit-exact) from a checkpoint's agent state,
    the SB3 logger writing to ``outputs``; the env is closed if anything fails."""
    env = sequence.make_env(append_task_id=True)
    try:
        agent = make_agent(config, env, sequence)
        agent.set_logger(Logger(folder=None, output_formats=outputs))
        notes = load_agent_state(agent, saved, sequence=sequence.name)
    except BaseException:
        env.close()
        raise
    return env, agent, notes


def _describe(position: Position, stages: Sequence[Stage], names: Sequence[str]) -> str:
    if position.stage >= len(stages):
        return "after the last task"
    where = f"task {stages[position.stage].task} ({names[position.stage]})"
    if not position.started:
        return f"before {where}"
    return f"{position.steps_done:,} of the {stages[position.stage].steps:,} steps of {where}"


def _record_failure(run_dir: Path, exc: BaseException, ckpt_file: Path,
                    last: Mapping[str, Any], stages: Sequence[Stage],
                    names: Sequence[str]) -> RunFailed | None:
    """Write failed.json; for a nan/inf loss, return the :class:`RunFailed` to raise."""
    task = getattr(exc, "task", None)
    step = getattr(exc, "step", None)
    has_ckpt = last["position"] is not None and ckpt_file.is_file()
    record_failure(run_dir, exc, {
        "task": task, "step": step,
        "last_checkpoint": str(ckpt_file) if has_ckpt else None,
        "checkpoint_step": last["step"] if has_ckpt else None,
        "checkpoint_position": dataclasses.asdict(last["position"]) if has_ckpt else None,
    })
    if not isinstance(exc, FloatingPointError):
        return None
    where = "no checkpoint had been written" if not has_ckpt else (
        f"the last good checkpoint is {ckpt_file} (env step {last['step']:,}, "
        f"{_describe(last['position'], stages, names)})")
    return RunFailed(
        f"training diverged: {exc}. The run stopped before the bad update was checkpointed: "
        f"{where}; the failure is recorded in {run_dir / 'failed.json'} and the run has no "
        f"results. Start a new run with the lower setting (`crl train --resume {run_dir}` "
        "continues with the same settings, which diverge again)",
        run_dir=run_dir, checkpoint=ckpt_file if has_ckpt else None, task=task, step=step)


def _execute(plan: _Plan, path: Path, *, resume: _Resume | None = None,
             keep_agent: bool = False) -> RunResult:
    config, sequence = plan.config, plan.sequence
    names = stage_names(sequence)
    stages = [Stage(t, b) for t, b in zip(sequence.schedule, sequence.stage_steps, strict=True)]
    tracker = RunTracker(path, plan.resolved, wandb_mode=config.wandb,
                         project=config.wandb_project, group=plan.group, name=plan.name,
                         job_type="rl", new_run=resume is None,
                         resume_rows=None if resume is None else int(
                             resume.state["tracker_rows"]))
    with tracker:
        if resume is None:
            env = sequence.make_env(append_task_id=True)
            agent = make_agent(config, env, sequence)
            writer = TrackerWriter(tracker)
            agent.set_logger(Logger(folder=None, output_formats=[writer]))
            record = EvalRecord(tuple(range(sequence.num_tasks)))
            start, timings_before = None, None
        else:
            env, agent, writer = resume.env, resume.agent, resume.writer
            writer.tracker = tracker
            saved = resume.state
            record = EvalRecord(**{**saved["record"], "tasks": tuple(saved["record"]["tasks"])})
            start = Position(**saved["position"])
            timings_before = saved["timings"]
        ckpt_file = checkpoint_path(tracker.run_dir)
        last: dict[str, Any] = {"position": None, "step": None}
        if resume is not None:
            last |= {"position": start, "step": int(resume.state["num_timesteps"])}

        def write_checkpoint(position: Position, timings: dict[str, float]) -> None:
            step = int(agent.num_timesteps)
            save_checkpoint(ckpt_file, {
                "kind": "rl", "config": plan.resolved, "position": dataclasses.asdict(position),
                "num_timesteps": step,
                "agent": agent_state(agent, include_buffer=config.checkpoint_buffer,
                                     sequence=sequence.name),
                "rng": rng_state(), "record": dataclasses.asdict(record), "timings": timings,
                "tracker_rows": tracker.rows,
            })
            last.update(position=position, step=step)

        try:
            with BatchedEvaluator(sequence, config.eval_episodes,
                                  max_steps=config.eval_max_steps) as evaluator:
                if resume is not None:  # last: building envs and W&B may draw from them
                    set_rng_state(resume.state["rng"])
                timings = _train_stages(
                    agent, stages, evaluator, plan.normalizer, record,
                    eval_every=config.eval_every, log=tracker.log,
                    task_names=sequence.task_names, progress=config.progress,
                    desc=f"{config.agent}/{config.method} on {sequence.name}",
                    checkpoint=write_checkpoint, checkpoint_every=config.checkpoint_every,
                    start=start, timings=timings_before, writer=writer,
                )
        except Exception as exc:
            failed = _record_failure(tracker.run_dir, exc, ckpt_file, last, stages, names)
            env.close()
            if failed is not None:
                raise failed from exc
            raise
        env.close()
        history = stage_history(record, sequence)
        summary: dict[str, Any] = {"method": config.method, "agent": config.agent,
                                   "forgetting_k": config.forgetting_k,
                                   "sequence": sequence.name, "seed": config.seed,
                                   "score_basis": list(plan.normalizer.basis)}
        plot_path = None
        if history is None:
            summary["metrics_reason"] = plan.normalizer.missing_reason
            summary |= {"final_performance": None, "mean_forgetting": None,
                        "mean_forward_transfer": None}
        else:
            ref_histories = None
            if not plan.missing_refs:
                ref_histories = [plan.refs[t].history(plan.normalizer, t)
                                 for t in sequence.schedule]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                summary |= summarize(history, ref_histories, k=config.forgetting_k)
            if plan.missing_refs:
                summary["forward_transfer_reason"] = (
                    f"reference runs missing; create them with `{reference_command(config)}`")
            plot_path = plot_task_curves(history, tracker.run_dir / "plots" / "task_curves.png",
                                         names, title=f"{sequence.name}: {config.agent} + "
                                         f"{config.method} (seed {config.seed})")
            tracker.log_image("task_curves", plot_path)
        rows = metric_rows(summary, history, names, config.forgetting_k)
        summary |= {"table": rows, "timings": timings, "eval": record.to_dict(),
                    "eval_share": timings["eval_seconds"] / max(timings["total_seconds"], 1e-9),
                    "env_steps": int(agent.num_timesteps),
                    "steps_per_second": agent.num_timesteps / max(timings["train_seconds"],
                                                                  1e-9)}
        if resume is not None:
            summary["resumed"] = {"from_step": int(resume.state["num_timesteps"]),
                                  "exact": not resume.notes, "notes": resume.notes}
        if config.save_model:
            save_model_files(agent, tracker.run_dir / "checkpoints")
        tracker.finish(summary)
    return RunResult(config, Path(path), summary, rows, record, history, plot_path, timings,
                     agent if keep_agent else None)


def save_model_files(agent: Any, folder: Path) -> None:
    """SB3's zip (weights, optimisers, settings) + the strategy's state; the strategy and
    host are left out of the zip (they point back at the agent) and buffers are not saved.
    A failure warns: it must not cost the run's results."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        agent.save(folder / "agent.zip",
                   exclude=["replay_buffer", "rollout_buffer", "strategy", "host"])
        torch.save(agent.continual_state_dict(), folder / "continual_state.pt")
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"could not save the checkpoint in {folder}: {exc}", RuntimeWarning,
                      stacklevel=2)


# --------------------------------------------------------------------------------------------
# Over seeds
# --------------------------------------------------------------------------------------------
def aggregate(summaries: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """Mean and 90% bootstrap CI over seeds of the headline metrics (nan where undefined)."""
    out = {}
    for key in ("final_performance", "mean_forgetting", "mean_forward_transfer"):
        vals = [s.get(key) for s in summaries]
        vals = [float(v) for v in vals if v is not None and np.isfinite(v)]
        out[key] = bootstrap_ci(vals) if vals else (float("nan"),) * 3
    return out


def read_results(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "results.json").read_text())
