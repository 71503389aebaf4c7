"""Continual-learning method options that `crl train` uses for an RL agent when the user sets
none (``--<method>-<option>`` or YAML override them, option by option).

The strategy constructors' own defaults were chosen for the supervised benchmarks
(``crl.supervised.experiment.SUPERVISED_METHOD_DEFAULTS``); RL losses have another scale, so
the RL strengths live here, per agent.

Penalty convention everywhere: ``lam * sum_i w_i (theta_i - theta*_i)^2`` with no 1/2
(``crl.strategies.anchored``), added to the actor loss, which is a mean over the batch.

- SAC: calibrated on MujocoMix (InvertedPendulum, Pendulum, Reacher; multi-head, 64-64,
  3 seeds; ``scripts/sweeps/mujocomix-sac-calibration.yaml``) by final average performance
  P(T), the same rule as PPO (within 0.01: a tie). Grid (P(T), mean of 3 seeds): L2 1e3
  0.835, 1e4 0.832, 1e5 0.836 (a tie: CW's 1e5 kept); EWC 1e2 0.782, 1e3 0.850, 1e4 0.805
  (1e3 chosen, against CW's 1e4: at 1e4 the new-task gain falls to 0.62 from 0.71 and
  forgetting rises to 0.11 from -0.05); MAS 1e2 0.804, 1e3 0.810, 1e4 0.829 (CW's 1e4);
  PackNet retraining 100 steps 0.804, 1000 0.918; A-GEM memory 256 per task 0.308, 2048
  0.361; finetune 0.392. Replay (P(T) / new-task gain): CW's perfect memory (``mode``
  buffer: each batch uniform over every transition seen) 0.623 / 0.270; balanced (the same
  memory, a fixed share of each batch) share 0.5 0.850 / 0.379, share 0.25 0.842 / 0.428:
  a tie, broken by the gain, so balanced with share 0.25 (the uniform draw gave Pendulum,
  which follows 30,000 InvertedPendulum transitions, 3-25% of each batch, and seed 0 never
  learnt it); the memory holds 1e6 transitions, SB3's buffer size. Replay with the memory
  as the agent's own kept buffer (before the strategy owned it; ``--buffer-size`` 1e4 and
  1e6): 0.627 and 0.576. Before it, the SAC strengths
  were Continual World's (Wołczyk et al. 2021, "Continual World: A Robotic Benchmark For
  Continual Reinforcement Learning"; ``cl_reg_coef`` in the CW repository's
  ``examples/paper_cl_experiments.sh``): L2 1e5, EWC 1e4, MAS 1e4. CW's regulariser has the
  same form (no 1/2, summed over the actor trunk, added to the batch-mean actor loss) and the
  same EWC Fisher for the pre-tanh Gaussian (1/sigma^2 (d mu)^2 + 2/sigma^2 (d sigma)^2), so
  its numbers carry over. Differences: CW clips each sample's Fisher from below at 1e-5 and
  we do not; our Gaussian MAS output norm is ||mu||^2 + ||sigma||^2 where CW's is
  ||mu||^2 + ||log sigma||^2 (MAS's 1e4 is also the grid's best here).
- SAC single head (``--single-head``; ``scripts/sweeps/mujocomix-sac-single-head-
  calibration.yaml``, 3 seeds, P(T) / forgetting / new-task gain): L2 0.1 0.22 / 0.71 /
  0.51, 1 0.18 / 0.43 / 0.30, 3 0.44 / 0.17 / 0.32, 10 0.36 / 0.11 / 0.22, 100 0.42 / 0.09
  / 0.18, 1e3 0.37 / 0.00 / 0.01 (1 seed), 1e4 0.33 / 0.00 / 0.00 (1 seed), 1e5 0.33 /
  -0.05 / 0.00 (5 seeds; ``scripts/results/mujocomix-sac-superseded/``): 3 chosen (by
  P(T), as everywhere; finetune 0.21 / 0.72 / 0.54).
  From 10 up no seed learns Pendulum (gain <= 0.03); at 1 and below InvertedPendulum is
  forgotten (0.55-1.0); at 3 one seed of three forgets it (0.81) and every seed learns
  Reacher (0.51-0.64). Replay (balanced) share 0.25, the multi-head choice: 0.46 / 0.24 /
  0.42 (seeds 0-2 of the report's earlier runs, in ``scripts/results/mujocomix-sac-
  superseded/``); share 0.5: 0.55 / -0.03 / 0.34: 0.5 chosen (with one
  head the old tasks need more of each batch: the shared output layer is what the new
  task moves). EWC and MAS keep their multi-head strengths: at them single-head
  forgetting is 0.32 and 0.54 (finetune 0.72) with gains 0.47 and 0.49; their seed-0 grids
  (EWC 10 / 100 / 1e3 / 1e4: P 0.32 / 0.30 / 0.19 / 0.14; MAS 100 / 1e3 / 1e4 / 1e5 / 1e6:
  0.21 / 0.29 / 0.13 / 0.13 / 0.36) vary more between seeds than between strengths (EWC
  1e3 over 5 seeds: 0.19 to 0.57).
- PPO: calibrated on ClassicMix (Acrobot, CartPole, swapped CartPole; multi-head, crl
  train's default; 3 seeds; ``scripts/sweeps/classicmix-ppo-calibration.yaml``), picked by
  final average performance P(T) as Continual World did; on a tie, the existing default if
  it is among the tied values, else the higher new-task gain. Grid (P(T), mean of 3 seeds):
  L2 0.01 0.964, 0.1 0.951, 1 0.834, 10 0.900; EWC 10 1.000 (gain 0.929), 100 1.000 (gain
  0.855), 1000 0.963, 10000 0.943; MAS 0.03 1.000, 0.3 0.990, 3 0.868, 30 0.872; PackNet
  retraining 100 steps 1.000, 1000 1.000; A-GEM memory 256 per task 0.957, 2048 0.997;
  replay (distillation) memory 1000 1.000, 10000 1.000; finetune 0.667. The chosen L2, EWC
  and MAS strengths are the grid's smallest: with one head per task a weak anchor already
  keeps Acrobot (forgetting <= 0.0) while stronger ones cost new-task gain (L2: 0.87 at
  0.01, 0.66 at 1). The earlier defaults (L2 1, EWC 1000, MAS 3) came from CartPoleSwap,
  where multi-head runs forget nothing.
- A-GEM: the reference gradient uses as many memory samples as the agent's own training
  batch (CW: ``episodic_batch_size`` 128 = its SAC batch 128), not the supervised 256, which
  on PPO's minibatch of 64 made the reference forward/backward four times the update's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

#: agent -> method -> constructor options (before the user's).
RL_METHOD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "ppo": {
        "l2": {"lam": 0.01},
        "ewc": {"lam": 10.0},
        "mas": {"lam": 0.03},
        "agem": {"memory_per_task": 2048},
        # on-policy PPO cannot learn from stored transitions: its replay distils the old
        # policy on stored states (agents.ppo refuses the other modes)
        "replay": {"mode": "distill"},
    },
    "sac": {
        "l2": {"lam": 1e5},
        "ewc": {"lam": 1e3},
        "mas": {"lam": 1e4},
        "packnet": {"retrain_steps": 1000},
        "agem": {"memory_per_task": 2048},
        # every finished task's transitions stay in the strategy's memory (SB3's default
        # buffer size; a reservoir beyond it), and a quarter of each batch comes from it
        # (balanced replay; CW's uniform draw is --replay-mode buffer)
        "replay": {"mode": "balanced", "share": 0.25, "memory_size": 1_000_000},
    },
}


#: agent -> method -> options that replace RL_METHOD_DEFAULTS' in the single-head setting
#: (``--single-head``): there the protected set is the whole actor or policy, output layer
#: included, so a strength calibrated with per-task heads can freeze it.
RL_SINGLE_HEAD_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "ppo": {},
    "sac": {"l2": {"lam": 3.0}, "replay": {"share": 0.5}},
}


def agent_batch_size(agent: str, agent_options: Mapping[str, Any]) -> int:
    """The training (mini)batch size the agent will use: the option, or SB3's default."""
    if "batch_size" in agent_options:
        return int(agent_options["batch_size"])
    if agent == "ppo":
        from stable_baselines3 import PPO as algo
    elif agent == "sac":
        from stable_baselines3 import SAC as algo
    else:
        raise ValueError(f"unknown agent {agent!r}; choose one of: ppo, sac")
    return int(inspect.signature(algo.__init__).parameters["batch_size"].default)


