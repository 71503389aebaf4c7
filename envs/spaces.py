"""Space unification: one observation space and one action space for a whole sequence.

Rules (a mismatch that no rule below resolves is a clear error listing each task's spaces):

* equal action spaces are kept; Atari gets there with ``full_action_space=True``;
* Discrete action spaces of different sizes (tasks from different envs, e.g. CartPole's 2
  actions and Acrobot's 3) become ``Discrete(max n)``: a task's extra actions act as its
  action 0 (:func:`envs.wrappers.pad_actions`);
* flat Box action spaces of one dtype with different bounds or lengths (Pendulum's [-2, 2],
  InvertedPendulum's [-3, 3], Reacher's two torques) are each rescaled to [-1, 1]
  (Gymnasium's ``RescaleAction``), so one policy output means the same fraction of every
  task's range, as SAC expects, and padded to the longest (a task ignores the entries past
  its own, :func:`envs.wrappers.pad_actions`);
* floating-point Box observations of different dtypes (MuJoCo float64, classic control
  float32) are all cast to float32 (:func:`envs.wrappers.cast_observation`), what SB3's networks
  compute in anyway;
* Box observation spaces of the same shape and dtype are merged by taking the element-wise
  union of their bounds (Meta-World tasks differ only in their goal bounds), which keeps every
  task's observations inside the merged space;
* with ``pad=True``, flat Box observations of different lengths are zero-padded to the
  longest (the padding's bounds are [0, 0]);
* anything else is a :class:`SpaceMismatchError`.

:func:`adapt_task_env` applies a task's share of these changes to its env, the same for the
training env and the evaluation envs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.errors import SpaceMismatchError
from envs.wrappers import PadObservation, box_as_dtype, cast_observation, pad_actions


@dataclass(frozen=True)
class ActionAdapter:
    """How one task's actions join the sequence's action space."""

    rescale: bool = False  # Box: rescale its bounds to [-1, 1]
    pad_to: int | None = None  # Discrete: n actions; Box: entries (the extra ones ignored)

    def describe(self) -> str:
        parts = ["actions rescaled to [-1, 1]"] if self.rescale else []
        if self.pad_to:
            parts.append(f"actions padded to {self.pad_to} (a Discrete task's extra actions act "
                         "as its action 0; a Box task ignores its extra entries)")
        return ", ".join(parts)


@dataclass(frozen=True)
class UnifiedSpaces:
    observation_space: spaces.Space
    action_space: spaces.Space
    pad_to: tuple[int | None, ...]  # per task: length to pad its observations to, or None
    #: per task: None (its actions as they are) or how they are adapted
    action_adapters: tuple[ActionAdapter | None, ...] = ()
    #: the dtype every task's observations are cast to, where the tasks' dtypes differ
    observation_dtype: np.dtype | None = None
    #: per task: whether its observations are cast to ``observation_dtype``
    cast: tuple[bool, ...] = ()

    def describe_changes(self, names: Sequence[str]) -> list[str]:
        """What unification does to each task, in words (for listings and logs)."""
        out = []
        for i, name in enumerate(names):
            changes = []
            if self.cast and self.cast[i]:
                changes.append(f"observations cast to {np.dtype(self.observation_dtype).name}")
            if self.pad_to[i]:
                changes.append(f"observations zero-padded to {self.pad_to[i]}")
            a = self.action_adapters[i] if self.action_adapters else None
            if a is not None:
                changes.append(a.describe())
            if changes:
                out.append(f"{name}: " + ", ".join(changes))
        return out


def _listing(kind: str, sequence: str, names: Sequence[str], items: Sequence[spaces.Space]) -> str:
    lines = [f"The tasks of sequence {sequence!r} do not share one {kind} space:"]
    lines += [f"  task {i} {n!r}: {s}" for i, (n, s) in enumerate(zip(names, items, strict=True))]
    return "\n".join(lines)


def unify_spaces(
    sequence: str,
    names: Sequence[str],
    observation_spaces: Sequence[spaces.Space],
    action_spaces: Sequence[spaces.Space],
    pad: bool = False,
) -> UnifiedSpaces:
    """Return the sequence's shared spaces or raise :class:`SpaceMismatchError`."""
    action_space, action_adapters = _unify_actions(sequence, names, action_spaces)

    pad_to: list[int | None] = [None] * len(observation_spaces)
    obs = list(observation_spaces)
    cast: np.dtype | None = None
    cast_tasks = (False,) * len(obs)
    dtypes = {s.dtype for s in obs if isinstance(s, spaces.Box)}
    if (
        len(dtypes) > 1
        and all(isinstance(s, spaces.Box) for s in obs)
        and all(np.issubdtype(d, np.floating) for d in dtypes)
    ):
        cast = np.dtype(np.float32)
        cast_tasks = tuple(s.dtype != cast for s in obs)
        obs = [box_as_dtype(s, cast) for s in obs]
    if pad:
        if not all(isinstance(s, spaces.Box) and len(s.shape) == 1 for s in obs):
            raise SpaceMismatchError(
                _listing("observation", sequence, names, obs)
                + "\nFix: padding works on flat (1-D) Box observations only; drop "
                "pad_observations or use tasks with vector observations."
            )
        size = max(s.shape[0] for s in obs)
        for i, s in enumerate(obs):
            if s.shape[0] < size:
                pad_to[i] = size
                zeros = np.zeros(size - s.shape[0], dtype=s.dtype)
                obs[i] = spaces.Box(
                    np.concatenate((s.low, zeros)), np.concatenate((s.high, zeros)), dtype=s.dtype
                )

    first = obs[0]
    if all(isinstance(s, spaces.Box) for s in obs) and all(
        s.shape == first.shape and s.dtype == first.dtype for s in obs
    ):
        low = np.minimum.reduce([s.low for s in obs])
        high = np.maximum.reduce([s.high for s in obs])
        merged: spaces.Space = spaces.Box(low, high, dtype=first.dtype)
    elif all(s == first for s in obs[1:]):
        merged = first
    else:
        fix = (
            "set pad_observations=True (flat control observations of different lengths)"
            if not pad
            else "use tasks whose observations have the same dtype"
        )
        raise SpaceMismatchError(
            _listing("observation", sequence, names, observation_spaces)
            + f"\nFix: give every task the same observation shape and dtype (Atari: the "
            f"standard 84x84 grey 4-frame preprocessing), or {fix}."
        )
    return UnifiedSpaces(
        merged, action_space, tuple(pad_to), action_adapters, cast, cast_tasks
    )


