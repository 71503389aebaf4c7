"""ContinualPPO on real PPO updates: equivalence with plain SB3, each strategy's hook acting
on the update, task-switch resets, per-task heads, distillation replay, Atari CNN smoke."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from torch.distributions import Categorical, Independent

from agents.heads import MultiHeadLinear
from agents.ppo import ContinualPPO
from crl.strategies.importance import fisher_diagonal
from crl.strategies.replay import Replay
from envs.continual import ContinualEnv
from envs.registry import get_sequence

STEPS = 128  # per task: two rollouts of 64 steps
SMALL = {"n_steps": 64, "batch_size": 32, "n_epochs": 2, "seed": 0}
NET = {"net_arch": [32, 32]}
TRAIN_KEYS = (
    "train/policy_gradient_loss",
    "train/value_loss",
    "train/entropy_loss",
    "train/loss",
    "train/approx_kl",
    "train/clip_fraction",
)


def make_env(steps: int = STEPS, name: str = "CartPoleSwap", **kw) -> ContinualEnv:
    return ContinualEnv(get_sequence(name, steps_per_task=steps), append_task_id=True, **kw)


def make_agent(strategy="finetune", *, env=None, options=None, **kw) -> ContinualPPO:
    args = {**SMALL, "policy_kwargs": dict(NET)}
    args.update(kw)
    return ContinualPPO(
        "MlpPolicy",
        make_env() if env is None else env,
        strategy=strategy,
        strategy_options=options,
        num_tasks=2,
        **args,
    )


def run_task(agent: ContinualPPO, task: int, steps: int = STEPS, end: bool = True) -> None:
    agent.start_task(task)
    agent.learn(steps, reset_num_timesteps=task == 0)
    if end:
        agent.end_task(task)


def record_train(model) -> list[dict[str, float]]:
    """Wrap ``model.train`` to keep SB3's logged losses of every update."""
    logs: list[dict[str, float]] = []
    original = model.train

    def train() -> None:
        original()
        logs.append({k: float(model.logger.name_to_value[k]) for k in TRAIN_KEYS})

    model.train = train
    return logs


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.policy.named_parameters()}


# -- equivalence with SB3 -------------------------------------------------------------------
def test_finetune_single_head_equals_plain_sb3_bit_for_bit():
    kw = {**SMALL, "n_epochs": 3, "policy_kwargs": dict(NET)}
    # One model after the other: SB3 seeds the global torch RNG at construction, and both
    # models draw their rollout actions from it.
    plain = PPO("MlpPolicy", make_env(192), **kw)
    init = params(plain)
    plain_logs = record_train(plain)
    plain.learn(192)
    plain.learn(192, reset_num_timesteps=False)  # across the switch: SB3 just goes on

    ours = ContinualPPO(
        "MlpPolicy", make_env(192), num_tasks=2, multi_head=False, reset_optimizer=False, **kw
    )
    assert init.keys() == params(ours).keys()
    assert all(torch.equal(init[n], p) for n, p in params(ours).items())
    our_logs = record_train(ours)
    ours.start_task(0)
    ours.learn(192)
    ours.end_task(0)
    ours.start_task(1)  # finetune, no optimiser reset: nothing may differ from SB3
    ours.learn(192, reset_num_timesteps=False)

    assert len(our_logs) == len(plain_logs) == 6
    assert our_logs == plain_logs  # exact float equality of every logged loss
    final_plain, final_ours = params(plain), params(ours)
    for n, p in final_plain.items():
        assert torch.equal(p, final_ours[n]), n
    assert any(not torch.equal(init[n], p) for n, p in final_plain.items())
    assert np.array_equal(plain.rollout_buffer.observations, ours.rollout_buffer.observations)


