"""User sequences from YAML files, with the same validation as the built-in ones.

Format (every key but ``name``, ``tasks`` and ``steps_per_task`` is optional)::

    name: MyCartPoles
    steps_per_task: 20000          # or one number per task: [20000, 50000]
    cycles: 1
    seed: 0
    shuffle: false
    pad_observations: false
    description: CartPole, heavier, swapped
    tasks:
      - env_id: CartPole-v1        # any registered Gymnasium id
        name: cartpole
        kwargs: {max_episode_steps: 200}
        low: 0                     # score bounds (omit: measure them)
        high: 200
        score_kind: return         # or success: the success rate of info["success"]
      - env_id: CartPole-v1
        name: cartpole-heavy
        wrappers:                  # names: envs.wrappers.WRAPPERS, gymnasium.wrappers.*,
          - cartpole_physics: {masspole: 0.5}   # or "package.module:attribute"
          - name: permute_actions
            kwargs: {permutation: [1, 0]}
          - RecordEpisodeStatistics
      - atari: {game: Pong, transform: hflip}   # shortcuts to the built-in task builders:
      - metaworld: {env_name: hammer-v3}        # atari, cartpole, pendulum, acrobot, mujoco,
                                                # metaworld
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from envs.errors import EnvConfigError
from envs.sequence import TaskSequence
from envs.spec import TaskSpec, WrapperSpec

_SEQUENCE_KEYS = {
    "name", "tasks", "steps_per_task", "cycles", "seed", "shuffle", "pad_observations",
    "description",
}
_TASK_KEYS = {"env_id", "name", "kwargs", "wrappers", "low", "high", "requires", "extra",
              "score_kind"}


def _builders() -> dict[str, Callable[..., TaskSpec]]:
    from envs.atari import atari_task
    from envs.classic import acrobot_task, cartpole_task, pendulum_task
    from envs.metaworld import metaworld_task
    from envs.mujoco import mujoco_task

    def atari(game: str, **kw: Any) -> TaskSpec:
        return atari_task(game, **kw)

    def cartpole(name: str = "cartpole", **kw: Any) -> TaskSpec:
        return cartpole_task(name, **kw)

    def pendulum(name: str = "pendulum", **kw: Any) -> TaskSpec:
        return pendulum_task(name, **kw)

    def acrobot(name: str = "acrobot", **kw: Any) -> TaskSpec:
        return acrobot_task(name, **kw)

    def mujoco(env_id: str, name: str | None = None, **kw: Any) -> TaskSpec:
        return mujoco_task(env_id, name or env_id, **kw)

    return {
        "atari": atari,
        "cartpole": cartpole,
        "pendulum": pendulum,
        "acrobot": acrobot,
        "mujoco": mujoco,
        "metaworld": metaworld_task,
    }


def _wrapper(entry: Any, where: str) -> WrapperSpec:
    if isinstance(entry, str):
        return WrapperSpec(entry)
    if isinstance(entry, Mapping):
        if "name" in entry:
            unknown = set(entry) - {"name", "kwargs"}
            if unknown:
                raise EnvConfigError(f"{where}: unknown keys {sorted(unknown)}; use name, kwargs.")
            kwargs = entry.get("kwargs") or {}
            if not isinstance(kwargs, Mapping):
                raise EnvConfigError(f"{where}: kwargs must be a mapping, got {kwargs!r}.")
            return WrapperSpec(entry["name"], kwargs)
        if len(entry) == 1:
            (name, kwargs), = entry.items()
            kwargs = kwargs or {}
            if not isinstance(kwargs, Mapping):
                raise EnvConfigError(
                    f"{where}: the arguments of wrapper {name!r} must be a mapping, got {kwargs!r}."
                )
            return WrapperSpec(name, kwargs)
    raise EnvConfigError(
        f"{where}: a wrapper is a name, {{name: ..., kwargs: {{...}}}} or {{<name>: {{...}}}}; "
        f"got {entry!r}."
    )


def _task(entry: Any, where: str) -> TaskSpec:
    if not isinstance(entry, Mapping):
        raise EnvConfigError(f"{where}: a task must be a mapping with env_id, got {entry!r}.")
    builders = _builders()
    shortcut = [k for k in entry if k in builders]
    if shortcut:
        if len(entry) != 1:
            raise EnvConfigError(
                f"{where}: a '{shortcut[0]}:' shortcut takes its arguments inside it, alone; "
                f"got keys {sorted(entry)}."
            )
        args = entry[shortcut[0]] or {}
        if not isinstance(args, Mapping):
            raise EnvConfigError(f"{where}: {shortcut[0]}: needs a mapping of arguments.")
        try:
            return builders[shortcut[0]](**args)
        except TypeError as exc:
            raise EnvConfigError(f"{where}: bad arguments for {shortcut[0]}: {exc}.") from exc
    unknown = set(entry) - _TASK_KEYS
    if unknown:
        raise EnvConfigError(
            f"{where}: unknown keys {sorted(unknown)}; a task takes {sorted(_TASK_KEYS)} or one "
            f"of the shortcuts {sorted(builders)}."
        )
    if "env_id" not in entry:
        raise EnvConfigError(f"{where}: missing env_id (a registered Gymnasium id).")
    wrappers = entry.get("wrappers") or []
    if not isinstance(wrappers, list):
        raise EnvConfigError(f"{where}: wrappers must be a list, got {wrappers!r}.")
    for key in ("requires",):
        if key in entry and not isinstance(entry[key], list):
            raise EnvConfigError(f"{where}: {key} must be a list, got {entry[key]!r}.")
    try:
        return TaskSpec(
            entry["env_id"],
            kwargs=entry.get("kwargs") or {},
            wrappers=[_wrapper(w, f"{where}, wrapper {j}") for j, w in enumerate(wrappers)],
            name=entry.get("name") or "",
            low=entry.get("low"),
            high=entry.get("high"),
            requires=entry.get("requires") or (),
            extra=entry.get("extra"),
            score_kind=entry.get("score_kind") or "return",
        )
    except EnvConfigError as exc:
        if str(exc).startswith(where):
            raise
        raise EnvConfigError(f"{where}: {exc}") from exc


def sequence_from_dict(data: Any, source: str = "<dict>") -> TaskSequence:
    """Build a :class:`TaskSequence` from parsed YAML; errors name ``source`` and the task."""
    if not isinstance(data, Mapping):
        raise EnvConfigError(
            f"{source}: the top level must be a mapping with name, tasks and steps_per_task; "
            f"got {type(data).__name__}."
        )
    unknown = set(data) - _SEQUENCE_KEYS
    if unknown:
        raise EnvConfigError(
            f"{source}: unknown keys {sorted(unknown)}; a sequence takes {sorted(_SEQUENCE_KEYS)}."
        )
    missing = [k for k in ("name", "tasks", "steps_per_task") if k not in data]
    if missing:
        raise EnvConfigError(f"{source}: missing required keys {missing}.")
    if not isinstance(data["tasks"], list) or not data["tasks"]:
        raise EnvConfigError(f"{source}: tasks must be a non-empty list, got {data['tasks']!r}.")
    try:
        tasks = [_task(t, f"{source}: task {i}") for i, t in enumerate(data["tasks"])]
        fields = {k: data[k] for k in _SEQUENCE_KEYS - {"tasks"} if k in data}
        return TaskSequence(tasks=tasks, **fields)
    except EnvConfigError as exc:
        msg = str(exc)
        if msg.startswith(source):
            raise
        raise EnvConfigError(f"{source}: {msg}") from exc


def load_sequence(path: str | os.PathLike) -> TaskSequence:
    """Read a sequence from a YAML file (see the module docstring for the format)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as exc:
        raise EnvConfigError(f"Sequence file {path!r} does not exist.") from exc
    except yaml.YAMLError as exc:
        raise EnvConfigError(f"{path}: not valid YAML: {exc}") from exc
    return sequence_from_dict(data, path)
