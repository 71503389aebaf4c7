"""L2 Init: regularisation towards the *initial* parameters (Kumar et al. 2023, "Maintaining
Plasticity in Continual Learning via Regenerative Regularization"): λ Σ_i (θ_i − θ⁰_i)² over
the protected parameters, no 1/2 factor (:mod:`crl.strategies.anchored`), from the first
update on. Unlike L2 towards the previous task, the anchor never moves: it keeps the weights
near a point that was trainable, against the growth of weights and loss of plasticity, and
forgets as finetune would on its own."""

from __future__ import annotations

from crl.strategies.anchored import SingleAnchor


class L2Init(SingleAnchor):
    """λ Σ (θ − θ⁰)², θ⁰ = the protected parameters when the first task starts."""

    name = "l2init"

    def __init__(self, lam: float = 0.01) -> None:
        super().__init__(lam)

    def on_task_start(self, task: int) -> None:
        super().on_task_start(task)
        if self.anchor is None:
            self._set_anchor()
