"""Continual-learning metrics, one implementation for RL and supervised learning.

Two views of the same quantities (docs/ARCHITECTURE.md, "Metrics"):

* the **performance matrix** ``R`` of shape ``(T, T)``, ``R[i, j]`` = score of task ``j``
  after training task ``i`` (supervised accuracy matrix; any scale, e.g. [0, 1] or percent);
* the **evaluation history** :class:`EvalHistory`: scores ``p_i(t)`` in [0, 1] of every task
  at every evaluation of a run (RL curves, Continual World style).

References:
    Lopez-Paz & Ranzato (2017), "Gradient Episodic Memory for Continual Learning" (BWT, FWT).
    Wołczyk et al. (2021), "Continual World: A Robotic Benchmark For Continual Reinforcement
    Learning" (average performance, forgetting, AUC-based forward transfer).
    Chaudhry et al. (2018), "Riemannian Walk for Incremental Learning" (forgetting curve).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.stats

ArrayLike = Any  # scalars, lists, numpy arrays


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def normalize_score(
    raw: ArrayLike, low: ArrayLike, high: ArrayLike, clip: bool = True
) -> float | np.ndarray:
    """Map a raw return to p = (R - low) / (high - low), clipped to [0, 1] by default.

    Per-task bounds make returns of different tasks comparable (docs/ARCHITECTURE.md,
    "Metrics": a random policy's return as ``low``, the single-task reference run's return
    as ``high``). ``low``/``high`` broadcast against ``raw``, so one call can normalise a
    whole (evals, tasks) array.
    Returns a float for scalar input, an array otherwise.
    """
    raw_a = np.asarray(raw, dtype=float)
    low_a = np.asarray(low, dtype=float)
    high_a = np.asarray(high, dtype=float)
    if not (np.all(np.isfinite(low_a)) and np.all(np.isfinite(high_a))):
        raise ValueError(
            f"normalize_score: task bounds must be finite, got low={low!r}, high={high!r}; "
            "configure finite per-task return bounds."
        )
    if np.any(high_a <= low_a):
        raise ValueError(
            f"normalize_score: the task bounds need high > low, got low={low!r}, high={high!r}; "
            "fix the task's return bounds (low = random policy return, high = reference return)."
        )
    if not np.all(np.isfinite(raw_a)):
        raise ValueError(
            f"normalize_score: raw scores must be finite, got {raw!r}; a nan/inf return "
            "points to a broken evaluation."
        )
    out = (raw_a - low_a) / (high_a - low_a)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    if out.ndim == 0:
        return float(out)
    return out


# --------------------------------------------------------------------------------------------
# Performance matrix R[i, j] (after training task i, evaluated on task j)
# --------------------------------------------------------------------------------------------
def check_matrix(R: ArrayLike) -> np.ndarray:
    """Validate the shape of a performance matrix; finiteness is checked per use."""
    M = np.asarray(R, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(
            f"performance matrix must be square (T, T) with T >= 1, got shape {M.shape}; "
            "R[i, j] is the score on task j after training task i."
        )
    return M


def _require_finite(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"performance matrix has nan/inf in {what}; evaluate every task needed "
            "for this metric after each training task."
        )


def _require_two_tasks(M: np.ndarray, metric: str) -> None:
    if M.shape[0] < 2:
        raise ValueError(
            f"{metric} needs at least 2 tasks, got a {M.shape[0]}x{M.shape[0]} matrix; "
            "it is undefined for a single task."
        )


def average_performance(R: ArrayLike, seen_only: bool = False) -> np.ndarray:
    """P after each training task, length T.

    ``seen_only=False``: mean over all T tasks (CW's P(t), unseen tasks count;
    docs/ARCHITECTURE.md, "Metrics").
    ``seen_only=True``: mean over tasks 0..i after task i, the usual supervised "average
    accuracy" curve; entries above the diagonal are then not read (they may be nan).
    """
    M = check_matrix(R)
    T = M.shape[0]
    if not seen_only:
        _require_finite(M, "some entries (seen_only=False uses every entry)")
        return M.mean(axis=1)
    lower = np.tril(np.ones((T, T), dtype=bool))
    _require_finite(M[lower], "the lower triangle (incl. diagonal)")
    return np.array([M[i, : i + 1].mean() for i in range(T)])


def final_performance(R: ArrayLike) -> float:
    """Mean score over all tasks after the last task (P(T))."""
    M = check_matrix(R)
    _require_finite(M[-1], "the last row")
    return float(M[-1].mean())


def forgetting(R: ArrayLike) -> np.ndarray:
    """F_i = R[i, i] - R[T-1, i] for i < T-1 (docs/ARCHITECTURE.md, "Metrics"), length T-1.

    Positive means the task was forgotten. With T == 1 no task can be forgotten and the
    result is an empty array (well defined); :func:`average_forgetting` raises instead of
    averaging nothing.
    """
    M = check_matrix(R)
    T = M.shape[0]
    diag = np.diag(M)[: T - 1]
    last = M[-1, : T - 1]
    _require_finite(diag, "the diagonal")
    _require_finite(last, "the last row")
    return diag - last


def average_forgetting(R: ArrayLike) -> float:
    """Mean of :func:`forgetting`; raises ValueError for T == 1 (mean of no tasks)."""
    M = check_matrix(R)
    _require_two_tasks(M, "average_forgetting")
    return float(forgetting(M).mean())


def forgetting_curve(R: ArrayLike) -> np.ndarray:
    """Average forgetting after each training task, length T, entry 0 is nan.

    After task i >= 1: mean over j < i of R[j, j] - R[i, j] (forgetting of the earlier tasks
    measured at that point, the per-step curve of Chaudhry et al. 2018 with the end-of-task
    score instead of the max). Its last entry equals :func:`average_forgetting`.
    """
    M = check_matrix(R)
    T = M.shape[0]
    lower = np.tril(np.ones((T, T), dtype=bool))
    _require_finite(M[lower], "the lower triangle (incl. diagonal)")
    out = np.full(T, np.nan)
    diag = np.diag(M)
    for i in range(1, T):
        out[i] = float(np.mean(diag[:i] - M[i, :i]))
    return out


def bwt(R: ArrayLike) -> float:
    """Backward transfer, Lopez-Paz & Ranzato (2017), eq. (2).

    BWT = 1/(T-1) * sum_{i < T-1} (R[T-1, i] - R[i, i]); negative means forgetting.
    """
    M = check_matrix(R)
    _require_two_tasks(M, "bwt")
    return float(-forgetting(M).mean())


def fwt(R: ArrayLike, b: ArrayLike) -> float:
    """Forward transfer, Lopez-Paz & Ranzato (2017), eq. (3).

    FWT = 1/(T-1) * sum_{i >= 1} (R[i-1, i] - b_i), with ``b`` the scores of the randomly
    initialised model on each task (length T; b_0 is not used).
    """
    M = check_matrix(R)
    _require_two_tasks(M, "fwt")
    T = M.shape[0]
    b_a = np.asarray(b, dtype=float)
    if b_a.shape != (T,):
        raise ValueError(
            f"fwt: b must hold one score per task, shape ({T},), got {b_a.shape}; "
            "b_i is the score of the randomly initialised model on task i."
        )
    above = np.array([M[i - 1, i] for i in range(1, T)])
    _require_finite(above, "the superdiagonal R[i-1, i]")
    if not np.all(np.isfinite(b_a[1:])):
        raise ValueError(f"fwt: b must be finite for tasks 1..T-1, got {b_a.tolist()}.")
    return float(np.mean(above - b_a[1:]))


# --------------------------------------------------------------------------------------------
# Evaluation history (RL curves)
# --------------------------------------------------------------------------------------------
@dataclass
class EvalHistory:
    """Scores of every task at every evaluation of one run.

    Attributes:
        steps: global step of each evaluation, shape (n_evals,), strictly increasing, within
            [0, total_steps].
        scores: p_i(t) in [0, 1], shape (n_evals, n_tasks); normalise returns first with
            :func:`normalize_score`.
        task_starts: global step at which each task starts, strictly increasing, one per task.
        total_steps: global step at which the run ends (end of the last task's window).

    Task i's window is the closed interval [task_starts[i], end_i] with
    end_i = task_starts[i+1] (or total_steps for the last task). Closed on both sides because
    an evaluation at a boundary step sees the model after all of task i's updates and before
    any of task i+1's: it is both the end of one curve and the start of the next.
    """

    steps: np.ndarray
    scores: np.ndarray
    task_starts: list[int]
    total_steps: int
    _windows: list[tuple[int, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.steps = np.asarray(self.steps)
        self.scores = np.asarray(self.scores, dtype=float)
        self.task_starts = [int(s) for s in self.task_starts]
        self.total_steps = int(self.total_steps)
        if self.steps.ndim != 1 or self.steps.size == 0:
            raise ValueError(
                f"EvalHistory.steps must be a non-empty 1-D array, got shape {self.steps.shape}."
            )
        if not np.issubdtype(self.steps.dtype, np.number) or not np.all(
            np.equal(np.mod(self.steps, 1), 0)
        ):
            raise ValueError("EvalHistory.steps must hold integer step counts.")
        self.steps = self.steps.astype(np.int64)
        n = self.steps.size
        n_tasks = len(self.task_starts)
        if n_tasks == 0:
            raise ValueError("EvalHistory.task_starts must name the start step of every task.")
        if self.scores.shape != (n, n_tasks):
            raise ValueError(
                f"EvalHistory.scores must have shape (n_evals, n_tasks) = ({n}, {n_tasks}) "
                f"to match steps and task_starts, got {self.scores.shape}."
            )
        if np.any(np.diff(self.steps) <= 0):
            raise ValueError(
                "EvalHistory.steps must be strictly increasing (one evaluation per step); "
                f"got {self.steps.tolist()}."
            )
        if np.any(np.diff(self.task_starts) <= 0):
            raise ValueError(
                f"EvalHistory.task_starts must be strictly increasing, got {self.task_starts}."
            )
        if self.task_starts[0] < 0 or self.task_starts[-1] >= self.total_steps:
            raise ValueError(
                f"EvalHistory: task starts {self.task_starts} must lie in [0, total_steps="
                f"{self.total_steps}); every task needs a non-empty window."
            )
        if self.steps[0] < 0 or self.steps[-1] > self.total_steps:
            raise ValueError(
                f"EvalHistory.steps must lie in [0, total_steps={self.total_steps}], got "
                f"[{self.steps[0]}, {self.steps[-1]}]."
            )
        if not np.all(np.isfinite(self.scores)) or np.any(
            (self.scores < 0.0) | (self.scores > 1.0)
        ):
            raise ValueError(
                "EvalHistory.scores must be finite and in [0, 1]; normalise raw returns with "
                "crl.metrics.normalize_score first."
            )
        ends = self.task_starts[1:] + [self.total_steps]
        self._windows = list(zip(self.task_starts, ends, strict=True))

    @property
    def n_tasks(self) -> int:
        return len(self.task_starts)

    def window(self, task: int) -> tuple[int, int]:
        """(start, end) steps of task's training window, both inclusive."""
        self._check_task(task)
        return self._windows[task]

    def window_mask(self, task: int) -> np.ndarray:
        """Boolean mask of the evaluations inside task's window [start, end]."""
        start, end = self.window(task)
        return (self.steps >= start) & (self.steps <= end)

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.n_tasks:
            raise IndexError(f"task {task} out of range for a history of {self.n_tasks} tasks.")


def performance_curve(history: EvalHistory) -> np.ndarray:
    """P(t) = mean_i p_i(t) at each evaluation, shape (n_evals,)."""
    return history.scores.mean(axis=1)


def _window_scores(history: EvalHistory, task: int, score_task: int) -> np.ndarray:
    mask = history.window_mask(task)
    if not mask.any():
        start, end = history.window(task)
        raise ValueError(
            f"no evaluation inside task {task}'s window [{start}, {end}]; evaluate during "
            "every task (lower the evaluation interval)."
        )
    return history.scores[mask, score_task]


def end_scores(history: EvalHistory, task: int, score_task: int, k: int) -> np.ndarray:
    """p_score_task at the last k evaluations inside task's window, without the evaluation
    taken at the window's first step: that one precedes any training on the task (it is
    the previous task's end), so it is never an end value. It matters where a window holds
    k or fewer later evaluations (one evaluation per task: the end value would otherwise
    be the mean of the task's start and end)."""
    start, end = history.window(task)
    mask = history.window_mask(task) & (history.steps > start)
    if not mask.any():
        raise ValueError(
            f"no evaluation inside task {task}'s window ({start}, {end}] after its start; "
            "evaluate during every task (lower the evaluation interval)."
        )
    return history.scores[mask, score_task][-k:]


def forgetting_from_history(history: EvalHistory, k: int = 5) -> np.ndarray:
    """F_i for i < N-1, length N-1 (empty for a single task).

    F_i = mean(p_i at the last k evaluations inside task i's window (start_i, end_i])
        - mean(p_i at the last k evaluations of the run, taken inside the last task's
          window (start_{N-1}, total_steps]).
    CW averages the last k = 5 evaluations to smooth evaluation noise. The evaluation at a
    window's start (before the task is trained) is not an end value; if a window holds
    fewer than k later evaluations, all of them are used; none raises ValueError.
    """
    if k < 1:
        raise ValueError(f"forgetting_from_history: k must be >= 1, got {k}.")
    N = history.n_tasks
    out = np.empty(max(N - 1, 0))
    for i in range(N - 1):
        end_of_task = end_scores(history, i, i, k).mean()
        end_of_run = end_scores(history, N - 1, i, k).mean()
        out[i] = end_of_task - end_of_run
    return out


def new_task_gain_from_history(history: EvalHistory, k: int = 5) -> np.ndarray:
    """G_i for the tasks after the first (1 <= i < N), length N-1 (empty for one task).

    G_i = mean(p_i at the last k evaluations inside task i's window, after its start) - p_i
    at the evaluation at (or last before) the window's first step, before task i is trained
    on: how much of task i the agent learnt, on the same end-of-task value as forgetting.
    A method that "forgets less" because it stopped learning shows it here. The first task
    is left out: no method acts on it, so its gain is the same for every method.
    """
    if k < 1:
        raise ValueError(f"new_task_gain_from_history: k must be >= 1, got {k}.")
    N = history.n_tasks
    out = np.empty(max(N - 1, 0))
    for i in range(1, N):
        out[i - 1] = end_scores(history, i, i, k).mean() - _start_score(history, i)
    return out


def _start_score(history: EvalHistory, task: int) -> float:
    """p_task when its training began: the evaluation at the window's first step, else the
    latest one before it (an evaluation inside the window was taken after some training)."""
    start, _ = history.window(task)
    before = np.flatnonzero(history.steps <= start)
    if before.size == 0:
        raise ValueError(
            f"no evaluation at or before task {task}'s start (step {start}): its score "
            "before training is unknown; evaluate at every task start"
        )
    return float(history.scores[before[-1], task])


def end_of_task_scores(history: EvalHistory, k: int = 5) -> np.ndarray:
    """E_i = mean of p_i at the last k evaluations inside task i's window after its start:
    what each task reached by the end of its own training (the end value forgetting starts
    from)."""
    if k < 1:
        raise ValueError(f"end_of_task_scores: k must be >= 1, got {k}.")
    return np.array([end_scores(history, i, i, k).mean() for i in range(history.n_tasks)])


def plasticity_slope(ends: ArrayLike) -> float:
    """Least-squares slope of the end-of-task scores over the task index: below zero when
    each new task ends lower than the ones before (loss of plasticity, Dohare et al. 2024),
    whatever happens to the old tasks. nan for fewer than two tasks. Comparable across
    sequences only where the tasks are of one difficulty (permuted MNIST, ``--cycles``)."""
    y = np.asarray(ends, dtype=float).ravel()
    if y.size < 2 or not np.all(np.isfinite(y)):
        return float("nan")
    return float(np.polyfit(np.arange(y.size, dtype=float), y, 1)[0])


def auc(history: EvalHistory, task: int) -> float:
    """Mean of p_task over the evaluations inside task's window [start, end] (inclusive).

    CW's AUC: the area under the task's training curve normalised by its length; with
    evenly spaced evaluations the mean is that normalised area.
    """
    history._check_task(task)
    return float(_window_scores(history, task, task).mean())


def forward_transfer(auc_i: ArrayLike, auc_ref_i: ArrayLike) -> float | np.ndarray:
    """FT = (AUC - AUC_b) / (1 - AUC_b), Wołczyk et al. (2021), Continual World.

    ``AUC_b`` is the same task's AUC in a single-task reference run. FT <= 1; it is nan
    (with a warning) where AUC_b == 1: a reference that is perfect from its first
    evaluation leaves no room to transfer, so the ratio is undefined.
    """
    a = np.asarray(auc_i, dtype=float)
    b = np.asarray(auc_ref_i, dtype=float)
    for name, v in (("auc_i", a), ("auc_ref_i", b)):
        if not np.all(np.isfinite(v)) or np.any((v < 0) | (v > 1)):
            raise ValueError(f"forward_transfer: {name} must be in [0, 1], got {v.tolist()}.")
    perfect = b >= 1.0
    if np.any(perfect):
        warnings.warn(
            "forward_transfer: the reference AUC is 1 (the single-task run is perfect from "
            "the start), transfer is undefined there and set to nan.",
            RuntimeWarning,
            stacklevel=2,
        )
    denom = np.where(perfect, np.nan, 1.0 - b)
    out = (a - b) / denom
    if out.ndim == 0:
        return float(out)
    return out


def forward_transfer_from_history(
    history: EvalHistory, reference_histories: Sequence[EvalHistory]
) -> np.ndarray:
    """FT_i for every task, comparing task i's window with its single-task reference run.

    ``reference_histories[i]`` is the reference run of task i alone: one task, scores of
    shape (n, 1), and a window of the same length as task i's window here (same step
    budget); a different length is an error since the AUCs would not be comparable.
    """
    N = history.n_tasks
    if len(reference_histories) != N:
        raise ValueError(
            f"forward_transfer_from_history: need one reference history per task ({N}), "
            f"got {len(reference_histories)}."
        )
    out = np.empty(N)
    for i, ref in enumerate(reference_histories):
        if not isinstance(ref, EvalHistory) or ref.n_tasks != 1:
            raise ValueError(
                f"reference history {i} must be an EvalHistory of a single-task run "
                "(scores of shape (n, 1))."
            )
        start, end = history.window(i)
        r_start, r_end = ref.window(0)
        if end - start != r_end - r_start:
            raise ValueError(
                f"reference history {i} covers {r_end - r_start} steps but task {i}'s window "
                f"[{start}, {end}] covers {end - start}; run the reference with the same "
                "per-task step budget."
            )
        rel = history.steps[history.window_mask(i)] - start
        r_rel = ref.steps[ref.window_mask(0)] - r_start
        if rel.shape != r_rel.shape or np.any(rel != r_rel):
            warnings.warn(
                f"task {i}: the continual run and its reference were evaluated at different "
                "relative steps; their AUCs are compared anyway (mean over each window).",
                RuntimeWarning,
                stacklevel=2,
            )
        out[i] = forward_transfer(auc(history, i), auc(ref, 0))
    return out


def _nanmean_or_nan(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")


def summarize(
    history: EvalHistory,
    references: Sequence[EvalHistory] | None = None,
    k: int = 5,
) -> dict[str, Any]:
    """The CW headline numbers of one run, JSON-friendly (lists and floats).

    Keys: ``final_performance`` (P at the last evaluation), ``performance_auc`` (mean of
    P(t) over all evaluations), ``auc`` (per task), ``forgetting`` (per task i < N-1) and
    ``mean_forgetting``, ``new_task_gain`` (per task i > 0) and ``mean_new_task_gain``,
    ``forward_transfer`` (per task) and ``mean_forward_transfer``
    (mean over tasks where FT is defined), ``end_of_task_score`` (per task) and
    ``plasticity_slope`` (their slope over the task index). Where a metric cannot be
    computed its value is nan / None and ``<metric>_reason`` says why.
    """
    P = performance_curve(history)
    out: dict[str, Any] = {
        "n_tasks": history.n_tasks,
        "final_performance": float(P[-1]),
        "performance_auc": float(P.mean()),
        "auc": [auc(history, i) for i in range(history.n_tasks)],
    }
    ends = end_of_task_scores(history, k=k)
    out["end_of_task_score"] = ends.tolist()
    out["plasticity_slope"] = plasticity_slope(ends)
    if history.n_tasks < 2:
        out["plasticity_slope_reason"] = "a single task has no trend"
    for key, values, why in (
        ("forgetting", forgetting_from_history(history, k=k),
         "a single task cannot be forgotten"),
        ("new_task_gain", new_task_gain_from_history(history, k=k),
         "a single task has no later task to learn"),
    ):
        out[key] = values.tolist()
        out[f"mean_{key}"] = float(values.mean()) if values.size else float("nan")
        if not values.size:
            out[f"mean_{key}_reason"] = why
    if references is None:
        out["forward_transfer"] = None
        out["mean_forward_transfer"] = float("nan")
        out["forward_transfer_reason"] = "no single-task reference runs given"
    else:
        FT = forward_transfer_from_history(history, references)
        out["forward_transfer"] = FT.tolist()
        out["mean_forward_transfer"] = _nanmean_or_nan(FT)
        if np.isnan(FT).any():
            undefined = [i for i in range(FT.size) if np.isnan(FT[i])]
            out["forward_transfer_reason"] = (
                f"undefined for tasks {undefined}: their reference AUC is 1"
            )
    return out


# --------------------------------------------------------------------------------------------
# Over seeds
# --------------------------------------------------------------------------------------------
def bootstrap_ci(
    values: ArrayLike,
    confidence: float = 0.9,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean over seeds and its bootstrap confidence interval.

    Percentile bootstrap (``scipy.stats.bootstrap(method="percentile")``), not BCa: runs
    have few seeds (3-10), where BCa's jackknife acceleration is unstable and scipy returns
    nan for near-degenerate samples, while the percentile interval is defined for any
    n >= 2 and is what CW reports. One value, or all values equal, gives
    low == high == mean (no spread to resample). nan/inf raises ValueError: silently
    dropping a crashed seed would bias the mean; drop it explicitly before calling.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"bootstrap_ci: values must be a non-empty 1-D array (one value per seed), "
            f"got shape {x.shape}."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(
            "bootstrap_ci: values contain nan/inf; drop the failed seeds explicitly "
            "before computing the interval."
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}.")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_ci: n_resamples must be >= 1, got {n_resamples}.")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return mean, mean, mean
    kwargs: dict[str, Any] = {
        "confidence_level": confidence,
        "n_resamples": n_resamples,
        "method": "percentile",
        "vectorized": True,
    }
    try:
        res = scipy.stats.bootstrap((x,), np.mean, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 names the generator random_state
        res = scipy.stats.bootstrap(
            (x,), np.mean, random_state=np.random.default_rng(seed), **kwargs
        )
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)
