"""L2 regularisation towards the previous task's parameters (w = 1 in the anchored penalty of
:mod:`crl.strategies.anchored`, λ Σ_i (θ_i − θ*_i)², no 1/2 factor)."""

from __future__ import annotations

from crl.strategies.anchored import SingleAnchor


class L2(SingleAnchor):
    """L2 towards the parameters at the end of the previous task: λ Σ (θ − θ*)² (no 1/2).

    A uniform-importance baseline for EWC/MAS (as in Continual World).
    """

    name = "l2"

    def on_task_end(self, task: int) -> None:
        super().on_task_end(task)
        self._set_anchor()
