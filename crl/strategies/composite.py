"""Several methods at once, e.g. ``ewc+redo``: a continual-learning method with a plasticity
intervention, or any other combination, as one strategy with one checkpoint state.

Hooks run in the order the methods are named, except around weight rewrites: members that
rewrite weights (``rewrites_weights``: Shrink & Perturb, ReDo, CBP) run first at a task start
and last after each optimiser step, so that the others (SI's path integral, an anchor taken
at the start) see the rewrite as the new starting point and not as movement by training.
Penalties add up; ``evaluation`` nests every member's context. The host-facing flags hold if
any member's does (a joint update, stored transitions, kept experience, head exploration).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.distributions import Distribution

from crl.strategies.base import Batch, Host, Strategy


class Composite(Strategy):
    """Members' hooks in order; ``name`` is their names joined by ``+``."""

    def __init__(self, members: Sequence[Strategy]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("a combined method needs at least two methods, e.g. ewc+redo")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"a method appears twice in {'+'.join(names)}; name each once")
        rewrites = [m.name for m in members if m.rewrites_weights]
        if "packnet" in names and rewrites:
            raise ValueError(
                f"packnet cannot be combined with {', '.join(rewrites)}: PackNet keeps each "
                "finished task's weights frozen and these interventions rewrite weights; use "
                "l2init with packnet, or an intervention with another method")
        self.members = list(members)
        self.rewrites_weights = bool(rewrites)
        first = [m for m in members if m.rewrites_weights]
        rest = [m for m in members if not m.rewrites_weights]
        self._start_order = first + rest  # rewrites, then the others see the result
        self._step_order = rest + first
        self.name = "+".join(names)
        self.needs_joint_update = any(m.needs_joint_update for m in members)
        self.learns_from_stored_transitions = any(
            m.learns_from_stored_transitions for m in members)
        self.keeps_experience = any(m.keeps_experience for m in members)
        self.penalty_is_host_loss = any(m.penalty_is_host_loss for m in members)
        self.explores_with_heads = any(m.explores_with_heads for m in members)

    def bind(self, host: Host) -> Composite:
        super().bind(host)
        for i, m in enumerate(self.members):
            m.bind(host)
            if any(type(later).before_optimizer_step is not Strategy.before_optimizer_step
                   for later in self.members[i + 1:]):  # may edit .grad after m's hook
                m.sees_final_gradient = False
        return self

    def on_task_start(self, task: int) -> None:
        super().on_task_start(task)
        for m in self._start_order:
            m.on_task_start(task)

    def penalty(self, batch: Batch | None = None,
                outputs: Distribution | None = None) -> torch.Tensor | None:
        terms = [p for p in (m.penalty(batch, outputs) for m in self.members) if p is not None]
        if not terms:
            return None
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    @property  # type: ignore[override]
    def exploration_head(self) -> int | None:
        """The first member's choice (only ``bc`` with ClonEx exploration makes one)."""
        return next((m.exploration_head for m in self.members
                     if m.exploration_head is not None), None)

    def replay_batch(self, n: int, fresh: int, *, appended: bool = False) -> Batch | None:
        """The first member's stored samples (one replaying member per combination: a method
        name appears once, and only replay's buffer mode mixes samples in)."""
        for m in self.members:
            extra = m.replay_batch(n, fresh, appended=appended)
            if extra is not None:
                return extra
        return None

    def diagnostics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.members:
            out.update(m.diagnostics())
        return out

    def batch_keys_needed(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for m in self.members:
            out |= m.batch_keys_needed()
        return out

    def run_summary(self) -> dict[str, Any]:
        return {m.name: summary for m in self.members if (summary := m.run_summary())}

    def before_optimizer_step(self) -> None:
        for m in self.members:
            m.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        for m in self._step_order:
            m.after_optimizer_step()

    def on_task_end(self, task: int) -> None:
        super().on_task_end(task)
        for m in self.members:
            m.on_task_end(task)

    @contextlib.contextmanager
    def evaluation(self, task: int) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.evaluation(task))
            yield

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["members"] = {m.name: m.state_dict() for m in self.members}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state["members"])
        if saved != [m.name for m in self.members]:
            raise ValueError(f"the checkpoint holds methods {'+'.join(saved)}, this strategy "
                             f"is {self.name}; build it with the same methods in that order")
        super().load_state_dict(state)
        for m in self.members:
            m.load_state_dict(state["members"][m.name])
