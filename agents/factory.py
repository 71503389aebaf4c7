"""The agent of a run: which class, checked options, and the strategy built from the RL
defaults (:mod:`agents.method_defaults`). Every check here runs before a run directory
exists, so a bad option is an error naming it, not a failed run left behind."""


from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from gymnasium import spaces

from agents.config import AGENTS, ON_POLICY, ConfigError, RunConfig
from agents.method_defaults import rl_method_options
from crl.strategies import method_members, user_options
from crl.strategies.base import check_used_options

if TYPE_CHECKING:
    from envs.sequence import TaskSequence

def check_agent_fits(config: RunConfig, sequence: TaskSequence) -> None:
    """SAC needs continuous actions; PPO takes discrete or continuous; on-policy rollouts
    must end exactly at task switches."""
    from envs.continual import sequence_spaces

    action_space = sequence_spaces(sequence).action_space
    if config.agent == "sac" and not isinstance(action_space, spaces.Box):
        raise ConfigError(
            f"SAC needs a continuous (Box) action space, but sequence {sequence.name!r} has "
            f"{action_space}; use --agent ppo for discrete actions, or a continuous sequence "
            "(PendulumVariants, HalfCheetah*, Hopper*, CW10)"
        )
    if config.agent == "sac":
        explore = config.agent_options.get("exploration_steps")
        if explore is None:
            from agents.sac import ContinualSAC

            explore = inspect.signature(ContinualSAC.__init__).parameters[
                "exploration_steps"].default
        short = sorted({b for b in sequence.stage_steps if b <= int(explore)})
        if short:
            raise ConfigError(
                f"SAC acts at random for the first --exploration-steps {int(explore):,} steps "
                f"of every task and only trains after them, but the task budgets {short} are "
                f"not longer: the agent would never train; lower --exploration-steps or raise "
                f"--steps-per-task"
            )
    if config.agent in ON_POLICY:
        n_steps = int(config.agent_options.get("n_steps", 2048))
        bad = sorted({b for b in sequence.stage_steps if b % n_steps})
        if bad:
            raise ConfigError(
                f"PPO collects rollouts of n_steps={n_steps} env steps and a rollout must not "
                f"cross a task switch, but the task budgets {bad} are not multiples of "
                f"{n_steps}; set --n-steps to a divisor of the budget or --steps-per-task to a "
                f"multiple of {n_steps}"
            )


def check_method_options(config: RunConfig, sequence: TaskSequence) -> None:
    """Build the method once from its resolved options, before any run directory exists, so
    that a bad option is an error naming it, not a failed run left behind."""
    from agents.continual import build_strategy

    options = rl_method_options(config.agent, config.method,
                                user_options(config.method_options, config.method),
                                config.agent_options)
    try:
        if config.agent == "ppo":
            from agents.ppo import on_policy_options, refuse_off_policy

            options = on_policy_options(config.method, options) or options
            built = build_strategy(config.method, options, sequence.num_tasks, config.seed)
            refuse_off_policy(built)
        else:
            from agents.sac import check_strategy_fits

            built = build_strategy(config.method, options, sequence.num_tasks, config.seed)
            explore = agent_keywords("sac")["exploration_steps"].default
            check_strategy_fits(built, bool(config.agent_options.get("reset_buffer", True)),
                                int(config.agent_options.get("n_steps", 1)),
                                int(config.agent_options.get("exploration_steps", explore)))
        check_used_options(built, config.method_options)
    except (ValueError, TypeError) as exc:
        given = [(config.method, k) for k in config.method_options.get(config.method) or {}]
        given += [(m, k) for m in method_members(config.method) if m != config.method
                  for k in config.method_options.get(m) or {}]
        flags = ", ".join(f"--{m}-{k.replace('_', '-')}" for m, k in sorted(given))
        raise ConfigError(f"{config.method}: {exc}" + (f" (options given: {flags})" if flags
                                                        else "")) from exc


def agent_class(name: str) -> type:
    if name == "sac":
        from agents.sac import ContinualSAC

        return ContinualSAC
    if name == "ppo":
        from agents.ppo import ContinualPPO

        return ContinualPPO
    raise ConfigError(f"unknown agent {name!r}; choose one of: {', '.join(AGENTS)}")


def agent_keywords(agent: str) -> dict[str, inspect.Parameter]:
    """The keyword options of an agent: its class's and its SB3 parents' ``__init__``
    parameters (the nearest class's definition, whose default the agent gets)."""
    out: dict[str, inspect.Parameter] = {}
    for base in agent_class(agent).__mro__:
        if "__init__" in base.__dict__:
            for name, param in inspect.signature(base.__init__).parameters.items():
                out.setdefault(name, param)
    for name in ("self", "policy", "env", "kwargs", "args", "sb3_kwargs"):
        out.pop(name, None)
    return out


def check_agent_options(config: RunConfig) -> None:
    """Every agent option must be a keyword of the agent class or of its SB3 parents."""
    accepted = set(agent_keywords(config.agent))
    unknown = sorted(set(config.agent_options) - accepted - {"policy_kwargs"})
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for the {config.agent.upper()} agent; valid: "
            f"{', '.join(sorted(accepted))}"
        )
    if config.agent_options.get("use_sde"):  # refused by the policies, here before any run dir
        if config.agent == "ppo":
            raise ConfigError("the continual PPO policies have no gSDE (use_sde: the noise "
                              "matrix is not per task); drop use_sde")
        if config.agent_options.get("multi_head", True):
            raise ConfigError("multi-head SAC has no gSDE (use_sde: the noise matrix is not "
                              "per task); add --single-head or drop use_sde")


def check_run_config(config: RunConfig, sequence: TaskSequence) -> None:
    """Every check a `crl train` run makes before its run directory exists (its sweep's
    file check runs the same)."""
    check_agent_fits(config, sequence)
    check_agent_options(config)
    check_method_options(config, sequence)


def make_agent(config: RunConfig, env: Any, sequence: TaskSequence, *, method: str | None = None,
               seed: int | None = None) -> Any:
    """The continual agent of ``config`` on ``env`` (a gym env or VecEnv)."""
    cls = agent_class(config.agent)
    if config.torch_threads:  # small nets on shared cores: more threads only contend
        torch.set_num_threads(config.torch_threads)
    method = config.method if method is None else method
    options = dict(config.agent_options)
    policy_kwargs = dict(options.pop("policy_kwargs", None) or {})
    if config.net_arch is not None:
        policy_kwargs.setdefault("net_arch", list(config.net_arch))
    check_agent_options(config)
    obs_space = env.observation_space
    policy = "MultiInputPolicy" if isinstance(obs_space, spaces.Dict) else "MlpPolicy"
    return cls(
        policy, env,
        strategy=method,
        strategy_options=rl_method_options(config.agent, method,
                                           user_options(config.method_options, method),
                                           config.agent_options),
        num_tasks=sequence.num_tasks,
        seed=config.seed if seed is None else seed,
        device=config.device,
        verbose=0,
        policy_kwargs=policy_kwargs or None,
        **options,
    )
