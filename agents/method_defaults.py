"""Continual-learning method options that `crl train` uses for an RL agent when the user sets
none (``--<method>-<option>`` or YAML override them, option by option).

The strategy constructors' own defaults were chosen for the supervised benchmarks
(``crl.supervised.experiment.SUPERVISED_METHOD_DEFAULTS``); RL losses have another scale, so
the RL strengths live here, per agent.

Penalty convention everywhere: ``lam * sum_i w_i (theta_i - theta*_i)^2`` with no 1/2
(``crl.strategies.anchored``), added to the actor loss, which is a mean over the batch.

- SAC: Continual World's values (Wołczyk et al. 2021, "Continual World: A Robotic Benchmark
  For Continual Reinforcement Learning"; ``cl_reg_coef`` in the CW repository's
  ``examples/paper_cl_experiments.sh``): L2 1e5, EWC 1e4, MAS 1e4. CW's regulariser has the
  same form (no 1/2, summed over the actor trunk, added to the batch-mean actor loss) and the
  same EWC Fisher for the pre-tanh Gaussian (1/sigma^2 (d mu)^2 + 2/sigma^2 (d sigma)^2), so
  its numbers carry over. Differences: CW clips each sample's Fisher from below at 1e-5 and
  we do not; our Gaussian MAS output norm is ||mu||^2 + ||sigma||^2 where CW's is
  ||mu||^2 + ||log sigma||^2, so MAS's 1e4 is CW's number, not a calibrated one.
- PPO: calibrated on the README sequence (CartPoleSwap, single head, 20,480 steps per task,
  seed 0; ``scripts/bench_forgetting.py --seeds 0 --grid l2=... --grid ewc=... --grid
  mas=...``, log-spaced from 1e-4 to 1e3). On that sequence the outcome is all or nothing:
  below a threshold the run forgets task 1 as much as finetune (0.876) while learning task
  2, above it task 1 is kept (forgetting -0.08) and task 2 is not learnt, and in between
  (L2 0.2-0.5, EWC 30-300, MAS 1) it forgets task 1 and learns task 2 only partly. A single
  head must output opposite actions for the same states, and the only task-dependent input
  is the one-hot, which no penalty strength teaches the trunk to use within the budget. The
  defaults are the smallest grid strengths that keep task 1 (L2 1, EWC 1000, MAS 3): with
  `crl train`'s default multi-head policies the same strengths keep task 1 and learn task 2
  (gain 0.954, as finetune), so they protect without blocking where the heads can separate.
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
        "l2": {"lam": 1.0},
        "ewc": {"lam": 1000.0},
        "mas": {"lam": 3.0},
        "agem": {"memory_per_task": 2048},
        # on-policy PPO cannot learn from stored transitions: its replay distils the old
        # policy on stored states (agents.ppo refuses the other modes)
        "replay": {"mode": "distill"},
    },
    "sac": {
        "l2": {"lam": 1e5},
        "ewc": {"lam": 1e4},
        "mas": {"lam": 1e4},
        # CW's "perfect memory": the replay buffer becomes a reservoir over the whole
        # sequence, never reset (its size is --buffer-size)
        "replay": {"mode": "buffer"},
    },
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
    """The options ``method`` is built with for ``agent``: RL defaults < the user's options."""
    if agent not in RL_METHOD_DEFAULTS:
        raise ValueError(f"unknown agent {agent!r}; choose one of: {', '.join(RL_METHOD_DEFAULTS)}")
    options = dict(RL_METHOD_DEFAULTS[agent].get(method, {}))
    if method == "agem":
        options["batch_size"] = agent_batch_size(agent, agent_options or {})
    return options | dict(user_options or {})


__all__ = ["RL_METHOD_DEFAULTS", "agent_batch_size", "rl_method_options"]
