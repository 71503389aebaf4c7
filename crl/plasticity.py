"""Plasticity metrics of a host's networks on a fixed probe batch: dormant units, feature
rank, weight magnitude and gradient norm, per layer.

A network that keeps learning new tasks needs units that still respond to the input and
features that still span many directions. Long task sequences erode both (loss of
plasticity): these metrics make the erosion visible beside forgetting, so a method that
"forgets less" because it stopped learning shows as such.

- τ-dormant units (Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep RL"): unit i of
  a layer has score s_i = E|h_i| / ((1/H) Σ_j E|h_j|) over the probe batch (a convolution's
  unit is its channel, averaged over positions); it is dormant when s_i ≤ τ.
- Effective rank srank_δ (Kumar et al. 2021, "Implicit Under-Parameterization"): with the
  singular values σ_1 ≥ σ_2 ≥ … of the (N x d) penultimate features, the smallest k with
  Σ_{i≤k} σ_i / Σ_i σ_i ≥ 1 − δ.
- mean |w| of every weight matrix and the norm of the host loss's gradient on the probe batch
  for every parametrised layer (Lyle et al. 2022 and Dohare et al. 2024 track both).

Layers are found, not declared: every activation module (ReLU, Tanh, ...) of ``host.module``
whose parent module holds a parameter the host trains is a measured layer; its parent (e.g.
``actor.latent_pi``, ``critic.qf0``, ``mlp_extractor.value_net``, ``trunk``) is a *network*,
and the network's last activation (in forward order) gives its penultimate features. Target
networks, which the host never trains, are skipped. One forward and one backward of
``host.loss`` on the probe batch feed everything; the global torch RNG is forked so that a
stochastic loss (SAC samples actions) leaves training's random stream untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from crl.strategies.importance import eval_mode

#: Modules whose outputs are a layer's units. Activation modules have no parameters.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish,
)
PARAMETRISED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PREFIX = "plasticity/"
DEFAULT_TAU = 0.025
DEFAULT_DELTA = 0.01
DEFAULT_PROBE_SIZE = 256


def check_settings(tau: float, delta: float, probe_size: int) -> None:
    if not (math.isfinite(tau) and 0 <= tau < 1):
        raise ValueError(f"plasticity tau must be in [0, 1) (0.025 in Sokar et al.), got {tau}")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"plasticity delta must be in (0, 1) (0.01 in Kumar et al.), got {delta}")
    if isinstance(probe_size, bool) or int(probe_size) != probe_size or probe_size < 2:
        raise ValueError(f"plasticity probe size must be an integer >= 2, got {probe_size!r}")


# -- the metrics on tensors ----------------------------------------------------------------
def unit_activity(h: torch.Tensor) -> torch.Tensor:
    """E|h_i| per unit: mean over the batch (dim 0) and any positions after the unit dim."""
    if h.dim() < 2:
        raise ValueError(
            f"activations need a batch and a unit dimension, got shape {tuple(h.shape)}")
    a = h.detach().abs()
    dims = [0, *range(2, a.dim())]
    return a.mean(dim=dims)


def dormant_fraction(activity: torch.Tensor, tau: float = DEFAULT_TAU) -> float:
    """Fraction of τ-dormant units given per-unit E|h| (Sokar et al. 2023, Def. 3.1). A layer
    whose units are all silent is entirely dormant."""
    activity = activity.detach()
    mean = activity.mean()
    if float(mean) == 0.0:
        return 1.0
    return float(((activity / mean) <= tau).float().mean())


def effective_rank(features: torch.Tensor, delta: float = DEFAULT_DELTA) -> int:
    """srank_δ of an (N, d) feature matrix (Kumar et al. 2021, Eq. 2); 0 for all-zero features."""
    f = features.detach().reshape(features.shape[0], -1).double()
    sv = torch.linalg.svdvals(f)
    total = sv.sum()
    if float(total) == 0.0:
        return 0
    cum = torch.cumsum(sv, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(1.0 - delta, dtype=cum.dtype)).item()) + 1


# -- finding the layers ----------------------------------------------------------------------
@dataclass(frozen=True)
class Layers:
    """Measured activation modules and parametrised layers of one host, by name."""

    activations: dict[str, nn.Module]
    parametrised: dict[str, nn.Module]
    networks: dict[str, list[str]]  # network -> its activation names, in module order


def find_layers(module: nn.Module, trained: list[nn.Parameter]) -> Layers:
    trained_ids = {id(p) for p in trained}
    named = dict(module.named_modules())

    def parent(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    def is_trained(mod: nn.Module) -> bool:
        return any(id(p) in trained_ids for p in mod.parameters())

    activations: dict[str, nn.Module] = {}
    networks: dict[str, list[str]] = {}
    for name, m in named.items():
        if isinstance(m, ACTIVATIONS) and is_trained(named[parent(name)]):
            activations[name] = m
            networks.setdefault(parent(name) or "net", []).append(name)
    parametrised = {
        name: m
        for name, m in named.items()
        if isinstance(m, PARAMETRISED)
        and (parent(name) or "net") in networks
        and is_trained(m)
    }
    return Layers(activations, parametrised, networks)


@contextlib.contextmanager
def _first_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Each module's output of its *first* call (a SAC actor also runs on next_obs)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202 - a forward hook
        def fn(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if name not in seen and isinstance(out, torch.Tensor):
                seen[name] = out.detach()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def measure(
    host: object,
    batch: Mapping[str, torch.Tensor],
    *,
    tau: float = DEFAULT_TAU,
    delta: float = DEFAULT_DELTA,
    layers: Layers | None = None,
) -> dict[str, float]:
    """The metrics of ``host`` (a :class:`crl.strategies.base.Host`) on one probe batch, as
    ``plasticity/<metric>/<layer or network>`` keys plus run-level summaries
    ``plasticity/dormant`` (over every measured unit) and ``plasticity/weight_abs``."""
    module: nn.Module = host.module  # type: ignore[attr-defined]
    if layers is None:
        layers = find_layers(module, host.trained_parameters())  # type: ignore[attr-defined]
    if not layers.activations:
        return {}
    params = {
        f"{name}.{attr}": p
        for name, m in layers.parametrised.items()
        for attr, p in m.named_parameters(recurse=False)
    }
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda), eval_mode(module), torch.enable_grad():
        torch.random.default_generator.manual_seed(0)  # the forked streams only
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(0)
        with _first_outputs(layers.activations) as outs:
            loss = host.loss(batch)  # type: ignore[attr-defined]
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    row: dict[str, float] = {}
    dormant_units = 0.0
    units = 0
    for name in layers.activations:
        if name not in outs:  # not on the loss's path (e.g. a head of another task)
            continue
        act = unit_activity(outs[name])
        frac = dormant_fraction(act, tau)
        row[f"{PREFIX}dormant/{name}"] = frac
        dormant_units += frac * act.numel()
        units += act.numel()
    if units:
        row[f"{PREFIX}dormant"] = dormant_units / units
    for network, names in layers.networks.items():
        last = [n for n in names if n in outs]
        if last:
            row[f"{PREFIX}srank/{network}"] = float(effective_rank(outs[last[-1]], delta))
    weight_sum, weight_count = 0.0, 0
    grad_of = dict(zip(params, grads, strict=True))
    for name, m in layers.parametrised.items():
        w = m.weight.detach()
        row[f"{PREFIX}weight_abs/{name}"] = float(w.abs().mean())
        weight_sum += float(w.abs().sum())
        weight_count += w.numel()
        sq = [g.pow(2).sum() for n, g in grad_of.items()
              if g is not None and n.rsplit(".", 1)[0] == name]
        row[f"{PREFIX}grad_norm/{name}"] = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
    if weight_count:
        row[f"{PREFIX}weight_abs"] = weight_sum / weight_count
    return row


class Probe:
    """One fixed probe batch per task, the metrics on the current task's probe, and their
    history over the run.

    The probe of a task is captured the first time it is measured and the host has data of
    that task (by default ``host.importance_batches()``: the training set, the replay
    buffer or the stored rollouts; a host with its own random stream passes ``batches``
    drawn from a separate one), then kept: every later evaluation measures the same samples.
    """

    def __init__(self, tau: float = DEFAULT_TAU, delta: float = DEFAULT_DELTA,
                 size: int = DEFAULT_PROBE_SIZE) -> None:
        check_settings(tau, delta, size)
        self.tau, self.delta, self.size = float(tau), float(delta), int(size)
        self.batches: dict[int, dict[str, torch.Tensor]] = {}
        #: steps of the measured evaluations, and each metric's value there (None: absent)
        self.steps: list[int] = []
        self.series: dict[str, list[float | None]] = {}
        self._layers: tuple[int, Layers] | None = None

    def capture(self, host: object, task: int,
                batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]] | None = None,
                complete: bool = False) -> bool:
        """Fix the probe of ``task`` from the host's current data; False while it holds
        fewer than ``size`` samples (a replay buffer or rollout store early in the task),
        unless ``complete`` says the data is all there is (a fixed training set)."""
        if task in self.batches:
            return True
        source = host.importance_batches if batches is None else batches  # type: ignore[attr-defined]
        parts: list[Mapping[str, torch.Tensor]] = []
        have = 0
        for batch in source():
            parts.append(batch)
            have += len(next(iter(batch.values())))
            if have >= self.size:
                break
        if not parts or (have < self.size and not complete):
            return False
        keys = parts[0].keys()
        self.batches[task] = {
            k: torch.cat([p[k] for p in parts])[: self.size].detach().clone() for k in keys
        }
        return True

    def measure(self, host: object, task: int, step: int,
                batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]] | None = None,
                complete: bool = False) -> dict[str, float]:
        """Metrics on ``task``'s probe (captured now if needed), recorded at ``step``; {}
        while the task has too little data (see :meth:`capture`)."""
        if not self.capture(host, task, batches, complete):
            return {}
        module = host.module  # type: ignore[attr-defined]
        if self._layers is None or self._layers[0] != id(module):
            self._layers = (id(module), find_layers(module, host.trained_parameters()))  # type: ignore[attr-defined]
        row = measure(host, self.batches[task], tau=self.tau, delta=self.delta,
                      layers=self._layers[1])
        self._record(step, row)
        return row

    def _record(self, step: int, row: Mapping[str, float]) -> None:
        n = len(self.steps)
        self.steps.append(int(step))
        for key in row.keys() - self.series.keys():
            self.series[key] = [None] * n
        for key, values in self.series.items():
            values.append(row.get(key))

    def history(self) -> dict[str, object]:
        """JSON-ready: settings, steps and series (results.json's ``plasticity``)."""
        return {"tau": self.tau, "delta": self.delta, "probe_size": self.size,
                "steps": list(self.steps), "series": {k: list(v) for k, v in self.series.items()}}

    def state_dict(self) -> dict[str, object]:
        return {**self.history(), "batches": {int(t): dict(b) for t, b in self.batches.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        batches = state["batches"]
        series = state["series"]
        assert isinstance(batches, Mapping) and isinstance(series, Mapping)
        self.batches = {int(t): dict(b) for t, b in batches.items()}
        self.steps = [int(s) for s in state["steps"]]  # type: ignore[union-attr]
        self.series = {str(k): list(v) for k, v in series.items()}

