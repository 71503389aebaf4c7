"""Space unification: one observation space and one action space for a whole sequence.

Rules (DESIGN.md: a mismatch is a clear error that lists each task's spaces):

* action spaces must be equal (same type, shape, dtype and bounds); Atari gets there with
  ``full_action_space=True``;
* Box observation spaces of the same shape and dtype are merged by taking the element-wise
  union of their bounds (Meta-World tasks differ only in their goal bounds), which keeps every
  task's observations inside the merged space;
* with ``pad=True``, flat Box observations of different lengths are zero-padded to the
  longest (the padding's bounds are [0, 0]);
* anything else is a :class:`SpaceMismatchError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

from envs.spec import EnvConfigError


class SpaceMismatchError(EnvConfigError):
    """The tasks of a sequence do not share one observation or action space."""


@dataclass(frozen=True)
class UnifiedSpaces:
    observation_space: spaces.Space
    action_space: spaces.Space
    pad_to: tuple[int | None, ...]  # per task: length to pad its observations to, or None


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
    first_action = action_spaces[0]
    if any(a != first_action for a in action_spaces[1:]):
        raise SpaceMismatchError(
            _listing("action", sequence, names, action_spaces)
            + "\nFix: give every task the same action space (Atari: full_action_space=True; "
            "control: tasks of one env family)."
        )

    pad_to: list[int | None] = [None] * len(observation_spaces)
    obs = list(observation_spaces)
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
    return UnifiedSpaces(merged, first_action, tuple(pad_to))
