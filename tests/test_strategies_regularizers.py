"""Finetune, L2, EWC, MAS and the per-sample importance estimators, on hosts tiny enough to
compute the expected numbers by hand (closed forms) or by a brute-force autograd loop."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    Normal,
    TanhTransform,
    TransformedDistribution,
)

from crl.strategies import make_strategy
from crl.strategies.ewc import EWC
from crl.strategies.finetune import Finetune
from crl.strategies.importance import fisher_diagonal, mas_importance, per_sample_grads
from crl.strategies.l2 import L2
from crl.strategies.mas import MAS


@pytest.fixture(autouse=True)
def float64():
    """Hand-computed comparisons to 1e-10; restored so other test modules keep float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# -- test hosts ----------------------------------------------------------------------------
class SoftmaxHost:
    """Softmax regression: logits = W x + b, Categorical output."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, classes: int = 2) -> None:
        self.module = nn.Linear(x.shape[1], classes)
        self.x, self.y = x, y

    def protected_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.module.named_parameters())

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def importance_batches(self):
        # two batches of unequal size: the mean must be over samples, not batches
        for sl in (slice(0, 1), slice(1, None)):
            batch = {"x": self.x[sl]}
            if self.y is not None:
                batch["y"] = self.y[sl]
            yield batch

    def output_distribution(self, batch):
        return Categorical(logits=self.module(batch["x"]), validate_args=False)

    def loss(self, batch):
        return nn.functional.cross_entropy(self.module(batch["x"]), batch["y"])

    def probs(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.module(self.x), -1)


class GaussianModule(nn.Module):
    """mean = A x + c; log std = D x + e (linear std) or = e (state-independent)."""

    def __init__(self, dim: int, act: int, linear_std: bool) -> None:
        super().__init__()
        self.mean = nn.Linear(dim, act)
        self.log_std = nn.Linear(dim, act) if linear_std else None
        self.e = nn.Parameter(torch.tensor([0.3, -0.5][:act]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_std = self.e if self.log_std is None else self.log_std(x) + self.e
        return self.mean(x), log_std.expand(x.shape[0], -1).exp()


class GaussianHost(SoftmaxHost):
    def __init__(self, x: torch.Tensor, linear_std: bool = False, independent: bool = True):
        self.module = GaussianModule(x.shape[1], 2, linear_std)
        self.x, self.y, self.independent, self.squash = x, None, independent, False

    def output_distribution(self, batch):
        mu, std = self.module(batch["x"])
        dist = Normal(mu, std, validate_args=False)
        if self.squash:
            return TransformedDistribution(
                Independent(dist, 1, validate_args=False), [TanhTransform()], validate_args=False
            )
        return Independent(dist, 1, validate_args=False) if self.independent else dist

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.module(self.x)


class BranchyHost(SoftmaxHost):
    """Data-dependent control flow: vmap cannot run it, the fallback loop must."""

    def output_distribution(self, batch):
        logits = self.module(batch["x"])
        if logits.sum() > 1e9:  # never true, but a Python bool of a tensor breaks vmap
            logits = logits * 0
        return Categorical(logits=logits, validate_args=False)


class BernoulliHost(SoftmaxHost):
    def output_distribution(self, batch):
        return Bernoulli(logits=self.module(batch["x"])[:, 0], validate_args=False)


def make_x(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def set_params(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def brute_force(host, scalar_grads) -> dict[str, torch.Tensor]:
    """Per-sample loop with plain autograd on the real parameters (reference)."""
    params = host.protected_parameters()
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    n = 0
    for batch in host.importance_batches():
        for i in range(batch["x"].shape[0]):
            sample = {k: v[i : i + 1] for k, v in batch.items()}
            for name, g in scalar_grads(host, sample, params).items():
                acc[name] += g
            n += 1
    return {k: v / n for k, v in acc.items()}


def true_fisher_brute(host, sample, params):
    log_p = host.output_distribution(sample).logits[0]
    p = log_p.detach().exp()
    out = {n: torch.zeros_like(q) for n, q in params.items()}
    for y in range(log_p.shape[0]):
        grads = torch.autograd.grad(log_p[y], list(params.values()), retain_graph=True)
        for n, g in zip(params, grads, strict=True):
            out[n] += p[y] * g**2
    return out


def mas_brute(host, sample, params):
    mu, std = host.module(sample["x"])
    grads = torch.autograd.grad((mu**2).sum() + (std**2).sum(), list(params.values()))
    return {n: g.abs() for n, g in zip(params, grads, strict=True)}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol=1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=f"param {k}")


# -- Fisher ---------------------------------------------------------------------------------
def softmax_fisher_closed_form(host: SoftmaxHost) -> dict[str, torch.Tensor]:
    # d log p_y / dW_kj = (δ_yk − p_k) x_j; Σ_y p_y (δ_yk − p_k)² = p_k (1 − p_k)
    p, x = host.probs(), host.x
    v = p * (1 - p)  # (N, K)
    return {"weight": torch.einsum("nk,nj->kj", v, x**2) / len(x), "bias": v.mean(0)}


def test_true_fisher_softmax_matches_closed_form_and_brute_force():
    host = SoftmaxHost(make_x(5))
    set_params(host.module, 1)
    fisher = fisher_diagonal(host)
    assert_close(fisher, softmax_fisher_closed_form(host))
    assert_close(fisher, brute_force(host, true_fisher_brute))


def test_true_fisher_three_classes_closed_form():
    host = SoftmaxHost(make_x(4), classes=3)
    set_params(host.module, 2)
    assert_close(fisher_diagonal(host), softmax_fisher_closed_form(host))


def test_empirical_fisher_uses_data_labels():
    x, y = make_x(5), torch.tensor([0, 1, 1, 0, 1])
    host = SoftmaxHost(x, y)
    set_params(host.module, 3)
    r = nn.functional.one_hot(y, 2) - host.probs()  # (δ_yk − p_k) per sample
    expected = {"weight": torch.einsum("nk,nj->kj", r**2, x**2) / 5, "bias": (r**2).mean(0)}
    assert_close(fisher_diagonal(host, "empirical"), expected)
    with pytest.raises(KeyError, match="target_key"):
        fisher_diagonal(host, "empirical", target_key="label")


def test_sampled_fisher_is_seeded_and_unbiased():
    x = make_x(1).repeat(4000, 1)
    host = SoftmaxHost(x)
    set_params(host.module, 4)
    a = fisher_diagonal(host, "sampled", seed=1)
    assert_close(a, fisher_diagonal(host, "sampled", seed=1), tol=0)
    assert not torch.equal(a["bias"], fisher_diagonal(host, "sampled", seed=2)["bias"])
    # each draw gives (δ_yk − p_k)²: its mean over 4000 draws is p(1−p) within ~5%
    assert_close(a, softmax_fisher_closed_form(host), tol=0.05)


def test_gaussian_fisher_state_independent_std():
    x = make_x(6)
    host = GaussianHost(x, linear_std=False)
    set_params(host.module, 5)
    _, std = host.mean_std()
    s2 = std[0] ** 2  # same for every sample
    # μ_a = A_a·x + c_a: (dμ_a/dA_aj)² / σ_a² = x_j² / σ_a²
    # σ_a = exp(e_a): 2 (dσ_a/de_a)² / σ_a² = 2
    expected = {
        "mean.weight": (x**2).mean(0)[None, :] / s2[:, None],
        "mean.bias": 1 / s2,
        "e": torch.full((2,), 2.0),
    }
    assert_close(fisher_diagonal(host), expected)
    # a plain Normal (no Independent) is the same diagonal Gaussian
    host.independent = False
    assert_close(fisher_diagonal(host), expected)
    # tanh squashing is invertible: the Fisher is that of the pre-tanh Gaussian
    host.squash = True
    assert_close(fisher_diagonal(host), expected)


def test_gaussian_sampled_and_empirical_fisher():
    x = make_x(1).repeat(4000, 1)
    host = GaussianHost(x)
    set_params(host.module, 27)
    mu, std = host.mean_std()
    s2 = std[0] ** 2
    # d log N(a; μ, σ)/dc = (a − μ)/σ², d/de = (a − μ)²/σ² − 1: expectations 1/σ² and 2
    expected = {
        "mean.weight": x[0] ** 2 / s2[:, None],
        "mean.bias": 1 / s2,
        "e": torch.full((2,), 2.0),
    }
    assert_close(fisher_diagonal(host, "sampled", seed=0), expected, tol=0.2)
    host.x = x[:3]
    host.y = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 0.4]])  # actions taken
    r = (host.y - mu[:3]) / s2  # (a − μ)/σ² per sample
    hand = {
        "mean.weight": (r**2).mean(0)[:, None] * x[0] ** 2,
        "mean.bias": (r**2).mean(0),
        "e": (((host.y - mu[:3]) ** 2 / s2 - 1) ** 2).mean(0),
    }
    assert_close(fisher_diagonal(host, "empirical"), hand)


def test_gaussian_fisher_linear_std():
    x = make_x(6)
    host = GaussianHost(x, linear_std=True)
    set_params(host.module, 6)
    _, std = host.mean_std()
    inv = 1 / std**2  # (N, A)
    # log σ_a = D_a·x + f_a + e_a: dσ_a/dD_aj = σ_a x_j, so 2 (σ_a x_j)² / σ_a² = 2 x_j²
    expected = {
        "mean.weight": torch.einsum("na,nj->aj", inv, x**2) / 6,
        "mean.bias": inv.mean(0),
        "log_std.weight": 2 * (x**2).mean(0)[None, :].expand(2, 2),
        "log_std.bias": torch.full((2,), 2.0),
        "e": torch.full((2,), 2.0),
    }
    assert_close(fisher_diagonal(host), expected)


def test_vmap_loop_and_fallback_agree():
    host = SoftmaxHost(make_x(5), classes=3)
    set_params(host.module, 7)
    vmapped = fisher_diagonal(host, fast=False)
    assert_close(fisher_diagonal(host, vectorize=False, fast=False), vmapped)
    branchy = BranchyHost(host.x, classes=3)
    branchy.module = host.module
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert_close(fisher_diagonal(branchy, fast=False), vmapped)
    # the layer path runs the host's code on the whole batch: no vmap, no fallback
    assert_close(fisher_diagonal(branchy), vmapped)
    gauss = GaussianHost(make_x(5), linear_std=True)
    set_params(gauss.module, 8)
    looped = mas_importance(gauss, vectorize=False, fast=False)
    assert_close(mas_importance(gauss, fast=False), looped)
    assert_close(mas_importance(gauss), looped)


def test_chunking_and_max_samples():
    host = SoftmaxHost(make_x(7))
    set_params(host.module, 9)
    full = fisher_diagonal(host)
    assert_close(fisher_diagonal(host, budget=1), full)  # one sample per chunk
    capped = fisher_diagonal(host, max_samples=3)
    first3 = SoftmaxHost(host.x[:3])
    first3.module = host.module
    assert_close(capped, softmax_fisher_closed_form(first3))


def test_importance_leaves_the_module_untouched():
    host = SoftmaxHost(make_x(4))
    host.module.train()
    before = {k: v.clone() for k, v in host.module.state_dict().items()}
    fisher_diagonal(host)
    mas_importance(host)
    assert host.module.training
    assert all(p.grad is None for p in host.module.parameters())
    for k, v in host.module.state_dict().items():
        assert torch.equal(v, before[k])


def test_per_sample_grads_shape_and_values():
    host = SoftmaxHost(make_x(3))
    set_params(host.module, 10)
    grads = per_sample_grads(
        host, {"x": host.x}, lambda d, _: d.logits[..., 0].reshape(-1)
    )  # d log p_0 / dW_kj = (δ_0k − p_k) x_j
    assert grads["weight"].shape == (3, 1, 2, 2)
    expected = (torch.tensor([1.0, 0.0]) - host.probs())[:, :, None] * host.x[:, None, :]
    torch.testing.assert_close(grads["weight"][:, 0], expected)


def test_unsupported_distribution_and_empty_data():
    host = BernoulliHost(make_x(3))
    with pytest.raises(TypeError, match="Bernoulli.*Categorical, Normal"):
        fisher_diagonal(host)
    with pytest.raises(TypeError, match="Bernoulli"):
        make_strategy("mas").bind(host).on_task_end(0)
    empty = SoftmaxHost(make_x(3))
    empty.importance_batches = lambda: iter([])
    with pytest.raises(RuntimeError, match="no samples"):
        fisher_diagonal(empty)


# -- MAS ------------------------------------------------------------------------------------
def test_mas_omega_is_mean_of_absolute_per_sample_grads():
    host = GaussianHost(make_x(6), linear_std=True)
    set_params(host.module, 11)
    assert_close(mas_importance(host), brute_force(host, mas_brute))


def test_mas_differs_from_abs_of_batch_gradient():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    host = GaussianHost(x)
    with torch.no_grad():
        host.module.mean.weight.copy_(torch.eye(2))
        host.module.mean.bias.zero_()
    # μ = ±(1, 0): d‖f‖²/dc = 2μ = ±(2, 0); per-sample |.| averages to (2, 0), the batch
    # gradient's signs cancel to 0
    omega = mas_importance(host)
    torch.testing.assert_close(omega["mean.bias"], torch.tensor([2.0, 0.0]))
    mu, std = host.module(x)
    batch_loss = ((mu**2).sum(1) + (std**2).sum(1)).mean()
    batch_grad = torch.autograd.grad(batch_loss, host.module.mean.bias)
    torch.testing.assert_close(batch_grad[0].abs(), torch.zeros(2))


def test_mas_categorical_uses_log_probabilities():
    host = SoftmaxHost(make_x(4), classes=3)
    set_params(host.module, 12)

    def grads(h, sample, params):
        log_p = h.output_distribution(sample).logits
        g = torch.autograd.grad((log_p**2).sum(), list(params.values()))
        return {n: v.abs() for n, v in zip(params, g, strict=True)}

    assert_close(mas_importance(host), brute_force(host, grads))


# -- strategies -----------------------------------------------------------------------------
def finish_task(strategy, host, task: int) -> None:
    strategy.on_task_start(task)
    strategy.on_task_end(task)


def displace(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for n, p in module.named_parameters():
            out[n] = torch.randn(p.shape, generator=g)
            p.add_(out[n])
    return out


def penalty_and_grad(strategy, host):
    pen = strategy.penalty()
    params = host.protected_parameters()
    grads = torch.autograd.grad(pen, list(params.values()))
    return pen, dict(zip(params, grads, strict=True))


def test_finetune_is_a_no_op():
    s = Finetune()
    assert s.name == "finetune" and isinstance(make_strategy("finetune"), Finetune)
    host = SoftmaxHost(make_x(3))
    s.bind(host)
    finish_task(s, host, 0)
    assert s.penalty() is None
    assert s.state_dict() == {"current_task": 0, "tasks_seen": 1}


def test_l2_penalty_value_gradient_and_anchor():
    host = SoftmaxHost(make_x(3))
    s = L2(lam=0.5).bind(host)
    s.on_task_start(0)
    assert s.penalty() is None  # nothing before the first task ended
    s.on_task_end(0)
    assert s.penalty().item() == 0.0  # exactly 0 at the anchor
    d = displace(host.module, 13)
    pen, grads = penalty_and_grad(s, host)
    torch.testing.assert_close(pen, 0.5 * sum((v**2).sum() for v in d.values()))
    for n, v in d.items():
        torch.testing.assert_close(grads[n], 2 * 0.5 * v)
    # the anchor moves to the end of the next task
    finish_task(s, host, 1)
    assert s.penalty().item() == 0.0


def finished_ewc(lam: float) -> tuple[SoftmaxHost, EWC, dict[str, torch.Tensor]]:
    """EWC after one task on the softmax host, and the task's closed-form Fisher."""
    host = SoftmaxHost(make_x(5))
    set_params(host.module, 14)
    s = EWC(lam=lam).bind(host)
    finish_task(s, host, 0)
    return host, s, softmax_fisher_closed_form(host)


