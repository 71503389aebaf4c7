"""Atari, MuJoCo and Meta-World sequences run for a few hundred steps; their perturbations
are what the docs say. Each block skips with the extra's install line when it is missing."""

from __future__ import annotations

import numpy as np
import pytest

from envs import ContinualEnv, get_sequence


def _needs(module: str, extra: str):
    pytest.importorskip(module, reason=f"needs the '{extra}' extra: pip install \"crl[{extra}]\"")


def _run(env, n, seed=0):
    obs, info = env.reset(seed=seed)
    out = []
    for _ in range(n):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        out.append((obs, r, term, trunc, info))
        if term or trunc:
            obs, info = env.reset()
    return out


# -- Atari -----------------------------------------------------------------------------------


def test_atari6_runs_every_game_with_shared_spaces():
    _needs("ale_py", "atari")
    _needs("cv2", "atari")
    seq = get_sequence("Atari6", steps_per_task=50, cycles=1)
    env = ContinualEnv(seq, append_task_id=True)
    env.action_space.seed(0)
    assert env.action_space.n == 18
    assert env.observation_space["observation"].shape == (4, 84, 84)
    steps = _run(env, 300)
    assert [s[4]["task_index"] for s in steps] == [i for i in range(6) for _ in range(50)]
    for obs, *_, info in steps:
        assert obs["observation"].dtype == np.uint8 and obs["observation"].shape == (4, 84, 84)
        assert np.array_equal(obs["task_id"], np.eye(6, dtype=np.float32)[info["task_index"]])
    for e in env.task_envs:
        assert e.unwrapped.ale.getInt("frame_skip") == 1  # skipping is AtariPreprocessing's
        assert e.action_space.n == 18


def test_pong_variants_flip_and_noise():
    _needs("ale_py", "atari")
    _needs("cv2", "atari")
    from envs.atari import atari_task

    plain = atari_task("Pong").make()
    hflip = atari_task("Pong", transform="hflip").make()
    vflip = atari_task("Pong", transform="vflip").make()
    noisy = atari_task("Pong", transform="noisy").make()
    frames = [e.reset(seed=7)[0] for e in (plain, hflip, vflip, noisy)]
    for a in (0, 3, 3, 2, 0):
        frames = [e.step(a)[0] for e in (plain, hflip, vflip, noisy)]
    p, h, v, n = frames
    assert np.array_equal(h, p[:, :, ::-1]) and np.array_equal(v, p[:, ::-1, :])
    diff = n.astype(int) - p.astype(int)
    assert 10 < diff.std() < 30  # std 25 noise, clipped at 0/255
    again = atari_task("Pong", transform="noisy").make()
    again.reset(seed=7)
    assert np.array_equal([again.step(a)[0] for a in (0, 3, 3, 2, 0)][-1], n)  # seeded noise
    modes = get_sequence("PongSoup", steps_per_task=5)
    ale = {t.name: t.make().unwrapped for t in modes.tasks[:3]}
    assert ale["pong-mode1"]._game_mode == 1 and ale["pong-difficulty3"]._game_difficulty == 3


# -- MuJoCo ----------------------------------------------------------------------------------


def test_half_cheetah_physics_runs_and_is_perturbed():
    _needs("mujoco", "mujoco")
    seq = get_sequence("HalfCheetahPhysics", steps_per_task=60)
    env = ContinualEnv(seq)
    env.action_space.seed(0)
    steps = _run(env, 300)
    assert [s[4]["task_index"] for s in steps] == [i for i in range(5) for _ in range(60)]
    assert all(np.all(np.isfinite(s[0])) for s in steps)
    base, grav, thighs, heavy, feet = (e.unwrapped.model for e in env.task_envs)
    assert np.allclose(grav.opt.gravity, [0, 0, -15.0]) and np.allclose(base.opt.gravity[2], -9.81)
    torso = base.body("torso").id
    assert np.isclose(heavy.body_mass[torso], 2 * base.body_mass[torso])
    assert np.allclose(heavy.body_inertia[torso], 2 * base.body_inertia[torso])
    for part, model, s in (("bthigh", thighs, 1.3), ("ffoot", feet, 0.7)):
        assert np.allclose(model.geom(part).size, s * base.geom(part).size)
        assert np.allclose(model.geom(part).pos, s * base.geom(part).pos)  # joint at origin
    # the shin hangs from the scaled thigh's end: its attachment point scales too
    assert np.allclose(thighs.body("bshin").pos, 1.3 * base.body("bshin").pos)
    assert np.allclose(thighs.body("bfoot").pos, base.body("bfoot").pos)  # child keeps its size


