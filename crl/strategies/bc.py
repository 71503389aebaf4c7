"""Behavioural cloning of earlier tasks' policies (Wołczyk et al. 2022, "Disentangling
Transfer in Continual Reinforcement Learning", ClonEx-SAC's regulariser): at each task end
the strategy stores states of that task with the policy's output distribution on them, and
every later update adds λ · KL(stored policy ‖ current policy) on a memory batch.

It is replay's distillation mode (:class:`crl.strategies.replay.Replay`, ``mode="distill"``,
on the distillation core of :mod:`crl.strategies.distill`) with ClonEx's memory: an equal
share per finished task. For SAC the distribution is the actor's pre-squash Gaussian, as in
ClonEx-SAC; for PPO the categorical or Gaussian policy (PPO's ``replay`` is the same code).
"""

from __future__ import annotations

from crl.strategies.replay import Replay


class BC(Replay):
    """λ · KL(old policy ‖ policy) on stored states of the finished tasks."""

    name = "bc"

    def __init__(self, memory_size: int = 10_000, batch_size: int = 128, lam: float = 1.0,
                 task_balanced: bool = True, seed: int = 0) -> None:
        super().__init__(memory_size=memory_size, batch_size=batch_size,
                         task_balanced=task_balanced, mode="distill", lam=lam, seed=seed)

    @property
    def penalty_label(self) -> str:
        return "bc_kl"
