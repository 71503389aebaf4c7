"""ContinualSAC on real SAC updates: SB3 equivalence, strategy hooks, task switches, heads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.logger import Logger

from agents.continual import check_sb3_version, reset_optimizer_state
from agents.heads import MultiHeadLinear
from agents.sac import ContinualSAC
from agents.sac_policy import MultiHeadActor, MultiHeadContinuousCritic
from crl.strategies.importance import fisher_diagonal
from envs.continual import ContinualEnv
from envs.registry import get_sequence

STEPS = 150  # env steps per task
TINY = dict(
    policy_kwargs=dict(net_arch=[32, 32]),
    batch_size=32,
    buffer_size=5_000,
    device="cpu",
    seed=3,
)


def pendulum_env(steps: int = STEPS) -> ContinualEnv:
    return ContinualEnv(get_sequence("PendulumVariants", steps_per_task=steps), append_task_id=True)


def make_agent(**kwargs) -> ContinualSAC:
    opts = {**TINY, "exploration_steps": 50, **kwargs}
    return ContinualSAC("MlpPolicy", pendulum_env(), num_tasks=4, **opts)


def train_task(agent: ContinualSAC, task: int, steps: int = STEPS, end: bool = True) -> None:
    agent.start_task(task)
    agent.learn(steps, reset_num_timesteps=False)
    if end:
        agent.end_task(task)


class RecordingLogger(Logger):
    """Keeps every recorded value (SB3's logger keeps only the last one per key)."""

    def __init__(self) -> None:
        super().__init__(folder=None, output_formats=[])
        self.history: list[tuple[str, float]] = []

    def record(self, key, value, exclude=None) -> None:
        self.history.append((key, value))
        super().record(key, value, exclude)


def trunk(agent: ContinualSAC) -> dict[str, torch.Tensor]:
    return agent.host.protected_parameters()


# -- SB3 equivalence ---------------------------------------------------------------------------
def test_finetune_reproduces_plain_sb3_bit_exactly() -> None:
    plain = SAC("MlpPolicy", pendulum_env(), learning_starts=50, **TINY)
    plain_log = RecordingLogger()
    plain.set_logger(plain_log)
    plain.learn(250)

    ours = make_agent(multi_head=False)
    ours_log = RecordingLogger()
    ours.set_logger(ours_log)
    ours.start_task(0)
    ours.learn(250)

    losses = ("train/actor_loss", "train/critic_loss", "train/ent_coef", "train/ent_coef_loss")
    a = [(k, v) for k, v in plain_log.history if k in losses]
    b = [(k, v) for k, v in ours_log.history if k in losses]
    assert len(a) == 4 * 200 and a == b  # 200 updates, every loss identical
    assert plain._n_updates == ours._n_updates == 200
    named = list(ours.policy.named_parameters())
    assert [n for n, _ in plain.policy.named_parameters()] == [n for n, _ in named]
    for (name, p), (_, q) in zip(plain.policy.named_parameters(), named, strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(plain.log_ent_coef, ours.log_ent_coef)


# -- strategy hooks on real updates --------------------------------------------------------------
def _actor_grads_of_one_update(agent: ContinualSAC, penalty_on: bool) -> dict[str, torch.Tensor]:
    """Grads left by one real train() step from a saved state, with or without the penalty."""
    state = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    opt_states = {n: copy.deepcopy(o.state_dict()) for n, o in agent._optimizers().items()}
    ent = agent.log_ent_coef.detach().clone()
    original = agent.strategy.penalty
    if not penalty_on:
        agent.strategy.penalty = lambda *args: None  # type: ignore[method-assign]
    np.random.seed(11)
    torch.manual_seed(11)
    try:
        agent.train(gradient_steps=1, batch_size=32)
    finally:
        agent.strategy.penalty = original  # type: ignore[method-assign]
    grads = {n: p.grad.clone() for n, p in agent.actor.named_parameters()
             if p.grad is not None}  # heads of tasks absent from the batch get none
    agent.policy.load_state_dict(state)
    for n, o in agent._optimizers().items():
        o.load_state_dict(opt_states[n])
    with torch.no_grad():
        agent.log_ent_coef.copy_(ent)
    return grads


@pytest.mark.parametrize("method", ["l2", "ewc"])
def test_penalty_changes_actor_gradient_by_its_exact_gradient(method: str) -> None:
    lam = 5.0
    agent = make_agent(strategy=method, strategy_options={"lam": lam}, importance_samples=256)
    train_task(agent, 0)
    train_task(agent, 1, steps=60, end=False)  # 10 updates: θ moved away from θ*
    params = trunk(agent)
    if method == "l2":
        anchor, weight = agent.strategy.anchor, {n: torch.ones_like(p) for n, p in params.items()}
    else:
        anchor, weight = agent.strategy.anchors[0], agent.strategy.fishers[0]
    displacement = {n: (p.detach() - anchor[n]) for n, p in params.items()}
    assert all(float(d.abs().max()) > 0 for d in displacement.values())

    with_pen = _actor_grads_of_one_update(agent, penalty_on=True)
    without = _actor_grads_of_one_update(agent, penalty_on=False)
    assert with_pen.keys() == without.keys()
    for name in with_pen:
        full = f"actor.{name}"
        if full in params:
            expected = 2 * lam * weight[full] * displacement[full]
            torch.testing.assert_close(with_pen[name] - without[name], expected)
            assert float((with_pen[name] - without[name]).abs().max()) > 0
        else:  # per-task heads are not protected: the penalty leaves their gradient alone
            assert torch.equal(with_pen[name], without[name]), name


def test_agem_projected_gradient_never_opposes_reference_over_actor_and_critic() -> None:
    agent = make_agent(strategy="agem", strategy_options={"memory_per_task": 64, "batch_size": 32})
    assert agent.strategy.needs_joint_update
    train_task(agent, 0)
    train_task(agent, 3, steps=40, end=False)  # reversed torque, buffer filled, no update yet
    params = agent.host.trained_parameters()
    assert {id(p) for p in params} == {
        id(p) for p in [*agent.actor.parameters(), *agent.critic.parameters()]
    }
    refs: list[tuple[torch.Tensor, ...]] = []
    loss = agent.host.loss

    def spy(batch):
        out = loss(batch)
        refs.append(torch.autograd.grad(out, params, retain_graph=True, allow_unused=True))
        return out

    agent.host.loss = spy  # type: ignore[method-assign]
    projected = 0
    for _ in range(40):
        agent.train(gradient_steps=1, batch_size=32)
        g = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                       for p in params])  # heads no sample used: no gradient, zero
        r = torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                       for p, x in zip(params, refs[-1], strict=True)])
        dot = float(g @ r)
        scale = float(g.norm() * r.norm())
        assert dot >= -1e-5 * scale
        if agent.strategy.last_dot < 0:  # projected: g lies on the boundary g·g_ref = 0
            projected += 1
            assert abs(dot) <= 1e-4 * scale
    assert agent.strategy.num_updates == 40
    assert projected == agent.strategy.num_projections > 0


