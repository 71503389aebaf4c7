"""Built-in sequences by name, their listing, and registration with Gymnasium.

``gymnasium.make("crl/<Name>-v0")`` works for every built-in sequence once ``envs`` is
imported (``import envs`` registers them; so does ``gymnasium.make("envs:crl/<Name>-v0")``).
Keyword arguments of ``gymnasium.make`` go to :func:`make_sequence_env`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym

from envs import atari, classic, metaworld, mixed, mujoco
from envs.continual import ContinualEnv, SwitchMode
from envs.errors import EnvConfigError
from envs.sequence import TaskSequence

NAMESPACE = "crl"
VERSION = 0

SEQUENCES: dict[str, Callable[..., TaskSequence]] = {
    **classic.SEQUENCES,
    **mixed.SEQUENCES,
    **atari.SEQUENCES,
    **mujoco.SEQUENCES,
    **metaworld.SEQUENCES,
}
_FIELDS = {f.name for f in dataclasses.fields(TaskSequence)} - {"name", "tasks"}


def sequence_names() -> list[str]:
    return list(SEQUENCES)


def gym_id(name: str) -> str:
    return f"{NAMESPACE}/{name}-v{VERSION}"


def get_sequence(name: str, **overrides: Any) -> TaskSequence:
    """A built-in sequence by name, or a user sequence from a ``.yaml``/``.yml`` path.

    ``overrides`` set :class:`TaskSequence` fields (``steps_per_task``, ``cycles``, ``seed``,
    ``shuffle``, ``pad_observations``) or arguments of the sequence's builder (e.g.
    ``horizon`` for CW10/CW20).
    """
    if isinstance(name, str) and name.endswith((".yaml", ".yml")):
        from envs.yaml_io import load_sequence

        sequence = load_sequence(name)
        builder_kwargs: dict[str, Any] = {}
    else:
        builder = SEQUENCES.get(name)
        if builder is None:
            close = difflib.get_close_matches(str(name), SEQUENCES, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise EnvConfigError(
                f"Unknown sequence {name!r}.{hint} Built-in sequences: "
                f"{', '.join(SEQUENCES)}; or give the path of a YAML sequence file."
            )
        params = set(inspect.signature(builder).parameters)
        builder_kwargs = {k: v for k, v in overrides.items() if k in params}
        sequence = builder(**builder_kwargs)
    unknown = set(overrides) - _FIELDS - set(builder_kwargs)
    if unknown:
        raise EnvConfigError(
            f"Unknown option(s) {sorted(unknown)} for sequence {name!r}; options: "
            f"{sorted(_FIELDS | set(builder_kwargs))}."
        )
    fields = {k: v for k, v in overrides.items() if k in _FIELDS}
    return sequence.replace(**fields) if fields else sequence


def make(
    name: str,
    switch_mode: SwitchMode = "immediate",
    append_task_id: bool = False,
    render_mode: str | None = None,
    **overrides: Any,
) -> ContinualEnv:
    """``ContinualEnv`` of a sequence by name or YAML path (overrides as :func:`get_sequence`)."""
    return ContinualEnv(
        get_sequence(name, **overrides),
        switch_mode=switch_mode,
        append_task_id=append_task_id,
        render_mode=render_mode,
    )


def make_sequence_env(sequence: str, **kwargs: Any) -> ContinualEnv:
    """Gymnasium entry point of ``crl/<sequence>-v0``."""
    return make(sequence, **kwargs)


def register_sequences() -> None:
    """Register ``crl/<Name>-v0`` for every built-in sequence (idempotent)."""
    for name in SEQUENCES:
        env_id = gym_id(name)
        if env_id not in gym.registry:
            gym.register(
                env_id,
                entry_point="envs.registry:make_sequence_env",
                kwargs={"sequence": name},
            )


def extra_installed(extra: str) -> bool:
    module = {"atari": "ale_py", "mujoco": "mujoco", "metaworld": "metaworld"}.get(extra, extra)
    import importlib.util

    return importlib.util.find_spec(module) is not None


def sequence_rows() -> list[dict[str, Any]]:
    """One row per built-in sequence, for tables (``crl list sequences``)."""
    rows = []
    for name, builder in SEQUENCES.items():
        s = builder()
        rows.append(
            {
                "name": name,
                "gym_id": gym_id(name),
                "tasks": list(s.task_names),
                "steps_per_task": s.steps_per_task,
                "cycles": s.cycles,
                "total_steps": s.total_steps,
                "extra": ", ".join(s.extras),
                "installed": all(extra_installed(e) for e in s.extras),
                "description": s.description,
            }
        )
    return rows


def describe_sequences() -> str:
    """Every built-in sequence with its tasks and default budget, as plain text."""
    blocks = []
    for row in sequence_rows():
        s = row["steps_per_task"]
        budget = f"{s:,}" if isinstance(s, int) else ", ".join(f"{x:,}" for x in s)
        extra = ""
        if row["extra"]:
            state = "installed" if row["installed"] else "not installed"
            extra = f"  [needs extra '{row['extra']}': {state}]"
        head = (
            f"{row['name']} ({row['gym_id']}): {len(row['tasks'])} tasks, {budget} steps/task, "
            f"{row['cycles']} cycle(s), {row['total_steps']:,} steps{extra}"
        )
        lines = [head, f"    {row['description']}"] if row["description"] else [head]
        lines.append("    tasks: " + ", ".join(row["tasks"]))
        blocks.append("\n".join(lines))
    return "\n".join(blocks) + os.linesep
