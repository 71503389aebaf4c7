"""Classic-control tasks and sequences: CartPole and Pendulum with changed physics, Acrobot,
and the rotated-observation sequences (the RL counterpart of permuted MNIST).

Perturbations are absolute values of the Gymnasium env attributes (see
:func:`envs.wrappers.cartpole_physics` / :func:`envs.wrappers.pendulum_physics`); defaults of
the unperturbed envs: CartPole gravity 9.8, masscart 1.0, masspole 0.1, length 0.5 (half the
pole); Pendulum g 10.0, m 1.0, l 1.0.
"""

from __future__ import annotations

import dataclasses

from envs.sequence import TaskSequence
from envs.spec import TaskSpec, WrapperSpec

CARTPOLE_HORIZON = 200  # CartPole-v0's horizon: shorter than v1's 500, so demos learn faster
#: Pendulum-v1 has no reward_threshold; -150 is about the mean return of a swing-up policy
#: over random starts (the first ~100 steps of a start hanging down cost about -100 to -150)
PENDULUM_HIGH = -150.0


def cartpole_task(
    name: str,
    *,
    gravity: float | None = None,
    masscart: float | None = None,
    masspole: float | None = None,
    length: float | None = None,
    swap_actions: bool = False,
    horizon: int = CARTPOLE_HORIZON,
) -> TaskSpec:
    """CartPole-v1 with changed physics and/or left/right swapped.

    Score bounds: the return is the number of steps balanced, so [0, horizon].
    """
    physics = {
        k: v
        for k, v in dict(
            gravity=gravity, masscart=masscart, masspole=masspole, length=length
        ).items()
        if v is not None
    }
    wrappers = []
    if physics:
        wrappers.append(WrapperSpec("cartpole_physics", physics))
    if swap_actions:
        wrappers.append(WrapperSpec("permute_actions", {"permutation": [1, 0]}))
    return TaskSpec(
        "CartPole-v1",
        kwargs={"max_episode_steps": horizon},
        wrappers=wrappers,
        name=name,
        low=0.0,
        high=float(horizon),
    )


def pendulum_task(
    name: str,
    *,
    g: float | None = None,
    m: float | None = None,
    l: float | None = None,  # noqa: E741
    reverse_torque: bool = False,
    high: float | None = None,
) -> TaskSpec:
    """Pendulum-v1 with changed gravity, mass, length and/or reversed torque.

    Score bounds: ``low`` is measured (random policy); ``high`` is measured by the reference
    run unless given: the best achievable return depends on the physics
    (:data:`PENDULUM_HIGH` for the unchanged pendulum).
    """
    physics = {k: v for k, v in dict(g=g, m=m, l=l).items() if v is not None}
    wrappers = []
    if physics:
        wrappers.append(WrapperSpec("pendulum_physics", physics))
    if reverse_torque:
        wrappers.append(WrapperSpec("negate_actions"))
    return TaskSpec("Pendulum-v1", wrappers=wrappers, name=name, high=high)


ACROBOT_HIGH = -100.0  # Gymnasium's reward_threshold of Acrobot-v1


def acrobot_task(name: str = "acrobot", *, reverse_torque: bool = False) -> TaskSpec:
    """Acrobot-v1 (reward -1 per step until the tip swings above the bar, 500-step limit).

    Score bounds: ``low`` is measured (a random policy scores about -500); ``high`` is
    Gymnasium's reward_threshold for the task, -100, so a score of 1 means "solved".
    ``reverse_torque`` swaps the -1 and +1 torque actions.
    """
    wrappers = []
    if reverse_torque:
        wrappers.append(WrapperSpec("permute_actions", {"permutation": [2, 1, 0]}))
    return TaskSpec("Acrobot-v1", wrappers=wrappers, name=name, high=ACROBOT_HIGH)


def rotated(task: TaskSpec, name: str, seed: int) -> TaskSpec:
    """``task`` seen through a fixed random rotation of its observation, drawn from ``seed``
    (:class:`envs.wrappers.RandomObservationMap`): the same dynamics, rewards and bounds."""
    wrapper = WrapperSpec("random_observation_map", {"seed": seed, "kind": "rotation"})
    return dataclasses.replace(task, name=name, wrappers=(*task.wrappers, wrapper))