def test_ewc_penalty_uses_fisher_and_is_zero_at_anchor():
    host, s, fisher = finished_ewc(3.0)
    assert s.penalty().item() == 0.0
    d = displace(host.module, 15)
    pen, grads = penalty_and_grad(s, host)
    torch.testing.assert_close(pen, 3.0 * sum((fisher[n] * d[n] ** 2).sum() for n in d))
    for n in d:
        torch.testing.assert_close(grads[n], 2 * 3.0 * fisher[n] * d[n])


def test_ewc_strength_changed_after_construction_and_one_backward_per_penalty():
    host, s, fisher = finished_ewc(3.0)
    d = displace(host.module, 15)
    penalty_and_grad(s, host)  # builds the scales for lam 3
    s.lam = 0.5  # e.g. a schedule: the next penalty must use it
    pen, grads = penalty_and_grad(s, host)
    torch.testing.assert_close(pen, 0.5 * sum((fisher[n] * d[n] ** 2).sum() for n in d))
    for n in d:
        torch.testing.assert_close(grads[n], 2 * 0.5 * fisher[n] * d[n])
    total = s.penalty() * 2.5  # an upstream factor reaches the gradient
    total.backward(retain_graph=True)
    for n, p in host.module.named_parameters():
        torch.testing.assert_close(p.grad, 2.5 * 2 * 0.5 * fisher[n] * d[n])
    with pytest.raises(RuntimeError, match="backward ran twice"):
        total.backward()


