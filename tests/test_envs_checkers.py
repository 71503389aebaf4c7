"""Gymnasium's and stable-baselines3's env checkers on every built-in sequence whose extra is
installed (skipped with the extra's install line otherwise). A failure is a bug in envs/."""

from __future__ import annotations

import warnings

import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs import ContinualEnv, get_sequence
from envs.registry import extra_installed


def _sequence(name: str):
    # the checkers take a few dozen steps and expect no truncation after one step: a budget
    # of 25 steps runs two or more tasks without cutting their first steps
    seq = get_sequence(name, steps_per_task=25)
    for extra in seq.extras:
        if not extra_installed(extra):
            pytest.skip(f"sequence {name} needs the '{extra}' extra: pip install \"crl[{extra}]\"")
    return seq


@pytest.mark.parametrize("name", list(envs.SEQUENCES))
def test_checkers_pass_on_builtin_sequence(name):
    seq = _sequence(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # advice (unbounded Box etc.), not errors
        for append_task_id in (False, True):
            env = ContinualEnv(seq, append_task_id=append_task_id)
            try:
                gym_check_env(env, skip_render_check=True)
                sb3_check_env(env, warn=False)
            finally:
                env.close()
        ev = seq.make_eval_env(seq.num_tasks - 1, append_task_id=True)
        try:
            # SB3's checker is not run here: it reads env.unwrapped, and a raw Meta-World env
            # defines compute_reward, which SB3 takes for a GoalEnv (its own false positive)
            gym_check_env(ev, skip_render_check=True)
        finally:
            ev.close()
