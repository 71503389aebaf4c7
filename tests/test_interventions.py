"""Plasticity interventions (L2 Init, Shrink & Perturb, ReDo, Continual Backprop) and method
combinations (ewc+redo): each intervention's effect on the weights, computed by hand, and
combined strategies through the supervised trainer and both agents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crl.strategies import check_method, make_strategy, method_members, user_options
from crl.strategies.cbp import CBP
from crl.strategies.composite import Composite
from crl.strategies.l2init import L2Init
from crl.strategies.redo import ReDo
from crl.strategies.snp import ShrinkPerturb


class Host:
    """trunk: Linear(3, 4) + ReLU + Linear(4, 4) + ReLU; head: Linear(4, 2). Unit 0 of the
    first layer is dead (zero weights, bias −1)."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.module = nn.ModuleDict({
            "trunk": nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()),
            "head": nn.Linear(4, 2),
        })
        with torch.no_grad():
            self.module["trunk"][0].weight[0] = 0.0
            self.module["trunk"][0].bias[0] = -1.0
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.rand(32, 3, generator=g)
        self.y = torch.randint(0, 2, (32,), generator=g)

    def protected_parameters(self):
        return {n: p for n, p in self.module.named_parameters() if n.startswith("trunk.")}

    def trained_parameters(self):
        return list(self.module.parameters())

    def importance_batches(self):
        return iter([{"x": self.x, "y": self.y}])

    def output_distribution(self, batch):
        return torch.distributions.Categorical(logits=self.forward(batch["x"]))

    def forward(self, x):
        return self.module["head"](self.module["trunk"](x))

    def loss(self, batch):
        return F.cross_entropy(self.forward(batch["x"]), batch["y"])


def train_steps(host: Host, strategy, steps: int, lr: float = 0.0) -> None:
    """The host's loop: forward (grad, train mode), penalty, backward, step, hooks."""
    opt = torch.optim.SGD(host.module.parameters(), lr=lr)
    host.module.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = host.loss({"x": host.x, "y": host.y})
        pen = strategy.penalty()
        (loss if pen is None else loss + pen).backward()
        strategy.before_optimizer_step()
        opt.step()
        strategy.after_optimizer_step()


def dormant(activity: torch.Tensor, tau: float = 0.025) -> list[int]:
    """Sokar et al.'s τ-dormant units of a layer (a silent layer: every unit)."""
    if float(activity.mean()) == 0.0:
        return list(range(activity.numel()))
    return (activity / activity.mean() <= tau).nonzero().flatten().tolist()


# -- ReDo --------------------------------------------------------------------------------------
def test_redo_recycles_the_dead_unit_and_keeps_the_function():
    host = Host()
    redo = make_strategy("redo", tau=0.025, every=3, seed=5).bind(host)
    redo.on_task_start(0)
    trunk, head = host.module["trunk"], host.module["head"]
    train_steps(host, redo, 2)  # lr 0: weights move only by recycling
    assert redo.tracker.layers["trunk.1"].producer == "trunk.0"
    assert redo.tracker.layers["trunk.1"].consumers == ["trunk.2"]
    assert redo.tracker.layers["trunk.3"].consumers == ["head"]
    before = {n: p.detach().clone() for n, p in host.module.named_parameters()}
    out_before = host.forward(host.x).detach()
    # the dormant units by hand (lr 0: every recorded pass saw the same activity)
    dead1 = dormant(torch.relu(trunk[0](host.x)).detach().mean(0))
    dead3 = dormant(trunk(host.x).detach().mean(0))
    assert 0 in dead1
    train_steps(host, redo, 1)  # the third step: check
    assert redo.recycled == len(dead1) + len(dead3)
    w0 = trunk[0].weight.detach()
    live1 = [i for i in range(4) if i not in dead1]
    assert w0[0].abs().sum() > 0  # fresh incoming weights for the dead unit
    torch.testing.assert_close(w0[live1], before["trunk.0.weight"][live1], rtol=0, atol=0)
    # outgoing weights zeroed; rows of units recycled in the next layer are fresh (and
    # their own outgoing weights zero), as in Sokar et al.'s layer-by-layer reset
    live3 = [i for i in range(4) if i not in dead3]
    w2 = trunk[2].weight.detach()
    assert float(w2[live3][:, dead1].abs().sum()) == 0.0
    torch.testing.assert_close(w2[live3][:, live1],
                               before["trunk.2.weight"][live3][:, live1], rtol=0, atol=0)
    assert float(host.module["head"].weight.detach()[:, dead3].abs().sum()) == 0.0
    # the units' old output was 0 and their new one meets zero weights: same function
    torch.testing.assert_close(host.forward(host.x).detach(), out_before)
    # the fresh row is what nn.Linear's initialiser draws: bounded by 1/sqrt(fan_in)
    assert float(w0[0].abs().max()) <= 1 / np.sqrt(3) + 1e-6
    assert head.weight.shape == (2, 4)


