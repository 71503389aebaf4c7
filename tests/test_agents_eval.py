"""Batched evaluation (agents/evaluation.py): equal to the per-task loop, per-slot heads,
per-task evaluation contexts, success recording, score normalisation and its cache."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import agents.evaluation as evaluation
from agents.evaluation import (
    BatchedEvaluator,
    EvalResult,
    build_normalizer,
    evaluate_per_task,
    random_returns,
    slot_seeds,
)
from agents.heads import MultiHeadLinear, task_index_from_obs
from crl.strategies.base import Strategy
from envs.registry import get_sequence
from envs.sequence import TaskSequence
from envs.spec import TaskSpec


# -- a tiny env that reports success, registered for these tests ------------------------------
class SuccessEnv(gym.Env):
    """5 steps per episode, reward 1 per step; succeeds at step 2 (not at the last step)
    when the reset seed is divisible by 3, so the expected success rate is computable."""

    observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.succeeds = seed is not None and seed % 3 == 0
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        info = {"success": float(self.succeeds and self.t == 2)}
        return np.zeros(2, np.float32), 1.0, False, self.t >= 5, info


if "crl-test/Success-v0" not in gym.registry:
    gym.register("crl-test/Success-v0", entry_point=SuccessEnv)


def success_sequence() -> TaskSequence:
    tasks = [TaskSpec("crl-test/Success-v0", name=f"s{i}", score_kind="success") for i in range(2)]
    return TaskSequence("SuccessSeq", tasks, steps_per_task=100)


# -- hand-made policies --------------------------------------------------------------------------
class HeadPolicy(torch.nn.Module):
    """A multi-head CartPole controller: head 0 pushes towards the pole's fall
    (theta + theta_dot > 0 -> right), head 1 the opposite (right for swapped actions)."""

    def __init__(self, swap_heads: bool = False) -> None:
        super().__init__()
        self.head = MultiHeadLinear(4, 2, 2)
        with torch.no_grad():
            w = torch.tensor([0.0, 0.0, 1.0, 1.0])
            signs = (-1.0, 1.0) if swap_heads else (1.0, -1.0)
            for h, s in enumerate(signs):
                self.head.weights[h].zero_()
                self.head.biases[h].zero_()
                self.head.weights[h][1] = s * w
        self.calls: list[int] = []

    def predict(self, obs, deterministic=True):
        x = torch.as_tensor(obs, dtype=torch.float32)
        self.calls.append(len(x))
        task = task_index_from_obs(x, 2)
        logits = self.head(x[:, :4], task)
        return logits.argmax(-1).numpy(), None


class SwapContext(Strategy):
    """Evaluation context that flips the single-head controller for task 1 (as PackNet
    changes weights per task) and records which tasks it was entered for."""

    def __init__(self, policy: SingleHead) -> None:
        super().__init__()
        self.policy = policy
        self.entered: list[int] = []

    @contextlib.contextmanager
    def evaluation(self, task):
        self.entered.append(task)
        self.policy.flip = task == 1
        try:
            yield
        finally:
            self.policy.flip = False


class SingleHead:
    def __init__(self) -> None:
        self.flip = False

    def predict(self, obs, deterministic=True):
        right = (obs[:, 2] + obs[:, 3]) > 0
        return (right ^ self.flip).astype(np.int64), None


@pytest.fixture(scope="module")
def cartpole() -> TaskSequence:
    return get_sequence("CartPoleSwap")


# -- tests ---------------------------------------------------------------------------------------
def test_batched_equals_per_task_loop_with_a_real_ppo_policy(cartpole) -> None:
    """The batched evaluator runs the policy on up to 8 rows at once, the loop on 1: GEMMs
    of different shapes may round the logits differently (the BLAS picks its kernel per
    shape; ~1e-9 apart here), so the greedy actions, hence the returns, are equal only if
    no decision is within float error of a tie. The seed gives a smallest logit margin of
    ~5e-5 (seed 3 had 1e-8, a flip away on another CPU), and the test checks the margin."""
    from stable_baselines3 import PPO

    env = cartpole.make_eval_env(0, append_task_id=True)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=2,
                policy_kwargs={"net_arch": [16]})
    margins: list[float] = []
    predict = model.policy.predict

    def recording(obs, *args, **kwargs):
        with torch.no_grad():
            logits = model.policy.get_distribution(torch.as_tensor(obs)).distribution.logits
        margins.append(float((logits[:, 0] - logits[:, 1]).abs().min()))
        return predict(obs, *args, **kwargs)

    model.policy.predict = recording
    with BatchedEvaluator(cartpole, 4) as ev:
        batched = ev.evaluate(model)
        again = ev.evaluate(model)  # the same seeds every evaluation
    loop = evaluate_per_task(model, cartpole, 4)
    assert min(margins) > 1e-6  # far from a tie: rounding cannot flip an action
    assert batched.returns.shape == (2, 4)
    np.testing.assert_array_equal(batched.returns, loop.returns)
    np.testing.assert_array_equal(batched.lengths, loop.lengths)
    np.testing.assert_array_equal(batched.returns, again.returns)
    assert np.all(batched.returns == batched.lengths)  # CartPole: reward 1 per step
    assert len(set(batched.returns.ravel().tolist())) > 1  # the seeds differ per slot
    assert np.all(np.isnan(batched.success_rates))  # CartPole reports no success


def test_batched_equals_loop_for_continuous_sac() -> None:
    from stable_baselines3 import SAC

    seq = get_sequence("PendulumVariants")
    model = SAC("MlpPolicy", seq.make_eval_env(0, append_task_id=True), seed=0,
                policy_kwargs={"net_arch": [16]}, buffer_size=100)
    with BatchedEvaluator(seq, 2, tasks=[1, 3]) as ev:
        batched = ev.evaluate(model)
    loop = evaluate_per_task(model, seq, 2, tasks=[1, 3])
    assert batched.tasks == (1, 3)
    np.testing.assert_allclose(batched.returns, loop.returns, rtol=1e-5)
    np.testing.assert_array_equal(batched.lengths, np.full((2, 2), 200))


def test_one_predict_call_per_step_and_each_slot_uses_its_own_head(cartpole) -> None:
    policy = HeadPolicy()
    with BatchedEvaluator(cartpole, 3) as ev:
        res = ev.evaluate(policy)
        # every call holds the live slots of both tasks: never more calls than steps
        assert len(policy.calls) == res.lengths.max()
        assert policy.calls[0] == 6
        # the right head balances both tasks for the whole horizon (200 steps)
        np.testing.assert_array_equal(res.returns, np.full((2, 3), 200.0))
        swapped = ev.evaluate(HeadPolicy(swap_heads=True))
    # the wrong head for each task fails it fast
    assert swapped.returns.max() < 50


def test_per_task_context_is_entered_for_each_task(cartpole) -> None:
    policy = SingleHead()
    strategy = SwapContext(policy)
    with BatchedEvaluator(cartpole, 2) as ev:
        plain = ev.evaluate(policy)  # no strategy: the un-flipped controller fails task 1
        res = ev.evaluate(policy, strategy=strategy)
    assert plain.returns[0].min() == 200 and plain.returns[1].max() < 50
    np.testing.assert_array_equal(res.returns, np.full((2, 2), 200.0))
    assert set(strategy.entered) == {0, 1}
    loop = evaluate_per_task(policy, cartpole, 2, strategy=strategy)
    np.testing.assert_array_equal(res.returns, loop.returns)


def test_base_strategy_needs_no_context() -> None:
    assert evaluation.per_task_context(object(), Strategy()) is None


def test_success_at_any_step_counts_and_matches_the_seeds() -> None:
    seq = success_sequence()
    with BatchedEvaluator(seq, 6) as ev:
        res = ev.evaluate(SingleHeadDiscrete())
    seeds = np.array(slot_seeds(seq, 6))
    expected = (seeds % 3 == 0).astype(float)
    np.testing.assert_array_equal(res.successes, expected)
    np.testing.assert_array_equal(res.returns, np.full((2, 6), 5.0))
    loop = evaluate_per_task(SingleHeadDiscrete(), seq, 6)
    np.testing.assert_array_equal(loop.successes, expected)
    norm = build_normalizer(seq)
    assert norm.kind == ["success", "success"]
    np.testing.assert_allclose(norm.scores(res), expected.mean(axis=1))


class SingleHeadDiscrete:
    def predict(self, obs, deterministic=True):
        return np.zeros(len(obs), np.int64), None


def test_normalisation_with_configured_bounds(cartpole) -> None:
    norm = build_normalizer(cartpole)
    assert norm.complete
    res = EvalResult((0, 1), np.array([[50.0, 150.0], [300.0, 210.0]]),
                     np.zeros((2, 2), int), np.full((2, 2), np.nan))
    # task 0: mean 100 of [0, 200] -> 0.5; task 1: 255 -> clipped to 1
    np.testing.assert_allclose(norm.scores(res), [0.5, 1.0])


def test_random_returns_are_measured_once_and_cached(tmp_path: Path, monkeypatch) -> None:
    seq = get_sequence("PendulumVariants")
    first = random_returns(seq, [0, 2], episodes=2, seed=0, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 2
    stored = json.loads(files[0].read_text())
    assert stored["mean_return"] == pytest.approx(np.mean(stored["returns"]))
    assert all(-2000 < v < -500 for v in first.values())  # Pendulum's random return

    def fail(*a, **k):
        raise AssertionError("cached returns must not be measured again")

    monkeypatch.setattr(evaluation, "BatchedEvaluator", fail)
    assert random_returns(seq, [0, 2], episodes=2, seed=0, cache_dir=tmp_path) == first


def test_missing_upper_bound_names_the_reference_command(tmp_path: Path) -> None:
    seq = get_sequence("PendulumVariants")
    norm = build_normalizer(seq, random_episodes=1, cache_dir=tmp_path,
                            reference_hint="crl reference --sequence PendulumVariants")
    assert not norm.complete and set(norm.missing) == {0, 1, 2, 3}
    assert "no upper return bound" in norm.missing[0]
    assert "crl reference --sequence PendulumVariants" in norm.missing_reason
    assert np.isnan(norm.score(0, np.array([-300.0])))
    refs = {i: -150.0 for i in range(4)}
    norm = build_normalizer(seq, reference_returns=refs, random_episodes=1, cache_dir=tmp_path)
    assert norm.complete
    low = norm.low[0]
    assert norm.score(0, np.array([(low - 150.0) / 2])) == pytest.approx(0.5)
    bad = build_normalizer(seq, reference_returns={i: -5000.0 for i in range(4)},
                           random_episodes=1, cache_dir=tmp_path)
    assert "not above the random policy" in bad.missing[0]


def test_bad_arguments_are_clear_errors(cartpole) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        BatchedEvaluator(cartpole, 0)
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 2\)"):
        BatchedEvaluator(cartpole, 1, tasks=[2])
    with BatchedEvaluator(cartpole, 1) as ev, pytest.raises(TypeError, match="predict"):
        ev.evaluate(object())


def test_episode_length_cap_is_the_same_in_both_implementations(cartpole) -> None:
    policy = HeadPolicy()  # balances for the whole 200-step horizon
    with BatchedEvaluator(cartpole, 2, max_steps=37) as ev:
        capped = ev.evaluate(policy)
    np.testing.assert_array_equal(capped.lengths, np.full((2, 2), 37))
    np.testing.assert_array_equal(capped.returns, np.full((2, 2), 37.0))
    loop = evaluate_per_task(policy, cartpole, 2, max_steps=37)
    np.testing.assert_array_equal(loop.returns, capped.returns)
    with pytest.raises(ValueError, match="max steps must be a positive integer"):
        BatchedEvaluator(cartpole, 1, max_steps=0)
