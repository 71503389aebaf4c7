"""Evaluation of every task of a sequence, and score normalisation (docs/ARCHITECTURE.md,
"Metrics").

:class:`BatchedEvaluator` runs all (task, episode) pairs at once: one Gymnasium
``SyncVectorEnv`` holds a slot per pair, built from ``sequence.eval_env_fns`` with the task's
one-hot appended, and each step makes ONE ``policy.predict`` call on the observations of
every live slot; a multi-head policy picks each slot's head from its one-hot. Only a
strategy whose ``evaluation(task)`` context changes the weights per task (PackNet) needs one
call per task per step, inside that task's context.

:func:`evaluate_per_task` is the plain loop (one env, one episode, one observation at a time)
kept as the reference the batched pass is tested against: with the same seeds they give the
same returns.

Seeds: slot (task i, episode e) is reset with the e-th child of ``SeedSequence`` seeded by
task i's evaluation seed (``sequence.eval_seeds(seed)``). Every evaluation of a run uses the
same seeds, so successive evaluations differ only by the policy (common random numbers), not
by the sampled start states.

Scores (docs/ARCHITECTURE.md, "Metrics"): Meta-World tasks score their success rate
(``info["success"]`` at any step of the episode, as CW); other tasks
``(R - low) / (high - low)`` clipped to [0, 1], with the task's configured bounds, or where a
bound is None, the random policy's mean return (``low``, measured once and cached) and the
single-task reference run's final return (``high``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from crl.metrics import normalize_score
from crl.strategies.base import Strategy

if TYPE_CHECKING:
    from envs.sequence import TaskSequence
    from envs.spec import TaskSpec

#: Default cache root for random-policy returns and reference runs.
CACHE_ROOT = Path(os.environ.get("CRL_CACHE_DIR", Path.home() / ".cache" / "crl"))

#: Safety net: an evaluation episode longer than this is a broken env (no time limit).
MAX_EPISODE_STEPS = 1_000_000


class Predictor(Protocol):
    def predict(self, observation: Any, *args: Any, deterministic: bool = ...,
                **kwargs: Any) -> tuple[np.ndarray, Any]: ...


# --------------------------------------------------------------------------------------------
# Cache files
# --------------------------------------------------------------------------------------------
def json_ready(value: Any) -> Any:
    """numpy scalars/arrays, tuples and paths -> JSON values; nan/inf -> None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return json_ready(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: Path, data: Any) -> None:
    """Atomic write (temp file + os.replace): a crash never leaves half a cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(json_ready(data), fh, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalResult:
    """Raw outcome of one evaluation: one row per evaluated task, one column per episode."""

    tasks: tuple[int, ...]
    returns: np.ndarray  # (n_tasks, episodes) float
    lengths: np.ndarray  # (n_tasks, episodes) int
    successes: np.ndarray  # (n_tasks, episodes) float; nan where the env reports no success

    @property
    def mean_returns(self) -> np.ndarray:
        return self.returns.mean(axis=1)

    @property
    def success_rates(self) -> np.ndarray:
        """Per task; nan for tasks whose env never reported ``info["success"]``."""
        out = np.full(len(self.tasks), np.nan)
        for r, row in enumerate(self.successes):
            if np.all(np.isfinite(row)):
                out[r] = row.mean()
        return out


def slot_seeds(sequence: TaskSequence, episodes: int, tasks: Sequence[int] | None = None,
               seed: int | None = None) -> list[list[int]]:
    """seeds[r][e]: reset seed of episode e of the r-th evaluated task."""
    tasks = list(range(sequence.num_tasks)) if tasks is None else list(tasks)
    task_seeds = sequence.eval_seeds(seed)
    return [
        [int(c.generate_state(1)[0]) for c in np.random.SeedSequence(task_seeds[t]).spawn(episodes)]
        for t in tasks
    ]


def _check_episodes(episodes: int) -> int:
    if isinstance(episodes, bool) or not isinstance(episodes, int | np.integer) or episodes < 1:
        raise ValueError(f"eval episodes must be a positive integer, got {episodes!r}.")
    return int(episodes)


def _check_max_steps(max_steps: int | None) -> int | None:
    """Cap on evaluation episode length (Atari: an idle deterministic policy can otherwise
    run to the 108k-frame limit); None keeps the envs' own time limits."""
    if max_steps is None:
        return None
    if isinstance(max_steps, bool) or not isinstance(max_steps, int | np.integer) or (
        max_steps < 1
    ):
        raise ValueError(f"eval max steps must be a positive integer or None, got {max_steps!r}.")
    return int(max_steps)


