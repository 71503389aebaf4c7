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
"""

from __future__ import annotations

import dataclasses
import json
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
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from tqdm.auto import tqdm

from agents.evaluation import (
    BatchedEvaluator,
    EvalResult,
    ScoreNormalizer,
    build_normalizer,
    json_ready,
)
from crl.metrics import EvalHistory, bootstrap_ci, summarize
from crl.plots import plot_task_curves
from crl.strategies import strategy_class
from crl.tracking import RunTracker

if TYPE_CHECKING:
    from envs.sequence import TaskSequence

AGENTS = ("sac", "ppo")
ON_POLICY = {"ppo"}


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

    def __post_init__(self) -> None:
        self.agent = str(self.agent).strip().lower()
        if self.agent not in AGENTS:
            raise ConfigError(f"unknown agent {self.agent!r}; choose one of: {', '.join(AGENTS)}")
        self.method = str(self.method).strip().lower()
        strategy_class(self.method)  # unknown methods fail before any work is done
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
        if self.wandb not in ("offline", "online", "disabled"):
            raise ConfigError(f"wandb mode must be offline, online or disabled, got {self.wandb!r}")
        if self.net_arch is not None:
            self.net_arch = tuple(int(w) for w in self.net_arch)
        self.agent_options = dict(self.agent_options)
        self.method_options = {k: dict(v) for k, v in self.method_options.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


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
        strategy_options=config.method_options.get(method, {}),
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
    """SB3 logger output that forwards every dump to the RunTracker (and so to W&B)."""

    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any],
              step: int = 0) -> None:
        row = {k: v for k, v in key_values.items()
               if isinstance(v, (int, float, np.integer, np.floating))}
        if row:
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


def _train_stages(agent: Any, stages: Sequence[Stage], evaluator: BatchedEvaluator,
                  normalizer: ScoreNormalizer, record: EvalRecord, *, eval_every: int,
                  log: Callable[[dict[str, Any], int], None], task_names: Sequence[str],
                  progress: bool, desc: str) -> dict[str, float]:
    """The core loop shared by continual runs and single-task reference runs."""
    timings = {"eval_seconds": 0.0, "eval_count": 0}
    ends = list(np.cumsum([s.steps for s in stages]).astype(int))
    prefix = {t: f"eval/{t}-{task_names[t]}" for t in evaluator.tasks}

    def evaluate(step: int) -> None:
        t0 = time.perf_counter()
        result = evaluator.evaluate(agent)
        timings["eval_seconds"] += time.perf_counter() - t0
        timings["eval_count"] += 1
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

    total = ends[-1]
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        evaluate(0)
        callback = _EvalCallback(eval_every, evaluate, set(ends), bar)
        for i, stage in enumerate(stages):
            agent.start_task(stage.task)
            log({"task": stage.task, "stage": i}, int(agent.num_timesteps))
            agent.learn(stage.steps, callback=callback, reset_num_timesteps=False,
                        progress_bar=False)
            if agent.num_timesteps != ends[i]:
                raise RuntimeError(
                    f"stage {i} ended at step {agent.num_timesteps}, expected {ends[i]}: the "
                    "agent trained past a task switch"
                )
            agent.end_task(stage.task)
            evaluate(ends[i])
    finally:
        bar.close()
    timings["total_seconds"] = time.perf_counter() - t_start
    timings["train_seconds"] = timings["total_seconds"] - timings["eval_seconds"]
    return timings


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


def train(config: RunConfig, *, run_dir: str | Path | None = None,
          keep_agent: bool = False) -> RunResult:
    """Train ``config.agent`` with ``config.method`` on the sequence; evaluate; report."""
    from agents.reference import load_references

    sequence = load_sequence(config)
    check_agent_fits(config, sequence)
    check_agent_options(config)  # fail on bad agent options before any work
    refs, missing_refs = load_references(config, sequence, required=config.require_references)
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
            f"forward transfer will be n/a; create them with `{reference_command(config)}`",
            RuntimeWarning, stacklevel=2,
        )
    path, group, name = run_dir_for(config, sequence)
    path = Path(run_dir) if run_dir is not None else path
    resolved = config.to_dict() | {
        "resolved_sequence": sequence.name, "tasks": list(sequence.task_names),
        "schedule": list(sequence.schedule), "steps_per_task_resolved": list(sequence.stage_steps),
        "score_bounds": normalizer.to_dict(),
    }
    names = stage_names(sequence)
    with RunTracker(path, resolved, wandb_mode=config.wandb, project=config.wandb_project,
                    group=group, name=name, job_type="rl") as tracker:
        env = sequence.make_env(append_task_id=True)
        agent = make_agent(config, env, sequence)
        agent.set_logger(Logger(folder=None, output_formats=[TrackerWriter(tracker)]))
        record = EvalRecord(tuple(range(sequence.num_tasks)))
        stages = [Stage(t, b) for t, b in zip(sequence.schedule, sequence.stage_steps,
                                               strict=True)]
        with BatchedEvaluator(sequence, config.eval_episodes,
                              max_steps=config.eval_max_steps) as evaluator:
            timings = _train_stages(
                agent, stages, evaluator, normalizer, record, eval_every=config.eval_every,
                log=tracker.log, task_names=sequence.task_names, progress=config.progress,
                desc=f"{config.agent}/{config.method} on {sequence.name}",
            )
        env.close()
        history = stage_history(record, sequence)
        summary: dict[str, Any] = {"method": config.method, "agent": config.agent,
                                   "forgetting_k": config.forgetting_k,
                                   "sequence": sequence.name, "seed": config.seed}
        plot_path = None
        if history is None:
            summary["metrics_reason"] = normalizer.missing_reason
            summary |= {"final_performance": None, "mean_forgetting": None,
                        "mean_forward_transfer": None}
        else:
            ref_histories = None
            if not missing_refs:
                ref_histories = [refs[t].history(normalizer, t) for t in sequence.schedule]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                summary |= summarize(history, ref_histories, k=config.forgetting_k)
            if missing_refs:
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
        if config.save_model:
            save_checkpoint(agent, tracker.run_dir / "checkpoints")
        tracker.finish(summary)
    return RunResult(config, Path(path), summary, rows, record, history, plot_path, timings,
                     agent if keep_agent else None)


def save_checkpoint(agent: Any, folder: Path) -> None:
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
