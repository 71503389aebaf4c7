"""L2 regularisation towards the previous task's parameters (w = 1 in the anchored penalty of
:mod:`crl.strategies.anchored`, λ Σ_i (θ_i − θ*_i)², no 1/2 factor)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crl.strategies.anchored import AnchoredPenalty, Tensors, Term
from crl.strategies.base import snapshot


class L2(AnchoredPenalty):
    """L2 towards the parameters at the end of the previous task: λ Σ (θ − θ*)² (no 1/2).

    A uniform-importance baseline for EWC/MAS (as in Continual World).
    """

    name = "l2"

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__(lam)
        self.anchor: Tensors | None = None

    def terms(self) -> list[Term]:
        return [] if self.anchor is None else [(None, self.anchor)]

    def on_task_end(self, task: int) -> None:
        super().on_task_end(task)
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