def test_packnet_frozen_trunk_weights_stay_bit_identical_through_next_task() -> None:
    agent = make_agent(strategy="packnet", strategy_options={"retrain_steps": 5})
    train_task(agent, 0)
    owner = agent.strategy.owner
    before = {n: p.detach().clone() for n, p in trunk(agent).items()}
    train_task(agent, 1, steps=120)  # 70 updates on task 1, then prune/retrain task 1
    for n, p in trunk(agent).items():
        kept = owner[n] == 0
        assert int(kept.sum()) > 0
        assert torch.equal(p.detach()[kept], before[n][kept]), n
        if p.ndim >= 2:  # weights task 1 owns did train
            assert not torch.equal(p.detach()[owner[n] == 1], before[n][owner[n] == 1])


def test_packnet_with_regularized_critic_freezes_critic_trunk_too() -> None:
    agent = make_agent(
        strategy="packnet", strategy_options={"retrain_steps": 5}, regularize_critic=True
    )
    assert agent.host.critic_step_touches_protected
    train_task(agent, 0)
    owner = agent.strategy.owner
    assert any(n.startswith("critic.") for n in owner)
    before = {n: p.detach().clone() for n, p in trunk(agent).items()}
    train_task(agent, 1, steps=120, end=False)
    for n, p in trunk(agent).items():
        kept = owner[n] == 0
        assert torch.equal(p.detach()[kept], before[n][kept]), n