def rl_method_options(
    agent: str,
    method: str,
    user_options: Mapping[str, Any] | None = None,
    agent_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The options ``method`` is built with for ``agent``: RL defaults (their single-head
    values when ``agent_options`` says ``multi_head: false``) < the user's options.
    For a combination (``ewc+redo``) ``user_options`` and the result hold one entry per
    member (:func:`crl.strategies.user_options`)."""
    if agent not in RL_METHOD_DEFAULTS:
        raise ValueError(f"unknown agent {agent!r}; choose one of: {', '.join(RL_METHOD_DEFAULTS)}")
    from crl.strategies import method_members

    members = method_members(method)
    if len(members) > 1:
        given = dict(user_options or {})
        return {m: rl_method_options(agent, m, given.get(m), agent_options) for m in members}
    method = members[0]
    options = dict(RL_METHOD_DEFAULTS[agent].get(method, {}))
    if not bool((agent_options or {}).get("multi_head", True)):
        options |= RL_SINGLE_HEAD_DEFAULTS[agent].get(method, {})
    if method == "agem":
        options["batch_size"] = agent_batch_size(agent, agent_options or {})
    return options | dict(user_options or {})


__all__ = ["RL_METHOD_DEFAULTS", "RL_SINGLE_HEAD_DEFAULTS", "agent_batch_size",
           "rl_method_options"]
