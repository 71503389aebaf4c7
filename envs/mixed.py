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

from envs.classic import acrobot_task, cartpole_task
from envs.sequence import TaskSequence


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


SEQUENCES = {
    "ClassicMix": classic_mix,
}