def _check_tasks(sequence: TaskSequence, tasks: Sequence[int] | None) -> tuple[int, ...]:
    if tasks is None:
        return tuple(range(sequence.num_tasks))
    out = tuple(int(t) for t in tasks)
    bad = [t for t in out if not 0 <= t < sequence.num_tasks]
    if bad or not out or len(set(out)) != len(out):
        raise ValueError(
            f"tasks to evaluate must be distinct indices in [0, {sequence.num_tasks}) of "
            f"sequence {sequence.name!r}, got {list(tasks)}."
        )
    return out


def per_task_context(model: Any, strategy: Strategy | None = None
                     ) -> Callable[[int], contextlib.AbstractContextManager] | None:
    """The evaluation context to enter per task, or None when the strategy's evaluation is
    the base no-op (then one predict call serves every task at once).

    A continual agent exposes ``evaluation(task)`` (= its strategy's); a plain SB3 model has
    none and needs none.
    """
    strategy = strategy if strategy is not None else getattr(model, "strategy", None)
    if strategy is None or type(strategy).evaluation is Strategy.evaluation:
        return None
    agent_ctx = getattr(model, "evaluation", None)
    return agent_ctx if callable(agent_ctx) else strategy.evaluation


def _predictor(model: Any) -> Predictor:
    """SB3 algorithms predict through their policy; a policy (or any predictor) directly."""
    policy = getattr(model, "policy", None)
    target = policy if policy is not None and hasattr(policy, "predict") else model
    if not hasattr(target, "predict"):
        raise TypeError(
            f"cannot evaluate {type(model).__name__}: it needs a predict(obs, deterministic=...) "
            "method (an SB3 model or policy)."
        )
    return target


def _take(obs: Any, idx: np.ndarray) -> Any:
    if isinstance(obs, dict):
        return {k: v[idx] for k, v in obs.items()}
    return obs[idx]