def test_recycling_zeroes_the_recycled_weights_optimizer_state():
    """Recycling two live units of the first layer: Adam's moments of their incoming rows,
    biases and outgoing columns are zeroed; every other entry and the step count stay
    bit-identical. ReDo hands the tracker the host's optimizers()."""
    import copy

    from crl.strategies.units import host_optimizers

    class Bare:
        def __init__(self) -> None:
            torch.manual_seed(0)
            self.module = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 8),
                                        nn.ReLU(), nn.Linear(8, 2))
            self.opt = torch.optim.Adam(self.module.parameters(), lr=0.01)

        def optimizers(self):
            return [self.opt]

    host = Bare()
    opt = host.opt
    redo = ReDo(tau=0.025, every=2, seed=1).bind(host)
    calls = []
    recycle = redo.tracker.recycle
    redo.tracker.recycle = lambda *a: calls.append(a) or recycle(*a)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    host.module.train()
    for _ in range(2):
        opt.zero_grad()
        host.module(x).pow(2).mean().backward()
        opt.step()
        redo.after_optimizer_step()
    assert calls and all(c[3] == [opt] for c in calls)  # ReDo passed the host's optimiser
    w0, b0, w2 = host.module[0].weight, host.module[0].bias, host.module[2].weight
    state = {n: copy.deepcopy(opt.state[p]) for n, p in host.module.named_parameters()}
    live = (state["0.weight"]["exp_avg_sq"].sum(1) > 0).nonzero().flatten()
    units, kept = live[:2], [i for i in range(16) if i not in live[:2].tolist()]
    assert len(live) >= 3
    assert redo.tracker.recycle("1", units, 7, host_optimizers(host)) == 2
    for key in ("exp_avg", "exp_avg_sq"):
        assert float(state["0.weight"][key][units].abs().sum()) > 0  # live: nonzero
        assert float(state["2.weight"][key][:, units].abs().sum()) > 0
        assert float(opt.state[w0][key][units].abs().sum()) == 0.0
        assert float(opt.state[b0][key][units].abs().sum()) == 0.0
        assert float(opt.state[w2][key][:, units].abs().sum()) == 0.0
        torch.testing.assert_close(opt.state[w0][key][kept], state["0.weight"][key][kept],
                                   rtol=0, atol=0)
        torch.testing.assert_close(opt.state[w2][key][:, kept],
                                   state["2.weight"][key][:, kept], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[host.module[4].weight][key],
                                   state["4.weight"][key], rtol=0, atol=0)
    assert float(opt.state[w0]["step"]) == float(state["0.weight"]["step"]) == 2.0


def test_agent_and_trainer_hosts_list_their_optimizers():
    """The hosts' optional optimizers(): what ReDo and CBP clear moments in."""
    from agents.config import RunConfig
    from agents.factory import make_agent
    from crl.supervised.trainer import ClassifierHost, TrainerConfig
    from envs.registry import get_sequence

    agents = {}
    for agent, name in (("sac", "PendulumVariants"), ("ppo", "CartPoleSwap")):
        seq = get_sequence(name, steps_per_task=64)
        config = RunConfig(sequence=name, agent=agent, method="redo", net_arch=(8,),
                           agent_options={"buffer_size": 100} if agent == "sac" else {})
        agents[agent] = make_agent(config, seq.make_env(append_task_id=True), seq)
    sac, ppo = agents["sac"], agents["ppo"]
    assert {id(o) for o in sac.host.optimizers()} == {
        id(sac.actor.optimizer), id(sac.critic.optimizer), id(sac.ent_coef_optimizer)}
    assert [id(o) for o in ppo.host.optimizers()] == [id(ppo.policy.optimizer)]
    host = ClassifierHost(nn.Linear(2, 2), TrainerConfig(), torch.Generator())
    assert host.optimizers() == []


