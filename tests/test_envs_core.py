"""envs/ core: switch points, task ids, one-hot, seeding, spaces, wrappers, errors.

Only classic-control envs (no extra needed). Episode lengths are made exact with
CartPole and a 4-step horizon: from CartPole's start state (|theta| < 0.05) the pole cannot
pass the 12° limit within 4 steps, so every episode lasts exactly 4 steps.
"""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs import (
    ContinualEnv,
    EnvConfigError,
    SpaceMismatchError,
    TaskSequence,
    TaskSpec,
    WrapperSpec,
    get_sequence,
)
from envs.classic import cartpole_task, pendulum_task


def cartpoles(steps, horizon=200, cycles=1, **kw) -> TaskSequence:
    tasks = [
        cartpole_task("a", horizon=horizon),
        cartpole_task("b", horizon=horizon, swap_actions=True),
        cartpole_task("c", horizon=horizon, gravity=20.0),
    ]
    return TaskSequence("T", tasks, steps_per_task=steps, cycles=cycles, **kw)


def run(env: gym.Env, n: int, seed: int | None = 0, actions=None):
    """Step n times (resetting at episode ends); return per-step records."""
    obs, info = env.reset(seed=seed)
    records = []
    rng = np.random.default_rng(123)
    for k in range(n):
        a = actions[k] if actions is not None else int(rng.integers(2))
        obs, r, term, trunc, info = env.step(a)
        records.append((obs, term, trunc, dict(info)))
        if term or trunc:
            obs, info = env.reset()
    return records


# -- schedule ----------------------------------------------------------------------------------


def test_schedule_numbers():
    s = cartpoles([7, 5, 9], cycles=2)
    assert s.schedule == (0, 1, 2, 0, 1, 2)
    assert s.stage_ends == (7, 12, 21, 28, 33, 42)
    assert s.switch_points == (7, 12, 21, 28, 33)
    assert s.total_steps == 42
    assert [s.task_at(k) for k in (0, 6, 7, 11, 12, 20, 21, 41, 99)] == [0, 0, 1, 1, 2, 2, 0, 2, 2]


def test_immediate_switches_at_exact_steps_and_task_index_every_step():
    s = cartpoles([7, 5, 9], cycles=2)
    env = ContinualEnv(s, switch_mode="immediate")
    recs = run(env, 50)
    expected = ([0] * 7 + [1] * 5 + [2] * 9) * 2 + [2] * 8  # last task keeps running
    assert [r[3]["task_index"] for r in recs] == expected
    assert [r[3]["task_name"] for r in recs] == ["abc"[i] for i in expected]
    switch_steps = [k + 1 for k, r in enumerate(recs) if r[3].get("task_switch")]
    assert switch_steps == [7, 12, 21, 28, 33]
    for t in switch_steps:  # the step that reaches a switch point ends the episode
        assert recs[t - 1][2] or recs[t - 1][1]
    done = [k + 1 for k, r in enumerate(recs) if r[3].get("sequence_done")]
    assert done == [42] and env.sequence_done
    assert [(t, st) for t, st, _ in env.switch_history] == [
        (0, 0), (7, 1), (12, 2), (21, 3), (28, 4), (33, 5)
    ]


def test_episode_mode_waits_for_the_episode_end():
    s = cartpoles(10, horizon=4)
    env = ContinualEnv(s, switch_mode="episode")
    recs = run(env, 34)
    # episodes end at t = 4, 8, 12, ...; switch points 10 and 20 -> switches at 12 and 20
    assert all(r[2] == ((k + 1) % 4 == 0) and not r[1] for k, r in enumerate(recs))
    assert [r[3]["task_index"] for r in recs] == [0] * 12 + [1] * 8 + [2] * 14
    assert env.switch_history == [(0, 0, 0), (12, 1, 1), (20, 2, 2)]
    assert [k + 1 for k, r in enumerate(recs) if r[3].get("task_switch")] == [12, 20]
    assert [k + 1 for k, r in enumerate(recs) if r[3].get("sequence_done")] == [30]


def test_episode_mode_skips_a_stage_shorter_than_the_episode():
    s = cartpoles([2, 1, 10], horizon=4)
    env = ContinualEnv(s, switch_mode="episode")
    recs = run(env, 8)
    assert [r[3]["task_index"] for r in recs] == [0] * 4 + [2] * 4
    assert env.switch_history == [(0, 0, 0), (4, 1, 1), (4, 2, 2)]


def test_step_before_reset_is_refused():
    env = ContinualEnv(cartpoles(5))
    with pytest.raises(gym.error.ResetNeeded, match="Call reset"):
        env.step(0)
    env.reset(seed=0)
    env.step(0)


def test_immediate_mode_truncates_mid_episode():
    s = cartpoles(6, horizon=4)
    recs = run(ContinualEnv(s), 12)
    # episodes: steps 1-4 (horizon), 5-6 (switch), 7-10 (horizon), 11-12 (switch)
    assert [k + 1 for k, r in enumerate(recs) if r[2]] == [4, 6, 10, 12]
    assert [r[3]["task_index"] for r in recs] == [0] * 6 + [1] * 6