# --------------------------------------------------------------------------------------------
# Batched evaluation
# --------------------------------------------------------------------------------------------
class BatchedEvaluator:
    """All (task, episode) pairs of a sequence in one vector env; reuse it for every
    evaluation of a run (building Meta-World or Atari envs is the slow part)."""

    def __init__(
        self,
        sequence: TaskSequence,
        episodes: int,
        *,
        tasks: Sequence[int] | None = None,
        seed: int | None = None,
        append_task_id: bool = True,
        max_steps: int | None = None,
    ) -> None:
        self.sequence = sequence
        self.episodes = _check_episodes(episodes)
        self.max_steps = _check_max_steps(max_steps)
        self.tasks = _check_tasks(sequence, tasks)
        self.slot_row = np.repeat(np.arange(len(self.tasks)), self.episodes)
        self.slot_task = np.asarray(self.tasks)[self.slot_row]
        self.seeds = [s for row in slot_seeds(sequence, self.episodes, self.tasks, seed)
                      for s in row]
        fns = sequence.eval_env_fns(append_task_id=append_task_id)
        self.vec_env = SyncVectorEnv(
            [fns[t] for t in self.slot_task], autoreset_mode=AutoresetMode.NEXT_STEP
        )
        self._groups = [(t, np.flatnonzero(self.slot_task == t)) for t in self.tasks]

    @property
    def n_slots(self) -> int:
        return len(self.slot_task)

    def close(self) -> None:
        self.vec_env.close()

    def __enter__(self) -> BatchedEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def evaluate(self, model: Any, *, strategy: Strategy | None = None,
                 deterministic: bool = True) -> EvalResult:
        """Run one episode in every slot; returns per-task raw returns and successes.

        ``model``: an SB3 model/continual agent (its policy predicts) or any predictor.
        The continual agent's strategy (or ``strategy``) decides whether the per-task
        evaluation context is needed.
        """
        predictor = _predictor(model)
        context = per_task_context(model, strategy)
        n = self.n_slots
        obs, _ = self.vec_env.reset(seed=self.seeds)
        returns = np.zeros(n)
        lengths = np.zeros(n, dtype=np.int64)
        success = np.zeros(n, dtype=bool)
        reports_success = np.zeros(n, dtype=bool)
        live = np.ones(n, dtype=bool)
        actions: np.ndarray | None = None
        steps = 0
        while live.any():
            idx = np.flatnonzero(live)
            pred = self._predict(predictor, context, obs, idx, live, deterministic)
            if actions is None:  # every slot is live at the first step
                actions = np.array(pred)
            else:
                actions[idx] = pred  # finished slots keep a valid (ignored) action
            obs, reward, terminated, truncated, infos = self.vec_env.step(actions)
            returns[idx] += reward[idx]
            lengths[idx] += 1
            if "success" in infos:
                mask = infos.get("_success", np.ones(n, dtype=bool)) & live
                reports_success |= mask
                success |= mask & (np.asarray(infos["success"]) > 0)
            live &= ~(terminated | truncated)
            if self.max_steps is not None:
                live &= lengths < self.max_steps
            steps += 1
            if steps > MAX_EPISODE_STEPS:
                raise RuntimeError(
                    f"evaluation episodes ran {MAX_EPISODE_STEPS} steps without ending; give "
                    "the tasks a time limit (TimeLimit wrapper / max_episode_steps)."
                )
        succ = np.where(reports_success, success.astype(float), np.nan)
        shape = (len(self.tasks), self.episodes)
        return EvalResult(self.tasks, returns.reshape(shape), lengths.reshape(shape),
                          succ.reshape(shape))

    def _predict(self, predictor: Predictor, context: Any, obs: Any, idx: np.ndarray,
                 live: np.ndarray, deterministic: bool) -> np.ndarray:
        if context is None:
            return predictor.predict(_take(obs, idx), deterministic=deterministic)[0]
        # PackNet-like strategies: each task's slots under that task's weights
        out: np.ndarray | None = None
        for task, slots in self._groups:
            sel = slots[live[slots]]
            if sel.size == 0:
                continue
            with context(int(task)):
                act = predictor.predict(_take(obs, sel), deterministic=deterministic)[0]
            if out is None:
                out = np.zeros((len(live), *np.shape(act)[1:]), dtype=np.asarray(act).dtype)
            out[sel] = act
        assert out is not None
        return out[idx]


def evaluate_per_task(
    model: Any,
    sequence: TaskSequence,
    episodes: int,
    *,
    tasks: Sequence[int] | None = None,
    seed: int | None = None,
    strategy: Strategy | None = None,
    deterministic: bool = True,
    append_task_id: bool = True,
    max_steps: int | None = None,
) -> EvalResult:
    """The plain loop: task by task, episode by episode, one observation per predict call.

    Slow; the reference implementation :class:`BatchedEvaluator` must agree with.
    """
    episodes = _check_episodes(episodes)
    tasks = _check_tasks(sequence, tasks)
    max_steps = _check_max_steps(max_steps)
    predictor = _predictor(model)
    context = per_task_context(model, strategy)
    seeds = slot_seeds(sequence, episodes, tasks, seed)
    shape = (len(tasks), episodes)
    returns, lengths = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    successes = np.full(shape, np.nan)
    for r, task in enumerate(tasks):
        env = sequence.make_eval_env(task, append_task_id=append_task_id)
        ctx = context(task) if context is not None else contextlib.nullcontext()
        try:
            with ctx:
                for e in range(episodes):
                    obs, _ = env.reset(seed=seeds[r][e])
                    done, success, reported = False, False, False
                    while not done:
                        batch = ({k: v[None] for k, v in obs.items()} if isinstance(obs, dict)
                                 else obs[None])
                        action = predictor.predict(batch, deterministic=deterministic)[0][0]
                        obs, reward, terminated, truncated, info = env.step(action)
                        returns[r, e] += float(reward)
                        lengths[r, e] += 1
                        if "success" in info:
                            reported = True
                            success |= bool(info["success"] > 0)
                        done = terminated or truncated or (
                            max_steps is not None and lengths[r, e] >= max_steps)
                    if reported:
                        successes[r, e] = float(success)
        finally:
            env.close()
    return EvalResult(tasks, returns, lengths, successes)


