"""The anchored quadratic penalty that L2, EWC and MAS share: λ Σ_i w_i (θ_i − θ*_i)² over the
protected parameters, one term per anchor (per task, or one for online variants).

Penalty convention (all three methods): NO 1/2 factor (docs/ARCHITECTURE.md, "Host/strategy
contract"), so its gradient is 2 λ w (θ − θ*). L2 is the case w = 1.
"""


from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution

from crl.strategies.base import Batch, Host, Strategy, snapshot

Tensors = dict[str, torch.Tensor]
#: One quadratic term: (weights or None for w = 1, anchor).
Term = tuple[Tensors | None, Tensors]


def check_lam(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(
            f"lam (regularisation strength) must be a finite number >= 0, got {lam}; "
            "use lam=0 to disable the penalty"
        )
    return lam


def check_max_samples(max_samples: int | None) -> int | None:
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or int(max_samples) != max_samples or max_samples < 1:
        raise ValueError(
            f"max_samples must be a positive integer or None (use all samples), got {max_samples!r}"
        )
    return int(max_samples)


class _Quadratic(torch.autograd.Function):
    """λ Σ_i w_i ⊙ (θ_i − a_i)² (w = None: 1) and its gradient 2λ w ⊙ (θ − a), each in a few
    multi-tensor ``torch._foreach_*`` kernels over all protected tensors at once.

    The penalty runs on every update; written as ordinary autograd it costs about four graph
    nodes per parameter tensor forward and as many backward (measured 2x slower on the PPO
    trunk of 4 tensors, which made the penalty ~5% of a whole PPO update). A weighted
    penalty is given ``double = 2λw``: the forward computes the gradient g = 2λw ⊙ (θ − a)
    itself and the value as ½ Σ (θ − a)·g, so the backward hands g over without a pass
    over the parameters (measured 0.11-0.15 ms less per update of the supervised
    784-400-400-10 MLP than scaling by √(2λw) forward and backward, in one process with
    the two forms on alternate updates).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        lam: float,
        anchors: list[torch.Tensor],
        double: list[torch.Tensor] | None,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        diff = torch._foreach_sub(params, anchors)
        if double is None:
            ctx.factor, ctx.grads = 2.0 * lam, diff
            return torch.stack(torch._foreach_norm(diff)).square().sum() * lam
        grads = torch._foreach_mul(diff, double)
        ctx.factor, ctx.grads = 1.0, grads
        dots = [torch.dot(d.reshape(-1), g.reshape(-1)) for d, g in zip(diff, grads, strict=True)]
        return torch.stack(dots).sum() * 0.5

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # in place on the forward's tensors, which nothing else reads: no allocation
        g, ctx.grads = ctx.grads, None
        if g is None:
            raise RuntimeError("the quadratic penalty's backward ran twice on one graph; "
                               "compute the penalty again for another backward")
        factor = grad * ctx.factor
        if factor.device.type != "cpu" or float(factor) != 1.0:  # a host read is free on CPU
            torch._foreach_mul_(g, factor)
        return (None, None, None, *g)


class AnchoredPenalty(Strategy):
    """λ Σ_terms Σ w (θ − θ*)² over the protected parameters.

    Subclasses keep their own terms (one per task, or one accumulated) and call
    :meth:`_rebuild`. Several terms are merged once per task into one quadratic,
    Σ_t w_t (θ − a_t)² = W (θ − m)² + c with W = Σ w_t, m = Σ w_t a_t / W and
    c = Σ_t w_t (a_t − m)², so that :meth:`penalty`, which runs every update, costs one pass
    over the parameter tensors whatever the number of tasks.
    """

    name = "anchored"

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.lam = check_lam(lam)
        self.param_names: list[str] = []
        self._params: list[nn.Parameter] | None = None
        self._weights: list[torch.Tensor] | None = None
        self._anchor: list[torch.Tensor] = []
        self._offset: float = 0.0
        #: 2λw, built from the weights on first use after each change (see _Quadratic)
        self._double: list[torch.Tensor] | None = None
        self._double_lam = self.lam

    # -- parameters ------------------------------------------------------------------------
    def bind(self, host: Host) -> AnchoredPenalty:
        super().bind(host)
        self._params = None  # re-resolve: the host may hold new parameter objects
        return self

    def _protected(self) -> dict[str, nn.Parameter]:
        params = self._host().protected_parameters()
        if not params:
            raise ValueError(
                f"{type(self).__name__}: host.protected_parameters() is empty; nothing to protect"
            )
        if self.param_names and list(params) != self.param_names:
            raise ValueError(
                f"{type(self).__name__}: the protected parameters changed between tasks "
                f"(had {self.param_names}, now {list(params)}); the protected set must stay fixed"
            )
        return params

    def _live_params(self) -> list[nn.Parameter]:
        if self._params is None:
            params = self._protected()
            for n, a in zip(self.param_names, self._anchor, strict=True):
                if params[n].shape != a.shape:
                    raise ValueError(
                        f"{type(self).__name__}: parameter {n!r} has shape "
                        f"{tuple(params[n].shape)} but its anchor has {tuple(a.shape)}"
                    )
            self._params = [params[n] for n in self.param_names]
            dev = [p.device for p in self._params]
            self._anchor = [a.to(d) for a, d in zip(self._anchor, dev, strict=True)]
            if self._weights is not None:
                self._weights = [w.to(d) for w, d in zip(self._weights, dev, strict=True)]
            self._double = None
        return self._params

    # -- the quadratic ---------------------------------------------------------------------
    def terms(self) -> Sequence[Term]:
        """The (weights, anchor) pairs that make up the penalty."""
        raise NotImplementedError

    def _rebuild(self) -> None:
        """Merge :meth:`terms` into (W, m, c); see the class docstring."""
        terms = list(self.terms())
        self._params = None
        self._double = None
        if not terms:
            self._weights, self._anchor, self._offset = None, [], 0.0
            return
        names = list(terms[0][1])
        self.param_names = names
        if len(terms) == 1:  # exact: keeps the penalty bit-exactly 0 at the anchor
            w, a = terms[0]
            self._weights = None if w is None else [w[n] for n in names]
            self._anchor = [a[n] for n in names]
            self._offset = 0.0
            return
        if any(w is None for w, _ in terms):
            raise ValueError("unweighted terms cannot be merged with weighted ones")
        weights, anchor, offset = [], [], 0.0
        for n in names:
            ws = [w[n].double() for w, _ in terms]  # type: ignore[index]
            As = [a[n].double() for _, a in terms]
            total = torch.stack(ws).sum(0)
            mean = torch.where(
                total > 0,
                sum(w * a for w, a in zip(ws, As, strict=True)) / total.clamp_min(1e-300),
                As[-1],
            )
            pairs = zip(ws, As, strict=True)
            offset += float(sum((w * (a - mean).square()).sum() for w, a in pairs))
            dtype = terms[-1][1][n].dtype
            weights.append(total.to(dtype))
            anchor.append(mean.to(dtype))
        self._weights, self._anchor, self._offset = weights, anchor, offset

    def penalty(self, batch: Batch | None = None,
                outputs: Distribution | None = None) -> torch.Tensor | None:
        """λ Σ w (θ − θ*)²; None until a task has ended (nothing to protect yet)."""
        if not self._anchor:
            return None
        params = self._live_params()
        if self._weights is None:
            total = _Quadratic.apply(self.lam, self._anchor, None, *params)
        else:
            if self._double is None or self._double_lam != self.lam:  # once per task
                self._double = [w * (2.0 * self.lam) for w in self._weights]
                self._double_lam = self.lam
            total = _Quadratic.apply(self.lam, self._anchor, self._double, *params)
        if self._offset:
            total = total + self.lam * self._offset
        return total

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["lam"] = self.lam
        state["param_names"] = list(self.param_names)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.lam = check_lam(state["lam"])
        self.param_names = list(state["param_names"])


class SingleAnchor(AnchoredPenalty):
    """λ Σ (θ − θ*)² towards one anchor θ* (w = 1); subclasses decide when it is set."""

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__(lam)
        self.anchor: Tensors | None = None

    def terms(self) -> list[Term]:
        return [] if self.anchor is None else [(None, self.anchor)]

    def _set_anchor(self) -> None:
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
