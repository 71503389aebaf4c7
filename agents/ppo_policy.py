"""Actor-critic policies for ContinualPPO with one action head and one value head per task.

The task travels in the observation (``ContinualEnv(append_task_id=True)``): for a ``Box``
observation it is the one-hot in the last ``num_tasks`` features, for a ``Dict`` observation
(Atari: ``{"observation": image, "task_id": one-hot}``) it is the ``task_id`` entry. Each sample
picks its head with a gather (:class:`agents.heads.MultiHeadLinear`), so rollouts, batched
evaluation of every task at once and ``torch.func.vmap`` (per-sample Fisher) all work on
batches that mix tasks.

The trunk is SB3's own: an MLP extractor over the flattened observation, or for ``Dict``
observations SB3's ``CombinedExtractor`` (the Nature CNN of Mnih et al. 2015 on the image,
concatenated with the one-hot). With ``multi_head=False`` the policy *is* SB3's
``ActorCriticPolicy`` / ``MultiInputActorCriticPolicy`` (same layers, same initialisation,
same random draws), which is what the plain-SB3 equivalence test relies on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import (
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
)
from stable_baselines3.common.policies import (
    ActorCriticPolicy,
    BaseModel,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.torch_layers import CombinedExtractor
from torch import nn
from torch.distributions import Categorical, Independent, Normal

from agents.distributions import unchecked
from agents.heads import MultiHeadLinear, TaskIndex, batch_task
from agents.training_mode import set_tree_mode

#: Key of the task one-hot in a Dict observation (envs.ContinualEnv's convention).
TASK_KEY = "task_id"

Obs = torch.Tensor | dict[str, torch.Tensor]


def _check_num_tasks(num_tasks: Any) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(
            f"num_tasks must be a positive integer (the length of the task sequence), got "
            f"{num_tasks!r}"
        )
    return num_tasks


class _MultiHeadMixin:
    """Per-task heads on top of an SB3 ``ActorCriticPolicy`` (mixed in before it).

    Only the action net, the value net and (Gaussian policies) the state-independent
    ``log_std`` become per-task; everything else is the SB3 parent's code.
    """

    num_tasks: int
    multi_head: bool
    observation_space: spaces.Space
    action_space: spaces.Space
    action_dist: Distribution
    action_net: nn.Module
    value_net: nn.Module
    log_std: nn.Parameter
    mlp_extractor: nn.Module
    share_features_extractor: bool
    ortho_init: bool
    log_std_init: float
    use_sde: bool

    def _setup_heads(self, num_tasks: int, multi_head: bool) -> None:
        """Attributes the parent's ``__init__`` needs in ``_build``; set before it runs."""
        self.num_tasks = _check_num_tasks(num_tasks)
        self.multi_head = bool(multi_head)

    def _check_spaces(self) -> None:
        if not isinstance(self.action_space, spaces.Discrete | spaces.Box):
            raise ValueError(
                f"continual PPO supports Discrete and Box action spaces, got {self.action_space}; "
                "the importance estimates (EWC/MAS) and replay distillation need a categorical "
                "or diagonal Gaussian policy"
            )
        if self.use_sde:
            raise ValueError(
                "use_sde=True is not supported by the continual PPO policies (the gSDE noise "
                "matrix is not per task); use use_sde=False"
            )
        if not self.multi_head:
            return
        hint = "build the environment with ContinualEnv(sequence, append_task_id=True)"
        space = self.observation_space
        if isinstance(space, spaces.Dict):
            sub = space.spaces.get(TASK_KEY)
            if sub is None or not isinstance(sub, spaces.Box) or sub.shape != (self.num_tasks,):
                raise ValueError(
                    f"a multi-head policy on Dict observations needs a {TASK_KEY!r} entry of shape "
                    f"({self.num_tasks},) holding the task one-hot, got {space}; {hint}"
                )
        elif isinstance(space, spaces.Box):
            tail = slice(space.shape[0] - self.num_tasks, None) if len(space.shape) == 1 else None
            if (
                tail is None
                or space.shape[0] <= self.num_tasks
                or not np.all(space.low[tail] == 0)
                or not np.all(space.high[tail] == 1)
            ):
                raise ValueError(
                    f"a multi-head policy on Box observations needs flat observations ending in "
                    f"a one-hot of the {self.num_tasks} tasks (bounds [0, 1]), got {space}; {hint}"
                )
        else:
            raise ValueError(f"unsupported observation space {space} for a multi-head policy")

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        self._check_spaces()
        if not self.multi_head:
            return
        # Replace the single heads by per-task ones, initialised as SB3 initialises its heads
        # (orthogonal, gain 0.01 for the policy logits/means, 1 for the value), head by head.
        latent_pi = self.mlp_extractor.latent_dim_pi
        latent_vf = self.mlp_extractor.latent_dim_vf
        out = self.action_net.out_features  # type: ignore[union-attr]
        self.action_net = MultiHeadLinear(latent_pi, int(out), self.num_tasks)
        self.value_net = MultiHeadLinear(latent_vf, 1, self.num_tasks)
        if self.ortho_init:
            for head, gain in ((self.action_net, 0.01), (self.value_net, 1.0)):
                with torch.no_grad():
                    for h in range(self.num_tasks):
                        nn.init.orthogonal_(head.weights[h], gain=gain)
                        head.biases[h].zero_()
        self.action_dist = unchecked(self.action_dist)  # same numbers, no validation cost
        if isinstance(self.action_dist, DiagGaussianDistribution):
            n_act = int(np.prod(self.action_space.shape))
            self.log_std = nn.Parameter(
                torch.full((self.num_tasks, n_act), float(self.log_std_init)), requires_grad=True
            )
        device = next(self.mlp_extractor.parameters(), torch.empty(0)).device
        self.to(device)  # type: ignore[attr-defined]
        self.optimizer = self.optimizer_class(  # type: ignore[attr-defined]
            self.parameters(),  # type: ignore[attr-defined]
            lr=lr_schedule(1),
            **self.optimizer_kwargs,  # type: ignore[attr-defined]
        )

    def set_training_mode(self, mode: bool) -> None:
        """SB3's ``self.train(mode)``, flag for flag (:mod:`agents.training_mode`)."""
        set_tree_mode(self, mode)  # type: ignore[arg-type]

    # -- task ids ----------------------------------------------------------------------------
    def task_index(self, obs: Obs) -> TaskIndex:
        """Each sample's task, from the one-hot it carries (argmax: no Python branching), or
        one ``int`` when the batch has a single task (:func:`agents.heads.batch_task`)."""
        return batch_task(obs, self.num_tasks)

    # -- forward passes ----------------------------------------------------------------------
    def _latents(self, obs: Obs) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extract_features(obs)  # type: ignore[attr-defined]
        if self.share_features_extractor:
            return self.mlp_extractor(features)
        pi_features, vf_features = features
        return (
            self.mlp_extractor.forward_actor(pi_features),
            self.mlp_extractor.forward_critic(vf_features),
        )

    def _head_distribution(self, latent_pi: torch.Tensor, task: TaskIndex) -> Distribution:
        mean = self.action_net(latent_pi, task)
        if isinstance(self.action_dist, DiagGaussianDistribution):
            return self.action_dist.proba_distribution(mean, self.log_std[task])
        assert isinstance(self.action_dist, CategoricalDistribution)
        return self.action_dist.proba_distribution(action_logits=mean)

    def forward(
        self, obs: Obs, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.multi_head:
            return super().forward(obs, deterministic)  # type: ignore[misc]
        task = self.task_index(obs)
        latent_pi, latent_vf = self._latents(obs)
        values = self.value_net(latent_vf, task)
        distribution = self._head_distribution(latent_pi, task)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        return actions, values, log_prob

    def evaluate_actions(
        self, obs: Obs, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self.multi_head:
            return super().evaluate_actions(obs, actions)  # type: ignore[misc]
        task = self.task_index(obs)
        latent_pi, latent_vf = self._latents(obs)
        distribution = self._head_distribution(latent_pi, task)
        log_prob = distribution.log_prob(actions)
        values = self.value_net(latent_vf, task)
        return values, log_prob, distribution.entropy()

    def get_distribution(self, obs: Obs) -> Distribution:
        if not self.multi_head:
            return super().get_distribution(obs)  # type: ignore[misc]
        features = self._actor_features(obs)
        latent_pi = self.mlp_extractor.forward_actor(features)
        return self._head_distribution(latent_pi, self.task_index(obs))

    def predict_values(self, obs: Obs) -> torch.Tensor:
        if not self.multi_head:
            return super().predict_values(obs)  # type: ignore[misc]
        features = BaseModel.extract_features(self, obs, self.vf_features_extractor)  # type: ignore[arg-type]
        latent_vf = self.mlp_extractor.forward_critic(features)
        return self.value_net(latent_vf, self.task_index(obs))

    # -- for the strategies --------------------------------------------------------------------
    def action_distribution(self, obs: Obs) -> torch.distributions.Distribution:
        """The policy's action distribution as a plain torch distribution (Categorical, or an
        Independent diagonal Normal), with ``validate_args=False`` and no branching on tensor
        values, so that ``torch.func.vmap`` can run it for per-sample importance."""
        features = self._actor_features(obs)
        latent_pi = self.mlp_extractor.forward_actor(features)
        if self.multi_head:
            task = self.task_index(obs)
            out = self.action_net(latent_pi, task)
            log_std = self.log_std[task] if hasattr(self, "log_std") else None
        else:
            out = self.action_net(latent_pi)
            log_std = getattr(self, "log_std", None)
        if isinstance(self.action_dist, CategoricalDistribution):
            return Categorical(logits=out, validate_args=False)
        assert log_std is not None
        std = torch.ones_like(out) * log_std.exp()
        return Independent(Normal(out, std, validate_args=False), 1, validate_args=False)

    def _actor_features(self, obs: Obs) -> torch.Tensor:
        # BaseModel's version (preprocess + ONE extractor): ActorCriticPolicy's returns a
        # (pi, vf) pair when the extractor is not shared.
        return BaseModel.extract_features(self, obs, self.pi_features_extractor)  # type: ignore[arg-type]

    def head_parameter_names(self) -> list[str]:
        """Names (in ``named_parameters()``) of the per-task or output heads."""
        names = [n for n, _ in self.named_parameters()]  # type: ignore[attr-defined]
        heads = ("action_net.", "value_net.")
        return [n for n in names if n.startswith(heads) or n == "log_std"]


class MultiHeadActorCriticPolicy(_MultiHeadMixin, ActorCriticPolicy):
    """MLP actor-critic for flat (Box) observations ending in the task one-hot."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Any,
        *args: Any,
        num_tasks: int = 1,
        multi_head: bool = True,
        **kwargs: Any,
    ) -> None:
        self._setup_heads(num_tasks, multi_head)
        super().__init__(observation_space, action_space, lr_schedule, *args, **kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(num_tasks=self.num_tasks, multi_head=self.multi_head)
        return data


class MultiHeadMultiInputPolicy(_MultiHeadMixin, MultiInputActorCriticPolicy):
    """Actor-critic for Dict observations (Atari: the Nature CNN on the image, via SB3's
    ``CombinedExtractor`` with Nature's 512 features, concatenated with the one-hot).

    With no ``net_arch`` the heads sit directly on the extractor's features, the standard
    Atari PPO architecture (SB3's ``CnnPolicy`` default).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Space,
        lr_schedule: Any,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        *args: Any,
        num_tasks: int = 1,
        multi_head: bool = True,
        features_extractor_class: type[nn.Module] = CombinedExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._setup_heads(num_tasks, multi_head)
        if net_arch is None:
            net_arch = []
        if features_extractor_kwargs is None and features_extractor_class is CombinedExtractor:
            features_extractor_kwargs = {"cnn_output_dim": 512}
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            *args,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            **kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(num_tasks=self.num_tasks, multi_head=self.multi_head)
        return data
