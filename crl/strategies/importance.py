"""Per-parameter importance from per-sample gradients: diagonal Fisher (EWC) and MAS sensitivity.

Both estimators need, for every sample x, the gradient of a few per-sample scalars s(x)
(log-probabilities, scaled means/stds, an output norm) with respect to the protected
parameters, and then sum an element-wise function of those gradients over samples. A batch
gradient cannot do this (squares and absolute values do not commute with the sum over
samples), so the gradients are taken per sample with ``torch.func`` (``functional_call`` +
``vmap`` + ``jacrev``) over ``host.module``; the host's own ``output_distribution`` is called
functionally through a wrapper module whose child *is* ``host.module``. Where ``vmap`` cannot
run the host's code (data-dependent control flow, ``.item()``, custom autograd functions...),
the computation warns once and falls back to a per-sample autograd loop with the same result.

That path is the general one, and the slow one: its cost and memory grow with the number of
scalars x parameters per sample. For the parameters of ``nn.Linear`` and ``nn.Conv2d``
layers, :mod:`crl.strategies.layer_grads` computes the same sums from one batched backward
pass per scalar (square and absolute value factorise over a layer's outer product), and
:func:`accumulate_importance` uses it automatically, keeping per-sample Jacobians for the
other parameters only (PPO's state-independent ``log_std``, custom layers).

References
- Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" (EWC).
- Schwarz et al. 2018, "Progress & Compress" (online EWC).
- Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to forget" (MAS).
- Wołczyk et al. 2021, "Continual World" (Fisher of a diagonal Gaussian policy).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    Normal,
    TransformedDistribution,
)
from torch.func import functional_call, jacrev, vmap

from crl.strategies.base import Batch, Host
from crl.strategies.layer_grads import (
    MULTIPLICATIVE,
    FastPathUnavailable,
    LayerGradientSums,
    split_parameters,
)

#: Per-sample scalars: (the host's distribution for a batch of B samples; the samples' extra
#: tensor with leading dim B, or None) -> (B, S): S scalars per sample, each depending on its
#: own sample only. The per-sample Jacobian path calls it with B = 1.
ScalarsFn = Callable[[Distribution, torch.Tensor | None], torch.Tensor]
FisherMode = Literal["true", "sampled", "empirical"]

FISHER_MODES: tuple[str, ...] = ("true", "sampled", "empirical")
#: Floats a chunk of per-sample Jacobians may hold (chunk x scalars x params). 8M floats
#: (32 MB in float32) keeps a 500k-parameter MLP or a Continual World SAC actor (4x256) far
#: from memory limits; on CPU it measured 3-5x faster than 64M floats (less memory traffic).
DEFAULT_BUDGET: int = 8 * 2**20
_CHILD = "net"
_SUPPORTED = (
    "torch.distributions.Categorical, Normal, Independent(Normal), or a "
    "TransformedDistribution (e.g. tanh-squashed) over Normal / Independent(Normal)"
)


class PerSampleGradientError(RuntimeError):
    """Raised when importance cannot be computed from the host's batches."""


# -- distributions -------------------------------------------------------------------------
def _unsupported(dist: Distribution) -> TypeError:
    return TypeError(
        f"importance estimation does not support {type(dist).__name__} output distributions; "
        f"host.output_distribution must return {_SUPPORTED}"
    )