def test_online_ewc_decays_the_old_fisher_and_keeps_one_anchor():
    host = SoftmaxHost(make_x(5))
    set_params(host.module, 16)
    s = EWC(lam=1.0, mode="online", gamma=0.25).bind(host)
    finish_task(s, host, 0)
    f1 = softmax_fisher_closed_form(host)
    displace(host.module, 17)
    host.x = make_x(5, seed=1)  # task 1 data
    finish_task(s, host, 1)
    f2 = softmax_fisher_closed_form(host)
    assert len(s.fishers) == 1 and len(s.anchors) == 1
    assert_close(s.fishers[0], {n: 0.25 * f1[n] + f2[n] for n in f1})
    assert s.penalty().item() == 0.0  # the single anchor is the latest parameters


def test_separate_ewc_keeps_two_anchors_and_sums_penalties():
    host = SoftmaxHost(make_x(5))
    set_params(host.module, 18)
    s = EWC(lam=2.0, mode="separate").bind(host)
    finish_task(s, host, 0)
    f1, a1 = softmax_fisher_closed_form(host), {k: v.clone() for k, v in s.anchors[0].items()}
    displace(host.module, 19)
    host.x = make_x(5, seed=2)
    finish_task(s, host, 1)
    f2 = softmax_fisher_closed_form(host)
    a2 = {n: p.detach().clone() for n, p in host.module.named_parameters()}
    assert len(s.fishers) == 2 and len(s.anchors) == 2
    assert_close(s.fishers[0], f1)
    assert_close(s.fishers[1], f2)
    displace(host.module, 20)
    theta = {n: p.detach() for n, p in host.module.named_parameters()}
    pen, grads = penalty_and_grad(s, host)
    expected = sum(
        (f[n] * (theta[n] - a[n]) ** 2).sum() for f, a in ((f1, a1), (f2, a2)) for n in theta
    )
    torch.testing.assert_close(pen, 2.0 * expected)
    for n in theta:
        hand = 2 * 2.0 * (f1[n] * (theta[n] - a1[n]) + f2[n] * (theta[n] - a2[n]))
        torch.testing.assert_close(grads[n], hand)


