"""ContinualSAC: stable-baselines3's SAC trained on a task sequence with a crl strategy.

SB3 has no hook inside ``SAC.train()``, so :meth:`ContinualSAC.train` replaces it around one
function, :meth:`ContinualSAC.batch_losses`, which computes SAC's three losses on a batch
(Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications": the clipped double-Q
critic loss, the actor loss ``E[α log π(a|s) − min_i Q_i(s, a)]`` and the temperature loss).
Training, A-GEM's reference gradient and the strategies' ``host.loss`` all go through it.

Two update orders:

* default (SB3's, reproduced exactly): temperature step, critic step, then the actor loss is
  evaluated with the *updated* critic and the actor steps; the strategy's
  ``before/after_optimizer_step`` hooks wrap the actor step, and the critic step when it
  updates protected parameters (``regularize_critic``; see ``_sequential_update``);
* joint (``strategy.needs_joint_update``, A-GEM as in Continual World): all losses on the
  same parameters, one backward, ONE ``before_optimizer_step`` over actor + critic (the
  projection), every optimiser steps, ONE ``after_optimizer_step``.

In both the actor loss sees the critic as a fixed function (its parameters do not receive the
actor loss's gradient), so ``host.loss`` = critic loss + actor loss has the actor-loss
gradient on the actor and the critic-loss gradient on the critic, as CW computes them.

Task switches follow Continual World's defaults (Wołczyk et al. 2021), each configurable:
reset the replay buffer (``Replay(mode="buffer")``, CW's perfect memory, keeps the finished
tasks' transitions in the strategy's memory and mixes them into every batch: see
:meth:`ContinualSAC._training_batch`), reset every optimiser's state, keep the critic, act
uniformly at random for the first ``exploration_steps`` of each task (SB3's
``learning_starts``, re-armed per task), and optionally learn one entropy coefficient per
task.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.base_class import maybe_make_env
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.utils import polyak_update
from stable_baselines3.sac.policies import SACPolicy
from torch import nn
from torch.distributions import Distribution, Independent, Normal
from torch.nn import functional as F

from agents.continual import ContinualAgent, build_strategy, check_batch_keys, check_num_tasks
from agents.evaluation import BatchedEvaluator, RandomPolicy
from agents.heads import as_task, task_index_from_obs
from agents.sac_buffer import TaskReplayBuffer, valid_count, valid_slots
from agents.sac_policy import MultiHeadSACPolicy
from crl.strategies import Batch, Strategy
from crl.strategies.memory import batch_length, concat_batches


@dataclass
class SACLosses:
    """The losses of one batch (``actor_loss`` is None until the critic step, if any)."""

    critic_loss: torch.Tensor
    ent_coef: torch.Tensor
    ent_coef_loss: torch.Tensor | None
    actor_loss: torch.Tensor | None = None


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class SACHost:
    """The strategy's view of a ContinualSAC (crl.strategies.base.Host).

    ``module`` is the SB3 policy; protected parameters are the actor trunk (plus its output
    layers when single-head) and, with ``regularize_critic``, the critic trunks (plus their
    output layers when single-head). Per-task heads are never protected.
    """

    def __init__(self, agent: ContinualSAC) -> None:
        self.agent = agent
        self.module: nn.Module = agent.policy
        self._protected = self._select_protected()
        self._trained = [
            p
            for opt in (agent.actor.optimizer, agent.critic.optimizer)
            for group in opt.param_groups
            for p in group["params"]
        ]
        self._touches: tuple[torch.optim.Optimizer, bool] | None = None

    @property
    def critic_step_touches_protected(self) -> bool:
        """Whether the critic optimiser updates any protected parameter (asked every update:
        answered once per critic optimiser)."""
        critic = self.agent.critic.optimizer
        if self._touches is None or self._touches[0] is not critic:
            protected = {id(p) for p in self._protected.values()}
            touches = any(id(p) in protected for g in critic.param_groups for p in g["params"])
            self._touches = (critic, touches)
        return self._touches[1]

    def _select_protected(self) -> dict[str, nn.Parameter]:
        multi = self.agent.multi_head
        out: dict[str, nn.Parameter] = {}
        for name, p in self.module.named_parameters():
            if name.startswith("actor."):
                if multi and name.startswith(("actor.mu.", "actor.log_std.")):
                    continue
                out[name] = p
            elif name.startswith("critic.") and self.agent.regularize_critic:
                if multi and ".head." in name:
                    continue
                out[name] = p
        return out

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._protected)

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self._trained)

    def importance_batches(self) -> Iterator[Batch]:
        return self.agent.task_batches()

    def experience_batches(self) -> Iterator[Batch]:
        return self.agent.task_batches(everything=True)

    def head_returns(self, heads: Sequence[int | None], episodes: int) -> list[float]:
        return self.agent.head_returns(heads, episodes)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.agent._optimizers().values())

    def output_distribution(self, batch: Batch) -> Distribution:
        """The pre-tanh Gaussian (CW); its Fisher equals the squashed policy's. With gSDE the
        actor's ``log_std`` is the noise matrix's, so the per-sample std comes from SB3's own
        state-dependent distribution (variance = latent^2 @ std^2)."""
        actor = self.agent.actor
        mean, log_std, extra = actor.get_action_dist_params(batch["obs"])
        if actor.use_sde:
            normal = actor.action_dist.proba_distribution(mean, log_std, **extra).distribution
        else:
            normal = Normal(mean, log_std.exp(), validate_args=False)
        return Independent(normal, 1, validate_args=False)

    def distribution_values(self, actions: torch.Tensor) -> torch.Tensor:
        """Stored (tanh-squashed) actions in :meth:`output_distribution`'s space: atanh, as
        SB3's TanhBijector inverts them. EWC's empirical Fisher scores them there; the
        squash's log-Jacobian does not depend on the weights, so the gradients are the
        squashed policy's."""
        eps = torch.finfo(actions.dtype).eps
        return torch.atanh(actions.clamp(-1.0 + eps, 1.0 - eps))

    def loss(self, batch: Batch) -> torch.Tensor:
        losses = self.agent.batch_losses(batch)
        assert losses.actor_loss is not None
        return losses.critic_loss + losses.actor_loss


