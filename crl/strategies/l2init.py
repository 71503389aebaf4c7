"""L2 Init: regularisation towards the *initial* parameters (Kumar et al. 2023, "Maintaining
Plasticity in Continual Learning via Regenerative Regularization"): λ Σ_i (θ_i − θ⁰_i)² over
the protected parameters, no 1/2 factor (:mod:`crl.strategies.anchored`), from the first
update on. Unlike L2 towards the previous task, the anchor never moves: it keeps the weights
near a point that was trainable, against the growth of weights and loss of plasticity, and
forgets as finetune would on its own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crl.strategies.anchored import AnchoredPenalty, Tensors, Term
from crl.strategies.base import snapshot


class L2Init(AnchoredPenalty):
    """λ Σ (θ − θ⁰)², θ⁰ = the protected parameters when the first task starts."""

    name = "l2init"

    def __init__(self, lam: float = 0.01) -> None:
        super().__init__(lam)
        self.anchor: Tensors | None = None

    def terms(self) -> list[Term]:
        return [] if self.anchor is None else [(None, self.anchor)]

    def on_task_start(self, task: int) -> None:
        super().on_task_start(task)
        if self.anchor is None:
            self.anchor = snapshot(self._protected())
            self._rebuild()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["anchor"] = self.anchor
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.anchor = None if state["anchor"] is None else dict(state["anchor"])
        self._rebuild()
