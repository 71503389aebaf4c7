"""PNG figures of `crl report`: several methods of one setting side by side.

Pure drawing from arrays (means over seeds, intervals); :mod:`crl.report` computes them.
Figures go through :mod:`crl.plots`' Agg helpers, never pyplot, so a report leaks no figure
and leaves the user's backend alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crl.plots import new_figure, save_png


@dataclass
class MethodCurves:
    """Mean per-task scores over seeds of one method, at common evaluation steps."""

    label: str
    steps: np.ndarray
    scores: np.ndarray  # (n_evals, n_tasks), nan where unknown
    n_seeds: int


@dataclass
class Band:
    """A line with its confidence band (low/high None: no band, e.g. one seed)."""

    label: str
    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    n_seeds: int


@dataclass
class Bar:
    label: str
    mean: float
    low: float
    high: float
    n: int


def _seed_text(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def plot_task_curves_by_method(
    methods: Sequence[MethodCurves],
    task_names: Sequence[str],
    schedule: Sequence[int],
    stage_ends: Sequence[int],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """One panel per method: every task's mean score over the run, each stage's window
    shaded in its task's colour and task switches marked, P(t) dashed."""
    if not methods:
        raise ValueError("plot_task_curves_by_method needs at least one method's curves")
    n = len(methods)
    fig = new_figure(11.0, 2.6 * n + 0.8)
    axes = np.atleast_1d(fig.subplots(n, 1, sharex=True, sharey=True, squeeze=False)[:, 0])
    starts = [0, *stage_ends[:-1]]
    colors = [f"C{i % 10}" for i in range(len(task_names))]
    for ax, m in zip(axes, methods, strict=True):
        for s, task in enumerate(schedule):
            ax.axvspan(starts[s], stage_ends[s], color=colors[task], alpha=0.08, lw=0)
            if s > 0:
                ax.axvline(starts[s], color="gray", ls=":", lw=1)
        for t, name in enumerate(task_names):
            ax.plot(m.steps, m.scores[:, t], color=colors[t], lw=1.5, label=name)
        stage_scores = m.scores[:, list(schedule)]
        with np.errstate(invalid="ignore"):
            ax.plot(m.steps, stage_scores.mean(axis=1), color="black", ls="--", lw=2,
                    label="average P(t)")
        ax.set_title(f"{m.label} (mean of {_seed_text(m.n_seeds)})", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(0, stage_ends[-1])
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def plot_bands(
    lines: Sequence[Band],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    boundaries: Sequence[int] = (),
    xticklabels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One line per method (mean over seeds) with its confidence band where it has one."""
    if not lines:
        raise ValueError("plot_bands needs at least one line")
    fig = new_figure(9.0, 4.5)
    ax = fig.add_subplot()
    for b in boundaries:
        ax.axvline(b, color="gray", ls=":", lw=1)
    for i, line in enumerate(lines):
        color = f"C{i % 10}"
        marker = "o" if line.x.size <= 30 else None
        ax.plot(line.x, line.mean, color=color, lw=1.8, marker=marker,
                label=f"{line.label} ({_seed_text(line.n_seeds)})")
        if line.low is not None and line.high is not None:
            ax.fill_between(line.x, line.low, line.high, color=color, alpha=0.2, lw=0)
    if xticklabels is not None:
        ax.set_xticks(lines[0].x, list(xticklabels), rotation=45, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_png(fig, path)


def plot_metric_bars(
    panels: Sequence[tuple[str, Sequence[Bar]]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """One panel per metric, one bar per method (mean over seeds) with its CI as error bar;
    a method without a value gets "n/a" at its place."""
    if not panels:
        raise ValueError("plot_metric_bars needs at least one metric")
    n_methods = max(len(bars) for _, bars in panels)
    fig = new_figure(max(4.0, 1.0 + 0.9 * n_methods) * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, bars) in zip(axes, panels, strict=True):
        x = np.arange(len(bars))
        labels = [b.label for b in bars]
        in_axes = ax.get_xaxis_transform()  # x in data, y in axes coordinates
        for i, b in enumerate(bars):
            if b.n == 0 or not np.isfinite(b.mean):
                ax.text(i, 0.5, "n/a", ha="center", va="center", color="gray",
                        transform=in_axes)
                continue
            err = np.array([[b.mean - b.low], [b.high - b.mean]])
            ax.bar(i, b.mean, color=f"C{i % 10}", alpha=0.85,
                   yerr=err if b.n > 1 else None, capsize=5)
            if b.n == 1:
                ax.text(i, 0.02, "1 seed,\nno CI", ha="center", va="bottom", fontsize=7,
                        transform=in_axes)
        ax.set_xlim(-0.6, len(bars) - 0.4)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def plot_matrices_side_by_side(
    matrices: Sequence[tuple[str, np.ndarray, int]],
    task_names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """One annotated accuracy-matrix heatmap per method (mean over seeds), one colour scale."""
    if not matrices:
        raise ValueError("plot_matrices_side_by_side needs at least one matrix")
    T = len(task_names)
    finite = np.concatenate([m[np.isfinite(m)] for _, m, _ in matrices])
    lo, hi = (0.0, 1.0) if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else (
        float(finite.min()), float(finite.max()))
    cell = max(3.2, 0.55 * T + 1.6)
    fig = new_figure(cell * len(matrices) + 1.2, cell + 0.8)
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    im = None
    for ax, (label, M, n_seeds) in zip(axes, matrices, strict=True):
        if M.shape != (T, T):
            raise ValueError(f"matrix of {label} has shape {M.shape}, expected ({T}, {T}) "
                             "for the task names given")
        im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", vmin=lo, vmax=hi)
        ax.set_title(f"{label} ({_seed_text(n_seeds)})", fontsize=10)
        ax.set_xticks(range(T), list(task_names), rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(T), list(task_names), fontsize=7)
        ax.set_xlabel("evaluated on task")
        fontsize = 8 if T <= 10 else 5
        for i in range(T):
            for j in range(T):
                v = M[i, j]
                if np.isfinite(v):
                    color = "black" if (v - lo) / ((hi - lo) or 1.0) > 0.6 else "white"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=color,
                            fontsize=fontsize)
    axes[0].set_ylabel("after training task")
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)
