"""Sums over samples of squared (or absolute) per-sample gradients, without per-sample
Jacobians, for the layers whose gradient factorises: ``nn.Linear`` and ``nn.Conv2d``.

A layer z = W a + b applied once to every sample n has the per-sample gradient
∂s_n/∂W = δ_n a_nᵀ, with δ_n = ∂s_n/∂z_n the backpropagated signal. For an element-wise map
f with f(xy) = f(x) f(y) (square: the diagonal Fisher; absolute value: MAS),

    Σ_n f(δ_n a_nᵀ) = f(δ)ᵀ f(a)          (B x out)ᵀ (B x in),

so one batched backward pass per per-sample scalar gives the sum exactly, and the per-sample
gradient is never formed (Dangel et al. 2020, "BackPACK", derive the same identity for the
diagonal generalised Gauss-Newton). Every δ_n comes out of *one* backward pass of Σ_n s_n
because samples do not interact in an eval-mode forward pass. With S scalars per sample (the
exact Fisher: one per class, or two per action dimension of a Gaussian) the S passes add up
inside f(δ) already: Σ_s Σ_n f(δ^s_n) f(a_n) = Σ_n (Σ_s f(δ^s_n)) f(a_n).

Where the layer sees several positions per sample (a convolution, a Linear over a sequence,
a layer called twice) the per-sample gradient is a sum over positions, f does not factorise,
and :class:`LayerGradientSums` forms the per-sample gradient of *that layer* only
(D_nᵀ A_n over positions, with ``F.unfold`` for convolutions), in row chunks bounded by a
float budget. Parameters of any other module fall back to the ``torch.func`` per-sample
Jacobian (:mod:`crl.strategies.importance`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

#: the element-wise maps this path can sum: each must satisfy f(xy) = f(x) f(y).
MULTIPLICATIVE: dict[Callable[[torch.Tensor], torch.Tensor], str] = {
    torch.square: "square",
    torch.abs: "abs",
}

#: (parameter tensors by name, batch, extra) -> the (B, S) per-sample scalars, computed with
#: the given tensors in place of the module's parameters.
BatchScalars = Callable[
    [dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor
]


class FastPathUnavailable(RuntimeError):
    """The host's forward pass does something this path cannot account for (an in-place
    change of a layer's input or output, scalars that are not per sample): the caller falls
    back to per-sample Jacobians."""


def _linear_supported(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _conv_supported(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and type(m).forward is nn.Conv2d.forward
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def supported(m: nn.Module) -> bool:
    """A module whose per-sample weight gradient this path knows how to form."""
    return _linear_supported(m) or _conv_supported(m)


def split_parameters(
    module: nn.Module, names: list[str]
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({param name: (module name, "weight"|"bias")} for the fast path, [the rest]).

    A parameter takes the fast path when it is the weight or bias of a supported module and
    no *other* module holds the same tensor (a tied weight's per-sample gradient is a sum over
    its uses in different layers, which per-layer sums cannot split). One module reachable
    under several names (SB3's shared ``features_extractor`` / ``pi_features_extractor``)
    is one layer, and several calls of one layer are handled as positions."""
    holders: dict[int, set[int]] = defaultdict(set)
    owner: dict[int, tuple[str, str]] = {}
    for mod_name, m in module.named_modules():  # each module once, under its first name
        for attr, p in m.named_parameters(recurse=False):
            holders[id(p)].add(id(m))
            if supported(m) and attr in ("weight", "bias"):
                owner[id(p)] = (mod_name, attr)
    params = dict(module.named_parameters(remove_duplicate=False))
    fast: dict[str, tuple[str, str]] = {}
    rest: list[str] = []
    for n in names:
        key = id(params[n])
        if key in owner and len(holders[key]) == 1:
            fast[n] = owner[key]
        else:
            rest.append(n)
    return fast, rest


