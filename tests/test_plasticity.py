"""Plasticity metrics (crl/plasticity.py, crl.metrics.plasticity_slope) on hand-built
networks, the probe's bookkeeping, and runs that measure them without changing training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crl.metrics import plasticity_slope
from crl.plasticity import (
    Probe,
    dormant_fraction,
    effective_rank,
    find_layers,
    measure,
    unit_activity,
)


# -- the metrics on tensors ------------------------------------------------------------------
def test_dormant_fraction_by_hand():
    # mean activity 0.5025; scores 0, 0.0199, 1.99, 1.99: two at or below tau = 0.025
    assert dormant_fraction(torch.tensor([0.0, 0.01, 1.0, 1.0]), 0.025) == 0.5
    assert dormant_fraction(torch.tensor([0.0, 0.01, 1.0, 1.0]), 0.01) == 0.25
    assert dormant_fraction(torch.zeros(3)) == 1.0  # a silent layer is all dormant
    assert dormant_fraction(torch.ones(5)) == 0.0


def test_unit_activity_averages_batch_and_positions():
    h = torch.zeros(2, 3, 2, 2)  # (batch, channels, H, W)
    h[0, 1] = 2.0
    h[1, 1] = -2.0  # |h|: sign does not matter
    h[0, 2, 0, 0] = 8.0
    torch.testing.assert_close(unit_activity(h), torch.tensor([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="batch and a unit"):
        unit_activity(torch.ones(4))


def test_effective_rank_by_hand():
    # singular values 10, 1, 0.05: cumulative shares 0.905, 0.9955, 1.0
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    feats = q[:, :3] @ torch.diag(torch.tensor([10.0, 1.0, 0.05]))
    assert effective_rank(feats, 0.01) == 2
    assert effective_rank(feats, 0.001) == 3
    assert effective_rank(feats, 0.2) == 1
    assert effective_rank(torch.zeros(4, 3)) == 0


def test_end_of_task_scores_and_summary_by_hand():
    from crl.metrics import EvalHistory, end_of_task_scores, summarize

    # two tasks of 4 steps, evaluated every 2 steps: task 0 at steps 0, 2, 4; task 1 at 4, 6, 8
    steps = np.array([0, 2, 4, 6, 8])
    scores = np.array([[0.0, 0.1], [0.6, 0.1], [0.8, 0.2], [0.5, 0.4], [0.3, 0.6]])
    history = EvalHistory(steps, scores, [0, 4], 8)
    np.testing.assert_allclose(end_of_task_scores(history, k=2), [0.7, 0.5])
    out = summarize(history, k=2)
    assert out["end_of_task_score"] == pytest.approx([0.7, 0.5])
    assert out["plasticity_slope"] == pytest.approx(-0.2)


def test_plasticity_slope_by_hand():
    assert plasticity_slope([0.9, 0.8, 0.7]) == pytest.approx(-0.1)
    assert plasticity_slope([0.5, 0.5]) == pytest.approx(0.0)
    # least squares: x = 0..3, y = 1, 0, 1, 0 -> slope -0.2
    assert plasticity_slope([1.0, 0.0, 1.0, 0.0]) == pytest.approx(-0.2)
    assert math.isnan(plasticity_slope([0.7]))


# -- a hand-built host ----------------------------------------------------------------------
class MLPHost:
    """trunk = Linear(3, 4) + ReLU + Linear(4, 4) + ReLU, head = Linear(4, 2); units 0 and 1
    of the first layer are dead (zero weights, negative bias)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.module = nn.ModuleDict({
            "trunk": nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()),
            "head": nn.Linear(4, 2),
        })
        with torch.no_grad():
            first = self.module["trunk"][0]
            first.weight[:2] = 0.0
            first.bias[:2] = -1.0
            first.weight[2:] = torch.tensor([[1.0, 0.5, -0.5], [0.3, 1.0, 0.2]])
            first.bias[2:] = 1.0
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(16, 3, generator=g)
        self.y = torch.randint(0, 2, (16,), generator=g)

    def trained_parameters(self):
        return list(self.module.parameters())

    def importance_batches(self):
        return iter([{"x": self.x[:8], "y": self.y[:8]}, {"x": self.x[8:], "y": self.y[8:]}])

    def loss(self, batch):
        return F.cross_entropy(self.module["head"](self.module["trunk"](batch["x"])), batch["y"])


def test_measure_on_a_hand_built_network():
    host = MLPHost()
    layers = find_layers(host.module, host.trained_parameters())
    assert layers.networks == {"trunk": ["trunk.1", "trunk.3"]}
    assert list(layers.parametrised) == ["trunk.0", "trunk.2"]  # the head has no activation
    batch = {"x": host.x, "y": host.y}
    row = measure(host, batch, tau=0.025)
    # units 0 and 1 output exactly 0, units 2 and 3 are positive on inputs in [0, 1)
    assert row["plasticity/dormant/trunk.1"] == 0.5
    trunk = host.module["trunk"]
    h2 = trunk(host.x).detach()
    expected2 = dormant_fraction(h2.abs().mean(0), 0.025)
    assert row["plasticity/dormant/trunk.3"] == expected2
    assert row["plasticity/dormant"] == pytest.approx((0.5 * 4 + expected2 * 4) / 8)
    assert row["plasticity/srank/trunk"] == effective_rank(h2.detach(), 0.01)
    for name in ("trunk.0", "trunk.2"):
        w = host.module.get_submodule(name).weight
        assert row[f"plasticity/weight_abs/{name}"] == pytest.approx(float(w.detach().abs().mean()))
    grads = torch.autograd.grad(host.loss(batch), list(trunk[2].parameters()))
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    assert row["plasticity/grad_norm/trunk.2"] == pytest.approx(norm, rel=1e-6)
    all_w = torch.cat([trunk[0].weight.flatten(), trunk[2].weight.flatten()]).detach()
    assert row["plasticity/weight_abs"] == pytest.approx(float(all_w.abs().mean()))
    assert all(p.grad is None for p in host.module.parameters())


