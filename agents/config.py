"""A continual RL run's configuration: :class:`RunConfig` (saved verbatim as the run's
config.yaml), its checks, the run's task sequence and the command line that reproduces its
reference runs. Imports nothing of the agents: the factory and the loop build on it."""


from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from agents.evaluation import (
    json_ready,
)
from crl.config import check_seed
from crl.plasticity import check_settings as check_plasticity
from crl.strategies import check_method

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
    plasticity: bool = True
    plasticity_tau: float = 0.025
    plasticity_probe: int = 256

    def __post_init__(self) -> None:
        self.agent = str(self.agent).strip().lower()
        if self.agent not in AGENTS:
            raise ConfigError(f"unknown agent {self.agent!r}; choose one of: {', '.join(AGENTS)}")
        try:  # unknown methods fail before any work is done
            self.method = check_method(str(self.method))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
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
        try:
            check_plasticity(float(self.plasticity_tau), 0.01, self.plasticity_probe)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{exc}; set --plasticity-tau / --plasticity-probe") from None
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


def resolve_sequence(config: RunConfig) -> TaskSequence:
    """The run's sequence, with the step budget override applied."""
    from envs.registry import get_sequence

    overrides: dict[str, Any] = {}
    if config.steps_per_task is not None:
        overrides["steps_per_task"] = config.steps_per_task
    if config.cycles is not None:
        overrides["cycles"] = config.cycles
    return get_sequence(config.sequence, **overrides)


def config_fields(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The RunConfig fields of a resolved config (config.yaml holds more)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in saved.items() if k in names}


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
