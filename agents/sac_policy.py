"""Multi-head SAC policy: shared trunks, one output head per task on the actor and each critic.

Continual World's default SAC (Wołczyk et al. 2021): the actor's mean and log-std layers and
every Q-network's output layer have one head per task; the hidden layers are shared (and are
what the continual-learning methods protect). The head of each sample is chosen from the task
one-hot that ``ContinualEnv(append_task_id=True)`` appends to the observation, with a gather
(:class:`agents.heads.MultiHeadLinear`), so replay batches
that mix tasks, batched evaluation of all tasks and ``torch.func.vmap`` (per-sample Fisher)
all work without Python branching.
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, create_mlp
from stable_baselines3.common.type_aliases import PyTorchObs
from stable_baselines3.sac.policies import LOG_STD_MAX, LOG_STD_MIN, Actor, SACPolicy
from torch import nn

from agents.distributions import unchecked
from agents.heads import MultiHeadLinear, TaskIndex, TaskLookup
from agents.training_mode import set_tree_mode


def check_task_id_space(observation_space: spaces.Space, num_tasks: int) -> None:
    """Fail early when the observation cannot carry a one-hot of ``num_tasks`` tasks."""
    if isinstance(observation_space, spaces.Dict):
        space = observation_space.spaces.get("task_id")
        if space is None or space.shape != (num_tasks,):
            raise ValueError(
                f"multi-head policy needs a 'task_id' entry of shape ({num_tasks},) in the Dict "
                f"observation, got {observation_space}; build the env with "
                "ContinualEnv(..., append_task_id=True) or use multi_head=False"
            )
        return
    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(
            f"multi-head SAC needs flat Box observations ending with the task one-hot, got "
            f"{observation_space}; use multi_head=False for other observation spaces"
        )
    if observation_space.shape[0] <= num_tasks:
        raise ValueError(
            f"observation of size {observation_space.shape[0]} cannot hold a state plus a "
            f"one-hot of {num_tasks} tasks; build the env with ContinualEnv(..., "
            "append_task_id=True)"
        )


class MultiHeadActor(Actor):
    """SAC actor whose ``mu`` and ``log_std`` layers have one head per task."""

    def __init__(
        self, *args: Any, num_tasks: int, task_lookup: TaskLookup | None = None, **kwargs: Any
    ) -> None:
        if kwargs.get("use_sde", False):
            raise ValueError(
                "multi-head SAC does not support gSDE (use_sde=True); use multi_head=False "
                "(--single-head)"
            )
        super().__init__(*args, **kwargs)
        self.num_tasks = num_tasks
        self.task_lookup = TaskLookup(num_tasks) if task_lookup is None else task_lookup
        last = self.net_arch[-1] if len(self.net_arch) > 0 else self.features_dim
        action_dim = get_action_dim(self.action_space)
        self.mu = MultiHeadLinear(last, action_dim, num_tasks)  # type: ignore[assignment]
        self.log_std = MultiHeadLinear(last, action_dim, num_tasks)  # type: ignore[assignment]
        self.action_dist = unchecked(self.action_dist)  # type: ignore[assignment]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["num_tasks"] = self.num_tasks
        return data

    def dist_params(self, obs: PyTorchObs) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, clamped log-std) of each sample's pre-tanh Gaussian, from its task's head."""
        task = self.task_lookup(obs)
        features = self.extract_features(obs, self.features_extractor)
        latent_pi = self.latent_pi(features)
        mean_actions = self.mu(latent_pi, task)
        log_std = self.log_std(latent_pi, task)
        return mean_actions, torch.clamp(log_std, LOG_STD_MIN, LOG_STD_MAX)

    def get_action_dist_params(
        self, obs: PyTorchObs
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        mean_actions, log_std = self.dist_params(obs)
        return mean_actions, log_std, {}


class HeadedQNetwork(nn.Module):
    """One Q-network: a shared MLP trunk and a per-task scalar output head."""

    def __init__(
        self,
        in_dim: int,
        net_arch: list[int],
        activation_fn: type[nn.Module],
        num_tasks: int,
    ) -> None:
        super().__init__()
        self.trunk = nn.Sequential(*create_mlp(in_dim, -1, net_arch, activation_fn))
        self.head = MultiHeadLinear(net_arch[-1] if net_arch else in_dim, 1, num_tasks)

    def forward(self, x: torch.Tensor, task: TaskIndex) -> torch.Tensor:
        return self.head(self.trunk(x), task)


class MultiHeadContinuousCritic(ContinuousCritic):
    """SB3's twin critic with :class:`HeadedQNetwork` Q-networks."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        n_critics: int = 2,
        share_features_extractor: bool = True,
        *,
        num_tasks: int,
        task_lookup: TaskLookup | None = None,
    ) -> None:
        # Build SB3's critic with no Q-network (n_critics=0), then add headed ones: the
        # parameters then are exactly features extractor + our networks.
        super().__init__(
            observation_space,
            action_space,
            net_arch,
            features_extractor,
            features_dim,
            activation_fn,
            normalize_images,
            0,
            share_features_extractor,
        )
        self.n_critics = n_critics
        self.num_tasks = num_tasks
        self.task_lookup = TaskLookup(num_tasks) if task_lookup is None else task_lookup
        in_dim = features_dim + get_action_dim(self.action_space)
        self.q_networks = []
        for idx in range(n_critics):
            q_net = HeadedQNetwork(in_dim, net_arch, activation_fn, num_tasks)
            self.add_module(f"qf{idx}", q_net)
            self.q_networks.append(q_net)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        task = self.task_lookup(obs)
        with torch.set_grad_enabled(not self.share_features_extractor):
            features = self.extract_features(obs, self.features_extractor)
        qvalue_input = torch.cat([features, actions], dim=1)
        return tuple(q_net(qvalue_input, task) for q_net in self.q_networks)

    def q1_forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        task = self.task_lookup(obs)
        with torch.no_grad():
            features = self.extract_features(obs, self.features_extractor)
        return self.q_networks[0](torch.cat([features, actions], dim=1), task)


class MultiHeadSACPolicy(SACPolicy):
    """SB3's SACPolicy with per-task heads; ``num_tasks`` is the sequence length."""

    def __init__(self, *args: Any, num_tasks: int, **kwargs: Any) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        self.num_tasks = num_tasks  # read by make_actor/make_critic during super().__init__
        #: one lookup for the actor and every critic: an update asks each batch's task ~3x
        self.task_lookup = TaskLookup(num_tasks)
        observation_space = args[0] if args else kwargs["observation_space"]
        check_task_id_space(observation_space, num_tasks)
        super().__init__(*args, **kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["num_tasks"] = self.num_tasks
        return data

    def set_training_mode(self, mode: bool) -> None:
        """SB3's: actor and critic in ``mode`` (the target critic stays in eval mode), flag
        for flag, without ``nn.Module.train``'s per-module cost (:mod:`agents.training_mode`;
        SB3 switches modes ~3 times per SAC env step)."""
        set_tree_mode(self.actor, mode)
        set_tree_mode(self.critic, mode)
        self.training = mode

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> Actor:
        actor_kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return MultiHeadActor(**actor_kwargs, num_tasks=self.num_tasks,
                              task_lookup=self.task_lookup).to(self.device)

    def make_critic(
        self, features_extractor: BaseFeaturesExtractor | None = None
    ) -> ContinuousCritic:
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return MultiHeadContinuousCritic(**critic_kwargs, num_tasks=self.num_tasks,
                                         task_lookup=self.task_lookup).to(self.device)


__all__ = [
    "HeadedQNetwork",
    "MultiHeadActor",
    "MultiHeadContinuousCritic",
    "MultiHeadSACPolicy",
    "check_task_id_space",
]