# -- task switches -------------------------------------------------------------------------------
def test_replay_buffer_reset_at_switch_unless_disabled() -> None:
    agent = make_agent()
    train_task(agent, 0)
    assert agent.replay_buffer.pos == STEPS
    agent.start_task(1)
    assert agent.replay_buffer.pos == 0 and not agent.replay_buffer.full
    assert agent.switch_log[-1]["buffer_reset"] is True

    keep = make_agent(reset_buffer=False)
    train_task(keep, 0)
    keep.start_task(1)
    assert keep.replay_buffer.pos == STEPS and keep.switch_log[-1]["buffer_reset"] is False


def record_batch_tasks(agent: ContinualSAC) -> list[torch.Tensor]:
    """The task index (one-hot argmax) of every sample of each training batch from now on."""
    tasks: list[torch.Tensor] = []
    own = agent.batch_losses

    def spy(batch, *args, **kwargs):
        tasks.append(batch["obs"][:, -4:].argmax(1))
        return own(batch, *args, **kwargs)

    agent.batch_losses = spy  # type: ignore[method-assign]
    return tasks


def test_replay_keeps_finished_tasks_in_the_strategy_memory_and_mixes_them_in() -> None:
    """CW's perfect memory: the agent's buffer is reset as usual, the strategy's memory holds
    task 0's transitions, and every training batch of task 1 is a uniform draw over both."""
    replay = make_agent(strategy="replay", strategy_options={"mode": "buffer"})
    train_task(replay, 0)
    memory = replay.strategy.memory
    assert len(memory) == STEPS and memory.counts() == {0: STEPS}
    stored = memory.stored()
    assert set(stored) == {"obs", "actions", "next_obs", "rewards", "dones"}
    assert bool((stored["obs"][:, -4:].argmax(1) == 0).all())  # task 0's one-hot
    replay.start_task(1)
    assert replay.replay_buffer.pos == 0 and replay.switch_log[-1]["buffer_reset"] is True
    tasks = record_batch_tasks(replay)
    replay.learn(100, reset_num_timesteps=False)  # 50 exploration steps, then 50 updates
    assert len(tasks) == 50 and all(t.numel() == TINY["batch_size"] for t in tasks)
    old = float(torch.cat(tasks).eq(0).float().mean())
    # the buffer holds 50..99 transitions of task 1 against 150 stored: share 0.60-0.75
    assert 0.55 < old < 0.8
    assert set(torch.cat(tasks).tolist()) == {0, 1}


def test_balanced_replay_gives_the_memory_its_fixed_share_of_every_sac_batch() -> None:
    """``share=0.25``: 8 of every 32 transitions come from task 0's memory, whatever the
    buffer holds (the uniform draw would give 0.60-0.75 here)."""
    replay = make_agent(strategy="replay", strategy_options={"mode": "balanced", "share": 0.25})
    train_task(replay, 0)
    replay.start_task(1)
    tasks = record_batch_tasks(replay)
    replay.learn(60, reset_num_timesteps=False)  # 50 exploration steps, then 10 updates
    assert len(tasks) == 10
    assert [int(t.eq(0).sum()) for t in tasks] == [8] * 10
    assert [int(t.eq(1).sum()) for t in tasks] == [24] * 10