def test_redo_state_round_trip_and_bad_options():
    host = Host()
    redo = ReDo(every=10, seed=1).bind(host)
    redo.on_task_start(0)
    train_steps(host, redo, 4)
    state = redo.state_dict()
    again = ReDo(every=10, seed=1).bind(Host())
    again.load_state_dict(state)
    assert again.updates == 4
    assert {k: v for k, v in again.tracker.calls.items()} == redo.tracker.calls
    with pytest.raises(ValueError, match="tau"):
        ReDo(tau=1.0)
    with pytest.raises(ValueError, match="every"):
        ReDo(every=0)


# -- Continual Backprop ------------------------------------------------------------------------
def test_cbp_utility_by_hand_and_replaces_the_least_useful_mature_unit():
    host = Host()
    cbp = CBP(rate=0.5, maturity=1, decay=0.9, seed=3).bind(host)
    cbp.on_task_start(0)
    trunk = host.module["trunk"]
    train_steps(host, cbp, 1)  # discovery pass: no activity recorded yet
    train_steps(host, cbp, 1)
    # one recorded step: u = (1 - 0.9) E|h| Σ_k |w_k·| for layer trunk.1
    h = torch.relu(trunk[0](host.x)).detach()
    expected = 0.1 * h.abs().mean(0) * trunk[2].weight.detach().abs().sum(0)
    torch.testing.assert_close(cbp.utility["trunk.1"], expected)
    assert cbp.age["trunk.1"].tolist() == [1, 1, 1, 1] and cbp.replaced == 0
    w_before = trunk[0].weight.detach().clone()
    train_steps(host, cbp, 1)  # ages 2 > maturity 1: budget 0.5 x 4 units = 2 replacements
    assert cbp.replaced == 2 * 2  # two unit layers, two units each
    age = cbp.age["trunk.1"]
    reset = (age == 0).nonzero().flatten().tolist()
    assert len(reset) == 2
    assert 0 in reset  # the dead unit has utility 0: always among the least useful
    kept = [i for i in range(4) if i not in reset]
    torch.testing.assert_close(trunk[0].weight.detach()[kept], w_before[kept], rtol=0, atol=0)
    fresh3 = (cbp.age["trunk.3"] == 0).nonzero().flatten().tolist()
    rows = [i for i in range(4) if i not in fresh3]  # rows of trunk.3's replaced units: fresh
    assert float(trunk[2].weight.detach()[rows][:, reset].abs().sum()) == 0.0
    state = cbp.state_dict()
    again = CBP(rate=0.5, maturity=1, decay=0.9, seed=3).bind(Host())
    again.load_state_dict(state)
    torch.testing.assert_close(again.utility["trunk.1"], cbp.utility["trunk.1"])
    assert again.replaced == cbp.replaced


# -- L2 Init and Shrink & Perturb --------------------------------------------------------------
def test_l2init_penalty_by_hand_with_a_fixed_anchor():
    host = Host()
    l2i = L2Init(lam=0.5).bind(host)
    assert l2i.penalty() is None
    l2i.on_task_start(0)
    init = {n: p.detach().clone() for n, p in host.protected_parameters().items()}
    assert float(l2i.penalty().detach()) == 0.0
    with torch.no_grad():
        host.module["trunk"][0].bias += 0.1  # 4 entries moved by 0.1
    assert float(l2i.penalty().detach()) == pytest.approx(0.5 * 4 * 0.01)
    l2i.on_task_end(0)
    l2i.on_task_start(1)  # the anchor stays the initial point
    for n, a in l2i.anchor.items():
        torch.testing.assert_close(a, init[n], rtol=0, atol=0)
    assert float(l2i.penalty().detach()) == pytest.approx(0.02)


