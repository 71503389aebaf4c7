"""The distillation core: an output distribution stored as tensors, rebuilt, and compared
with the model's current one (KL, or MSE on its parameters). Replay's distillation mode, LwF
and DER all use it.

Supported outputs: ``Categorical`` (stored as its normalised logits, i.e. log-probabilities,
the only logits a torch Categorical keeps) and diagonal Gaussians (``Normal`` or
``Independent(Normal)``, stored as loc and scale; a tanh-squashed SAC policy's pre-squash
Gaussian is what the host returns).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributions import Categorical, Distribution, Independent, Normal, kl_divergence

#: stored distribution parameters ride in batches under these keys (the prefix replay's
#: distillation has always written: checkpoints of earlier runs keep loading)
PREFIX = "__replay_old_"
LOGITS, LOC, SCALE = PREFIX + "logits__", PREFIX + "loc__", PREFIX + "scale__"


def distribution_parameters(dist: Distribution, *, detach: bool = True
                            ) -> tuple[str, int, dict[str, torch.Tensor]]:
    """(kind, reinterpreted event dims, parameters) of a categorical or diagonal Gaussian;
    ``detach=False`` keeps the graph (for a loss on the parameters)."""
    ndims = 0
    base = dist
    if isinstance(dist, Independent):
        ndims = dist.reinterpreted_batch_ndims
        base = dist.base_dist

    def out(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if detach else t

    if isinstance(base, Categorical) and ndims == 0:
        return "categorical", 0, {LOGITS: out(base.logits)}
    if isinstance(base, Normal):
        loc, scale = torch.broadcast_tensors(out(base.loc), out(base.scale))
        return "normal", ndims, {LOC: loc, SCALE: scale}
    raise TypeError(
        f"distillation supports Categorical, Normal and Independent(Normal) outputs, "
        f"got {type(dist).__name__}; make host.output_distribution return one of them"
    )


def rebuild_distribution(kind: str, ndims: int, params: Mapping[str, torch.Tensor]) -> Distribution:
    """The stored distribution, rebuilt from its parameters."""
    if kind == "categorical":
        return Categorical(logits=params[LOGITS], validate_args=False)
    normal = Normal(params[LOC], params[SCALE], validate_args=False)
    return Independent(normal, ndims, validate_args=False) if ndims else normal


def split_stored(batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, torch.Tensor]]:
    """(the model's inputs, the stored distribution parameters) of a batch."""
    inputs = {k: v for k, v in batch.items() if not k.startswith(PREFIX)}
    stored = {k: v for k, v in batch.items() if k.startswith(PREFIX)}
    return inputs, stored


def check_keys(batch: Mapping[str, torch.Tensor]) -> None:
    clash = [k for k in batch if k.startswith(PREFIX)]
    if clash:
        raise ValueError(f"batch keys {clash} collide with the distillation prefix {PREFIX!r}")


def kl_to(old: Distribution, new: Distribution, temperature: float = 1.0) -> torch.Tensor:
    """Mean over samples of KL(old ‖ new); a categorical's logits are divided by
    ``temperature`` first (Hinton et al. 2015; LwF uses T = 2), and the KL scaled by T² so
    its gradient keeps the size it has at T = 1."""
    if temperature != 1.0 and isinstance(old, Categorical) and isinstance(new, Categorical):
        old = Categorical(logits=old.logits / temperature, validate_args=False)
        new = Categorical(logits=new.logits / temperature, validate_args=False)
        return kl_divergence(old, new).mean() * temperature**2
    return kl_divergence(old, new).mean()


def parameters_mse(kind: str, stored: Mapping[str, torch.Tensor], new: Distribution
                   ) -> torch.Tensor:
    """Mean squared difference of the distribution parameters (DER's logit matching):
    log-probabilities of a categorical, loc and scale of a Gaussian; mean over samples of
    the sum over output dimensions."""
    _, _, now = distribution_parameters(new, detach=False)
    keys = (LOGITS,) if kind == "categorical" else (LOC, SCALE)
    total = sum((now[k] - stored[k]).square().reshape(now[k].shape[0], -1).sum(1) for k in keys)
    assert isinstance(total, torch.Tensor)
    return total.mean()