def test_optimizer_state_reset_at_switch_and_kept_when_disabled() -> None:
    agent = make_agent()
    train_task(agent, 0)
    opts = agent._optimizers()
    assert set(opts) == {"actor", "critic", "ent_coef"}
    assert all(len(o.state) > 0 for o in opts.values())
    lr = opts["actor"].param_groups[0]["lr"]
    agent.start_task(1)
    assert all(len(o.state) == 0 for o in opts.values())
    assert agent.switch_log[-1]["optimizers_reset"] == ["actor", "critic", "ent_coef"]
    agent.learn(51, reset_num_timesteps=False)  # 50 exploration steps, then one update
    steps = {float(s["step"]) for o in opts.values() for s in o.state.values()}
    assert steps == {1.0} and opts["actor"].param_groups[0]["lr"] == lr

    keep = make_agent(reset_optimizer=False)
    train_task(keep, 0)
    counters = {
        n: [float(s["step"]) for s in o.state.values()] for n, o in keep._optimizers().items()
    }
    keep.start_task(1)
    after = {n: [float(s["step"]) for s in o.state.values()] for n, o in keep._optimizers().items()}
    assert after == counters and counters["actor"][0] == STEPS - 50


def test_reset_optimizer_state_matches_a_fresh_adam() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    used = torch.optim.Adam([p], lr=0.1)
    for _ in range(3):
        used.zero_grad()
        p.square().sum().backward()
        used.step()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = torch.optim.Adam([q], lr=0.1)
    reset_optimizer_state(used)
    for opt, x in ((used, p), (fresh, q)):
        opt.zero_grad()
        x.square().sum().backward()
        opt.step()
    assert torch.equal(p, q)


def test_exploration_steps_rearmed_per_task() -> None:
    agent = make_agent(exploration_steps=40)
    train_task(agent, 0, steps=100)
    assert agent._n_updates == 60
    agent.start_task(1)
    assert agent.learning_starts == 140 and agent.switch_log[-1]["learning_starts"] == 140
    agent.learn(40, reset_num_timesteps=False)
    assert agent._n_updates == 60  # random actions, no update during the task's first 40 steps
    agent.learn(10, reset_num_timesteps=False)
    assert agent._n_updates == 70


def test_per_task_entropy_coefficient_trains_only_the_running_task() -> None:
    agent = make_agent(per_task_entropy=True)
    init = agent.log_ent_coef.detach().clone()
    assert init.shape == (4,)
    train_task(agent, 0, steps=100)
    moved = agent.log_ent_coef.detach() != init
    assert moved.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="ent_coef='auto'"):
        make_agent(per_task_entropy=True, ent_coef=0.1)


# -- heads, host, errors ---------------------------------------------------------------------------
def test_multi_head_outputs_equal_each_tasks_head_computed_by_hand() -> None:
    agent = make_agent()
    actor, critic = agent.actor, agent.critic
    assert isinstance(actor, MultiHeadActor) and isinstance(critic, MultiHeadContinuousCritic)
    torch.manual_seed(0)
    state = torch.randn(4, 3)
    obs = torch.cat([state, torch.eye(4)], dim=1)  # sample i carries task i
    actions = torch.rand(4, 1) * 2 - 1
    with torch.no_grad():
        mean, log_std, _ = actor.get_action_dist_params(obs)
        qs = critic(obs, actions)
        for t in range(4):
            latent = actor.latent_pi(obs[t : t + 1])
            mu = latent @ actor.mu.weights[t].T + actor.mu.biases[t]
            ls = (latent @ actor.log_std.weights[t].T + actor.log_std.biases[t]).clamp(-20, 2)
            torch.testing.assert_close(mean[t : t + 1], mu, rtol=0, atol=1e-6)
            torch.testing.assert_close(log_std[t : t + 1], ls, rtol=0, atol=1e-6)
            for q_net, q in zip(critic.q_networks, qs, strict=True):
                hidden = q_net.trunk(torch.cat([obs[t : t + 1], actions[t : t + 1]], dim=1))
                expected = hidden @ q_net.head.weights[t].T + q_net.head.biases[t]
                torch.testing.assert_close(q[t : t + 1], expected, rtol=0, atol=1e-6)
        # same state, other task: a different head, a different action
        same_state = torch.cat([state[:1].repeat(4, 1), torch.eye(4)], dim=1)
        deterministic = agent.policy.predict(same_state.numpy(), deterministic=True)[0]
    assert len({round(float(a), 6) for a in deterministic[:, 0]}) == 4
    names = set(agent.host.protected_parameters())
    assert names == {n for n, _ in actor.named_parameters(prefix="actor") if "latent_pi" in n}