def test_shrink_perturb_by_hand():
    host = Host()
    snp = ShrinkPerturb(shrink=0.5, noise=0.1, seed=7).bind(host)
    before = {n: p.detach().clone() for n, p in host.protected_parameters().items()}
    head = host.module["head"].weight.detach().clone()
    snp.on_task_start(0)  # the first task starts from the initial weights
    for n, p in host.protected_parameters().items():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
    snp.on_task_end(0)
    snp.on_task_start(1)
    state = np.random.SeedSequence([7, 2]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(state))
    for n, p in host.protected_parameters().items():
        eps = torch.randn(p.shape, generator=gen)
        torch.testing.assert_close(p.detach(), 0.5 * before[n] + 0.1 * eps)
    torch.testing.assert_close(host.module["head"].weight.detach(), head, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shrink"):
        ShrinkPerturb(shrink=0.0)


# -- combinations ------------------------------------------------------------------------------
def test_method_names_and_options_of_a_combination():
    assert check_method(" EWC+ReDo ") == "ewc+redo"
    assert method_members("ewc+redo") == ["ewc", "redo"]
    with pytest.raises(ValueError, match=r"unknown method .bogus.*in the combination .ewc\+bogus."):
        check_method("ewc+bogus")
    with pytest.raises(ValueError, match="twice"):
        check_method("ewc+ewc")
    with pytest.raises(ValueError, match="empty part"):
        check_method("ewc+")
    with pytest.raises(ValueError, match="packnet cannot be combined with redo"):
        make_strategy("packnet+redo", num_tasks=2)
    per = {"ewc": {"lam": 3.0}, "redo": {"every": 7}, "mas": {"lam": 1.0}}
    assert user_options(per, "ewc+redo") == {"ewc": {"lam": 3.0}, "redo": {"every": 7}}
    assert user_options(per, "ewc") == {"lam": 3.0}
    s = make_strategy("ewc+redo", num_tasks=2, seed=4, ewc={"lam": 3.0}, redo={"every": 7})
    assert isinstance(s, Composite) and s.name == "ewc+redo"
    ewc, redo = s.members
    assert ewc.lam == 3.0 and redo.every == 7 and redo.seed == 4


def test_combination_penalty_hooks_and_state():
    host = Host()
    s = make_strategy("l2+l2init", l2={"lam": 2.0}, l2init={"lam": 0.5}).bind(host)
    s.on_task_start(0)
    with torch.no_grad():
        host.module["trunk"][0].bias += 0.1
    s.on_task_end(0)  # L2 anchors here; L2 Init stays at the initial point
    s.on_task_start(1)
    with torch.no_grad():
        host.module["trunk"][0].bias += 0.1
    l2, l2i = s.members
    total = float(l2.penalty().detach()) + float(l2i.penalty().detach())
    assert float(s.penalty().detach()) == pytest.approx(total)
    assert float(l2.penalty().detach()) == pytest.approx(2.0 * 4 * 0.01)
    assert float(l2i.penalty().detach()) == pytest.approx(0.5 * 4 * 0.04)
    state = s.state_dict()
    again = make_strategy("l2+l2init", l2={"lam": 2.0}, l2init={"lam": 0.5}).bind(host)
    again.load_state_dict(state)
    assert float(again.penalty().detach()) == pytest.approx(float(s.penalty().detach()))
    other = make_strategy("l2init+l2").bind(host)
    with pytest.raises(ValueError, match="holds methods l2\\+l2init"):
        other.load_state_dict(state)


# -- end to end --------------------------------------------------------------------------------
def test_ewc_redo_through_crl_train_both_agents(tmp_path):
    import json

    from click.testing import CliRunner

    from crl.cli import main

    for agent, seq, extra in (
        ("ppo", "CartPoleSwap", ["--n-steps", "64", "--batch-size", "32"]),
        ("sac", "PendulumVariants", ["--exploration-steps", "50", "--batch-size", "32"]),
    ):
        run = tmp_path / agent
        args = ["train", "--agent", agent, "--sequence", seq, "--steps-per-task", "256",
                "--eval-every", "128", "--eval-episodes", "1", "--net-arch", "16,16",
                "--method", "ewc+redo", "--redo-every", "20", "--redo-tau", "0.2",
                "--ewc-lam", "5", "--wandb", "disabled", "--run-path", str(run),
                "--no-progress", *extra]
        out = CliRunner().invoke(main, args, catch_exceptions=False)
        assert out.exit_code == 0, out.output
        config = (run / "config.yaml").read_text()
        assert "method: ewc+redo" in config
        resolved = json.loads((run / "results.json").read_text())
        assert resolved["method"] == "ewc+redo"
        from crl.checkpoint import checkpoint_path, load_checkpoint

        ckpt = load_checkpoint(checkpoint_path(run))
        members = ckpt["agent"]["continual"]["strategy"]["members"]
        assert list(members) == ["ewc", "redo"]
        assert members["ewc"]["lam"] == 5.0 and members["redo"]["updates"] > 0


def test_ewc_redo_through_crl_supervised(tiny_mnist_dir, tmp_path):
    from click.testing import CliRunner

    from crl.cli import main

    out = CliRunner().invoke(main, [
        "supervised", "--benchmark", "permuted-mnist", "--tasks", "2", "--method",
        "ewc+snp", "--snp-shrink", "0.9", "--data-dir", str(tiny_mnist_dir), "--run-dir",
        str(tmp_path), "--hidden", "16", "--no-progress", "--wandb", "disabled",
        "--no-download"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "ewc+snp" in out.output


@pytest.mark.parametrize("method,flags", [("redo", ["--redo-tau", "0.9", "--redo-every", "2"]),
                                          ("cbp", ["--cbp-rate", "0.5", "--cbp-maturity", "1"])])
def test_supervised_recycling_gets_the_running_optimizer(tiny_mnist_dir, tmp_path, monkeypatch,
                                                          method, flags):
    """Through crl supervised, ReDo and CBP hand every recycle the trainer's running Adam
    (the host's optimizers(), set by each update)."""
    from click.testing import CliRunner

    from crl.cli import main
    from crl.strategies.units import UnitTracker

    seen: list[list] = []
    recycle = UnitTracker.recycle

    def spy(self, name, units, seed, optimizers=()):
        seen.append(list(optimizers))
        return recycle(self, name, units, seed, optimizers)

    monkeypatch.setattr(UnitTracker, "recycle", spy)
    out = CliRunner().invoke(main, [
        "supervised", "--benchmark", "permuted-mnist", "--tasks", "2", "--method", method,
        *flags, "--data-dir", str(tiny_mnist_dir), "--run-dir", str(tmp_path), "--hidden",
        "16", "--no-progress", "--wandb", "disabled", "--no-download"],
        catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert seen and all(len(o) == 1 and isinstance(o[0], torch.optim.Adam) for o in seen)


# -- review findings: resume, hook order, remembered batches --------------------------------
def _resumable_run(cls, kw, steps, split=None):
    """A small MLP trained ``steps`` SGD steps; at ``split`` the model, optimiser and strategy
    go through their state dicts into fresh objects (a checkpoint resume)."""
    import copy

    class Bare:
        def __init__(self, m):
            self.module = m

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 2))

    m = make()
    s = cls(**kw).bind(Bare(m))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 4, generator=g) for _ in range(steps)]
    for i in range(steps):
        if i == split:
            st, ms, os_ = (copy.deepcopy(x) for x in (s.state_dict(), m.state_dict(),
                                                       opt.state_dict()))
            m = make()
            m.load_state_dict(ms)
            s = cls(**kw).bind(Bare(m))
            s.load_state_dict(st)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            opt.load_state_dict(os_)
        m.train()
        opt.zero_grad()
        m(xs[i]).pow(2).mean().backward()
        opt.step()
        s.after_optimizer_step()
    return m, s


