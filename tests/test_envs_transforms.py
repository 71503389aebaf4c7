"""Observation maps and space unification across environments (RL-fidelity sequences).

Classic control only, except the MuJoCo case, which skips without the mujoco extra.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs import ContinualEnv, EnvConfigError, SpaceMismatchError, TaskSequence, TaskSpec
from envs.classic import acrobot_task, cartpole_task, pendulum_task, rotated
from envs.continual import sequence_spaces
from envs.registry import extra_installed
from envs.wrappers import RandomObservationMap, pad_actions

# -- the observation map -----------------------------------------------------------------------


def _map(seed, kind="rotation", dim=None, env_id="CartPole-v1"):
    return RandomObservationMap(gym.make(env_id), seed=seed, kind=kind, dim=dim)


def test_same_seed_same_map_and_different_seeds_differ():
    a, b, c = _map(3), _map(3), _map(4)
    assert np.array_equal(a.matrix, b.matrix)
    assert not np.allclose(a.matrix, c.matrix, atol=0.05)


def test_rotation_is_orthogonal_and_maps_the_raw_observation():
    env = _map(7)
    m = env.matrix.astype(np.float64)
    assert m.shape == (4, 4)
    np.testing.assert_allclose(m @ m.T, np.eye(4), atol=1e-6)
    raw = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=5)
    raw_obs, _ = raw.reset(seed=5)
    np.testing.assert_allclose(obs, m @ raw_obs, rtol=1e-5, atol=1e-6)
    assert obs.dtype == np.float32
    for a in (0, 1, 1, 0):
        obs, *_ = env.step(a)
        raw_obs, *_ = raw.step(a)
        np.testing.assert_allclose(obs, m @ raw_obs, rtol=1e-5, atol=1e-6)
        # a rotation keeps the length of the state
        assert abs(np.linalg.norm(obs) - np.linalg.norm(raw_obs)) < 1e-5


def test_projection_has_the_asked_size_and_bounded_space():
    env = _map(1, kind="projection", dim=8, env_id="Pendulum-v1")
    assert env.observation_space.shape == (8,)
    # Pendulum's bounds are finite ([-1, 1], [-1, 1], [-8, 8]): so are the projected ones,
    # computed by interval arithmetic: |row| . max(|low|, |high|)
    expected_high = np.abs(env.matrix.astype(np.float64)) @ np.array([1.0, 1.0, 8.0])
    np.testing.assert_allclose(env.observation_space.high, expected_high, rtol=1e-5)
    np.testing.assert_allclose(env.observation_space.low, -expected_high, rtol=1e-5)
    obs, _ = env.reset(seed=0)
    for _ in range(20):
        assert env.observation_space.contains(obs)
        obs, *_ = env.step(env.action_space.sample())


def test_checkers_pass_on_the_map():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for env in (_map(2), _map(2, kind="projection", dim=6)):
            gym_check_env(env, skip_render_check=True)
            sb3_check_env(env, warn=False)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"seed": 1, "kind": "shear"}, ["kind", "rotation", "projection"]),
        ({"seed": 1, "kind": "projection"}, ["needs dim"]),
        ({"seed": 1, "kind": "rotation", "dim": 3}, ["rotation keeps the 4 entries"]),
        ({"seed": -1}, ["seed must be a non-negative integer"]),
    ],
)
def test_map_bad_arguments_name_the_problem(kwargs, words):
    with pytest.raises(EnvConfigError) as err:
        RandomObservationMap(gym.make("CartPole-v1"), **kwargs)
    for w in words:
        assert w in str(err.value)


def test_rotated_tasks_of_a_sequence_get_their_own_maps():
    seq = envs.get_sequence("CartPoleRotated", steps_per_task=10)
    maps = []
    for i in range(seq.num_tasks):
        env = seq.make_eval_env(i)
        maps.append(env.get_wrapper_attr("matrix"))
        env.close()
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            assert not np.allclose(maps[i], maps[j], atol=0.05)
    # the same task in a freshly built sequence has the same map (seeded per task)
    again = envs.get_sequence("CartPoleRotated", steps_per_task=10).make_eval_env(1)
    assert np.array_equal(again.get_wrapper_attr("matrix"), maps[1])
    # a YAML-style spec of the same seed builds the same map as the built-in task
    spec = rotated(cartpole_task("x"), "x", 2)
    assert np.array_equal(spec.make().get_wrapper_attr("matrix"), maps[1])


# -- unification across environments -----------------------------------------------------------


def test_the_long_rotated_sequence_extends_the_short_one():
    """CartPoleRotated20's first three maps are CartPoleRotated's; all 20 differ."""
    long_seq = envs.get_sequence("CartPoleRotated20")
    short = envs.get_sequence("CartPoleRotated")
    assert long_seq.num_tasks == 20 and long_seq.steps_per_task == 10_240
    maps = [long_seq.make_eval_env(i).get_wrapper_attr("matrix") for i in range(20)]
    for i in range(3):
        assert np.array_equal(maps[i], short.make_eval_env(i).get_wrapper_attr("matrix"))
    flat = np.stack([m.ravel() for m in maps])
    gaps = np.abs(flat[:, None, :] - flat[None, :, :]).max(-1) + np.eye(20)
    assert gaps.min() > 0.05


def test_discrete_actions_are_padded_and_the_extra_action_acts_as_action_0():
    seq = TaskSequence("M", [acrobot_task("acro"), cartpole_task("cart")], 50,
                       pad_observations=True)
    env = ContinualEnv(seq)
    assert env.action_space == gym.spaces.Discrete(3)
    assert env.observation_space.shape == (6,)
    cart = seq.make_eval_env(1)
    twin = seq.make_eval_env(1)
    cart.reset(seed=3)
    twin.reset(seed=3)
    for a_padded, a_plain in ((2, 0), (1, 1), (2, 0), (0, 0)):
        o1, *_ = cart.step(a_padded)
        o2, *_ = twin.step(a_plain)
        assert np.array_equal(o1, o2)
    with pytest.raises(EnvConfigError, match="fill must be one of"):
        pad_actions(gym.make("CartPole-v1"), 3, fill=5)


def test_box_actions_are_rescaled_to_unit_and_padded():
    # Pendulum's torque in [-2, 2] beside a task with two action entries in [-1, 1]
    two = TaskSpec("Pendulum-v1", name="two", wrappers=[("pad_actions", {"n": 2})])
    seq = TaskSequence("B", [pendulum_task("pend"), two], 50)
    spaces = sequence_spaces(seq)
    assert spaces.action_space == gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    assert "actions rescaled to [-1, 1]" in " ".join(spaces.describe_changes(seq.task_names))
    env = seq.make_eval_env(0)
    raw = gym.make("Pendulum-v1")
    env.reset(seed=1)
    raw.reset(seed=1)
    for u in (1.0, -0.5, 0.25):
        o1, *_ = env.step(np.array([u, 0.9], np.float32))  # the second entry is ignored
        o2, *_ = raw.step(np.array([2.0 * u], np.float32))
        np.testing.assert_allclose(o1, o2, rtol=1e-6)


def test_mixed_kinds_still_fail_with_each_task_listed():
    with pytest.raises(SpaceMismatchError) as err:
        ContinualEnv(TaskSequence("K", [cartpole_task("c"), pendulum_task("p")], 5))
    msg = str(err.value)
    assert "task 0 'c': Discrete(2)" in msg and "task 1 'p': Box" in msg and "Fix:" in msg


@pytest.mark.skipif(not extra_installed("mujoco"), reason='needs pip install "crl[mujoco]"')
def test_float64_and_float32_observations_become_float32():
    seq = TaskSequence(
        "F",
        [pendulum_task("pend"),
         TaskSpec("InvertedPendulum-v5", name="inv", requires=("mujoco",), extra="mujoco")],
        50, pad_observations=True,
    )
    env = ContinualEnv(seq, append_task_id=True)
    assert env.observation_space.dtype == np.float32
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    changes = sequence_spaces(seq).describe_changes(seq.task_names)
    assert any(c.startswith("inv:") and "cast to float32" in c for c in changes)
    assert not any(c.startswith("pend:") and "cast" in c for c in changes)
    obs, _ = env.reset(seed=0)
    for _ in range(60):  # crosses into the MuJoCo task
        obs, *_ = env.step(env.action_space.sample())
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gym_check_env(seq.make_eval_env(1, append_task_id=True), skip_render_check=True)


# -- registration -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ClassicMix", "MujocoMix", "CartPoleRotated", "PendulumRotated",
                                  "CartPoleRotated20"])
def test_new_sequences_are_registered_and_listed(name):
    assert name in envs.sequence_names()
    assert name in envs.describe_sequences()
    env = gym.make(f"crl/{name}-v0", steps_per_task=20)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()


def test_yaml_acrobot_shortcut_and_map_wrapper(tmp_path):
    path = tmp_path / "seq.yaml"
    path.write_text(
        "name: Y\nsteps_per_task: 10\npad_observations: true\ntasks:\n"
        "  - acrobot: {name: a}\n"
        "  - env_id: CartPole-v1\n    name: c\n    wrappers:\n"
        "      - random_observation_map: {seed: 4, kind: projection, dim: 6}\n"
    )
    seq = envs.load_sequence(path)
    assert seq.tasks[0].high == -100.0
    env = ContinualEnv(seq)
    assert env.observation_space.shape == (6,) and env.action_space == gym.spaces.Discrete(3)
    env.reset(seed=0)
    for _ in range(15):
        env.step(env.action_space.sample())
