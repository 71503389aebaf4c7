"""Continual-learning methods, one module each, on the contract in :mod:`crl.strategies.base`."""

from __future__ import annotations

import importlib
import inspect
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
}


def strategy_class(name: str) -> type[Strategy]:
    """The class of a method, or a ValueError that lists the known names."""
    key = name.strip().lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(METHODS)}"
        )
    module_name, cls_name = METHODS[key].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def make_strategy(name: str, **options: Any) -> Strategy:
    """Build a method from its name and the options its constructor accepts.

    Options the method does not take are ignored, so one flat config (CLI/YAML) can carry
    the options of every method; a bad value for an accepted option raises.
    """
    cls = strategy_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(**kwargs)


__all__ = ["Batch", "Host", "METHODS", "Strategy", "make_strategy", "strategy_class"]