@dataclass
class _Calls:
    """What one layer saw during one forward pass: inputs and outputs of each call."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    versions: list[tuple[int, int]] = field(default_factory=list)


@contextlib.contextmanager
def _record(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, _Calls]]:
    calls: dict[str, _Calls] = {name: _Calls() for name in modules}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            rec = calls[name]
            rec.inputs.append(args[0])
            rec.outputs.append(out)
            rec.versions.append((args[0]._version, out._version))

        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


class LayerGradientSums:
    """Σ over samples and scalars of f(per-sample gradient) for supported layers' parameters.

    ``scalars(tensors, batch, extra)`` returns the (B, S) per-sample scalars of a batch of B;
    ``params`` maps protected parameter names to their (module name, attribute) as
    :func:`split_parameters` returns them. ``budget``: floats of per-sample layer gradients
    formed at once where a layer sees several positions per sample.
    """

    def __init__(
        self,
        module: nn.Module,
        scalars: BatchScalars,
        params: Mapping[str, tuple[str, str]],
        reduce: Callable[[torch.Tensor], torch.Tensor],
        budget: int,
    ) -> None:
        if reduce not in MULTIPLICATIVE:
            raise ValueError("the layer path sums only torch.square or torch.abs")
        self.module = module
        self.scalars = scalars
        self.params = dict(params)
        self.f = reduce
        self.budget = max(1, int(budget))
        named = dict(module.named_modules())
        self.layers = {mod: named[mod] for mod, _ in self.params.values()}
        self._per_row: int | None = None

    def __call__(
        self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """{param name: Σ_n Σ_s f(∂s_{n,s}/∂θ)} over this batch, in row chunks whose
        backpropagated signals of every scalar fit the float budget."""
        size = next(iter(batch.values())).shape[0]
        rows = self._rows_per_chunk(batch, extra, size)
        total: dict[str, torch.Tensor] = {}
        for start in range(0, size, rows):
            part = {k: v[start : start + rows] for k, v in batch.items()}
            part_extra = None if extra is None else extra[start : start + rows]
            for n, v in self._chunk(part, part_extra).items():
                total[n] = v if n not in total else total[n] + v
        return total

    def _rows_per_chunk(self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None,
                        size: int) -> int:
        """Rows whose signals δ of every scalar, for the layers seen over positions, fit
        ``self.budget`` floats (a one-row forward measures them)."""
        if self._per_row is None:
            one = {k: v[:1] for k, v in batch.items()}
            try:
                with torch.no_grad(), _record(self.layers) as calls:
                    scal = self.scalars({}, one, None if extra is None else extra[:1])
            except (RuntimeError, ValueError, TypeError):
                return size  # the whole batch raises it again, with its own shapes
            per_scalar = sum(
                z[:1].numel() for name, rec in calls.items()
                if not _factorised(self.layers[name], rec) for z in rec.outputs)
            self._per_row = max(1, int(scal.numel()) * per_scalar)
        return max(1, min(size, self.budget // self._per_row))

    def _chunk(
        self, batch: dict[str, torch.Tensor], extra: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        size = next(iter(batch.values())).shape[0]
        own = dict(self.module.named_parameters(remove_duplicate=False))
        # fresh leaves so every recorded output is in the graph even if the host froze the
        # parameters (requires_grad False), and no .grad is ever written
        leaves = {n: own[n].detach().requires_grad_(True) for n in self.params}
        with torch.enable_grad(), _record(self.layers) as calls:
            scal = self.scalars(leaves, batch, extra)
        if scal.dim() == 0 or scal.shape[0] != size or scal.numel() % size:
            raise FastPathUnavailable(
                f"the scalars have shape {tuple(scal.shape)}, not one row per sample ({size})"
            )
        scal = scal.reshape(size, -1)
        for name, rec in calls.items():
            if any(a.shape[0] != size or z.shape[0] != size
                   for a, z in zip(rec.inputs, rec.outputs, strict=True)):
                raise FastPathUnavailable(
                    f"layer {name!r} does not see one row per sample (batch {size})"
                )
            for (a_v, z_v), a, z in zip(rec.versions, rec.inputs, rec.outputs, strict=True):
                if a._version != a_v or z._version != z_v:
                    raise FastPathUnavailable(
                        f"layer {name!r}: its input or output is changed in place after the call"
                    )
        return self._sums(scal, calls)

    @staticmethod
    def _inputs(layer: nn.Module, rec: _Calls, rows: slice) -> torch.Tensor:
        """(rows, positions of every call, fan-in) of the layer's inputs."""
        return torch.cat(
            [_positions_of_input(layer, a[rows].detach()) for a in rec.inputs], dim=1
        )

    # -- accumulation ----------------------------------------------------------------------
    def _sums(self, scal: torch.Tensor, calls: dict[str, _Calls]) -> dict[str, torch.Tensor]:
        f = self.f
        acc: dict[str, torch.Tensor] = {}
        outputs = [z for rec in calls.values() for z in rec.outputs]
        index = {}
        i = 0
        for name, rec in calls.items():
            index[name] = list(range(i, i + len(rec.outputs)))
            i += len(rec.outputs)
        single = {name for name, rec in calls.items() if _factorised(self.layers[name], rec)}
        # factorised layers: Σ_s f(δ^s) per sample, one outer product at the end
        delta_sums: dict[str, torch.Tensor] = {}
        # layers over positions: every scalar's δ, (B, P, out) each, for one batched product
        deltas_of: dict[str, list[torch.Tensor]] = defaultdict(list)
        n_scalars = scal.shape[1]
        for s in range(n_scalars):
            grads = torch.autograd.grad(
                scal[:, s].sum(), outputs, retain_graph=s + 1 < n_scalars, allow_unused=True
            )
            for name, rec in calls.items():
                if not rec.outputs:
                    continue
                deltas = [
                    torch.zeros_like(z) if grads[j] is None else grads[j]
                    for j, z in zip(index[name], rec.outputs, strict=True)
                ]
                if name in single:
                    fd = f(deltas[0])
                    delta_sums[name] = fd if name not in delta_sums else delta_sums[name] + fd
                else:
                    layer = self.layers[name]
                    deltas_of[name].append(
                        torch.cat([_positions_of_output(layer, x) for x in deltas], dim=1))
        per_layer = {name: self._positions(name, calls[name], d) for name, d in deltas_of.items()}
        for n, (mod, attr) in self.params.items():
            layer = self.layers[mod]
            rec = calls[mod]
            if not rec.outputs:  # the layer was not used: every gradient is zero
                acc[n] = torch.zeros_like(getattr(layer, attr))
            elif mod in single:
                d = delta_sums[mod]
                if attr == "bias":
                    acc[n] = d.sum(0)
                else:
                    acc[n] = d.transpose(0, 1) @ f(rec.inputs[0].detach())
            else:
                acc[n] = per_layer[mod][attr].reshape(getattr(layer, attr).shape)
        return acc

    def _positions(self, name: str, rec: _Calls, deltas: list[torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
        """Σ_s Σ_n f(Σ_positions δ^s_{n,p} a_{n,p}ᵀ): all scalars' per-sample gradients of a
        row chunk in one batched product (S·out rows per sample, not S products of out)."""
        layer = self.layers[name]
        d = torch.stack(deltas, dim=1)  # (B, S, P, out)
        rows, n_scalars, positions, fan_out = d.shape
        fan_in = _fan_in(layer)
        # (B, S·out, P): every scalar's signals of one sample as the rows of one matrix
        d_rows = d.permute(0, 1, 3, 2).reshape(rows, n_scalars * fan_out, positions)
        per_row = n_scalars * fan_out * fan_in + positions * fan_in
        chunk = max(1, self.budget // max(1, per_row))
        w_sum = torch.zeros(fan_out, fan_in, dtype=d.dtype, device=d.device)
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            grads = torch.bmm(d_rows[part], self._inputs(layer, rec, part))
            w_sum += self.f(grads).sum(0).reshape(n_scalars, fan_out, fan_in).sum(0)
        out = {"weight": w_sum}
        if getattr(layer, "bias", None) is not None:
            out["bias"] = self.f(d.sum(2)).sum((0, 1))
        return out


def _factorised(layer: nn.Module, rec: _Calls) -> bool:
    """A Linear called once on (B, in) rows: its sum factorises (module docstring)."""
    return (isinstance(layer, nn.Linear) and len(rec.outputs) == 1
            and rec.outputs[0].dim() == 2)


def _fan_in(layer: nn.Module) -> int:
    w = layer.weight
    return int(w[0].numel())


def _positions_of_input(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """(B, positions, fan-in) as the layer's weight sees it."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(
            a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
            stride=layer.stride,
        )  # (B, C*kh*kw, L)
        return cols.transpose(1, 2)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _positions_of_output(layer: nn.Module, d: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return d.flatten(2).transpose(1, 2)  # (B, L, out)
    return d.reshape(d.shape[0], -1, d.shape[-1])
