"""Continual-learning methods, one module each, on the contract in :mod:`crl.strategies.base`."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from crl.strategies.base import Batch, Host, Strategy

#: method name -> "module:Class"; modules are imported on first use.
METHODS: dict[str, str] = {
    "finetune": "crl.strategies.finetune:Finetune",
    "l2": "crl.strategies.l2:L2",
    "ewc": "crl.strategies.ewc:EWC",
    "mas": "crl.strategies.mas:MAS",
    "packnet": "crl.strategies.packnet:PackNet",
    "agem": "crl.strategies.agem:AGEM",
    "replay": "crl.strategies.replay:Replay",
    "si": "crl.strategies.si:SI",
    "lwf": "crl.strategies.lwf:LwF",
    "der": "crl.strategies.der:DER",
    "bc": "crl.strategies.bc:BC",
    # plasticity interventions: alone, or combined with a method (ewc+redo)
    "l2init": "crl.strategies.l2init:L2Init",
    "snp": "crl.strategies.snp:ShrinkPerturb",
    "redo": "crl.strategies.redo:ReDo",
    "cbp": "crl.strategies.cbp:CBP",
}
#: the plasticity interventions among METHODS (crl list methods shows them apart)
INTERVENTIONS: tuple[str, ...] = ("l2init", "snp", "redo", "cbp")
#: joins the methods of a combined strategy: ``ewc+redo``
JOIN = "+"


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def strategy_class(name: str) -> type[Strategy]:
    """The class of a method, or a ValueError that lists the known names."""
    key = _normalise(name)
    if key not in METHODS:
        hint = (f"; combine methods with {JOIN!r} (e.g. ewc+redo) and build them with "
                "make_strategy" if JOIN in key else "")
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(METHODS)}{hint}"
        )
    module_name, cls_name = METHODS[key].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def method_members(name: str) -> list[str]:
    """``"ewc+redo"`` -> ``["ewc", "redo"]``, each checked; a single method -> ``[name]``."""
    members = [_normalise(part) for part in str(name).split(JOIN)]
    if any(not m for m in members):
        raise ValueError(f"method {name!r} has an empty part; write methods as ewc or ewc+redo")
    for m in members:
        try:
            strategy_class(m)
        except ValueError as exc:
            if len(members) == 1:
                raise
            raise ValueError(f"{exc} (in the combination {name!r})") from None
    if len(set(members)) != len(members):
        raise ValueError(f"method {name!r} names a method twice; name each once")
    return members


def check_method(name: str) -> str:
    """The normalised method name (a single method or a ``+`` combination), or ValueError."""
    return JOIN.join(method_members(name))


def user_options(per_method: Mapping[str, Mapping[str, Any]] | None, method: str
                 ) -> dict[str, Any]:
    """The options given for ``method`` out of a per-method mapping (``{"ewc": {...}}``): its
    own, or for a combination one entry per member (``{"ewc": {...}, "redo": {...}}``)."""
    per_method = per_method or {}
    members = method_members(method)
    if len(members) == 1:
        return dict(per_method.get(members[0]) or {})
    return {m: dict(per_method.get(m) or {}) for m in members}


def make_strategy(name: str, **options: Any) -> Strategy:
    """Build a method from its name and the options its constructor accepts.

    Options the method does not take are ignored, so one flat config (CLI/YAML) can carry
    the options of every method; a bad value for an accepted option raises. A combination
    (``"ewc+redo"``) takes each member's options under its name (``ewc={"lam": 10}``) plus
    the shared flat ones (``num_tasks``, ``seed``), and returns a
    :class:`crl.strategies.composite.Composite`.
    """
    members = method_members(name)
    if len(members) > 1:
        from crl.strategies.composite import Composite

        shared = {k: v for k, v in options.items() if k not in members}
        return Composite([
            make_strategy(m, **(shared | dict(options.get(m) or {}))) for m in members
        ])
    cls = strategy_class(members[0])
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    bad = [f"unknown {members[0]} {k} {kwargs[k]!r} (choose one of: {', '.join(words)})"
           for k, words in cls.option_choices.items() if k in kwargs and kwargs[k] not in words]
    if len(bad) > 1:  # one bad word: the constructor's own message; several: all at once
        raise ValueError("; ".join(bad))
    return cls(**kwargs)


__all__ = ["INTERVENTIONS", "JOIN", "METHODS", "Batch", "Host", "Strategy", "check_method",
           "make_strategy", "method_members", "strategy_class", "user_options"]
