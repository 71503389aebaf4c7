"""What every continual SB3 agent shares: the strategy, the task-switch protocol, checkpoints.

An SB3 algorithm learns one task. :class:`ContinualAgent` is a mixin placed before the SB3
class (``class ContinualSAC(ContinualAgent, SAC)``) that adds the sequence around it: the
runner calls ``start_task(t)`` at each switch (the agent resets what CW resets, then the
strategy's ``on_task_start``), ``end_task(t)`` when task ``t`` is over (the strategy reads the
finished task's data through the agent's Host adapter), and wraps evaluations of task ``t``
in ``evaluation(t)`` (PackNet's masks). The subclass supplies the Host adapter, its
optimisers and the algorithm-specific switch behaviour (buffers, exploration, entropy).

The ``train()`` overrides were written against one SB3 minor version; importing this module
under another fails at once instead of silently training with a drifted update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import stable_baselines3
import torch

from crl.strategies import Batch, Host, Strategy, make_strategy

#: SB3 versions whose ``SAC.train`` / ``PPO.train`` our overrides were checked against.
SB3_MIN, SB3_MAX_EXCLUSIVE = (2, 9), (2, 10)
SB3_REQUIREMENT = "stable-baselines3>=2.9,<2.10"


def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError) as err:
        raise ImportError(f"cannot parse the stable-baselines3 version {version!r}") from err


def check_sb3_version(version: str | None = None) -> None:
    """Raise ImportError when the installed SB3 is outside the range our overrides match."""
    version = stable_baselines3.__version__ if version is None else version
    if not SB3_MIN <= _version_tuple(version) < SB3_MAX_EXCLUSIVE:
        raise ImportError(
            f"crl's continual agents override SB3's train() and were checked against "
            f"{SB3_REQUIREMENT}, but stable-baselines3 {version} is installed; run "
            f"`pip install '{SB3_REQUIREMENT}'`"
        )


check_sb3_version()


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget the optimiser's running statistics (Adam's moments and step counters).

    Same effect as building a new optimiser over the same parameters with the same
    hyper-parameters (CW's ``reset_optimizer_on_task_change``): torch optimisers create their
    per-parameter state lazily at the first step, so an empty state means a fresh start,
    while the param groups (and the learning rate SB3's schedule set) are kept.
    """
    optimizer.state.clear()


class NonFiniteLossError(FloatingPointError):
    """A training loss became nan or inf: the update diverged. Names the losses, the task
    and the env step; the runner adds the checkpoint to resume from."""

    def __init__(self, losses: Mapping[str, float], task: int | None, step: int) -> None:
        self.losses = dict(losses)
        self.task = task
        self.step = step
        shown = ", ".join(f"{k} = {v}" for k, v in self.losses.items())
        super().__init__(
            f"non-finite training loss at env step {step} of task {task}: {shown}. The "
            "update diverged; lower the learning rate (--learning-rate) or the method's "
            "regularisation strength (lam: --ewc-lam, --l2-lam, --mas-lam...)"
        )


def _value(term: torch.Tensor | float) -> float:
    if isinstance(term, torch.Tensor):  # item() of a scalar: the one sync, no extra op
        return term.item() if term.numel() == 1 else float(term.detach().sum())
    return float(term)


#: name of the continual state among the parameters of SB3's zip
CONTINUAL_PARAMS = "continual"


