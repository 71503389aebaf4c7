"""ReDo: recycle dormant units (Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep
Reinforcement Learning", Algorithm 1).

Every ``every`` updates, each unit whose activity score s_i = E|h_i| / mean_j E|h_j| is at
most ``tau`` is recycled: its incoming weights are drawn afresh from the layer's initialiser
and its outgoing weights set to zero, so the network computes the same function right after
and the unit can learn again. Activity is averaged over the host's training forward passes
since the last check (the paper scores the current batch). Units of every trained network
are recycled (SAC: actor and critics; PPO: policy and value nets; a classifier's trunk);
units whose outgoing weights cannot be found are left alone (:mod:`crl.strategies.units`).
The recycled weights' optimiser state (Adam's moments) is zeroed as in the paper, through
the host's optional ``optimizers()``; Adam's step count is per tensor and stays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from crl.strategies.base import Host, Strategy
from crl.strategies.units import UnitTracker, host_optimizers, unit_seed


class ReDo(Strategy):
    """Recycle τ-dormant units every ``every`` optimiser steps (Sokar et al. 2023); SAC
    counts its actor and critic steps apart, as the hooks run around each."""

    name = "redo"
    rewrites_weights = True

    def __init__(self, tau: float = 0.025, every: int = 1000, seed: int = 0) -> None:
        super().__init__()
        if not (math.isfinite(tau) and 0 <= tau < 1):
            raise ValueError(f"redo tau must be in [0, 1) (Sokar et al.: 0.025 to 0.1), got {tau}")
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise ValueError(f"redo every must be a positive number of updates, got {every!r}")
        self.tau = float(tau)
        self.every = int(every)
        self.seed = int(seed)
        self.updates = 0
        self.recycled = 0
        self.tracker = UnitTracker()

    def bind(self, host: Host) -> ReDo:
        super().bind(host)
        self.tracker.attach(host.module)
        return self

    def after_optimizer_step(self) -> None:
        self.updates += 1
        if self.updates % self.every or not self.tracker.ready:
            return
        for name, activity in self.tracker.take().items():
            if not self.tracker.recyclable(name):
                continue
            mean = activity.mean()
            score = activity / mean if float(mean) > 0 else activity * 0
            dormant = (score <= self.tau).nonzero().flatten()
            seed = unit_seed(self.seed, self.updates, name)
            self.recycled += self.tracker.recycle(name, dormant, seed,
                                                  host_optimizers(self._host()))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(updates=self.updates, recycled=self.recycled,
                     units=self.tracker.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.updates = int(state["updates"])
        self.recycled = int(state["recycled"])
        self.tracker.load_state_dict(state["units"])