# -- multi-head ------------------------------------------------------------------------------
def test_multi_head_picks_each_samples_head_and_trains_only_its_own():
    agent = make_agent()
    policy = agent.policy
    assert isinstance(policy.action_net, MultiHeadLinear)
    assert isinstance(policy.value_net, MultiHeadLinear)
    with torch.no_grad():
        policy.action_net.weights[1].normal_()  # make the two heads clearly different
        policy.action_net.biases[1].normal_()
    torch.manual_seed(0)
    obs = torch.randn(6, 6)
    task = torch.tensor([0, 1, 1, 0, 1, 0])
    obs[:, -2:] = torch.nn.functional.one_hot(task, 2).float()
    with torch.no_grad():
        latent = policy.mlp_extractor.forward_actor(obs)
        latent_vf = policy.mlp_extractor.forward_critic(obs)
        W, b = policy.action_net.stacked()
        expected = torch.stack([W[t] @ latent[i] + b[t] for i, t in enumerate(task.tolist())])
        Wv, bv = policy.value_net.stacked()
        values = torch.stack([Wv[t] @ latent_vf[i] + bv[t] for i, t in enumerate(task.tolist())])
        dist = policy.action_distribution(obs)
        assert isinstance(dist, Categorical)
        torch.testing.assert_close(dist.logits, torch.log_softmax(expected, -1))
        sb3_dist = policy.get_distribution(obs).distribution
        torch.testing.assert_close(sb3_dist.logits, dist.logits)
        torch.testing.assert_close(policy.predict_values(obs), values)
    actions, _ = policy.predict(obs.numpy(), deterministic=True)
    assert actions.tolist() == expected.argmax(-1).tolist()

    heads_before = params(agent)
    run_task(agent, 0)
    after = params(agent)
    for net in ("action_net", "value_net"):
        for kind in ("weights", "biases"):  # task 1's head untouched, task 0's trained
            assert torch.equal(after[f"{net}.{kind}.1"], heads_before[f"{net}.{kind}.1"])
            assert not torch.equal(after[f"{net}.{kind}.0"], heads_before[f"{net}.{kind}.0"])


def test_multi_head_needs_the_task_one_hot():
    env = ContinualEnv(get_sequence("CartPoleSwap", steps_per_task=STEPS), append_task_id=False)
    with pytest.raises(ValueError, match="append_task_id=True"):
        make_agent(env=env)


# -- strategy hooks on real updates -------------------------------------------------------
@pytest.mark.parametrize("method", ["l2", "ewc", "mas"])
def test_penalty_enters_the_actor_gradient(method):
    agent = make_agent(method, options={"lam": 1e4})
    run_task(agent, 0)
    protected = agent.host.protected_parameters()
    assert "mlp_extractor.policy_net.0.weight" in protected
    assert not any(
        n.startswith(("action_net", "value_net", "mlp_extractor.value_net")) for n in protected
    )
    names, plist = list(protected), list(protected.values())

    seen: list[tuple] = []
    losses_fn = agent.batch_losses

    def spy_losses(batch, *args):
        seen.append((batch, args))
        return losses_fn(batch, *args)

    agent.batch_losses = spy_losses
    checks: list[float] = []
    original = agent.strategy.before_optimizer_step

    def spy_before() -> None:
        batch, args = seen[-1]
        g_loss = torch.autograd.grad(losses_fn(batch, *args).total, plist)
        g_pen = torch.autograd.grad(agent.strategy.penalty(), plist)
        for n, p, gl, gp in zip(names, plist, g_loss, g_pen, strict=True):
            torch.testing.assert_close(p.grad, gl + gp, rtol=1e-5, atol=1e-7, msg=n)
        checks.append(float(sum(g.abs().sum() for g in g_pen)))
        original()

    agent.strategy.before_optimizer_step = spy_before
    run_task(agent, 1, end=False)
    assert len(checks) == 8  # 2 rollouts x 2 epochs x 2 minibatches
    assert checks[0] == 0.0  # θ = θ* at the first update of task 1: no pull yet
    assert all(c > 0 for c in checks[1:])  # then the penalty changes the actor gradient
    assert agent.logger.name_to_value[f"train/{method}_penalty"] > 0


