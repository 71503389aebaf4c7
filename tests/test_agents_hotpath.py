"""The agents' hot-path shortcuts give the same numbers as the general path, and `crl train`'s
RL method defaults reach the strategy."""

from __future__ import annotations

import os

import pytest
import torch
from torch.func import vmap

from agents.config import RunConfig
from agents.factory import make_agent
from agents.heads import (
    MultiHeadLinear,
    TaskLookup,
    batch_task,
    task_index_from_obs,
    uniform_task,
)
from agents.method_defaults import RL_METHOD_DEFAULTS, agent_batch_size, rl_method_options
from agents.ppo import ContinualPPO
from envs.continual import ContinualEnv
from envs.registry import get_sequence


# -- heads ----------------------------------------------------------------------------------
def test_uniform_task_is_an_int_only_for_single_task_batches():
    assert uniform_task(torch.tensor([2, 2, 2])) == 2
    assert isinstance(uniform_task(torch.tensor([2, 2, 2])), int)
    mixed = torch.tensor([0, 2, 2])
    assert uniform_task(mixed) is mixed
    empty = torch.zeros(0, dtype=torch.long)
    assert uniform_task(empty) is empty
    obs = torch.cat([torch.randn(5, 3), torch.eye(4)[[1, 1, 1, 1, 1]]], dim=1)
    assert uniform_task(task_index_from_obs(obs, 4)) == 1


def _obs(tasks: list[int], n: int = 4) -> torch.Tensor:
    return torch.cat([torch.randn(len(tasks), 3), torch.eye(n)[tasks]], dim=1)


def test_batch_task_agrees_with_argmax_then_uniform():
    for tasks in ([1, 1, 1], [0, 2, 2], [3], [0, 0, 1, 0]):
        obs = _obs(tasks)
        expected = uniform_task(task_index_from_obs(obs, 4))
        got = batch_task(obs, 4)
        assert type(got) is type(expected)
        assert got == expected if isinstance(got, int) else torch.equal(got, expected)
    bad = _obs([2, 2, 2])
    bad[1, -4:] = 0.0  # a row without its one-hot is not "task 2": fall back to the argmax
    assert torch.equal(batch_task(bad, 4), torch.tensor([2, 0, 2]))
    both = _obs([1, 1])
    both[0, -1] = 1.0  # not a one-hot: same answer as the argmax (first maximum)
    assert batch_task(both, 4) == uniform_task(task_index_from_obs(both, 4)) == 1
    image = {"observation": torch.zeros(2, 1, 4, 4), "task_id": torch.eye(3)[[2, 2]]}
    assert batch_task(image, 3) == 2
    with pytest.raises(KeyError, match="task_id"):
        batch_task({"observation": torch.zeros(2, 3)}, 3)


def test_task_lookup_reads_each_batch_once_and_sees_in_place_changes(monkeypatch):
    import agents.heads as heads_module

    calls = []
    real = heads_module.batch_task
    monkeypatch.setattr(heads_module, "batch_task", lambda o, n: calls.append(1) or real(o, n))
    lookup = TaskLookup(4)
    obs, nxt = _obs([1, 1]), _obs([2, 2])
    assert [lookup(obs), lookup(nxt), lookup(nxt), lookup(obs), lookup(obs)] == [1, 2, 2, 1, 1]
    assert len(calls) == 2
    obs[:, -4:] = torch.eye(4)[[3, 3]]  # in place: a new version of the batch
    assert lookup(obs) == 3 and len(calls) == 3
    assert lookup(_obs([1, 1])) == 1 and len(calls) == 4  # equal content, new tensor


def test_uniform_task_inside_vmap_keeps_the_tensor():
    seen = []

    def one(t: torch.Tensor) -> torch.Tensor:
        out = uniform_task(t)
        seen.append(type(out))
        return t * 1

    vmap(one)(torch.tensor([1, 1, 1]))
    assert seen == [torch.Tensor]  # values cannot be read inside the transform


def test_one_task_shortcut_equals_the_mixed_batch():
    """A sample's output and its head's gradient do not depend on the other samples' tasks:
    the per-task path (int) and the mixed path (gather) run the same F.linear per head.

    The mixed path multiplies all 12 rows by each head and gathers, the per-task path only
    its 3 rows: GEMMs of different shapes may round differently (the BLAS picks its kernel
    per shape, e.g. MKL on AVX-512), so those are compared to float tolerance; paths with
    the same shapes are compared bit for bit."""
    torch.manual_seed(0)
    heads = MultiHeadLinear(16, 3, 4)
    x = torch.randn(12, 16)
    task = torch.tensor([0, 1, 2, 3, 2, 1, 0, 3, 3, 1, 2, 0])
    mixed = heads(x, task)
    for t in range(4):
        rows = task == t
        alone = heads(x[rows], t)
        torch.testing.assert_close(alone, mixed[rows], rtol=1e-6, atol=1e-6)
        assert torch.equal(alone, heads(x[rows], torch.full((int(rows.sum()),), t)))
    # gradients: only the used head, identical either way; a one-task batch leaves the other
    # heads without any gradient (the optimiser skips them)
    heads.zero_grad()
    heads(x[:4], 2).pow(2).sum().backward()
    g_int = heads.weights[2].grad.clone()
    assert all(heads.weights[h].grad is None for h in (0, 1, 3))
    heads.zero_grad()
    heads(x[:4], torch.tensor([2, 2, 2, 2])).pow(2).sum().backward()
    assert torch.equal(g_int, heads.weights[2].grad) and float(g_int.abs().sum()) > 0
    assert all(float(heads.weights[h].grad.abs().sum()) == 0.0 for h in (0, 1, 3))
    with pytest.raises(IndexError, match="no head"):
        heads(x, 4)


