"""User sequences from YAML: a valid file builds the same sequence as Python; bad files fail
with an error that names the file, the task and the problem."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from envs import ContinualEnv, EnvConfigError, get_sequence, load_sequence
from envs.classic import cartpole_task

VALID = """
name: MyCartPoles
steps_per_task: [30, 20]
cycles: 2
seed: 4
description: two cartpoles
tasks:
  - env_id: CartPole-v1
    name: plain
    kwargs: {max_episode_steps: 200}
    low: 0
    high: 200
  - env_id: CartPole-v1
    name: heavy-swapped
    kwargs: {max_episode_steps: 200}
    wrappers:
      - cartpole_physics: {masspole: 0.5}
      - name: permute_actions
        kwargs: {permutation: [1, 0]}
      - RecordEpisodeStatistics
"""


def write(tmp_path, text: str):
    p = tmp_path / "seq.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_valid_file_builds_the_sequence(tmp_path):
    s = load_sequence(write(tmp_path, VALID))
    assert s.name == "MyCartPoles" and s.task_names == ("plain", "heavy-swapped")
    assert s.steps_per_task == (30, 20) and s.cycles == 2 and s.seed == 4
    assert s.switch_points == (30, 50, 80)
    assert (s.tasks[0].low, s.tasks[0].high) == (0, 200)
    env = ContinualEnv(s)
    u = env.task_envs[1].unwrapped
    assert u.masspole == 0.5 and u.polemass_length == 0.5 * u.length
    # same as the Python definition of the swapped task: same seed, mirrored actions
    ref = cartpole_task("r", masspole=0.5, swap_actions=True).make()
    a, _ = env.task_envs[1].reset(seed=2)
    b, _ = ref.reset(seed=2)
    for act in (0, 1, 1, 0):
        assert np.array_equal(env.task_envs[1].step(act)[0], ref.step(act)[0])
    assert get_sequence(str(tmp_path / "seq.yaml"), seed=9).seed == 9


def test_shortcut_tasks(tmp_path):
    s = load_sequence(
        write(
            tmp_path,
            """
            name: Shortcuts
            steps_per_task: 10
            tasks:
              - cartpole: {name: a, gravity: 20.0}
              - cartpole: {name: b, swap_actions: true}
            """,
        )
    )
    assert s.tasks[0].wrappers[0].kwargs == {"gravity": 20.0}
    assert ContinualEnv(s).task_envs[0].unwrapped.gravity == 20.0


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("name: [unclosed\n", r"not valid YAML"),
        ("- just\n- a list\n", r"top level must be a mapping"),
        (
            "name: X\ntasks: [{env_id: CartPole-v1}]\n",
            r"missing required keys \['steps_per_task'\]",
        ),
        ("name: X\nsteps_per_task: 5\ntasks: []\n", r"tasks must be a non-empty list"),
        (
            "name: X\nsteps_per_task: 5\nspeed: 3\ntasks: [{env_id: CartPole-v1}]\n",
            r"unknown keys \['speed'\]",
        ),
        (
            "name: X\nsteps_per_task: 0\ntasks: [{env_id: CartPole-v1}]\n",
            r"steps_per_task of 'X' must be a positive integer",
        ),
        (
            "name: X\nsteps_per_task: -3\ntasks: [{env_id: CartPole-v1}]\n",
            r"must be a positive integer.*-3",
        ),
        (
            "name: X\nsteps_per_task: 5\ntasks: [{env_id: CartPole-v1}, {env_id: Cartpole-v1}]\n",
            r"task 1: Unknown env id 'Cartpole-v1'.*'CartPole-v1'",
        ),
        (
            "name: X\nsteps_per_task: 5\ntasks: [{env: CartPole-v1}]\n",
            r"task 0: unknown keys \['env'\]",
        ),
        (
            "name: X\nsteps_per_task: 5\ntasks: [{name: a}]\n",
            r"task 0: missing env_id",
        ),
        (
            "name: X\nsteps_per_task: 5\ntasks:\n  - env_id: CartPole-v1\n"
            "    wrappers: [no_such_wrapper]\n",
            r"task 0.*Unknown wrapper 'no_such_wrapper'",
        ),
        (
            "name: X\nsteps_per_task: 5\ntasks: [{cartpole: {name: a, gravty: 3}}]\n",
            r"task 0: bad arguments for cartpole: .*gravty",
        ),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(EnvConfigError, match=pattern) as err:
        load_sequence(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(EnvConfigError, match="does not exist"):
        load_sequence(tmp_path / "nope.yaml")
