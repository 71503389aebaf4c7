"""Hidden units of a host's networks, their activity during training, and recycling a unit:
fresh incoming weights, zero outgoing weights (ReDo and Continual Backprop share this).

A *unit* is one output (neuron, or channel of a convolution) of a parametrised layer that
feeds an activation module. Units are found on the first training forward pass after
:meth:`UnitTracker.attach`, by tensor identity: the activation's input is the output of its
*producer* (``nn.Linear`` / ``nn.Conv2d``, whose row j is unit j's incoming weights), and
every module that receives the activation's output as its first input is a *consumer*
(its 2-d-or-more weights' column j carries unit j outward, whatever the module: an
``nn.Linear``, a convolution, a per-task multi-head layer). A unit whose output reaches the
next layer only through other operations (e.g. ``Flatten`` before the Nature CNN's linear
layer) has no consumer found and is never recycled: zeroing its outgoing weights is what
keeps the network's function unchanged when it is re-initialised.

Activity is accumulated from the host's own training forward passes (grad enabled, module in
training mode); evaluation, target computations and importance estimates do not count.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from crl.plasticity import ACTIVATIONS, unit_activity

PRODUCERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass
class UnitLayer:
    """One layer of units: its producer, activation and consumers (names in ``module``)."""

    activation: str
    producer: str
    consumers: list[str] = field(default_factory=list)
    width: int = 0


class UnitTracker:
    """Finds the unit layers of ``module`` and accumulates their activity during training.

    ``activity[layer]`` is the running sum of E|h| per unit over recorded forward passes and
    ``calls[layer]`` their number; :meth:`take` returns the mean and resets the sums;
    ``last[layer]`` is the E|h| of the latest recorded pass.
    """

    def __init__(self) -> None:
        self.layers: dict[str, UnitLayer] = {}
        self.activity: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.last: dict[str, torch.Tensor] = {}
        self._named: dict[str, nn.Module] = {}  # the attached module's, by name
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._discovered = False

    def attach(self, module: nn.Module) -> None:
        """Hook ``module``'s activations (found lazily on the next training forward)."""
        self.detach()
        self._discovered = False
        named = self._named = dict(module.named_modules())
        acts = {n: m for n, m in named.items() if isinstance(m, ACTIVATIONS)}
        params = {n: m for n, m in named.items() if own_parameters(m)}
        outputs: dict[int, str] = {}  # id(output tensor) -> producer name, this pass
        act_out: dict[int, str] = {}  # id(activation output) -> activation name, this pass
        found: dict[str, UnitLayer] = {}

        def training() -> bool:
            return torch.is_grad_enabled() and module.training

        def on_param_module(name: str) -> Callable[..., None]:
            def fn(_m: nn.Module, args: tuple, out: object) -> None:
                if self._discovered or not training():
                    return
                if isinstance(out, torch.Tensor) and isinstance(_m, PRODUCERS):
                    outputs[id(out)] = name
                if args and isinstance(args[0], torch.Tensor) and id(args[0]) in act_out:
                    layer = found[act_out[id(args[0])]]
                    if name not in layer.consumers and name != layer.producer:
                        layer.consumers.append(name)
            return fn

        def on_activation(name: str) -> Callable[..., None]:
            def fn(_m: nn.Module, args: tuple, out: object) -> None:
                if not training() or not isinstance(out, torch.Tensor):
                    return
                if not self._discovered and args and id(args[0]) in outputs:
                    found.setdefault(name, UnitLayer(name, outputs[id(args[0])]))
                    act_out[id(out)] = name
                if self._discovered and name in self.layers:
                    act = unit_activity(out)
                    self.last[name] = act
                    self.activity[name] = self.activity.get(name, 0) + act
                    self.calls[name] = self.calls.get(name, 0) + 1
            return fn

        def on_module_done(_m: nn.Module, _args: tuple, _out: object) -> None:
            if self._discovered or not training():
                return
            self.layers = {}
            for name, layer in found.items():
                producer = named[layer.producer]
                layer.width = int(producer.weight.shape[0])
                self.layers[name] = layer
            self._discovered = True

        for name, m in params.items():
            self._handles.append(m.register_forward_hook(on_param_module(name)))
        for name, m in acts.items():
            self._handles.append(m.register_forward_hook(on_activation(name)))
        # the whole module's first training forward ends discovery; for hosts that call
        # submodules directly (SB3 calls actor and critic, not the policy), discovery ends
        # at the first recorded activation of a pass after one already seen
        self._handles.append(module.register_forward_hook(on_module_done))
        self._finish_on_repeat(acts, found, on_module_done)

    def _finish_on_repeat(self, acts: dict[str, nn.Module], found: dict[str, UnitLayer],
                          done: Callable[..., None]) -> None:
        seen: set[str] = set()

        def fn(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _args: tuple, _out: object) -> None:
                if self._discovered or not (torch.is_grad_enabled() and _m.training):
                    return
                if name in seen:  # a second pass began: the first one is complete
                    done(_m, _args, _out)
                    return
                seen.add(name)
            return hook

        for name, m in acts.items():
            self._handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: fn(name)(mod, args, None)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def ready(self) -> bool:
        return self._discovered

    def take(self) -> dict[str, torch.Tensor]:
        """Mean E|h| per unit since the last call, per layer; resets the sums."""
        out = {n: self.activity[n] / self.calls[n] for n in self.activity if self.calls.get(n)}
        self.activity, self.calls = {}, {}
        return out

    # -- recycling -------------------------------------------------------------------------
    def outgoing(self, name: str) -> list[nn.Parameter]:
        """The consumers' weights whose dim 1 carries the layer's units outward."""
        width = self.layers[name].width
        return [p for cname in self.layers[name].consumers
                for p in own_parameters(self._named[cname])
                if p.dim() >= 2 and p.shape[1] == width]

    def recyclable(self, name: str) -> bool:
        """Units whose outgoing weights are known (see the module docstring)."""
        return bool(self.layers[name].consumers)

    @torch.no_grad()
    def recycle(self, name: str, units: torch.Tensor, generator_seed: int,
                optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
        """Re-initialise the incoming weights (and bias) of ``units`` of layer ``name`` as the
        producer's own initialiser draws them, and zero their outgoing weights in every
        consumer; in ``optimizers`` the recycled weights' per-weight state (Adam's moments,
        SGD's momentum) is zeroed too, so that the old weights' gradient history does not
        steer the fresh ones (Sokar et al. 2023 reset the moments; Dohare et al. 2024's
        AdamGnT also restarts a per-weight step count, which torch's Adam does not keep).
        Returns the number of units recycled."""
        if units.numel() == 0:
            return 0
        layer = self.layers[name]
        producer = self._named[layer.producer]
        # a CPU copy drawn from its own seed: no random stream of training (CPU or GPU) moves
        fresh = copy.deepcopy(producer).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(generator_seed)
            fresh.reset_parameters()  # type: ignore[operator]
        idx = units.to(producer.weight.device).long()
        cpu_idx = idx.cpu()
        producer.weight[idx] = fresh.weight[cpu_idx].to(producer.weight)
        touched = [(producer.weight, 0)]
        if producer.bias is not None:
            producer.bias[idx] = fresh.bias[cpu_idx].to(producer.bias)
            touched.append((producer.bias, 0))
        for p in self.outgoing(name):
            p[:, idx] = 0.0
            touched.append((p, 1))
        for param, dim in touched:
            clear_optimizer_state(optimizers, param, dim, idx)
        return int(idx.numel())

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        """Activity sums and the layers found (a resume records its first pass, as the
        uninterrupted run does, instead of spending it on discovery)."""
        layers = {n: {"activation": u.activation, "producer": u.producer,
                      "consumers": list(u.consumers), "width": u.width}
                  for n, u in self.layers.items()} if self._discovered else None
        return {"activity": dict(self.activity), "calls": dict(self.calls), "layers": layers}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.activity = dict(state.get("activity", {}))  # type: ignore[arg-type]
        self.calls = {str(k): int(v) for k, v in dict(state.get("calls", {})).items()}  # type: ignore[arg-type]
        layers = state.get("layers")
        if isinstance(layers, dict):
            self.layers = {str(n): UnitLayer(str(u["activation"]), str(u["producer"]),
                                             [str(c) for c in u["consumers"]], int(u["width"]))
                           for n, u in layers.items()}
            self._discovered = True



def host_optimizers(host: object) -> list[torch.optim.Optimizer]:
    """The host's optimisers (the contract's optional ``optimizers()``; none if absent)."""
    method = getattr(host, "optimizers", None)
    return list(method()) if callable(method) else []


@torch.no_grad()
def clear_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], param: torch.Tensor,
                          dim: int, index: torch.Tensor) -> None:
    """Zero the slices ``index`` along ``dim`` of every per-weight state tensor (those of
    ``param``'s shape) that ``optimizers`` keep for ``param``; scalar state (Adam's step
    count) is shared by the whole tensor and stays."""
    for optimizer in optimizers:
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.index_fill_(dim, index.to(value.device), 0.0)


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a module computes with itself: its direct ones and those of its
    parameter containers (a multi-head layer keeps one weight per head in a ParameterList),
    not those of child modules that compute on their own."""
    out = list(module.parameters(recurse=False))
    for child in module.children():
        if isinstance(child, (nn.ParameterList, nn.ParameterDict)):
            out.extend(child.parameters())
    return out


def unit_seed(seed: int, step: int, layer: str) -> int:
    """An independent, reproducible draw per (run seed, step, layer) for fresh weights."""
    state = np.random.SeedSequence([seed, step, zlib.crc32(layer.encode())]).generate_state(1)
    return int(state[0])
