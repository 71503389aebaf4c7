"""Strategies that see the training batch (SI, LwF, DER/DER++) on hosts small enough to
compute every number by hand, and through the supervised trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crl.strategies import make_strategy
from crl.strategies.der import DER
from crl.strategies.lwf import LwF
from crl.strategies.si import SI


class QuadHost:
    """θ = (a, b), loss (a − 1)² + 2 (b + 1)²."""

    def __init__(self) -> None:
        self.module = nn.ParameterDict({"a": nn.Parameter(torch.tensor(0.0)),
                                        "b": nn.Parameter(torch.tensor(0.0))})

    def protected_parameters(self):
        return dict(self.module.items())

    def trained_parameters(self):
        return list(self.module.values())

    def loss(self, batch=None):
        return (self.module["a"] - 1) ** 2 + 2 * (self.module["b"] + 1) ** 2


class FinalGradQuadHost(QuadHost):
    """QuadHost that declares its gradient final in ``before_optimizer_step`` (SI's
    two-pass form, as in the supervised trainer)."""

    gradients_final_before_step = True


@pytest.mark.parametrize("host_cls", [QuadHost, FinalGradQuadHost])
def test_si_path_integral_by_hand(host_cls):
    host = host_cls()
    si = SI(lam=0.5, xi=0.1).bind(host)
    assert si.sees_final_gradient == (host_cls is FinalGradQuadHost)
    si.on_task_start(0)
    opt = torch.optim.SGD(host.module.values(), lr=0.1)
    a, b, omega_a, omega_b = 0.0, 0.0, 0.0, 0.0
    for _ in range(3):
        opt.zero_grad()
        host.loss().backward()
        si.before_optimizer_step()
        opt.step()
        si.after_optimizer_step()
        ga, gb = 2 * (a - 1), 4 * (b + 1)  # the same steps by hand
        da, db = -0.1 * ga, -0.1 * gb
        omega_a -= ga * da
        omega_b -= gb * db
        a, b = a + da, b + db
    assert float(host.module["a"].detach()) == pytest.approx(a)
    si.on_task_end(0)
    assert float(si.omega["a"]) == pytest.approx(omega_a / (a**2 + 0.1), rel=1e-5)
    assert float(si.omega["b"]) == pytest.approx(omega_b / (b**2 + 0.1), rel=1e-5)
    assert float(si.penalty().detach()) == 0.0  # at the anchor
    with torch.no_grad():
        host.module["a"] += 0.5
    expected = 0.5 * omega_a / (a**2 + 0.1) * 0.25
    assert float(si.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    again = SI(lam=0.5, xi=0.1).bind(host)
    again.load_state_dict(si.state_dict())
    assert float(again.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="xi"):
        SI(xi=0.0)


def test_si_two_pass_refuses_a_gradient_edited_between_the_hooks():
    """A host that declares its gradient final but clips it after the hook would make the
    two-pass form credit g θ_before − g' θ_after: SI must stop, not accumulate it."""
    host = FinalGradQuadHost()
    si = SI().bind(host)
    si.on_task_start(0)
    opt = torch.optim.SGD(host.module.values(), lr=0.1)
    host.loss().backward()
    si.before_optimizer_step()
    torch.nn.utils.clip_grad_norm_(host.module.values(), 0.5)  # edits .grad in place
    opt.step()
    with pytest.raises(RuntimeError, match="gradient changed between"):
        si.after_optimizer_step()


@pytest.mark.parametrize("name,final", [("si+agem", False), ("agem+si", True),
                                        ("si+packnet", False), ("si+redo", True),
                                        ("redo+si", True)])
def test_combination_hands_si_the_final_gradient_only_when_nothing_edits_it_later(name, final):
    """A member whose before_optimizer_step runs after SI's (A-GEM's projection, PackNet's
    masks) may edit .grad: SI must then keep the copy form."""
    host = FinalGradQuadHost()
    options = {"packnet": {"num_tasks": 2}} if "packnet" in name else {}
    s = make_strategy(name, **options).bind(host)
    si = next(m for m in s.members if m.name == "si")
    assert si.sees_final_gradient is final


