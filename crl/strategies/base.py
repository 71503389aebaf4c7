"""The strategy contract shared by the supervised trainer and the continual SB3 agents.

A strategy never knows whether it protects a classifier or a policy. The host hands it a
:class:`Host` adapter and calls the hooks of :class:`Strategy` in this order
(docs/ARCHITECTURE.md, "Host/strategy contract"):

``on_task_start`` -> per update: ``replay_batch`` (stored samples mixed into the batch),
``penalty(batch)`` (added to the loss; ``batch`` is the
batch the host trains on in that update), backward, ``before_optimizer_step`` (edits
``.grad``), optimiser step, ``after_optimizer_step`` -> ``on_task_end``;
``evaluation(task)`` wraps every evaluation of a task. Hosts log ``diagnostics()`` with
their own training metrics (under ``train/``).

Batches are mappings of tensors that share their leading (batch) dimension, e.g.
``{"x": ..., "y": ..., "task": ...}`` for a classifier or an SB3 replay sample turned into a
dict for SAC. Strategies store and index them without knowing the keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]


@runtime_checkable
class Host(Protocol):
    """What a host (trainer or agent) exposes to a strategy.

    ``module`` owns every protected parameter; the names returned by
    :meth:`protected_parameters` are its ``named_parameters()`` names, which lets strategies
    call the host functionally (``torch.func``) for per-sample gradients.

    Optional: ``distribution_values(values)`` maps stored targets (labels, actions) into
    :meth:`output_distribution`'s value space where the host transforms its outputs (SAC's
    tanh squash); EWC's empirical Fisher applies it to its labels.

    Optional: ``optimizers()`` lists the optimisers stepping the module now; methods that
    re-initialise weights (ReDo, Continual Backprop) clear those weights' moments there.
    """

    module: nn.Module

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        """The shared trunk the method protects (per-task heads excluded)."""
        ...

    def trained_parameters(self) -> list[nn.Parameter]:
        """Everything the host's optimisers update (A-GEM projects all of it)."""
        ...

    def importance_batches(self) -> Iterable[Batch]:
        """Batches of the task just finished (its training data / replay buffer / rollouts)."""
        ...

    def output_distribution(self, batch: Batch) -> torch.distributions.Distribution:
        """The model's output distribution; must be built with ``validate_args=False`` and
        pure tensor ops so that it can run under ``torch.func.vmap``."""
        ...

    def loss(self, batch: Batch) -> torch.Tensor:
        """The host's training loss on a batch (scalar)."""
        ...