def cartpole_rotations(count: int) -> list[TaskSpec]:
    """CartPole through the rotations of seeds 1..``count``, task k named cartpole-rot<k>:
    one convention, so a longer sequence starts with a shorter one's tasks."""
    return [rotated(cartpole_task(f"cartpole-rot{k}"), f"cartpole-rot{k}", k)
            for k in range(1, count + 1)]


def cartpole_rotated() -> TaskSequence:
    """CartPole seen through three fixed random rotations of its 4-d state (seeds 1-3).

    Like permuted MNIST, the tasks share dynamics and optimal behaviour but not features.
    With one head per task the heads and the trunk's spare capacity keep the tasks apart
    (multi-head finetune hardly forgets); with ``--single-head`` the task one-hot is the only
    cue, and finetune forgets. 40,960 steps per task are 20 rollouts of PPO's 2048.
    """
    return TaskSequence(
        "CartPoleRotated",
        cartpole_rotations(3),
        steps_per_task=40_960,
        description="CartPole through 3 random rotations of its state (PPO, permuted-MNIST-like)",
    )


def cartpole_rotated_20() -> TaskSequence:
    """CartPole through 20 fixed random rotations of its state (seeds 1-20; the first three
    are :func:`cartpole_rotated`'s), 10,240 steps each: the loss-of-plasticity sequence for
    PPO, the RL counterpart of permuted MNIST over many tasks (observation-permutation shift,
    as in Juliani & Ash 2024's on-policy plasticity study). A fresh PPO learns any of the
    rotations to 0.95-1.00 within 10,240 steps; with ``--single-head`` finetune's
    end-of-task score falls from 0.87 (first four tasks) to 0.59 (last four), by 0.009 per
    task (3 seeds)."""
    return TaskSequence(
        "CartPoleRotated20",
        cartpole_rotations(20),
        steps_per_task=10_240,
        description="CartPole through 20 random rotations of its state (PPO, plasticity)",
    )


def pendulum_rotated() -> TaskSequence:
    """Pendulum seen through three fixed random rotations of its 3-d observation (seeds
    1-3): the SAC counterpart of :func:`cartpole_rotated`."""
    return TaskSequence(
        "PendulumRotated",
        [rotated(pendulum_task(f"pendulum-rot{k}", high=PENDULUM_HIGH), f"pendulum-rot{k}", k)
         for k in (1, 2, 3)],
        steps_per_task=15_000,
        description="Pendulum through 3 random rotations of its state (SAC, permuted-MNIST-like)",
    )


def cartpole_swap() -> TaskSequence:
    """The README demo: CartPole, then CartPole with left and right swapped.

    The optimal action of the second task is the opposite of the first's in every state, so
    plain fine-tuning drops the first task's return to about the random policy's: strong
    forgetting. PPO solves each task within 20k steps, well under a minute on a CPU core;
    20,480 steps are 10 rollouts of SB3 PPO's default 2048, so rollouts end at the switch.
    """
    return TaskSequence(
        "CartPoleSwap",
        [cartpole_task("cartpole"), cartpole_task("cartpole-swapped", swap_actions=True)],
        steps_per_task=20_480,
        description="CartPole then CartPole with swapped actions: the forgetting demo",
    )


def cartpole_variants() -> TaskSequence:
    return TaskSequence(
        "CartPoleVariants",
        [
            cartpole_task("cartpole"),
            cartpole_task("cartpole-gravity-20", gravity=20.0),
            cartpole_task("cartpole-long-pole", length=1.0),
            cartpole_task("cartpole-heavy", masspole=0.5, masscart=2.0),
            cartpole_task("cartpole-swapped", swap_actions=True),
        ],
        steps_per_task=100_000,
        description="CartPole with changed gravity, pole length, masses and swapped actions",
    )


def pendulum_variants() -> TaskSequence:
    return TaskSequence(
        "PendulumVariants",
        [
            pendulum_task("pendulum"),
            pendulum_task("pendulum-heavy", m=1.5),
            pendulum_task("pendulum-gravity-15", g=15.0),
            pendulum_task("pendulum-reversed", reverse_torque=True),
        ],
        steps_per_task=50_000,
        description="Pendulum with changed mass, gravity and reversed torque",
    )


SEQUENCES = {
    "CartPoleSwap": cartpole_swap,
    "CartPoleVariants": cartpole_variants,
    "PendulumVariants": pendulum_variants,
    "CartPoleRotated": cartpole_rotated,
    "CartPoleRotated20": cartpole_rotated_20,
    "PendulumRotated": pendulum_rotated,
}