def test_si_two_pass_equals_the_copy_form_on_the_supervised_trainer():
    """The supervised trainer declares its gradient final: SI's Ω after the first task (same
    trajectory either way: no penalty yet) matches the copy form's up to rounding."""
    from crl.supervised import trainer as tr
    from crl.supervised.models import MLPClassifier

    omegas = []
    for final in (True, False):
        torch.manual_seed(0)
        model = MLPClassifier(in_features=16, hidden=(32, 32), head_outputs=4)
        host = tr.ClassifierHost(model, tr.TrainerConfig(), torch.Generator().manual_seed(0))
        host.gradients_final_before_step = final  # instance attribute over the class's
        si = SI().bind(host)
        assert si.sees_final_gradient is final
        si.on_task_start(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for update in range(40):
            batch = {"x": torch.randn(32, 16, generator=g),
                     "y": torch.randint(0, 4, (32,), generator=g),
                     "task": torch.zeros(32, dtype=torch.long)}
            tr._train_step(host, si, opt, batch, 0, update + 1)
        si.on_task_end(0)
        assert si.omega is not None
        omegas.append(si.omega)
    for n in omegas[0]:
        assert float(omegas[0][n].abs().max()) > 0
        torch.testing.assert_close(omegas[0][n], omegas[1][n], rtol=1e-3, atol=1e-6)


class HeadsHost:
    """Linear trunk (2 -> 2) and one linear head (2 -> 3) per task; batches carry ``task``."""

    def __init__(self, n_tasks: int = 2) -> None:
        torch.manual_seed(0)
        self.module = nn.ModuleDict({
            "trunk": nn.Linear(2, 2),
            "heads": nn.ModuleList(nn.Linear(2, 3) for _ in range(n_tasks)),
        })
        self.x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))

    def protected_parameters(self):
        return {n: p for n, p in self.module.named_parameters() if n.startswith("trunk")}

    def trained_parameters(self):
        return list(self.module.parameters())

    def logits(self, batch):
        h = self.module["trunk"](batch["x"])
        out = torch.stack([head(h) for head in self.module["heads"]], 1)
        return out[torch.arange(len(h)), batch["task"]]

    def output_distribution(self, batch):
        return torch.distributions.Categorical(logits=self.logits(batch), validate_args=False)

    def loss(self, batch):
        return F.cross_entropy(self.logits(batch), batch["y"])

    multi_head = True

    def with_task(self, batch, task):
        return {**batch, "task": torch.full_like(batch["task"], task)}


def kl_by_hand(old_logits, new_logits, temperature):
    p = torch.softmax(old_logits / temperature, -1)
    logp = torch.log_softmax(old_logits / temperature, -1)
    logq = torch.log_softmax(new_logits / temperature, -1)
    return float((p * (logp - logq)).sum(-1).mean().detach()) * temperature**2


def test_lwf_distils_the_earlier_heads_on_the_current_inputs():
    host = HeadsHost()
    lwf = LwF(lam=3.0, temperature=2.0).bind(host)
    lwf.on_task_start(0)
    lwf.on_task_end(0)
    lwf.on_task_start(1)
    batch = {"x": host.x, "y": torch.zeros(5, dtype=torch.long), "task": torch.ones(5).long()}
    assert abs(float(lwf.penalty(batch).detach())) < 1e-7  # unchanged model
    with torch.no_grad():
        old0 = host.logits(host.with_task(batch, 0)).clone()
        host.module["trunk"].weight.add_(0.3)
        host.module["heads"][1].weight.add_(5.0)  # the current head does not enter
    new0 = host.logits(host.with_task(batch, 0))
    pen = lwf.penalty(batch)
    assert float(pen.detach()) == pytest.approx(3.0 * kl_by_hand(old0, new0, 2.0), rel=1e-4)
    pen.backward()
    assert host.module["trunk"].weight.grad.abs().sum() > 0
    assert float(host.module["heads"][1].weight.grad.abs().sum()) == 0.0
    again = LwF(lam=3.0, temperature=2.0).bind(host)
    again.load_state_dict(lwf.state_dict())
    again.on_task_start(1)
    assert float(again.penalty(batch).detach()) == pytest.approx(float(pen.detach()), rel=1e-6)


