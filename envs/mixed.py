"""Sequences of tasks from different environments, as in Continual World: the tasks share no
state features, so a multi-head agent (one output head per task) forgets through its shared
trunk, and the continual-learning methods have something to protect.

The sequence builder unifies the spaces (:mod:`envs.spaces`): observations zero-padded to the
longest and cast to float32, Discrete actions padded to the largest count, Box actions
rescaled to [-1, 1] and padded to the longest. Budgets are chosen so that a single-task run
learns every task (the reference runs show it) and one PPO run of ``ClassicMix`` takes about
two minutes on one CPU core.
"""

from __future__ import annotations

from envs.classic import PENDULUM_HIGH, acrobot_task, cartpole_task, pendulum_task
from envs.sequence import TaskSequence
from envs.spec import TaskSpec

#: Gymnasium's reward_threshold of InvertedPendulum-v5 is 950; 1000 steps balanced is the max
INVERTED_PENDULUM_HIGH = 1000.0
#: Gymnasium's reward_threshold of Reacher-v5
REACHER_HIGH = -3.75


def _mujoco(env_id: str, name: str, high: float) -> TaskSpec:
    return TaskSpec(env_id, name=name, high=high, requires=("mujoco",), extra="mujoco")


def classic_mix() -> TaskSequence:
    """PPO (discrete): Acrobot, then CartPole, then CartPole with its actions swapped.

    Acrobot's 61,440 steps (30 rollouts of 2048) are what PPO 64-64 needs to reach
    Gymnasium's threshold (-100); CartPole needs 40,960. Fine-tuning on CartPole forgets
    Acrobot (multi-head and single head); the swapped CartPole then overwrites CartPole in a
    single-head agent only (in a multi-head one its own head separates it).
    """
    return TaskSequence(
        "ClassicMix",
        [acrobot_task("acrobot"), cartpole_task("cartpole"),
         cartpole_task("cartpole-swapped", swap_actions=True)],
        steps_per_task=(61_440, 40_960, 40_960),
        pad_observations=True,
        description="Acrobot, CartPole, swapped CartPole: forgetting across envs (PPO)",
    )


def mujoco_mix() -> TaskSequence:
    """SAC (continuous): InvertedPendulum, then Pendulum, then Reacher (``mujoco`` extra).

    Budgets from single-task SAC 64-64 runs (1,000 exploration steps): InvertedPendulum
    jumps to 1000 between 18k and 22k steps, so it gets 30,000; Pendulum swings up within
    7,500 and gets 10,000; Reacher improves slowly and gets 15,000. Scores: returns between
    the random policy's and Gymnasium's thresholds (Pendulum: :data:`PENDULUM_HIGH`). Actions
    are rescaled to [-1, 1] and padded to Reacher's two; observations padded to Reacher's 10
    and cast to float32. Fine-tuning on Pendulum drops InvertedPendulum to 0 within a few
    thousand steps, in a multi-head agent too.
    """
    return TaskSequence(
        "MujocoMix",
        [_mujoco("InvertedPendulum-v5", "inverted-pendulum", INVERTED_PENDULUM_HIGH),
         pendulum_task("pendulum", high=PENDULUM_HIGH),
         _mujoco("Reacher-v5", "reacher", REACHER_HIGH)],
        steps_per_task=(30_000, 10_000, 15_000),
        pad_observations=True,
        description="InvertedPendulum, Pendulum, Reacher: forgetting across envs (SAC)",
    )


SEQUENCES = {
    "ClassicMix": classic_mix,
    "MujocoMix": mujoco_mix,
}
