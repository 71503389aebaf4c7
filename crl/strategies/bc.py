"""Behavioural cloning of earlier tasks' policies (Wołczyk et al. 2022, "Disentangling
Transfer in Continual Reinforcement Learning", ClonEx-SAC's regulariser): at each task end
the strategy stores states of that task with the policy's output distribution on them, and
every later update adds λ · KL(stored policy ‖ current policy) on a memory batch.

It is replay's distillation mode (:class:`crl.strategies.replay.Replay`, ``mode="distill"``,
on the distillation core of :mod:`crl.strategies.distill`) with ClonEx's memory: an equal
share per finished task. For SAC the distribution is the actor's pre-squash Gaussian, as in
ClonEx-SAC; for PPO the categorical or Gaussian policy (PPO's ``replay`` is the same code).

λ = 1 for both agents is ClonEx-SAC's ``policy_reg_coef`` default, not calibrated here
(``scripts/sweeps/mujocomix-sac-bc-calibration.yaml`` holds the grid). ClonEx averages
KL(current ‖ stored) over action dimensions; the distillation core sums KL(stored ‖
current) over them (the KL of the joint distribution, the direction every distilling
method here uses), so on an A-dimensional action space λ = 1 weighs A times ClonEx's.

``clonex=True`` adds ClonEx's exploration (the paper's "best return" choice): when a task
starts, every finished task's policy head acts on the new task for ``clonex_episodes``
episodes (deterministic actions, the same episode seeds for every head), and the head with
the highest mean return collects the task's exploration steps instead of uniform random
actions (SAC's warm-up; ``host.head_returns`` runs the episodes).

``clonex_random=True`` (not in the paper) adds uniform random actions to the candidates,
playing the same episodes: where every earlier head does worse on the new task than random
actions (tasks from unrelated environments: on MujocoMix 18 of ClonEx's 20 choices were
below random), the warm-up stays SAC's own. Ties go to a head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crl.strategies.base import Host
from crl.strategies.memory import check_positive_int
from crl.strategies.replay import Replay


class BC(Replay):
    """λ · KL(old policy ‖ policy) on stored states of the finished tasks; optionally
    ClonEx's exploration with the best earlier head."""

    name = "bc"

    def __init__(self, memory_size: int = 10_000, batch_size: int = 128, lam: float = 1.0,
                 task_balanced: bool = True, clonex: bool = False, clonex_episodes: int = 5,
                 clonex_random: bool = False, seed: int = 0) -> None:
        super().__init__(memory_size=memory_size, batch_size=batch_size,
                         task_balanced=task_balanced, mode="distill", lam=lam, seed=seed)
        for name, flag in (("clonex", clonex), ("clonex_random", clonex_random)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        self.clonex = clonex
        self.clonex_random = clonex_random
        self.explores_with_heads = clonex
        self.clonex_episodes = check_positive_int("clonex_episodes", clonex_episodes)
        self.exploration_head: int | None = None
        #: per task start: {"task", "returns" {head or "random": mean return}, "head"} (the
        #: choices made; "head" is "random" where uniform random actions won)
        self.clonex_choices: list[dict[str, Any]] = []

    @property
    def penalty_label(self) -> str:
        return "bc_kl"

    def bind(self, host: Host) -> BC:
        if self.clonex and not callable(getattr(host, "head_returns", None)):
            raise ValueError(
                f"bc's ClonEx exploration (clonex=True) explores a new task with the best "
                f"earlier policy head, which needs an RL agent with an exploration phase that "
                f"can play a head's episodes; {type(host).__name__} has none. ClonEx exists "
                "for SAC (crl train --agent sac); elsewhere use bc without clonex"
            )
        super().bind(host)
        return self

    def on_task_start(self, task: int) -> None:
        super().on_task_start(task)
        self.exploration_head = None
        heads = sorted(self.memory.counts())  # the finished tasks (a cycle may revisit one)
        if not self.clonex or not heads:
            return
        candidates: list[int | None] = [*heads, None] if self.clonex_random else list(heads)
        returns = self._host().head_returns(candidates, self.clonex_episodes)  # type: ignore[attr-defined]
        best = max(range(len(candidates)), key=lambda i: (returns[i], -i))  # ties: earliest
        self.exploration_head = candidates[best]  # None: the warm-up's own random actions
        self.clonex_choices.append({"task": int(task), "head": _label(candidates[best]),
                                    "returns": {_label(c): float(r)
                                                for c, r in zip(candidates, returns,
                                                                strict=True)}})

    def unused_options(self) -> dict[str, str]:
        if self.clonex:
            return super().unused_options()
        return super().unused_options() | {
            "clonex_episodes": "it sets how many episodes ClonEx's exploration plays per "
                               "head, and ClonEx is off (add --bc-clonex)",
            "clonex_random": "it adds random actions to ClonEx's candidates, and ClonEx is "
                             "off (add --bc-clonex)"}

    def diagnostics(self) -> dict[str, float]:
        out = super().diagnostics()
        if self.exploration_head is not None:
            out["clonex_head"] = float(self.exploration_head)
        return out

    def run_summary(self) -> dict[str, Any]:
        if not self.clonex:
            return super().run_summary()
        return super().run_summary() | {"clonex_choices": list(self.clonex_choices)}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"clonex": self.clonex,
                                       "exploration_head": self.exploration_head,
                                       "clonex_choices": list(self.clonex_choices)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if bool(state.get("clonex", False)) != self.clonex:
            raise ValueError(
                f"the checkpoint's bc ran with clonex={state.get('clonex', False)} but this "
                f"one has clonex={self.clonex}; construct it with the checkpoint's option"
            )
        super().load_state_dict(state)
        self.exploration_head = state.get("exploration_head")
        self.clonex_choices = list(state.get("clonex_choices", []))


def _label(candidate: int | None) -> int | str:
    """A ClonEx candidate as results.json names it: the head's task, or "random"."""
    return "random" if candidate is None else int(candidate)
