"""The layer path of the importance estimators (crl/strategies/layer_grads.py) against the
per-sample Jacobian path and a plain per-sample autograd loop, on every network family the
product uses (supervised MLP, SAC and PPO MLP policies, the Nature CNN) and on the forward
passes the layer path must refuse or handle specially."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import NatureCNN
from torch import nn
from torch.distributions import Categorical, Independent, Normal

from crl.strategies import importance
from crl.strategies.importance import fisher_diagonal, mas_importance
from crl.strategies.layer_grads import split_parameters
from crl.supervised.models import MLPClassifier
from crl.supervised.trainer import ClassifierHost, TrainerConfig

MODES = ("true", "sampled", "empirical")


def rel_diff(fast: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖fast − ref‖ / ‖ref‖ per parameter (0 where both are 0)."""
    assert fast.keys() == ref.keys()
    out = {}
    for n in ref:
        denom = float(ref[n].norm())
        diff = float((fast[n] - ref[n]).norm())
        out[n] = 0.0 if denom == 0.0 and diff == 0.0 else diff / max(denom, 1e-30)
    return out


def assert_same(fast: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    worst = rel_diff(fast, ref)
    assert max(worst.values()) <= 1e-5, worst
    assert any(float(v.abs().sum()) > 0 for v in ref.values())


def no_jacobian(monkeypatch: pytest.MonkeyPatch, allowed: set[str] | None = None) -> list:
    """Fail if the per-sample Jacobian path runs for any parameter outside ``allowed``."""
    seen: list[list[str]] = []
    real = importance.PerSampleJacobian.__init__

    def init(self, host, scalars, params=None, **kw):
        names = sorted(params or host.protected_parameters())
        seen.append(names)
        if not set(names) <= (allowed or set()):
            raise AssertionError(f"per-sample Jacobians requested for {names}")
        real(self, host, scalars, params, **kw)

    monkeypatch.setattr(importance.PerSampleJacobian, "__init__", init)
    return seen


# -- hosts -----------------------------------------------------------------------------------
class ModuleHost:
    """A network + fixed batches; ``dist`` maps the module's output to a distribution."""

    def __init__(self, module, batches, dist, protected=None):
        self.module = module
        self.batches = batches
        self.dist = dist
        self.protected = protected

    def protected_parameters(self):
        named = dict(self.module.named_parameters())
        return {n: named[n] for n in (self.protected or named)}

    def trained_parameters(self):
        return list(self.module.parameters())

    def importance_batches(self):
        return iter(self.batches)

    def output_distribution(self, batch):
        return self.dist(self.module, batch)


def categorical(module, batch):
    return Categorical(logits=module(batch["x"]), validate_args=False)


def fisher_all_modes(host, **kw):
    return {m: fisher_diagonal(host, m, target_key="y", seed=3, **kw) for m in MODES}


def check_against_jacobians(host, monkeypatch, allowed=None, modes=MODES):
    for mode in modes:
        ref = fisher_diagonal(host, mode, target_key="y", seed=3, fast=False)
        with monkeypatch.context() as m:
            no_jacobian(m, allowed)
            fast = fisher_diagonal(host, mode, target_key="y", seed=3)
        assert_same(fast, ref)
    ref = mas_importance(host, fast=False)
    with monkeypatch.context() as m:
        no_jacobian(m, allowed)
        fast = mas_importance(host)
    assert_same(fast, ref)


# -- network families ------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 3])
def test_supervised_mlp_matches_per_sample_jacobians(heads, monkeypatch):
    torch.manual_seed(0)
    model = MLPClassifier(in_features=20, hidden=(32, 16), n_heads=heads, head_outputs=4)
    host = ClassifierHost(model, TrainerConfig(), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    data = [
        {"x": torch.randn(n, 20, generator=g), "y": torch.randint(0, 4, (n,), generator=g),
         "task": torch.randint(0, heads, (n,), generator=g)}
        for n in (16, 7)
    ]
    host.importance_batches = lambda: iter(data)
    check_against_jacobians(host, monkeypatch)


def _sac_agent(multi_head: bool):
    from agents.sac import ContinualSAC
    from envs.continual import ContinualEnv
    from envs.registry import get_sequence

    env = ContinualEnv(get_sequence("PendulumVariants", steps_per_task=120), append_task_id=True)
    agent = ContinualSAC(
        "MlpPolicy", env, num_tasks=4, multi_head=multi_head, exploration_steps=60,
        policy_kwargs=dict(net_arch=[32, 32]), batch_size=32, buffer_size=1000, seed=0,
        strategy="ewc", importance_samples=96, importance_batch_size=40,
    )
    agent.start_task(0)
    agent.learn(120)
    return agent


@pytest.mark.parametrize("multi_head", [True, False])
def test_sac_actor_matches_per_sample_jacobians(multi_head, monkeypatch):
    agent = _sac_agent(multi_head)
    host = agent.host
    # the actor's own batches, fixed once (task_batches draws a fresh subset per call)
    batches = [dict(b) for b in agent.task_batches()]
    for b in batches:
        b["y"] = b["actions"]
    host.importance_batches = lambda: iter(batches)
    if not multi_head:
        assert {"actor.mu.weight", "actor.log_std.weight"} <= set(host.protected_parameters())
    # empirical: the stored (squashed) actions, atanh-ed into the pre-squash Gaussian, as EWC would
    check_against_jacobians(host, monkeypatch)


def _ppo_agent(sequence: str, multi_head: bool):
    from agents.ppo import ContinualPPO
    from envs.continual import ContinualEnv
    from envs.registry import get_sequence

    env = ContinualEnv(get_sequence(sequence, steps_per_task=64), append_task_id=True)
    n_tasks = len(get_sequence(sequence, steps_per_task=64).tasks)
    agent = ContinualPPO(
        "MlpPolicy", env, num_tasks=n_tasks, multi_head=multi_head, strategy="ewc",
        policy_kwargs=dict(net_arch=[32, 32]), n_steps=64, batch_size=32, n_epochs=1, seed=0,
    )
    agent.start_task(0)
    agent.learn(64)
    batches = [dict(b) for b in agent.task_batches()]
    for b in batches:
        b["y"] = b["actions"].long() if sequence == "CartPoleSwap" else b["actions"]
    agent.host.importance_batches = lambda: iter(batches)
    return agent


def test_ppo_discrete_multi_head_matches_per_sample_jacobians(monkeypatch):
    agent = _ppo_agent("CartPoleSwap", True)
    check_against_jacobians(agent.host, monkeypatch)


def test_ppo_gaussian_single_head_sends_only_log_std_to_jacobians(monkeypatch):
    agent = _ppo_agent("PendulumVariants", False)
    assert "log_std" in agent.host.protected_parameters()
    # log_std is a bare parameter, not a layer's: it alone takes the per-sample Jacobians
    check_against_jacobians(agent.host, monkeypatch, allowed={"log_std"})


def test_nature_cnn_matches_per_sample_jacobians(monkeypatch):
    torch.manual_seed(0)
    space = spaces.Box(0, 255, (4, 84, 84), np.uint8)
    module = nn.Sequential(NatureCNN(space, features_dim=512), nn.Linear(512, 6))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 4, 84, 84), generator=g).float() / 255.0
    batches = [{"x": x, "y": torch.tensor([0, 5, 2])}]
    host = ModuleHost(module, batches, categorical)
    names = set(host.protected_parameters())
    fast, rest = split_parameters(module, sorted(names))
    assert rest == [] and {"0.cnn.0.weight", "0.linear.0.weight"} <= set(fast)
    check_against_jacobians(host, monkeypatch)


