"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic
Intelligence"): importance from the path integral of the gradient along training.

During a task every update adds ω_k ← ω_k − g_k Δθ_k per protected parameter (g the gradient
the optimiser steps with, Δθ the step it took): each parameter's contribution to the drop in
loss. At the task's end Ω_k ← Ω_k + ω_k / ((θ_k − θ_k^start)² + ξ) with ξ the damping that
keeps parameters that barely moved from exploding, ω is reset, and the anchored penalty
λ Σ_k Ω_k (θ_k − θ_k*)² (no 1/2, :mod:`crl.strategies.anchored`) pulls towards the end of
the task. The gradient is the host's total gradient (loss plus the penalty itself), as the
optimiser sees it; Zenke et al. use the unregularised loss's. A parameter whose path integral
is negative (it moved uphill overall) gets Ω 0, so Ω stays a valid weight.

Cost per update, two forms of the same sum. In general a copy of the protected parameters
into a kept buffer before the step, and ω ← ω + g (θ_before − θ_after) after it, with the
gradient read after the step (PPO clips it after ``before_optimizer_step``). Where the
gradient in ``before_optimizer_step`` is the one stepped with (``sees_final_gradient``: the
supervised trainer), ω ← ω + g θ_before before the step and ω ← ω − g θ_after after it: no
copy (measured 0.08-0.11 ms less per update of the supervised 784-400-400-10 MLP, about 2.5%
of the update). The two differ in rounding only (ω passes through g θ, so its error is
about ulp(g θ) per update instead of ulp(g Δθ)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from crl.strategies.anchored import AnchoredPenalty, Tensors, Term
from crl.strategies.base import Host, snapshot


class SI(AnchoredPenalty):
    """λ Σ Ω (θ − θ*)², Ω the damped path integral of −g Δθ over the finished tasks."""

    name = "si"

    def __init__(self, lam: float = 1.0, xi: float = 0.1) -> None:
        super().__init__(lam)
        if not (math.isfinite(xi) and xi > 0):
            raise ValueError(f"si xi (damping) must be a number > 0 (Zenke et al.: 0.1 to 1e-3), "
                             f"got {xi}")
        self.xi = float(xi)
        self.omega: Tensors | None = None  # the accumulated importance Ω
        self.anchor: Tensors | None = None  # θ* at the end of the previous task
        self._path: list[torch.Tensor] | None = None  # ω of the running task
        self._start: list[torch.Tensor] | None = None  # θ at the task's start
        self._before: list[torch.Tensor] | None = None  # θ before this update's step
        #: the gradients (and their versions) the two-pass form added g θ_before with
        self._grads: list[torch.Tensor] | None = None
        self._versions: list[int] = []
        self._stepping = False
        self._live_tensors: list[torch.nn.Parameter] | None = None

    def terms(self) -> list[Term]:
        return [] if self.omega is None or self.anchor is None else [(self.omega, self.anchor)]

    def _tensors(self) -> list[torch.nn.Parameter]:
        """The protected parameters, looked up once per task (two hooks read them per update)."""
        if self._live_tensors is None:
            self._live_tensors = list(self._protected().values())
        return self._live_tensors

    def bind(self, host: Host) -> SI:
        super().bind(host)
        self._live_tensors = None
        return self

    def on_task_start(self, task: int) -> None:
        super().on_task_start(task)
        self._live_tensors = None  # the host may hold new parameter objects
        params = self._tensors()
        self._path = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
        self._start = [p.detach().clone() for p in params]

    def before_optimizer_step(self) -> None:
        self._stepping, self._grads = False, None
        if self._path is None:
            return
        params = self._tensors()
        if self.sees_final_gradient:  # two-pass form: ω += g θ_before now, −= g θ_after later
            grads = [p.grad for p in params]
            if any(g is None for g in grads):  # a step without gradients credits nothing
                return
            with torch.no_grad():
                torch._foreach_addcmul_(self._path, grads, params)  # type: ignore[arg-type]
            self._grads = grads  # type: ignore[assignment]
            self._versions = [g._version for g in self._grads]
        else:
            if self._before is None or len(self._before) != len(params):
                self._before = [torch.empty_like(p, requires_grad=False) for p in params]
            with torch.no_grad():
                torch._foreach_copy_(self._before, params)
        self._stepping = True

    def after_optimizer_step(self) -> None:
        if self._path is None or not self._stepping:
            return
        self._stepping = False
        tensors = self._tensors()
        grads = [p.grad for p in tensors]
        if self._grads is not None:
            added, self._grads = self._grads, None
            if any(g is not a or a._version != v
                   for g, a, v in zip(grads, added, self._versions, strict=True)):
                raise RuntimeError(
                    "SI: the gradient changed between before_optimizer_step and "
                    "after_optimizer_step, but the host declares it final "
                    "(gradients_final_before_step); a host that edits .grad after the hook "
                    "(e.g. clipping) must not declare it")
            with torch.no_grad():
                torch._foreach_addcmul_(self._path, grads, tensors, value=-1.0)  # type: ignore[arg-type]
            return
        if self._before is None or any(g is None for g in grads):
            return  # a step without gradients moved nothing to credit
        # ω ← ω − g Δθ = ω + g (θ_before − θ_after), in place on the copy of θ_before (the
        # gradient is the one the optimiser stepped with: hosts zero it before the next
        # backward, not after the step)
        before = self._before
        with torch.no_grad():
            torch._foreach_sub_(before, tensors)
            torch._foreach_addcmul_(self._path, before, grads)  # type: ignore[arg-type]

    def on_task_end(self, task: int) -> None:
        params = self._protected()
        if self._path is not None and self._start is not None:
            new: Tensors = {}
            for (n, p), w, s in zip(params.items(), self._path, self._start, strict=True):
                moved = (p.detach() - s).square()
                new[n] = w.clamp_min(0.0) / (moved + self.xi)
            if self.omega is None:
                self.omega = new
            else:
                self.omega = {n: self.omega[n] + new[n] for n in new}
        self._path = self._start = None
        self.anchor = snapshot(params)
        super().on_task_end(task)
        self._rebuild()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        names = list(self._protected()) if self._path is not None else []
        state.update(
            xi=self.xi, omega=self.omega, anchor=self.anchor,
            path=None if self._path is None else dict(zip(names, self._path, strict=True)),
            start=None if self._start is None else dict(zip(names, self._start, strict=True)),
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.xi = float(state["xi"])
        self.omega = None if state["omega"] is None else dict(state["omega"])
        self.anchor = None if state["anchor"] is None else dict(state["anchor"])
        self._path = None if state["path"] is None else list(state["path"].values())
        self._start = None if state["start"] is None else list(state["start"].values())
        self._rebuild()