class ContinualSAC(ContinualAgent, SAC):
    """SB3 SAC + a continual-learning strategy (see the module docstring).

    ``num_tasks``: length of the sequence (one head per task). ``multi_head``: per-task
    heads on the actor and the critics (needs the task one-hot at the end of the
    observation: ``ContinualEnv(append_task_id=True)``); False = SB3's own layers.
    ``reset_buffer`` / ``reset_optimizer``: CW's task-switch resets. ``exploration_steps``:
    uniform random actions (and no updates) for the first steps of every task; replaces
    SB3's ``learning_starts``. ``per_task_entropy``: one learned entropy coefficient per task,
    each sample using its task's. ``regularize_critic``: the strategy also protects the critic
    trunks. ``importance_samples`` / ``importance_batch_size``: how much of the finished
    task's replay data the strategy sees at ``end_task``, and in what batch size.
    """

    def __init__(
        self,
        policy: str | type[SACPolicy],
        env: Any,
        *,
        strategy: Strategy | str = "finetune",
        strategy_options: Mapping[str, Any] | None = None,
        num_tasks: int | None = None,
        multi_head: bool = True,
        reset_buffer: bool = True,
        reset_optimizer: bool = True,
        exploration_steps: int = 10_000,
        per_task_entropy: bool = False,
        regularize_critic: bool = False,
        importance_samples: int = 2048,
        importance_batch_size: int = 256,
        **sb3_kwargs: Any,
    ) -> None:
        # SB3's load() builds the model with _init_setup_model=False, restores the saved
        # attributes, then calls _setup_model(), which binds the strategy (see there)
        loading = not sb3_kwargs.get("_init_setup_model", True)
        if not loading:
            check_num_tasks(num_tasks)  # type: ignore[arg-type]
        if "learning_starts" in sb3_kwargs:
            raise ValueError(
                "ContinualSAC re-arms SB3's learning_starts at every task: pass "
                "exploration_steps=... instead of learning_starts"
            )
        self.exploration_steps = _check_positive_int("exploration_steps", exploration_steps, 0)
        self.importance_samples = _check_positive_int("importance_samples", importance_samples)
        self.importance_batch_size = _check_positive_int(
            "importance_batch_size", importance_batch_size
        )
        self.multi_head = bool(multi_head)
        self.reset_buffer = bool(reset_buffer)
        self.per_task_entropy = bool(per_task_entropy)
        self.regularize_critic = bool(regularize_critic)
        self.num_tasks = num_tasks

        env = maybe_make_env(env, int(sb3_kwargs.get("verbose", 0)))
        _check_spaces(env)
        seed = sb3_kwargs.get("seed")
        # saved by SB3's save() so that load() can rebuild the strategy (its state comes
        # from the zip's continual parameters); an instance is rebuilt from its name
        self._continual_args = {
            "strategy": strategy if isinstance(strategy, str) else strategy.name,
            "strategy_options": None if isinstance(strategy, Strategy) or not strategy_options
            else dict(strategy_options),
            "num_tasks": num_tasks, "seed": seed, "reset_optimizer": reset_optimizer,
        }
        if loading:
            self._loading = True
            super().__init__(policy, env, learning_starts=self.exploration_steps, **sb3_kwargs)
            return
        built = build_strategy(strategy, strategy_options, num_tasks, seed)
        check_strategy_fits(built, self.reset_buffer, int(sb3_kwargs.get("n_steps", 1)),
                            self.exploration_steps)

        policy = self._resolve_policy(policy, sb3_kwargs)
        if sb3_kwargs.get("replay_buffer_class") is None and sb3_kwargs.get("n_steps", 1) == 1:
            sb3_kwargs["replay_buffer_class"] = TaskReplayBuffer
        super().__init__(policy, env, learning_starts=self.exploration_steps, **sb3_kwargs)
        self._importance_rng = np.random.default_rng(seed)
        self._init_continual(built, None, num_tasks, seed, reset_optimizer)

    def _resolve_policy(
        self, policy: str | type[SACPolicy], sb3_kwargs: dict[str, Any]
    ) -> str | type[SACPolicy]:
        if not self.multi_head:
            return policy
        if policy in ("MlpPolicy", SACPolicy):
            policy = MultiHeadSACPolicy
        elif isinstance(policy, str):
            raise ValueError(
                f"multi-head ContinualSAC supports policy='MlpPolicy' (state observations), "
                f"got {policy!r}; use multi_head=False for SB3's {policy}"
            )
        if isinstance(policy, type) and issubclass(policy, MultiHeadSACPolicy):
            sb3_kwargs["policy_kwargs"] = {
                **(sb3_kwargs.get("policy_kwargs") or {}),
                "num_tasks": self.num_tasks,
            }
        return policy

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.per_task_entropy:
            if self.log_ent_coef is None:
                raise ValueError(
                    "per_task_entropy=True learns one entropy coefficient per task and needs "
                    f"ent_coef='auto' (or 'auto_<init>'), got ent_coef={self.ent_coef!r}"
                )
            init = self.log_ent_coef.detach().reshape(-1)[0]
            self.log_ent_coef = init.repeat(self.num_tasks).requires_grad_(True)
            self.ent_coef_optimizer = torch.optim.Adam([self.log_ent_coef], lr=self.lr_schedule(1))
        if self.__dict__.pop("_loading", False):  # load(): the saved attributes are back
            args = self._continual_args
            self._importance_rng = np.random.default_rng(args["seed"])
            self._init_continual(args["strategy"], args["strategy_options"], args["num_tasks"],
                                 args["seed"], args["reset_optimizer"])

    def _excluded_save_params(self) -> list[str]:
        # Strategy state lives in continual_state_dict(); the host refers back to the agent.
        return [*super()._excluded_save_params(), "strategy", "host", "_importance_rng",
                "_critic_fn_params", "_polyak_lists"]

    # -- ContinualAgent hooks ------------------------------------------------------------
    def _make_host(self) -> SACHost:
        return SACHost(self)

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out = {"actor": self.actor.optimizer, "critic": self.critic.optimizer}
        if self.ent_coef_optimizer is not None:
            out["ent_coef"] = self.ent_coef_optimizer
        return out

    def _on_task_switch(self, task: int, first: bool) -> dict[str, Any]:
        buffer_reset = not first and self.reset_buffer
        if buffer_reset:
            self.replay_buffer.reset()  # type: ignore[union-attr]
        if isinstance(self.replay_buffer, TaskReplayBuffer):
            self.replay_buffer.current_task = task
        self.learning_starts = self.num_timesteps + self.exploration_steps
        return {"buffer_reset": buffer_reset, "learning_starts": self.learning_starts}

    def _extra_continual_state(self) -> dict[str, Any]:
        return {"learning_starts": int(self.learning_starts)}

    def _load_extra_continual_state(self, state: Mapping[str, Any]) -> None:
        self.learning_starts = int(state["learning_starts"])
        if isinstance(self.replay_buffer, TaskReplayBuffer) and self.current_task is not None:
            self.replay_buffer.current_task = self.current_task

    # -- ClonEx's exploration -------------------------------------------------------------
    def head_returns(self, heads: Sequence[int | None], episodes: int) -> list[float]:
        """Mean return on the running task of acting (deterministically) with each of
        ``heads``' policy: the task one-hot of the observation is set to the head's task, so
        a multi-head actor uses that head (a single-head actor sees that task's id); ``None``
        plays uniform random actions (what SAC's warm-up does). Every head plays the same
        ``episodes`` episode seeds, drawn from (seed, task)."""
        env = self.get_env()
        if env is None or self.current_task is None:
            raise RuntimeError("head_returns needs a running task (call start_task first)")
        try:
            sequence = env.get_attr("sequence")[0]
            with_id = bool(env.get_attr("append_task_id")[0])
        except AttributeError as err:
            raise ValueError(
                "ClonEx's exploration plays earlier heads on the running task, which needs the "
                "training env to be a ContinualEnv of the sequence"
            ) from err
        if not with_id:
            raise ValueError(
                "ClonEx's exploration selects a head through the task id in the observation; "
                "build the env with ContinualEnv(..., append_task_id=True)"
            )
        seed = int(np.random.SeedSequence([int(self.seed or 0), 0xC10E, self.current_task])
                   .generate_state(1)[0])
        num_tasks = sequence.num_tasks
        out = []
        with BatchedEvaluator(sequence, episodes, tasks=[self.current_task],
                              seed=seed) as evaluator:
            for head in heads:  # under the head's own evaluation context (PackNet's weights)
                if head is None:
                    policy = RandomPolicy(evaluator.vec_env.single_action_space, seed)
                    result = evaluator.evaluate(policy)
                else:
                    with self.strategy.evaluation(int(head)):
                        result = evaluator.evaluate(
                            _HeadPolicy(self.policy, int(head), num_tasks))
                out.append(float(result.mean_returns[0]))
        return out

    def _sample_action(self, learning_starts: int, action_noise: Any = None,
                       n_envs: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """SB3's, except that the warm-up acts with the strategy's exploration head (ClonEx)
        instead of uniform random actions when the strategy names one."""
        head = self.strategy.exploration_head
        if head is None or self.num_timesteps >= learning_starts:
            return super()._sample_action(learning_starts, action_noise, n_envs)
        last = self._last_obs
        self._last_obs = as_task(last, head, self.num_tasks)  # type: ignore[arg-type]
        try:  # learning_starts=0: SB3's branch that samples the policy
            return super()._sample_action(0, action_noise, n_envs)
        finally:
            self._last_obs = last  # the buffer stores the true observation

    # -- data of the finished task -------------------------------------------------------
    def probe_batches(self) -> Iterator[Batch]:
        """The running task's transitions drawn with a generator of their own (seed, task):
        the importance generator must draw the same samples whether or not a probe ran."""
        task = -1 if self.current_task is None else int(self.current_task)
        rng = np.random.default_rng([int(self.seed or 0), task + 1])
        return self.task_batches(rng)

    def task_batches(self, rng: np.random.Generator | None = None, *,
                     everything: bool = False) -> Iterator[Batch]:
        """Up to ``importance_samples`` transitions of the running task, without replacement,
        from the replay buffer, as dict batches (obs, actions, next_obs, rewards, dones);
        drawn with ``rng`` (default: the agent's importance generator). ``everything``: all
        of the task's transitions in buffer order (what a perfect memory keeps), no draw."""
        buf = self.replay_buffer
        if not isinstance(buf, ReplayBuffer) or isinstance(buf.observations, dict):
            raise TypeError(
                f"ContinualSAC reads the finished task from a flat ReplayBuffer, got "
                f"{type(buf).__name__}"
            )
        if isinstance(buf, TaskReplayBuffer):
            slots = buf.task_slots(-1 if self.current_task is None else self.current_task)
        else:  # unknown writer per slot: whatever the buffer holds (reset at each switch)
            slots = valid_slots(buf)
        if everything:
            if buf.full and len(slots) == valid_count(buf):
                warnings.warn(
                    f"the replay buffer ({buf.buffer_size} slots) is full of the finished "
                    "task's transitions: if the task ran longer, its earliest transitions "
                    "were overwritten and the memory keeps only the rest; raise --buffer-size "
                    "to the task's steps", RuntimeWarning, stacklevel=2)
            chosen = np.repeat(slots, buf.n_envs)
            envs = np.tile(np.arange(buf.n_envs), len(slots))
            size = max(self.importance_batch_size, 4096)
        else:
            n = min(self.importance_samples, len(slots))
            if n == 0:
                return
            rng = self._importance_rng if rng is None else rng
            chosen = rng.choice(slots, size=n, replace=False)
            envs = rng.integers(0, buf.n_envs, size=n)
            size = self.importance_batch_size
        for start in range(0, len(chosen), size):
            yield self._transitions(chosen[start : start + size], envs[start : start + size])

    def _transitions(self, idx: np.ndarray, env: np.ndarray) -> dict[str, torch.Tensor]:
        """Buffer rows (slot, env) as a dict batch with the keys of :meth:`train`'s batches."""
        buf = self.replay_buffer
        assert isinstance(buf, ReplayBuffer)
        if buf.optimize_memory_usage:
            next_obs = buf.observations[(idx + 1) % buf.buffer_size, env]
        else:
            next_obs = buf.next_observations[idx, env]
        dones = buf.dones[idx, env] * (1 - buf.timeouts[idx, env])
        return {
            "obs": buf.to_torch(buf.observations[idx, env]),
            "actions": buf.to_torch(buf.actions[idx, env]),
            "next_obs": buf.to_torch(next_obs),
            "rewards": buf.to_torch(buf.rewards[idx, env].reshape(-1, 1)),
            "dones": buf.to_torch(dones.reshape(-1, 1)),
        }

    # -- the losses of a batch -----------------------------------------------------------
    @contextlib.contextmanager
    def _critic_as_function(self) -> Iterator[None]:
        """The actor loss differentiates through Q(s, ·) but must not train the critic."""
        cached = getattr(self, "_critic_fn_params", None)
        if cached is None or cached[0] is not self.critic:
            params = [p for q in self.critic.q_networks for p in q.parameters()]
            if not self.critic.share_features_extractor:
                params += list(self.critic.features_extractor.parameters())
            cached = self._critic_fn_params = (self.critic, params)
        params = cached[1]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)

    def _entropy_terms(
        self, obs: torch.Tensor, log_prob: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.ent_coef_optimizer is None or self.log_ent_coef is None:
            return self.ent_coef_tensor, None
        log_alpha = self.log_ent_coef
        if self.per_task_entropy:
            log_alpha = log_alpha[task_index_from_obs(obs, self.num_tasks)].reshape(-1, 1)
        assert isinstance(self.target_entropy, float)
        ent_coef = torch.exp(log_alpha.detach())
        loss = -(log_alpha * (log_prob + self.target_entropy).detach()).mean()
        return ent_coef, loss

    def batch_losses(
        self,
        batch: Batch,
        between: Callable[[SACLosses], None] | None = None,
    ) -> SACLosses:
        """SAC's losses on ``batch`` (keys obs, actions, next_obs, rewards, dones and
        optionally discounts). ``between`` runs after the critic and temperature losses and
        before the actor loss is evaluated: SB3's order steps those optimisers there, so the
        actor loss sees the updated critic."""
        obs = batch["obs"]
        discounts = batch.get("discounts")
        if discounts is None:
            discounts = self.gamma
        if self.use_sde:
            self.actor.reset_noise()
        actions_pi, log_prob = self.actor.action_log_prob(obs)
        log_prob = log_prob.reshape(-1, 1)
        ent_coef, ent_coef_loss = self._entropy_terms(obs, log_prob)

        with torch.no_grad():
            next_actions, next_log_prob = self.actor.action_log_prob(batch["next_obs"])
            next_q = torch.cat(self.critic_target(batch["next_obs"], next_actions), dim=1)
            next_q, _ = torch.min(next_q, dim=1, keepdim=True)
            next_q = next_q - ent_coef * next_log_prob.reshape(-1, 1)
            target_q = batch["rewards"] + (1 - batch["dones"]) * discounts * next_q

        current_q = self.critic(obs, batch["actions"])
        critic_loss = 0.5 * sum(F.mse_loss(q, target_q) for q in current_q)
        assert isinstance(critic_loss, torch.Tensor)
        losses = SACLosses(critic_loss=critic_loss, ent_coef=ent_coef, ent_coef_loss=ent_coef_loss)
        if between is not None:
            between(losses)

        with self._critic_as_function():
            q_pi = torch.cat(self.critic(obs, actions_pi), dim=1)
        min_q_pi, _ = torch.min(q_pi, dim=1, keepdim=True)
        losses.actor_loss = (ent_coef * log_prob - min_q_pi).mean()
        return losses

    # -- updates ---------------------------------------------------------------------------
    def _penalty(self, batch: Batch) -> torch.Tensor | None:
        return self.strategy.penalty(batch)

    def _sequential_update(self, batch: Batch) -> tuple[SACLosses, torch.Tensor | None]:
        """SB3's order: temperature, critic (with the old actor), actor (with the new critic).

        The critic's ``after_optimizer_step`` runs once the actor's backward is done: a hook
        that writes parameters in place (PackNet restoring frozen weights) would otherwise
        invalidate the actor graph, which was built before the critic step (SB3's order)
        and holds the actor and critic weights. Hooks that are no-ops keep SB3's numbers.
        The critic step calls the hooks only when it updates a protected parameter
        (``regularize_critic``): strategies' step hooks act on the protected parameters, so a
        step that moves none of them leaves them nothing to do (and it saves PackNet two
        passes over the trunk per update).
        """
        strategy = self.strategy
        critic_hooks = self.host.critic_step_touches_protected

        def step_critic(losses: SACLosses) -> None:
            if losses.ent_coef_loss is not None and self.ent_coef_optimizer is not None:
                self.ent_coef_optimizer.zero_grad()
                losses.ent_coef_loss.backward()
                self.ent_coef_optimizer.step()
            critic_loss = losses.critic_loss
            if self.regularize_critic:
                penalty = self._penalty(batch)
                if penalty is not None:
                    critic_loss = critic_loss + penalty
            self.critic.optimizer.zero_grad()
            critic_loss.backward()
            if critic_hooks:
                strategy.before_optimizer_step()
            self.critic.optimizer.step()

        losses = self.batch_losses(batch, step_critic)
        assert losses.actor_loss is not None
        penalty = self._penalty(batch)
        actor_loss = losses.actor_loss if penalty is None else losses.actor_loss + penalty
        self.actor.optimizer.zero_grad()
        actor_loss.backward()
        if critic_hooks:
            strategy.after_optimizer_step()  # the critic step's
        strategy.before_optimizer_step()
        self.actor.optimizer.step()
        strategy.after_optimizer_step()
        return losses, penalty

    def _joint_update(self, batch: Batch) -> tuple[SACLosses, torch.Tensor | None]:
        """CW's joint update: every gradient on the same parameters, one projection."""
        losses = self.batch_losses(batch)
        assert losses.actor_loss is not None
        optimizers = self._optimizers()
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        penalty = self._penalty(batch)
        # The actor loss reaches only the actor, the critic loss only the critic; the penalty
        # reaches what it protects (the critic trunk only with regularize_critic).
        total = losses.critic_loss + losses.actor_loss
        if penalty is not None:
            total = total + penalty
        if losses.ent_coef_loss is not None:
            total = total + losses.ent_coef_loss
        total.backward()
        self.strategy.before_optimizer_step()
        for optimizer in optimizers.values():
            optimizer.step()
        self.strategy.after_optimizer_step()
        return losses, penalty

    def _polyak_critic(self) -> None:
        """SB3's ``polyak_update(critic, critic_target, tau)`` as two multi-tensor kernels:
        the same ``mul_(1 - tau)`` then ``add(alpha=tau)`` per tensor (bit-identical), but
        one call for all of them; per-task heads make the critics many small tensors (two
        per head and Q-network), which SB3's Python loop walks every update."""
        cached = getattr(self, "_polyak_lists", None)
        if cached is None or cached[0] is not self.critic or cached[1] is not self.critic_target:
            params = list(self.critic.parameters())
            targets = list(self.critic_target.parameters())
            if len(params) != len(targets):
                raise ValueError(
                    f"critic has {len(params)} parameter tensors but critic_target "
                    f"{len(targets)}; they must have the same architecture"
                )
            cached = self._polyak_lists = (self.critic, self.critic_target, params, targets)
        with torch.no_grad():
            torch._foreach_mul_(cached[3], 1.0 - self.tau)
            torch._foreach_add_(cached[3], cached[2], alpha=self.tau)

    def _training_batch(self, batch_size: int) -> Batch:
        """SB3's replay sample as a dict batch; a strategy that keeps earlier tasks'
        transitions (replay's perfect memory) supplies part of it (``replay_batch``)."""
        buf = self.replay_buffer
        assert buf is not None
        extra = self.strategy.replay_batch(batch_size, valid_count(buf) * buf.n_envs)
        own = batch_size - (0 if extra is None else batch_length(extra))
        if own == 0:
            assert extra is not None
            return extra
        data = buf.sample(own, env=self._vec_normalize_env)
        batch = {
            "obs": data.observations,
            "actions": data.actions,
            "next_obs": data.next_observations,
            "rewards": data.rewards,
            "dones": data.dones,
        }
        if data.discounts is not None:
            batch["discounts"] = data.discounts
        # n-step batches (another key set) are refused with the method at construction
        # (check_strategy_fits); concat_batches names any other key mismatch
        return batch if extra is None else concat_batches([batch, extra])

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        self.policy.set_training_mode(True)
        optimizers = list(self._optimizers().values())
        self._update_learning_rate(optimizers)
        update = self._joint_update if self.strategy.needs_joint_update else self._sequential_update

        ent_coef_losses, ent_coefs, penalties = [], [], []
        actor_losses, critic_losses = [], []
        for gradient_step in range(gradient_steps):
            losses, penalty = update(self._training_batch(batch_size))
            assert losses.actor_loss is not None
            critic_losses.append(losses.critic_loss.item())
            actor_losses.append(losses.actor_loss.item())
            ent_coefs.append(losses.ent_coef.mean().item())
            if losses.ent_coef_loss is not None:
                ent_coef_losses.append(losses.ent_coef_loss.item())
            if penalty is not None:
                penalties.append(penalty.item())
            terms = {"critic": critic_losses[-1], "actor": actor_losses[-1],
                     "entropy coefficient": ent_coef_losses[-1] if losses.ent_coef_loss
                     is not None else None, "penalty": penalties[-1] if penalty is not None
                     else None}
            self.check_finite_losses(sum(v for v in terms.values() if v is not None), terms)
            if gradient_step % self.target_update_interval == 0:
                self._polyak_critic()
                polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)

        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/ent_coef", np.mean(ent_coefs))
        self.logger.record("train/actor_loss", np.mean(actor_losses))
        self.logger.record("train/critic_loss", np.mean(critic_losses))
        if ent_coef_losses:
            self.logger.record("train/ent_coef_loss", np.mean(ent_coef_losses))
        if penalties:
            self.logger.record("train/penalty", np.mean(penalties))
        for key, value in self.strategy.diagnostics().items():
            self.logger.record(f"train/{key}", value)