# --------------------------------------------------------------------------------------------
# Random policy
# --------------------------------------------------------------------------------------------
class RandomPolicy:
    """Uniform random actions from a seeded copy of the action space (a predictor)."""

    def __init__(self, action_space: gym.Space, seed: int = 0) -> None:
        self.action_space = action_space
        self.action_space.seed(seed)

    def predict(self, observation: Any, *args: Any, deterministic: bool = True,
                **kwargs: Any) -> tuple[np.ndarray, None]:
        n = len(next(iter(observation.values()))) if isinstance(observation, dict) else len(
            observation)
        return np.stack([self.action_space.sample() for _ in range(n)]), None


def task_key(task: TaskSpec) -> str:
    """A stable text identity of a task's env (id, kwargs, wrappers): cache keys use it."""
    return json.dumps(
        {"env_id": task.env_id, "kwargs": task.kwargs,
         "wrappers": [[w.name, w.kwargs] for w in task.wrappers]},
        sort_keys=True, default=repr,
    )


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def random_returns(
    sequence: TaskSequence,
    tasks: Sequence[int] | None = None,
    *,
    episodes: int = 10,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    max_steps: int | None = None,
) -> dict[int, float]:
    """Mean return of the uniform random policy per task, measured once and cached.

    The cache file is keyed by the task's env (id, kwargs, wrappers), the episode count and
    the seed, so any change to the task measures again.
    """
    tasks = _check_tasks(sequence, tasks)
    root = Path(cache_dir) if cache_dir is not None else CACHE_ROOT / "random_returns"
    out: dict[int, float] = {}
    todo: list[int] = []
    paths: dict[int, Path] = {}
    for t in tasks:
        payload = {"task": task_key(sequence.tasks[t]), "episodes": episodes, "seed": seed}
        if max_steps is not None:
            payload["max_steps"] = max_steps
        paths[t] = root / f"{sequence.tasks[t].name}-{_digest(payload)}.json"
        if paths[t].is_file():
            try:
                out[t] = float(json.loads(paths[t].read_text())["mean_return"])
                continue
            except (ValueError, KeyError, TypeError) as exc:  # a cache: measure it again
                warnings.warn(f"the random-policy return cache {paths[t]} is unreadable "
                              f"({type(exc).__name__}: {exc}); measuring it again",
                              RuntimeWarning, stacklevel=2)
        todo.append(t)
    if todo:
        with BatchedEvaluator(sequence, episodes, tasks=todo, seed=seed,
                              max_steps=max_steps) as ev:
            policy = RandomPolicy(ev.vec_env.single_action_space, seed)
            res = ev.evaluate(policy)
        for r, t in enumerate(todo):
            out[t] = float(res.mean_returns[r])
            write_json(paths[t], {
                "task": sequence.tasks[t].name, "task_key": task_key(sequence.tasks[t]),
                "episodes": episodes, "seed": seed, "mean_return": out[t],
                "returns": res.returns[r]})
    return {t: out[t] for t in tasks}


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------
def is_success_task(task: TaskSpec) -> bool:
    """Scored by success rate (a field of the task: Meta-World's tasks), else by return."""
    return task.score_kind == "success"