# -- forward passes the layer path handles specially ------------------------------------------
def brute(host, mode_scalars, reduce):
    """Per-sample autograd on the real parameters: the reference for unusual forwards."""
    params = host.protected_parameters()
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for batch in host.importance_batches():
        rows = next(iter(batch.values())).shape[0]
        for i in range(rows):
            sample = {k: v[i : i + 1] for k, v in batch.items()}
            out = mode_scalars(host.output_distribution(sample), None).reshape(-1)
            for s in range(out.numel()):
                grads = torch.autograd.grad(out[s], list(params.values()), retain_graph=True,
                                            allow_unused=True)
                for n, gr in zip(params, grads, strict=True):
                    if gr is not None:
                        acc[n] += reduce(gr)
            count += 1
    return {n: a / count for n, a in acc.items()}


class TwiceNet(nn.Module):
    """The same Linear applied twice, and a Linear over a sequence axis."""

    def __init__(self):
        super().__init__()
        self.square = nn.Linear(5, 5)
        self.seq = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.square(torch.tanh(self.square(x))))  # (B, 5)
        steps = torch.stack([h, h * h, -h], dim=1)  # (B, 3, 5)
        return self.seq(steps).mean(1)  # (B, 3)


def test_layers_used_twice_or_over_positions(monkeypatch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    host = ModuleHost(TwiceNet(), [{"x": torch.randn(9, 5, generator=g)}], categorical)
    with monkeypatch.context() as m:
        no_jacobian(m)
        fast = fisher_diagonal(host, "true")
        mas = mas_importance(host)
    assert_same(fast, brute(host, importance.fisher_scalars("true"), torch.square))
    assert_same(mas, brute(host, importance.mas_scalars, torch.abs))
    # and the formula is not the factorised one: summing positions first matters here
    assert fast["seq.weight"].shape == (3, 5)


@pytest.mark.parametrize(
    "conv", [dict(stride=2, padding=1), dict(stride=1, padding=2, dilation=2), dict(bias=False)]
)
def test_conv_variants_match_brute_force(conv, monkeypatch):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(2, 3, 3, **conv), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, 7, 7, generator=g)
    module(x)  # materialise the lazy layer
    host = ModuleHost(module, [{"x": x}], categorical)
    with monkeypatch.context() as m:
        no_jacobian(m)
        fast = fisher_diagonal(host, "true", budget=50)  # several row chunks per layer
    assert_same(fast, brute(host, importance.fisher_scalars("true"), torch.square))


class InplaceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


class FoldedNet(nn.Module):
    """Folds a sequence axis into the batch axis: a layer sees B*T rows, not B."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):  # (B, T, 4)
        b, t, _ = x.shape
        return self.a(x.reshape(b * t, 4)).reshape(b, t, 3).sum(1)


@pytest.mark.parametrize("net,shape", [(InplaceNet, (8, 4)), (FoldedNet, (8, 2, 4))])
def test_forwards_the_layer_path_cannot_follow_fall_back(net, shape):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    host = ModuleHost(net(), [{"x": torch.randn(*shape, generator=g)}], categorical)
    ref = fisher_diagonal(host, "true", fast=False)
    with pytest.warns(RuntimeWarning, match="layer path cannot run"):
        fast = fisher_diagonal(host, "true")
    assert_same(fast, ref)


def test_tied_and_frozen_parameters(monkeypatch):
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 4), nn.Linear(4, 4)
    dec.weight = enc.weight  # tied: its per-sample gradient sums two uses
    module = nn.Sequential(enc, nn.Tanh(), dec)
    for p in module.parameters():
        p.requires_grad_(False)  # PackNet-style frozen: importance still measures them
    g = torch.Generator().manual_seed(6)
    host = ModuleHost(module, [{"x": torch.randn(7, 4, generator=g)}], categorical)
    fast_names, rest = split_parameters(module, list(host.protected_parameters()))
    assert "0.weight" in rest and "0.bias" in fast_names and "2.bias" in fast_names
    ref = fisher_diagonal(host, "true", fast=False)
    with monkeypatch.context() as m:
        no_jacobian(m, allowed=set(rest))
        fast = fisher_diagonal(host, "true")
    assert_same(fast, ref)
    assert all(p.grad is None for p in module.parameters())


def test_gaussian_head_hand_computed():
    """μ = W x (1x1), σ = 1 fixed, two samples x = 1 and x = 2: the true Fisher of W is
    mean(x²)/σ² = 2.5; MAS of W is mean |∂(μ²)/∂W| = mean 2|W| x² = 5|W|."""
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(-0.7)

    def gauss(module, batch):
        return Independent(Normal(module(batch["x"]), torch.ones(2, 1)), 1)

    host = ModuleHost(lin, [{"x": torch.tensor([[1.0], [2.0]])}], gauss)
    fisher = fisher_diagonal(host, "true")
    torch.testing.assert_close(fisher["weight"], torch.tensor([[2.5]]))
    mas = mas_importance(host)
    torch.testing.assert_close(mas["weight"], torch.tensor([[3.5]]))


def test_fast_path_quiet_on_supported_networks():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    host = ModuleHost(module, [{"x": torch.randn(5, 3), "y": torch.tensor([0, 1, 1, 0, 1])}],
                      categorical)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher_all_modes(host)


def test_targets_of_the_wrong_size_are_refused():
    module = nn.Linear(3, 2)
    host = ModuleHost(module, [{"x": torch.randn(4, 3), "y": torch.zeros(4, 2).long()}],
                      categorical)
    with pytest.raises(RuntimeError, match=r"targets have shape \(4, 2\).*target_key"):
        fisher_diagonal(host, "empirical")
    # SB3's (B, 1) discrete actions are one target per sample: accepted, no cross terms
    host.batches = [{"x": torch.randn(4, 3), "y": torch.tensor([[0], [1], [1], [0]])}]
    column = fisher_diagonal(host, "empirical")
    host.batches = [{"x": host.batches[0]["x"], "y": torch.tensor([0, 1, 1, 0])}]
    assert_same(column, fisher_diagonal(host, "empirical"))


def test_sac_empirical_fisher_scores_the_squashed_actions_before_the_squash():
    """SAC's stored actions are tanh-squashed; its output distribution is the pre-squash
    Gaussian. The empirical Fisher must score atanh(a) there (log pi(a) = log N(atanh a) -
    log|J|, and J does not depend on the weights): checked against a per-sample autograd loop."""
    agent = _sac_agent(multi_head=False)
    host = agent.host
    batch = dict(next(iter(agent.task_batches())))
    batch["y"] = batch["actions"]
    assert batch["y"].abs().max() > 0.5  # far enough from 0 that atanh(a) != a matters
    fisher = fisher_diagonal(host, "empirical", batches=[batch], target_key="y")
    params = host.protected_parameters()
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    n = batch["obs"].shape[0]
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        dist = host.output_distribution(one)
        eps = torch.finfo(one["y"].dtype).eps  # SB3's TanhBijector.inverse clamps there
        u = torch.atanh(one["y"].clamp(-1 + eps, 1 - eps))
        grads = torch.autograd.grad(dist.log_prob(u).sum(), list(params.values()),
                                    allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                expected[name] += g.square() / n
    for name in params:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-3, atol=1e-7)
