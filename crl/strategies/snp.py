"""Shrink & Perturb (Ash & Adams 2020, "On Warm-Starting Neural Network Training"): at the
start of every task after the first, θ ← λ θ + σ ε with ε ~ N(0, 1) per weight, over the
protected parameters. Shrinking keeps what was learnt in direction while reducing the
weights' magnitude; the noise restores the gradient diversity a fresh network has. Ash & Adams
shrink by 0.4 to 0.6 with noise 0.01 for warm-started supervised training; between tasks of
a continual sequence we default to a gentler λ = 0.8, σ = 0.01 (uncalibrated)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from crl.strategies.base import Strategy


class ShrinkPerturb(Strategy):
    """θ ← shrink·θ + noise·ε at each task start after the first (Ash & Adams 2020)."""

    name = "snp"
    rewrites_weights = True

    def __init__(self, shrink: float = 0.8, noise: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        if not (math.isfinite(shrink) and 0 < shrink <= 1):
            raise ValueError(f"snp shrink must be in (0, 1] (1: no shrinking), got {shrink}")
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"snp noise must be a number >= 0 (0: no perturbation), got {noise}")
        self.shrink, self.noise, self.seed = float(shrink), float(noise), int(seed)
        #: task starts so far (a sequence with --cycles revisits task indices)
        self.starts = 0

    @torch.no_grad()
    def on_task_start(self, task: int) -> None:
        super().on_task_start(task)
        self.starts += 1
        if self.starts == 1:
            return
        state = np.random.SeedSequence([self.seed, self.starts]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(state))
        for p in self._host().protected_parameters().values():
            eps = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            p.mul_(self.shrink).add_(eps, alpha=self.noise)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["starts"] = self.starts
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.starts = int(state["starts"])