def grads_of(loss: torch.Tensor, plist: list) -> list[torch.Tensor]:
    """Gradient of ``loss`` for every parameter; zero for those it does not use (the heads of
    tasks absent from the batch)."""
    grads = torch.autograd.grad(loss, plist, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(plist, grads, strict=True)]


def test_agem_projected_gradient_never_opposes_the_reference():
    agent = make_agent("agem", options={"memory_per_task": 64, "batch_size": 64})
    run_task(agent, 0)
    assert len(agent.strategy.memory) == 64
    plist = agent.host.trained_parameters()
    ref_batches: list = []
    host_loss = agent.host.loss

    def spy_loss(batch):
        ref_batches.append(batch)
        return host_loss(batch)

    agent.host.loss = spy_loss
    dots: list[float] = []
    original = agent.strategy.before_optimizer_step

    def spy_before() -> None:
        if not dots:  # force a conflict on the first update: g·g_ref = -‖g_ref‖² < 0
            g_ref = grads_of(host_loss(agent.strategy.memory.sample(64)), plist)
            for p in plist:  # a head no sample used has no gradient: zero
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            dot = sum((p.grad * r).sum() for p, r in zip(plist, g_ref, strict=True))
            sq = sum((r * r).sum() for r in g_ref)
            with torch.no_grad():
                for p, r in zip(plist, g_ref, strict=True):
                    p.grad.sub_((dot / sq + 1) * r)
        before = agent.strategy.num_projections
        original()
        g_ref = grads_of(host_loss(ref_batches[-1]), plist)
        g = [torch.zeros_like(p) if p.grad is None else p.grad for p in plist]
        dot = float(sum((a * r).sum() for a, r in zip(g, g_ref, strict=True)))
        norm = float(
            sum((a**2).sum() for a in g).sqrt() * sum((r**2).sum() for r in g_ref).sqrt()
        )
        assert dot >= -1e-4 * norm, (dot, norm)
        if not dots:
            assert agent.strategy.num_projections == before + 1
            assert agent.strategy.last_dot < 0
        dots.append(dot)

    agent.strategy.before_optimizer_step = spy_before
    run_task(agent, 1, end=False)
    assert len(dots) == 8 and agent.strategy.num_updates == 8


def test_packnet_frozen_weights_bit_identical_through_next_task():
    agent = make_agent("packnet", options={"retrain_steps": 5})
    run_task(agent, 0)
    owner = {n: o.clone() for n, o in agent.strategy.owner.items()}
    protected = agent.host.protected_parameters()
    kept = {n: protected[n].detach().clone() for n in owner}
    w = "mlp_extractor.policy_net.0.weight"
    assert int((owner[w] == 0).sum()) == owner[w].numel() // 2  # equal share of 2 tasks

    run_task(agent, 1, end=False)
    for n, own in owner.items():
        frozen = own == 0
        assert torch.equal(protected[n][frozen], kept[n][frozen]), n
    assert not torch.equal(protected[w][owner[w] != 0], kept[w][owner[w] != 0])  # task 1 trains
    agent.end_task(1)
    for n, own in owner.items():
        assert torch.equal(protected[n][own == 0], kept[n][own == 0]), n

    full = protected[w].detach().clone()
    with agent.evaluation(0):  # task 0 sees only its own weights
        assert torch.all(protected[w][agent.strategy.owner[w] == 1] == 0)
        assert torch.equal(protected[w][owner[w] == 0], kept[w][owner[w] == 0])
    assert torch.equal(protected[w], full)


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_reset_at_switch_only_when_configured(reset):
    agent = make_agent(reset_optimizer=reset)
    run_task(agent, 0)
    state = agent.policy.optimizer.state
    assert len(state) > 0
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in state.items()}
    agent.start_task(1)
    if reset:
        assert len(agent.policy.optimizer.state) == 0
        assert agent.switch_log[-1]["optimizers_reset"] == ["policy"]
    else:
        assert agent.switch_log[-1]["optimizers_reset"] == []
        for p, s in agent.policy.optimizer.state.items():
            assert all(torch.equal(v, before[id(p)][k]) for k, v in s.items())
    agent.learn(STEPS, reset_num_timesteps=False)
    state = agent.policy.optimizer.state
    trunk = [p for n, p in agent.policy.named_parameters()
             if not n.startswith(("action_net.", "value_net."))]
    steps = {float(state[p]["step"]) for p in trunk}
    assert steps == ({8.0} if reset else {16.0})  # Adam restarted its step count, or not
    head = agent.policy.action_net  # each task's head counts only its own task's updates
    assert float(state[head.weights[1]]["step"]) == 8.0
    if reset:
        assert head.weights[0] not in state  # untouched by task 1: no Adam state at all
    else:
        assert float(state[head.weights[0]]["step"]) == 8.0