def test_hopper_part_scaling_keeps_the_chain_connected():
    _needs("mujoco", "mujoco")
    seq = get_sequence("HopperPhysics", steps_per_task=20)
    env = ContinualEnv(seq)
    base, short = env.task_envs[0].unwrapped.model, env.task_envs[4].unwrapped.model
    # leg: pos (0, 0, -0.7), hinge at (0, 0, 0.25) -> attached at z = -0.45 in the thigh
    # frame; thigh scaled by 0.75 about its hinge (0, 0, 0): attached at -0.3375
    assert np.allclose(base.body("leg").pos, [0, 0, -0.7])
    assert np.allclose(short.body("leg").pos, [0, 0, -0.3375 - 0.25])
    assert np.allclose(short.geom("thigh_geom").size[:2], 0.75 * base.geom("thigh_geom").size[:2])
    assert np.all(np.isfinite([s[0] for s in _run(env, 100)]))


def test_half_cheetah_backward_reward():
    _needs("mujoco", "mujoco")
    env = ContinualEnv(get_sequence("HalfCheetahDir", steps_per_task=50))
    env.action_space.seed(1)
    for _obs, r, _term, _trunc, info in _run(env, 100):
        sign = 1.0 if info["task_index"] == 0 else -1.0
        assert np.isclose(r, sign * info["x_velocity"] + info["reward_ctrl"])


# -- Meta-World ------------------------------------------------------------------------------


def test_cw10_runs_all_tasks_with_success_and_horizon():
    _needs("metaworld", "metaworld")
    seq = get_sequence("CW10", steps_per_task=30, horizon=12)
    env = ContinualEnv(seq, append_task_id=True)
    env.action_space.seed(0)
    steps = _run(env, 300)
    assert [s[4]["task_index"] for s in steps] == [i for i in range(10) for _ in range(30)]
    assert all(s[4]["success"] in (0.0, 1.0) for s in steps)
    assert all(env.observation_space.contains(s[0]) for s in steps)
    ends = [k + 1 for k, s in enumerate(steps) if s[3]]
    # per stage: two full 12-step episodes, then one cut to 6 steps by the switch
    assert ends == [start + k for start in range(0, 300, 30) for k in (12, 24, 30)]
    assert get_sequence("CW20").total_steps == 20_000_000
    assert get_sequence("CW10").tasks[0].kwargs["horizon"] == 200


def test_metaworld_task_is_fixed_by_the_seed():
    _needs("metaworld", "metaworld")
    seq = get_sequence("CW10", steps_per_task=5)
    ev = [seq.make_eval_env(6) for _ in range(3)]  # push: goal drawn per task seed
    g0 = ev[0].reset(seed=1)[0][36:39]
    g1 = ev[1].reset(seed=1)[0][36:39]
    g2 = ev[2].reset(seed=2)[0][36:39]
    assert np.array_equal(g0, g1) and not np.array_equal(g0, g2)
    for _ in range(3):  # later resets keep the task
        assert np.array_equal(ev[0].reset()[0][36:39], g0)
    obs, *_, info = ev[0].step(np.zeros(4, np.float32))
    assert info["success"] == 0.0 and info["task_index"] == 6


def test_atari_scores_are_human_normalised_by_default():
    """No pip extra needed: the specs carry the bounds; only building an env needs ale-py."""
    from agents.evaluation import build_normalizer
    from envs.atari import HUMAN_SCORES, atari3, atari_task

    seq = atari3()
    for task, game in zip(seq.tasks, ("SpaceInvaders", "Krull", "BeamRider"), strict=True):
        assert (task.low, task.high) == HUMAN_SCORES[game]
        assert task.score_basis.startswith("human-normalised")
    norm = build_normalizer(seq)  # every bound configured: no env is built, no reference
    assert norm.complete and all(b.startswith("human-normalised") for b in norm.basis)
    # a return half-way between random and human scores 0.5
    low, high = HUMAN_SCORES["Krull"]
    assert norm.normalize_returns(1, np.array([(low + high) / 2]))[0] == pytest.approx(0.5)
    ref = atari3(scores="reference")
    assert all(t.low is None and t.high is None and not t.score_basis for t in ref.tasks)
    # explicit bounds win; an unknown basis is refused
    assert (atari_task("Pong", low=-21, high=21).low, atari_task("Pong").low) == (-21, -20.7)
    with pytest.raises(ValueError, match="'human' or 'reference'"):
        atari_task("Pong", scores="median")
