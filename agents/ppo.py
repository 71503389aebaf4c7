"""ContinualPPO: stable-baselines3 PPO whose update calls crl's continual-learning strategies.

SB3's ``PPO.train`` has no hook between backward and the optimiser step, so :meth:`train` is
written here once, around one function, :meth:`ContinualPPO.batch_losses`, that computes the
losses of a batch (clipped surrogate, value loss with optional clipping, entropy bonus;
Schulman et al. 2017). Training, A-GEM's reference gradient (``Host.loss``) and PackNet's
retraining all call it, so the strategies see exactly the objective PPO optimises. With the
finetune strategy the update is SB3's, operation for operation (tested bit for bit).

Per minibatch: ``loss = PPO loss + strategy.penalty()`` -> backward ->
``before_optimizer_step`` (A-GEM projection, PackNet gradient masks) -> gradient-norm clipping
-> Adam step -> ``after_optimizer_step``. The hook edits ``.grad`` *before* clipping, so
PackNet's frozen weights do not count in the clipped norm; clipping only rescales the
gradient, so A-GEM's guarantee g·g_ref >= 0 survives it.

Replay for PPO is policy *distillation* (``Replay(mode="distill")``): PPO is on-policy and
cannot learn from old transitions, so earlier tasks' states and the old policy's action
distributions are stored and a KL term keeps the policy close to them (logged as
``train/distillation_kl``).

Rollouts never cross a task switch: the runner calls :meth:`learn` once per task with
``total_timesteps = steps_per_task``, and :meth:`learn` refuses a number of steps that is not
a whole number of rollouts (``n_steps * n_envs``) instead of silently training one rollout
on two tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.utils import explained_variance
from torch import nn

from agents.continual import (
    ContinualAgent,
    check_batch_keys,
    check_num_tasks,
    check_sb3_version,
)
from agents.ppo_policy import MultiHeadActorCriticPolicy, MultiHeadMultiInputPolicy
from crl.strategies import method_members, strategy_class
from crl.strategies.base import Batch, Strategy

check_sb3_version()

OBS = "obs"
#: Keys of a stored PPO batch (besides the observation): what the loss needs.
BATCH_KEYS = ("actions", "old_values", "old_log_prob", "advantages", "returns")


@dataclass
class PPOLosses:
    """The terms of PPO's loss on one batch (tensors with graph) and the diagnostics."""

    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    total: torch.Tensor
    log_prob: torch.Tensor
    ratio: torch.Tensor


def obs_from_batch(batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
    """A stored batch keeps a Dict observation as flat ``obs.<key>`` entries (strategies
    need a flat mapping of tensors); rebuild what the policy takes."""
    if OBS in batch:
        return batch[OBS]
    prefix = OBS + "."
    obs = {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}
    if not obs:
        raise KeyError(
            f"a PPO batch needs the observation under {OBS!r} (Box) or '{prefix}<key>' (Dict); "
            f"got keys {sorted(batch)}"
        )
    return obs


class PPOHost:
    """The strategy's view of a ContinualPPO (see ``crl.strategies.base.Host``).

    ``module`` is the SB3 policy. Protected: the policy trunk (features extractor + the
    policy MLP); the critic trunk only with ``regularize_critic``; the output layers only in
    single-head mode (per-task heads are only trained on their own task).
    """

    def __init__(self, agent: ContinualPPO) -> None:
        self.agent = agent
        self.module: nn.Module = agent.policy
        self._cache: tuple[tuple[Any, ...], dict[str, nn.Parameter], list[nn.Parameter]] | None
        self._cache = None

    def _selection(self) -> tuple[dict[str, nn.Parameter], list[nn.Parameter]]:
        """(protected, trained), rebuilt only when the policy or the options change: PackNet
        reads the protected set twice and A-GEM the trained list once per minibatch, and
        walking ``named_parameters()`` with name tests each time was measurable there."""
        policy = self.agent.policy
        flags = (bool(policy.multi_head), bool(self.agent.regularize_critic))
        if self._cache is None or self._cache[0][0] is not policy or self._cache[0][1:] != flags:
            critic = ("mlp_extractor.value_net.", "vf_features_extractor.", "value_net.")
            heads = ("action_net.", "value_net.", "log_std")
            protected = {}
            for name, p in policy.named_parameters():
                if policy.multi_head and name.startswith(heads):
                    continue
                if not self.agent.regularize_critic and name.startswith(critic):
                    continue
                protected[name] = p
            self._cache = ((policy, *flags), protected, list(policy.parameters()))
        return self._cache[1], self._cache[2]

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._selection()[0])

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self._selection()[1])

    def importance_batches(self) -> Iterator[Batch]:
        return self.agent.task_batches()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.agent._optimizers().values())

    def output_distribution(self, batch: Batch) -> torch.distributions.Distribution:
        return self.agent.policy.action_distribution(obs_from_batch(batch))

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.agent.batch_losses(batch).total