# -- task id ---------------------------------------------------------------------------------


def test_one_hot_matches_task_and_leaves_observation_intact():
    s = cartpoles(5, cycles=2)
    plain = run(ContinualEnv(s), 40)
    hot_env = ContinualEnv(s, append_task_id=True)
    assert hot_env.observation_space.shape == (7,)
    assert np.array_equal(hot_env.observation_space.high[4:], np.ones(3, np.float32))
    hot = run(hot_env, 40)
    eye = np.eye(3, dtype=np.float32)
    for (o_plain, *_), (o_hot, _, _, info) in zip(plain, hot, strict=True):
        assert o_hot.dtype == np.float32
        assert np.array_equal(o_hot[:4], o_plain)
        assert np.array_equal(o_hot[4:], eye[info["task_index"]])
        assert hot_env.observation_space.contains(o_hot)
    o, info = hot_env.reset()
    o[4:] = 7  # a returned observation is the caller's to change
    assert np.array_equal(hot_env.step(0)[0][4:], eye[info["task_index"]])


# -- seeding ---------------------------------------------------------------------------------


def _first_obs_of_each_task(seq, seed=None):
    env = ContinualEnv(seq)
    firsts = {}
    obs, info = env.reset(seed=seed)
    for _ in range(seq.total_steps):
        firsts.setdefault(info["task_index"], obs)
        obs, _, term, trunc, info = env.step(0)
        if term or trunc:
            obs, info = env.reset()
    return firsts


def test_same_seed_same_first_observations_other_seed_differs():
    s = cartpoles(3)
    a, b = _first_obs_of_each_task(s), _first_obs_of_each_task(s)
    assert sorted(a) == [0, 1, 2]
    assert all(np.array_equal(a[i], b[i]) for i in a)
    c = _first_obs_of_each_task(s.replace(seed=1))
    assert not any(np.array_equal(a[i], c[i]) for i in a)
    # reset(seed=s) overrides the sequence seed, reproducibly
    d, e = _first_obs_of_each_task(s, seed=5), _first_obs_of_each_task(s.replace(seed=9), seed=5)
    assert all(np.array_equal(d[i], e[i]) for i in d)
    # tasks get distinct streams
    assert len({tuple(v) for v in a.values()}) == 3


def test_shuffled_order_depends_on_seed_only():
    tasks = [cartpole_task(f"t{i}") for i in range(6)]
    orders = {TaskSequence("S", tasks, 10, shuffle=True, seed=k).order for k in range(5)}
    assert len(orders) > 1
    a = TaskSequence("S", tasks, 10, shuffle=True, seed=3)
    assert a.order == TaskSequence("S", tasks, 10, shuffle=True, seed=3).order
    assert sorted(a.order) == list(range(6))
    assert a.schedule == a.order * 1
    env = ContinualEnv(a.replace(steps_per_task=2))
    recs = run(env, 12)
    assert [r[3]["task_index"] for r in recs][::2] == list(a.order)


# -- wrappers --------------------------------------------------------------------------------


def test_swapped_actions_mirror_the_original():
    normal, swapped = cartpole_task("n").make(), cartpole_task("s", swap_actions=True).make()
    o1, _ = normal.reset(seed=3)
    o2, _ = swapped.reset(seed=3)
    for a in [0, 1, 1, 0, 1, 0, 0]:
        o1 = normal.step(a)[0]
        o2 = swapped.step(1 - a)[0]
        assert np.array_equal(o1, o2)


def test_cartpole_physics_sets_derived_constants():
    env = cartpole_task("x", gravity=20.0, masspole=0.5, masscart=2.0, length=1.0).make()
    u = env.unwrapped
    assert (u.gravity, u.masspole, u.masscart, u.length) == (20.0, 0.5, 2.0, 1.0)
    assert u.total_mass == 2.5 and u.polemass_length == 0.5
    assert env.spec.make().unwrapped.gravity == 20.0  # the spec rebuilds the perturbed task


def test_pendulum_reversed_torque_and_physics():
    normal, rev = pendulum_task("n").make(), pendulum_task("r", reverse_torque=True).make()
    heavy = pendulum_task("h", m=1.5, g=15.0).make()
    assert (heavy.unwrapped.m, heavy.unwrapped.g) == (1.5, 15.0)
    normal.reset(seed=1)
    rev.reset(seed=1)
    for u in (1.5, -0.5, 2.0):
        a = np.array([u], np.float32)
        assert np.allclose(normal.step(a)[0], rev.step(-a)[0])


def test_padding_unifies_flat_observations():
    tasks = [TaskSpec("MountainCar-v0", name="car"), TaskSpec("Acrobot-v1", name="acrobot")]
    with pytest.raises(SpaceMismatchError) as err:
        ContinualEnv(TaskSequence("P", tasks, 5))
    msg = str(err.value)
    assert "observation space" in msg and "task 0 'car': Box" in msg and "(2,)" in msg
    assert "task 1 'acrobot': Box" in msg and "(6,)" in msg and "pad_observations" in msg
    env = ContinualEnv(TaskSequence("P", tasks, 5, pad_observations=True))
    assert env.observation_space.shape == (6,)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (6,) and np.array_equal(obs[2:], np.zeros(4, np.float32))
    recs = run(env, 10)
    assert all(env.observation_space.contains(r[0]) for r in recs)
    assert np.any(recs[-1][0][2:] != 0)  # acrobot fills all six


