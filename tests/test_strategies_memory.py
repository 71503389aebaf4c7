"""Memories (reservoir, episodic), A-GEM and Replay on tiny hand-checkable hosts."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from tiny_hosts import TinyMultiHeadHost
from torch import nn

from crl.strategies import make_strategy
from crl.strategies.agem import AGEM
from crl.strategies.memory import (
    EpisodicMemory,
    ReservoirMemory,
    batch_length,
    concat_batches,
    index_batch,
    sample_indices,
)
from crl.strategies.replay import Replay


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def ids(start, stop):
    return {"id": torch.arange(start, stop)}


# -- reservoir ------------------------------------------------------------------------------
class KeepFirst:
    """A biased memory (keeps the first `capacity` samples) that the uniformity test must reject."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.kept = capacity, []

    def add(self, batch, task):
        room = self.capacity - sum(len(k) for k in self.kept)
        self.kept.append(batch["id"][:room])

    def stored(self):
        return {"id": torch.cat(self.kept)}


def uniformity_pvalue(make, batch, reps=2000, stream=1000, capacity=100) -> float:
    counts = torch.zeros(stream, dtype=torch.long)
    for r in range(reps):
        mem = make(capacity, r)
        for i in range(0, stream, batch):
            mem.add(ids(i, min(i + batch, stream)), 0)
        kept = mem.stored()["id"]
        assert kept.numel() == capacity and kept.unique().numel() == capacity
        counts += torch.bincount(kept, minlength=stream)
    assert int(counts.sum()) == reps * capacity  # expected 200 per id
    return float(stats.chisquare(counts.numpy()).pvalue)


@pytest.mark.parametrize("batch", [64, 1000])  # 1000: many slot collisions inside one add
def test_reservoir_keeps_a_uniform_sample_of_the_stream(batch):
    p = uniformity_pvalue(lambda c, s: ReservoirMemory(c, seed=s), batch)
    assert p > 0.001


def test_uniformity_test_rejects_a_biased_memory():
    assert uniformity_pvalue(KeepFirst, 64) < 0.001


def test_reservoir_fills_in_order_then_stays_full_and_is_seeded():
    mem = ReservoirMemory(50, seed=1)
    mem.add({"id": torch.arange(30), "x": torch.arange(30.0).unsqueeze(1).repeat(1, 3)}, 0)
    assert len(mem) == 30
    assert torch.equal(mem.stored()["id"], torch.arange(30))
    mem.add(
        {"id": torch.arange(30, 200), "x": torch.arange(30.0, 200).unsqueeze(1).repeat(1, 3)}, 1
    )
    s = mem.stored(with_task=True)
    assert len(mem) == 50 and s["id"].unique().numel() == 50
    assert torch.equal(s["x"][:, 2], s["id"].float())  # rows stay aligned across keys
    assert torch.equal(s["__memory_task__"], (s["id"] >= 30).long())
    assert mem.counts() == {0: int((s["id"] < 30).sum()), 1: int((s["id"] >= 30).sum())}
    twin = ReservoirMemory(50, seed=1)
    twin.add({"id": torch.arange(30), "x": torch.arange(30.0).unsqueeze(1).repeat(1, 3)}, 0)
    twin.add(
        {"id": torch.arange(30, 200), "x": torch.arange(30.0, 200).unsqueeze(1).repeat(1, 3)}, 1
    )
    assert torch.equal(twin.stored()["id"], s["id"])