# -- the task's data and importance ------------------------------------------------------------
def test_task_store_keeps_last_transitions_and_fisher_is_vmap_safe():
    agent = make_agent("ewc", importance_samples=96)
    run_task(agent, 0, end=False)
    data = agent._task_data
    assert data["obs"].shape == (96, 6) and data["returns"].shape == (96,)
    # the last rollout (64 steps, 1 env: time order == the flattened buffer) ends the store
    assert np.array_equal(data["obs"][-64:].numpy(), agent.rollout_buffer.observations)
    assert [len(b["returns"]) for b in agent.task_batches()] == [32, 32, 32]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fall-back to the per-sample loop
        vmapped = fisher_diagonal(agent.host)
    looped = fisher_diagonal(agent.host, vectorize=False)
    for n, f in vmapped.items():
        torch.testing.assert_close(f, looped[n], rtol=1e-4, atol=1e-10)
    assert all(float(f.detach().sum()) > 0 for f in vmapped.values())
    agent.end_task(0)
    stored = agent.strategy.fishers[0]
    for n, f in stored.items():
        torch.testing.assert_close(f, vmapped[n].detach(), rtol=1e-5, atol=1e-12)
        assert not f.requires_grad  # no graph through the heads (see ContinualPPO.end_task)
    agent.start_task(1)
    assert agent._task_data == {}  # a new task starts an empty store