def test_penalty_for_a_given_fisher_via_state_dict():
    host = SoftmaxHost(make_x(2))
    with torch.no_grad():
        host.module.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        host.module.bias.copy_(torch.tensor([0.5, -0.5]))
    tensor = torch.tensor
    state = EWC().state_dict()
    state.update(
        lam=0.5,
        param_names=["weight", "bias"],
        fishers=[{"weight": tensor([[1.0, 0.0], [2.0, 0.5]]), "bias": tensor([4.0, 0.0])}],
        anchors=[{"weight": tensor([[0.0, 2.0], [2.0, 2.0]]), "bias": tensor([0.0, 9.0])}],
    )
    s = EWC(lam=0.1)
    s.load_state_dict(state)  # λ comes from the checkpoint
    s.bind(host)
    pen, grads = penalty_and_grad(s, host)
    # Σ F (θ − θ*)² = 1·1² + 0·0² + 2·1² + 0.5·2² + 4·0.5² + 0·9.5² = 6; times λ = 0.5
    assert s.lam == 0.5
    torch.testing.assert_close(pen, torch.tensor(3.0))
    # 2 λ F (θ − θ*)
    torch.testing.assert_close(grads["weight"], torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    torch.testing.assert_close(grads["bias"], torch.tensor([2.0, 0.0]))


def test_mas_accumulates_omega_with_one_anchor():
    host = GaussianHost(make_x(5), linear_std=True)
    set_params(host.module, 21)
    s = MAS(lam=0.7).bind(host)
    finish_task(s, host, 0)
    o1 = brute_force(host, mas_brute)
    displace(host.module, 22)
    host.x = make_x(5, seed=3)
    finish_task(s, host, 1)
    o2 = brute_force(host, mas_brute)
    assert_close(s.omega, {n: o1[n] + o2[n] for n in o1})
    assert s.penalty().item() == 0.0
    d = displace(host.module, 23)
    pen, grads = penalty_and_grad(s, host)
    torch.testing.assert_close(pen, 0.7 * sum((s.omega[n] * d[n] ** 2).sum() for n in d))
    for n in d:
        torch.testing.assert_close(grads[n], 2 * 0.7 * s.omega[n] * d[n])


@pytest.mark.parametrize(
    "name,options",
    [
        ("l2", {"lam": 0.3}),
        ("ewc", {"lam": 0.3, "mode": "separate"}),
        ("ewc", {"lam": 0.3, "mode": "online", "gamma": 0.5, "fisher": "sampled"}),
        ("mas", {"lam": 0.3}),
    ],
)
def test_state_dict_round_trip_reproduces_the_penalty(name, options):
    host = SoftmaxHost(make_x(4))
    set_params(host.module, 24)
    s = make_strategy(name, **options).bind(host)
    finish_task(s, host, 0)
    displace(host.module, 25)
    finish_task(s, host, 1)
    displace(host.module, 26)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make_strategy(name, **options)
    fresh.load_state_dict(state)
    fresh.bind(host)
    assert fresh.tasks_seen == 2
    assert torch.equal(fresh.penalty(), s.penalty())


def test_make_strategy_names_and_options():
    s = make_strategy("ewc", lam=2, mode="online", gamma=0.9, fisher="empirical", max_samples=10,
                      seed=3, unrelated=1)
    assert isinstance(s, EWC)
    assert (s.lam, s.mode, s.gamma, s.fisher, s.max_samples, s.seed) == (
        2.0, "online", 0.9, "empirical", 10, 3
    )
    assert isinstance(make_strategy("mas", lam=1, max_samples=5, seed=1), MAS)
    assert isinstance(make_strategy("l2", lam=1, mode="online"), L2)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: L2(lam=-1), r"lam .* >= 0"),
        (lambda: MAS(lam=float("nan")), r"lam .* >= 0"),
        (lambda: EWC(lam=-0.1), r"lam .* >= 0"),
        (lambda: EWC(gamma=0.0), r"gamma .* \(0, 1\]"),
        (lambda: EWC(gamma=1.5), r"gamma .* \(0, 1\]"),
        (lambda: EWC(fisher="diagonal"), r"fisher mode .*true, sampled, empirical"),
        (lambda: EWC(mode="both"), r"separate, online"),
        (lambda: MAS(max_samples=0), r"max_samples"),
    ],
)
def test_bad_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unbound_strategy_and_changed_parameters_raise():
    with pytest.raises(RuntimeError, match="bind"):
        L2().on_task_end(0)
    host = SoftmaxHost(make_x(3))
    s = L2().bind(host)
    finish_task(s, host, 0)
    host.module = nn.Linear(2, 3)
    s.bind(host)
    with pytest.raises(ValueError, match="shape"):
        s.penalty()


def test_no_warnings_on_the_vmap_path():
    host = GaussianHost(make_x(4), linear_std=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher_diagonal(host)
        mas_importance(host)


def test_every_bad_word_of_a_method_is_named_at_once():
    """A YAML with two misspelt words for one method names both (the constructor alone
    stops at the first); one bad word keeps the constructor's own message."""
    from crl.strategies import make_strategy

    with pytest.raises(ValueError) as err:
        make_strategy("ewc", mode="onlin", fisher="emprical")
    assert "unknown ewc mode 'onlin' (choose one of: separate, online)" in str(err.value)
    assert ("unknown ewc fisher 'emprical' (choose one of: true, sampled, empirical)"
            in str(err.value))
    with pytest.raises(ValueError, match="onlin") as one:
        make_strategy("ewc", mode="onlin", fisher="true")
    assert "emprical" not in str(one.value)
    make_strategy("ewc", mode="online", fisher="empirical")  # the right words build