class ContinualPPO(ContinualAgent, PPO):
    """PPO on a task sequence with a continual-learning strategy.

    ``strategy``: a method name (built with ``make_strategy(name, num_tasks=, seed=,
    **strategy_options)``) or a Strategy. ``multi_head``: one action and value head per
    task (CW's default) or SB3's single heads. ``reset_optimizer``: fresh Adam state at
    every task switch (CW's default). ``regularize_critic``: also protect the value trunk.
    ``importance_samples``: how many of the task's last transitions :meth:`task_batches`
    keeps for importance, memories and PackNet retraining.
    """

    policy_aliases = {  # noqa: RUF012 - SB3 declares it as a class-level dict
        "MlpPolicy": MultiHeadActorCriticPolicy,
        "MultiInputPolicy": MultiHeadMultiInputPolicy,
    }

    def __init__(
        self,
        policy: str | type,
        env: Any,
        *,
        strategy: Strategy | str = "finetune",
        strategy_options: dict[str, Any] | None = None,
        num_tasks: int | None = None,
        multi_head: bool = True,
        reset_optimizer: bool = True,
        regularize_critic: bool = False,
        importance_samples: int = 2048,
        **sb3_kwargs: Any,
    ) -> None:
        if isinstance(strategy, Strategy):
            refuse_off_policy(strategy)
        strategy_options = on_policy_options(strategy, strategy_options)
        if (
            isinstance(importance_samples, bool)
            or not isinstance(importance_samples, int)
            or importance_samples < 1
        ):
            raise ValueError(
                f"importance_samples must be a positive integer, got {importance_samples!r}"
            )
        self.regularize_critic = bool(regularize_critic)
        self.importance_samples = importance_samples
        self._task_data: dict[str, torch.Tensor] = {}
        if sb3_kwargs.get("_init_setup_model", True):
            check_num_tasks(num_tasks)  # type: ignore[arg-type]
        # Kept (and saved by SB3's save()) so that load() can rebuild the strategy; a
        # Strategy instance is rebuilt from its method name with default options.
        self._continual_args = {
            "strategy": strategy if isinstance(strategy, str) else strategy.name,
            "strategy_options": None if isinstance(strategy, Strategy) else strategy_options,
            "num_tasks": num_tasks,
            "seed": sb3_kwargs.get("seed"),
            "reset_optimizer": reset_optimizer,
        }
        self._strategy_instance = strategy if isinstance(strategy, Strategy) else None
        policy_kwargs = dict(sb3_kwargs.pop("policy_kwargs", None) or {})
        policy_kwargs.setdefault("num_tasks", num_tasks)
        policy_kwargs.setdefault("multi_head", multi_head)
        super().__init__(policy, env, policy_kwargs=policy_kwargs, **sb3_kwargs)

    def _setup_model(self) -> None:
        """SB3 builds the policy here (in ``__init__``, and in ``load()`` after restoring the
        saved attributes); the strategy is bound to the policy right after."""
        super()._setup_model()
        args = dict(self._continual_args)
        instance, self._strategy_instance = self._strategy_instance, None
        if instance is not None:
            args["strategy"], args["strategy_options"] = instance, None
        self._init_continual(**args)
        refuse_off_policy(self.strategy)

    def _excluded_save_params(self) -> list[str]:
        # The strategy (with its memories and Fisher) and the task store are saved with
        # continual_state_dict(); SB3's zip holds the weights and the hyper-parameters.
        return [
            *super()._excluded_save_params(),
            "strategy",
            "host",
            "_task_data",
            "_strategy_instance",
        ]

    # -- the losses of a batch -------------------------------------------------------------
    def batch_losses(
        self,
        batch: Batch,
        clip_range: float | None = None,
        clip_range_vf: float | None = None,
    ) -> PPOLosses:
        """PPO's loss on a batch with keys ``obs`` (or ``obs.<key>``) and :data:`BATCH_KEYS`.

        The clip ranges default to their current schedule values. Advantages are normalised
        per batch, as SB3 does per minibatch.
        """
        if clip_range is None:
            clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        if clip_range_vf is None and self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(
                f"a PPO loss batch needs {list(BATCH_KEYS)}; missing {missing} (got "
                f"{sorted(batch)}); build batches with ContinualPPO.task_batches()"
            )
        actions = batch["actions"]
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        values, log_prob, entropy = self.policy.evaluate_actions(obs_from_batch(batch), actions)
        values = values.flatten()
        advantages = batch["advantages"]
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        ratio = torch.exp(log_prob - batch["old_log_prob"])
        surrogate = advantages * ratio
        clipped = advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
        policy_loss = -torch.min(surrogate, clipped).mean()
        if clip_range_vf is None:
            values_pred = values
        else:
            old = batch["old_values"]
            values_pred = old + torch.clamp(values - old, -clip_range_vf, clip_range_vf)
        value_loss = F.mse_loss(batch["returns"], values_pred)
        entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
        total = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
        return PPOLosses(policy_loss, value_loss, entropy_loss, total, log_prob, ratio)

    # -- ContinualAgent --------------------------------------------------------------------
    def _make_host(self) -> PPOHost:
        return PPOHost(self)

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.policy.optimizer}

    def _on_task_switch(self, task: int, first: bool) -> dict[str, Any]:
        # The rollout buffer holds one rollout and is refilled before every update, so there
        # is nothing to reset there; the task's transition store starts empty.
        self._task_data = {}
        return {"task_data_cleared": True}

    def _extra_continual_state(self) -> dict[str, Any]:
        return {"task_data": {k: v.clone() for k, v in self._task_data.items()}}

    def _load_extra_continual_state(self, state: dict[str, Any]) -> None:
        self._task_data = {k: v.clone() for k, v in state.get("task_data", {}).items()}

    # -- learning --------------------------------------------------------------------------
    @property
    def rollout_size(self) -> int:
        """Env steps per rollout, over all envs."""
        return int(self.n_steps * self.n_envs)

    def learn(self, total_timesteps: int, *args: Any, **kwargs: Any) -> ContinualPPO:
        """SB3's learn for ONE task (call ``start_task`` first, ``end_task`` after).

        ``total_timesteps`` must be a whole number of rollouts: SB3 always collects full
        rollouts, so any remainder would be collected on the next task's environment and
        trained under this task's strategy state.
        """
        if not self.task_running:
            raise RuntimeError(
                "ContinualPPO.learn() trains one task of the sequence: call "
                "agent.start_task(task) before learn() and agent.end_task(task) after it"
            )
        if total_timesteps % self.rollout_size != 0:
            raise ValueError(
                f"total_timesteps={total_timesteps} is not a multiple of the rollout size "
                f"n_steps * n_envs = {self.n_steps} * {self.n_envs} = {self.rollout_size}: a "
                "rollout would cross the task switch; use steps per task that are a multiple "
                f"of {self.rollout_size} or an n_steps that divides them"
            )
        return super().learn(total_timesteps, *args, **kwargs)

    def train(self) -> None:
        """One PPO update on the rollout just collected, with the strategy's hooks.

        The structure (epochs over shuffled minibatches, target-KL early stop, logging) is
        SB3 2.9's ``PPO.train``; the loss is :meth:`batch_losses`.
        """
        self._keep_task_data()
        strategy = self.strategy
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        entropy_losses: list[float] = []
        pg_losses: list[float] = []
        value_losses: list[float] = []
        clip_fractions: list[float] = []
        penalties: list[torch.Tensor] = []
        approx_kl_divs: list[np.ndarray] = []
        continue_training = True
        loss = torch.zeros(())
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for data in self.rollout_buffer.get(self.batch_size):
                batch = _rollout_batch(data)
                losses = self.batch_losses(batch, clip_range, clip_range_vf)
                pg_losses.append(losses.policy.item())
                clip_fractions.append(
                    torch.mean((torch.abs(losses.ratio - 1) > clip_range).float()).item()
                )
                value_losses.append(losses.value.item())
                entropy_losses.append(losses.entropy.item())
                loss = losses.total
                penalty = strategy.penalty(batch)
                if penalty is not None:
                    loss = loss + penalty
                    penalties.append(penalty.detach())
                self.check_finite_losses(loss, {"policy": losses.policy, "value": losses.value,
                                                "entropy": losses.entropy, "penalty": penalty})

                # Approximate reverse KL for early stopping (SB3 issue #417, Schulman's blog).
                with torch.no_grad():
                    log_ratio = losses.log_prob - data.old_log_prob
                    approx_kl_div = torch.mean((torch.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(
                            f"Early stopping at step {epoch} due to reaching max kl: "
                            f"{approx_kl_div:.2f}"
                        )
                    break

                self.policy.optimizer.zero_grad()
                loss.backward()
                strategy.before_optimizer_step()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
                strategy.after_optimizer_step()
            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        if penalties:
            self.logger.record(self.penalty_log_key, torch.stack(penalties).mean().item())
        for key, value in strategy.diagnostics().items():
            self.logger.record(f"train/{key}", value)

    @property
    def penalty_log_key(self) -> str:
        """The strategy names its own penalty (replay's distillation: ``distillation_kl``)."""
        return f"train/{self.strategy.penalty_label}"

    # -- the finished task's data ------------------------------------------------------------
    def _keep_task_data(self) -> None:
        """Append the rollout just collected (time order) to the current task's store and
        keep its last ``importance_samples`` transitions. Runs before ``get()`` flattens
        the buffer."""
        buf = self.rollout_buffer
        n = buf.buffer_size * buf.n_envs
        fresh: dict[str, np.ndarray] = {}
        if isinstance(buf, DictRolloutBuffer):
            assert isinstance(self.observation_space, spaces.Dict)
            for key, arr in buf.observations.items():
                space = self.observation_space.spaces[key]
                fresh[f"{OBS}.{key}"] = _compact(arr.reshape(n, *arr.shape[2:]), space)
        else:
            obs = buf.observations.reshape(n, *buf.observations.shape[2:])
            fresh[OBS] = _compact(obs, self.observation_space)
        fresh["actions"] = buf.actions.reshape(n, *buf.actions.shape[2:])
        fresh["old_values"] = buf.values.reshape(n)
        fresh["old_log_prob"] = buf.log_probs.reshape(n)
        fresh["advantages"] = buf.advantages.reshape(n)
        fresh["returns"] = buf.returns.reshape(n)
        keep = self.importance_samples
        data = {}
        for key, arr in fresh.items():
            new = torch.as_tensor(arr[-keep:]).clone()
            old = self._task_data.get(key)
            data[key] = new if old is None else torch.cat([old, new])[-keep:]
        self._task_data = data

    def task_batches(self, batch_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The current (just finished) task's last transitions, as loss-ready batches of
        ``batch_size`` (default: PPO's minibatch size), oldest first, on the policy device."""
        if not self._task_data:
            return iter(())
        size = self.batch_size if batch_size is None else int(batch_size)
        data = self._task_data
        total = len(data["returns"])

        def gen() -> Iterator[dict[str, torch.Tensor]]:
            for start in range(0, total, size):
                yield {k: v[start : start + size].to(self.device) for k, v in data.items()}

        return gen()


def _compact(arr: np.ndarray, space: spaces.Space) -> np.ndarray:
    """SB3's rollout buffer stores every observation as float32; uint8 images (Atari) go
    back to uint8 (4x less memory; preprocessing divides by 255 either way)."""
    if isinstance(space, spaces.Box) and space.dtype == np.uint8:
        return arr.astype(np.uint8)
    return arr


def _rollout_batch(data: Any) -> dict[str, Any]:
    """SB3's RolloutBufferSamples (or the Dict variant) as a batch for :meth:`batch_losses`."""
    batch = {
        "actions": data.actions,
        "old_values": data.old_values,
        "old_log_prob": data.old_log_prob,
        "advantages": data.advantages,
        "returns": data.returns,
    }
    if isinstance(data.observations, dict):
        for key, value in data.observations.items():
            batch[f"{OBS}.{key}"] = value
    else:
        batch[OBS] = data.observations
    return batch


def on_policy_options(
    strategy: Strategy | str, options: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The options a method name is built with on PPO: the method's own
    ``on_policy_options`` under the user's (a combination: per member)."""
    if not isinstance(strategy, str):
        return options
    members = method_members(strategy)
    if len(members) == 1:
        defaults = strategy_class(members[0]).on_policy_options
        return {**defaults, **(options or {})} if defaults else options
    opts = dict(options or {})
    for m in members:
        defaults = strategy_class(m).on_policy_options
        if defaults:
            opts[m] = {**defaults, **(opts.get(m) or {})}
    return opts


def refuse_off_policy(strategy: Strategy) -> None:
    """PPO learns only from its own rollouts and has no exploration phase: a method that
    trains on stored transitions or explores with earlier heads cannot work here."""
    check_batch_keys(strategy, "PPO", BATCH_KEYS)
    if strategy.explores_with_heads:
        raise ValueError(
            f"{strategy.name} explores each new task with an earlier task's policy head during "
            "an exploration phase (ClonEx), and PPO has none: use --agent sac, or bc without "
            "--bc-clonex"
        )
    if strategy.learns_from_stored_transitions:
        mode = getattr(strategy, "mode", None)
        what = strategy.name + (f" (mode {mode!r})" if isinstance(mode, str) else "")
        raise ValueError(
            f"{what} trains on stored transitions of earlier tasks, which PPO "
            "(on-policy) cannot learn from; PPO's replay is policy distillation: use replay "
            "with mode='distill' (PPO's default) or bc"
        )


__all__ = ["BATCH_KEYS", "ContinualPPO", "PPOHost", "PPOLosses", "obs_from_batch"]