def test_probe_is_fixed_leaves_rng_alone_and_round_trips():
    host = MLPHost()
    probe = Probe(size=12)
    state = torch.get_rng_state()
    first = probe.measure(host, 0, step=10)
    assert torch.equal(state, torch.get_rng_state())
    assert probe.batches[0]["x"].shape == (12, 3)  # two batches of 8, cut to 12
    torch.testing.assert_close(probe.batches[0]["x"], host.x[:12])
    host.x = host.x + 1.0  # new data: the probe stays the one captured
    assert probe.measure(host, 0, step=20) == first
    assert probe.steps == [10, 20]
    # a metric that appears later is padded with None before it
    probe._record(30, {"plasticity/new": 1.0})
    assert probe.series["plasticity/new"] == [None, None, 1.0]
    again = Probe(size=12)
    again.load_state_dict(probe.state_dict())
    assert again.history() == probe.history()
    torch.testing.assert_close(again.batches[0]["x"], probe.batches[0]["x"])
    empty = MLPHost()
    empty.importance_batches = lambda: iter([])
    assert Probe().measure(empty, 0, step=0) == {}


def test_probe_settings_are_checked():
    with pytest.raises(ValueError, match="tau"):
        Probe(tau=1.5)
    with pytest.raises(ValueError, match="probe size"):
        Probe(size=1)


# -- runs ----------------------------------------------------------------------------------------
def _rl_run(tmp_path, name, *extra):
    from click.testing import CliRunner

    from crl.cli import main

    args = ["train", "--agent", "sac", "--sequence", "PendulumVariants", "--steps-per-task",
            "200", "--eval-every", "100", "--eval-episodes", "1", "--exploration-steps", "50",
            "--batch-size", "32", "--net-arch", "16,16", "--method", "ewc", "--wandb",
            "disabled", "--run-path", str(tmp_path / name), "--no-progress",
            "--no-save-model", *extra]
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return json.loads((tmp_path / name / "results.json").read_text())


def test_rl_probe_does_not_change_training(tmp_path):
    on = _rl_run(tmp_path, "on", "--plasticity-probe", "64")
    off = _rl_run(tmp_path, "off", "--no-plasticity")
    assert on["eval"]["mean_returns"] == off["eval"]["mean_returns"]
    assert "plasticity" not in off
    hist = on["plasticity"]
    assert hist["probe_size"] == 64 and hist["steps"][-1] == 800
    assert {"plasticity/dormant", "plasticity/srank/actor.latent_pi",
            "plasticity/srank/critic.qf0.trunk"} <= set(hist["series"])
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert any("plasticity/dormant" in r for r in rows)
    assert on["timings"]["plasticity_seconds"] > 0
    assert (tmp_path / "on" / "plots" / "plasticity.png").is_file()


def test_supervised_probe_does_not_change_training(tiny_mnist, tmp_path):
    from crl.supervised.benchmarks import make_benchmark
    from crl.supervised.experiment import SupervisedConfig, run_experiment
    from crl.supervised.trainer import TrainerConfig

    bench = make_benchmark("permuted-mnist", tiny_mnist, num_tasks=3, seed=0)
    out = {}
    for on in (True, False):
        config = SupervisedConfig(
            benchmark="permuted-mnist", tasks=3, method="ewc", hidden=(32, 32),
            wandb="disabled",
            trainer=TrainerConfig(batch_size=32, progress=False, plasticity=on,
                                  plasticity_probe=50))
        torch.manual_seed(0)
        out[on] = run_experiment(config, benchmark=bench, run_dir=tmp_path / str(on)).summary
    assert out[True]["accuracy_matrix"] == out[False]["accuracy_matrix"]
    hist = out[True]["plasticity"]
    assert len(hist["steps"]) == 3 and hist["probe_size"] == 50
    assert {"plasticity/dormant/trunk.1", "plasticity/dormant/trunk.3",
            "plasticity/srank/trunk"} <= set(hist["series"])
    R = np.array(out[True]["accuracy_matrix"])
    assert out[True]["end_of_task_score"] == np.diag(R).tolist()
    assert out[True]["plasticity_slope"] == pytest.approx(plasticity_slope(np.diag(R)))
    assert "plasticity" not in out[False]
    assert (tmp_path / "True" / "plots" / "plasticity.png").is_file()


def test_probe_waits_for_a_full_batch_unless_the_data_is_complete():
    host = MLPHost()  # 16 samples
    probe = Probe(size=20)
    assert probe.measure(host, 0, step=1) == {}  # a replay buffer still filling: wait
    assert 0 not in probe.batches
    row = probe.measure(host, 0, step=2, complete=True)  # a fixed training set of 16
    assert row and probe.batches[0]["x"].shape == (16, 3)