def _unify_actions(
    sequence: str, names: Sequence[str], action_spaces: Sequence[spaces.Space]
) -> tuple[spaces.Space, tuple[ActionAdapter | None, ...]]:
    first = action_spaces[0]
    n_tasks = len(action_spaces)
    if all(a == first for a in action_spaces[1:]):
        return first, (None,) * n_tasks
    if all(isinstance(a, spaces.Discrete) and int(a.start) == 0 for a in action_spaces):
        n = max(int(a.n) for a in action_spaces)
        return spaces.Discrete(n), tuple(
            None if int(a.n) == n else ActionAdapter(pad_to=n) for a in action_spaces
        )
    if (
        all(isinstance(a, spaces.Box) and len(a.shape) == 1 for a in action_spaces)
        and len({a.dtype for a in action_spaces}) == 1
        and all(np.all(np.isfinite(a.low)) and np.all(np.isfinite(a.high)) for a in action_spaces)
    ):
        n = max(a.shape[0] for a in action_spaces)
        unit = spaces.Box(-1.0, 1.0, (n,), dtype=first.dtype)
        adapters = []
        for a in action_spaces:
            rescale = not (np.all(a.low == -1.0) and np.all(a.high == 1.0))
            pad = n if a.shape[0] < n else None
            adapters.append(ActionAdapter(rescale, pad) if rescale or pad else None)
        return unit, tuple(adapters)
    raise SpaceMismatchError(
        _listing("action", sequence, names, action_spaces)
        + "\nFix: give every task the same kind of action space: Discrete spaces (of any "
        "size, padded to the largest) or flat Box spaces with finite bounds (rescaled to "
        "[-1, 1], padded to the longest); Atari: full_action_space=True."
    )


def adapt_task_env(env: gym.Env, unified: UnifiedSpaces, task_index: int) -> gym.Env:
    """Wrap one task's env so that it has the sequence's spaces (see the module docstring)."""
    if unified.cast and unified.cast[task_index]:
        env = cast_observation(env, unified.observation_dtype)
    if unified.pad_to[task_index]:
        env = PadObservation(env, unified.pad_to[task_index])
    adapter = unified.action_adapters[task_index] if unified.action_adapters else None
    if adapter is not None:
        if adapter.rescale:
            space = env.action_space  # bounds in the space's dtype: no precision warning
            env = gym.wrappers.RescaleAction(
                env, np.full(space.shape, -1.0, space.dtype), np.full(space.shape, 1.0, space.dtype)
            )
        if adapter.pad_to:
            env = pad_actions(env, adapter.pad_to)
    return env
