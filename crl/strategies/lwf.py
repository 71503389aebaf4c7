"""Learning without Forgetting (Li & Hoiem 2016, "Learning without Forgetting"): keep the
outputs the previous model gives on the *current* task's inputs.

At each task end the strategy keeps a copy of the model's parameters. Every later update adds
λ · KL(old(x) ‖ new(x)) on the batch being trained, with categorical logits softened by the
temperature T (LwF: T = 2, KL scaled by T²; :func:`crl.strategies.distill.kl_to`). With one
output head per task (a host whose ``multi_head`` is true and that offers ``with_task(batch,
task)``, as the supervised classifier does) the outputs of every earlier task's head are
distilled, as in the paper; with one shared head, the shared output. The old model is run
functionally on the host's own module (``torch.func.functional_call``) with the stored
parameters, so no second model is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution
from torch.func import functional_call

from crl.strategies.base import Batch, Host, Strategy
from crl.strategies.distill import distribution_parameters, kl_to, rebuild_distribution


class _Outputs(nn.Module):
    """Its child ``net`` is ``host.module``: functional calls swap parameters under the
    host's own ``output_distribution`` code."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.net = host.module
        object.__setattr__(self, "_host_ref", host)

    def forward(self, batch: Batch) -> dict[str, Any]:
        kind, ndims, params = distribution_parameters(self._host_ref.output_distribution(batch))
        return {"kind": kind, "ndims": ndims, **params}


class LwF(Strategy):
    """λ · KL(previous model ‖ current model) on the training batch (Li & Hoiem 2016)."""

    name = "lwf"

    def __init__(self, lam: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__()
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lwf lam must be a finite number >= 0, got {lam}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"lwf temperature must be > 0 (Li & Hoiem: 2), got {temperature}")
        self.lam, self.temperature = float(lam), float(temperature)
        self.old: dict[str, torch.Tensor] | None = None
        self.old_tasks: list[int] = []
        self._outputs: _Outputs | None = None

    def bind(self, host: Host) -> LwF:
        super().bind(host)
        self._outputs = _Outputs(host)
        return self

    def on_task_end(self, task: int) -> None:
        super().on_task_end(task)
        module = self._host().module
        self.old = {f"net.{n}": p.detach().clone() for n, p in module.named_parameters()}
        if task not in self.old_tasks:
            self.old_tasks.append(task)

    def _pairs(self, batch: Batch) -> list[Batch]:
        host = self._host()
        relabel = getattr(host, "with_task", None)
        if relabel is None or not getattr(host, "multi_head", False) or (
                self.current_task is None):
            return [batch]
        return [relabel(batch, t) for t in self.old_tasks if t != self.current_task]

    def penalty(self, batch: Batch | None = None,
                outputs: Distribution | None = None) -> torch.Tensor | None:
        if self.old is None or batch is None or self.lam == 0:
            return None
        assert self._outputs is not None
        host = self._host()
        terms = []
        for b in self._pairs(batch):
            with torch.no_grad():
                old = functional_call(self._outputs, self.old, (b,), strict=False)
            prev = rebuild_distribution(old["kind"], old["ndims"], old)
            now = outputs if (outputs is not None and b is batch) else host.output_distribution(b)
            terms.append(kl_to(prev, now, self.temperature))
        if not terms:
            return None
        return self.lam * torch.stack(terms).mean()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(lam=self.lam, temperature=self.temperature, old=self.old,
                     old_tasks=list(self.old_tasks))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam, self.temperature = float(state["lam"]), float(state["temperature"])
        self.old = None if state["old"] is None else dict(state["old"])
        self.old_tasks = [int(t) for t in state["old_tasks"]]