def test_der_and_der_plus_plus_terms_by_hand():
    host = HeadsHost(n_tasks=1)
    der = DER(memory_size=100, batch_size=100, alpha=0.7, beta=0.0, seed=0).bind(host)
    plus = DER(memory_size=100, batch_size=100, alpha=0.7, beta=0.4, seed=0).bind(host)
    batch = {"x": host.x, "y": torch.tensor([0, 1, 2, 0, 1]), "task": torch.zeros(5).long()}
    for s in (der, plus):
        s.on_task_start(0)
        assert s.penalty(batch) is None  # empty memory; the batch is stored now
    stored = torch.log_softmax(host.logits(batch).detach(), -1)
    assert len(der.memory) == 5
    with torch.no_grad():
        host.module["trunk"].weight.mul_(1.5)
    now = torch.log_softmax(host.logits(batch), -1).detach()
    expected = 0.7 * float((now - stored).square().sum(1).mean())
    # no batch: nothing added; 100 > 5 stored, so the whole memory is sampled
    assert float(der.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    ce = float(F.cross_entropy(host.logits(batch), batch["y"]).detach())
    assert float(plus.penalty().detach()) == pytest.approx(expected + 0.4 * ce, rel=1e-5)
    again = DER(memory_size=100, batch_size=100, alpha=0.7, beta=0.4, seed=0).bind(host)
    again.load_state_dict(plus.state_dict())
    assert len(again.memory) == 5 and again.kind == "categorical"


@pytest.mark.parametrize("method", ["si", "lwf", "der"])
def test_batch_strategies_change_supervised_training(method, tiny_mnist):
    from crl.supervised.benchmarks import make_benchmark
    from crl.supervised.models import MLPClassifier
    from crl.supervised.trainer import TrainerConfig, run_sequence

    bench = make_benchmark("split-mnist", tiny_mnist, scenario="task-il", num_tasks=2, seed=0)
    config = TrainerConfig(batch_size=32, progress=False, plasticity=False)
    weights = {}
    for m in ("finetune", method):
        torch.manual_seed(0)
        model = MLPClassifier(in_features=784, hidden=(16,), n_heads=2, head_outputs=2)
        first = {}

        def keep(i, accs, updates, plasticity, model=model, first=first):
            if i == 0:
                first.update({n: p.detach().clone() for n, p in model.named_parameters()})

        run_sequence(bench, model, make_strategy(m, num_tasks=2, seed=0), config,
                     on_task_end=keep)
        weights[m] = (first, {n: p.detach().clone() for n, p in model.named_parameters()})
    (ft_first, ft_end), (first, end) = weights["finetune"], weights[method]
    if method in ("si", "lwf"):  # nothing acts during the first task
        assert all(torch.equal(ft_first[n], first[n]) for n in first)
    # the penalty acts on the second task: the trunk ends elsewhere than finetune's
    assert not torch.allclose(ft_end["trunk.0.weight"], end["trunk.0.weight"])


def test_make_strategy_builds_the_batch_methods():
    assert isinstance(make_strategy("si", lam=2.0), SI)
    assert isinstance(make_strategy("lwf", temperature=1.0), LwF)
    assert make_strategy("der", beta=0.5).beta == 0.5


def test_bc_clones_earlier_policies_on_ppo_and_sac():
    from agents.ppo import ContinualPPO
    from agents.sac import ContinualSAC
    from envs.continual import ContinualEnv
    from envs.registry import get_sequence

    ppo = ContinualPPO(
        "MlpPolicy", ContinualEnv(get_sequence("CartPoleSwap", steps_per_task=128),
                                  append_task_id=True),
        num_tasks=2, strategy="bc", strategy_options={"memory_size": 64, "batch_size": 32},
        multi_head=False, policy_kwargs=dict(net_arch=[16, 16]), n_steps=64, batch_size=32,
        n_epochs=2, learning_rate=3e-3, seed=0)
    sac = ContinualSAC(
        "MlpPolicy", ContinualEnv(get_sequence("PendulumVariants", steps_per_task=150),
                                  append_task_id=True),
        num_tasks=4, strategy="bc", strategy_options={"memory_size": 64, "batch_size": 32},
        exploration_steps=50, policy_kwargs=dict(net_arch=[16, 16]), batch_size=32,
        buffer_size=2000, seed=0)
    for agent, steps in ((ppo, 128), (sac, 150)):
        assert agent.strategy.name == "bc" and agent.strategy.penalty_label == "bc_kl"
        agent.start_task(0)
        agent.learn(steps, reset_num_timesteps=False)
        agent.end_task(0)
        assert agent.strategy.memory.counts() == {0: 64}
        assert abs(float(agent.strategy.penalty().detach())) < 1e-5  # the same policy
        agent.start_task(1)
        agent.learn(steps, reset_num_timesteps=False)
        assert float(agent.strategy.penalty().detach()) > 1e-6  # the policy moved on task 1
        agent.end_task(1)
        assert agent.strategy.memory.counts() == {0: 32, 1: 32}  # one share per task
    assert ppo.logger.name_to_value["train/bc_kl"] > 0
    assert sac.logger.name_to_value["train/penalty"] > 0


def test_ppo_refuses_methods_that_learn_from_stored_transitions():
    from agents.ppo import ContinualPPO
    from envs.continual import ContinualEnv
    from envs.registry import get_sequence

    env = ContinualEnv(get_sequence("CartPoleSwap", steps_per_task=64), append_task_id=True)
    with pytest.raises(ValueError, match="on-policy.*distillation"):
        ContinualPPO("MlpPolicy", env, num_tasks=2, strategy="der", n_steps=64, batch_size=32)
    with pytest.raises(ValueError, match="on-policy"):
        ContinualPPO("MlpPolicy", env, num_tasks=2, strategy="ewc+replay",
                     strategy_options={"replay": {"mode": "rehearsal"}}, n_steps=64)
    agent = ContinualPPO("MlpPolicy", env, num_tasks=2, strategy="ewc+replay", n_steps=64,
                         batch_size=32)
    assert agent.strategy.members[1].mode == "distill"  # the member's on-policy default


class PlayingHost(QuadHost):
    """A host whose earlier heads score ``returns`` on the running task (ClonEx's choice)."""

    def __init__(self, returns: list[float]) -> None:
        super().__init__()
        self.returns = returns
        self.asked: list[tuple[list[int], int]] = []

    def importance_batches(self):
        return [{"obs": torch.zeros(4, 2)}]

    def output_distribution(self, batch):
        return torch.distributions.Categorical(logits=batch["obs"] + self.module["a"],
                                               validate_args=False)

    def head_returns(self, heads, episodes):
        self.asked.append((list(heads), episodes))
        return [self.random if h is None else self.returns[h] for h in heads]

    random = 2.0  # uniform random actions' return (None among the candidates)


def test_clonex_explores_with_the_earlier_head_of_highest_return():
    from crl.strategies.bc import BC

    host = PlayingHost([1.0, 3.0, 3.0, 2.0])
    bc = BC(memory_size=40, clonex=True, clonex_episodes=3).bind(host)
    bc.on_task_start(0)
    assert bc.exploration_head is None and host.asked == []  # no earlier head yet
    for task in range(3):
        bc.on_task_end(task)
        bc.on_task_start(task + 1)
    # heads 0..2 finished before task 3: 1 and 2 tie at 3.0, the earlier one wins
    assert host.asked == [([0], 3), ([0, 1], 3), ([0, 1, 2], 3)]
    assert [c["head"] for c in bc.clonex_choices] == [0, 1, 1]
    assert bc.exploration_head == 1 and bc.diagnostics()["clonex_head"] == 1.0
    assert bc.clonex_choices[-1]["returns"] == {0: 1.0, 1: 3.0, 2: 3.0}
    assert bc.run_summary() == {"clonex_choices": bc.clonex_choices}  # into results.json
    again = BC(memory_size=40, clonex=True, clonex_episodes=3).bind(host)
    again.load_state_dict(bc.state_dict())
    assert again.exploration_head == 1 and again.clonex_choices == bc.clonex_choices
    plain = BC(memory_size=40).bind(host)
    plain.on_task_end(0)
    plain.on_task_start(1)
    assert plain.exploration_head is None and len(host.asked) == 3  # off by default
    assert plain.run_summary() == {}
    combo = make_strategy("bc+redo", bc={"memory_size": 40, "clonex": True}).bind(host)
    combo.on_task_end(0)
    combo.on_task_start(1)
    assert combo.run_summary() == {"bc": {"clonex_choices": [
        {"task": 1, "head": 0, "returns": {0: 1.0}}]}}  # per member, only those with one


def test_clonex_random_keeps_the_warm_up_random_where_no_head_beats_it():
    """With clonex_random, uniform random actions (return 2.0) are one more candidate: head 0
    (1.0) loses to them, head 1 (3.0) wins, and a tie (head 1 at 2.0) goes to the head."""
    from crl.strategies.base import check_used_options
    from crl.strategies.bc import BC

    host = PlayingHost([1.0, 3.0, 2.0])
    bc = BC(memory_size=40, clonex=True, clonex_episodes=2, clonex_random=True).bind(host)
    bc.on_task_start(0)
    bc.on_task_end(0)
    bc.on_task_start(1)
    assert host.asked == [([0, None], 2)]
    assert bc.exploration_head is None and "clonex_head" not in bc.diagnostics()
    assert bc.clonex_choices == [{"task": 1, "head": "random",
                                  "returns": {0: 1.0, "random": 2.0}}]
    bc.on_task_end(1)
    bc.on_task_start(2)
    assert bc.exploration_head == 1 and bc.clonex_choices[-1]["head"] == 1
    host.returns = [1.0, 2.0, 2.0]
    bc.on_task_end(2)
    bc.on_task_start(3)
    assert bc.exploration_head == 1  # 2.0 = random's 2.0: the head
    off = make_strategy("bc", clonex_random=True)
    with pytest.raises(ValueError, match="--bc-clonex-random would do nothing.*--bc-clonex"):
        check_used_options(off, {"bc": {"clonex_random": True}})
    with pytest.raises(ValueError, match="clonex_random must be true or false"):
        BC(clonex=True, clonex_random="yes")


def test_clonex_needs_a_host_that_plays_heads():
    with pytest.raises(ValueError, match="--agent sac"):
        make_strategy("bc", clonex=True).bind(QuadHost())
    with pytest.raises(ValueError, match="clonex_episodes"):
        make_strategy("bc", clonex=True, clonex_episodes=0)


def _clonex_sac(**kwargs):
    from agents.sac import ContinualSAC
    from envs.continual import ContinualEnv
    from envs.registry import get_sequence

    options = {"memory_size": 64, "batch_size": 32, "clonex": True, "clonex_episodes": 2}
    kwargs.setdefault("exploration_steps", 50)
    return ContinualSAC(
        "MlpPolicy", ContinualEnv(get_sequence("PendulumVariants", steps_per_task=150),
                                  append_task_id=True),
        num_tasks=4, strategy="bc", strategy_options=options | kwargs.pop("options", {}),
        policy_kwargs=dict(net_arch=[16, 16]), batch_size=32, buffer_size=2000, seed=0,
        **kwargs)


def test_clonex_on_sac_plays_every_head_and_warms_up_with_the_best():
    """Real SAC: at task 2 the finished heads 0 and 1 each play the new task with their own
    one-hot (they act differently, so their returns differ), the best one is chosen, and the
    warm-up actions come from the policy acting as that head while the replay buffer stores
    the true task-2 observations."""
    from agents.heads import as_task

    sac = _clonex_sac()
    for task in (0, 1):
        sac.start_task(task)
        sac.learn(150, reset_num_timesteps=False)
        sac.end_task(task)
    assert [c["task"] for c in sac.strategy.clonex_choices] == [1]
    predict = sac.policy.predict
    seen: list[np.ndarray] = []

    def spy(obs, *args, **kwargs):
        seen.append(np.array(obs))
        return predict(obs, *args, **kwargs)

    sac.policy.predict = spy  # type: ignore[method-assign]
    sac.start_task(2)
    choice = sac.strategy.clonex_choices[-1]
    assert choice["task"] == 2 and set(choice["returns"]) == {0, 1}
    returns = choice["returns"]
    assert returns[0] != returns[1]  # two heads, two behaviours
    assert choice["head"] == max(returns, key=returns.get)
    heads_seen = {int(np.argmax(o[0, -4:])) for o in seen}
    assert heads_seen == {0, 1}  # each head acted with its own one-hot, never task 2's
    # each head played the same episodes: its deterministic return is reproducible
    assert sac.head_returns([1, 0], 2) == [pytest.approx(returns[1]), pytest.approx(returns[0])]
    seen.clear()
    sac.learn(20, reset_num_timesteps=False)  # inside the 50 warm-up steps
    best = choice["head"]
    assert len(seen) == 20 and all(int(np.argmax(o[0, -4:])) == best for o in seen)
    stored = sac.replay_buffer.observations[:20, 0]
    assert (stored[:, -4:] == np.eye(4)[2]).all()  # the true task-2 observations
    assert np.array_equal(as_task(stored, best, 4)[:, :-4], stored[:, :-4])


def test_clonex_random_on_sac_plays_random_actions_on_the_same_episodes():
    """Real SAC with clonex_random: random actions are measured on the running task beside
    the heads, reproducibly; the choice is the best of the three, and where random actions
    win the warm-up never asks the policy."""
    sac = _clonex_sac(options={"clonex_random": True})
    for task in (0, 1):
        sac.start_task(task)
        sac.learn(150, reset_num_timesteps=False)
        sac.end_task(task)
    predict = sac.policy.predict
    calls: list[int] = []

    def spy(obs, *args, **kwargs):
        calls.append(1)
        return predict(obs, *args, **kwargs)

    sac.start_task(2)
    choice = sac.strategy.clonex_choices[-1]
    returns = choice["returns"]
    assert set(returns) == {0, 1, "random"}
    assert sac.head_returns([None], 2) == [pytest.approx(returns["random"])]
    assert choice["head"] == max(returns, key=lambda h: (returns[h], h != "random"))
    sac.policy.predict = spy  # type: ignore[method-assign]
    sac.learn(20, reset_num_timesteps=False)  # inside the 50 warm-up steps
    if choice["head"] == "random":
        assert sac.strategy.exploration_head is None and calls == []
    else:
        assert sac.strategy.exploration_head == choice["head"] and len(calls) == 20
    sac.policy.predict = predict  # type: ignore[method-assign]


def test_without_clonex_the_warm_up_is_uniform_random():
    sac = _clonex_sac(options={"clonex": False})
    sac.start_task(0)
    calls = []
    sac.policy.predict = lambda *a, **k: calls.append(1)  # type: ignore[method-assign]
    sac.learn(20, reset_num_timesteps=False)
    assert calls == []  # SB3's uniform random actions, no policy call


def test_clonex_is_refused_where_no_head_can_explore():
    from agents.config import ConfigError, RunConfig
    from agents.factory import check_method_options
    from agents.ppo import ContinualPPO
    from envs.continual import ContinualEnv
    from envs.registry import get_sequence

    env = ContinualEnv(get_sequence("CartPoleSwap", steps_per_task=64), append_task_id=True)
    with pytest.raises(ValueError, match="PPOHost has none"):
        ContinualPPO("MlpPolicy", env, num_tasks=2, strategy="bc",
                     strategy_options={"clonex": True}, n_steps=64, batch_size=32)
    # crl train refuses it before any run directory exists
    config = RunConfig(sequence="ClassicMix", agent="ppo", method="bc",
                       method_options={"bc": {"clonex": True}})
    with pytest.raises(ConfigError, match="PPO has none.*--bc-clonex"):
        check_method_options(config, get_sequence("ClassicMix"))
    with pytest.raises(ValueError, match="clonex=True but this one has clonex=False"):
        make_strategy("bc").load_state_dict(make_strategy("bc", clonex=True).state_dict())


def test_clonex_refused_without_a_warm_up_and_by_the_supervised_path():
    from agents.config import ConfigError, RunConfig
    from agents.factory import check_method_options
    from crl.supervised.experiment import SupervisedConfig
    from crl.supervised.experiment import check_method_options as check_supervised
    from envs.registry import get_sequence

    with pytest.raises(ValueError, match="exploration_steps=0 leaves none"):
        _clonex_sac(exploration_steps=0)
    config = RunConfig(sequence="PendulumVariants", agent="sac", method="bc",
                       method_options={"bc": {"clonex": True}},
                       agent_options={"exploration_steps": 0})
    with pytest.raises(ConfigError, match="--exploration-steps"):
        check_method_options(config, get_sequence("PendulumVariants"))
    supervised = SupervisedConfig(method="bc", method_options={"bc": {"clonex": True}})
    with pytest.raises(ValueError, match="a classifier has no exploration phase"):
        check_supervised(supervised, 5)


def test_options_the_method_would_ignore_are_refused():
    from agents.config import ConfigError, RunConfig
    from agents.factory import check_method_options
    from crl.supervised.experiment import SupervisedConfig
    from crl.supervised.experiment import check_method_options as check_supervised
    from envs.registry import get_sequence

    seq = get_sequence("PendulumVariants")
    # SAC's replay default mixes the memory into the batch: no memory batch, no weight
    sac = RunConfig(sequence="PendulumVariants", agent="sac", method="replay",
                    method_options={"replay": {"batch_size": 32, "lam": 2.0}})
    with pytest.raises(ConfigError, match=r"--replay-batch-size, --replay-lam would do nothing"):
        check_method_options(sac, seq)
    sac.method_options["replay"] = {"share": 0.5}  # balanced mode reads it
    check_method_options(sac, seq)
    sac.method_options["replay"]["mode"] = "buffer"  # the uniform draw does not
    with pytest.raises(ConfigError, match=r"--replay-share would do nothing.*balanced mode"):
        check_method_options(sac, seq)
    combo = RunConfig(sequence="PendulumVariants", agent="sac", method="ewc+bc",
                      method_options={"bc": {"clonex_episodes": 3}})
    with pytest.raises(ConfigError, match="--bc-clonex-episodes would do nothing.*--bc-clonex"):
        check_method_options(combo, seq)
    combo.method_options["bc"]["clonex"] = True
    check_method_options(combo, seq)
    supervised = SupervisedConfig(method="replay",
                                  method_options={"replay": {"mode": "buffer", "lam": 0.5}})
    with pytest.raises(ValueError, match="--replay-lam would do nothing"):
        check_supervised(supervised, 5)
    supervised.method_options["replay"] = {"batch_size": 32, "lam": 0.5}  # rehearsal uses both
    check_supervised(supervised, 5)
