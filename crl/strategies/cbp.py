"""Continual Backprop (Dohare et al. 2024, "Loss of plasticity in deep continual learning",
Nature; Dohare et al. 2021): keep replacing the least useful mature units with fresh ones.

Per unit i of every unit layer (:mod:`crl.strategies.units`): age a_i (updates since its last
reset) and contribution utility u_i ← η u_i + (1 − η) E|h_i| Σ_k |w_ki| (its mean activity
times the magnitude of its outgoing weights), bias-corrected as u_i / (1 − η^{a_i}). After
every update each layer adds ρ x (number of units older than the maturity threshold m) to a
replacement budget; while the budget holds a whole unit, the mature unit of lowest utility is
replaced (fresh incoming weights, zero outgoing weights, their optimiser moments zeroed,
utility and age 0). The paper's AdamGnT also restarts a per-weight step count, so Adam's bias
correction treats a replaced weight as new; torch's Adam counts steps per tensor, so here
the first updates of a replaced weight are larger than a fresh Adam's (zeroed moments under
a bias correction of ~1: about 3x for β = (0.9, 0.999)). The paper's
defaults: ρ = 1e-4, m = 100, η = 0.99. Not done here: the paper's mean-corrected variant,
which also moves the replaced unit's mean contribution into the next layer's bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from crl.strategies.base import Host, Strategy
from crl.strategies.units import UnitTracker, host_optimizers, unit_seed


class CBP(Strategy):
    """Continual Backprop's selective reinitialisation (Dohare et al. 2024)."""

    name = "cbp"
    rewrites_weights = True

    def __init__(self, rate: float = 1e-4, maturity: int = 100, decay: float = 0.99,
                 seed: int = 0) -> None:
        super().__init__()
        if not (math.isfinite(rate) and 0 <= rate <= 1):
            raise ValueError(f"cbp rate (units replaced per mature unit per update) must be in "
                             f"[0, 1] (Dohare et al.: 1e-4), got {rate}")
        if isinstance(maturity, bool) or int(maturity) != maturity or maturity < 0:
            raise ValueError(f"cbp maturity must be an integer >= 0 updates, got {maturity!r}")
        if not (math.isfinite(decay) and 0 <= decay < 1):
            raise ValueError(f"cbp decay must be in [0, 1) (Dohare et al.: 0.99), got {decay}")
        self.rate, self.maturity, self.decay = float(rate), int(maturity), float(decay)
        self.seed = int(seed)
        self.updates = 0
        self.replaced = 0
        self.age: dict[str, torch.Tensor] = {}
        self.utility: dict[str, torch.Tensor] = {}
        self.budget: dict[str, float] = {}
        self.tracker = UnitTracker()

    def bind(self, host: Host) -> CBP:
        super().bind(host)
        self.tracker.attach(host.module)
        return self

    def _outgoing(self, name: str) -> torch.Tensor:
        """Σ_k |w_ki| over every consumer of the layer (per unit i)."""
        total = torch.zeros(self.tracker.layers[name].width)
        for p in self.tracker.outgoing(name):
            dims = [d for d in range(p.dim()) if d != 1]
            total = total + p.detach().abs().sum(dim=dims).to(total)
        return total

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.updates += 1
        if not self.tracker.ready:
            return
        for name, activity in self.tracker.take().items():
            if not self.tracker.recyclable(name):
                continue
            width = activity.numel()
            age = self.age.setdefault(name, torch.zeros(width, dtype=torch.long))
            util = self.utility.setdefault(name, torch.zeros(width))
            age += 1
            util.mul_(self.decay).add_((1 - self.decay) * activity.cpu() * self._outgoing(name))
            mature = (age > self.maturity).nonzero().flatten()
            self.budget[name] = self.budget.get(name, 0.0) + self.rate * mature.numel()
            n = min(int(self.budget[name]), mature.numel())
            if n < 1:
                continue
            self.budget[name] -= n
            corrected = util[mature] / (1 - self.decay ** age[mature].double()).float()
            chosen = mature[torch.argsort(corrected)[:n]]
            self.tracker.recycle(name, chosen, unit_seed(self.seed, self.updates, name),
                                 host_optimizers(self._host()))
            age[chosen] = 0
            util[chosen] = 0.0
            self.replaced += n

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(updates=self.updates, replaced=self.replaced, age=dict(self.age),
                     utility=dict(self.utility), budget=dict(self.budget),
                     units=self.tracker.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.updates = int(state["updates"])
        self.replaced = int(state["replaced"])
        self.age = {k: v.clone() for k, v in state["age"].items()}
        self.utility = {k: v.clone() for k, v in state["utility"].items()}
        self.budget = {k: float(v) for k, v in state["budget"].items()}
        self.tracker.load_state_dict(state["units"])