def test_multi_head_linear_matches_each_head_by_hand_and_isolates_gradients() -> None:
    torch.manual_seed(0)
    heads = MultiHeadLinear(8, 3, 5)
    x = torch.randn(16, 8)
    task = torch.tensor([0, 1, 2, 3, 4, 2, 2, 0, 1, 1, 3, 3, 4, 0, 0, 2])
    by_hand = torch.stack(
        [x[i] @ heads.weights[t].T + heads.biases[t] for i, t in enumerate(task.tolist())]
    )
    torch.testing.assert_close(heads(x, task), by_hand)
    only_task_2 = torch.full((4,), 2)
    heads(x[:4], only_task_2).sum().backward()  # a mixed-path batch: every head in the graph
    assert all(float(heads.weights[h].grad.abs().sum()) == 0.0 for h in (0, 1, 3, 4))
    assert float(heads.weights[2].grad.abs().sum()) > 0.0

def test_protected_set_follows_head_and_critic_options() -> None:
    single = make_agent(multi_head=False, regularize_critic=True)
    names = set(single.host.protected_parameters())
    assert "actor.mu.weight" in names and "critic.qf0.4.weight" in names
    assert not any(n.startswith("critic_target") for n in names)
    multi = make_agent(regularize_critic=True)
    names = set(multi.host.protected_parameters())
    assert "critic.qf1.trunk.2.weight" in names
    assert not any(".head." in n or ".mu." in n or ".log_std." in n for n in names)


def test_ewc_fisher_on_sac_host_is_finite_nonzero_and_detached() -> None:
    agent = make_agent()
    train_task(agent, 0, end=False)
    fisher = fisher_diagonal(agent.host, "true", max_samples=128)
    assert set(fisher) == set(agent.host.protected_parameters())
    for n, f in fisher.items():
        assert torch.isfinite(f).all() and float(f.sum()) > 0, n
        assert f.grad_fn is None and not f.requires_grad, n
    batches = list(agent.task_batches())
    assert sum(len(b["obs"]) for b in batches) == STEPS  # every transition of task 0, once
    assert all((b["obs"][:, 3] == 1).all() for b in batches)  # one-hot of task 0


def test_gsde_output_distribution_is_per_sample_and_feeds_the_fisher() -> None:
    # with gSDE the actor's log_std is the (latent x action) noise matrix's; the per-sample
    # std is sqrt(latent^2 @ exp(log_std)^2) (gSDE, Raffin et al. 2022)
    agent = make_agent(multi_head=False, use_sde=True)
    train_task(agent, 0, end=False)
    batch = next(iter(agent.task_batches()))
    obs = batch["obs"][:8]
    dist = agent.host.output_distribution({"obs": obs})
    assert dist.batch_shape == (8,) and dist.event_shape == (1,)
    actor = agent.actor
    with torch.no_grad():
        latent = actor.latent_pi(actor.extract_features(obs, actor.features_extractor))
        var = (latent**2) @ (actor.log_std.exp() ** 2)
    torch.testing.assert_close(dist.base_dist.stddev, (var + 1e-6).sqrt())
    fisher = fisher_diagonal(agent.host, "true", max_samples=64)
    assert all(torch.isfinite(f).all() and float(f.sum()) > 0 for f in fisher.values())


