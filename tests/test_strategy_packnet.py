"""PackNet on a tiny multi-head MLP: shares, freezing under Adam, retraining, evaluation masks."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tiny_hosts import TinyMultiHeadHost
from torch import nn

from crl.strategies import make_strategy
from crl.strategies.packnet import FREE, PackNet

N_TASKS = 3


class TinyHost(TinyMultiHeadHost):
    """Trunk Linear(10,10)-ReLU-Linear(10,7)-ReLU shared, one Linear(7,3) head per task."""

    def __init__(self, seed: int = 0, n: int = 24) -> None:
        super().__init__((10, 10, 7), N_TASKS, nn.ReLU, seed, n)


def train(host, strat, opt, task, epochs=3, after=True):
    host.task = task
    for _ in range(epochs):
        for batch in host.importance_batches():
            opt.zero_grad()
            loss = host.loss(batch)
            pen = strat.penalty()
            if pen is not None:
                loss = loss + pen
            loss.backward()
            strat.before_optimizer_step()
            opt.step()
            if after:
                strat.after_optimizer_step()


def params(host):
    return host.protected_parameters()


W1, B1, W2, B2 = "trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"


def run_tasks(strat, host, opt, tasks):
    for t in tasks:
        strat.on_task_start(t)
        train(host, strat, opt, t)
        strat.on_task_end(t)


def test_equal_shares_are_exact_and_kept_by_magnitude():
    host = TinyHost()
    strat = PackNet(num_tasks=3, retrain_steps=0).bind(host)
    opt = torch.optim.Adam(host.trained_parameters(), lr=1e-2)
    # Rule: tasks 0..t own floor((t+1)·n/3): 100 -> 33/33/34, 70 -> 23/23/24.
    expected = {W1: [33, 33, 34], W2: [23, 23, 24]}
    for t in range(3):
        strat.on_task_start(t)
        train(host, strat, opt, t)
        before_owner = {n: o.clone() for n, o in strat.owner.items()}
        before = {n: p.detach().clone() for n, p in params(host).items()}
        strat.on_task_end(t)
        for n in (W1, W2):
            own, p = strat.owner[n], params(host)[n]
            assert int((own == t).sum()) == expected[n][t]
            was_free = before_owner[n] == FREE
            kept = own == t
            pruned = was_free & (own == FREE)
            assert torch.equal(kept & ~was_free, torch.zeros_like(kept))
            if pruned.any():
                assert before[n][kept].abs().min() >= before[n][pruned].abs().max()
                assert torch.equal(p[pruned], torch.zeros_like(p[pruned]))
            assert torch.equal(p[kept], before[n][kept])  # retrain_steps=0: kept untouched
        for n in (B1, B2):  # biases: owned by task 0 after task 0
            assert torch.equal(strat.owner[n], torch.zeros_like(strat.owner[n]))
    assert int((strat.owner[W1] == FREE).sum()) == 0  # the last task keeps the rest
    assert strat.owned_counts()[W2] == {0: 23, 1: 23, 2: 24}


def test_prune_fractions_override_the_equal_share():
    host = TinyHost()
    strat = PackNet(3, retrain_steps=0, prune_fractions=[0.5, 0.2, 0.25]).bind(host)
    opt = torch.optim.SGD(host.trained_parameters(), lr=0.1)
    run_tasks(strat, host, opt, range(3))
    # cumulative floor: 100 -> 50, 70, 95 ; 70 -> 35, 49, 66
    assert strat.owned_counts()[W1] == {FREE: 5, 0: 50, 1: 20, 2: 25}
    assert strat.owned_counts()[W2] == {FREE: 4, 0: 35, 1: 14, 2: 17}
    free = strat.owner[W1] == FREE
    assert torch.equal(params(host)[W1][free], torch.zeros(5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_tasks": 0}, "num_tasks >= 1"),
        ({"num_tasks": 2.0}, "num_tasks >= 1"),
        ({"num_tasks": 3, "prune_fractions": [0.5, 0.5]}, "one fraction per task"),
        ({"num_tasks": 2, "prune_fractions": [0.7, 0.4]}, "sum to 1.1"),
        ({"num_tasks": 2, "prune_fractions": [-0.1, 0.4]}, r"\[0, 1\]"),
        ({"num_tasks": 2, "retrain_steps": -1}, "retrain_steps"),
        ({"num_tasks": 2, "retrain_lr": 0.0}, "retrain_lr"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PackNet(**kwargs)


def test_more_tasks_than_planned_raises():
    strat = PackNet(num_tasks=2, retrain_steps=0).bind(TinyHost())
    strat.on_task_start(1)
    with pytest.raises(ValueError, match="num_tasks=2.*full"):
        strat.on_task_start(2)


def test_frozen_weights_bit_identical_under_adam_momentum():
    host = TinyHost()
    strat = PackNet(num_tasks=3, retrain_steps=0).bind(host)
    opt = torch.optim.Adam(host.trained_parameters(), lr=1e-2)  # one optimiser, never reset
    run_tasks(strat, host, opt, [0])
    p = params(host)
    owned0 = strat.owner[W1] == 0
    frozen_before = {n: t.detach().clone() for n, t in p.items()}

    # Control: without after_optimizer_step, Adam's momentum moves the frozen weights.
    host_c, opt_c, strat_c = copy.deepcopy((host, opt, strat))
    strat_c.host = host_c
    strat_c.on_task_start(1)
    train(host_c, strat_c, opt_c, 1, epochs=1, after=False)
    assert not torch.equal(params(host_c)[W1][owned0], frozen_before[W1][owned0])

    strat.on_task_start(1)
    train(host, strat, opt, 1, epochs=3)
    assert opt.state[p[W1]]["exp_avg"][owned0].abs().max() > 0  # momentum really present
    for n in (W1, W2):
        owned = strat.owner[n] == 0
        assert torch.equal(p[n][owned], frozen_before[n][owned])
        free = strat.owner[n] == FREE
        assert (p[n][free] != 0).float().mean() > 0.5  # free weights do train on task 1
    for n in (B1, B2):
        assert torch.equal(p[n], frozen_before[n])


def test_retraining_changes_only_the_task_kept_weights():
    host = TinyHost()
    strat = PackNet(num_tasks=3, retrain_steps=6, retrain_lr=1e-2).bind(host)
    opt = torch.optim.Adam(host.trained_parameters(), lr=1e-2)
    run_tasks(strat, host, opt, [0])
    strat.on_task_start(1)
    train(host, strat, opt, 1)
    # Twin without retraining: same pruning, so every difference comes from retraining.
    host_b = copy.deepcopy(host)
    twin = PackNet(num_tasks=3, retrain_steps=0).bind(host_b)
    twin.load_state_dict({**strat.state_dict(), "retrain_steps": 0})
    twin.on_task_end(1)
    strat.on_task_end(1)
    for n, own in strat.owner.items():
        assert torch.equal(own, twin.owner[n])
        a, b = params(host)[n], params(host_b)[n]
        mine = own == 1
        assert torch.equal(a[~mine], b[~mine]), n
        if mine.any():
            assert (a[mine] != b[mine]).any(), n
    assert not torch.equal(host.module["heads"][1].weight, host_b.module["heads"][1].weight)
    assert torch.equal(host.module["heads"][0].weight, host_b.module["heads"][0].weight)


def test_retraining_without_data_raises():
    host = TinyHost()
    strat = PackNet(num_tasks=2, retrain_steps=1).bind(host)
    strat.on_task_start(0)
    host.empty = True
    with pytest.raises(ValueError, match="importance_batches"):
        strat.on_task_end(0)


def manual_logits(host, strat, batch, i):
    """Forward pass with every weight of tasks > i (and free weights) zeroed by hand."""
    p = params(host)

    def w(n):
        own = strat.owner[n]
        return p[n] * ((own >= 0) & (own <= i))

    h = torch.relu(batch["x"] @ w(W1).T + w(B1))
    h = torch.relu(h @ w(W2).T + w(B2))
    return host.module["heads"][i](h)


def test_evaluation_uses_only_earlier_owners_and_restores_exactly():
    host = TinyHost()
    strat = PackNet(num_tasks=3, retrain_steps=2, retrain_lr=1e-3).bind(host)
    opt = torch.optim.Adam(host.trained_parameters(), lr=1e-2)
    run_tasks(strat, host, opt, range(3))
    before = {n: t.detach().clone() for n, t in params(host).items()}
    for i in range(3):
        batch = host.data[i]
        with torch.no_grad():
            full = host.logits(batch)
            with strat.evaluation(i):
                got = host.logits(batch)
            expected = manual_logits(host, strat, batch, i)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        if i < 2:
            assert not torch.allclose(got, full)  # the mask matters
        else:
            assert torch.equal(got, full)
        for n, t in params(host).items():
            assert torch.equal(t, before[n])
    with pytest.raises(RuntimeError, match="boom"), strat.evaluation(0):
        assert (params(host)[W1][strat.owner[W1] == 2] == 0).all()
        raise RuntimeError("boom")
    for n, t in params(host).items():
        assert torch.equal(t, before[n])


def test_evaluation_during_training_counts_free_weights_as_the_active_task():
    host = TinyHost()
    strat = PackNet(num_tasks=3, retrain_steps=0).bind(host)
    opt = torch.optim.Adam(host.trained_parameters(), lr=1e-2)
    run_tasks(strat, host, opt, [0])
    strat.on_task_start(1)
    train(host, strat, opt, 1)
    w = params(host)[W1].detach().clone()
    with strat.evaluation(1):
        assert torch.equal(params(host)[W1], w)  # task 1's in-progress weights stay
    with strat.evaluation(2):
        assert torch.equal(params(host)[W1], w)
    with strat.evaluation(0):
        assert torch.equal(params(host)[W1], w * (strat.owner[W1] == 0))
    assert torch.equal(params(host)[W1], w)


def test_state_dict_round_trip_keeps_masks_and_freezing():
    host = TinyHost()
    strat = PackNet(num_tasks=3, retrain_steps=1, retrain_lr=1e-3).bind(host)
    opt = torch.optim.Adam(host.trained_parameters(), lr=1e-2)
    run_tasks(strat, host, opt, [0])
    strat.on_task_start(1)
    train(host, strat, opt, 1, epochs=1)
    buf = io.BytesIO()
    torch.save(strat.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    loaded = make_strategy("packnet", num_tasks=3, memory_size=7).bind(host)
    assert isinstance(loaded, PackNet)
    loaded.load_state_dict(state)
    for n in strat.owner:
        assert torch.equal(loaded.owner[n], strat.owner[n])
    with torch.no_grad(), strat.evaluation(0):
        a = host.logits(host.data[0])
    with torch.no_grad(), loaded.evaluation(0):
        b = host.logits(host.data[0])
    assert torch.equal(a, b)
    frozen = {n: t.detach().clone() for n, t in params(host).items()}
    train(host, loaded, opt, 1, epochs=2)  # the loaded strategy keeps task 0 frozen
    for n, own in loaded.owner.items():
        assert torch.equal(params(host)[n][own == 0], frozen[n][own == 0])
    with pytest.raises(ValueError, match="num_tasks"):
        PackNet(num_tasks=4).load_state_dict(state)