@pytest.mark.parametrize("cls,kw", [(CBP, dict(rate=0.05, maturity=2)),
                                    (ReDo, dict(tau=0.5, every=3))])
def test_redo_and_cbp_resume_exactly(cls, kw):
    a, sa = _resumable_run(cls, kw, 12)
    b, sb = _resumable_run(cls, kw, 12, split=4)
    assert getattr(sa, "replaced", getattr(sa, "recycled", 0)) > 0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["si+redo", "redo+si"])
def test_si_never_credits_a_recycle_as_training(name):
    """lr 0: the optimiser moves nothing, so SI's path integral is 0 whatever ReDo does, in
    either order of the combination."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        module[0].weight[:8] *= 0.02
        module[0].bias[:8] = 0.01  # 8 nearly dormant units

    class Bare:
        def __init__(self, m):
            self.module = m

        def protected_parameters(self):
            return dict(self.module.named_parameters())

    s = make_strategy(name, si={"lam": 1.0}, redo={"tau": 0.1, "every": 2}).bind(Bare(module))
    opt = torch.optim.SGD(module.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(1)
    s.on_task_start(0)
    for _ in range(4):
        module.train()
        opt.zero_grad()
        module(torch.randn(32, 4, generator=g)).pow(2).mean().backward()
        s.before_optimizer_step()
        opt.step()
        s.after_optimizer_step()
    si = next(m for m in s.members if m.name == "si")
    redo = next(m for m in s.members if m.name == "redo")
    assert redo.recycled > 0
    assert sum(float(p.abs().sum()) for p in si._path) == 0.0


def test_der_remembers_a_batch_once_per_update():
    from crl.strategies.der import DER

    host = Host()
    der = DER(memory_size=100, batch_size=8).bind(host)
    der.on_task_start(0)
    batch = {"x": host.x, "y": host.y}
    der.penalty(batch)
    der.penalty(batch)  # SAC asks again for the actor step with regularize_critic
    assert len(der.memory) == 32
    der.penalty({"x": host.x, "y": host.y})  # a new batch (same values) is a new sample
    assert len(der.memory) == 64
