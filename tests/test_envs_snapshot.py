"""envs/snapshot.py: capture -> N steps -> restore into a freshly built env -> the same N steps,
bit for bit, for every env family (classic control, MuJoCo, Atari, Meta-World), through a
``torch.load(weights_only=True)`` round trip; the plain-data codec; envs it cannot capture."""

from __future__ import annotations

import collections
import io
import threading
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.monitor import Monitor

import envs.snapshot as snapshot
from envs.registry import get_sequence
from envs.sequence import TaskSequence
from envs.snapshot import (
    SnapshotError,
    capture_env,
    decode,
    encode,
    not_captured_warning,
    restore_env,
)
from envs.spec import TaskSpec


def _through_file(value: Any) -> Any:
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _flat(obs: Any) -> np.ndarray:
    if isinstance(obs, dict):
        return np.concatenate([np.ravel(v) for v in obs.values()])
    return np.array(obs, copy=True)


def _play(env: gym.Env, actions: list[Any]) -> list[tuple]:
    """Step through ``actions``, resetting at episode ends; every output, copied."""
    out = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((_flat(obs), float(reward), terminated, truncated, info.get("task_index")))
        if terminated or truncated:
            obs, info = env.reset()
            out.append((_flat(obs), info.get("task_index")))
    return out


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


def _check_exact(sequence: TaskSequence, before: int, after: int) -> tuple[list, list]:
    """Train-like env (SB3 Monitor around the continual env), ``before`` steps, capture,
    ``after`` steps; a fresh env restored from the snapshot must give the same ``after``."""
    def make() -> gym.Env:
        return Monitor(sequence.make_env(append_task_id=True))

    env = make()
    env.reset(seed=5)
    env.action_space.seed(1)
    actions = [env.action_space.sample() for _ in range(before + after)]
    _play(env, actions[:before])
    snap = _through_file(capture_env(env))
    assert snap["problems"] == []
    expected = _play(env, actions[before:])
    fresh = make()
    assert restore_env(fresh, snap) == []
    got = _play(fresh, actions[before:])
    assert fresh.get_episode_rewards() == env.get_episode_rewards()  # Monitor's counters
    env.close()
    fresh.close()
    return expected, got


def test_classic_control_across_episodes_and_a_task_switch() -> None:
    # CartPole: 150 steps per task; the capture is mid-episode in task 0 and the replay
    # crosses episode ends and the switch to the swapped task
    seq = get_sequence("CartPoleSwap", steps_per_task=150)
    expected, got = _check_exact(seq, 110, 120)
    assert {e[-1] for e in expected} == {0, 1}
    assert _same(expected, got)
    # Pendulum (state + last_u), a torque-reversing wrapper in task 3
    seq = get_sequence("PendulumVariants", steps_per_task=120)
    expected, got = _check_exact(seq, 250, 200)
    assert {e[-1] for e in expected} == {2, 3}
    assert _same(expected, got)


def test_a_fresh_env_without_the_snapshot_differs() -> None:
    """The control: what the restore does is needed (else the tests above prove nothing)."""
    seq = get_sequence("CartPoleSwap", steps_per_task=150)
    env = seq.make_env(append_task_id=True)
    env.reset(seed=5)
    actions = [i % 2 for i in range(60)]
    _play(env, actions[:30])
    expected = _play(env, actions[30:])
    fresh = seq.make_env(append_task_id=True)
    fresh.reset(seed=5)
    assert not _same(expected, _play(fresh, actions[30:]))


def test_mujoco_integration_state_and_warm_start() -> None:
    pytest.importorskip("mujoco")
    seq = get_sequence("HalfCheetahPhysics", steps_per_task=100)
    expected, got = _check_exact(seq, 60, 80)
    assert _same(expected, got)


def test_atari_emulator_rng_frames_and_sticky_action() -> None:
    pytest.importorskip("ale_py")
    from envs.atari import atari_task

    seq = TaskSequence("PongPair", [atari_task("Pong"),
                                    atari_task("Pong", name="pong-noisy", transform="noisy")],
                       steps_per_task=200)
    expected, got = _check_exact(seq, 150, 100)  # sticky actions on; noisy frames in task 1
    assert {e[-1] for e in expected} == {0, 1}
    assert _same(expected, got)


def test_atari_needs_the_sticky_action_priming(monkeypatch: pytest.MonkeyPatch) -> None:
    """ALE's remembered action is not in cloneState: without re-priming it, this capture
    point (a repeated action right after it) diverges."""
    pytest.importorskip("ale_py")
    from envs.atari import atari_task

    seq = TaskSequence("Pong1", [atari_task("Pong")], steps_per_task=1000)
    monkeypatch.setattr(snapshot, "_PRIMING_FRAMES", 0)
    diverged = []
    for before in (40, 80, 120):
        expected, got = _check_exact(seq, before, 30)
        diverged.append(not _same(expected, got))
    assert any(diverged)