class _HeadPolicy:
    """A predictor that acts as ``policy`` would on task ``head``'s observations. (No
    ``policy`` attribute: the evaluator would call that one's ``predict`` instead.)"""

    def __init__(self, policy: SACPolicy, head: int, num_tasks: int) -> None:
        self._policy, self.head, self.num_tasks = policy, head, num_tasks

    def predict(self, observation: Any, *args: Any, deterministic: bool = True,
                **kwargs: Any) -> tuple[np.ndarray, Any]:
        return self._policy.predict(as_task(observation, self.head, self.num_tasks), *args,
                                    deterministic=deterministic, **kwargs)


#: the keys of SAC's training and importance batches ("discounts" with n-step returns)
BATCH_KEYS = frozenset({"obs", "actions", "next_obs", "rewards", "dones"})


def check_strategy_fits(strategy: Strategy, reset_buffer: bool, n_steps: int,
                        exploration_steps: int) -> None:
    """A method that keeps the finished tasks' transitions (replay's perfect memory) mixes
    them into one-step batches of the running task's buffer; ClonEx acts in the warm-up.
    A penalty that is the whole SAC loss on stored transitions (rehearsal) would reach only
    the actor: the actor step applies the penalty, and the critic loss within it would also
    push the critic toward the actor's objective with ``regularize_critic``."""
    check_batch_keys(strategy, "SAC", BATCH_KEYS)
    if strategy.penalty_is_host_loss:
        raise ValueError(
            f"{strategy.name}'s rehearsal adds SAC's loss on stored transitions as a penalty, "
            "which SAC's actor step alone would apply (the critic would never rehearse); "
            "use --replay-mode balanced (SAC's default: a fixed share of each batch) or "
            "--replay-mode buffer (uniform over everything seen), whose stored transitions "
            "join the batch that critic and actor train on"
        )
    if strategy.explores_with_heads and exploration_steps == 0:
        raise ValueError(
            "ClonEx's exploration (--bc-clonex) acts with the best earlier head during each "
            "task's warm-up, and exploration_steps=0 leaves none: give --exploration-steps "
            "(e.g. 1000) or drop --bc-clonex"
        )
    if not strategy.keeps_experience:
        return
    if not reset_buffer:
        raise ValueError(
            "the method keeps every transition of the finished tasks in its own memory and "
            "mixes them into each batch; keeping them in the replay buffer too "
            "(reset_buffer=False, --keep-buffer) would count them twice: drop --keep-buffer"
        )
    if n_steps != 1:
        raise ValueError(
            f"{strategy.name} mixes stored one-step transitions into the batches, which "
            f"cannot be mixed with n-step returns (n_steps={n_steps}); use n_steps=1"
        )


def _check_spaces(env: Any) -> None:
    action_space = getattr(env, "action_space", None)
    if not isinstance(action_space, spaces.Box):
        raise ValueError(
            f"SAC needs a continuous (Box) action space, but the env's action space is "
            f"{action_space}; use the PPO agent (--agent ppo) for discrete-action sequences"
        )
    observation_space = getattr(env, "observation_space", None)
    if not isinstance(observation_space, spaces.Box):
        raise ValueError(
            f"ContinualSAC supports Box observations (state tasks), got {observation_space}; "
            "image or Dict observations need the PPO agent"
        )


__all__ = ["ContinualSAC", "SACHost", "SACLosses"]