def test_finished_heads_do_not_drift_on_adam_momentum():
    """With one parameter per head, a head that no sample uses gets no gradient, so Adam
    (whose momentum would move a weight with a zero gradient) leaves it bit-identical."""
    torch.manual_seed(1)
    heads = MultiHeadLinear(5, 2, 2)
    opt = torch.optim.Adam(heads.parameters(), lr=0.1)
    x = torch.randn(8, 5)
    for task in (0, 0, 1, 1, 1):  # head 0 trains, then only head 1 (no optimiser reset)
        if task == 1 and "head0" not in locals():
            head0 = [p.detach().clone() for p in heads.head(0)]
        opt.zero_grad()
        heads(x, task).pow(2).sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(heads.head(0), head0, strict=True))
    w, b = heads.stacked()
    assert w.shape == (2, 2, 5) and torch.equal(w[1], heads.weights[1]) and b.shape == (2, 2)
    assert [n for n, _ in heads.named_parameters()] == [
        "weights.0", "weights.1", "biases.0", "biases.1"]


# -- PPO host ---------------------------------------------------------------------------------
def _ppo(**kw) -> ContinualPPO:
    env = ContinualEnv(get_sequence("CartPoleSwap", steps_per_task=64), append_task_id=True)
    return ContinualPPO("MlpPolicy", env, num_tasks=2, n_steps=64, batch_size=32, seed=0,
                        policy_kwargs={"net_arch": [16]}, **kw)


def test_ppo_host_selection_is_cached_and_follows_option_and_policy_changes():
    agent = _ppo()
    host = agent.host
    first = host.protected_parameters()
    assert set(first) == {"mlp_extractor.policy_net.0.weight", "mlp_extractor.policy_net.0.bias"}
    first.clear()  # callers get a copy: the cache cannot be mutated from outside
    assert len(host.protected_parameters()) == 2
    assert host.trained_parameters() == list(agent.policy.parameters())
    agent.regularize_critic = True
    assert "mlp_extractor.value_net.0.weight" in host.protected_parameters()
    agent.policy = type(agent.policy)(**agent.policy._get_constructor_parameters())
    new = host.protected_parameters()
    assert all(p is dict(agent.policy.named_parameters())[n] for n, p in new.items())


# -- training-mode switches -------------------------------------------------------------------
def _modes(module: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules(remove_duplicate=False)}


def test_fast_training_mode_sets_the_flags_sb3_sets():
    """Per policy, the flags after set_training_mode(mode) equal those after SB3's own
    implementation (nn.Module.train on the same subtrees); SAC's target critic stays in eval
    mode; a module that overrides train() is still called."""
    from stable_baselines3.common.policies import BasePolicy
    from stable_baselines3.sac.policies import SACPolicy

    from agents.training_mode import set_tree_mode

    seq = get_sequence("PendulumVariants", steps_per_task=64)
    sac = make_agent(RunConfig(sequence=seq.name, agent="sac", net_arch=(8,),
                               agent_options={"buffer_size": 100}), seq.make_env(
        append_task_id=True), seq)
    ppo = _ppo()
    for policy, sb3 in ((sac.policy, SACPolicy.set_training_mode),
                        (ppo.policy, BasePolicy.set_training_mode)):
        for start in (True, False):
            for mode in (True, False, False, True):
                policy.train(start)
                policy.set_training_mode(mode)
                ours = _modes(policy)
                policy.train(start)
                sb3(policy, mode)
                assert ours == _modes(policy)
                assert policy.training is mode
    sac.policy.set_training_mode(True)
    assert sac.policy.actor.training and sac.policy.critic.qf0.head.weights.training
    assert not sac.policy.critic_target.training and not sac.policy.critic_target.qf1.training

    class Custom(torch.nn.Linear):
        calls: list[bool] = []

        def train(self, mode: bool = True):
            self.calls.append(mode)
            return super().train(mode)

    tree = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(Custom(2, 2)))
    set_tree_mode(tree, False)
    assert Custom.calls == [False] and not any(m.training for m in tree.modules())
    with pytest.raises(ValueError, match="bool"):
        set_tree_mode(tree, 1)  # type: ignore[arg-type]


