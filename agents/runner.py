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
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.logger import KVWriter, Logger

from agents.checkpoint import agent_state, load_agent_state
from agents.config import (
    RESUME_MAY_CHANGE,
    ConfigError,
    RunConfig,
    config_fields,
    reference_command,
    resolve_sequence,
)
from agents.evaluation import (
    BatchedEvaluator,
    ScoreNormalizer,
    build_normalizer,
)
from agents.factory import check_run_config, make_agent
from agents.method_defaults import rl_method_options
from agents.results import RunResult, metric_rows, save_model_files
from agents.training import (
    EvalRecord,
    Position,
    Stage,
    TrackerWriter,
    stage_history,
    stage_names,
    train_stages,
)
from crl.checkpoint import (
    CheckpointError,
    check_compatible,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from crl.metrics import summarize
from crl.plasticity import Probe
from crl.plots import plot_plasticity, plot_task_curves
from crl.runs import (
    RunFailed,
    check_metrics_rows,
    clear_for_resume,
    holds_run,
    raise_if_finished,
    read_run_config,
    record_run_failure,
)
from crl.strategies import user_options
from crl.tracking import RunTracker, to_builtin

if TYPE_CHECKING:
    from envs.sequence import TaskSequence

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

    sequence = resolve_sequence(config)
    check_run_config(config, sequence)  # fail on bad options before any work
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
            config.agent, config.method, user_options(config.method_options, config.method),
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
    # validated; the run directory changes only under the run's lock (_execute)
    return _execute(plan, run_dir, resume=_Resume(state, env, agent, writer, notes),
                    keep_agent=keep_agent)


def load_agent(run_dir: str | Path) -> Any:
    """The agent of a run's last checkpoint (weights, optimisers, strategy, replay buffer,
    position in the sequence) on a new training env of its sequence, ready to continue or to
    evaluate. The global RNGs are left alone."""
    state = _load_rl_checkpoint(run_dir, ("config", "agent"))
    config = RunConfig(**config_fields(state["config"]))
    return _rebuild_agent(config, resolve_sequence(config), state["agent"], [])[1]


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
    task, step = getattr(exc, "task", None), getattr(exc, "step", None)
    has_ckpt = last["position"] is not None and ckpt_file.is_file()
    return record_run_failure(
        run_dir, exc, diverged=isinstance(exc, FloatingPointError),
        checkpoint=ckpt_file if has_ckpt else None,
        checkpoint_at=(f"env step {last['step']:,}, "
                       f"{_describe(last['position'], stages, names)}") if has_ckpt else "",
        details={"task": task, "step": step,
                 "last_checkpoint": str(ckpt_file) if has_ckpt else None,
                 "checkpoint_step": last["step"] if has_ckpt else None,
                 "checkpoint_position": dataclasses.asdict(last["position"]) if has_ckpt
                 else None},
        command="crl train", fix="start a new run with a lower learning rate or method "
        "strength", task=task, step=step)


def _probe(config: RunConfig) -> Probe | None:
    if not config.plasticity:
        return None
    return Probe(tau=config.plasticity_tau, size=config.plasticity_probe)


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
        if resume is not None:
            # under the lock: a second resume started at once must not delete this one's
            # checkpoint temporary files while it writes them
            clear_for_resume(tracker.run_dir)
        if resume is None:
            env = sequence.make_env(append_task_id=True)
            agent = make_agent(config, env, sequence)
            writer = TrackerWriter(tracker)
            agent.set_logger(Logger(folder=None, output_formats=[writer]))
            record = EvalRecord(tuple(range(sequence.num_tasks)))
            start, timings_before = None, None
            probe = _probe(config)
        else:
            env, agent, writer = resume.env, resume.agent, resume.writer
            writer.tracker = tracker
            saved = resume.state
            record = EvalRecord(**{**saved["record"], "tasks": tuple(saved["record"]["tasks"])})
            start = Position(**saved["position"])
            timings_before = saved["timings"]
            probe = _probe(config)
            if probe is not None and saved.get("plasticity") is not None:
                probe.load_state_dict(saved["plasticity"])
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
                "plasticity": None if probe is None else probe.state_dict(),
            })
            last.update(position=position, step=step)

        try:
            with BatchedEvaluator(sequence, config.eval_episodes,
                                  max_steps=config.eval_max_steps) as evaluator:
                if resume is not None:  # last: building envs and W&B may draw from them
                    set_rng_state(resume.state["rng"])
                timings = train_stages(
                    agent, stages, evaluator, plan.normalizer, record,
                    eval_every=config.eval_every, log=tracker.log,
                    task_names=sequence.task_names, progress=config.progress,
                    desc=f"{config.agent}/{config.method} on {sequence.name}",
                    checkpoint=write_checkpoint, checkpoint_every=config.checkpoint_every,
                    start=start, timings=timings_before, writer=writer, probe=probe,
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
        if probe is not None:
            summary["plasticity"] = probe.history()
            timings["plasticity_share"] = (timings["plasticity_seconds"]
                                           / max(timings["total_seconds"], 1e-9))
            curves = plot_plasticity(probe.history(), list(sequence.stage_ends),
                                     tracker.run_dir / "plots" / "plasticity.png",
                                     title=f"{sequence.name}: {config.agent} + {config.method} "
                                     f"(seed {config.seed})")
            if curves is not None:
                tracker.log_image("plasticity", curves)
        summary |= {"table": rows, "timings": timings, "eval": record.to_dict(),
                    "eval_share": timings["eval_seconds"] / max(timings["total_seconds"], 1e-9),
                    "env_steps": int(agent.num_timesteps),
                    "steps_per_second": agent.num_timesteps / max(timings["train_seconds"],
                                                                  1e-9)}
        if method_summary := agent.strategy.run_summary():
            summary["method_summary"] = method_summary
        if resume is not None:
            summary["resumed"] = {"from_step": int(resume.state["num_timesteps"]),
                                  "exact": not resume.notes, "notes": resume.notes}
        if config.save_model:
            save_model_files(agent, tracker.run_dir / "checkpoints")
        tracker.finish(summary)
    return RunResult(config, Path(path), summary, rows, record, history, plot_path, timings,
                     agent if keep_agent else None)