class ContinualAgent:
    """Mixin for an SB3 algorithm trained on a task sequence (see the module docstring).

    The subclass calls :meth:`_init_continual` once its SB3 model is built, and implements
    :meth:`_make_host`, :meth:`_optimizers` and :meth:`_on_task_switch`.
    """

    strategy: Strategy
    num_tasks: int
    host: Host
    current_task: int | None
    #: One entry per ``start_task``: the task and what was reset (for tests and logs).
    switch_log: list[dict[str, Any]]

    # -- set-up ------------------------------------------------------------------------------
    def _init_continual(
        self,
        strategy: Strategy | str,
        strategy_options: Mapping[str, Any] | None,
        num_tasks: int,
        seed: int | None,
        reset_optimizer: bool,
    ) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        self.reset_optimizer = bool(reset_optimizer)
        self.strategy = build_strategy(strategy, strategy_options, num_tasks, seed)
        self.current_task = None
        self.task_running = False
        self.switch_log = []
        self.host = self._make_host()
        self.strategy.bind(self.host)

    def _make_host(self) -> Host:
        raise NotImplementedError

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser the agent steps while training, by name."""
        raise NotImplementedError

    def _on_task_switch(self, task: int, first: bool) -> dict[str, Any]:
        """Algorithm-specific switch work (buffers, exploration...); returns what it did."""
        return {}

    # -- task protocol -------------------------------------------------------------------
    def reset_optimizers(self) -> list[str]:
        """Reset the state of every optimiser of the agent; returns their names."""
        optimizers = self._optimizers()
        for optimizer in optimizers.values():
            reset_optimizer_state(optimizer)
        return sorted(optimizers)

    def _check_task(self, task: int) -> int:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(
                f"task must be an integer in [0, {self.num_tasks}) (num_tasks={self.num_tasks}),"
                f" got {task!r}"
            )
        return task

    def start_task(self, task: int) -> None:
        """Begin training task ``task``: CW's switch resets, then the strategy's hook."""
        self._check_task(task)
        if self.task_running:
            raise RuntimeError(
                f"start_task({task}) called while task {self.current_task} is still running; "
                f"call end_task({self.current_task}) first so the strategy can consolidate it"
            )
        first = self.current_task is None
        entry: dict[str, Any] = {"task": task, "optimizers_reset": []}
        if not first and self.reset_optimizer:
            entry["optimizers_reset"] = self.reset_optimizers()
        entry.update(self._on_task_switch(task, first))
        self.current_task = task
        self.task_running = True
        self.strategy.on_task_start(task)
        self.switch_log.append(entry)

    def end_task(self, task: int) -> None:
        """Task ``task`` is over: the strategy consolidates it from the agent's data."""
        self._check_task(task)
        if not self.task_running or task != self.current_task:
            raise RuntimeError(
                f"end_task({task}) called but the running task is "
                f"{self.current_task if self.task_running else 'none'}; call start_task({task})"
                " before training it"
            )
        self.strategy.on_task_end(task)
        self.task_running = False

    @contextlib.contextmanager
    def evaluation(self, task: int) -> Iterator[None]:
        """Wrap every evaluation of ``task`` (PackNet shows the task its own weights)."""
        self._check_task(task)
        with self.strategy.evaluation(task):
            yield

    # -- divergence --------------------------------------------------------------------
    def probe_batches(self) -> Iterator[Batch]:
        """The running task's data for the plasticity probe (:class:`crl.plasticity.Probe`):
        the task's own batches, drawn without touching any random stream training uses."""
        return self.task_batches()  # type: ignore[attr-defined]

    def check_finite_losses(self, total: torch.Tensor | float,
                            terms: Mapping[str, torch.Tensor | float | None]) -> None:
        """Raise :class:`NonFiniteLossError` if ``total`` (the sum of the update's losses)
        is not finite. One check (one device sync for a tensor) per update; ``terms`` are
        only read to name the culprits when it fails."""
        value = _value(total)
        if math.isfinite(value):
            return
        named = {k: _value(v) for k, v in terms.items() if v is not None}
        bad = {k: v for k, v in named.items() if not math.isfinite(v)} or {"total": value}
        raise NonFiniteLossError(bad, self.current_task, int(getattr(self, "num_timesteps", 0)))

    # -- checkpoints ---------------------------------------------------------------------
    def _extra_continual_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_continual_state(self, state: Mapping[str, Any]) -> None:
        pass

    def continual_state_dict(self) -> dict[str, Any]:
        """Strategy state and task progress (SB3's own save() holds the weights)."""
        return {
            "strategy_name": self.strategy.name,
            "strategy": self.strategy.state_dict(),
            "num_tasks": self.num_tasks,
            "current_task": self.current_task,
            "task_running": self.task_running,
            "switch_log": [dict(e) for e in self.switch_log],
            "extra": self._extra_continual_state(),
        }

    # SB3's own save()/load() carry the continual state as one more entry of the zip's
    # parameters ("continual.pth", read back with torch.load(weights_only=True)), so a
    # model saved with model.save() and loaded with Cls.load() keeps its strategy state
    # (Fishers, masks, memories) and its position in the sequence.
    def get_parameters(self) -> dict[str, dict]:
        params = super().get_parameters()  # type: ignore[misc]
        params[CONTINUAL_PARAMS] = self.continual_state_dict()
        return params

    def set_parameters(self, load_path_or_dict: Any, exact_match: bool = True,
                       device: Any = "auto") -> None:
        continual = None
        if not isinstance(load_path_or_dict, dict):  # a zip path: read its parameters here
            from stable_baselines3.common.save_util import load_from_zip_file

            _, load_path_or_dict, _ = load_from_zip_file(load_path_or_dict, device=device,
                                                         load_data=False)
        if CONTINUAL_PARAMS in load_path_or_dict:
            load_path_or_dict = dict(load_path_or_dict)
            continual = load_path_or_dict.pop(CONTINUAL_PARAMS)
        super().set_parameters(load_path_or_dict, exact_match, device)  # type: ignore[misc]
        if continual is not None:
            self.load_continual_state_dict(continual)

    def load_continual_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["strategy_name"] != self.strategy.name:
            raise ValueError(
                f"checkpoint was written by strategy {state['strategy_name']!r} but this agent "
                f"uses {self.strategy.name!r}; build the agent with strategy="
                f"{state['strategy_name']!r}"
            )
        if int(state["num_tasks"]) != self.num_tasks:
            raise ValueError(
                f"checkpoint is for num_tasks={state['num_tasks']} but this agent has "
                f"num_tasks={self.num_tasks}"
            )
        self.strategy.load_state_dict(state["strategy"])
        self.current_task = state["current_task"]
        self.task_running = bool(state["task_running"])
        self.switch_log = [dict(e) for e in state["switch_log"]]
        self._load_extra_continual_state(state["extra"])


