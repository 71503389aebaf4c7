"""Memory Aware Synapses (Aljundi et al. 2018).

Ω = mean over the finished task's inputs of |∂ ‖f(x)‖² / ∂θ| (per-sample absolute values,
:func:`crl.strategies.importance.mas_importance`), accumulated over tasks (Ω ← Ω + Ω_new,
as in the paper), with one anchor θ* (the latest parameters). Penalty λ Σ Ω (θ − θ*)², with
NO 1/2 factor, the same convention as L2 and EWC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crl.strategies.anchored import AnchoredPenalty, Tensors, Term, check_max_samples
from crl.strategies.base import snapshot
from crl.strategies.importance import mas_importance


class MAS(AnchoredPenalty):
    """MAS; ``max_samples`` caps the samples of ``importance_batches()`` used per task.

    ``seed`` is accepted so one config serves every method; MAS importance is deterministic
    and does not draw random numbers.
    """

    name = "mas"

    def __init__(self, lam: float = 1.0, max_samples: int | None = None, seed: int = 0) -> None:
        super().__init__(lam)
        self.max_samples = check_max_samples(max_samples)
        self.seed = int(seed)
        self.omega: Tensors | None = None
        self.anchor: Tensors | None = None

    def terms(self) -> list[Term]:
        if self.omega is None or self.anchor is None:
            return []
        return [(self.omega, self.anchor)]

    def compute_importance(self) -> Tensors:
        """Ω of the task that just ended, at the current parameters."""
        return mas_importance(self._host(), max_samples=self.max_samples)

    def on_task_end(self, task: int) -> None:
        super().on_task_end(task)
        anchor = snapshot(self._protected())
        new = self.compute_importance()
        if self.omega is not None:
            new = {n: self.omega[n] + w for n, w in new.items()}
        self.omega, self.anchor = new, anchor
        self._rebuild()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(omega=self.omega, anchor=self.anchor)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.omega = None if state["omega"] is None else dict(state["omega"])
        self.anchor = None if state["anchor"] is None else dict(state["anchor"])
        self._rebuild()
