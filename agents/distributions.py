"""SB3's action distributions, built without ``torch.distributions`` argument validation.

``torch.distributions`` validates by default: every ``Normal`` / ``Categorical`` checks its
parameters when built and every ``log_prob`` checks its argument, each check a reduction
plus a host read. SB3 builds a distribution on every policy call (each env step, each
minibatch, twice per SAC update), and on the small networks of state-based RL the checks
are a large share of a call: measured 38 us of a 65 us ``Categorical`` build + ``log_prob``
(1 and 64 rows) and 21 us of 52 us for ``Normal``.

The unchecked versions compute the same numbers with the same random draws (tested bit for
bit against SB3's). What validation would catch is caught elsewhere: NaN or infinite
losses stop training (``ContinualAgent.check_finite_losses``), and sampling from NaN
categorical probabilities still raises in ``torch.multinomial``. The multi-head policies use
them; ``multi_head=False`` keeps SB3's own classes.
"""

from __future__ import annotations

from typing import Any

import torch
from stable_baselines3.common.distributions import (
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    SquashedDiagGaussianDistribution,
)
from torch.distributions import Categorical, Normal


class _UncheckedNormal:
    """SB3's ``DiagGaussianDistribution.proba_distribution``, operation for operation, with
    ``validate_args=False``; mixed in before the SB3 class it replaces the method of."""

    distribution: Normal

    def proba_distribution(self, mean_actions: torch.Tensor, log_std: torch.Tensor) -> Any:
        action_std = torch.ones_like(mean_actions) * log_std.exp()
        self.distribution = Normal(mean_actions, action_std, validate_args=False)
        return self


class UncheckedDiagGaussian(_UncheckedNormal, DiagGaussianDistribution):
    """:class:`DiagGaussianDistribution` (PPO on Box actions) without validation."""


class UncheckedSquashedDiagGaussian(_UncheckedNormal, SquashedDiagGaussianDistribution):
    """:class:`SquashedDiagGaussianDistribution` (SAC's actor) without validation."""


class UncheckedCategorical(CategoricalDistribution):
    """:class:`CategoricalDistribution` (PPO on Discrete actions) without validation."""

    def proba_distribution(  # type: ignore[override]
        self, action_logits: torch.Tensor
    ) -> UncheckedCategorical:
        self.distribution = Categorical(logits=action_logits, validate_args=False)
        return self


def unchecked(dist: Distribution) -> Distribution:
    """The unchecked counterpart of an SB3 distribution (same dimensions and epsilon); any
    other distribution (gSDE, multi-categorical, Bernoulli) is returned unchanged."""
    kind: Any = type(dist)
    if kind is SquashedDiagGaussianDistribution:
        return UncheckedSquashedDiagGaussian(dist.action_dim, dist.epsilon)  # type: ignore[attr-defined]
    if kind is DiagGaussianDistribution:
        return UncheckedDiagGaussian(dist.action_dim)  # type: ignore[attr-defined]
    if kind is CategoricalDistribution:
        return UncheckedCategorical(dist.action_dim)  # type: ignore[attr-defined]
    return dist


__all__ = [
    "UncheckedCategorical",
    "UncheckedDiagGaussian",
    "UncheckedSquashedDiagGaussian",
    "unchecked",
]
