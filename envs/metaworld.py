"""Meta-World v3 tasks (``metaworld`` extra, metaworld 3.1.1 on Gymnasium) and Continual
World's CW10 / CW20 (Wołczyk et al. 2021).

Protocol, as in Continual World:

* each task is one Meta-World v3 env with a fixed task (goal and object positions) drawn
  from the seed: ``reset(seed=s)`` lets the env draw its random vector from its own
  random-reset space with its RNG seeded by ``s`` (the procedure of Meta-World's MT1, for one
  task), then installs it with the public ``env.set_task``; resets without a seed keep it;
* the goal is observable (Meta-World's MT setting, ``partially_observable=False``);
* the episode horizon is ``horizon`` steps, 200 by default (CW), set as the env's
  ``max_path_length`` so the env itself truncates there (it raises past it otherwise);
* ``info["success"]`` (0.0 or 1.0) is Meta-World's own, passed through untouched.

Meta-World 3.1.1 leaves ``env.observation_space`` stale after ``set_task`` (the goal bounds
stay [0, 0] while the goal is observed); :class:`MetaWorldTask` declares the env's
``sawyer_observation_space``, which is what the observations are clipped to.
"""

from __future__ import annotations

import pickle
from typing import Any

import gymnasium as gym
import numpy as np

from envs.errors import EnvConfigError
from envs.sequence import TaskSequence
from envs.spec import TaskSpec

ENV_ID = "crl/MetaWorld-v0"
CW_HORIZON = 200

CW10_TASKS = (
    "hammer-v3",
    "push-wall-v3",
    "faucet-close-v3",
    "push-back-v3",
    "stick-pull-v3",
    "handle-press-side-v3",
    "push-v3",
    "shelf-place-v3",
    "window-close-v3",
    "peg-unplug-side-v3",
)
CW_STEPS_PER_TASK = 1_000_000


class MetaWorldTask(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """A Meta-World v3 env whose task is drawn from the reset seed (see the module doc)."""

    def __init__(self, env: gym.Env, env_name: str, initial_seed: int = 0):
        gym.utils.RecordConstructorArgs.__init__(self, env_name=env_name, initial_seed=initial_seed)
        gym.Wrapper.__init__(self, env)
        self._env_name = env_name
        self._set_task(initial_seed)

    def _set_task(self, seed: int) -> None:
        """Draw the task as Meta-World's MT1 does (reset with an unfrozen random vector, keep
        the vector the env accepted: some envs reject and redraw goals too close to the
        object), but one task from ``seed`` instead of 50 from the global numpy RNG."""
        from metaworld.types import Task

        u = self.env.unwrapped
        u._set_task_called = True
        u._freeze_rand_vec = False
        u.seeded_rand_vec = True  # draw from u.np_random, which u.seed() seeds
        u.seed(int(seed) % 2**32)
        u.reset()
        rand_vec = np.array(u._last_rand_vec, copy=True)
        data = {"rand_vec": rand_vec, "env_cls": type(u), "partially_observable": False}
        u.set_task(Task(env_name=self._env_name, data=pickle.dumps(data)))  # freezes it
        u.seeded_rand_vec = False
        self.observation_space = u.sawyer_observation_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._set_task(seed)
        return self.env.reset(seed=seed, options=options)


def make_metaworld_task(
    env_name: str | None = None, horizon: int = CW_HORIZON, render_mode: str | None = None,
    **kwargs: Any,
) -> gym.Env:
    """Gymnasium entry point of :data:`ENV_ID`: ``gymnasium.make("crl/MetaWorld-v0",
    env_name="hammer-v3", horizon=200)``."""
    if env_name is None:
        raise EnvConfigError(
            f'{ENV_ID} needs the Meta-World task: gymnasium.make("{ENV_ID}", '
            'env_name="hammer-v3") (names: metaworld.env_dict.ALL_V3_ENVIRONMENTS; CW10\'s '
            "tasks: crl list sequences)."
        )
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    if env_name not in ALL_V3_ENVIRONMENTS:
        raise EnvConfigError(
            f"Unknown Meta-World v3 env {env_name!r}; names look like 'hammer-v3' (see "
            "metaworld.env_dict.ALL_V3_ENVIRONMENTS)."
        )
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon <= 0:
        raise EnvConfigError(f"Meta-World horizon must be a positive integer, got {horizon!r}.")
    env = ALL_V3_ENVIRONMENTS[env_name](render_mode=render_mode, **kwargs)
    env.max_path_length = horizon  # the env truncates at its path length and refuses to go on
    return MetaWorldTask(env, env_name)


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.metaworld:make_metaworld_task")


def metaworld_task(env_name: str, horizon: int = CW_HORIZON, name: str | None = None) -> TaskSpec:
    """One CW task; its score is the success rate (``info["success"]``), so no bounds."""
    return TaskSpec(
        ENV_ID,
        kwargs={"env_name": env_name, "horizon": horizon},
        name=name or env_name.removesuffix("-v3"),
        requires=("metaworld", "envs.metaworld"),
        extra="metaworld",
        score_kind="success",
    )


def cw10(horizon: int = CW_HORIZON) -> TaskSequence:
    return TaskSequence(
        "CW10",
        [metaworld_task(t, horizon) for t in CW10_TASKS],
        steps_per_task=CW_STEPS_PER_TASK,
        description="Continual World's CW10 on Meta-World v3",
    )


def cw20(horizon: int = CW_HORIZON) -> TaskSequence:
    """CW10 twice; a task keeps its id (one-hot, head) in the second pass."""
    return TaskSequence(
        "CW20",
        [metaworld_task(t, horizon) for t in CW10_TASKS],
        steps_per_task=CW_STEPS_PER_TASK,
        cycles=2,
        description="CW10 twice",
    )


SEQUENCES = {"CW10": cw10, "CW20": cw20}