def test_sac_on_discrete_sequence_is_a_clear_error() -> None:
    env = ContinualEnv(get_sequence("CartPoleSwap", steps_per_task=50), append_task_id=True)
    with pytest.raises(ValueError, match="continuous.*PPO"):
        ContinualSAC("MlpPolicy", env, num_tasks=2, **TINY)


def test_task_protocol_errors_and_state_round_trip() -> None:
    agent = make_agent(strategy="l2")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        agent.start_task(4)
    with pytest.raises(ValueError, match="exploration_steps"):
        make_agent(learning_starts=10)
    train_task(agent, 0, steps=60, end=False)
    with pytest.raises(RuntimeError, match="end_task\\(0\\) first"):
        agent.start_task(1)
    agent.end_task(0)
    state = agent.continual_state_dict()
    other = make_agent(strategy="l2")
    other.load_continual_state_dict(state)
    assert other.current_task == 0 and not other.task_running
    for n, a in agent.strategy.anchor.items():
        assert torch.equal(other.strategy.anchor[n], a)
    with pytest.raises(ValueError, match="strategy='l2'"):
        make_agent(strategy="ewc").load_continual_state_dict(state)


def test_sb3_version_pin_is_checked() -> None:
    check_sb3_version("2.9.2")
    with pytest.raises(ImportError, match="stable-baselines3>=2.9,<2.10"):
        check_sb3_version("2.10.0")


def test_perfect_memory_refuses_a_kept_buffer_and_n_step_returns() -> None:
    with pytest.raises(ValueError, match="count them twice"):
        make_agent(strategy="replay", strategy_options={"mode": "buffer"}, reset_buffer=False)
    from agents.config import ConfigError, RunConfig
    from agents.factory import check_method_options
    from envs.registry import get_sequence

    config = RunConfig(sequence="PendulumVariants", agent="sac", method="replay",
                       agent_options={"reset_buffer": False})
    with pytest.raises(ConfigError, match="count them twice"):  # before any run directory
        check_method_options(config, get_sequence("PendulumVariants"))
    with pytest.raises(ValueError, match="critic would never rehearse.*--replay-mode buffer"):
        make_agent(strategy="replay", strategy_options={"mode": "rehearsal"})
    config = RunConfig(sequence="PendulumVariants", agent="sac", method="replay",
                       method_options={"replay": {"mode": "rehearsal"}})
    with pytest.raises(ConfigError, match="critic would never rehearse"):
        check_method_options(config, get_sequence("PendulumVariants"))
    combo = RunConfig(sequence="PendulumVariants", agent="sac", method="replay+redo",
                      method_options={"replay": {"mode": "rehearsal"}})
    with pytest.raises(ConfigError, match="critic would never rehearse"):  # inside a combination
        check_method_options(combo, get_sequence("PendulumVariants"))
    from agents.continual import check_batch_keys
    from agents.sac import BATCH_KEYS
    from crl.strategies import make_strategy

    labels = make_strategy("ewc+redo", ewc={"fisher": "empirical"})
    with pytest.raises(ValueError, match=r"reads batch\['y'\].*--ewc-target-key"):
        check_batch_keys(labels, "SAC", BATCH_KEYS)
    check_batch_keys(make_strategy("ewc+redo", ewc={"fisher": "empirical",
                                                    "target_key": "actions"}), "SAC", BATCH_KEYS)


def test_a_reservoir_checkpoint_of_an_older_version_is_refused() -> None:
    from agents.checkpoint import CheckpointError, agent_state, load_agent_state

    agent = make_agent(strategy="replay", strategy_options={"mode": "buffer"})
    train_task(agent, 0, steps=60, end=False)
    state = agent_state(agent)
    state["replay_buffer"]["meta"]["reservoir"] = True  # what the older version wrote
    with pytest.raises(CheckpointError, match="reservoir over the whole sequence"):
        load_agent_state(make_agent(strategy="replay", strategy_options={"mode": "buffer"}),
                         state)
