"""YAML configs and the per-method options derived from the strategies' constructors.

Every method hyperparameter becomes a CLI option ``--<method>-<param>`` and a YAML key
(``ewc-lam: 100`` or nested ``ewc: {lam: 100}``), read off the constructor signature, so a
new option on a strategy is reachable from the command line without touching the CLI.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crl.strategies import METHODS, strategy_class

#: Constructor arguments the runner fills in itself (from the benchmark and the run seed).
AUTOMATIC = {"self", "seed", "num_tasks"}


@dataclass(frozen=True)
class MethodOption:
    method: str
    param: str
    type: type
    default: Any
    #: the words the option accepts, where the strategy declares them (``option_choices``)
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return f"{self.method}-{self.param.replace('_', '-')}"

    @property
    def dest(self) -> str:
        return f"{self.method}_{self.param}"


def _base_type(annotation: Any, default: Any) -> type:
    """The scalar type of a constructor argument (Optional[...] unwrapped); ``list`` for a
    sequence of numbers (given as ``0.5,0.25`` on the command line, a list in YAML)."""
    if isinstance(default, bool):
        return bool
    if isinstance(annotation, str) and annotation.replace(" ", "").startswith(
            ("Sequence[float]", "list[float]", "Sequence[int]", "list[int]")):
        return list
    if default is not None and type(default) in (int, float, str):
        return type(default)
    if isinstance(annotation, str):
        for name, tp in (("bool", bool), ("int", int), ("float", float), ("str", str)):
            if name in annotation:
                return tp
        return str
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if args and args[0] in (bool, int, float, str):
            return args[0]
    return annotation if annotation in (bool, int, float, str) else str


def method_options() -> list[MethodOption]:
    """Every scalar constructor option of every registered method."""
    out: list[MethodOption] = []
    for method in METHODS:
        cls = strategy_class(method)
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name in AUTOMATIC or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            default = None if param.default is param.empty else param.default
            tp = _base_type(param.annotation, default)
            if default is not None and not isinstance(default, (bool, int, float, str)):
                continue  # lists and other structured options come from YAML only
            out.append(MethodOption(method, name, tp, default,
                                    getattr(cls, "option_choices", {}).get(name)))
    return out


def check_seed(seed: Any) -> int:
    """A run seed as numpy and torch take it: an integer in [0, 2**32 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32 - 1], got {seed!r}")
    return seed


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; a missing file or bad YAML names the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of option: value, not {data!r}")
    return data


def flatten_keys(data: Mapping[str, Any], methods: Iterable[str] = METHODS) -> dict[str, Any]:
    """YAML keys to option dests: dashes → underscores, ``{ewc: {lam: 1}}`` → ``ewc_lam``."""
    methods = set(methods)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).strip().replace("-", "_")
        if isinstance(value, dict) and dest in methods:
            for sub, v in value.items():
                flat[f"{dest}_{str(sub).strip().replace('-', '_')}"] = v
        else:
            flat[dest] = value
    return flat


def flatten_config(data: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """:func:`flatten_keys`, and unknown keys raise with the list of valid ones, so a typo
    never silently does nothing."""
    flat = flatten_keys(data)
    unknown = sorted(set(flat) - known)
    if unknown:
        valid = ", ".join(sorted(k.replace("_", "-") for k in known))
        raise ValueError(f"unknown config keys: {', '.join(unknown)}. Valid keys: {valid}")
    return flat


def split_list(value: Any, cast: type = str, option: str | None = None) -> list[Any]:
    """``"a,b"`` or a YAML list → a list of ``cast`` values; an item that is not a ``cast``
    is a ValueError naming ``option`` (e.g. ``--hidden``) and the expected form."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = []
    for v in items:
        text = str(v).strip()
        if not text:
            continue
        try:
            out.append(cast(text))
        except ValueError:
            where = f"{option}: " if option else ""
            kind = {int: "an integer", float: "a number"}.get(cast, cast.__name__)
            example = {"--seeds": "0,1,2", "--hidden": "400,400", "--net-arch": "64,64"}.get(
                option or "", "0.5,0.25" if cast is float else "a,b")
            raise ValueError(f"{where}{text!r} is not {kind}; give a comma-separated list, "
                             f"e.g. {example}") from None
    return out
