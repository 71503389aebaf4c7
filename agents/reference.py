"""Single-task reference runs: forward transfer's baseline and the upper return bounds.

CW's forward transfer compares task i's learning curve in the sequence with a run that
learns task i alone "with the same agent settings" (docs/ARCHITECTURE.md, "Metrics"). Here
a reference run trains the very agent of the continual run (same class, network, heads,
observation with the sequence's one-hot, SB3 options) on task i only, for task i's budget,
with the finetune strategy (no method acts during a first task) and seed ``reference_seed``
(1, CW's "seed 001"), evaluated every ``eval_every`` steps with the same evaluation protocol.

Runs are cached as JSON under ``<reference_dir>/<sequence>/<agent>/<task>-<key>.json``
(default ``~/.cache/crl/references``); the key hashes everything that changes the curve:
the task's env, its index and the sequence's task count and padding (the observation), the
agent and all its settings, the budget, the evaluation protocol and the seed. The method,
its options and the run seed are not part of it, so every method and seed of a comparison
shares one set of references.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.evaluation import CACHE_ROOT, ScoreNormalizer, json_ready, task_key, write_json
from crl.metrics import EvalHistory

if TYPE_CHECKING:
    from agents.config import RunConfig
    from envs.sequence import TaskSequence

FORMAT_VERSION = 1


class CorruptReferenceError(ValueError):
    """A cached reference run cannot be read; the message names the file and the fix."""


class MissingReferenceError(FileNotFoundError):
    """Reference runs are needed but not cached; the message gives the command to make them."""


def reference_root(config: RunConfig) -> Path:
    return Path(config.reference_dir) if config.reference_dir else CACHE_ROOT / "references"


def reference_settings(config: RunConfig, sequence: TaskSequence, task: int) -> dict[str, Any]:
    """Everything a reference curve depends on (the cache key's content)."""
    from envs.continual import sequence_spaces

    spaces = sequence_spaces(sequence)
    return json_ready({
        "format": FORMAT_VERSION,
        "task": task_key(sequence.tasks[task]),
        "task_index": task,
        "num_tasks": sequence.num_tasks,
        "observation_space": repr(spaces.observation_space),
        "action_space": repr(spaces.action_space),
        "budget": sequence.task_budget(task),
        "eval_seeds": list(sequence.eval_seeds()),
        "task_seed": sequence.task_seeds()[task],
        "agent": config.agent,
        "net_arch": config.net_arch,
        "agent_options": {k: config.agent_options[k] for k in sorted(config.agent_options)},
        "eval_every": config.eval_every,
        "eval_episodes": config.eval_episodes,
        **({"eval_max_steps": config.eval_max_steps} if config.eval_max_steps else {}),
        "seed": config.reference_seed,
        "device": config.device,
    })


def reference_path(config: RunConfig, sequence: TaskSequence, task: int) -> Path:
    settings = reference_settings(config, sequence, task)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    name = sequence.tasks[task].name.replace("/", "_")
    return reference_root(config) / sequence.name / config.agent / f"{name}-{digest}.json"


@dataclass(frozen=True)
class ReferenceRun:
    """Raw evaluations of a single-task run; steps are relative to the task's start."""

    task: int
    task_name: str
    steps: np.ndarray
    mean_returns: np.ndarray
    success_rates: np.ndarray
    budget: int
    path: Path
    k: int = 5

    @property
    def final_return(self) -> float:
        """Mean return over the last k evaluations after step 0 (CW smooths end values with
        k = 5; the evaluation at step 0 is the untrained policy's, never an end value)."""
        trained = self.mean_returns[self.steps > 0]
        return float((trained if trained.size else self.mean_returns)[-self.k:].mean())

    def history(self, normalizer: ScoreNormalizer, task: int | None = None) -> EvalHistory:
        """The run's scores as a one-task EvalHistory, normalised like the continual run."""
        t = self.task if task is None else task
        if normalizer.kind[t] == "success":
            scores = np.asarray(self.success_rates, dtype=float)
        else:
            scores = normalizer.normalize_returns(t, self.mean_returns)
        return EvalHistory(self.steps, scores[:, None], [0], self.budget)

    @classmethod
    def load(cls, path: Path, k: int = 5) -> ReferenceRun:
        try:
            data = json.loads(path.read_text())
            succ = [np.nan if v is None else v for v in data["success_rates"]]
            return cls(int(data["task_index"]), data["task_name"], np.asarray(data["steps"]),
                       np.asarray(data["mean_returns"], dtype=float),
                       np.asarray(succ, dtype=float), int(data["budget"]), path, k)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptReferenceError(
                f"the reference run file {path} is unreadable ({type(exc).__name__}: {exc}); "
                "delete it and create it again with `crl reference ... --force` (the same "
                "options as the run)"
            ) from None


def load_references(config: RunConfig, sequence: TaskSequence, *, required: bool = False
                    ) -> tuple[dict[int, ReferenceRun], list[int]]:
    """Cached reference runs of every task; missing ones listed (or an error if required)."""
    found: dict[int, ReferenceRun] = {}
    missing: list[int] = []
    for t in range(sequence.num_tasks):
        path = reference_path(config, sequence, t)
        if path.is_file():
            found[t] = ReferenceRun.load(path, config.forgetting_k)
        else:
            missing.append(t)
    if missing and required:
        from agents.config import reference_command

        names = [sequence.task_names[t] for t in missing]
        raise MissingReferenceError(
            f"no single-task reference runs for tasks {names} of {sequence.name} with these "
            f"agent settings (looked in {reference_root(config)}); create them with "
            f"`{reference_command(config)}`"
        )
    return found, missing


def run_reference(config: RunConfig, sequence: TaskSequence, task: int, *,
                  force: bool = False) -> ReferenceRun:
    """Train the reference run of one task (or load it from the cache) and cache it."""
    from agents.evaluation import BatchedEvaluator
    from agents.factory import make_agent
    from agents.training import EvalRecord, Stage, train_stages

    path = reference_path(config, sequence, task)
    if path.is_file() and not force:
        return ReferenceRun.load(path, config.forgetting_k)
    name = sequence.task_names[task]
    env = sequence.make_eval_env(task, append_task_id=True, seed=sequence.task_seeds()[task])
    agent = make_agent(config, env, sequence, method="finetune", seed=config.reference_seed)
    # the raw returns are what is cached; scores are normalised when the reference is used
    normalizer = _raw_normalizer(sequence)  # raw returns are cached, scored when used
    record = EvalRecord((task,))
    t0 = time.perf_counter()
    with BatchedEvaluator(sequence, config.eval_episodes, tasks=[task],
                          max_steps=config.eval_max_steps) as evaluator:
        train_stages(agent, [Stage(task, sequence.task_budget(task))], evaluator, normalizer,
                      record, eval_every=config.eval_every, log=lambda row, step: None,
                      task_names=sequence.task_names, progress=config.progress,
                      desc=f"reference {config.agent} on {name}")
    env.close()
    data = {
        "task_index": task, "task_name": name, "sequence": sequence.name,
        "budget": sequence.task_budget(task), "steps": record.steps,
        "mean_returns": [r[0] for r in record.mean_returns],
        "success_rates": [s[0] for s in record.success_rates],
        "seconds": time.perf_counter() - t0,
        "settings": reference_settings(config, sequence, task),
    }
    write_json(path, data)
    return ReferenceRun.load(path, config.forgetting_k)


def _raw_normalizer(sequence: TaskSequence) -> ScoreNormalizer:
    """A normaliser that scores nothing: reference runs record raw returns only."""
    n = sequence.num_tasks
    return ScoreNormalizer(sequence.task_names, ["return"] * n, np.full(n, np.nan),
                           np.full(n, np.nan), {t: "raw" for t in range(n)})


def run_references(config: RunConfig, sequence: TaskSequence, *, force: bool = False
                   ) -> dict[int, ReferenceRun]:
    """Reference runs of every task of the sequence (cached ones are reused)."""
    return {t: run_reference(config, sequence, t, force=force)
            for t in range(sequence.num_tasks)}