# -- unchecked distributions ----------------------------------------------------------------
def test_unchecked_distributions_give_sb3s_numbers_and_draws_bit_for_bit():
    from stable_baselines3.common.distributions import (
        CategoricalDistribution,
        DiagGaussianDistribution,
        SquashedDiagGaussianDistribution,
        StateDependentNoiseDistribution,
    )

    from agents.distributions import (
        UncheckedCategorical,
        UncheckedDiagGaussian,
        UncheckedSquashedDiagGaussian,
        unchecked,
    )

    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(64, 3, generator=gen, requires_grad=True)
    log_std = torch.randn(3, generator=gen, requires_grad=True)
    logits = torch.randn(64, 5, generator=gen, requires_grad=True)
    cases = [
        (DiagGaussianDistribution(3), UncheckedDiagGaussian, (mean, log_std)),
        (SquashedDiagGaussianDistribution(3, 1e-5), UncheckedSquashedDiagGaussian,
         (mean, log_std)),
        (CategoricalDistribution(5), UncheckedCategorical, (logits,)),
    ]
    for sb3, kind, params in cases:
        ours = unchecked(sb3)
        assert type(ours) is kind and ours.action_dim == sb3.action_dim
        assert getattr(ours, "epsilon", None) == getattr(sb3, "epsilon", None)
        out = []
        for dist in (sb3, ours):
            torch.manual_seed(0)
            d = dist.proba_distribution(*params)
            actions = d.sample()
            lp = dist.log_prob(actions) if kind is not UncheckedSquashedDiagGaussian else \
                dist.log_prob(actions, dist.gaussian_actions)
            ent = d.entropy()
            mode = d.mode()
            grads = torch.autograd.grad(lp.sum(), params)
            out.append((actions, lp, ent, mode, grads))
        assert ours.distribution._validate_args is False
        assert sb3.distribution._validate_args is True
        for a, b in zip(out[0], out[1], strict=True):
            if isinstance(a, tuple):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
            elif a is None:
                assert b is None
            else:
                assert torch.equal(a, b)
    sde = StateDependentNoiseDistribution(2)
    assert unchecked(sde) is sde  # no unchecked version: kept as is


def test_multi_head_policies_use_unchecked_distributions_single_head_keeps_sb3s():
    from stable_baselines3.common.distributions import (
        CategoricalDistribution,
        SquashedDiagGaussianDistribution,
    )

    from agents.distributions import UncheckedCategorical, UncheckedSquashedDiagGaussian

    assert type(_ppo().policy.action_dist) is UncheckedCategorical
    assert type(_ppo(multi_head=False).policy.action_dist) is CategoricalDistribution
    seq = get_sequence("PendulumVariants", steps_per_task=64)
    for multi, kind in ((True, UncheckedSquashedDiagGaussian),
                        (False, SquashedDiagGaussianDistribution)):
        sac = make_agent(RunConfig(sequence=seq.name, agent="sac", net_arch=(8,),
                                   agent_options={"buffer_size": 100, "multi_head": multi}),
                         seq.make_env(append_task_id=True), seq)
        assert type(sac.actor.action_dist) is kind


# -- RL method defaults -------------------------------------------------------------------------
def test_rl_defaults_reach_the_strategy_and_user_options_win():
    seq = get_sequence("CartPoleSwap", steps_per_task=64)
    env = seq.make_env(append_task_id=True)
    base = RunConfig(sequence="CartPoleSwap", agent="ppo", net_arch=(16,),
                     agent_options={"n_steps": 64, "batch_size": 16})
    ewc = make_agent(base.replace(method="ewc"), env, seq)
    assert ewc.strategy.lam == RL_METHOD_DEFAULTS["ppo"]["ewc"]["lam"]
    mine = make_agent(base.replace(method="ewc", method_options={"ewc": {"lam": 3.0}}), env, seq)
    assert mine.strategy.lam == 3.0
    agem = make_agent(base.replace(method="agem"), env, seq)
    assert agem.strategy.batch_size == 16  # the agent's own minibatch
    assert rl_method_options("sac", "l2") == {"lam": 1e5}
    assert rl_method_options("sac", "agem", {"batch_size": 7})["batch_size"] == 7
    assert agent_batch_size("ppo", {}) == 64 and agent_batch_size("sac", {}) == 256
    with pytest.raises(ValueError, match="unknown agent"):
        rl_method_options("dqn", "l2")


def test_wandb_weave_suggestion_is_switched_off(tmp_path, capsys, monkeypatch):
    """wandb mistakes our `agents` package for the OpenAI Agents SDK and prints a Weave
    advert at init; the tracker sets wandb's documented switch."""
    from crl.tracking import RunTracker

    monkeypatch.delenv("WANDB_DISABLE_WEAVE", raising=False)
    with RunTracker(tmp_path / "run", {"a": 1}, wandb_mode="offline", project="t") as tracker:
        tracker.log({"x": 1.0}, step=1)
    out = capsys.readouterr()
    assert os.environ["WANDB_DISABLE_WEAVE"] == "true"
    assert "Detected [" not in out.out + out.err
