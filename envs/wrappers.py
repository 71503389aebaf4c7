"""Task perturbations and observation transforms, by name (see :data:`WRAPPERS`).

Two kinds of entries:

* physics perturbations (``cartpole_physics``, ``pendulum_physics``, ``mujoco_physics``):
  they change attributes of ``env.unwrapped`` (or its MuJoCo model) once, in their
  constructor, and pass steps through untouched; ``reset`` keeps the change because these
  envs never reload their parameters. They are wrappers (not bare functions) so that
  ``env.spec`` records them and ``env.spec.make()`` rebuilds the perturbed task.
* wrappers built on Gymnasium's own (``TransformAction``, ``TransformObservation``,
  ``ObservationWrapper``): swapped/negated actions, flipped or noisy observations, padding.

All are module-level functions or classes so that task specs that name them pickle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TransformAction, TransformObservation

from envs.errors import EnvConfigError

# -- actions ---------------------------------------------------------------------------------


def _lookup(table: tuple[int, ...], action: Any) -> int:
    return table[int(action)]


def permute_actions(env: gym.Env, permutation: Sequence[int]) -> gym.Env:
    """Discrete actions: the agent's action ``a`` executes ``permutation[a]``.

    ``[1, 0]`` on CartPole swaps left and right, so the optimal policy of the swapped task
    is the opposite of the original's (the forgetting demo relies on it).
    """
    space = env.action_space
    if not isinstance(space, spaces.Discrete):
        raise EnvConfigError(
            f"permute_actions needs a Discrete action space, got {space}. For Box actions use "
            "'negate_actions'."
        )
    if int(space.start) != 0:
        raise EnvConfigError("permute_actions supports Discrete spaces that start at 0 only.")
    perm = tuple(int(p) for p in permutation)
    if sorted(perm) != list(range(int(space.n))):
        raise EnvConfigError(
            f"permute_actions: {list(permutation)} is not a permutation of "
            f"{list(range(int(space.n)))}."
        )
    return TransformAction(env, partial(_lookup, perm), space)


def _first(k: int, action: np.ndarray) -> np.ndarray:
    return action[:k]


def pad_actions(env: gym.Env, n: int, fill: int = 0) -> gym.Env:
    """Widen the action space to ``n`` actions, so tasks from different envs share one policy
    output; the sequence builder does this by itself (:mod:`envs.spaces`).

    * Discrete (CartPole's 2 actions beside Acrobot's 3): ``Discrete(n)``, the extra actions
      execute ``fill``;
    * flat Box (Pendulum's one torque beside Reacher's two): ``n`` entries, the extra ones
      bounded like the first and ignored (their only effect is the policy's entropy).
    """
    space = env.action_space
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        k = int(space.shape[0])
    elif isinstance(space, spaces.Discrete) and int(space.start) == 0:
        k = int(space.n)
    else:
        raise EnvConfigError(
            f"pad_actions needs a Discrete action space that starts at 0 or a flat Box, got "
            f"{space}."
        )
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < k:
        raise EnvConfigError(f"pad_actions: n must be an integer >= {k} (the env's actions), "
                             f"got {n!r}.")
    n = int(n)
    if isinstance(space, spaces.Box):
        extra = n - k
        low = np.concatenate((space.low, np.full(extra, space.low[0], space.dtype)))
        high = np.concatenate((space.high, np.full(extra, space.high[0], space.dtype)))
        return TransformAction(env, partial(_first, k), spaces.Box(low, high, dtype=space.dtype))
    if not 0 <= int(fill) < k:
        raise EnvConfigError(f"pad_actions: fill must be one of the env's actions 0..{k - 1}, "
                             f"got {fill!r}.")
    table = tuple(range(k)) + (int(fill),) * (n - k)
    return TransformAction(env, partial(_lookup, table), spaces.Discrete(n))


def negate_actions(env: gym.Env) -> gym.Env:
    """Box actions: the env receives ``-a`` (e.g. reversed torque on Pendulum).

    Only symmetric bounds keep the action space unchanged, so others are refused.
    """
    space = env.action_space
    if not isinstance(space, spaces.Box) or not np.array_equal(space.low, -space.high):
        raise EnvConfigError(
            f"negate_actions needs a Box action space with symmetric bounds, got {space}."
        )
    return TransformAction(env, np.negative, space)


# -- observations ----------------------------------------------------------------------------


def _flip(axes: tuple[int, ...], obs: np.ndarray) -> np.ndarray:
    # contiguous copy: negative strides break torch.as_tensor and some buffers
    return np.ascontiguousarray(np.flip(obs, axes))


def flip_observation(env: gym.Env, axes: int | Sequence[int] = -1) -> gym.Env:
    """Mirror a Box observation along ``axes`` (``-1``: left/right on an H×W frame,
    ``-2``: up/down), as the flipped Pong variants of the progressive-networks paper
    (Rusu et al. 2016). Apply it before frame stacking."""
    space = env.observation_space
    if not isinstance(space, spaces.Box):
        raise EnvConfigError(f"flip_observation needs a Box observation space, got {space}.")
    ax = (axes,) if isinstance(axes, int) else tuple(int(a) for a in axes)
    for a in ax:
        if not -len(space.shape) <= a < len(space.shape):
            raise EnvConfigError(
                f"flip_observation: axis {a} is out of range for observations of shape "
                f"{space.shape}."
            )
    flipped = spaces.Box(
        np.flip(space.low, ax).copy(), np.flip(space.high, ax).copy(), dtype=space.dtype
    )
    return TransformObservation(env, partial(_flip, ax), flipped)


def box_as_dtype(space: spaces.Box, dtype: Any) -> spaces.Box:
    """The Box with its bounds cast as :func:`cast_observation` casts observations
    (rounding is monotone, so cast observations stay inside the cast bounds)."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):
        return spaces.Box(space.low.astype(dtype), space.high.astype(dtype), dtype=dtype)


def _astype(dtype: np.dtype, obs: np.ndarray) -> np.ndarray:
    return np.asarray(obs, dtype=dtype)


def cast_observation(env: gym.Env, dtype: Any = "float32") -> gym.Env:
    """Cast a Box observation to ``dtype`` (MuJoCo's float64 to classic control's float32),
    bounds included; Gymnasium's ``DtypeObservation`` keeps float64 bounds and warns."""
    space = env.observation_space
    if not isinstance(space, spaces.Box):
        raise EnvConfigError(f"cast_observation needs a Box observation space, got {space}.")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise EnvConfigError(f"cast_observation: {dtype!r} is not a NumPy dtype.") from exc
    return TransformObservation(env, partial(_astype, dt), box_as_dtype(space, dt))


class RandomObservationMap(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """A fixed random linear map of a flat observation, drawn from ``seed``: the RL
    counterpart of permuted MNIST (each task sees the same dynamics through other features).

    * ``kind="rotation"``: a Haar-random orthogonal matrix (QR of a Gaussian matrix with the
      signs of R's diagonal moved into Q, Mezzadri 2007, "How to generate random matrices from
      the classical compact groups"), so lengths and the information in the state are kept;
    * ``kind="projection"``: a Gaussian matrix to ``dim`` outputs, entries N(0, 1/n_in), so
      each output has the scale of one input; ``dim >= n_in`` keeps the state recoverable.

    The same ``seed`` gives the same map on any machine (NumPy's PCG64), so a task is defined
    by its seed; a sequence gives each task its own. Observations become float32.
    """

    def __init__(
        self, env: gym.Env, seed: int, kind: str = "rotation", dim: int | None = None
    ):
        gym.utils.RecordConstructorArgs.__init__(self, seed=seed, kind=kind, dim=dim)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise EnvConfigError(
                f"random_observation_map needs a flat (1-D) Box observation space, got {space}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise EnvConfigError(
                f"random_observation_map: seed must be a non-negative integer, got {seed!r}."
            )
        n = int(space.shape[0])
        rng = np.random.default_rng([int(seed), 0x726F74])
        if kind == "rotation":
            if dim not in (None, n):
                raise EnvConfigError(
                    f"random_observation_map: a rotation keeps the {n} entries; drop dim "
                    f"(got {dim}) or use kind='projection'."
                )
            q, r = np.linalg.qr(rng.standard_normal((n, n)))
            matrix = q * np.sign(np.diag(r))
        elif kind == "projection":
            if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
                raise EnvConfigError(
                    f"random_observation_map: kind='projection' needs dim, a positive integer "
                    f"(outputs), got {dim!r}."
                )
            matrix = rng.standard_normal((int(dim), n)) / np.sqrt(n)
        else:
            raise EnvConfigError(
                f"random_observation_map: kind must be 'rotation' or 'projection', got {kind!r}."
            )
        self.matrix = matrix.astype(np.float32)
        self.matrix.flags.writeable = False
        # interval arithmetic of the bounds; infinite inputs give infinite outputs
        pos, neg = np.clip(matrix, 0, None), np.clip(matrix, None, 0)
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        with np.errstate(invalid="ignore"):
            new_low = np.nan_to_num(pos @ low + neg @ high, nan=-np.inf)
            new_high = np.nan_to_num(pos @ high + neg @ low, nan=np.inf)
        self.observation_space = spaces.Box(
            new_low.astype(np.float32), new_high.astype(np.float32), dtype=np.float32
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return self.matrix @ np.asarray(observation, dtype=np.float32)


class NoisyObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Add Gaussian noise with standard deviation ``std`` to every observation, clipped to the
    space's bounds (the "noisy" Pong of Rusu et al. 2016, pixel units for images).

    The noise generator is reseeded by ``reset(seed=...)``, so seeded runs are reproducible.
    """

    def __init__(self, env: gym.Env, std: float, seed: int | None = None):
        gym.utils.RecordConstructorArgs.__init__(self, std=std, seed=seed)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Box):
            raise EnvConfigError(f"noisy_observation needs a Box observation space, got {space}.")
        if not std > 0:
            raise EnvConfigError(f"noisy_observation: std must be > 0, got {std}.")
        self._std = float(std)
        self._low = space.low.astype(np.float64)
        self._high = space.high.astype(np.float64)
        self._dtype = space.dtype
        self._integer = np.issubdtype(space.dtype, np.integer)
        self._rng = np.random.default_rng(seed)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._rng = np.random.default_rng([seed, 0x6E6F6973])  # distinct from the env's
        return super().reset(seed=seed, options=options)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        noisy = observation + self._rng.normal(0.0, self._std, size=observation.shape)
        np.clip(noisy, self._low, self._high, out=noisy)
        if self._integer:
            np.rint(noisy, out=noisy)
        return noisy.astype(self._dtype, copy=False)


class PadObservation(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Zero-pad a flat Box observation to ``size`` entries, so tasks with fewer state
    variables share the sequence's observation space. The padding's bounds are [0, 0]."""

    def __init__(self, env: gym.Env, size: int):
        gym.utils.RecordConstructorArgs.__init__(self, size=size)
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise EnvConfigError(
                f"Padding needs flat (1-D) Box observations, got {space}; only such control "
                "tasks can be padded."
            )
        extra = int(size) - space.shape[0]
        if extra < 0:
            raise EnvConfigError(f"Cannot pad {space.shape[0]} entries down to {size}.")
        self._pad = np.zeros(extra, dtype=space.dtype)
        self.observation_space = spaces.Box(
            np.concatenate((space.low, self._pad)),
            np.concatenate((space.high, self._pad)),
            dtype=space.dtype,
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.concatenate((observation, self._pad))


# -- in-place physics ------------------------------------------------------------------------


class CartPolePhysics(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Set CartPole's physical constants (absolute values, SI units as in
    ``gymnasium.envs.classic_control.CartPoleEnv``; ``length`` is the pole's half-length) and
    recompute the derived ``total_mass`` and ``polemass_length`` that its dynamics use.

    The change is made once, here; the wrapper only records it (so ``env.spec`` rebuilds the
    same task) and passes steps through.
    """

    def __init__(
        self,
        env: gym.Env,
        gravity: float | None = None,
        masscart: float | None = None,
        masspole: float | None = None,
        length: float | None = None,
        force_mag: float | None = None,
    ):
        values = dict(
            gravity=gravity, masscart=masscart, masspole=masspole, length=length,
            force_mag=force_mag,
        )
        gym.utils.RecordConstructorArgs.__init__(self, **values)
        gym.Wrapper.__init__(self, env)
        u = env.unwrapped
        if not hasattr(u, "polemass_length"):
            raise EnvConfigError(f"cartpole_physics applies to CartPole envs only, got {u}.")
        for key, value in values.items():
            if value is None:
                continue
            if not value > 0:
                raise EnvConfigError(f"cartpole_physics: {key} must be > 0, got {value}.")
            setattr(u, key, float(value))
        u.total_mass = u.masspole + u.masscart
        u.polemass_length = u.masspole * u.length


class PendulumPhysics(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Set Pendulum's gravity ``g``, mass ``m`` and length ``l`` (absolute values, the
    attribute names of ``gymnasium.envs.classic_control.PendulumEnv``), once, here."""

    def __init__(
        self,
        env: gym.Env,
        g: float | None = None,
        m: float | None = None,
        l: float | None = None,  # noqa: E741
    ):
        gym.utils.RecordConstructorArgs.__init__(self, g=g, m=m, l=l)
        gym.Wrapper.__init__(self, env)
        u = env.unwrapped
        if not all(hasattr(u, a) for a in ("g", "m", "l", "max_torque")):
            raise EnvConfigError(f"pendulum_physics applies to Pendulum envs only, got {u}.")
        for key, value in dict(g=g, m=m, l=l).items():
            if value is None:
                continue
            if not value > 0:
                raise EnvConfigError(f"pendulum_physics: {key} must be > 0, got {value}.")
            setattr(u, key, float(value))


# -- MuJoCo gravity and masses: the compiled model----------------------------------------------


class MujocoPhysics(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Change gravity and body masses of a MuJoCo env's model once, in the constructor."""

    def __init__(
        self,
        env: gym.Env,
        gravity: float | None = None,
        mass_scale: float | Mapping[str, float] | None = None,
    ):
        gym.utils.RecordConstructorArgs.__init__(self, gravity=gravity, mass_scale=mass_scale)
        gym.Wrapper.__init__(self, env)
        model = getattr(env.unwrapped, "model", None)
        if model is None or not hasattr(model, "body_mass"):
            raise EnvConfigError(f"mujoco_physics needs a MuJoCo env, got {env.unwrapped}.")
        if gravity is not None:
            if not gravity >= 0:
                raise EnvConfigError(f"mujoco_physics: gravity must be >= 0, got {gravity}.")
            model.opt.gravity[:] = (0.0, 0.0, -float(gravity))
        if mass_scale is not None:
            import mujoco

            if isinstance(mass_scale, Mapping):
                ids = {}
                for name, factor in mass_scale.items():
                    body_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, name)
                    if body_id < 0:
                        names = [model.body(i).name for i in range(model.nbody)]
                        raise EnvConfigError(
                            f"mujoco_physics: unknown body {name!r}; bodies: {', '.join(names)}."
                        )
                    ids[body_id] = float(factor)
            else:
                ids = {i: float(mass_scale) for i in range(1, model.nbody)}  # 0 is the world
            for body_id, factor in ids.items():
                if not factor > 0:
                    raise EnvConfigError(f"mujoco_physics: mass scales must be > 0, got {factor}.")
                model.body_mass[body_id] *= factor
                model.body_inertia[body_id] *= factor


WRAPPERS: dict[str, Callable[..., gym.Env]] = {
    "permute_actions": permute_actions,
    "pad_actions": pad_actions,
    "cast_observation": cast_observation,
    "random_observation_map": RandomObservationMap,
    "negate_actions": negate_actions,
    "flip_observation": flip_observation,
    "noisy_observation": NoisyObservation,
    "pad_observation": PadObservation,
    "cartpole_physics": CartPolePhysics,
    "pendulum_physics": PendulumPhysics,
    "mujoco_physics": MujocoPhysics,
}
"""Short names usable in :class:`envs.spec.WrapperSpec` and in YAML sequence files."""