def test_mismatched_actions_list_each_task():
    tasks = [cartpole_task("cart"), pendulum_task("pend")]
    with pytest.raises(SpaceMismatchError) as err:
        ContinualEnv(TaskSequence("M", tasks, 5))
    msg = str(err.value)
    assert "do not share one action space" in msg
    assert "task 0 'cart': Discrete(2)" in msg and "task 1 'pend': Box(-2.0, 2.0, (1,)" in msg


# -- eval envs, pickling, registration -------------------------------------------------------


def test_eval_env_runs_one_task_with_the_sequence_spaces():
    s = cartpoles(5)
    train = ContinualEnv(s, append_task_id=True)
    ev = s.make_eval_env(1, append_task_id=True)
    assert ev.observation_space == train.observation_space
    assert ev.action_space == train.action_space
    recs = run(ev, 60, seed=None)
    assert {r[3]["task_index"] for r in recs} == {1}
    assert all(np.array_equal(r[0][4:], [0, 1, 0]) for r in recs)
    # its first reset uses the task's eval seed: reproducible, distinct from training
    o1 = s.make_eval_env(1).reset()[0]
    o2 = s.make_eval_env(1).reset()[0]
    assert np.array_equal(o1, o2)
    with pytest.raises(EnvConfigError, match=r"task_index must be an integer in \[0, 3\)"):
        s.make_eval_env(3)


def test_factories_pickle_and_vectorise():
    s = cartpoles(5)
    fns = pickle.loads(pickle.dumps([s.env_fn(append_task_id=True), *s.eval_env_fns()]))
    assert isinstance(fns[0](), ContinualEnv)
    assert [f().reset()[1]["task_index"] for f in fns[1:]] == [0, 1, 2]
    vec = gym.vector.AsyncVectorEnv([s.env_fn(), s.env_fn()])
    try:
        vec.reset(seed=0)
        for _ in range(6):
            _, _, _, _, info = vec.step(np.zeros(2, dtype=np.int64))
        assert list(info["task_index"]) == [1, 1]
    finally:
        vec.close()


def test_gymnasium_make_every_builtin_sequence_is_registered():
    for name in envs.SEQUENCES:
        assert f"crl/{name}-v0" in gym.registry
    env = gym.make("crl/CartPoleSwap-v0", steps_per_task=3, append_task_id=True)
    assert isinstance(env.unwrapped, ContinualEnv)
    assert env.unwrapped.sequence.total_steps == 6
    assert env.observation_space.shape == (6,)


def test_describe_lists_every_sequence_with_tasks_and_budget():
    text = envs.describe_sequences()
    for row in envs.sequence_rows():
        assert row["name"] in text and ", ".join(row["tasks"]) in text
    assert "CartPoleSwap (crl/CartPoleSwap-v0): 2 tasks, 20,480 steps/task" in text
    assert "CW20 (crl/CW20-v0): 10 tasks, 1,000,000 steps/task, 2 cycle(s), 20,000,000" in text


# -- errors ----------------------------------------------------------------------------------


def test_unknown_env_id_is_named_with_a_suggestion():
    with pytest.raises(EnvConfigError, match=r"Unknown env id 'CartPole-v9'.*'CartPole-v1'"):
        TaskSequence("X", [TaskSpec("CartPole-v9")], 10)


def test_unknown_sequence_is_named_with_a_suggestion():
    with pytest.raises(EnvConfigError, match=r"Unknown sequence 'CW11'\. Did you mean 'CW10'"):
        get_sequence("CW11")
    with pytest.raises(EnvConfigError, match="Unknown option"):
        get_sequence("CartPoleSwap", steps=3)


@pytest.mark.parametrize("steps", [0, -5, 1.5, True, [10, 0, 10], [10, 10]])
def test_non_positive_or_malformed_steps_are_refused(steps):
    with pytest.raises(EnvConfigError, match="steps_per_task"):
        cartpoles(steps)


def test_other_sequence_errors():
    with pytest.raises(EnvConfigError, match="cycles of 'T' must be a positive integer"):
        cartpoles(5, cycles=0)
    with pytest.raises(EnvConfigError, match="same name"):
        TaskSequence("D", [cartpole_task("a"), cartpole_task("a")], 5)
    with pytest.raises(EnvConfigError, match="switch_mode must be one of"):
        ContinualEnv(cartpoles(5), switch_mode="later")
    with pytest.raises(EnvConfigError, match="Unknown wrapper 'flip_obs'.*'flip_observation'"):
        WrapperSpec("flip_obs")
    with pytest.raises(EnvConfigError, match="not a permutation"):
        TaskSpec("CartPole-v1", wrappers=[("permute_actions", {"permutation": [0, 0]})]).make()
    with pytest.raises(EnvConfigError, match="high > low"):
        TaskSpec("CartPole-v1", low=5, high=1)
