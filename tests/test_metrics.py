"""Hand-worked checks of crl.metrics; every expected number is derived in a comment."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from crl import metrics as m

# R[i, j]: score on task j after training task i.
R3 = np.array(
    [
        [0.9, 0.1, 0.2],
        [0.6, 0.8, 0.3],
        [0.5, 0.7, 0.95],
    ]
)


# ---------------------------------------------------------------------------------------------
# normalize_score
# ---------------------------------------------------------------------------------------------
def test_normalize_score_scalar_and_clip() -> None:
    assert m.normalize_score(150.0, 100.0, 200.0) == pytest.approx(0.5)  # 50 / 100
    assert isinstance(m.normalize_score(150.0, 100.0, 200.0), float)
    assert m.normalize_score(250.0, 100.0, 200.0) == 1.0  # 1.5 clipped
    assert m.normalize_score(50.0, 100.0, 200.0) == 0.0  # -0.5 clipped
    assert m.normalize_score(250.0, 100.0, 200.0, clip=False) == pytest.approx(1.5)
    assert m.normalize_score(-150.0, -200.0, -100.0) == pytest.approx(0.5)  # negative returns


def test_normalize_score_arrays_with_per_task_bounds() -> None:
    raw = np.array([[0.0, 10.0], [5.0, 30.0]])  # (evals, tasks)
    low = np.array([0.0, 10.0])
    high = np.array([10.0, 20.0])
    # task 0: 0/10, 5/10; task 1: 0/10, 20/10 -> clipped to 1
    np.testing.assert_allclose(m.normalize_score(raw, low, high), [[0.0, 0.0], [0.5, 1.0]])


def test_normalize_score_bad_bounds() -> None:
    with pytest.raises(ValueError, match="high > low"):
        m.normalize_score(1.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="high > low"):
        m.normalize_score([1.0, 2.0], [0.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        m.normalize_score(float("nan"), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Performance matrix
# ---------------------------------------------------------------------------------------------
def test_average_and_final_performance() -> None:
    # all tasks: row means 1.2/3, 1.7/3, 2.15/3
    np.testing.assert_allclose(m.average_performance(R3), [0.4, 1.7 / 3, 2.15 / 3])
    # seen only: 0.9, (0.6 + 0.8)/2, 2.15/3
    np.testing.assert_allclose(m.average_performance(R3, seen_only=True), [0.9, 0.7, 2.15 / 3])
    assert m.final_performance(R3) == pytest.approx(2.15 / 3)


def test_seen_only_ignores_unevaluated_upper_triangle() -> None:
    R = R3.copy()
    R[0, 1] = R[0, 2] = R[1, 2] = np.nan
    np.testing.assert_allclose(m.average_performance(R, seen_only=True), [0.9, 0.7, 2.15 / 3])
    with pytest.raises(ValueError, match="nan"):
        m.average_performance(R)
    with pytest.raises(ValueError, match="superdiagonal"):
        m.fwt(R, [0.0, 0.0, 0.0])


def test_forgetting_bwt_fwt_3x3() -> None:
    # F_0 = 0.9 - 0.5 = 0.4, F_1 = 0.8 - 0.7 = 0.1
    np.testing.assert_allclose(m.forgetting(R3), [0.4, 0.1])
    assert m.average_forgetting(R3) == pytest.approx(0.25)
    # BWT = ((0.5 - 0.9) + (0.7 - 0.8)) / 2 = -0.25
    assert m.bwt(R3) == pytest.approx(-0.25)
    # FWT = ((R[0,1] - b_1) + (R[1,2] - b_2)) / 2 = ((0.1 - 0.05) + (0.3 - 0.25)) / 2 = 0.05
    assert m.fwt(R3, [0.1, 0.05, 0.25]) == pytest.approx(0.05)
    # curve: [nan, 0.9 - 0.6, ((0.9 - 0.5) + (0.8 - 0.7)) / 2]
    curve = m.forgetting_curve(R3)
    assert math.isnan(curve[0])
    np.testing.assert_allclose(curve[1:], [0.3, 0.25])


def test_single_task_matrix() -> None:
    R = np.array([[0.7]])
    assert m.forgetting(R).shape == (0,)
    assert m.final_performance(R) == pytest.approx(0.7)
    for fn in (m.average_forgetting, m.bwt):
        with pytest.raises(ValueError, match="at least 2 tasks"):
            fn(R)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        m.fwt(R, [0.1])


def test_matrix_shape_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        m.average_performance(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one score per task"):
        m.fwt(R3, [0.1, 0.2])


# ---------------------------------------------------------------------------------------------
# Evaluation history
# ---------------------------------------------------------------------------------------------
# Two tasks of 100 steps, evaluated every 25 steps: windows [0, 100] (evals 0..4) and
# [100, 200] (evals 4..8); the evaluation at step 100 belongs to both.
STEPS = np.arange(0, 201, 25)
P0 = [0.0, 0.2, 0.4, 0.6, 0.8, 0.7, 0.6, 0.5, 0.4]
P1 = [0.0, 0.0, 0.1, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def _history() -> m.EvalHistory:
    return m.EvalHistory(
        steps=STEPS, scores=np.array([P0, P1]).T, task_starts=[0, 100], total_steps=200
    )


def _ref(scores: list[float]) -> m.EvalHistory:
    return m.EvalHistory(
        steps=np.arange(0, 101, 25),
        scores=np.array(scores)[:, None],
        task_starts=[0],
        total_steps=100,
    )


def test_performance_curve_and_auc() -> None:
    h = _history()
    # P = (p0 + p1) / 2
    np.testing.assert_allclose(
        m.performance_curve(h), [0.0, 0.1, 0.25, 0.35, 0.5, 0.55, 0.6, 0.65, 0.7]
    )
    assert m.auc(h, 0) == pytest.approx(0.4)  # mean(0, .2, .4, .6, .8)
    assert m.auc(h, 1) == pytest.approx(0.6)  # mean(.2, .4, .6, .8, 1.0), step 100 included
    with pytest.raises(IndexError):
        m.auc(h, 2)


def test_forgetting_from_history_with_k() -> None:
    h = _history()
    # k=1: last eval in task 0's window (0.8) - last eval of the run (0.4) = 0.4
    np.testing.assert_allclose(m.forgetting_from_history(h, k=1), [0.4])
    # k=2: mean(0.6, 0.8) - mean(0.5, 0.4) = 0.7 - 0.45 = 0.25
    np.testing.assert_allclose(m.forgetting_from_history(h, k=2), [0.25])
    # k=5: the window's evaluations after its start, mean(.2, .4, .6, .8) = 0.5, minus p0
    # over the last task's window after step 100, mean(.7, .6, .5, .4) = 0.55 -> -0.05
    # (negative = the score rose afterwards); step 0 and step 100 precede each task's
    # training: not end values
    np.testing.assert_allclose(m.forgetting_from_history(h, k=5), [-0.05])
    # k larger than a window uses all its later evaluations: same as k=5 here
    np.testing.assert_allclose(m.forgetting_from_history(h, k=50), [-0.05])
    with pytest.raises(ValueError, match="k must be"):
        m.forgetting_from_history(h, k=0)


def test_one_evaluation_per_task_is_its_end_value() -> None:
    """Evaluated only at the task boundaries (steps 0, 100, 200): each task's end value is
    the evaluation at its end, never averaged with the one before its training."""
    h = m.EvalHistory(steps=[0, 100, 200], scores=[[0.1, 0.0], [0.9, 0.2], [0.5, 0.8]],
                      task_starts=[0, 100], total_steps=200)
    np.testing.assert_allclose(m.end_of_task_scores(h, k=5), [0.9, 0.8])
    np.testing.assert_allclose(m.forgetting_from_history(h, k=5), [0.9 - 0.5])
    np.testing.assert_allclose(m.new_task_gain_from_history(h, k=5), [0.8 - 0.2])
    assert m.plasticity_slope(m.end_of_task_scores(h)) == pytest.approx(-0.1)
    # the run's per-task table reads the same end values: end of task - final = forgetting
    from agents.results import metric_rows

    rows = metric_rows(m.summarize(h), h, ["a", "b"], k=5)
    assert [r["end_of_task"] for r in rows] == pytest.approx([0.9, 0.8])
    assert [r["final"] for r in rows] == pytest.approx([0.5, 0.8])
    assert rows[0]["end_of_task"] - rows[0]["final"] == pytest.approx(rows[0]["forgetting"])
    # the baseline of the gain is the score at (or last before) the task's start, never an
    # evaluation taken after some of its training
    late = m.EvalHistory(steps=[0, 90, 150, 200], scores=[[0.1, 0.0], [0.9, 0.2], [0.6, 0.5],
                                                          [0.5, 0.8]],
                         task_starts=[0, 100], total_steps=200)
    np.testing.assert_allclose(m.new_task_gain_from_history(late, k=5), [0.65 - 0.2])
    starts_only = m.EvalHistory(steps=[0, 100], scores=[[0.1, 0.0], [0.9, 0.2]],
                                task_starts=[0, 100], total_steps=200)
    with pytest.raises(ValueError, match=r"task 1's window \(100, 200\] after its start"):
        m.end_of_task_scores(starts_only)


def test_forward_transfer_hand_made_curves() -> None:
    h = _history()
    # ref 0: AUC_b = mean(0, .1, .2, .3, .4) = 0.2; FT_0 = (0.4 - 0.2) / (1 - 0.2) = 0.25
    # ref 1: AUC_b = mean(.5, .6, .7, .8, .9) = 0.7; FT_1 = (0.6 - 0.7) / (1 - 0.7) = -1/3
    refs = [_ref([0.0, 0.1, 0.2, 0.3, 0.4]), _ref([0.5, 0.6, 0.7, 0.8, 0.9])]
    np.testing.assert_allclose(m.forward_transfer_from_history(h, refs), [0.25, -1 / 3])
    assert m.forward_transfer(0.4, 0.2) == pytest.approx(0.25)
    np.testing.assert_allclose(m.forward_transfer([0.4, 0.6], [0.2, 0.7]), [0.25, -1 / 3])


def test_forward_transfer_perfect_reference_is_nan_with_warning() -> None:
    with pytest.warns(RuntimeWarning, match="reference AUC is 1"):
        assert math.isnan(m.forward_transfer(0.9, 1.0))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        m.forward_transfer(1.2, 0.5)


def test_forward_transfer_window_mismatch() -> None:
    h = _history()
    short = m.EvalHistory(
        steps=[0, 25, 50], scores=[[0.1], [0.2], [0.3]], task_starts=[0], total_steps=50
    )
    with pytest.raises(ValueError, match="same\\s+per-task step budget|covers 50 steps"):
        m.forward_transfer_from_history(h, [short, short])
    with pytest.raises(ValueError, match="one reference history per task"):
        m.forward_transfer_from_history(h, [_ref([0.0] * 5)])
    with pytest.raises(ValueError, match="single-task run"):
        m.forward_transfer_from_history(h, [h, h])
    # same budget, different evaluation grid: computed, with a warning
    coarse = m.EvalHistory(
        steps=[0, 50, 100], scores=[[0.0], [0.2], [0.4]], task_starts=[0], total_steps=100
    )  # AUC_b = 0.2
    with pytest.warns(RuntimeWarning, match="different\\s+relative steps"):
        ft = m.forward_transfer_from_history(h, [coarse, _ref([0.5, 0.6, 0.7, 0.8, 0.9])])
    np.testing.assert_allclose(ft, [0.25, -1 / 3])


def test_summarize() -> None:
    h = _history()
    s = m.summarize(h, k=2)
    assert s["final_performance"] == pytest.approx(0.7)
    assert s["performance_auc"] == pytest.approx(3.7 / 9)  # sum of P(t) = 3.7 over 9 evals
    assert s["auc"] == pytest.approx([0.4, 0.6])
    assert s["forgetting"] == pytest.approx([0.25])
    assert s["mean_forgetting"] == pytest.approx(0.25)
    assert s["forward_transfer"] is None
    assert math.isnan(s["mean_forward_transfer"])
    assert "reference" in s["forward_transfer_reason"]

    refs = [_ref([0.0, 0.1, 0.2, 0.3, 0.4]), _ref([1.0] * 5)]
    with pytest.warns(RuntimeWarning):
        s = m.summarize(h, refs, k=2)
    assert s["forward_transfer"][0] == pytest.approx(0.25)
    assert math.isnan(s["forward_transfer"][1])
    assert s["mean_forward_transfer"] == pytest.approx(0.25)  # mean over defined tasks
    assert "[1]" in s["forward_transfer_reason"]


def test_summarize_single_task() -> None:
    s = m.summarize(_ref([0.0, 0.5, 1.0, 1.0, 1.0]))
    assert s["forgetting"] == []
    assert math.isnan(s["mean_forgetting"])
    assert "single task" in s["mean_forgetting_reason"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": [0, 50, 50]}, "strictly increasing"),
        ({"scores": np.zeros((3, 3))}, "shape"),
        ({"scores": np.full((3, 2), 1.5)}, "normalize_score"),
        ({"task_starts": [50, 0]}, "strictly increasing"),
        ({"task_starts": [0, 100]}, "non-empty window"),
        ({"steps": [0, 50, 150]}, r"\[0, total_steps=100\]"),
        ({"steps": [0.0, 50.5, 100.0]}, "integer"),
    ],
)
def test_eval_history_validation(kwargs: dict, match: str) -> None:
    args = {
        "steps": [0, 50, 100],
        "scores": np.zeros((3, 2)),
        "task_starts": [0, 50],
        "total_steps": 100,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        m.EvalHistory(**args)


def test_window_without_evaluation_is_an_error() -> None:
    h = m.EvalHistory(
        steps=[0, 10, 100], scores=np.zeros((3, 3)), task_starts=[0, 40, 60], total_steps=100
    )
    with pytest.raises(ValueError, match="no evaluation inside task 1's window"):
        m.auc(h, 1)


# ---------------------------------------------------------------------------------------------
# bootstrap_ci
# ---------------------------------------------------------------------------------------------
def test_bootstrap_ci_contains_mean_and_narrows() -> None:
    rng = np.random.default_rng(123)
    small = rng.normal(0.5, 0.1, size=5)
    large = rng.normal(0.5, 0.1, size=400)
    mean_s, lo_s, hi_s = m.bootstrap_ci(small, n_resamples=2000)
    mean_l, lo_l, hi_l = m.bootstrap_ci(large, n_resamples=2000)
    assert mean_s == pytest.approx(small.mean())
    assert lo_s < mean_s < hi_s and lo_l < mean_l < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 4
    # large n: the 90% interval of a mean is about mean +- 1.645 sd / sqrt(n)
    half = 1.645 * large.std(ddof=1) / math.sqrt(large.size)
    assert (hi_l - lo_l) / 2 == pytest.approx(half, rel=0.1)
    # same seed, same interval; a wider confidence widens it
    assert m.bootstrap_ci(small, n_resamples=2000) == (mean_s, lo_s, hi_s)
    _, lo99, hi99 = m.bootstrap_ci(small, confidence=0.99, n_resamples=2000)
    assert lo99 <= lo_s and hi99 >= hi_s


def test_bootstrap_ci_two_points() -> None:
    # resampled means of {0, 1} take values in {0, .5, 1}; with 2000 resamples both tails
    # (each with probability 1/4) exceed 5%, so the 90% percentile interval is [0, 1]
    assert m.bootstrap_ci([0.0, 1.0], n_resamples=2000) == (0.5, 0.0, 1.0)


def test_bootstrap_ci_degenerate_and_bad_input() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy degenerate-data warning may leak
        assert m.bootstrap_ci([0.42]) == (0.42, 0.42, 0.42)
        assert m.bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match="drop the failed seeds"):
        m.bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        m.bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        m.bootstrap_ci([0.1, 0.2], confidence=90)


def test_new_task_gain_by_hand():
    # 3 tasks of 10 steps, evaluations every 5 steps: 0, 5, 10, ..., 30
    steps = [0, 5, 10, 15, 20, 25, 30]
    scores = np.array([
        # t0    t1    t2
        [0.0, 0.10, 0.00],  # step 0
        [0.5, 0.10, 0.00],  # 5
        [0.9, 0.20, 0.05],  # 10: end of task 0, start of task 1 (t1 at 0.2)
        [0.4, 0.60, 0.05],  # 15
        [0.3, 0.70, 0.10],  # 20: end of task 1, start of task 2 (t2 at 0.1)
        [0.3, 0.50, 0.40],  # 25
        [0.2, 0.40, 0.90],  # 30
    ])
    h = m.EvalHistory(steps, scores, [0, 10, 20], 30)
    # k = 2: task 1's last two in [10, 20] are 0.6, 0.7 -> 0.65 - 0.2 = 0.45;
    # task 2's last two in [20, 30] are 0.4, 0.9 -> 0.65 - 0.1 = 0.55
    np.testing.assert_allclose(m.new_task_gain_from_history(h, k=2), [0.45, 0.55])
    # k = 1: 0.7 - 0.2 and 0.9 - 0.1
    np.testing.assert_allclose(m.new_task_gain_from_history(h, k=1), [0.5, 0.8])
    out = m.summarize(h, k=2)
    assert out["new_task_gain"] == pytest.approx([0.45, 0.55])
    assert out["mean_new_task_gain"] == pytest.approx(0.5)
    one = m.summarize(m.EvalHistory([0, 5], [[0.1], [0.4]], [0], 5))
    assert math.isnan(one["mean_new_task_gain"]) and "single task" in one[
        "mean_new_task_gain_reason"]
    with pytest.raises(ValueError, match="k must be >= 1"):
        m.new_task_gain_from_history(h, k=0)


def test_reference_final_return_leaves_out_the_untrained_evaluation() -> None:
    """A reference run evaluated at its start and end (CartPoleRotated20's 10,240 steps):
    its final return is the end's, not the mean with the untrained policy's."""
    from pathlib import Path

    from agents.reference import ReferenceRun

    run = ReferenceRun(task=0, task_name="t", steps=np.array([0, 10240]),
                       mean_returns=np.array([25.0, 190.2]),
                       success_rates=np.array([np.nan, np.nan]), budget=10240,
                       path=Path("unused"))
    assert run.final_return == pytest.approx(190.2)
    many = ReferenceRun(task=0, task_name="t", steps=np.arange(0, 7000, 1000),
                        mean_returns=np.arange(7.0), success_rates=np.full(7, np.nan),
                        budget=6000, path=Path("unused"))
    assert many.final_return == pytest.approx(np.mean([2.0, 3.0, 4.0, 5.0, 6.0]))