def test_task_balanced_quotas_are_exact():
    mem = ReservoirMemory(100, task_balanced=True, seed=0)
    for i in range(0, 250, 64):
        mem.add(ids(i, min(i + 64, 250)), 0)
    assert mem.counts() == {0: 100}
    mem.add(ids(1000, 1030), 1)  # fewer samples than its quota of 50
    assert mem.counts() == {0: 50, 1: 30}
    mem.add(ids(2000, 2200), 2)
    assert mem.counts() == {0: 33, 1: 30, 2: 33} and len(mem) == 96
    s = mem.stored(with_task=True)
    assert torch.equal(s["id"] // 1000, s["__memory_task__"])
    assert s["id"].unique().numel() == 96
    with pytest.raises(ValueError, match="cannot hold 3 tasks"):
        small = ReservoirMemory(2, task_balanced=True)
        for t in range(3):
            small.add(ids(10 * t, 10 * t + 5), t)


def test_task_balanced_shrink_keeps_old_tasks_uniform():
    counts = torch.zeros(200, dtype=torch.long)
    for r in range(1000):
        mem = ReservoirMemory(40, task_balanced=True, seed=r)
        mem.add(ids(0, 200), 0)
        mem.add(ids(1000, 1100), 1)  # task 0 shrinks from 40 to 20
        kept = mem.stored()["id"]
        assert mem.counts() == {0: 20, 1: 20}
        counts += torch.bincount(kept[kept < 200], minlength=200)
    assert stats.chisquare(counts.numpy()).pvalue > 0.001


def test_sample_is_distinct_and_bounded():
    mem = ReservoirMemory(1000, seed=0)
    mem.add(ids(0, 1000), 0)
    for n in (10, 600):  # rejection path (n² < N) and permutation path
        s = mem.sample(n)["id"]
        assert s.numel() == n and s.unique().numel() == n
    assert mem.sample(5000)["id"].sort().values.equal(torch.arange(1000))
    assert set(mem.sample(3)) == {"id"}


def test_one_reservoir_shortcut_draws_the_general_paths_sample():
    """With one stored reservoir the sample skips the owner bookkeeping; an empty second
    reservoir forces the general path, which must draw the same rows from the same seed."""
    from crl.strategies.memory import _gather, _Reservoir

    res, empty = _Reservoir(500), _Reservoir(10)
    res.add(ids(100, 400), torch.Generator().manual_seed(1))
    for n in (5, 200, 1000):  # rejection path, permutation path, more than stored
        fast = _gather([res], n, torch.Generator().manual_seed(7))["id"]
        general = _gather([res, empty], n, torch.Generator().manual_seed(7))["id"]
        assert torch.equal(fast, general) and fast.numel() == min(n, 300)


def test_sample_indices_rejection_path_is_uniform():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(1000, dtype=torch.long)
    for _ in range(2000):
        counts += torch.bincount(sample_indices(1000, 10, g), minlength=1000)
    assert stats.chisquare(counts.numpy()).pvalue > 0.001


@pytest.mark.parametrize(
    "batch, match",
    [
        ({}, "non-empty mapping"),
        ({"x": [1, 2]}, "not a tensor"),
        ({"x": torch.tensor(1.0)}, "scalar tensor"),
        ({"x": torch.zeros(3), "y": torch.zeros(4)}, "3"),
        ({"__memory_task__": torch.zeros(3)}, "reserved"),
    ],
)
def test_bad_batches_raise(batch, match):
    with pytest.raises(ValueError, match=match):
        ReservoirMemory(5).add(batch, 0)


def test_schema_changes_and_bad_sizes_raise():
    mem = ReservoirMemory(5)
    with pytest.raises(ValueError, match="empty"):
        mem.sample(1)
    mem.add({"x": torch.zeros(2, 3)}, 0)
    with pytest.raises(ValueError, match="keys"):
        mem.add({"z": torch.zeros(2, 3)}, 0)
    with pytest.raises(ValueError, match="per-sample shape"):
        mem.add({"x": torch.zeros(2, 4)}, 0)
    with pytest.raises(ValueError, match="dtype"):
        mem.add({"x": torch.zeros(2, 3, dtype=torch.float64)}, 0)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirMemory(0)
    with pytest.raises(ValueError, match="task"):
        mem.add({"x": torch.zeros(2, 3)}, -1)


def test_memory_stores_detached_cpu_copies():
    x = torch.randn(4, 2, requires_grad=True)
    mem = ReservoirMemory(10)
    mem.add({"x": x * 2}, 0)
    with torch.no_grad():
        x.mul_(0)
    s = mem.stored()["x"]
    assert not s.requires_grad and s.device.type == "cpu" and s.abs().sum() > 0


def test_batch_helpers():
    a = {"x": torch.arange(3), "y": torch.arange(3) * 10}
    b = {"x": torch.arange(3, 5), "y": torch.arange(3, 5) * 10}
    c = concat_batches([a, b])
    assert torch.equal(c["y"], torch.arange(5) * 10)
    assert torch.equal(index_batch(c, torch.tensor([4, 0]))["x"], torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="different keys"):
        concat_batches([a, {"x": torch.arange(2)}])


def test_reservoir_state_dict_round_trip():
    mem = ReservoirMemory(20, task_balanced=True, seed=4)
    mem.add(ids(0, 50), 0)
    mem.add(ids(100, 150), 1)
    loaded = ReservoirMemory(20, task_balanced=True, seed=99)
    loaded.load_state_dict(roundtrip(mem.state_dict()))
    assert torch.equal(loaded.stored()["id"], mem.stored()["id"])
    assert torch.equal(loaded.sample(7)["id"], mem.sample(7)["id"])  # generator restored
    loaded.add(ids(200, 230), 2)
    mem.add(ids(200, 230), 2)
    assert torch.equal(loaded.stored()["id"], mem.stored()["id"])
    with pytest.raises(ValueError, match="capacity"):
        ReservoirMemory(21, task_balanced=True).load_state_dict(mem.state_dict())


def test_episodic_memory_keeps_per_task_samples():
    mem = EpisodicMemory(per_task=8, seed=0)
    mem.add_task([ids(i, i + 10) for i in range(0, 30, 10)], 0)
    mem.add_task([ids(100, 105)], 1)
    assert mem.counts() == {0: 8, 1: 5} and len(mem) == 13 and mem.tasks == [0, 1]
    t0 = mem.task_samples(0)["id"]
    assert t0.unique().numel() == 8 and bool((t0 < 30).all())
    s = mem.sample(100)["id"]
    assert s.numel() == 13 and s.unique().numel() == 13
    loaded = EpisodicMemory(per_task=8, seed=5)
    loaded.load_state_dict(roundtrip(mem.state_dict()))
    assert torch.equal(loaded.task_samples(0)["id"], t0)
    with pytest.raises(ValueError, match="memory_per_task=8"):
        EpisodicMemory(per_task=4).load_state_dict(mem.state_dict())


# -- A-GEM ------------------------------------------------------------------------------------
class LinearHost:
    """loss = mean(a·w) + mean(d·c): the reference gradient is the memory's mean (a, d)."""

    def __init__(self) -> None:
        self.module = nn.ParameterDict(
            {
                "w": nn.Parameter(torch.zeros(2)),
                "c": nn.Parameter(torch.zeros(1)),
                "e": nn.Parameter(torch.zeros(1)),  # not in the loss: g_ref is None
                "f": nn.Parameter(torch.zeros(1)),  # not in the loss, no grad either
            }
        )
        self.batches = [{"a": torch.tensor([[1.0, 0.0]]), "d": torch.tensor([[2.0]])}]

    def protected_parameters(self):
        return dict(self.module.items())

    def trained_parameters(self):
        return list(self.module.values())

    def importance_batches(self):
        return self.batches

    def output_distribution(self, batch):  # pragma: no cover - unused by A-GEM
        raise NotImplementedError

    def loss(self, batch):
        m = self.module
        return (batch["a"] @ m["w"]).mean() + (batch["d"] * m["c"]).mean()


def set_grads(host, w, c=None, e=None):
    m = host.module
    m["w"].grad = None if w is None else torch.tensor(w)
    m["c"].grad = None if c is None else torch.tensor(c)
    m["e"].grad = None if e is None else torch.tensor(e)
    m["f"].grad = None


def test_agem_projects_a_conflicting_gradient_by_hand():
    host = LinearHost()
    agem = AGEM(memory_per_task=4, batch_size=4).bind(host)
    agem.on_task_start(0)
    set_grads(host, [5.0, 5.0], [1.0])
    agem.before_optimizer_step()  # empty memory: nothing happens
    assert torch.equal(host.module["w"].grad, torch.tensor([5.0, 5.0])) and agem.num_updates == 0
    agem.on_task_end(0)
    # g = ([-1, 1], c: None -> 0, e: 3), g_ref = ([1, 0], 2, e: none); g·g_ref = -1,
    # ‖g_ref‖² = 5, g' = g + 0.2 g_ref = ([-0.8, 1], 0.4, 3).
    set_grads(host, [-1.0, 1.0], None, [3.0])
    agem.before_optimizer_step()
    m = host.module
    torch.testing.assert_close(m["w"].grad, torch.tensor([-0.8, 1.0]), rtol=0, atol=1e-7)
    torch.testing.assert_close(m["c"].grad, torch.tensor([0.4]), rtol=0, atol=1e-7)
    assert torch.equal(m["e"].grad, torch.tensor([3.0])) and m["f"].grad is None
    dot = m["w"].grad @ torch.tensor([1.0, 0.0]) + m["c"].grad @ torch.tensor([2.0])
    assert float(dot) >= -1e-7
    assert (agem.num_updates, agem.num_projections, agem.last_dot) == (1, 1, -1.0)


@pytest.mark.parametrize("w", [[1.0, 1.0], [0.0, 5.0]])  # g·g_ref = 1 > 0 and = 0
def test_agem_leaves_a_non_conflicting_gradient_bit_identical(w):
    host = LinearHost()
    agem = AGEM(memory_per_task=4, batch_size=4).bind(host)
    agem.on_task_end(0)
    set_grads(host, w, None, [3.0])
    agem.before_optimizer_step()
    m = host.module
    assert torch.equal(m["w"].grad, torch.tensor(w))  # g_ref not added into .grad
    assert m["c"].grad is None and m["f"].grad is None
    assert torch.equal(m["e"].grad, torch.tensor([3.0]))
    assert (agem.num_updates, agem.num_projections) == (1, 0)


class MLPHost(TinyMultiHeadHost):
    """Two-task multi-head MLP classifier: Linear(5, 8)-Tanh trunk, Linear(8, 3) heads."""

    def __init__(self, seed: int = 0, n: int = 24) -> None:
        super().__init__((5, 8), 2, nn.Tanh, seed, n)


def test_agem_projection_on_an_mlp_matches_the_formula():
    host = MLPHost()
    agem = make_strategy("agem", memory_per_task=8, batch_size=64, seed=1).bind(host)
    agem.on_task_end(0)
    params = host.trained_parameters()
    mem = agem.memory.task_samples(0)
    ref = torch.autograd.grad(host.loss(mem), params, allow_unused=True)
    ref = [torch.zeros_like(p) if r is None else r for p, r in zip(params, ref, strict=True)]
    host.task = 1
    g = torch.Generator().manual_seed(3)
    for p, r in zip(params, ref, strict=True):  # g = -g_ref + noise: a sure conflict
        p.grad = -r + 0.1 * torch.randn(p.shape, generator=g)
    g0 = [p.grad.clone() for p in params]
    dot = sum((a * r).sum() for a, r in zip(g0, ref, strict=True))
    sq = sum((r * r).sum() for r in ref)
    assert dot < 0
    agem.before_optimizer_step()
    for p, a, r in zip(params, g0, ref, strict=True):
        torch.testing.assert_close(p.grad, a - dot / sq * r, rtol=1e-5, atol=1e-6)
    after = sum((p.grad * r).sum() for p, r in zip(params, ref, strict=True))
    assert float(after) >= -1e-5
    assert agem.num_projections == 1
    assert agem.diagnostics()["agem/projection_rate"] == 1.0


def test_agem_state_dict_round_trip():
    host = MLPHost()
    agem = AGEM(memory_per_task=6, batch_size=4, seed=2).bind(host)
    agem.on_task_end(0)
    for p in host.trained_parameters():
        p.grad = torch.ones_like(p)
    agem.before_optimizer_step()
    loaded = AGEM(memory_per_task=6, batch_size=99, seed=0).bind(host)
    loaded.load_state_dict(roundtrip(agem.state_dict()))
    assert loaded.batch_size == 4 and loaded.tasks_seen == 1
    assert (loaded.num_updates, loaded.num_projections) == (agem.num_updates, agem.num_projections)
    for k, v in agem.memory.task_samples(0).items():
        assert torch.equal(loaded.memory.task_samples(0)[k], v)
    grads = []
    for strat in (agem, loaded):  # same memory and generator state -> same projection
        for p in host.trained_parameters():
            p.grad = -torch.ones_like(p)
        strat.before_optimizer_step()
        grads.append([p.grad.clone() for p in host.trained_parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


# -- Replay -----------------------------------------------------------------------------------
def test_rehearsal_penalty_is_lam_times_the_memory_loss():
    host = MLPHost()
    rep = Replay(memory_size=10, batch_size=4, lam=0.5, seed=3).bind(host)
    assert rep.penalty() is None
    rep.on_task_end(0)
    assert len(rep.memory) == 10
    twin = ReservoirMemory(10, seed=0)
    twin.load_state_dict(copy.deepcopy(rep.memory.state_dict()))
    pen = rep.penalty()
    batch = twin.sample(4)
    assert set(batch) == {"x", "y", "task"} and batch["x"].shape == (4, 5)
    assert torch.equal(pen, 0.5 * host.loss(batch))
    assert pen.requires_grad


def test_rehearsal_task_balanced_and_round_trip():
    host = MLPHost()
    rep = make_strategy("replay", memory_size=10, batch_size=3, task_balanced=True, seed=1)
    rep.bind(host)
    rep.on_task_end(0)
    host.task = 1
    rep.on_task_end(1)
    assert rep.memory.counts() == {0: 5, 1: 5}
    loaded = Replay(memory_size=10, batch_size=3, task_balanced=True).bind(host)
    loaded.load_state_dict(roundtrip(rep.state_dict()))
    assert torch.equal(loaded.penalty(), rep.penalty())
    with pytest.raises(ValueError, match="mode"):
        Replay(memory_size=10, task_balanced=True, mode="distill").load_state_dict(rep.state_dict())


class ConstantHost:
    """Outputs do not depend on the input: a categorical over 2 classes or a 2-d Gaussian."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.module = nn.ParameterDict(
            {"a": nn.Parameter(torch.zeros(2)), "b": nn.Parameter(torch.zeros(2))}
        )

    def protected_parameters(self):
        return dict(self.module.items())

    def trained_parameters(self):
        return list(self.module.values())

    def importance_batches(self):
        return [{"x": torch.zeros(4, 1)}]

    def output_distribution(self, batch):
        n = batch["x"].shape[0]
        a, b = self.module["a"], self.module["b"]
        if self.kind == "categorical":
            return torch.distributions.Categorical(logits=a.expand(n, 2), validate_args=False)
        normal = torch.distributions.Normal(a.expand(n, 2), b.exp().expand(n, 2))
        if self.kind == "normal":
            return normal
        return torch.distributions.Independent(normal, 1)

    def loss(self, batch):  # pragma: no cover - unused by distillation
        raise NotImplementedError


@pytest.mark.parametrize(
    "kind, new_a, new_b, kl",
    [
        # KL([.5,.5] || [.75,.25]) = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)
        ("categorical", [math.log(3.0), 0.0], [0.0, 0.0], 0.5 * math.log(4 / 3)),
        # KL(N(0,1) || N(1,2²)) = ln 2 + (1 + 1)/(2·4) − 1/2 per dim; dim 2 unchanged: 0
        ("independent", [1.0, 0.0], [math.log(2.0), 0.0], math.log(2) + 0.25 - 0.5),
        ("normal", [1.0, 0.0], [math.log(2.0), 0.0], (math.log(2) + 0.25 - 0.5) / 2),
    ],
)
def test_distill_penalty_is_the_hand_computed_kl(kind, new_a, new_b, kl):
    host = ConstantHost(kind)
    rep = Replay(memory_size=8, batch_size=4, mode="distill", lam=2.0).bind(host)
    rep.on_task_end(0)
    assert abs(rep.penalty().item()) < 1e-7  # same model: KL(p || p) = 0
    with torch.no_grad():
        host.module["a"].copy_(torch.tensor(new_a))
        host.module["b"].copy_(torch.tensor(new_b))
    pen = rep.penalty()
    assert math.isclose(pen.item(), 2.0 * kl, rel_tol=1e-5)
    pen.backward()
    assert host.module["a"].grad is not None


def test_distill_on_a_classifier_is_zero_then_positive_and_round_trips():
    host = MLPHost()
    rep = make_strategy("replay", memory_size=16, batch_size=8, mode="distill", seed=0)
    rep.bind(host)
    rep.on_task_end(0)
    assert set(rep.memory.sample(2)) == {"x", "y", "task", "__replay_old_logits__"}
    assert abs(rep.penalty().item()) < 1e-6
    host.task = 1
    opt = torch.optim.SGD(host.trained_parameters(), lr=0.5)
    for batch in host.importance_batches():
        opt.zero_grad()
        host.loss(batch).backward()
        opt.step()
    state = roundtrip(rep.state_dict())
    loaded = Replay(memory_size=16, batch_size=8, mode="distill").bind(host)
    loaded.load_state_dict(state)
    p1, p2 = rep.penalty(), loaded.penalty()
    assert p1.item() > 1e-4
    assert torch.equal(p1, p2)


def test_distill_rejects_other_distributions():
    host = ConstantHost("categorical")
    host.output_distribution = lambda batch: torch.distributions.Bernoulli(logits=torch.zeros(4))
    rep = Replay(mode="distill").bind(host)
    with pytest.raises(TypeError, match="Categorical, Normal"):
        rep.on_task_end(0)


def test_buffer_mode_keeps_every_sample_and_draws_uniformly_over_all_data():
    """CW's perfect memory: the finished task's whole data enters the memory, and of a batch
    of n, k ~ Binomial(n, M / (M + F)) samples come from it (M stored, F the host's own)."""
    host = MLPHost(n=24)
    rep = make_strategy("replay", mode="buffer").bind(host)
    assert rep.replay_batch(16, 72) is None  # nothing stored yet
    rep.on_task_start(0)
    rep.on_task_end(0)
    assert len(rep.memory) == 24 and rep.penalty() is None
    assert torch.equal(rep.memory.stored()["x"], host.data[0]["x"])  # every sample, in order
    sizes = []
    for _ in range(2000):
        extra = rep.replay_batch(16, 72)
        sizes.append(0 if extra is None else batch_length(extra))
        if extra is not None:
            assert set(extra) == {"x", "y", "task"} and bool((extra["task"] == 0).all())
    # mean 16 * 24 / 96 = 4, standard error sqrt(16 * 0.25 * 0.75 / 2000) = 0.039
    assert abs(np.mean(sizes) - 4.0) < 0.15
    assert abs(np.mean(np.array(sizes) == 0) - 0.75**16) < 0.01
    full = rep.replay_batch(16, 0)  # no own data: the whole batch is stored samples
    assert full is not None and batch_length(full) == 16
    host.task = 1
    rep.on_task_start(1)
    rep.on_task_end(1)
    assert rep.memory.counts() == {0: 24, 1: 24}
    assert Replay(mode="rehearsal").replay_batch(16, 0) is None  # only buffer mode mixes


def test_buffer_mode_share_counts_every_sample_seen_and_appending_hosts():
    """A full reservoir stands for everything it has seen: S = 96 seen (M = 24 stored),
    F = 32 own, a drawing host gets k ~ Binomial(n, 96/128); a host that appends to its own
    n gets n S / F = 3n on average (stochastic rounding), so every sample seen weighs the
    same per epoch."""
    host = MLPHost(n=96)
    rep = make_strategy("replay", mode="buffer", memory_size=24).bind(host)
    rep.on_task_start(0)
    rep.on_task_end(0)
    assert len(rep.memory) == 24 and rep.memory.seen == 96
    drawn = [batch_length(rep.replay_batch(16, 32) or {"x": torch.zeros(0)})
             for _ in range(2000)]
    assert abs(np.mean(drawn) - 16 * 0.75) < 0.15  # sd 1.73 / sqrt(2000) = 0.04
    appended = [batch_length(rep.replay_batch(5, 32, appended=True)) for _ in range(2000)]
    assert set(appended) == {15}  # 5 * 96 / 32 = 15 exactly
    frac = [batch_length(rep.replay_batch(3, 40, appended=True)) for _ in range(4000)]
    assert set(frac) == {7, 8} and abs(np.mean(frac) - 7.2) < 0.03  # 3 * 96 / 40 = 7.2


def test_balanced_mode_fixed_share_ignores_how_much_each_side_has_seen():
    """Balanced replay (``share``): a drawing host gets n * share stored samples whatever
    S and F are (the uniform draw would give 16 * 96/128 = 12 here); an appending host
    n * share / (1 - share), so the stored part of its combined batch is again ``share``;
    with no own data yet the whole batch is stored samples."""
    host = MLPHost(n=96)
    rep = make_strategy("replay", mode="balanced", memory_size=24, share=0.25).bind(host)
    rep.on_task_start(0)
    rep.on_task_end(0)
    assert {batch_length(rep.replay_batch(16, 32)) for _ in range(200)} == {4}  # 16 / 4
    assert {batch_length(rep.replay_batch(16, 10_000)) for _ in range(200)} == {4}
    drawn = [batch_length(rep.replay_batch(10, 32) or {"x": torch.zeros(0)})
             for _ in range(4000)]  # 2.5: 2 or 3, mean exact
    assert set(drawn) == {2, 3} and abs(np.mean(drawn) - 2.5) < 0.03
    appended = [batch_length(rep.replay_batch(6, 32, appended=True)) for _ in range(200)]
    assert set(appended) == {2}  # 6 * 0.25 / 0.75: 2 of 8 in the combined batch
    assert batch_length(rep.replay_batch(16, 0)) == 16
    for bad in (0.0, 1.0, -0.5, True, "half"):
        with pytest.raises(ValueError, match=r"share must be a number in \(0, 1\)"):
            Replay(mode="balanced", share=bad)
    assert "share" in Replay(mode="rehearsal", share=0.5).unused_options()
    small = make_strategy("replay", mode="balanced", memory_size=3).bind(host)
    small.on_task_start(0)
    small.on_task_end(0)
    with pytest.warns(UserWarning, match="holds 3 samples, fewer than the 8"):
        assert batch_length(small.replay_batch(16, 32)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per run, not per update
        small.replay_batch(16, 32)
    assert "share" in Replay(mode="buffer", share=0.5).unused_options()  # uniform there
    assert set(Replay(mode="balanced").unused_options()) == {"batch_size", "lam"}


def test_buffer_mode_needs_a_host_that_keeps_its_data():
    rep = Replay(mode="buffer").bind(ConstantHost("categorical"))
    with pytest.raises(TypeError, match="keeps no training samples"):
        rep.on_task_end(0)


def test_replay_bad_options_raise():
    with pytest.raises(ValueError, match="rehearsal, distill, buffer"):
        Replay(mode="mix")
    with pytest.raises(ValueError, match="lam"):
        Replay(lam=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        Replay(batch_size=0)
    with pytest.raises(ValueError, match="memory_size"):
        Replay(memory_size=0)