def test_gaussian_policy_has_per_task_log_std_and_vmap_fisher():
    env = make_env(64, name="PendulumVariants")
    agent = ContinualPPO(
        "MlpPolicy", env, num_tasks=4, strategy="ewc", policy_kwargs=dict(NET), **SMALL
    )
    policy = agent.policy
    assert policy.log_std.shape == (4, 1)
    with torch.no_grad():
        policy.log_std[2].fill_(-1.0)
    obs = torch.zeros(2, env.observation_space.shape[0])
    obs[0, -4 + 2] = 1.0
    obs[1, -4 + 0] = 1.0
    dist = policy.action_distribution(obs)
    assert isinstance(dist, Independent)
    torch.testing.assert_close(
        dist.base_dist.scale, torch.tensor([[np.exp(-1.0)], [1.0]], dtype=torch.float32)
    )
    run_task(agent, 0, steps=64, end=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        vmapped = fisher_diagonal(agent.host)
    looped = fisher_diagonal(agent.host, vectorize=False)
    for n, f in vmapped.items():
        torch.testing.assert_close(f, looped[n], rtol=1e-4, atol=1e-10)
    agent.end_task(0)


# -- replay = distillation ------------------------------------------------------------------
def test_replay_is_distillation_and_penalises_policy_drift():
    # single head, larger steps: task 1 trains the same output layer that task 0 used
    agent = make_agent(
        "replay",
        options={"memory_size": 128, "batch_size": 64},
        multi_head=False,
        learning_rate=3e-3,
    )
    assert isinstance(agent.strategy, Replay) and agent.strategy.mode == "distill"
    assert agent.penalty_log_key == "train/distillation_kl"
    run_task(agent, 0)
    assert len(agent.strategy.memory) == 128 and agent.strategy.dist_kind == "categorical"
    assert agent.strategy.penalty().item() == pytest.approx(0.0, abs=1e-6)  # same policy
    run_task(agent, 1, end=False)
    assert agent.logger.name_to_value["train/distillation_kl"] > 0
    assert agent.strategy.penalty().item() > 1e-6  # the policy moved on task 1


@pytest.mark.parametrize("mode", ["buffer", "rehearsal"])
def test_replay_modes_other_than_distillation_are_refused(mode):
    with pytest.raises(ValueError, match="distillation"):
        make_agent("replay", options={"mode": mode})
    with pytest.raises(ValueError, match="distillation"):
        make_agent(Replay(mode=mode))


# -- protocol errors ------------------------------------------------------------------------
def test_learn_refuses_rollouts_across_a_switch_and_untracked_tasks():
    agent = make_agent()
    with pytest.raises(RuntimeError, match="start_task"):
        agent.learn(STEPS)
    agent.start_task(0)
    with pytest.raises(ValueError, match=r"total_timesteps=100 .* 64 \* 1 = 64"):
        agent.learn(100)
    with pytest.raises(ValueError, match="importance_samples"):
        make_agent(importance_samples=0)


# -- Atari: Nature CNN trunk, per-task heads ----------------------------------------------------
@pytest.mark.skipif(
    importlib.util.find_spec("ale_py") is None, reason="ale_py (atari extra) missing"
)
def test_atari_cnn_multi_head_smoke(tmp_path):
    from stable_baselines3.common.torch_layers import NatureCNN

    env = ContinualEnv(get_sequence("Atari3", steps_per_task=128), append_task_id=True)
    agent = ContinualPPO(
        "MultiInputPolicy",
        env,
        num_tasks=3,
        strategy="l2",
        n_steps=128,
        batch_size=64,
        n_epochs=1,
        seed=0,
        importance_samples=128,
    )
    policy = agent.policy
    assert isinstance(policy.features_extractor.extractors["observation"], NatureCNN)
    assert isinstance(policy.action_net, MultiHeadLinear)
    assert policy.action_net.stacked()[0].shape == (3, 18, 512 + 3)
    head2 = policy.action_net.weights[2].detach().clone()
    run_task(agent, 0)
    run_task(agent, 1, end=False)
    assert agent.num_timesteps == 256
    assert agent._task_data["obs.observation"].dtype == torch.uint8
    assert agent.logger.name_to_value["train/l2_penalty"] > 0
    assert torch.equal(policy.action_net.weights[2], head2)  # task 2's head never trained
    # Dict observations (SB3 keeps them in OrderedDicts) go through a checkpoint file
    from agents.checkpoint import agent_state
    from crl.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"agent": agent_state(agent)})
    assert load_checkpoint(path)["agent"]["continual"]["strategy_name"] == "l2"


def test_save_load_round_trip_with_continual_state(tmp_path):
    agent = make_agent("ewc", options={"lam": 5.0})
    run_task(agent, 0)
    agent.save(tmp_path / "model.zip")
    torch.save(agent.continual_state_dict(), tmp_path / "continual.pt")
    loaded = ContinualPPO.load(tmp_path / "model.zip", env=make_env())
    loaded.load_continual_state_dict(torch.load(tmp_path / "continual.pt", weights_only=True))
    assert loaded.strategy.name == "ewc" and loaded.strategy.lam == 5.0
    assert loaded.host.module is loaded.policy and loaded.strategy.host is loaded.host
    for (n, p), q in zip(agent.policy.named_parameters(), loaded.policy.parameters(), strict=True):
        assert torch.equal(p, q), n
    for n, f in agent.strategy.fishers[0].items():
        assert torch.equal(f, loaded.strategy.fishers[0][n]), n
    assert loaded.current_task == 0 and not loaded.task_running
    with torch.no_grad():  # move the trunk: both penalties see the same anchors and Fisher
        for model in (agent, loaded):
            model.policy.mlp_extractor.policy_net[0].weight.add_(0.1)
    assert agent.strategy.penalty().item() == loaded.strategy.penalty().item() > 0
    loaded.start_task(1)
    loaded.learn(STEPS, reset_num_timesteps=False)