def test_metaworld_task_goal_and_path_length() -> None:
    pytest.importorskip("metaworld")
    from envs.metaworld import metaworld_task

    seq = TaskSequence("PushWindow", [metaworld_task("window-close-v3", horizon=50)],
                       steps_per_task=500)
    expected, got = _check_exact(seq, 70, 60)  # crosses an episode end (horizon 50)
    assert any(len(e) == 2 for e in expected)
    assert _same(expected, got)


# -- the codec -----------------------------------------------------------------------------
def test_codec_round_trip_keeps_types_values_and_sharing() -> None:
    shared = np.arange(6, dtype=np.float32).reshape(2, 3)
    frozen = np.ones(3, dtype=np.uint8)
    frozen.flags.writeable = False
    gen = np.random.default_rng(7)
    gen.random(3)
    rs = np.random.RandomState(3)
    value = {
        "a": shared, "b": shared, "q": collections.deque([shared, frozen], maxlen=4),
        "frozen": frozen, "f32": np.float32(1.5), "i64": np.int64(-3), "b_": np.bool_(True),
        "dtype": np.dtype("uint8"), "t": (1, "x", None), "s": {2, 3}, 7: [float("nan"), 1e309],
        "gen": gen, "rs": rs, "bytes": b"\x00\x01", "objs": np.array([1, "a"], dtype=object),
        "empty": (b"", np.zeros((0, 3))),
        "odict": collections.OrderedDict([("z", shared), ("a", 1)]),  # SB3's Dict obs
    }
    out = decode(_through_file(encode(value)))
    assert out["a"] is out["b"] and out["q"][0] is out["a"]  # one array, as before
    np.testing.assert_array_equal(out["a"], shared)
    assert out["a"].dtype == np.float32 and out["a"].flags.writeable
    assert not out["frozen"].flags.writeable
    assert out["q"].maxlen == 4 and isinstance(out["q"], collections.deque)
    assert type(out["f32"]) is np.float32 and out["f32"] == 1.5
    assert type(out["i64"]) is np.int64 and type(out["b_"]) is np.bool_
    assert out["dtype"] == np.uint8 and out["t"] == (1, "x", None) and out["s"] == {2, 3}
    assert np.isnan(out[7][0]) and out[7][1] == float("inf")
    np.testing.assert_array_equal(out["gen"].random(5), gen.random(5))  # same stream on
    np.testing.assert_array_equal(out["rs"].rand(4), rs.rand(4))
    assert out["bytes"] == b"\x00\x01" and out["objs"].tolist() == [1, "a"]
    assert out["empty"][0] == b"" and out["empty"][1].shape == (0, 3)
    assert type(out["odict"]) is collections.OrderedDict and list(out["odict"]) == ["z", "a"]
    assert out["odict"]["z"] is out["a"]


def test_codec_refuses_objects_naming_them() -> None:
    with pytest.raises(SnapshotError, match=r"holder\.lock holds a _thread\.lock"):
        encode({"lock": threading.Lock()}, "holder")


# -- envs it cannot capture ------------------------------------------------------------------
class _OpaqueEnv(gym.Env):
    """A toy env whose state sits in an object the snapshot cannot read."""

    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self) -> None:
        self.t = 0
        self.sim = threading.Lock()  # stands for a simulator handle

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action: Any):
        self.t += 1
        return np.full(1, self.t / 10, np.float32), 1.0, False, self.t >= 5, {}


def test_an_env_it_cannot_capture_is_reported_not_raised() -> None:
    gym.register("crl-test/Opaque-v0", entry_point=_OpaqueEnv)
    try:
        seq = TaskSequence("Opaque", [TaskSpec("crl-test/Opaque-v0", name="opaque")],
                           steps_per_task=20)
        env = seq.make_env()
        env.reset(seed=0)
        env.step(0)
        snap = _through_file(capture_env(env))
        assert snap["problems"] == ["_OpaqueEnv.sim holds a _thread.lock, which is not plain data"]
        fresh = seq.make_env()
        problems = restore_env(fresh, snap)
        assert problems == snap["problems"]
        # what was data is restored anyway (the step count), the caller resets the env
        assert fresh.global_step == 1 and fresh.task_envs[0].unwrapped.t == 1
        message = not_captured_warning(problems)
        assert message.startswith("training env state not captured for _OpaqueEnv.sim")
        assert "resume is not bit-exact" in message
    finally:
        del gym.registry["crl-test/Opaque-v0"]


def test_restore_into_another_env_is_reported() -> None:
    from envs.classic import pendulum_task

    snap = capture_env(get_sequence("CartPoleSwap", steps_per_task=50).make_env())
    four = get_sequence("PendulumVariants", steps_per_task=50).make_env()
    assert restore_env(four, snap) == ["ContinualEnv has 4 task envs, the snapshot 2"]
    two = TaskSequence("P2", [pendulum_task("a"), pendulum_task("b")],
                       steps_per_task=50).make_env()
    (problem, _) = restore_env(two, snap)
    assert problem.startswith("the env's wrapper layers ['gymnasium.wrappers.common.TimeLimit',"
                              " 'gymnasium.envs.classic_control.pendulum.PendulumEnv'] differ")
    assert restore_env(two, {"format": 99}) == [
        "the env snapshot has format 99, this crl reads 1"]