def gaussian_parameters(dist: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a diagonal Gaussian, looking through Independent and invertible
    transforms: the Fisher information is invariant under an invertible map of the random
    variable, so a tanh-squashed SAC policy has the Fisher of its pre-tanh Gaussian."""
    base = dist
    while isinstance(base, (TransformedDistribution, Independent)):
        base = base.base_dist
    if not isinstance(base, Normal):
        raise _unsupported(dist)
    return base.loc, base.scale


def _is_gaussian(dist: Distribution) -> bool:
    try:
        gaussian_parameters(dist)
    except TypeError:
        return False
    return True


def _check_supported(dist: Distribution) -> None:
    if not isinstance(dist, Categorical) and not _is_gaussian(dist):
        raise _unsupported(dist)


def fisher_scalars(mode: str) -> ScalarsFn:
    """Scalars whose squared gradients, summed, give one sample's diagonal Fisher.

    - ``true``, Categorical: s_y = sqrt(p_y) log p_y (sqrt(p) detached), so
      Σ_y (∂s_y)² = Σ_y p_y (∂ log p_y)² = E_{y~p}[(∂ log p(y|x))²] exactly.
    - ``true``, diagonal Gaussian: s = (μ_a/σ_a, √2 σ_a/σ_a) (denominators detached), so
      Σ (∂s)² = Σ_a [(∂μ_a)² + 2 (∂σ_a)²] / σ_a², the closed form used by Continual World.
    - ``sampled``: s = log p(ŷ|x) with ŷ ~ p(·|x) drawn beforehand (Kirkpatrick et al. 2017's
      Monte-Carlo estimate; ``extra`` holds ŷ).
    - ``empirical``: s = log p(y|x) with y the data label (``extra``): the *empirical*
      Fisher, which is not the Fisher of the model and is biased away from the optimum.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown fisher mode {mode!r}; choose one of: {', '.join(FISHER_MODES)}")

    def scalars(dist: Distribution, extra: torch.Tensor | None) -> torch.Tensor:
        _check_supported(dist)
        if mode == "true":
            if isinstance(dist, Categorical):
                log_p = dist.logits
                return _rows(log_p.detach().exp().sqrt() * log_p)
            mu, sigma = gaussian_parameters(dist)
            inv = 1.0 / sigma.detach()
            return torch.cat([_rows(mu * inv), _rows(math.sqrt(2.0) * sigma * inv)], dim=1)
        if extra is None:
            raise PerSampleGradientError(f"fisher={mode!r} needs a target per sample")
        extra = _per_sample_values(dist, extra)
        if isinstance(dist, Categorical):
            return _rows(dist.log_prob(extra)).sum(1, keepdim=True)
        if mode == "sampled":  # ŷ was drawn in the pre-transform (Gaussian) space
            mu, sigma = gaussian_parameters(dist)
            log_p = Normal(mu, sigma, validate_args=False).log_prob(extra)
            return _rows(log_p).sum(1, keepdim=True)
        return _rows(dist.log_prob(extra)).sum(1, keepdim=True)

    return scalars


def mas_scalars(dist: Distribution, extra: torch.Tensor | None = None) -> torch.Tensor:
    """‖f(x)‖² for MAS. f = the normalised logits (log-probabilities) of a Categorical, the
    only logits a torch Categorical keeps; f = concat(mean, std) of a diagonal Gaussian
    (pre-squashing), the outputs Continual World regularises."""
    _check_supported(dist)
    if isinstance(dist, Categorical):
        return _rows(dist.logits.pow(2)).sum(1, keepdim=True)
    mu, sigma = gaussian_parameters(dist)
    return (_rows(mu.pow(2)) + _rows(sigma.pow(2))).sum(1, keepdim=True)


def _per_sample_values(dist: Distribution, extra: torch.Tensor) -> torch.Tensor:
    """Targets in the distribution's value shape: SB3 stores discrete actions as (B, 1),
    which ``log_prob`` would broadcast against a (B,) batch into (B, B) cross-sample terms."""
    shape = dist.batch_shape + dist.event_shape
    if extra.shape == shape:
        return extra
    if extra.numel() != shape.numel():
        raise PerSampleGradientError(
            f"the Fisher targets have shape {tuple(extra.shape)} but the policy's outputs have "
            f"shape {tuple(shape)}; target_key must name one target per sample"
        )
    return extra.reshape(shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, everything else): one row per sample (a 1-d tensor is one scalar per sample)."""
    return t.reshape(t.shape[0], -1)


# -- per-sample Jacobians ------------------------------------------------------------------
class _ScalarsModule(nn.Module):
    """Its child ``net`` is ``host.module``, so ``functional_call`` on this wrapper with
    names ``net.<name>`` swaps parameters into the host's own forward code."""

    def __init__(self, host: Host, scalars: ScalarsFn) -> None:
        super().__init__()
        self.net = host.module
        # object.__setattr__: a host that is itself an nn.Module must not become a child.
        object.__setattr__(self, "_host_ref", host)
        object.__setattr__(self, "_scalars", scalars)

    def forward(
        self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None, flat: bool = True
    ) -> torch.Tensor:
        out = self._scalars(self._host_ref.output_distribution(batch), extra)
        return out.reshape(-1) if flat else out

    def batch_scalars(
        self,
        tensors: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        extra: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, S) scalars of a whole batch with ``tensors`` in place of host parameters."""
        swapped = {f"{_CHILD}.{n}": t for n, t in tensors.items()}
        return functional_call(self, swapped, (batch, extra, False))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Importance describes the network as used for inference, and per-sample batch-norm
    statistics would be meaningless: evaluate in eval mode, then restore every flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _as_batch(batch: Batch) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"importance_batches() must yield mappings of tensors, got {type(batch).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    size = None
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"batch[{k!r}] is a {type(v).__name__}; batches must hold only tensors that "
                "share their leading (batch) dimension"
            )
        if v.dim() == 0 or (size is not None and v.shape[0] != size):
            raise ValueError(
                f"batch[{k!r}] has shape {tuple(v.shape)}; every tensor of a batch needs the "
                f"same leading batch dimension ({size})"
            )
        size = v.shape[0]
    out.update(batch)
    return out


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    for v in batch.values():
        return int(v.shape[0])
    raise ValueError("a batch from importance_batches() has no tensors")


class PerSampleJacobian:
    """Per-sample Jacobians of host scalars w.r.t. named parameters, vmap first, loop after.

    ``vectorize=False`` forces the per-sample autograd loop (reference / debugging).
    """

    def __init__(
        self,
        host: Host,
        scalars: ScalarsFn,
        params: Mapping[str, torch.Tensor] | None = None,
        *,
        vectorize: bool = True,
    ) -> None:
        self.host = host
        self.wrapper = _ScalarsModule(host, scalars)
        params = _checked_parameters(host, params)
        self.names = list(params)
        self.params = {n: p.detach() for n, p in params.items()}
        self.vectorize = vectorize

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def num_scalars(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None) -> int:
        """Probe with one sample, outside vmap, so type errors surface as they are."""
        sample = {k: v[:1] for k, v in batch.items()}
        with torch.no_grad():
            return int(self.wrapper(sample, None if extra is None else extra[:1]).numel())

    def __call__(
        self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """name -> (B, S, *param.shape) for one chunk."""
        if self.vectorize:
            try:
                return self._vmap(batch, extra)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                warnings.warn(
                    f"torch.func.vmap cannot run this host's output_distribution ({err}); "
                    "falling back to a per-sample autograd loop (same result, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.vectorize = False
        return self._loop(batch, extra)

    def _vmap(
        self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        wrapper = self.wrapper

        def one(
            params: dict[str, torch.Tensor],
            sample: dict[str, torch.Tensor],
            ex: torch.Tensor | None,
        ) -> torch.Tensor:
            sample = {k: v.unsqueeze(0) for k, v in sample.items()}
            ex = None if ex is None else ex.unsqueeze(0)
            return functional_call(wrapper, params, (sample, ex))

        prefixed = {f"{_CHILD}.{n}": p for n, p in self.params.items()}
        in_dims = (None, 0, None if extra is None else 0)
        jac = vmap(jacrev(one), in_dims=in_dims)(prefixed, batch, extra)
        return {n: jac[f"{_CHILD}.{n}"] for n in self.names}

    def _loop(
        self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        for i in range(_batch_size(batch)):
            leaves = {n: p.clone().requires_grad_(True) for n, p in self.params.items()}
            sample = {k: v[i : i + 1] for k, v in batch.items()}
            ex = None if extra is None else extra[i : i + 1]
            with torch.enable_grad():
                out = functional_call(
                    self.wrapper, {f"{_CHILD}.{n}": p for n, p in leaves.items()}, (sample, ex)
                )
                per_scalar: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
                for s in range(out.numel()):
                    grads = torch.autograd.grad(
                        out[s],
                        list(leaves.values()),
                        retain_graph=s + 1 < out.numel(),
                        allow_unused=True,
                    )
                    for n, g in zip(self.names, grads, strict=True):
                        per_scalar[n].append(torch.zeros_like(leaves[n]) if g is None else g)
            for n in self.names:
                rows[n].append(torch.stack(per_scalar[n]))
        return {n: torch.stack(r) for n, r in rows.items()}


def per_sample_grads(
    host: Host,
    batch: Batch,
    scalars: ScalarsFn,
    *,
    extra: torch.Tensor | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    vectorize: bool = True,
) -> dict[str, torch.Tensor]:
    """name -> (B, S, *shape): gradient of each of the S per-sample scalars of every sample.

    ``params`` defaults to ``host.protected_parameters()``. Holds the whole batch's Jacobian:
    for large batches use :func:`accumulate_importance`, which chunks.
    """
    engine = PerSampleJacobian(host, scalars, params, vectorize=vectorize)
    return engine(_as_batch(batch), extra)


# -- accumulation over the finished task's data --------------------------------------------
ExtraFn = Callable[[dict[str, torch.Tensor]], torch.Tensor | None]


def accumulate_importance(
    host: Host,
    scalars: ScalarsFn,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    *,
    batches: Iterable[Batch] | None = None,
    extra_fn: ExtraFn | None = None,
    max_samples: int | None = None,
    budget: int = DEFAULT_BUDGET,
    vectorize: bool = True,
    fast: bool = True,
) -> dict[str, torch.Tensor]:
    """mean over samples x of Σ_s reduce(∂ s(x) / ∂θ), per protected parameter.

    ``extra_fn(batch)`` gives a per-sample target tensor (labels, sampled outputs). At most
    ``max_samples`` samples (the first ones, in iteration order) are used. With ``fast`` and
    ``reduce`` torch.square or torch.abs, parameters of ``nn.Linear`` and ``nn.Conv2d``
    layers take the layer path (:mod:`crl.strategies.layer_grads`: batched backward passes,
    no per-sample Jacobian of a whole network); every other parameter, and everything when
    the host's forward pass defeats the layer path, takes per-sample Jacobians cut into
    chunks of at most ``budget`` floats. ``fast=False`` forces per-sample Jacobians.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples}")
    params = _checked_parameters(host)
    acc = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
    layers: LayerGradientSums | None = None
    rest = list(params)
    if fast and reduce in MULTIPLICATIVE:
        owned, rest = split_parameters(host.module, rest)
        if owned:
            wrapper = _ScalarsModule(host, scalars)
            layers = LayerGradientSums(host.module, wrapper.batch_scalars, owned, reduce, budget)
    engine = _jacobian(host, scalars, params, rest, vectorize)
    seen = 0
    batches = host.importance_batches() if batches is None else batches
    with eval_mode(host.module):
        for raw in batches:
            batch = _as_batch(raw)
            size = _batch_size(batch)
            if max_samples is not None:
                size = min(size, max_samples - seen)
                batch = {k: v[:size] for k, v in batch.items()}
            if size == 0:
                continue
            extra = None if extra_fn is None else extra_fn(batch)
            if layers is not None:
                try:
                    sums = layers(batch, extra)
                except FastPathUnavailable as err:
                    warnings.warn(
                        f"importance: the layer path cannot run this host ({err}); using "
                        "per-sample Jacobians for every parameter (same result, slower)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    layers = None
                    engine = _jacobian(host, scalars, params, list(params), vectorize)
                else:
                    for n, v in sums.items():
                        acc[n] += v
            if engine is not None:
                _add_jacobian_sums(engine, batch, extra, reduce, budget, acc)
            seen += size
            if max_samples is not None and seen >= max_samples:
                break
    if seen == 0:
        raise PerSampleGradientError(
            "host.importance_batches() yielded no samples; importance needs the finished "
            "task's data (training set, replay buffer or rollouts)"
        )
    return {n: a / seen for n, a in acc.items()}


def _checked_parameters(
    host: Host, params: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``params`` (default: the protected set), checked to be named parameters of the host."""
    params = host.protected_parameters() if params is None else params
    if not params:
        raise ValueError("no parameters to compute importance for (protected set is empty)")
    own = {n for n, _ in host.module.named_parameters(remove_duplicate=False)}
    unknown = sorted(set(params) - own)
    if unknown:
        raise ValueError(
            f"parameters {unknown} are not named parameters of host.module; "
            "protected_parameters() must use host.module.named_parameters() names"
        )
    return dict(params)


def _jacobian(
    host: Host,
    scalars: ScalarsFn,
    params: Mapping[str, torch.Tensor],
    names: list[str],
    vectorize: bool,
) -> PerSampleJacobian | None:
    if not names:
        return None
    return PerSampleJacobian(host, scalars, {n: params[n] for n in names}, vectorize=vectorize)


def _add_jacobian_sums(
    engine: PerSampleJacobian,
    batch: dict[str, torch.Tensor],
    extra: torch.Tensor | None,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    budget: int,
    acc: dict[str, torch.Tensor],
) -> None:
    size = _batch_size(batch)
    per_sample = max(1, engine.num_scalars(batch, extra) * engine.numel)
    chunk = max(1, budget // per_sample)
    for start in range(0, size, chunk):
        part = {k: v[start : start + chunk] for k, v in batch.items()}
        part_extra = None if extra is None else extra[start : start + chunk]
        for n, j in engine(part, part_extra).items():
            # detach: j also depends on unprotected parameters (task heads), and the
            # importance must not keep their graph alive into later updates
            acc[n] += reduce(j.detach()).sum(dim=(0, 1))


def _generator(
    seed: int, device: torch.device, cache: dict[str, torch.Generator]
) -> torch.Generator:
    key = str(device)
    if key not in cache:
        cache[key] = torch.Generator(device=device).manual_seed(seed)
    return cache[key]


def _sampler(host: Host, seed: int) -> ExtraFn:
    """Draws ŷ ~ p(·|x) with a seeded generator (outside vmap, one forward without grad)."""
    gens: dict[str, torch.Generator] = {}

    def draw(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            dist = host.output_distribution(batch)
            _check_supported(dist)
            if isinstance(dist, Categorical):
                probs = dist.probs
                flat = probs.reshape(-1, probs.shape[-1])
                gen = _generator(seed, flat.device, gens)
                return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])
            mu, sigma = gaussian_parameters(dist)
            gen = _generator(seed, mu.device, gens)
            eps = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
            return mu + sigma * eps

    return draw


def _targets(key: str, host: Host) -> ExtraFn:
    """The labels, mapped into the output distribution's value space where the host's
    outputs are transformed (SAC: tanh-squashed actions under its pre-squash Gaussian)."""
    to_values = getattr(host, "distribution_values", None)

    def take(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if key not in batch:
            raise KeyError(
                f"fisher='empirical' needs the data labels under batch[{key!r}], but the "
                f"batch has keys {sorted(batch)}; pass target_key=<label key>"
            )
        return batch[key] if to_values is None else to_values(batch[key])

    return take


def fisher_diagonal(
    host: Host,
    fisher: FisherMode = "true",
    *,
    batches: Iterable[Batch] | None = None,
    max_samples: int | None = None,
    target_key: str = "y",
    seed: int = 0,
    budget: int = DEFAULT_BUDGET,
    vectorize: bool = True,
    fast: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``host.output_distribution`` over ``host.importance_batches()``,
    averaged over samples. ``fisher`` picks the estimator (see :func:`fisher_scalars`);
    ``seed`` drives ``sampled``."""
    scalars = fisher_scalars(fisher)
    extra_fn: ExtraFn | None = None
    if fisher == "sampled":
        extra_fn = _sampler(host, seed)
    elif fisher == "empirical":
        extra_fn = _targets(target_key, host)
    return accumulate_importance(
        host,
        scalars,
        torch.square,
        batches=batches,
        extra_fn=extra_fn,
        max_samples=max_samples,
        budget=budget,
        vectorize=vectorize,
        fast=fast,
    )


def mas_importance(
    host: Host,
    *,
    batches: Iterable[Batch] | None = None,
    max_samples: int | None = None,
    budget: int = DEFAULT_BUDGET,
    vectorize: bool = True,
    fast: bool = True,
) -> dict[str, torch.Tensor]:
    """MAS Ω = mean over samples of |∂ ‖f(x)‖² / ∂θ| (Aljundi et al. 2018): absolute values
    per sample, so opposite-signed sensitivities of different samples do not cancel."""
    return accumulate_importance(
        host,
        mas_scalars,
        torch.abs,
        batches=batches,
        max_samples=max_samples,
        budget=budget,
        vectorize=vectorize,
        fast=fast,
    )


def task_seed(seed: int, task: int) -> int:
    """An independent stream per (seed, task), so sampled Fishers of tasks do not share draws."""
    return int(np.random.SeedSequence([seed, task]).generate_state(1)[0])