def check_num_tasks(num_tasks: int) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(
            f"num_tasks must be an integer >= 1 (the length of the task sequence), got "
            f"{num_tasks!r}; pass num_tasks=sequence.num_tasks"
        )
    return num_tasks


def check_batch_keys(strategy: Strategy, agent: str, keys: Iterable[str]) -> None:
    """Refuse a method that reads batch keys the agent's batches lack (EWC's empirical
    Fisher reads labels; RL batches have none), with the method's own fix."""
    have = {"obs", *keys}
    missing = {k: fix for k, fix in strategy.batch_keys_needed().items() if k not in have}
    if missing:
        key, fix = next(iter(sorted(missing.items())))
        raise ValueError(f"{strategy.name} reads batch[{key!r}], which {agent}'s batches do "
                         f"not have (keys: {', '.join(sorted(have))}); {fix}")


def build_strategy(
    strategy: Strategy | str,
    options: Mapping[str, Any] | None,
    num_tasks: int,
    seed: int | None,
) -> Strategy:
    """A strategy from a method name (+ options) or an instance used as given."""
    if isinstance(strategy, Strategy):
        if options:
            raise ValueError(
                "strategy_options apply only when strategy is a method name; got a "
                f"{type(strategy).__name__} instance and options {sorted(options)}: configure "
                "the instance directly"
            )
        if strategy.host is not None:
            raise ValueError(
                f"this {type(strategy).__name__} is already bound to another host; build a "
                "new strategy per agent"
            )
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(
            f"strategy must be a method name or a crl Strategy, got {type(strategy).__name__}"
        )
    opts = dict(options or {})
    opts.setdefault("num_tasks", num_tasks)
    opts.setdefault("seed", 0 if seed is None else int(seed))
    return make_strategy(strategy, **opts)


__all__ = [
    "SB3_REQUIREMENT",
    "ContinualAgent",
    "NonFiniteLossError",
    "build_strategy",
    "check_num_tasks",
    "check_sb3_version",
    "reset_optimizer_state",
]