@dataclass
class ScoreNormalizer:
    """Per-task way to turn an :class:`EvalResult` into scores in [0, 1].

    ``kind[t]`` is ``"success"`` or ``"return"``; for return tasks ``low[t]``/``high[t]``
    are the bounds, nan where unknown (``missing[t]`` then says what is missing and which
    command provides it).
    """

    task_names: tuple[str, ...]
    kind: list[str]
    low: np.ndarray
    high: np.ndarray
    missing: dict[int, str] = field(default_factory=dict)
    #: what to do about missing bounds (the command that creates the reference runs)
    hint: str = ""

    @property
    def missing_reason(self) -> str:
        return "; ".join(self.missing.values()) + (f"; {self.hint}" if self.hint else "")

    @property
    def complete(self) -> bool:
        return not self.missing

    def scores(self, result: EvalResult) -> np.ndarray:
        """Scores of the evaluated tasks (nan for tasks whose bounds are unknown)."""
        out = np.full(len(result.tasks), np.nan)
        for r, t in enumerate(result.tasks):
            out[r] = self.score(t, result.returns[r], result.successes[r])
        return out

    def score(self, task: int, returns: np.ndarray, successes: np.ndarray | None = None
              ) -> float:
        if self.kind[task] == "success":
            s = np.asarray(successes, dtype=float)
            if s.size == 0 or not np.all(np.isfinite(s)):
                raise ValueError(
                    f"task {self.task_names[task]!r} is scored by success rate but its env did "
                    "not report info['success']."
                )
            return float(s.mean())
        if task in self.missing:
            return float("nan")
        return float(normalize_score(float(np.mean(returns)), self.low[task], self.high[task]))

    def normalize_returns(self, task: int, mean_returns: np.ndarray) -> np.ndarray:
        """Vectorised over evaluations: mean returns of one task → scores."""
        if task in self.missing:
            return np.full(np.shape(mean_returns), np.nan)
        return np.asarray(normalize_score(mean_returns, self.low[task], self.high[task]))

    #: per task: how its score is defined, in words (tables print it beside the scores)
    basis: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": list(self.kind), "low": self.low.tolist(), "high": self.high.tolist(),
               "missing": {self.task_names[t]: why for t, why in self.missing.items()}}
        if self.basis:  # absent in runs recorded before it existed: they still resume
            out["basis"] = list(self.basis)
        return out


def build_normalizer(
    sequence: TaskSequence,
    *,
    reference_returns: dict[int, float] | None = None,
    random_episodes: int = 10,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    reference_hint: str = "crl reference",
    max_steps: int | None = None,
) -> ScoreNormalizer:
    """Bounds for every task: configured ones first, else measured ones
    (docs/ARCHITECTURE.md, "Metrics").

    ``reference_returns[t]``: the final mean return of task t's single-task reference run,
    used as ``high`` where the task configures none. Random-policy returns (``low``) are
    measured only for tasks that need them.
    """
    n = sequence.num_tasks
    kind = ["success" if is_success_task(t) else "return" for t in sequence.tasks]
    low = np.full(n, np.nan)
    high = np.full(n, np.nan)
    missing: dict[int, str] = {}
    need_low = [i for i, t in enumerate(sequence.tasks) if kind[i] == "return" and t.low is None]
    measured = random_returns(sequence, need_low, episodes=random_episodes, seed=seed,
                              cache_dir=cache_dir, max_steps=max_steps) if need_low else {}
    refs = reference_returns or {}
    basis = []
    for t, k in zip(sequence.tasks, kind, strict=True):
        if k == "success":
            basis.append("success rate")
        elif t.score_basis:
            basis.append(t.score_basis)
        else:
            basis.append("return between " + ("the configured low" if t.low is not None
                                                else "the random policy's") + " and " +
                           ("the configured high" if t.high is not None
                            else "the single-task reference run's"))
    for i, t in enumerate(sequence.tasks):
        if kind[i] == "success":
            continue
        low[i] = t.low if t.low is not None else measured[i]
        if t.high is not None:
            high[i] = t.high
        elif i in refs:
            high[i] = refs[i]
        else:
            missing[i] = (f"task {t.name!r} has no upper return bound: its score needs its "
                          "single-task reference run")
            continue
        if not high[i] > low[i]:
            missing[i] = (
                f"task {t.name!r}: the reference return {high[i]:.4g} is not above the random "
                f"policy's {low[i]:.4g}, so scores cannot be normalised; run the reference "
                "longer or configure the task's low/high bounds"
            )
    return ScoreNormalizer(sequence.task_names, kind, low, high, missing,
                           f"create the reference runs with `{reference_hint}`", basis)