def check_used_options(strategy: Strategy, given: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse user options (``{method: {option: value}}``) that the built method (or a
    combination's member) would ignore, naming their flags."""
    members = getattr(strategy, "members", [strategy])
    for m in members:
        unused = m.unused_options()
        bad = sorted(k for k in (given.get(m.name) or {}) if k in unused)
        if bad:
            flags = ", ".join(f"--{m.name}-{k.replace('_', '-')}" for k in bad)
            raise ValueError(f"{flags} would do nothing: {unused[bad[0]]}; drop "
                             f"{'it' if len(bad) == 1 else 'them'}")


def experience_batches(host: Host) -> Iterable[Batch]:
    """Every training sample of the task just finished (its training set, or all of its
    transitions in the replay buffer), for methods that keep the data itself. Hosts that
    hold their task's data expose it as ``host.experience_batches()``; an on-policy host
    keeps no data and has none."""
    method = getattr(host, "experience_batches", None)
    if method is None:
        raise TypeError(
            f"{type(host).__name__} keeps no training samples of a finished task "
            "(experience_batches); a method that stores the task's data needs a host that "
            "trains on stored data (the supervised trainer, SAC)"
        )
    return method()


class Strategy:
    """Base class: every hook is a no-op, so the base class is the finetune baseline.

    Subclasses override only the hooks they need. ``task`` passed to the hooks is the
    0-based index of the task in the sequence.
    """

    name: str = "finetune"
    #: Constructor options that take one of a fixed set of words: the CLI offers them as
    #: choices (``--replay-mode [rehearsal|distill|buffer|balanced]``) and rejects others up front.
    option_choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Whether a host with several optimisers (SAC: actor, critic) must compute every
    #: gradient before any step and call ``before_optimizer_step`` once over all of them
    #: (A-GEM projects actor and critic together, as in CW). Otherwise a host may step its
    #: optimisers one after another (SB3's order), calling the step hooks around each.
    needs_joint_update: bool = False
    #: Whether the method trains on stored transitions of earlier tasks (rehearsal, a kept
    #: replay buffer): an on-policy host (PPO) refuses such a method.
    learns_from_stored_transitions: bool = False
    #: Whether :meth:`penalty` is the host's whole training loss on stored samples (replay's
    #: rehearsal): a host whose optimisers step one loss each (SAC: critic, actor) cannot
    #: route such a penalty, and refuses it.
    penalty_is_host_loss: bool = False
    #: Whether the method rewrites weights outside the optimiser step (Shrink & Perturb at
    #: task starts, ReDo and CBP after steps): combined methods see those rewrites as a
    #: new starting point, not as training (composite.Composite orders the hooks so).
    rewrites_weights: bool = False
    #: An earlier task whose policy head an RL host explores with during a task's
    #: exploration steps (ClonEx's exploration; set at ``on_task_start``). None: the host's
    #: own exploration (uniform random actions for SAC, as Continual World).
    exploration_head: int | None = None
    #: Options an on-policy host (PPO) builds the method with unless the user gives them
    #: (replay: distillation, the replay an on-policy learner can use).
    on_policy_options: dict[str, Any] = {}  # noqa: RUF012 - read-only class default

    #: Set at :meth:`bind`: whether ``.grad`` in this strategy's ``before_optimizer_step`` is
    #: the gradient the optimiser steps with (nothing edits it between that hook and
    #: ``after_optimizer_step``). A host declares it with ``gradients_final_before_step``
    #: (the supervised trainer; not PPO, which clips after the hook, nor SAC, whose actor
    #: backward runs between the critic step's hooks); a combination clears it for members
    #: followed by another member's ``before_optimizer_step``. SI uses it to skip a copy.
    sees_final_gradient: bool = False

    @property
    def penalty_label(self) -> str:
        """The log name of :meth:`penalty`'s value (hosts log it as ``train/<label>``)."""
        return f"{self.name}_penalty"

    def __init__(self) -> None:
        self.host: Host | None = None
        self.current_task: int | None = None
        self.tasks_seen: int = 0

    # -- wiring ----------------------------------------------------------------------------
    def bind(self, host: Host) -> Strategy:
        """Attach the host adapter; called once before the first task."""
        self.host = host
        self.sees_final_gradient = bool(getattr(host, "gradients_final_before_step", False))
        return self

    def _host(self) -> Host:
        if self.host is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound to a host: call strategy.bind(host) "
                "before the first task"
            )
        return self.host

    # -- hooks -----------------------------------------------------------------------------
    def on_task_start(self, task: int) -> None:
        self.current_task = task

    def penalty(self, batch: Batch | None = None,
                outputs: torch.distributions.Distribution | None = None
                ) -> torch.Tensor | None:
        """Extra loss for this update; ``None`` means nothing to add. ``batch``: the batch the
        host trains on (None where a host calls without one); ``outputs``: the model's output
        distribution on it as the host computed it for its own loss, graph attached (None:
        a strategy that needs it calls ``host.output_distribution(batch)``)."""
        return None

    def replay_batch(self, n: int, fresh: int, *, appended: bool = False) -> Batch | None:
        """Stored samples of earlier tasks the host mixes into its next training batch (the
        host's loss and every hook then see the mixed batch). ``fresh``: how many samples the
        host's own data holds, so that a method can draw uniformly over everything seen
        (Continual World's perfect memory). ``appended=False``: of a batch of ``n``, the
        host draws as many fewer of its own (SAC); ``appended=True``: the host trains on
        ``n`` of its own plus these (the supervised trainer, whose epochs cover its own
        data). ``None``: train on the host's own data only."""
        return None

    #: Whether the method keeps every sample of the finished tasks and hands them back
    #: through :meth:`replay_batch` (replay's perfect memory): a host must not keep those
    #: tasks in its own buffer too (they would count twice).
    keeps_experience: bool = False
    #: Whether the method explores a new task with earlier tasks' policy heads (ClonEx): it
    #: needs a host with an exploration phase (SAC's warm-up; PPO has none).
    explores_with_heads: bool = False

    def unused_options(self) -> dict[str, str]:
        """Constructor options this configuration of the method never reads, each with why:
        a user who sets one is told instead of getting a run where it does nothing."""
        return {}

    def diagnostics(self) -> dict[str, float]:
        """The strategy's own numbers for the training log (e.g. A-GEM's projection rate),
        read by the hosts when they log; keys are prefixed with ``train/``."""
        return {}

    def batch_keys_needed(self) -> dict[str, str]:
        """Keys the method reads from the host's batches beyond the model's inputs (EWC's
        empirical Fisher: the labels), each with what to do where a host's batches lack it:
        such a host refuses the method before the run."""
        return {}

    def run_summary(self) -> dict[str, Any]:
        """What the run's ``results.json`` keeps of the method's own decisions (JSON
        values; e.g. ClonEx's head per task and the returns it chose by), read once when
        the run ends: the log has them only as a time series."""
        return {}

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def on_task_end(self, task: int) -> None:
        self.tasks_seen = max(self.tasks_seen, task + 1)

    @contextlib.contextmanager
    def evaluation(self, task: int) -> Iterator[None]:
        yield

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers, strings, lists and dicts only (loadable with weights_only)."""
        return {"current_task": self.current_task, "tasks_seen": self.tasks_seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current_task = state["current_task"]
        self.tasks_seen = int(state["tasks_seen"])


def snapshot(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Detached copies of parameters (anchors θ*)."""
    return {n: p.detach().clone() for n, p in params.items()}
