"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

Penalty: λ Σ_t Σ_i F_t,i (θ_i − θ*_t,i)², with NO 1/2 factor (docs/ARCHITECTURE.md,
"Host/strategy contract"; the paper writes λ/2, so λ here equals the paper's λ/2). F is the
diagonal Fisher of the host's output distribution on the finished task's data
(:func:`crl.strategies.importance.fisher_diagonal`).

- ``mode="separate"``: one (F_t, θ*_t) per finished task, all kept.
- ``mode="online"``: F ← γ F + F_new and a single anchor θ* (the latest parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crl.strategies.anchored import AnchoredPenalty, Tensors, Term, check_max_samples
from crl.strategies.base import snapshot
from crl.strategies.importance import FISHER_MODES, fisher_diagonal, task_seed

MODES = ("separate", "online")


class EWC(AnchoredPenalty):
    """EWC with a separate or an online (decayed) Fisher; see the module docstring.

    ``fisher``: "true" (exact expectation for Categorical, closed form for Gaussians),
    "sampled" (one ŷ ~ p(·|x) per sample, seeded by ``seed`` and the task index) or
    "empirical" (the *empirical* Fisher with data labels ``batch[target_key]``).
    ``max_samples`` caps the samples of ``importance_batches()`` used per task.
    """

    name = "ewc"
    option_choices = {"mode": MODES, "fisher": FISHER_MODES}  # noqa: RUF012 - read-only

    def __init__(
        self,
        lam: float = 1.0,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher: str = "true",
        max_samples: int | None = None,
        target_key: str = "y",
        seed: int = 0,
    ) -> None:
        super().__init__(lam)
        if mode not in MODES:
            raise ValueError(f"unknown EWC mode {mode!r}; choose one of: {', '.join(MODES)}")
        gamma = float(gamma)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(
                f"gamma (online EWC decay of the old Fisher) must be in (0, 1], got {gamma}"
            )
        if fisher not in FISHER_MODES:
            raise ValueError(
                f"unknown fisher mode {fisher!r}; choose one of: {', '.join(FISHER_MODES)}"
            )
        self.mode = mode
        self.gamma = gamma
        self.fisher = fisher
        self.max_samples = check_max_samples(max_samples)
        self.target_key = target_key
        self.seed = int(seed)
        #: separate: one entry per finished task; online: at most one (accumulated, latest).
        self.fishers: list[Tensors] = []
        self.anchors: list[Tensors] = []

    def batch_keys_needed(self) -> dict[str, str]:
        if self.fisher != "empirical":
            return {}
        return {self.target_key: "EWC's empirical Fisher reads its labels there: use "
                                 "--ewc-fisher true (CW's) or sampled, or name the label key "
                                 "with --ewc-target-key"}

    def terms(self) -> list[Term]:
        return list(zip(self.fishers, self.anchors, strict=True))

    def compute_fisher(self, task: int) -> Tensors:
        """The diagonal Fisher of the task that just ended, at the current parameters."""
        host = self._host()
        return fisher_diagonal(
            host,
            self.fisher,  # type: ignore[arg-type]
            max_samples=self.max_samples,
            target_key=self.target_key,
            seed=task_seed(self.seed, task),
        )

    def on_task_end(self, task: int) -> None:
        super().on_task_end(task)
        anchor = snapshot(self._protected())
        new = self.compute_fisher(task)
        if self.mode == "separate":
            self.fishers.append(new)
            self.anchors.append(anchor)
        else:
            if self.fishers:
                old = self.fishers[0]
                new = {n: self.gamma * old[n] + f for n, f in new.items()}
            self.fishers = [new]
            self.anchors = [anchor]
        self._rebuild()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            mode=self.mode,
            gamma=self.gamma,
            fisher=self.fisher,
            fishers=self.fishers,
            anchors=self.anchors,
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state["mode"] != self.mode:
            raise ValueError(
                f"checkpoint is {state['mode']!r} EWC but this strategy is {self.mode!r}; "
                f"build EWC(mode={state['mode']!r}) to load it"
            )
        self.gamma = float(state["gamma"])
        self.fisher = state["fisher"]
        self.fishers = [dict(f) for f in state["fishers"]]
        self.anchors = [dict(a) for a in state["anchors"]]
        self._rebuild()
